"""LT-SFT trained inside the DeepSpeed loop under the real `deepspeed` launcher (2 ranks, CPU): the rewind, masked
entries bit-identical to theta0 through phase 2 under ZeRO 0/1/2 with clipping active, the unmasked entries equal to
a plain PyTorch loop that masks gradients before clipping (and unequal to one that resets parameters instead), and a
kill in phase 2 resuming to the same SFT. The world: tests/sft_helpers.py."""
from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adapt_helpers import metrics, resumed_at, run_and_signal, run_deepspeed
from adapt_helpers import deepspeed_command, launch_env
from process_helpers import tail
from minimodel.sft.file import SparseFineTuning
from minimodel.training.preemption import PREEMPTED_EXIT_CODE
from sft_helpers import BASE_SHA, GRAD_CLIP, SFT, plain_phase2, tiny_model

pytestmark = pytest.mark.slow

SCRIPT = "tests/sft_helpers.py"
STAGES = (0, 1, 2)


def _launch(out: Path, stages, log: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    code = run_deepspeed(SCRIPT, [str(out), *map(str, stages)], log)
    assert code == 0, tail(log)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft")
    _launch(out, STAGES, out / "launch.log")
    return out


def _run(trained: Path, zero: int) -> dict:
    d = trained / f"zero{zero}"
    return {"dir": d, "theta0": torch.load(d / "theta0.pt"), "rewound": torch.load(d / "rewound.pt"),
            "final": torch.load(d / "final.pt"), "masks": load_file(str(d / "iteration_1" / "mask.safetensors")),
            "sparse": metrics(d / "iteration_1" / "sparse")}


@pytest.mark.parametrize("zero", STAGES)
def test_phase2_masks_gradients_before_clipping_like_a_plain_loop(trained, zero):
    run = _run(trained, zero)
    theta0, final, masks = run["theta0"], run["final"], run["masks"]
    # the rewind: phase 2 starts from theta0 in every parameter (head and frozen norms included)
    for n, value in theta0.items():
        assert torch.equal(run["rewound"][n], value), n
    assert sum(int(m.sum()) for m in masks.values()) >= SFT.k
    # masked-out entries never moved, bit for bit; neither did anything frozen
    for n, m in masks.items():
        assert torch.equal(final[n][~m], theta0[n][~m]), n
    moved = sum(int((final[n][m] != theta0[n][m]).sum()) for n, m in masks.items())
    assert moved > SFT.k // 2, moved
    frozen = [n for n in theta0 if "LayerNorm" in n]
    assert frozen and all(torch.equal(final[n], theta0[n]) for n in frozen)
    lrs = [row["train/lr"] for row in run["sparse"]]
    model = tiny_model()
    model.load_state_dict(theta0, strict=False)
    for p in (p for n, p in model.named_parameters() if "LayerNorm" in n):
        p.requires_grad_(False)
    expected, norms = plain_phase2(model, theta0, masks, lrs)
    for n in theta0:
        torch.testing.assert_close(final[n], expected[n], rtol=0, atol=1e-6, msg=n)
    # clipping acted at every step; where DeepSpeed logs the (unclipped, masked) norm (ZeRO 1/2) it is the plain one
    assert min(norms) > GRAD_CLIP
    logged = [row["train/grad_norm"] for row in run["sparse"] if "train/grad_norm" in row]
    assert len(logged) == (len(lrs) if zero > 0 else 0)
    np.testing.assert_allclose(logged, norms[:len(logged)], rtol=1e-5)

    # resetting masked entries after each step instead of masking gradients is not the same training: the clipping
    # norm and Adam's moments see the masked-out gradients
    model.load_state_dict(theta0, strict=False)
    reset, _ = plain_phase2(model, theta0, masks, lrs, reset_instead=True)
    gap = max(float((reset[n] - final[n]).abs().max()) for n in masks)
    assert gap > 1e-4, gap

    # the SFT file: theta0 + SFT gives the trained parameters, to within the two roundings of theta - theta0 and
    # of the sum: 1 ulp of the larger of theta0 and theta
    sft = SparseFineTuning.load(run["dir"] / "sft")
    model.load_state_dict(theta0, strict=False)
    sft.apply(model, BASE_SHA)
    for n, p in model.named_parameters():
        bound = np.spacing(np.maximum(theta0[n].abs().numpy(), final[n].abs().numpy()))
        assert (np.abs(p.detach().numpy() - final[n].numpy()) <= bound).all(), n
    assert sft.info["steps"] == SFT.full_steps + SFT.sparse_steps and sft.info["flops"] > 0


def test_a_kill_in_phase2_resumes_with_the_same_mask_to_the_same_sft(trained, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    sparse_metrics = out / "zero2" / "iteration_1" / "sparse" / "metrics.jsonl"
    # the ranks wait at phase 2's step 3 for the signal sent once step 2 is logged: they stop at the end of step 3
    sent, code = run_and_signal(deepspeed_command(SCRIPT, [str(out), "2"]), tmp_path / "first.log", sparse_metrics,
                                after_lines=2, sig=signal.SIGTERM, ranks_only=True,
                                env=dict(launch_env(), HOLD_PHASE2_AT_STEP="3"), cwd=tmp_path)
    assert sent and code == PREEMPTED_EXIT_CODE, tail(tmp_path / "first.log")
    rows_before = metrics(sparse_metrics.parent)
    stopped_at = len(rows_before)
    assert stopped_at == 3 < SFT.sparse_steps
    mask_before = load_file(str(out / "zero2" / "iteration_1" / "mask.safetensors"))
    # phase 1's checkpoints went once its mask was written; phase 2's stay until the SFT is saved
    assert not (out / "zero2" / "iteration_1" / "full" / "checkpoints").exists()
    assert (out / "zero2" / "iteration_1" / "sparse" / "checkpoints").is_dir()

    _launch(out, [2], tmp_path / "second.log")
    second = (tmp_path / "second.log").read_text()
    assert "it1 full" not in second  # phase 1 is not redone
    # phase 2 resumed from its checkpoint, not redone (a redone step would measure its wall-clock time again)
    assert resumed_at(second, stopped_at), second[-3000:]
    assert metrics(sparse_metrics.parent)[:stopped_at] == rows_before
    mask_after = load_file(str(out / "zero2" / "iteration_1" / "mask.safetensors"))
    assert all(torch.equal(mask_before[n], mask_after[n]) for n in mask_before)
    assert [row["step"] for row in metrics(sparse_metrics.parent)] == list(range(1, SFT.sparse_steps + 1))

    resumed, uninterrupted = SparseFineTuning.load(out / "zero2" / "sft"), SparseFineTuning.load(
        trained / "zero2" / "sft")
    assert resumed.diffs.keys() == uninterrupted.diffs.keys()
    for n, d in uninterrupted.diffs.items():
        assert torch.equal(resumed.diffs[n].indices, d.indices) and torch.equal(resumed.diffs[n].values, d.values), n
    for n, value in uninterrupted.abs.items():
        assert torch.equal(resumed.abs[n], value), n
    assert not list(out.rglob("checkpoints"))  # several GB each at XLM-R's size: none outlives the saved SFT
