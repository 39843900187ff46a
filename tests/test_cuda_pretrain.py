"""MiniJoint pretraining (megatron-core) on one GPU: a bf16 step against the CPU fp32 step from the same weights
(secondary head on), then the distributed optimizer's checkpoint and an exact resume on the GPU."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from cuda_helpers import CUDA, record
from minimodel.training.metrics import read_metrics
from pretrain_helpers import build_tiny_corpus, corpus_overrides, launch, run, wait_for_step
from process_helpers import tail

pytestmark = CUDA

VOCAB = 50
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}  # the fp32 reference: the same command on the CPU of the GPU machine


def pretrain_metrics(output_dir: Path) -> dict[int, dict]:
    """step -> the training row (losses, grad norm) of the run's metrics.jsonl."""
    return {step: row for step, row in read_metrics(output_dir / "metrics.jsonl").items() if "train/main_loss" in row}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus"), vocab_size=VOCAB)


def _pretrain_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return [*corpus_overrides(corpus), f"output_dir={out}", f"model.vocab_size={VOCAB}", "train.eval.every=100",
            "train.log_every=1", "train.schedule.warmup_steps=1", "tracking.enabled=false", *extra]


def test_pretraining_step_in_bf16_on_the_gpu_tracks_the_cpu_fp32_step(corpus, tmp_path):
    """Same weights (initialised on the CPU from one seed), same batch, no dropout: the GPU's bf16 step and the CPU's
    fp32 step give the same main and secondary losses and gradient norm within bf16 rounding, and after one update
    (which depends on every gradient's sign and size) the same step-2 losses."""
    same = ["parallel.use_cpu_initialization=true", "model.hidden_dropout=0", "model.attention_dropout=0",
            "train.steps=2", "train.checkpoint.save_every=0"]
    rows = {}
    for name, precision, env in (("cpu_fp32", "fp32", CPU_ONLY), ("gpu_bf16", "bf16", {})):
        out, log = tmp_path / name, tmp_path / f"{name}.log"
        code = run(1, _pretrain_args(corpus, out, *same, f"parallel.precision={precision}"), log, env=env)
        assert code == 0, tail(log)
        rows[name] = pretrain_metrics(out)
    cpu, gpu = rows["cpu_fp32"], rows["gpu_bf16"]
    assert sorted(cpu) == sorted(gpu) == [1, 2]
    gaps = {f"{key}@{step}": abs(gpu[step][key] - cpu[step][key])
            for step in (1, 2) for key in ("train/main_loss", "train/secondary_loss")}
    grad_norm_gap = abs(gpu[1]["train/grad_norm"] / cpu[1]["train/grad_norm"] - 1)
    record("pretrain_bf16_vs_cpu_fp32", loss_gaps=gaps, grad_norm_relative_gap=grad_norm_gap,
           cpu=cpu[1], gpu=gpu[1])
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per value), with fp32 accumulation in the GEMMs and
    # fp32 loss/softmax; on the CPU, bf16 against fp32 measured 4e-4 nats at step 1 (tests/test_pretrain.py, bar 0.01).
    # Bars: 0.02 nats (0.5% of the ~3.9-nat loss) and 5% of the gradient norm; a missing cast or a wrong head
    # (the secondary head reading the wrong layer) moves them by tenths of a nat.
    assert max(gaps.values()) < 0.02, gaps
    assert grad_norm_gap < 0.05, (gpu[1]["train/grad_norm"], cpu[1]["train/grad_norm"])


def test_distributed_optimizer_checkpoint_resumes_on_the_gpu(corpus, tmp_path):
    """parallel.use_distributed_optimizer on the GPU (bf16, dropout on): a run stopped by SIGTERM saves at the next
    step and its resumption continues with the losses of an uninterrupted run (the RNG states, optimizer shards and
    the bf16 model's fp32 main parameters all restored)."""
    steps = 200  # a few seconds on a GPU: the stop lands mid-run
    args = ["parallel.use_distributed_optimizer=true", f"train.steps={steps}", "train.checkpoint.save_every=50"]
    reference = tmp_path / "reference"
    assert run(1, _pretrain_args(corpus, reference, *args), tmp_path / "reference.log") == 0, \
        tail(tmp_path / "reference.log")
    out, log = tmp_path / "stopped", tmp_path / "stopped.log"
    proc = launch(1, _pretrain_args(corpus, out, *args), log)
    try:
        wait_for_step(out, 2, proc)
        os.kill(proc.pid, signal.SIGTERM)  # torchrun forwards it to the worker
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "PREEMPTED by signal SIGTERM" in log.read_text() and proc.returncode != 0, tail(log)
    stopped_at = max(pretrain_metrics(out))
    assert stopped_at < steps, tail(log)
    assert run(1, _pretrain_args(corpus, out, *args), tmp_path / "resumed.log") == 0, tail(tmp_path / "resumed.log")
    # resumed from the stop's checkpoint (a run redone from step 0 would match the reference as well)
    assert f"resumed from {out / 'checkpoints' / f'iter_{stopped_at:07d}'} at step {stopped_at}" in \
        (tmp_path / "resumed.log").read_text(), tail(tmp_path / "resumed.log")
    expected, resumed = pretrain_metrics(reference), pretrain_metrics(out)
    assert sorted(resumed) == list(range(1, steps + 1)), sorted(resumed)
    gaps = [abs(resumed[s][k] - expected[s][k]) for s in resumed for k in ("train/main_loss", "train/secondary_loss")]
    record("pretrain_distopt_resume", max_loss_gap=max(gaps))
    # Bit-exact on the CPU (tests/test_pretrain.py). Here a rerun of the same kernels may sum in another order
    # (atomics): 1e-4 relative would still catch a lost optimizer shard or RNG state (those move losses by > 1e-2).
    np.testing.assert_allclose([resumed[s]["train/main_loss"] for s in sorted(resumed)],
                               [expected[s]["train/main_loss"] for s in sorted(expected)], rtol=1e-4)
