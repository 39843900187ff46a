"""A signal to the pipeline stops its running stage's whole process group (launcher and ranks) and waits for it; the
pipeline exits 75 (interrupted). Killed outright (SIGKILL), it still leaves no stage process behind.

The pipeline is a real process (a driver running minimodel.pipeline.run with one stage); its stage is a fake trainer
through the real entry point wrapper, with one "rank" child in its process group, as a launcher has."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minimodel.training.preemption import PREEMPTED_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]

TRAINER = '''
import subprocess, sys, time
from dataclasses import dataclass
from pathlib import Path

from minimodel.cli import run_stage
from minimodel.stages import StageResult
from minimodel.training.preemption import PreemptionSignal


@dataclass
class Cfg:
    output_dir: str = "out"


def train(cfg):
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (out / "rank.pid").write_text(str(rank.pid))
    with PreemptionSignal() as stop:
        print("training", flush=True)
        while not stop.received:  # the steps of a trainer, which checks the flag at each boundary
            time.sleep(0.05)
    rank.terminate()  # as a launcher ends its ranks
    rank.wait()
    (out / "stopped").write_text(str(stop.received))
    return StageResult("interrupted")


if __name__ == "__main__":
    raise SystemExit(run_stage(Cfg, train, "a fake trainer"))
'''

DRIVER = '''
import sys
from pathlib import Path

from minimodel import pipeline
from minimodel.config import load_config
from minimodel.stages import KINDS, Stage, StageKind

trainer, out = sys.argv[1], Path(sys.argv[2])
KINDS["trainer"] = StageKind(trainer, "", "", "python", ("slurm/python.sh", trainer))
stages = [Stage("train", "trainer", [f"output_dir={out / 'train'}"], out / "train"),
          Stage("after", "trainer", [f"output_dir={out / 'after'}"], out / "after")]
pipeline.build_stages = lambda cfg, parent_run_id=None: stages
pipeline.run(load_config(pipeline.PipelineConfig, "configs/pipeline/smoke.yaml",
                         [f"output_dir={out}", "tracking.enabled=false", "methods=[standard]"]))
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z" if Path("/proc").is_dir() else True


def _wait_for(path: Path, timeout: float = 120) -> None:
    """Until the stage writes `path` (its own progress file): bounded, never a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_to_the_pipeline_stops_the_stage_group_and_leaves_no_process(tmp_path, sig):
    (tmp_path / "trainer.py").write_text(TRAINER)
    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "trainer.py"), str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the stage's output, teed by the pipeline
            if line.strip() == "training":
                break
        rank = int((out / "train" / "rank.pid").read_text())
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        if sig == signal.SIGKILL:  # nothing to forward: the stage learns of its pipeline's death from the kernel
            assert proc.returncode == -signal.SIGKILL
            _wait_for(out / "train" / "stopped")
        else:
            assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
            assert "stage train interrupted" in stderr and "=== [2/2]" not in stdout  # no further stage started
        # the stage received SIGTERM, its preemption signal, whatever the pipeline got
        assert (out / "train" / "stopped").read_text() == str(int(signal.SIGTERM))
        deadline = time.monotonic() + 60
        while _alive(rank):
            assert time.monotonic() < deadline, f"the stage's rank {rank} outlived the pipeline"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
