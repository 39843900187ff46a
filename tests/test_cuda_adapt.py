"""DeepSpeed adaptation on one GPU (ZeRO-2 and ZeRO-3, bf16, DeepSpeed's fused Adam built by its JIT): stopped by
SIGTERM, resumed, and compared with an uninterrupted run of the same corpus."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from adapt_helpers import (build_world, copy_language, extend_args, metrics, resumed_at, run_deepspeed,
                           run_deepspeed_and_signal)
from process_helpers import tail
from cuda_helpers import CUDA, GPU_DATA_CONFIG, ROOT, record
from minimodel.training.preemption import PREEMPTED_EXIT_CODE

pytestmark = CUDA


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny primary and its mini-model pretrained here (tests/adapt_helpers.py) on the Gospel of Matthew in English
    and Chichewa, from the smoke corpus as JSONL (the GPU machine has no corpus packages); Chichewa twice."""
    root = tmp_path_factory.mktemp("adapt")
    config = yaml.safe_load(GPU_DATA_CONFIG.read_text())
    for lang in config["languages"].values():  # relative to the repository, wherever pytest runs
        lang["sources"] = [{**s, "path": str(ROOT / s["path"])} for s in lang["sources"]]
    (root / "corpus.yaml").write_text(yaml.safe_dump(config))
    world = build_world(root, config=root / "corpus.yaml", target="ny", books=(40, 65))
    copy_language(world.data_dir, "ny", "nycopy")
    return world


ADAPT_STEPS = 300  # long enough on a GPU (tens of ms a step) for the stop to land mid-run


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_adaptation_in_bf16_with_fused_adam_resumes_exactly(world, tmp_path, zero):
    """`deepspeed --num_gpus 1 adapt/train.py` over the mini-model, ZeRO-`zero`, bf16, DeepSpeed's fused Adam (its
    JIT build with nvcc): the first launch is stopped by SIGTERM while training the first language; the same command
    resumes it and trains its copy uninterrupted. Both end with the same losses and embeddings."""
    out = tmp_path / f"z{zero}"
    args = [f"output_dir={out}", "over=mini", f"primary_model={world.primary}", f"mini_model={world.mini}",
            f"data_dir={world.data_dir}", "target_langs=[ny,nycopy]", "source_lang=en", "seq_length=64",
            f"train.steps={ADAPT_STEPS}", "train.micro_batch_size=16", "train.optim.lr=0.01",
            "train.schedule.warmup_steps=4", "train.torch_adam=false", "train.checkpoint.save_every=20",
            "train.eval.every=100", "train.eval.batches=2", f"train.zero_config=configs/deepspeed/zero{zero}.json",
            "tracking.enabled=false"]
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    sent, code = run_deepspeed_and_signal("adapt/train.py", args, first, out / "ny" / "metrics.jsonl",
                                          after_lines=30, ranks_only=True, ranks=1)
    summary = json.loads((out / "summary.json").read_text())
    assert sent and code == PREEMPTED_EXIT_CODE and summary.get("ny") == "interrupted", (summary, tail(first))
    text = first.read_text()
    assert f"ZeRO stage {zero}, bf16, DeepSpeed's fused Adam, 1 rank(s) on cuda" in text, tail(first)
    assert "fused_adam" in text, tail(first)  # the op DeepSpeed built (or loaded) for this GPU
    before = metrics(out / "ny")
    stopped_at = before[-1]["step"]
    assert run_deepspeed("adapt/train.py", args, second, ranks=1) == 0, tail(second)
    # resumed from the stop's checkpoint, not redone: the stopped launch's rows stand (a redone step would measure
    # its wall-clock time again; the stopped step's row may gain the evaluation the stop left to this launch)
    assert resumed_at(second.read_text(), stopped_at), tail(second)
    assert metrics(out / "ny")[:stopped_at - 1] == before[:-1]

    from safetensors.torch import load_file

    stopped, uninterrupted = metrics(out / "ny"), metrics(out / "nycopy")
    assert [m["step"] for m in stopped] == list(range(1, ADAPT_STEPS + 1))
    losses = np.array([[a["train/loss"], b["train/loss"]] for a, b in zip(stopped, uninterrupted)])
    a, b = (load_file(str(out / lang / "embeddings.safetensors"))["input_embeddings"] for lang in ("ny", "nycopy"))
    record(f"adapt_zero{zero}_resume", max_loss_gap=float(np.abs(losses[:, 0] - losses[:, 1]).max()),
           max_embedding_gap=float((a - b).abs().max()), bitwise_equal=bool(torch.equal(a, b)))
    # Bit-exact on the CPU (tests/test_adapt.py); a GPU may reorder float sums between two runs (atomics). 1e-3
    # relative is far below what a lost optimizer state or data position does (the loss curve's own steps, ~1e-2).
    np.testing.assert_allclose(losses[:, 0], losses[:, 1], rtol=1e-3)
    torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


def test_extend_keeps_the_primarys_rows_bit_identical_in_bf16(world, tmp_path):
    """tokenizer.mode=extend under bf16 (ZeRO-2): DeepSpeed casts the module before it makes its fp32 masters, so
    the frozen rows read back from them are rounded; the saved embeddings must still hold the primary's rows bit for
    bit (the CPU's fp32 test cannot see this), and the new rows must train."""
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM

    from minimodel.hf import load_tokenizer

    out, log = tmp_path / "extend", tmp_path / "extend.log"
    rc = run_deepspeed("adapt/train.py", [*extend_args(world, out, "ny", steps=20, micro_batch_size=16),
                                          "source_lang=en"], log, ranks=1)
    assert rc == 0, tail(log)
    assert "bf16" in log.read_text(), tail(log)
    source_rows = AutoModelForMaskedLM.from_pretrained(world.primary).get_input_embeddings().weight.detach().float()
    base = len(load_tokenizer(world.primary))
    learned = load_file(str(out / "ny" / "embeddings.safetensors"))["input_embeddings"]
    start = load_file(str(out / "ny" / "snapshots" / "step_0" / "embeddings.safetensors"))["input_embeddings"]
    record("adapt_extend_bf16", source_rows_equal=bool(torch.equal(learned[:base], source_rows)),
           new_rows_moved=float((learned[base:] - start[base:]).abs().max()))
    assert torch.equal(learned[:base], source_rows)
    assert not torch.equal(learned[base:], start[base:])
