"""BiStil phase 1 (adapt/distill.py) on the tiny Bible data: a 4-layer XLM-R-class teacher reads English, the same
model with Swahili embeddings plugged in reads Swahili; a 2-layer, half-width student is distilled from both in a
one-rank DeepSpeed process, and its vocabulary routes each language to its own pieces."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM

from adapt_helpers import REPO, launch_env, prepare_tiny_data
from minimodel.adaptation.vocab import install_vocabulary
from minimodel.bistil.distill import DistillConfig, StudentVocabulary, build_vocabulary
from minimodel.data.indexed import write_indexed
from minimodel.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bistil")
    data_dir = prepare_tiny_data(root / "data")
    en, sw = load_tokenizer(data_dir / "en" / "tokenizer"), load_tokenizer(data_dir / "sw" / "tokenizer")
    torch.manual_seed(0)
    teacher = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=len(en), hidden_size=32, num_hidden_layers=4,
                                                     num_attention_heads=2, intermediate_size=64, pad_token_id=1,
                                                     max_position_embeddings=40))
    teacher.save_pretrained(root / "teacher")
    en.save_pretrained(root / "teacher")
    install_vocabulary(teacher, torch.randn(len(sw), 32) * 0.02, torch.full((len(sw),), -1), pad_id=1)
    teacher.save_pretrained(root / "plugged")  # the primary with (here random) Swahili embeddings plugged in
    sw.save_pretrained(root / "plugged")
    return root, data_dir


def _ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


@pytest.mark.slow
def test_a_two_teacher_student_is_distilled_and_reads_each_language_with_its_own_pieces(world):
    root, data_dir = world
    out = root / "distill"
    overrides = [f"output_dir={out}", f"teacher_model={root / 'teacher'}", f"target_teacher_model={root / 'plugged'}",
                 f"data_dir={data_dir}", "target_langs=[sw]", "seq_length=32", "vocab_threshold=1e-3",
                 "student.layer_ratio=2", "student.hidden_ratio=2", "student.init=svd", "projection_tokens=512",
                 "train.steps=4", "train.micro_batch_size=4", "train.optim.lr=0.001", "train.schedule.warmup_steps=1",
                 "train.torch_adam=true", "train.precision=fp32", "train.zero_config=configs/deepspeed/zero2.json",
                 "tracking.enabled=false"]
    env = {k: v for k, v in launch_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    run = subprocess.run([sys.executable, "adapt/distill.py", *overrides], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]

    student_dir = out / "sw" / "student"
    student = AutoModelForMaskedLM.from_pretrained(student_dir, local_files_only=True)
    vocab = StudentVocabulary(student_dir)
    spec = json.loads((student_dir / "vocabulary.json").read_text())
    n_src, n_tgt = len(spec["rows"]["en"]), len(spec["rows"]["sw"])
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 16)
    assert student.config.vocab_size == n_src + n_tgt and n_tgt > 50
    en, sw = load_tokenizer(root / "teacher"), load_tokenizer(root / "plugged")
    kept = set(spec["rows"]["sw"]) | set(sw.all_special_ids)
    verses = [json.loads(line)["text"] for line in (data_dir / "sw" / "verses.jsonl").read_text().splitlines()]
    verse = next(v for v in verses if len(_ids(sw, v)) > 8 and set(_ids(sw, v)) <= kept)
    student_ids = _ids(vocab.tokenizer("sw"), verse)  # the student's own (trimmed, renumbered) target tokenizer
    # = the teacher's ids through the map: specials are the source's, Swahili pieces in the target block
    assert student_ids == np.asarray(spec["to_student"]["sw"])[_ids(sw, verse)].tolist()
    assert student_ids[0] == _ids(vocab.tokenizer("en"), "In the beginning")[0] == en.cls_token_id
    assert all(i >= n_src for i in student_ids[1:-1])
    rows = [json.loads(line) for line in (out / "sw" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["compute/flops"] > 0

    # beside its teacher, in one run: half the layers at half the width cost about a quarter of the FLOPs
    comparison = json.loads((out / "sw" / "comparison.json").read_text())
    teacher_row, student_row = comparison["teacher"], comparison["student"]
    assert student_row["parameters"] < teacher_row["parameters"]
    ratio = student_row["flops_per_token"] / teacher_row["flops_per_token"]
    assert ratio == pytest.approx(2 * (2 * (4 * 16**2 + 2 * 16 * 32) + 4 * 32 * 16) /
                                  (4 * (2 * (4 * 32**2 + 2 * 32 * 64) + 4 * 32 * 32)))  # layers x (linear + attention)
    assert all(0 <= row["retrieval/top1"] <= row["retrieval/top10"] <= 1 and row["tokens_per_s"] > 0
               for row in comparison.values())

    # the same command again: the finished student is kept, not redone
    mtime = (student_dir / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run([sys.executable, "adapt/distill.py", *overrides], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=1200)
    assert again.returncode == 0 and (student_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_one_teacher_vocabulary_keeps_the_tokens_frequent_in_either_corpus(world, tmp_path):
    root, data_dir = world
    en = load_tokenizer(root / "teacher")
    ids, sources = {}, {}
    for code in ("en", "sw"):  # both corpora in the one teacher's vocabulary
        texts = [json.loads(line)["text"] for line in (data_dir / code / "verses.jsonl").read_text().splitlines()]
        encoded = [np.array(en(t, add_special_tokens=False)["input_ids"]) for t in texts[:300]]
        with write_indexed(tmp_path / code, len(en)) as w:
            for e in encoded:
                w.add(e)
        ids[code], sources[code] = np.concatenate(encoded), (root / "teacher", tmp_path / code)
    cfg = DistillConfig(teacher_model=str(root / "teacher"), vocab_threshold=1e-3)
    vocab = build_vocabulary(cfg, "sw", sources, tmp_path / "student")

    frequent = [np.bincount(i, minlength=len(en)) / len(i) >= 1e-3 for i in ids.values()]
    expected = sorted(set(np.flatnonzero(frequent[0] | frequent[1]).tolist()) | set(en.all_special_ids))
    assert vocab["rows"]["en"] == expected and vocab["rows"]["sw"] == []
    assert vocab["to_student"]["en"] == vocab["to_student"]["sw"]
    to_student, unk = vocab["to_student"]["en"], vocab["to_student"]["en"][en.unk_token_id]
    assert [to_student[i] for i in expected] == list(range(len(expected)))
    assert all(to_student[i] == unk for i in set(range(len(en))) - set(expected))  # rare tokens read as <unk>
    assert len(load_tokenizer(tmp_path / "student")) == len(expected)
