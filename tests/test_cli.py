"""minimodel.cli.run_stage, the shared part of every stage entry point: the stage's status becomes the exit code
(finished 0, interrupted 75, failed 1) and its outputs are printed; the user's mistakes end in one line and exit
code 2, bugs keep their traceback. Every entry point is the table's stage run through it."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from minimodel.cli import run_stage
from minimodel.config import ConfigError
from minimodel.errors import UserError
from minimodel.manifest import ManifestError
from minimodel.stages import KINDS, StageResult
from minimodel.training.preemption import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ToyConfig:
    output_dir: str = "out"
    steps: int = 3


class ToyStageError(UserError):
    pass


def run(monkeypatch, argv: list[str], stage):
    monkeypatch.setattr(sys, "argv", ["evaluate/toy.py", *argv])
    return run_stage(ToyConfig, stage, "toy stage")


@pytest.mark.parametrize("status, code", [("finished", 0), ("interrupted", PREEMPTED_EXIT_CODE), ("failed", 1)])
def test_status_becomes_the_exit_code_and_outputs_are_printed(monkeypatch, capsys, status, code):
    def stage(cfg):
        return StageResult(status, {"model": Path(cfg.output_dir) / "model", "metrics": {"acc": cfg.steps / 8}})

    assert run(monkeypatch, ["steps=5", "output_dir=out"], stage) == code
    captured = capsys.readouterr()
    assert captured.out == "model: out/model\nmetrics: acc=0.6250\n"
    if status == "interrupted":
        assert captured.err == "evaluate/toy: interrupted: run the same command again to resume\n"


@pytest.mark.parametrize("error, line", [
    (ConfigError("steps: must be > 0"), "evaluate/toy: config error: steps: must be > 0"),
    (ManifestError("mini-model is not aligned with primary"), "evaluate/toy: mini-model is not aligned with primary"),
    (ToyStageError("no test split in data/xx"), "evaluate/toy: no test split in data/xx"),
])
def test_user_errors_end_in_one_line_and_exit_code_2(monkeypatch, capsys, error, line):
    def stage(cfg):
        raise error

    assert run(monkeypatch, [], stage) == 2
    assert capsys.readouterr().err == line + "\n"


def test_a_stage_draws_the_same_unseeded_numbers_in_every_process(monkeypatch):
    # torch seeds its global generator at random in each process: two fresh interpreters draw differently ...
    draw = [sys.executable, "-c", "import torch; print(torch.rand(3).tolist())"]
    fresh = [subprocess.run(draw, capture_output=True, text=True, check=True).stdout for _ in range(2)]
    assert fresh[0] != fresh[1]
    # ... while a stage run through run_stage starts from the same state every time (here: twice in one process,
    # after other draws in between)
    drawn = []

    def stage(cfg):
        drawn.append(torch.rand(3))
        return StageResult("finished", {})

    for _ in range(2):
        torch.rand(5)
        assert run(monkeypatch, [], stage) == 0
    assert torch.equal(drawn[0], drawn[1])


def test_bugs_keep_their_traceback(monkeypatch):
    def stage(cfg):
        raise ValueError("not a UserError: a bug")

    with pytest.raises(ValueError, match="a bug"):
        run(monkeypatch, [], stage)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_entry_point_is_its_kind_run_through_run_stage(kind):
    script = REPO / KINDS[kind].script
    assert f'main("{kind}", __doc__)' in script.read_text()
    assert len([line for line in script.read_text().split('"""')[-1].splitlines() if line.strip()]) <= 3


def test_an_entry_point_reports_a_stage_error_without_traceback(tmp_path):
    """evaluate/report.py as a user runs it, pointed at a pipeline directory that holds no results."""
    proc = subprocess.run([sys.executable, "evaluate/report.py", f"pipeline_dir={tmp_path / 'nothing'}",
                           f"output_dir={tmp_path / 'r'}", "tracking.enabled=false"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"evaluate/report: {tmp_path / 'nothing' / 'zero_shot'} holds no zero-shot results" in proc.stderr
    assert "Traceback" not in proc.stderr


# A stage whose rank inherited the stop signals ignored (a launcher under slurm/on_node.sh), stopped while it
# prepares data: no training loop is listening yet.
PREPARING = """
import sys, time
from pathlib import Path
from minimodel.cli import run_stage
from minimodel.stages import StageResult
sys.path.insert(0, "tests")
from test_cli import ToyConfig

def stage(cfg):
    Path(cfg.output_dir).write_text("preparing")
    time.sleep(60)
    return StageResult("finished")

sys.argv = ["adapt/toy.py", "output_dir=" + sys.argv[1]]
raise SystemExit(run_stage(ToyConfig, stage, "toy"))
"""


@pytest.mark.parametrize("signum", ["SIGUSR1", "SIGTERM"])
def test_a_stop_signal_outside_training_interrupts_a_rank_that_inherited_it_ignored(tmp_path, signum):
    """The old stage left the inherited SIG_IGN outside its training loops: Slurm's time-limit warning during data
    preparation was lost, and the job ran to its time limit (TIMEOUT, never requeued)."""
    import signal
    import time

    started = tmp_path / "started"

    def ignore_stop_signals():  # as slurm/on_node.sh's launchers pass them on
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    proc = subprocess.Popen([sys.executable, "-c", PREPARING, str(started)], cwd=REPO, stderr=subprocess.PIPE,
                            text=True, preexec_fn=ignore_stop_signals)
    deadline = time.monotonic() + 120
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    proc.send_signal(getattr(signal, signum))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert f"adapt/toy: interrupted ({signum}, outside training): run the same command again to resume" in err


# The stage has returned: its outputs are printed, and a late stop signal (Slurm's, as the job ends) comes meanwhile.
LATE = """
import os, signal, sys
from minimodel.cli import run_stage
from minimodel.stages import StageResult
sys.path.insert(0, "tests")
from test_cli import ToyConfig

class Late:
    def __str__(self):
        os.kill(os.getpid(), signal.SIGUSR1)
        return "printed"

sys.argv = ["adapt/toy.py", "output_dir=x"]
raise SystemExit(run_stage(ToyConfig, lambda cfg: StageResult("finished", {"result": Late()}), "toy"))
"""


def test_a_stop_signal_after_the_stage_returned_leaves_its_outcome():
    """The handler stayed installed after the stage: a signal while its outputs were printed (or in the final
    barrier) raised Interrupted there, a traceback and exit 1 for a finished stage."""
    import signal

    def ignore_stop_signals():
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    done = subprocess.run([sys.executable, "-c", LATE], cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=ignore_stop_signals)
    assert done.returncode == 0 and "result: printed" in done.stdout and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("script, args, problem", [
    ("adapt/train.py", ["primary_model={typo}", "over=full"], "primary_model: {typo} is not a Hugging Face model"),
    ("adapt/train.py", ["primary_model={model}", "mini_model={typo}"], "mini_model: {typo} is not a Hugging Face"),
    ("adapt/train.py", ["primary_model={model}", "over=full", "data_dir={typo}"],
     "data_dir: {typo} holds no data"),  # this language's failure (exit 1): the others would run
    ("adapt/sft.py", ["primary_model={typo}"], "primary_model: {typo} is not a Hugging Face model"),
    ("evaluate/finetune.py", ["--config", "configs/evaluate/finetune/verse_class_tiny.yaml", "model_dir={typo}"],
     "model_dir: {typo} is not a Hugging Face model"),
    ("evaluate/finetune.py", ["--config", "configs/evaluate/finetune/verse_class_tiny.yaml", "model_dir={model}",
                              "task.data_dir={typo}"], "{typo}/en/verses.jsonl does not exist"),
])
def test_a_mistyped_input_claims_nothing_so_the_corrected_command_runs(tmp_path, script, args, problem):
    """A stage checks what it reads before it claims its output directory: the run of a mistyped path held it, and
    the corrected command was refused as another config's partial run (pass overwrite=true)."""
    model, typo, out = tmp_path / "model", tmp_path / "tpyo", tmp_path / "out"
    model.mkdir()
    (model / "config.json").write_text("{}")  # a model directory as far as the check before the claim looks
    args = [a.format(model=model, typo=typo) for a in args]
    proc = subprocess.run([sys.executable, script, *args, f"output_dir={out}", "target_langs=[sw]",
                           "tracking.enabled=false"] if script.startswith("adapt") else
                          [sys.executable, script, *args, f"output_dir={out}", "tracking.enabled=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    per_language = problem.startswith("data_dir")
    assert proc.returncode == (1 if per_language else 2), proc.stderr[-3000:]
    assert problem.format(typo=typo) in proc.stderr, proc.stderr[-3000:]
    assert not (out / "sw").exists() if per_language else not out.exists()
