"""The smoke pipeline (configs/pipeline/smoke.yaml) as the tests run it: real processes, tracked on a real MLflow
server. tests/conftest.py runs it once per session (fixture `smoke_pipeline`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from minimodel.ui import MlflowServer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/pipeline/smoke.yaml"


class SmokePipeline:
    """The smoke pipeline under `root` (outputs in run/, data in data/), tracked on `server`."""

    def __init__(self, root: Path, server: MlflowServer):
        self.root, self.server = root, server
        self.output_dir = root / "run"
        self.fallback_store = root / "fallback-store"  # where runs would go if the server were down: stays empty
        self.first_parent_run_id: str | None = None

    def run(self, *overrides: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("MLFLOW_TRACKING_URI", None)
        return subprocess.run(
            [sys.executable, "-m", "minimodel.pipeline", "--config", str(SMOKE), f"output_dir={self.output_dir}",
             f"data_dir={self.root / 'data'}", f"tracking.uri={self.server.url}",
             f"tracking.store_dir={self.fallback_store}", *overrides],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(self.server.url)

    def parent_runs(self):
        """The pipeline's parent runs on the server, newest first."""
        client = self.client()
        experiment = client.get_experiment_by_name(yaml.safe_load(SMOKE.read_text())["tracking"]["experiment"])
        return client.search_runs([experiment.experiment_id], "tags.stage = 'pipeline'",
                                  order_by=["attributes.start_time DESC"])

    def children(self, parent_run_id: str):
        client = self.client()
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  max_results=1000)


def failure_text(result: subprocess.CompletedProcess) -> str:
    return f"exit status {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
