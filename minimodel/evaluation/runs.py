"""Reading a pipeline's runs back from MLflow (for the report): the child runs of a parent run, their tags, final
metrics and metric histories, and attaching files to the parent run.

A child run that stands for an earlier finished run (minimodel.tracking.link_run, tag `reused_run_id`) is read
through to that run for its metrics.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from minimodel.evaluation import EvaluationError
from minimodel.tracking import PARENT_RUN_ENV, REUSED_RUN_TAG, TrackingConfig, resolve_uri

# What the shared DeepSpeed loop logs per step (minimodel/training/deepspeed_loop.py): cumulative over launches.
FLOPS_METRIC = "compute/flops"
WALL_CLOCK_METRIC = "compute/wall_clock_s"


@dataclass
class RunInfo:
    run_id: str  # the run holding the data (the earlier run for a reused one)
    name: str
    tags: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)  # latest value of each metric

    @property
    def stage(self) -> str | None:
        return self.tags.get("stage")


class PipelineRuns:
    """The runs of one pipeline (children of a parent run) in an MLflow store."""

    def __init__(self, tracking: TrackingConfig, parent_run_id: str | None = None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.parent_run_id = parent_run_id or tracking.parent_run_id or os.environ.get(PARENT_RUN_ENV)
        if not self.parent_run_id:
            raise EvaluationError("no parent run: set parent_run_id (or tracking.parent_run_id / "
                                  "$MINIMODEL_PARENT_RUN_ID) to the pipeline's run id")
        self.uri = resolve_uri(tracking)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            self.parent = self.client.get_run(self.parent_run_id)
        except MlflowException as e:
            raise EvaluationError(f"run {self.parent_run_id} is not in the MLflow store {self.uri}: {e.message} "
                                  "(check parent_run_id and tracking.uri / tracking.store_dir)") from None

    def children(self) -> list[RunInfo]:
        runs = self.client.search_runs(
            [self.parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            order_by=["attributes.start_time ASC"], max_results=50000)
        out = []
        for run in runs:
            source = run
            if REUSED_RUN_TAG in run.data.tags:
                source = self.client.get_run(run.data.tags[REUSED_RUN_TAG])
            out.append(RunInfo(source.info.run_id, run.info.run_name, dict(run.data.tags), dict(source.data.metrics)))
        return out

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of metric `key`, sorted by step (the latest value where a step was logged twice)."""
        by_step = {}
        for m in sorted(self.client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            by_step[m.step] = m.value
        return sorted(by_step.items())

    def log_to_parent(self, paths: list[Path], artifact_path: str, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        for path in paths:
            self.client.log_artifact(self.parent_run_id, str(path), artifact_path)
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.parent_run_id, metrics=batch[i:i + 1000])
