"""minimodel.cli.run_stage, the shared part of every stage entry point: the user's mistakes end in one line and
exit code 2, bugs keep their traceback, the stage's result comes back."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from minimodel.cli import run_stage
from minimodel.config import ConfigError
from minimodel.manifest import ManifestError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ToyConfig:
    output_dir: str = "out"
    steps: int = 3


class ToyStageError(ValueError):
    pass


def run(monkeypatch, argv: list[str], stage, *errors):
    monkeypatch.setattr(sys, "argv", ["evaluate/toy.py", *argv])
    return run_stage(ToyConfig, stage, "toy stage", *errors)


def test_returns_the_stage_result(monkeypatch):
    assert run(monkeypatch, ["steps=5"], lambda cfg: cfg.steps * 2) == 10


@pytest.mark.parametrize("error, line", [
    (ConfigError("steps: must be > 0"), "evaluate/toy: config error: steps: must be > 0"),
    (ManifestError("mini-model is not aligned with primary"), "evaluate/toy: mini-model is not aligned with primary"),
    (ToyStageError("no test split in data/xx"), "evaluate/toy: no test split in data/xx"),
])
def test_user_errors_end_in_one_line_and_exit_code_2(monkeypatch, capsys, error, line):
    def stage(cfg):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run(monkeypatch, [], stage, ToyStageError)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == line + "\n"


def test_bugs_keep_their_traceback(monkeypatch):
    def stage(cfg):
        raise ToyStageError("not declared by this entry point: a bug")

    with pytest.raises(ToyStageError):
        run(monkeypatch, [], stage)


def test_an_entry_point_reports_a_stage_error_without_traceback(tmp_path):
    """evaluate/report.py as a user runs it, pointed at a pipeline run that is not in the store."""
    proc = subprocess.run([sys.executable, "evaluate/report.py", "parent_run_id=no-such-run", f"output_dir={tmp_path / 'r'}",
                           f"tracking.store_dir={tmp_path / 'store'}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items()
                                            if k not in ("MLFLOW_TRACKING_URI", "MINIMODEL_PARENT_RUN_ID")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "evaluate/report: run no-such-run is not in the MLflow store" in proc.stderr and "Traceback" not in proc.stderr
