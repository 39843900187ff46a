"""A language SFT of a (random, tiny) MegatronBert primary on the tiny Swahili corpus, read in the primary's own
vocabulary (the data stage encoded it with another tokenizer: the stage re-encodes it), in a one-rank DeepSpeed
process: what the SFT holds, that it names the primary, and that applying it lowers the primary's Swahili MLM loss."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import MegatronBertForMaskedLM

from adapt_helpers import REPO, launch_env, prepare_tiny_data, tiny_config
from minimodel.data.indexed import open_indexed
from minimodel.data.mlm import MaskedLMDataset
from minimodel.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from minimodel.manifest import model_hash
from minimodel.sft.file import SparseFineTuning
from minimodel.sft.language import untie_and_freeze_decoder
from minimodel.sft.select import partition_parameters, resolve_k
from minimodel.training.hf_mlm import masked_lm_loss
from minimodel.training.sampler import stack

pytestmark = pytest.mark.slow

SEQ, K_PROPORTION = 32, 0.05

def _mlm_losses(model, data, batches: int = 16) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.array([float(masked_lm_loss(model, {k: torch.as_tensor(v) for k, v in
                                                      stack([data[i * 8 + j] for j in range(8)]).items()}))
                         for i in range(batches)])


def test_language_sft_of_the_primary_over_its_own_vocabulary(tmp_path):
    data_dir = prepare_tiny_data(tmp_path / "data")
    tokenizer = load_tokenizer(data_dir / "en" / "tokenizer")
    primary = tmp_path / "primary"
    torch.manual_seed(0)
    MegatronBertForMaskedLM(tiny_config(len(tokenizer), 2)).save_pretrained(primary)
    tokenizer.save_pretrained(primary)
    out = tmp_path / "lang_sft"
    overrides = [f"output_dir={out}", f"primary_model={primary}", f"data_dir={data_dir}", "target_langs=[sw]",
                 f"seq_length={SEQ}", f"sft.k_proportion={K_PROPORTION}", "sft.full_steps=12", "sft.sparse_steps=12",
                 "train.steps=12", "train.micro_batch_size=8", "train.optim.lr=0.01", "train.schedule.warmup_steps=2",
                 "train.torch_adam=true", "train.precision=fp32", "train.zero_config=configs/deepspeed/zero2.json",
                 "train.eval.batches=2", "tracking.enabled=false"]
    env = {k: v for k, v in launch_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    run = subprocess.run([sys.executable, "adapt/sft.py", *overrides], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]

    assert sorted(p.name for p in (out / "sw" / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    sft = SparseFineTuning.load(out / "sw" / "sft")
    assert sft.base_sha256 == model_hash(primary) and sft.info["target_lang"] == "sw"
    model = MegatronBertForMaskedLM.from_pretrained(primary)
    untie_and_freeze_decoder(model)
    part = partition_parameters(model)
    assert set(sft.diffs) == set(part.eligible)  # the body; word embeddings included, sparse
    # the head trains densely, except the frozen decoder and LayerNorms
    assert set(sft.abs) == {n for n in part.dense} and not any("decoder" in n for n in sft.abs)
    k = resolve_k(None, K_PROPORTION, part.eligible_numel)
    assert k <= sft.numel < k + 50 and sft.diffs["bert.embeddings.word_embeddings.weight"].indices.numel() > 0

    # the stage re-encoded the data stage's Swahili verses with the primary's tokenizer (the data stage used sw's own)
    stage_tokenizer = load_tokenizer(out / "sw" / "tokenizer")
    assert tokenizer_fingerprint(stage_tokenizer) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(load_tokenizer(data_dir / "sw" / "tokenizer")) != tokenizer_fingerprint(tokenizer)
    with open(data_dir / "sw" / "verses.jsonl", encoding="utf-8") as f:
        verses = [json.loads(line) for line in f if line.strip()]
    for split in ("train", "valid"):
        texts = [v["text"] for v in verses if v["split"] == split]
        written = open_indexed(out / "sw" / "data" / split)
        data_stage = open_indexed(data_dir / "sw" / split)
        assert len(written) == len(data_stage) == len(texts) > 0, split
        # an independent encoding: the primary's HF tokenizer, no special tokens, one document per verse
        expected = tokenizer(texts, add_special_tokens=False)["input_ids"]
        assert [written[i].tolist() for i in range(len(texts))] == expected, split
        # not the data stage's ids (sw's vocabulary) copied over
        assert sum(written[i].tolist() != data_stage[i].tolist() for i in range(len(texts))) > len(texts) // 2, split

    # the target text as the stage read it: in the primary's vocabulary
    valid = MaskedLMDataset(out / "sw" / "data" / "valid", tokenizer, SEQ, 0.15, 0)
    before = _mlm_losses(model, valid)
    sft.apply(model, model_hash(primary))
    gain = before - _mlm_losses(model, valid)  # the same batches: a paired difference
    # > 4 standard errors; measured: 27.0 with OMP_NUM_THREADS 1 and 2 alike, a 6.7x margin
    assert gain.mean() > 4 * gain.std(ddof=1) / np.sqrt(len(gain)), gain
    assert os.path.isfile(out / "summary.json")


def test_a_primary_without_its_masked_lm_head_is_refused(tmp_path):
    """adapt/sft.py loaded the primary as AutoModelForMaskedLM, which gives a headless save (a *Model) a random
    head: it exited 0 with an SFT whose body had adapted to that head (adaptation refuses such a model)."""
    data_dir = prepare_tiny_data(tmp_path / "data")
    tokenizer = load_tokenizer(data_dir / "en" / "tokenizer")
    headless = tmp_path / "headless"
    MegatronBertForMaskedLM(tiny_config(len(tokenizer), 2)).bert.save_pretrained(headless)  # the body alone
    tokenizer.save_pretrained(headless)
    out = tmp_path / "lang_sft"
    env = {k: v for k, v in launch_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    run = subprocess.run([sys.executable, "adapt/sft.py", f"output_dir={out}", f"primary_model={headless}",
                          f"data_dir={data_dir}", "target_langs=[sw]", f"seq_length={SEQ}", "tracking.enabled=false"],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "has no masked-LM head" in run.stderr, run.stderr[-3000:]
    assert not (out / "sw" / "sft").exists()
