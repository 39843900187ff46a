"""Fixtures shared across test files.

`smoke_pipeline`: ONE real run of the shortened pipeline (configs/pipeline/smoke.yaml, ~5 min on 2 cores) logged to a
real `mlflow server`, shared by everything that checks what a pipeline leaves behind: its outputs and runs
(tests/test_pipeline.py, which also re-runs it) and what a reviewer sees in the UI (tests/test_mlflow_ui.py).

Under pytest-xdist (scripts/test.sh: `-n 2`) each test file runs whole on one worker, so its module fixtures are
built once; the files that use `smoke_pipeline` run on the same worker, so the pipeline runs once.
"""
import pytest
from mlflow_helpers import new_store
from pipeline_helpers import SmokePipeline, failure_text

from minimodel.compat.cpu import quiet
from minimodel.ui import MlflowServer

# The files that use `smoke_pipeline` (minutes): one unit of work under pytest-xdist, so it runs once.
SMOKE_PIPELINE_USERS = ("test_pipeline.py", "test_mlflow_ui.py", "test_faults.py")


def pytest_configure(config):
    """Without CUDA, the warnings that mean nothing there stay out of the summary, as at every stage's start."""
    quiet()


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it, unused
def pytest_xdist_make_scheduler(config, log):
    """A test file is one unit of work (its module fixtures built once); the smoke pipeline's users are one."""
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "smoke_pipeline" if file.rsplit("/", 1)[-1] in SMOKE_PIPELINE_USERS else file

    return ByFile(config, log)


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
