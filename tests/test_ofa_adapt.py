"""OFA end to end over the tiny world (tests/adapt_helpers.py): word vectors learned from its Bible data, then
DeepSpeed adaptation over the mini-model with init.method=ofa and factorised embeddings, then plugging."""
from __future__ import annotations

import json

import pytest
import torch
from adapt_helpers import World, metrics, prepare_tiny_data, pretrain_primary_and_mini, run_deepspeed
from process_helpers import tail
from safetensors.torch import load_file
from transformers import MegatronBertForMaskedLM

from minimodel.adaptation.plug import PlugConfig, plug
from minimodel.config import load_config
from minimodel.ofa.factorized import factorize
from minimodel.ofa.learn import WordVectorConfig, build_word_vectors

pytestmark = pytest.mark.slow
RANK = 16


def test_ofa_factorised_adaptation_over_the_mini_model_plugs_into_the_primary(tmp_path):
    # a briefly pretrained world: what is checked here is the wiring, not the quality the world reaches
    data_dir = prepare_tiny_data(tmp_path / "data")
    world = World(tmp_path, data_dir, *pretrain_primary_and_mini(data_dir, tmp_path / "models", steps=30))
    vectors = build_word_vectors(load_config(WordVectorConfig, overrides=[
        f"data={tmp_path / 'data.yaml'}", f"output_dir={tmp_path / 'wv'}", "dim=32", "min_count=2",
        "eval.min_verses=3"])).outputs["vectors"]
    out = tmp_path / "adapt"
    log = tmp_path / "adapt.log"
    rc = run_deepspeed("adapt/train.py", [
        f"output_dir={out}", "over=mini", "method=minijoint+ofa", f"primary_model={world.primary}",
        f"mini_model={world.mini}", f"data_dir={world.data_dir}", "target_langs=[sw]", "seq_length=64",
        "init.method=ofa", f"init.ofa.vectors=[{{path: {vectors}}}]", f"embedding.factorized_dim={RANK}",
        "train.steps=20", "train.micro_batch_size=8", "train.optim.lr=0.01", "train.schedule.warmup_steps=2",
        "train.torch_adam=true", "train.eval.every=10", "train.eval.batches=2",
        "train.zero_config=configs/deepspeed/zero2.json", "tracking.enabled=false"], log)
    assert rc == 0, tail(log)
    info = json.loads((out / "sw" / "adapt.json").read_text())
    counts = info["init_summary"]
    assert sum(counts.values()) == info["vocab_size"] and counts["neighbours"] > 0, counts
    assert info["factorized_dim"] == RANK and info["hidden_size"] == 64 and info["trainable"] == ["coordinates"]
    assert info["trainable_numel"] == info["vocab_size"] * RANK
    tensors = load_file(str(out / "sw" / "embeddings.safetensors"))
    assert set(tensors) == {"coordinates", "primitives", "token_map"}
    primary = MegatronBertForMaskedLM.from_pretrained(world.primary)
    _, p, _ = factorize(primary.get_input_embeddings().weight.detach(), RANK)
    assert torch.equal(tensors["primitives"], p.float())  # frozen: the primary's SVD primitives, untouched
    start = load_file(str(out / "sw" / "snapshots" / "step_0" / "embeddings.safetensors"))["coordinates"]
    assert not torch.equal(start, tensors["coordinates"])
    assert len([m for m in metrics(out / "sw") if "train/loss" in m]) == 20
    plugged = plug(PlugConfig(embeddings=str(out / "sw"), model=str(world.primary),
                              output_dir=str(tmp_path / "plugged"))).outputs["plugged"]
    model = MegatronBertForMaskedLM.from_pretrained(plugged)
    assert torch.allclose(model.get_input_embeddings().weight, tensors["coordinates"] @ tensors["primitives"],
                          atol=1e-6)
