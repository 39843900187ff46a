"""The pure MiniJoint -> Hugging Face mapping (minimodel/models/minijoint/hf_format.py), without a checkpoint: a TP=1
megatron model's state dict, mapped, gives Hugging Face models with the megatron model's logits, for every kind of
secondary head. (The export stage around it, from multi-process checkpoints: tests/test_minijoint_model.py.)

Runs in a fresh interpreter: megatron's process groups and the CPU layer are process-wide."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import dataclasses
import json

import torch

from minimodel import distributed
from minimodel.distributed import ParallelConfig
from minimodel.models.minijoint import parallelize as P
from minimodel.models.minijoint.config import ModelConfig
from minimodel.models.minijoint.hf_format import hf_models

base = ModelConfig(vocab_size=250, hidden_size=64, num_layers=4, num_attention_heads=4, ffn_hidden_size=128,
                   seq_length=16, mini_layers=2)
parallel = ParallelConfig(micro_batch_size=2, global_batch_size=2)
g = torch.Generator().manual_seed(0)
ids = torch.randint(3, base.vocab_size, (2, 16), generator=g)
mask = torch.ones_like(ids)
mask[1, 11:] = 0
keep = mask.bool()
out = {}
for head in ("separate", "shared_transform", "none"):
    cfg = dataclasses.replace(base, secondary_head=head)
    P.setup(cfg, parallel, seed=1)
    chunk = P.unwrap(P.build_model(cfg, parallel)[0]).eval()
    sd = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    models = hf_models(sd, cfg, mini=head != "none")
    main, secondary = chunk.mlm_logits(ids, mask)
    result = {"layers": {n: m.config.num_hidden_layers for n, m in models.items()}, "diff": {}}
    for name, ours in (("primary", main), ("mini", secondary)):
        if name in models:
            with torch.no_grad():
                theirs = models[name](input_ids=ids, attention_mask=mask).logits
            result["diff"][name] = (ours[keep] - theirs[keep]).abs().max().item()
    if head == "separate":  # the same weights as megatron's Transformer Engine spec names them (norms fused)
        te = sd
        for local, fused in P.layer_spec().submodules.sharded_state_dict_keys_map.items():
            te = {k.replace("." + local, "." + fused): t for k, t in te.items()}
        again = hf_models(te, cfg, mini=True)
        result["te_names"] = te.keys() != sd.keys() and all(
            torch.equal(again[n].state_dict()[k], t) for n, m in models.items() for k, t in m.state_dict().items())
    if head == "shared_transform":
        primary, mini = (m.state_dict() for m in models.values())
        result["shared_head"] = all(torch.equal(mini[k], primary[k]) for k in mini if k.startswith("cls."))
    out[head] = result
    distributed.destroy()
print(json.dumps(out))
"""


def test_mapped_models_reproduce_megatron_logits():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for head in ("separate", "shared_transform"):
        assert out[head]["layers"] == {"primary": 4, "mini": 2}
        assert max(out[head]["diff"].values()) < 1e-5, out[head]
    assert out["shared_transform"]["shared_head"]  # the mini-model's head is the main head's own parameters
    assert out["separate"]["te_names"]  # a model built with the Transformer Engine spec maps to the same weights
    assert out["none"]["layers"] == {"primary": 4} and out["none"]["diff"]["primary"] < 1e-5



def test_an_export_names_the_special_ids_of_the_tokenizer_it_was_trained_with(tmp_path):
    """The exported config said pad 1 / bos 0 / eos 2 (XLM-R's) whatever the tokenizer: with a WordPiece tokenizer
    (pad 0) MiniPost refused the export and row 1, a real token, became the padding row that never learns."""
    from transformers import AutoModelForMaskedLM, MegatronBertForMaskedLM

    from minimodel.models.minijoint.config import ModelConfig
    from minimodel.models.minijoint.export import _save
    from minimodel.models.minijoint.hf_format import hf_config
    from minimodel.tiny_hf import _texts, train_family_tokenizer

    texts = _texts([40])
    for family in ("bert", "xlmr"):
        tokenizer = train_family_tokenizer(family, texts, 300, tmp_path / family / "tokenizer")
        cfg = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_attention_heads=2,
                          ffn_hidden_size=64, seq_length=16, mini_layers=1)
        _save(MegatronBertForMaskedLM(hf_config(cfg, 2, True)), tmp_path / family / "tokenizer",
              tmp_path / family / "primary")
        model = AutoModelForMaskedLM.from_pretrained(tmp_path / family / "primary")
        ids = (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id)
        expected = {"bert": (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id),
                    "xlmr": (1, 0, 2)}[family]  # the data stage's SentencePiece tokenizer: XLM-R's ids
        assert ids == expected and model.get_input_embeddings().padding_idx == tokenizer.pad_token_id, family
        assert family != "bert" or tokenizer.pad_token_id == 0  # [PAD] first: not XLM-R's layout
        # its tokenizer stops at the model's positions: it had no limit, and truncation=True let a long text through
        # to an index error in the position embeddings
        from minimodel.hf import load_tokenizer
        long = load_tokenizer(tmp_path / family / "primary")(" ".join(texts[:50]), truncation=True,
                                                              return_tensors="pt")
        assert long["input_ids"].shape[1] == cfg.seq_length, family
        model(**long)
