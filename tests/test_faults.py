"""Fault injection over the whole smoke pipeline (issue 20): kill it anywhere, run the same command again, and get the
report of an uninterrupted run.

One chain of pipeline runs in one output directory: run k is stopped at fault point k (minimodel/faults.py: SIGTERM
to the pipeline at a training step, as preemption or Ctrl-C; SIGKILL to the stage's process group where the stage
claims its writes are atomic), then run k+1 is the same command with the next point, and a last run has none. Each
killed run must end (bounded time) without stamping the stage it stopped, the next run must run that stage again (not
skip it), and the last run's report must be the uninterrupted smoke run's (tests/conftest.py) for the chain's methods:
the same points, FLOPs exactly, quality to 1e-6 (pretraining resumes exactly to float tolerance; every later stage
is deterministic). Then a changed config per checkpointing stage kind is refused naming the key, never ignored.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml
from pipeline_helpers import ROOT, SMOKE, failure_text

from minimodel.training.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.slow

# The chain's methods: the stage kinds of every kill point below, without the smoke run's other methods' stages (the
# report's points of these methods do not depend on the others: compared with the smoke run's)
METHODS = ["standard", "minipost"]

# In pipeline order; each names the stage it stops (the first stage of that kind not yet finished).
FAULTS = [
    ("data.build:KILL", "data"),  # a language's directory built, not yet renamed into place
    ("pretrain.step@5:TERM", "pretrain"),  # mid-run: checkpoint at step 5, exit 75
    ("pretrain.checkpoint@10:KILL", "pretrain"),  # mid checkpoint save: shards written, not yet in place
    ("export.write:KILL", "export"),  # primary written, mini-model not
    ("minipost.step@2:TERM", "minipost"),
    ("adapt.step@2:TERM", "adapt-standard-ny"),
    ("adapt.snapshot@3:KILL", "adapt-standard-ny"),  # mid snapshot: embeddings written, adapt.json not
    ("zero_shot.score:KILL", "zero_shot-target_mlm-standard"),
    ("finetune.step@3:TERM", "finetune"),
    ("plug.write:KILL", "plug-standard-ny"),
    ("report.write:KILL", "report"),
]
RUN_TIMEOUT = 1200  # seconds per pipeline run: a hang fails the test instead of stalling CI


def _run(out, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MINIMODEL_FAULT")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["MINIMODEL_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "minimodel.pipeline", "--config", str(SMOKE), f"output_dir={out / 'run'}",
         f"data_dir={out / 'data'}", f"methods=[{', '.join(METHODS)}]", "tracking.enabled=false",
         f"tracking.store_dir={out / 'store'}", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)


def _started(stdout: str) -> list[str]:
    """The stages a pipeline run started (not skipped), in order."""
    return re.findall(r"^=== \[\d+/\d+\] (\S+)$", stdout, re.M)


def _points(report: dict) -> dict:
    return {(task, lang, method, p["adapt_step"]): (p["quality"], p["flops"])
            for task, t in report["tasks"].items() for lang, entry in t["languages"].items()
            for method, m in entry["methods"].items() for p in m["points"]}


def test_killed_anywhere_the_same_command_finishes_with_the_uninterrupted_report(smoke_pipeline, tmp_path):
    stopped = None
    for fault, stage in FAULTS:
        result = _run(tmp_path, fault=fault)
        started = _started(result.stdout)
        if stopped is not None:  # the stage the previous run stopped runs again: never skipped as done
            assert stopped in started, f"{stopped} was not run again after its kill\n{failure_text(result)}"
        # TERM: the pipeline was told to stop, and says interrupted; KILL: the stage died under it, a failure
        assert result.returncode == (PREEMPTED_EXIT_CODE if fault.endswith("TERM") else 1), failure_text(result)
        assert started and started[-1] == stage, f"{fault} stopped {started[-1:]}, not {stage}"
        stopped = stage
    final = _run(tmp_path)
    assert final.returncode == 0, failure_text(final)
    assert stopped in _started(final.stdout)

    expected = {key: point for key, point in
                _points(json.loads((smoke_pipeline.output_dir / "report" / "report.json").read_text())).items()
                if key[2] in METHODS}
    got = _points(json.loads((tmp_path / "run" / "report" / "report.json").read_text()))
    assert got.keys() == expected.keys()
    for key, (quality, flops) in expected.items():
        assert got[key][1] == flops, (key, got[key], expected[key])
        assert math.isclose(got[key][0], quality, rel_tol=1e-6, abs_tol=1e-6), (key, got[key], expected[key])

    # a changed config per checkpointing stage kind: refused with the key named (the data, export, plug, zero-shot
    # and report stages redo their outputs for a new config, as any stage after a refused one would)
    for stage, change, key in [("pretrain", "train.steps=21", "train.steps: 20 -> 21"),
                               ("minipost", "train.steps=7", "train.steps: 6 -> 7"),
                               ("adapt", "train.steps=7", "train.steps: 6 -> 7"),
                               ("finetune", "train.steps=11", "train.steps: 10 -> 11")]:
        smoke = yaml.safe_load(SMOKE.read_text())["overrides"][stage]
        changed = _run(tmp_path, f"overrides.{stage}=[{', '.join([*smoke, change])}]")
        assert changed.returncode != 0 and key in changed.stdout and "overwrite=true" in changed.stdout, \
            failure_text(changed)
