"""Fixtures shared across test files.

`smoke_pipeline`: ONE real run of the shortened pipeline (configs/pipeline/smoke.yaml, ~4 min on 2 cores) logged to a
real `mlflow server`, shared by everything that checks what a pipeline leaves behind: its outputs and runs
(tests/test_pipeline.py, which also re-runs it) and what a reviewer sees in the UI (tests/test_mlflow_ui.py).
"""
import pytest
from mlflow_helpers import new_store
from pipeline_helpers import SmokePipeline, failure_text

from minimodel.ui import MlflowServer


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke-pipeline")
    with MlflowServer(new_store(root / "server-store")) as server:
        pipeline = SmokePipeline(root, server)
        first = pipeline.run()
        assert first.returncode == 0, failure_text(first)
        [parent] = pipeline.parent_runs()
        pipeline.first_parent_run_id = parent.info.run_id
        yield pipeline
