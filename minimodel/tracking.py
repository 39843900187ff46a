"""The one place where stages talk to MLflow.

- Tracking URI: `tracking.uri` in the config, else $MLFLOW_TRACKING_URI, else a local SQLite store
  `<tracking.store_dir>/mlflow.db` (never the legacy ./mlruns file store).
- Only global rank 0 touches MLflow; on every other rank a Tracker is inert.
- Params are the resolved config (flattened) plus the config as a YAML artifact.
- Metrics are buffered and sent with one `log_batch` per `flush_every` steps, asynchronously, so logging never
  blocks training for long.
- A pipeline is one parent run: a stage started with `tracking.parent_run_id` (or $MINIMODEL_PARENT_RUN_ID) is
  nested under it.
- If the configured server is unreachable the run warns and continues against the local SQLite store.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimodel.config import flatten, to_dict

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MINIMODEL_PARENT_RUN_ID"


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<store_dir>/mlflow.db
    store_dir: str = "runs"  # local SQLite store + artifacts when no server is given
    experiment: str = "minimodel"
    run_name: str | None = None
    parent_run_id: str | None = None  # None: $MINIMODEL_PARENT_RUN_ID if set
    flush_every: int = 10  # steps of metrics per log_batch call


def local_store_uri(store_dir: str | os.PathLike) -> str:
    path = Path(store_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def resolve_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store_uri(cfg.store_dir)


def global_rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _server_reachable(uri: str) -> bool:
    if not uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
            return True
    except OSError:
        return False


class Tracker:
    """An MLflow run for one stage (inert on ranks other than 0 and when tracking is disabled)."""

    def __init__(self, cfg: TrackingConfig, config: Any = None, tags: dict[str, Any] | None = None,
                 rank: int | None = None):
        self.cfg = cfg
        self.active = cfg.enabled and (global_rank() if rank is None else rank) == 0
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.uri: str | None = None
        self._buffer: list = []
        self._steps_buffered = 0
        self._pending: list = []
        if not self.active:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient

        uri = resolve_uri(cfg)
        if not _server_reachable(uri):
            fallback = local_store_uri(cfg.store_dir)
            log.warning("MLflow server %s is unreachable: logging to the local store %s instead", uri, fallback)
            uri = fallback
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(cfg.experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
        all_tags = {"git_commit": git_commit(), "host": socket.gethostname()}
        if os.environ.get("SLURM_JOB_ID"):
            all_tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        all_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
        parent = cfg.parent_run_id or os.environ.get(PARENT_RUN_ENV)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=cfg.run_name, tags=all_tags)
        self.run_id = run.info.run_id
        if config is not None:
            self.log_config(config)

    # -- params, tags, artifacts -------------------------------------------------------------------
    def log_config(self, config: Any) -> None:
        if not self.active:
            return
        import yaml
        from mlflow.entities import Param

        flat = flatten(to_dict(config))
        params = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
            self.client.log_artifact(self.run_id, str(path))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, figure, name: str) -> None:
        if self.active:
            self.client.log_figure(self.run_id, figure, name)

    # -- metrics -----------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffer one step's metrics; they are sent every `flush_every` steps in one asynchronous batch."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self._steps_buffered += 1
        if self._steps_buffered >= self.cfg.flush_every:
            self.flush()

    def flush(self) -> None:
        if not self.active or not self._buffer:
            return
        for i in range(0, len(self._buffer), 1000):
            op = self.client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000], synchronous=False)
            if op is not None:
                self._pending.append(op)
        self._buffer = []
        self._steps_buffered = 0

    def finish(self, status: str = "FINISHED") -> None:
        if not self.active or self.run_id is None:
            return
        self.flush()
        for op in self._pending:
            op.wait()
        self._pending = []
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "FAILED")
