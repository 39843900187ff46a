"""The one place where stages talk to MLflow: a view of the runs for people. Every stage writes its results to its
output directory; nothing reads them back from here for control or results.

Usage in a stage (every rank may run this; only global rank 0 touches MLflow):

    with Tracker(cfg.tracking, cfg, tags={"stage": "adapt", "method": "minijoint", "target_lang": "sw",
                                         **layout_tags(tp=2, pp=1)}) as tracker:
        for step in ...:
            tracker.log_metrics({"train/loss": loss, "train/lr": lr, "train/grad_norm": gn,
                                 "throughput/tokens_per_s": tps, "compute/flops": flops_so_far}, step)
        tracker.log_metrics({"eval/loss": eval_loss}, step)
        tracker.log_artifact(output_dir / "loss_curves.png")   # uploaded in the background

- Tracking URI: `tracking.uri`, else $MLFLOW_TRACKING_URI, else the local SQLite store
  `<tracking.store_dir>/mlflow.db` with artifacts in `<store_dir>/artifacts` (never the legacy ./mlruns file store,
  never a path that depends on the current directory after start-up). `python -m minimodel.ui` serves that store.
- The run records: the resolved config as params (flattened) and as config.yaml; tags for stage/method/languages
  (given by the stage) plus git commit, host, world size and the Slurm job (id, array job/task, restart count of a
  requeued job; added here).
- A stage that resumes from its checkpoints continues its MLflow run too: `Tracker.resumable(cfg, output_dir, ...)`
  keeps the run id in <output_dir>/mlflow_run.json.
- Three parts: `RunStore` (the store a run goes to; `link_run` and `attach_to_run` use it on existing runs),
  `BackgroundWriter` (every MLflow call of a run in order on one thread, so logging never blocks
  training for long) and `Tracker` (one stage's run: tags, params, metrics buffered and sent as one batch per
  `flush_every` steps; `finish()` waits for the writer).
- When the server is down at start-up, the run goes to the local store with a warning; when it goes away mid-run,
  the writer warns once and drops the rest of the run's calls (the stage's results are on disk).
- A pipeline is one parent run: a stage started with `tracking.parent_run_id` (or $MINIMODEL_PARENT_RUN_ID, see
  `Tracker.child_env`) is nested under it. A re-run of the pipeline is a new parent run: a stage it skips is shown
  there by `link_run`; a stage it resumes (`Tracker.resumable`) moves its continued run under the new parent.
  `tracking.enabled=false` on the pipeline turns tracking off in its stages too ($MINIMODEL_TRACKING=off).
"""
from __future__ import annotations

import atexit
import dataclasses
import getpass
import json
import logging
import os
import queue
import re
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

from minimodel import distributed
from minimodel.config import flatten, require, to_dict
from minimodel.files import write_text_atomic
from minimodel.training.preemption import Interrupted

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MINIMODEL_PARENT_RUN_ID"
TRACKING_ENV = "MINIMODEL_TRACKING"  # "off": set by a pipeline with tracking disabled, for its stages
REUSED_RUN_TAG = "reused_run_id"
RUN_FILE = "mlflow_run.json"  # in a stage's output_dir: the run a resumed stage continues (Tracker.resumable)
SLURM_TAGS = {"SLURM_JOB_ID": "slurm_job_id", "SLURM_ARRAY_JOB_ID": "slurm_array_job_id",
              "SLURM_ARRAY_TASK_ID": "slurm_array_task_id", "SLURM_RESTART_COUNT": "slurm_restart_count"}


URI_SCHEMES = ("http://", "https://", "sqlite:///", "postgresql", "mysql", "mssql", "databricks", "file:")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<store_dir>/mlflow.db
    store_dir: str = "runs"  # local SQLite store + artifacts; also the fallback when the server is down
    experiment: str = "minimodel"
    run_name: str | None = None  # None: "<stage>-<language>" from the tags
    parent_run_id: str | None = None  # None: $MINIMODEL_PARENT_RUN_ID if set
    flush_every: int = 10  # steps of metrics per log_batch call

    def validate(self) -> None:
        require(self.flush_every >= 1, "tracking.flush_every", f"must be >= 1, got {self.flush_every}")
        require(bool(self.experiment), "tracking.experiment", "must be a non-empty experiment name")
        require(self.uri is None or self.uri.startswith(URI_SCHEMES), "tracking.uri",
                f"{self.uri!r} is no MLflow store: a server (http://host:5000) or a database "
                "(sqlite:///path/mlflow.db, postgresql://...); leave it unset for the local store under store_dir")

    @property
    def on(self) -> bool:
        """Enabled here, and not turned off by the pipeline this stage runs in."""
        return self.enabled and os.environ.get(TRACKING_ENV) != "off"


def metric_name(key: str) -> str:
    """`key` as MLflow accepts it (alphanumerics, _ - . space : /): a method spec such as minijoint+ofa becomes
    minijoint_ofa in metric names; the results on disk keep the spec."""
    return re.sub(r"[^\w\-. :/]", "_", key)


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
    except urllib.error.HTTPError as e:
        # it answered: up (401 behind an auth proxy: the MLflow calls say what is wrong), unless a proxy says that
        # nothing answers behind it (502, 503), which MLflow would retry for minutes before the stage fails
        return e.code < 500
    except OSError:
        return False


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store live next to its database (MLflow's default would be ./mlruns of the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None  # a server (or another database) decides for itself


@dataclass
class RunStore:
    """The MLflow store a run goes to: the configured one, or the local store when the server is down."""
    client: Any  # mlflow.MlflowClient
    uri: str
    experiment_id: str
    fell_back_from: str | None = None  # the unreachable server, when this is the local fallback
    parent_run_id: str | None = None  # the parent run asked for, when this store holds it (runs nest under it)

    @classmethod
    def connect(cls, cfg: TrackingConfig, parent_run_id: str | None = None) -> "RunStore":
        """The experiment is the parent run's when there is one (the UI nests child runs only within their parent's
        experiment, whatever experiment the stage's own config names), else `cfg.experiment`, created if needed."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # a server that goes away: a few seconds of retries, not MLflow's minutes (7 with exponential backoff) at
        # every call, which held each stage's exit that long; the writer retries a call once itself
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
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
                return cls(client, uri, client.get_run(parent_run_id).info.experiment_id, fell_back_from,
                           parent_run_id)
            except MlflowException:
                log.warning("parent run %s is not in the MLflow store %s: the run will not be nested under it",
                            parent_run_id, uri)
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            try:
                return cls(client, uri, client.create_experiment(cfg.experiment, _artifact_location(uri)),
                           fell_back_from)
            except MlflowException:  # another process created it in the meantime
                exp = client.get_experiment_by_name(cfg.experiment)
                if exp is None:
                    raise
        return cls(client, uri, exp.experiment_id, fell_back_from)

    def find_run(self, run_id: str):
        """The run `run_id`, or None (with a warning) when this store does not hold it or it was deleted (MLflow
        keeps a deleted run, but refuses to log to it)."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            log.warning("run %s is not in the MLflow store %s", run_id, self.uri)
            return None
        if run.info.lifecycle_stage != "active":
            log.warning("run %s was deleted from the MLflow store %s", run_id, self.uri)
            return None
        return run


def _parent(cfg: TrackingConfig, parent_run_id: str | None = None) -> str | None:
    return parent_run_id or cfg.parent_run_id or os.environ.get(PARENT_RUN_ENV)


def link_run(cfg: TrackingConfig, earlier_run_id: str, parent_run_id: str | None = None) -> str | None:
    """Show a finished run in pipeline `parent_run_id` without running or copying it again.

    If the earlier run already is a child of that parent it is returned as is; otherwise a small finished child run
    is created that carries the earlier run's tags, a `reused_run_id` tag and a description linking to it. None
    (with a warning) when this store no longer holds it (another store now, the run deleted): nothing to link.
    """
    parent = _parent(cfg, parent_run_id)
    store = RunStore.connect(cfg, parent)
    earlier = store.find_run(earlier_run_id)
    if earlier is None:
        return None
    if parent is None or earlier.data.tags.get("mlflow.parentRunId") == parent:
        return earlier_run_id
    tags = {k: v for k, v in earlier.data.tags.items() if not k.startswith("mlflow.")}
    link = f"#/experiments/{earlier.info.experiment_id}/runs/{earlier_run_id}"
    tags.update({
        REUSED_RUN_TAG: earlier_run_id,
        "mlflow.parentRunId": parent,
        "mlflow.note.content": f"Reused the finished run [{earlier.info.run_name}]({link}); not run again.",
    })
    run = store.client.create_run(store.experiment_id, run_name=f"{earlier.info.run_name} (reused)", tags=tags)
    store.client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def runs_of_slurm_job(cfg: TrackingConfig, job_id: str, parent_run_id: str | None = None) -> list[str]:
    """The runs Slurm job `job_id` logged under pipeline `parent_run_id` (tagged by Tracker), for its stamp: a plan
    made again links them as the local pipeline links a skipped stage's. [] when there is nothing to ask, or the
    store cannot answer (the stage's result is on disk; only the view loses the link)."""
    parent = _parent(cfg, parent_run_id)
    if not (cfg.on and parent):
        return []
    if not _server_reachable(resolve_uri(cfg)):  # not the local fallback store: it never holds the pipeline's runs
        log.warning("MLflow server %s is unreachable: Slurm job %s's runs are not linked", resolve_uri(cfg), job_id)
        return []
    try:
        store = RunStore.connect(cfg, parent)
        # finished runs only: a requeued job keeps its id, and its killed attempts' runs did not make the result
        query = (f"tags.`mlflow.parentRunId` = '{parent}' and tags.{SLURM_TAGS['SLURM_JOB_ID']} = '{job_id}' "
                 "and attributes.status = 'FINISHED'")
        return [r.info.run_id for r in store.client.search_runs([store.experiment_id], query)]
    except Exception as e:  # noqa: BLE001 - any store failure: stamp without links
        log.warning("could not list the MLflow runs of Slurm job %s: %s", job_id, e)
        return []


def attach_to_run(cfg: TrackingConfig, run_id: str | None, paths: list[Path], artifact_path: str,
                  metrics: dict[str, float]) -> None:
    """Attach files and step-0 metrics to an existing run (default: the pipeline's parent run) without touching its
    status; nothing when tracking is off, on other ranks, or with no run to attach to."""
    run_id = _parent(cfg, run_id)
    if not (cfg.on and distributed.rank() == 0 and run_id):
        return
    from mlflow.entities import Metric

    try:
        store = RunStore.connect(cfg, run_id)
        if store.find_run(run_id) is None:
            return
        for path in paths:
            store.client.log_artifact(run_id, str(path), artifact_path)
        now = int(time.time() * 1000)
        batch = [Metric(metric_name(k), float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            store.client.log_batch(run_id, metrics=batch[i:i + 1000])
    except Exception as e:  # noqa: BLE001 - any store failure: the files are on disk, only the view lacks them
        log.warning("could not attach %s to MLflow run %s: %s", ", ".join(p.name for p in paths), run_id, e)


# -- what the run is -------------------------------------------------------------------------------
def layout_tags(tp: int = 1, pp: int = 1) -> dict[str, int | str]:
    """Tags for the parallel layout of a run: tp, pp, dp (= world size / (tp * pp)) and layout "tp2-pp1-dp2"."""
    dp = max(distributed.world_size() // (tp * pp), 1)
    return {"tp": tp, "pp": pp, "dp": dp, "layout": f"tp{tp}-pp{pp}-dp{dp}"}


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# -- the background writer ------------------------------------------------------------------------
class BackgroundWriter:
    """Every MLflow call of one run, executed in order on one thread: logging returns at once, whatever the store
    does. A call the store rejects is retried once (a restarting server, a SQLite store locked by another stage),
    then reported in `errors`; when a server goes away mid-run, the writer warns once and drops the rest of the
    run's calls: the stage's results are on disk, only this MLflow view of it stops there."""

    def __init__(self, store: RunStore, run_id: str):
        self.store, self.run_id = store, run_id
        self.errors: list[str] = []  # calls the store rejected
        self._lost = False
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, method: str, *args, **kwargs) -> None:
        """client.<method>(run_id, *args, **kwargs), in the background."""
        self._queue.put((method, args, kwargs))

    def join(self) -> None:
        """Return once every call submitted so far has been made."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            try:
                if call is None:
                    return
                if not self._lost:
                    self._call(*call)
            finally:
                self._queue.task_done()

    def _call(self, method: str, args: tuple, kwargs: dict) -> None:
        for attempt in range(2):
            try:
                getattr(self.store.client, method)(self.run_id, *args, **kwargs)
                return
            except Exception as e:  # noqa: BLE001 - decide whether the store is gone or said no
                if _is_server(self.store.uri) and not _server_reachable(self.store.uri):
                    self._lost = True
                    log.warning("MLflow server %s went away during run %s: the rest of this run is not logged "
                                "there (the stage's results are in its output directory)", self.store.uri,
                                self.run_id)
                    return
                if attempt:
                    self.errors.append(f"{method}: {e}")
                    log.error("MLflow rejected %s on run %s: %s", method, self.run_id, e)
                else:
                    time.sleep(1)


# -- the run ---------------------------------------------------------------------------------------
def exit_status(exc_type: type | None) -> str:
    """The MLflow status of a run its stage leaves with `exc_type` (None: returned): a stop signal outside training
    (Interrupted) is KILLED, as an interrupted training's, and the next launch continues the run."""
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, Interrupted) else "FAILED"


class Tracker:
    """An MLflow run for one stage (inert on ranks other than 0 and when tracking is off)."""

    def __init__(self, cfg: TrackingConfig, config: Any = None, tags: dict[str, Any] | None = None,
                 rank: int | None = None, run_id: str | None = None):
        """Start a run, or with `run_id` continue that run of the same store (see `resumable`)."""
        self.cfg = cfg
        self.active = cfg.on and (distributed.rank() if rank is None else rank) == 0
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri: str | None = None
        self._buffer: list = []
        self._steps_buffered = 0
        self._finished = False
        self._pid = os.getpid()
        self._earlier_params: dict[str, str] = {}  # of a continued run: MLflow params cannot change
        if not self.active:
            return
        parent = _parent(cfg)
        store = RunStore.connect(dataclasses.replace(cfg, store_dir=str(Path(cfg.store_dir).resolve())), parent)
        self.client, self.uri, self.experiment_id = store.client, store.uri, store.experiment_id
        earlier = store.find_run(run_id) if run_id else None
        if earlier is not None:
            from mlflow.entities import RunTag

            self.run_id, self.run_name = run_id, earlier.info.run_name
            resumed_tags = self._resumed_tags(earlier, store.parent_run_id)
            resumed_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
            self.experiment_id = earlier.info.experiment_id
            self._earlier_params = dict(earlier.data.params)
            self.client.update_run(run_id, status="RUNNING")
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in resumed_tags.items()])
        else:
            run_tags = self._default_tags()
            run_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
            if store.parent_run_id:  # not one this store lacks: the run would point at nothing
                run_tags["mlflow.parentRunId"] = store.parent_run_id
            if store.fell_back_from:
                run_tags["tracking_fallback_from"] = store.fell_back_from
            self.run_name = cfg.run_name or self._default_run_name(run_tags)
            self.run_id = self.client.create_run(self.experiment_id, run_name=self.run_name,
                                                 tags=run_tags).info.run_id
        log.info("MLflow run %s (%s) in %s", self.run_name, self.run_id, self.uri)
        self._writer = BackgroundWriter(store, self.run_id)
        self._staging = Path(tempfile.mkdtemp(prefix="minimodel-tracking-"))  # files we create, until finish()
        atexit.register(self._at_exit)
        if config is not None:
            self._log_config(config)

    @classmethod
    def resumable(cls, cfg: TrackingConfig, output_dir: str | os.PathLike, config: Any = None,
                  tags: dict[str, Any] | None = None, resume: bool = True) -> "Tracker":
        """The run of a stage that resumes from its own checkpoints in `output_dir` (a requeued Slurm job, the
        same command run again): with `resume` (the stage loaded a checkpoint), the run named in
        <output_dir>/mlflow_run.json is continued: marked RUNNING again, its new metrics, tags and artifacts added
        (if the store does not hold it, a new run is started instead); otherwise, or if there is none, a new run
        is started. The run's id is then written there for the next resume."""
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

    @staticmethod
    def _default_tags() -> dict[str, str]:
        commit = git_commit()
        tags = {
            "git_commit": commit, "mlflow.source.git.commit": commit,
            "host": socket.gethostname(), "world_size": str(distributed.world_size()),
            "mlflow.user": getpass.getuser(), "mlflow.source.name": Path(sys.argv[0]).name or "python",
            "mlflow.source.type": "LOCAL",
        }
        tags.update({tag: os.environ[var] for var, tag in SLURM_TAGS.items() if os.environ.get(var)})
        return tags

    @staticmethod
    def _default_run_name(tags: dict[str, str]) -> str | None:
        lang = tags.get("target_lang") or tags.get("source_lang")
        return "-".join(p for p in (tags.get("stage"), lang) if p) or None

    @property
    def errors(self) -> list[str]:
        """MLflow calls the store rejected (a reachable store said no)."""
        return self._writer.errors if self.active else []

    # -- params, tags, artifacts -------------------------------------------------------------------
    def _log_config(self, config: Any) -> None:
        """The resolved config as params (flattened keys like model.hidden_size) and as config.yaml."""
        from mlflow.entities import Param

        settings = to_dict(config) if dataclasses.is_dataclass(config) else dict(config)
        values = {k: str(v)[:6000] for k, v in flatten(settings).items()}
        changed = {k: v for k, v in values.items() if self._earlier_params.get(k, v) != v}
        if changed:  # a continued run whose config was changed (e.g. more steps): params are immutable
            log.warning("run %s continues with changed settings %s: recorded as tags resumed_with.<key>",
                        self.run_id, changed)
            self.set_tags({f"resumed_with.{k}": v for k, v in changed.items()})
        params = [Param(k, v) for k, v in values.items() if k not in self._earlier_params]
        for i in range(0, len(params), 100):
            self._writer.submit("log_batch", params=params[i:i + 100])
        path = self._staging / "config.yaml"
        path.write_text(yaml.safe_dump(settings, sort_keys=False))
        self._writer.submit("log_artifact", str(path))

    def interrupted(self, step: int | None = None) -> None:
        """End the run as KILLED, stopped by a signal (at `step`, where the stage knows it) after checkpointing: the
        stage's next launch resumes it, and continues this run (Tracker.resumable)."""
        if step is not None:
            self.set_tags({"interrupted_at_step": step})
        self.finish("KILLED")

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        run_tags = [RunTag(k, str(v)[:8000]) for k, v in tags.items()]
        for i in range(0, len(run_tags), 100):
            self._writer.submit("log_batch", tags=run_tags[i:i + 100])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or directory (in the background: it must stay in place until finish())."""
        if not self.active:
            return
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(f"cannot log artifact {path}: it does not exist")
        self._writer.submit("log_artifacts" if path.is_dir() else "log_artifact", str(path), artifact_path)

    # -- metrics -----------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer one step's metrics; they are sent every `flush_every` steps in one background batch."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(metric_name(key), float(value), now, int(step)) for key, value in metrics.items()]
        self._steps_buffered += 1
        if self._steps_buffered >= self.cfg.flush_every:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send the buffered metrics (in the background; with wait=True, return once everything is stored)."""
        if not self.active or self._finished:
            return
        for i in range(0, len(self._buffer), 1000):
            self._writer.submit("log_batch", metrics=self._buffer[i:i + 1000])
        self._buffer = []
        self._steps_buffered = 0
        if wait:
            self._writer.join()

    # -- end ---------------------------------------------------------------------------------------
    def child_env(self) -> dict[str, str]:
        """Environment for a stage process that should log as a child of this run, into the same store (with
        tracking off here: not at all)."""
        if not self.cfg.on:
            return {TRACKING_ENV: "off"}
        if not self.active:
            return {}
        return {PARENT_RUN_ENV: self.run_id, "MLFLOW_TRACKING_URI": self.uri}

    def finish(self, status: str = "FINISHED") -> None:
        if not self.active or self._finished:
            return
        self.flush()
        self._writer.submit("set_terminated", status=status)
        self._finished = True
        self._writer.close()
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
        self.finish(exit_status(exc_type))
