"""The one place where stages talk to MLflow.

Usage in a stage (every rank may run this; only global rank 0 touches MLflow):

    with Tracker(cfg.tracking, cfg, tags={"stage": "adapt", "method": "minijoint", "target_lang": "sw",
                                         **layout_tags(tp=2, pp=1)}) as tracker:
        for step in ...:
            tracker.log_metrics({"train/loss": loss, "train/lr": lr, "train/grad_norm": gn,
                                 "throughput/tokens_per_s": tps, "compute/flops": flops_so_far}, step)
        tracker.log_metrics({"eval/loss": eval_loss}, step)
        tracker.log_loss_curves()                 # plots/loss_curves.png from the metrics logged above
        tracker.log_model(export_dir / "mini", "mini")   # uploaded only if tracking.log_models

- Tracking URI: `tracking.uri`, else $MLFLOW_TRACKING_URI, else the local SQLite store
  `<tracking.store_dir>/mlflow.db` with artifacts in `<store_dir>/artifacts` (never the legacy ./mlruns file store,
  never a path that depends on the current directory after start-up). `python -m minimodel.ui` serves that store.
- The run records: the resolved config as params (flattened) and as config.yaml; tags for stage/method/languages
  (given by the stage) plus git commit, host, world size and the Slurm job (id, array job/task, restart count of a
  requeued job; added here).
- A stage that resumes from its checkpoints continues its MLflow run too: `Tracker.resumable(cfg, output_dir, ...)`
  keeps the run id in <output_dir>/mlflow_run.json.
- Logging never blocks training for long: metrics are buffered and sent as one batch per `flush_every` steps, and
  every MLflow call runs in order on one background thread; `finish()` waits for them.
- Nothing is lost when the server is down: at start-up the run goes to the local store with a warning; if the
  server goes away mid-run, the background thread warns, opens a new run in the local store and replays everything
  this Tracker has logged so far into it.
- A pipeline is one parent run: a stage started with `tracking.parent_run_id` (or $MINIMODEL_PARENT_RUN_ID, see
  `Tracker.child_env`) is nested under it. A re-run of the pipeline is a new parent run: a stage it skips is shown
  there by `link_run` (runs tagged with `stage_key(...)`, found with `find_finished_run`); a stage it resumes
  (`Tracker.resumable`) moves its continued run under the new parent.
"""
from __future__ import annotations

import atexit
import dataclasses
import getpass
import hashlib
import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from minimodel.config import flatten, require, to_dict
from minimodel.files import write_text_atomic

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MINIMODEL_PARENT_RUN_ID"
STAGE_KEY_TAG = "stage_key"
REUSED_RUN_TAG = "reused_run_id"
RUN_FILE = "mlflow_run.json"  # in a stage's output_dir: the run a resumed stage continues (Tracker.resumable)
SLURM_TAGS = {"SLURM_JOB_ID": "slurm_job_id", "SLURM_ARRAY_JOB_ID": "slurm_array_job_id",
              "SLURM_ARRAY_TASK_ID": "slurm_array_task_id", "SLURM_RESTART_COUNT": "slurm_restart_count"}


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<store_dir>/mlflow.db
    store_dir: str = "runs"  # local SQLite store + artifacts; also the fallback when the server is down
    experiment: str = "minimodel"
    run_name: str | None = None  # None: "<stage>-<language>" from the tags
    parent_run_id: str | None = None  # None: $MINIMODEL_PARENT_RUN_ID if set
    flush_every: int = 10  # steps of metrics per log_batch call
    log_models: bool = False  # upload tokenizer / exported model directories (else only record their path)

    def validate(self) -> None:
        require(self.flush_every >= 1, "tracking.flush_every", f"must be >= 1, got {self.flush_every}")
        require(bool(self.experiment), "tracking.experiment", "must be a non-empty experiment name")


# -- where runs go ---------------------------------------------------------------------------------
def local_store_uri(store_dir: str | os.PathLike) -> str:
    path = Path(store_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def resolve_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(cfg.store_dir)


def _is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _server_reachable(uri: str) -> bool:
    if not _is_server(uri):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # it answered (e.g. 401 behind an auth proxy): up, and the MLflow calls will say what is wrong
    except OSError:
        return False


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live next to its database (MLflow's default would be ./mlruns of the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None  # a server (or another database) decides for itself


def _connect(cfg: TrackingConfig, parent_run_id: str | None = None):
    """(client, uri, experiment_id, fell_back_from): the configured store, or the local one if the server is down.

    The experiment is the parent run's when there is one (the UI nests child runs only within their parent's
    experiment, whatever experiment the stage's own config names), else `cfg.experiment`, created if needed.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri, fell_back_from = resolve_uri(cfg), None
    if not _server_reachable(uri):
        fell_back_from, uri = uri, local_store_uri(cfg.store_dir)
        log.warning("MLflow server %s is unreachable: logging to the local store %s instead (view it with "
                    "`python -m minimodel.ui --store %s`)", fell_back_from, uri, cfg.store_dir)
    client = MlflowClient(tracking_uri=uri)
    if parent_run_id:
        try:
            return client, uri, client.get_run(parent_run_id).info.experiment_id, fell_back_from
        except MlflowException:
            log.warning("parent run %s is not in the MLflow store %s: the run will not be nested under it",
                        parent_run_id, uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        try:
            return client, uri, client.create_experiment(cfg.experiment, _artifact_location(uri)), fell_back_from
        except MlflowException:  # another process created it in the meantime
            exp = client.get_experiment_by_name(cfg.experiment)
            if exp is None:
                raise
    return client, uri, exp.experiment_id, fell_back_from


# -- what the run is -------------------------------------------------------------------------------
def _process_group():
    """torch.distributed if a process group is up (without importing torch when the caller has not)."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def global_rank() -> int:
    dist = _process_group()
    return dist.get_rank() if dist else int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def world_size() -> int:
    dist = _process_group()
    return dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def layout_tags(tp: int = 1, pp: int = 1) -> dict[str, int | str]:
    """Tags for the parallel layout of a run: tp, pp, dp (= world size / (tp * pp)) and layout "tp2-pp1-dp2"."""
    dp = max(world_size() // (tp * pp), 1)
    return {"tp": tp, "pp": pp, "dp": dp, "layout": f"tp{tp}-pp{pp}-dp{dp}"}


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _config_dict(config: Any) -> dict:
    return to_dict(config) if dataclasses.is_dataclass(config) else dict(config)


def stage_key(stage: str, config: Any, *parts: str) -> str:
    """"<stage>-<parts>-<hash of the config>": equal keys mean a finished run can stand for a re-run.

    The `tracking` section is left out of the hash: where a run is logged does not change its result.
    """
    settings = {k: v for k, v in _config_dict(config).items() if k != "tracking"}
    digest = hashlib.sha256(yaml.safe_dump(settings, sort_keys=True).encode()).hexdigest()[:12]
    return "-".join([stage, *parts, digest])


# -- re-runs ---------------------------------------------------------------------------------------
def find_finished_run(cfg: TrackingConfig, key: str, parent_run_id: str | None = None) -> str | None:
    """The newest FINISHED run tagged stage_key=`key` (under `parent_run_id` if given), or None."""
    client, _, experiment_id, _ = _connect(cfg, parent_run_id)
    query = f"tags.{STAGE_KEY_TAG} = '{key}' and attributes.status = 'FINISHED'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def link_run(cfg: TrackingConfig, earlier_run_id: str, parent_run_id: str | None = None) -> str:
    """Show a finished run in pipeline `parent_run_id` without running or copying it again.

    If the earlier run already is a child of that parent it is returned as is; otherwise a small finished child run
    is created that carries the earlier run's tags, a `reused_run_id` tag and a description linking to it.
    """
    parent = parent_run_id or cfg.parent_run_id or os.environ.get(PARENT_RUN_ENV)
    client, _, experiment_id, _ = _connect(cfg, parent)
    earlier = client.get_run(earlier_run_id)
    if parent is None or earlier.data.tags.get("mlflow.parentRunId") == parent:
        return earlier_run_id
    tags = {k: v for k, v in earlier.data.tags.items() if not k.startswith("mlflow.") and k != STAGE_KEY_TAG}
    link = f"#/experiments/{earlier.info.experiment_id}/runs/{earlier_run_id}"
    tags.update({
        REUSED_RUN_TAG: earlier_run_id,
        "mlflow.parentRunId": parent,
        "mlflow.note.content": f"Reused the finished run [{earlier.info.run_name}]({link}); not run again.",
    })
    run = client.create_run(experiment_id, run_name=f"{earlier.info.run_name} (reused)", tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


# -- the tracker -----------------------------------------------------------------------------------
class Tracker:
    """An MLflow run for one stage (inert on ranks other than 0 and when tracking is disabled)."""

    def __init__(self, cfg: TrackingConfig, config: Any = None, tags: dict[str, Any] | None = None,
                 rank: int | None = None, run_id: str | None = None):
        """Start a run, or with `run_id` continue an existing one of the same store (see `resume`)."""
        self.cfg = cfg
        self.active = cfg.enabled and (global_rank() if rank is None else rank) == 0
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri: str | None = None
        self.history: dict[str, list[tuple[int, float]]] = {}  # every metric logged, for plots
        self.errors: list[str] = []  # calls MLflow rejected (a reachable store said no)
        self._buffer: list = []
        self._steps_buffered = 0
        self._finished = False
        self._pid = os.getpid()
        self._earlier_params: dict[str, str] = {}  # of a continued run: MLflow params cannot change
        if not self.active:
            return
        self._local_store = Path(cfg.store_dir).resolve()  # fixed now, in case the stage changes directory
        parent = cfg.parent_run_id or os.environ.get(PARENT_RUN_ENV)
        self.client, self.uri, self.experiment_id, fell_back_from = _connect(
            dataclasses.replace(cfg, store_dir=str(self._local_store)), parent)
        earlier = self._find_run(run_id) if run_id else None
        if earlier is not None:
            from mlflow.entities import RunTag

            self.run_id, self.run_name = run_id, earlier.info.run_name
            resumed_tags = self._resumed_tags(earlier, parent)
            resumed_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
            self.experiment_id = earlier.info.experiment_id
            self._tags = {**earlier.data.tags, **resumed_tags}
            self._earlier_params = dict(earlier.data.params)
            self.client.update_run(run_id, status="RUNNING")
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in resumed_tags.items()])
        else:
            self._tags = self._default_tags()
            self._tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
            if parent:
                self._tags["mlflow.parentRunId"] = parent
            if fell_back_from:
                self._tags["tracking_fallback_from"] = fell_back_from
            self.run_name = cfg.run_name or self._default_run_name()
            self.run_id = self.client.create_run(self.experiment_id, run_name=self.run_name,
                                                 tags=self._tags).info.run_id
        log.info("MLflow run %s (%s) in %s", self.run_name, self.run_id, self.uri)

        # Every call is journaled (for a replay into the local store) and executed in order by one thread.
        self._journal: list[tuple[str, tuple, dict]] = []
        self._staging = Path(tempfile.mkdtemp(prefix="minimodel-tracking-"))  # files we create, kept for replays
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._worker.start()
        atexit.register(self._at_exit)
        if config is not None:
            self.log_config(config)

    @classmethod
    def resume(cls, cfg: TrackingConfig, run_id: str, config: Any = None,
               tags: dict[str, Any] | None = None) -> "Tracker":
        """Continue the run `run_id` (e.g. a pipeline's parent run when the pipeline is run again): it is marked
        RUNNING again and new metrics, tags and artifacts are added to it. If the store does not hold that run
        (another store, or the server is down and this is the local one), a new run is started instead."""
        return cls(cfg, config, tags, run_id=run_id)

    @classmethod
    def resumable(cls, cfg: TrackingConfig, output_dir: str | os.PathLike, config: Any = None,
                  tags: dict[str, Any] | None = None, resume: bool = True) -> "Tracker":
        """The run of a stage that resumes from its own checkpoints in `output_dir` (a requeued Slurm job, the
        same command run again): with `resume` (the stage loaded a checkpoint), the run named in
        <output_dir>/mlflow_run.json is continued (see `resume`); otherwise, or if there is none, a new run is
        started. The run's id is then written there for the next resume."""
        run_file = Path(output_dir) / RUN_FILE
        earlier = None
        if resume and run_file.is_file():
            earlier = json.loads(run_file.read_text()).get("run_id")
        tracker = cls(cfg, config, tags, run_id=earlier)
        if tracker.active and tracker.run_id != earlier:
            write_text_atomic(run_file, json.dumps({"run_id": tracker.run_id, "tracking_uri": tracker.uri}) + "\n")
        return tracker

    def _resumed_tags(self, earlier, parent: str | None) -> dict[str, str]:
        """Tags that change when a run is continued: where it runs now, how often it was resumed, and its parent
        when it is continued under another one (a pipeline run again), if in the same experiment."""
        tags = {k: v for k, v in self._default_tags().items() if k in ("host", "world_size", *SLURM_TAGS.values())}
        tags["resumes"] = str(int(earlier.data.tags.get("resumes", "0")) + 1)
        if parent and earlier.data.tags.get("mlflow.parentRunId") != parent \
                and earlier.info.experiment_id == self.experiment_id:
            tags["mlflow.parentRunId"] = parent
        return tags

    def _find_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            log.warning("run %s is not in the MLflow store %s: starting a new run instead", run_id, self.uri)
            return None

    def _default_tags(self) -> dict[str, str]:
        commit = git_commit()
        tags = {
            "git_commit": commit, "mlflow.source.git.commit": commit,
            "host": socket.gethostname(), "world_size": str(world_size()),
            "mlflow.user": getpass.getuser(), "mlflow.source.name": Path(sys.argv[0]).name or "python",
            "mlflow.source.type": "LOCAL",
        }
        tags.update({tag: os.environ[var] for var, tag in SLURM_TAGS.items() if os.environ.get(var)})
        return tags

    def _default_run_name(self) -> str | None:
        lang = self._tags.get("target_lang") or self._tags.get("source_lang")
        stage = self._tags.get("stage")
        return "-".join(p for p in (stage, lang) if p) or None

    # -- background execution ----------------------------------------------------------------------
    def _submit(self, method: str, *args, **kwargs) -> None:
        self._journal.append((method, args, kwargs))
        self._queue.put(len(self._journal) - 1)

    def _work(self) -> None:
        while True:
            index = self._queue.get()
            try:
                if index is None:
                    return
                method, args, kwargs = self._journal[index]
                try:
                    getattr(self.client, method)(self.run_id, *args, **kwargs)
                except Exception:  # noqa: BLE001 - decide whether the store is gone or said no
                    self._handle_failure(index)
            finally:
                self._queue.task_done()

    def _handle_failure(self, index: int) -> None:
        """Journal entry `index` failed: retry it once if the store is there, else move to the local store."""
        if not _is_server(self.uri) or _server_reachable(self.uri):
            method, args, kwargs = self._journal[index]
            time.sleep(1)  # a server that was restarting, a SQLite store locked by another stage's process
            try:
                getattr(self.client, method)(self.run_id, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - the store said no: report it, do not stop training
                self.errors.append(f"{method}: {e}")
                log.error("MLflow rejected %s on run %s: %s", method, self.run_id, e)
            return
        lost_uri, lost_run = self.uri, self.run_id
        self.uri = local_store_uri(self._local_store)
        log.warning("MLflow server %s went away during run %s: continuing in the local store %s (view it with "
                    "`python -m minimodel.ui --store %s`); everything logged so far is replayed there",
                    lost_uri, lost_run, self.uri, self._local_store)
        self.client, _, self.experiment_id, _ = _connect(dataclasses.replace(self.cfg, uri=self.uri),
                                                         self._tags.get("mlflow.parentRunId"))
        tags = {**self._tags, "tracking_fallback_from": lost_uri, "tracking_lost_run_id": lost_run}
        self.run_id = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags).info.run_id
        for method, args, kwargs in self._journal[:index + 1]:
            try:
                getattr(self.client, method)(self.run_id, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - a local store that refuses a call: report, keep the rest
                self.errors.append(f"{method}: {e}")
                log.error("replaying %s into the local store failed: %s", method, e)

    # -- params, tags, artifacts -------------------------------------------------------------------
    def log_config(self, config: Any) -> None:
        """The resolved config as params (flattened keys like model.hidden_size) and as config.yaml."""
        if not self.active:
            return
        from mlflow.entities import Param

        settings = _config_dict(config)
        values = {k: str(v)[:6000] for k, v in flatten(settings).items()}
        changed = {k: v for k, v in values.items() if self._earlier_params.get(k, v) != v}
        if changed:  # a continued run whose config was changed (e.g. more steps): params are immutable
            log.warning("run %s continues with changed settings %s: recorded as tags resumed_with.<key>",
                        self.run_id, changed)
            self.set_tags({f"resumed_with.{k}": v for k, v in changed.items()})
        params = [Param(k, v) for k, v in values.items() if k not in self._earlier_params]
        for i in range(0, len(params), 100):
            self._submit("log_batch", params=params[i:i + 100])
        path = self._staging / "config.yaml"
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        self._submit("log_artifact", str(path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        run_tags = [RunTag(k, str(v)[:8000]) for k, v in tags.items()]
        for i in range(0, len(run_tags), 100):
            self._submit("log_batch", tags=run_tags[i:i + 100])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or directory (in the background: it must stay in place until finish())."""
        if not self.active:
            return
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"cannot log artifact {path}: it does not exist")
        self._submit("log_artifacts" if path.is_dir() else "log_artifact", str(path), artifact_path)

    def log_model(self, path: str | os.PathLike, name: str) -> None:
        """A tokenizer or exported model directory: uploaded as models/<name> if tracking.log_models, else its
        location is recorded as the tag model_dir.<name> (model directories can be large)."""
        if not self.active:
            return
        if self.cfg.log_models:
            self.log_artifact(path, f"models/{name}")
        else:
            self.set_tags({f"model_dir.{name}": Path(path).resolve()})

    def log_figure(self, figure, name: str) -> None:
        """A matplotlib figure as the PNG artifact `name` (e.g. "plots/compute_vs_quality.png")."""
        if not self.active:
            return
        path = self._staging / name
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120, bbox_inches="tight")
        artifact_dir = str(Path(name).parent)
        self._submit("log_artifact", str(path), None if artifact_dir == "." else artifact_dir)

    def log_loss_curves(self, keys: list[str] | None = None, name: str = "plots/loss_curves.png") -> None:
        """Plot metrics logged so far (default: every metric with "loss" in its name) against the step."""
        if not self.active:
            return
        keys = keys or sorted(k for k in self.history if "loss" in k)
        if not keys:
            return
        from matplotlib.figure import Figure  # not pyplot: no global backend or figure state

        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        for key in keys:
            steps, values = zip(*self.history[key])
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 20 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.run_name or self.run_id)
        ax.grid(alpha=0.3)
        ax.legend()
        self.log_figure(fig, name)

    # -- metrics -----------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer one step's metrics; they are sent every `flush_every` steps in one background batch."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            value = float(value)
            self._buffer.append(Metric(key, value, now, int(step)))
            self.history.setdefault(key, []).append((int(step), value))
        self._steps_buffered += 1
        if self._steps_buffered >= self.cfg.flush_every:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send the buffered metrics (in the background; with wait=True, return once everything is stored)."""
        if not self.active or self._finished:
            return
        for i in range(0, len(self._buffer), 1000):
            self._submit("log_batch", metrics=self._buffer[i:i + 1000])
        self._buffer = []
        self._steps_buffered = 0
        if wait:
            self._queue.join()

    # -- end ---------------------------------------------------------------------------------------
    def child_env(self) -> dict[str, str]:
        """Environment for a stage process that should log as a child of this run, into the same store."""
        if not self.active:
            return {}
        return {PARENT_RUN_ENV: self.run_id, "MLFLOW_TRACKING_URI": self.uri}

    @property
    def url(self) -> str | None:
        """The run's page in the MLflow UI, when the run lives on a server."""
        if not self.active or not _is_server(self.uri):
            return None
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def finish(self, status: str = "FINISHED") -> None:
        if not self.active or self._finished:
            return
        self.flush()
        self._submit("set_terminated", status=status)
        self._finished = True
        self._queue.put(None)
        self._worker.join()
        atexit.unregister(self._at_exit)
        shutil.rmtree(self._staging, ignore_errors=True)
        if self.errors:
            log.error("MLflow run %s: %d call(s) were rejected, first: %s", self.run_id, len(self.errors),
                      self.errors[0])

    def _at_exit(self) -> None:
        # The process is exiting without finish() (an uncaught exception or sys.exit in a stage): keep what was
        # logged and mark the run as not finished normally. Not in a forked child: the run belongs to the parent.
        if os.getpid() == self._pid:
            self.finish("KILLED")

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")
