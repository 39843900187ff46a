"""What both training loops share (minimodel/training/): the checkpoint and evaluation policies, the metric sink."""
import json

import pytest

from minimodel.training.config import CheckpointConfig, EvalConfig
from minimodel.training.metrics import MetricSink, plot_losses, read_metrics


def test_checkpoint_policy_saves_every_n_steps_at_the_end_and_on_a_stop_signal():
    every_3 = CheckpointConfig(save_every=3, keep_last=2)
    assert [s for s in range(1, 11) if every_3.due(s, last=s == 10, stopping=False)] == [3, 6, 9, 10]
    assert every_3.due(4, last=False, stopping=True)
    only_at_the_end = CheckpointConfig(save_every=0)
    assert [s for s in range(1, 11) if only_at_the_end.due(s, last=s == 10, stopping=False)] == [10]


def test_checkpoint_policy_keeps_the_newest():
    assert CheckpointConfig(keep_last=2).expired(["a", "b", "c", "d"]) == ["a", "b"]
    assert CheckpointConfig(keep_last=2).expired(["a"]) == []


def test_evaluation_every_n_steps_and_at_the_end():
    assert [s for s in range(1, 8) if EvalConfig(every=3).due(s, last=s == 7)] == [3, 6, 7]
    assert [s for s in range(1, 8) if EvalConfig(every=0).due(s, last=s == 7)] == [7]


class _Tracker:
    def __init__(self):
        self.logged = []

    def log_metrics(self, metrics, step):
        self.logged.append((step, metrics))


def test_metric_sink_writes_one_row_per_step_and_a_resume_drops_the_redone_steps(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    tracker = _Tracker()
    sink = MetricSink(path, tracker, rank0=True)
    sink.resume(0)
    for step in range(1, 6):
        sink.log({"train/loss": 5.0 - step, "compute/flops": 10.0 * step}, step)
    assert [row["step"] for row in map(json.loads, path.read_text().splitlines())] == [1, 2, 3, 4, 5]
    assert [step for step, _ in tracker.logged] == [1, 2, 3, 4, 5] and len(sink.history) == 5

    tracker = _Tracker()
    resumed = MetricSink(path, tracker, rank0=True)  # a relaunch from the checkpoint of step 3
    resumed.resume(3)
    resumed.amend({"eval/loss": 0.5}, 3)  # the evaluation the stopped launch left to this one: step 3's row
    resumed.log({"train/loss": 1.5, "compute/flops": 40.0}, 4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[2] == {"step": 3, "train/loss": 2.0, "compute/flops": 30.0, "eval/loss": 0.5}
    assert tracker.logged == [(3, {"eval/loss": 0.5}), (4, {"train/loss": 1.5, "compute/flops": 40.0})]
    assert read_metrics(path)[4]["train/loss"] == 1.5
    again = MetricSink(path, tracker, rank0=True)  # that launch killed before its next checkpoint: step 3 again
    again.resume(3)
    again.amend({"eval/loss": 0.5}, 3)
    assert len(tracker.logged) == 2 and len(path.read_text().splitlines()) == 3  # logged once, one row per step

    MetricSink(path, None, rank0=False).resume(0)  # only rank 0 touches the file
    assert path.is_file()
    MetricSink(path, None, rank0=True).resume(0)  # a run from step 0 starts a new file
    assert not path.exists()


def test_a_row_cut_short_by_a_kill_does_not_block_the_resume(tmp_path):
    """A process killed mid-append leaves a last line cut short (NULs on some shared filesystems): every relaunch
    failed on it before training started. It is a step after the checkpoint, redone; damage before the end still
    fails."""
    path = tmp_path / "metrics.jsonl"
    sink = MetricSink(path, None, rank0=True)
    sink.resume(0)
    for step in range(1, 4):
        sink.log({"train/loss": float(step)}, step)
    for torn in ('{"st', "\0\0\0\0"):
        with open(path, "a") as f:
            f.write(torn)
        assert list(read_metrics(path)) == [1, 2, 3]
        MetricSink(path, None, rank0=True).resume(2)
        assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
        sink.log({"train/loss": 3.0}, 3)
    path.write_text('{"st\n' + path.read_text())
    with pytest.raises(json.JSONDecodeError):
        read_metrics(path)


def test_loss_curve_against_compute(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 5 - s / 10, "compute/flops": 1e9 * s} for s in range(1, 11)]
    rows[-1]["eval/loss"] = 4.4
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_losses(path, tmp_path / "curve.png", {"train/loss": "train", "eval/loss": "valid"},
                      x="compute/flops", x_label="cumulative FLOPs", title="adaptation")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


HELPER = """
import sys
from megatron.core.dist_checkpointing.strategies import filesystem_async
from minimodel.training import checkpoint
if __name__ == "__main__":
    checkpoint._shield_the_writer_queue()
    assert filesystem_async._get_write_results_queue()._manager is checkpoint._writer_results  # what megatron uses
    print(checkpoint._writer_results._process.pid, flush=True)
    sys.stdin.read()
"""


def test_the_checkpoint_writers_helper_outlives_the_stop_signals_but_not_its_trainer(tmp_path):
    """The helper process serving megatron's checkpoint writer (checkpoint._shield_the_writer_queue) ignores SIGTERM
    and SIGUSR1, which Slurm sends to every process of a job step, and is killed when the trainer dies."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    script = tmp_path / "helper.py"
    script.write_text(HELPER)
    parent = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        helper = psutil.Process(int(parent.stdout.readline()))
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            os.kill(helper.pid, sig)
        time.sleep(0.5)
        assert helper.is_running() and helper.status() != psutil.STATUS_ZOMBIE
        parent.kill()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # gone, or a zombie where nothing reaps orphans
            try:
                if helper.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the helper outlived its trainer")
    finally:
        parent.kill()
