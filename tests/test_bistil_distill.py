"""BiStil phase 1 (adapt/distill.py) on the tiny Bible data: a 4-layer XLM-R-class teacher reads English, the same
model with Swahili embeddings plugged in reads Swahili; a 2-layer, half-width student is distilled from both in a
one-rank DeepSpeed process, and its vocabulary routes each language to its own pieces."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForMaskedLM, AutoModelForSequenceClassification, XLMRobertaConfig,
                          XLMRobertaForMaskedLM)

from adapt_helpers import REPO, launch_env, prepare_tiny_data
from minimodel.adaptation.vocab import install_vocabulary
from minimodel.bistil.distill import (DistillConfig, StudentVocabulary, build_vocabulary, fit_projections,
                                      load_projections)
from minimodel.data.indexed import write_indexed
from minimodel.data.tokenizer import load_tokenizer
from minimodel.errors import UserError
from minimodel.evaluation.models import load_task_model, write_task_model
from minimodel.evaluation.scoring import score
from minimodel.evaluation.tasks import TASKS, TaskConfig, load_examples
from minimodel.hf import initialised_at_load, load_model
from minimodel.manifest import model_hash
from minimodel.sft.file import SparseDiff, SparseFineTuning
from minimodel.sft.select import partition_parameters


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


def _env() -> dict:
    return {k: v for k, v in launch_env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}


def _phase1(world) -> tuple[subprocess.CompletedProcess, list[str]]:
    """adapt/distill.py for sw: a 2-layer half-width student (a rerun keeps the finished one)."""
    root, data_dir = world
    overrides = [f"output_dir={root / 'distill'}", f"teacher_model={root / 'teacher'}",
                 f"target_teacher_model={root / 'plugged'}", f"data_dir={data_dir}", "target_langs=[sw]",
                 "seq_length=32", "vocab_threshold=1e-3", "student.layer_ratio=2", "student.hidden_ratio=2",
                 "student.init=svd", "projection_tokens=512", "train.steps=4", "train.micro_batch_size=4",
                 "train.optim.lr=0.001", "train.schedule.warmup_steps=2", "train.torch_adam=true",
                 "train.precision=fp32", "train.zero_config=configs/deepspeed/zero2.json", "tracking.enabled=false"]
    run = subprocess.run([sys.executable, "adapt/distill.py", *overrides], env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=1200)
    return run, overrides


@pytest.mark.slow
def test_a_two_teacher_student_is_distilled_and_reads_each_language_with_its_own_pieces(world):
    root, data_dir = world
    out = root / "distill"
    run, overrides = _phase1(world)
    assert run.returncode == 0, run.stderr[-4000:]

    student_dir = out / "sw" / "student"
    student = AutoModelForMaskedLM.from_pretrained(student_dir, local_files_only=True)
    vocab = StudentVocabulary(student_dir)
    spec = json.loads((student_dir / "vocabulary.json").read_text())
    n_src, n_tgt = len(spec["rows"]["en"]), len(spec["rows"]["sw"])
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (2, 16)
    assert load_file(out / "sw" / "projection.safetensors")["M"].shape == (5, 32, 16)  # one M per teacher state
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
    again = subprocess.run([sys.executable, "adapt/distill.py", *overrides], env=_env(), cwd=REPO,
                           capture_output=True, text=True, timeout=1200)
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


@pytest.mark.slow
def test_task_distillation_trains_the_students_body_at_the_configured_density_from_a_frozen_teacher(world):
    """Phase 2 (evaluate/distill_task.py): the student learns verse classification from a task model of the teacher
    as a sparse fine-tuning: K = k_proportion of its eligible body entries change (its pooler and classifier, new
    at load, dense), the teacher's weights do not; the student task model is a plain Hugging Face directory that
    reads each language with its own tokenizer."""
    root, data_dir = world
    run, _ = _phase1(world)
    assert run.returncode == 0, run.stderr[-4000:]
    student_dir = root / "distill" / "sw" / "student"
    task = TaskConfig(name="verse_class", data_dir=str(data_dir), max_length=32)
    labels = TASKS["verse_class"].labels
    teacher = load_task_model(root / "teacher", "classification", labels).eval()
    # the 40 test verses the stage scores (task.max_eval_examples=40) are all of one part of the Bible here, and a
    # random head reads none of them as it: tilt the head to read `read` of them so (accuracy read / 40, 1/4 to
    # 3/4), and the teacher's score tells this teacher from another
    scored = TaskConfig(name="verse_class", data_dir=str(data_dir), max_length=32, max_eval_examples=40)
    examples = load_examples(scored, "en", "test")
    [gold] = {e["label"] for e in examples}
    texts, tokenizer = [e["text_a"] for e in examples], load_tokenizer(root / "teacher")
    with torch.no_grad():  # as here, and as the stage reads them (eager attention, padded to max_length)
        logits = [model(**tokenizer(texts, truncation=True, max_length=32, padding=padding, return_tensors="pt")).logits
                  for model, padding in ((teacher, True), (load_task_model(root / "teacher", "classification", labels,
                                                                           attn_implementation="eager"), "max_length"))]
        noise = (logits[0] - logits[1]).abs().max()
        lacks = (logits[1].index_fill(1, torch.tensor([gold]), -torch.inf).amax(1) - logits[1][:, gold]).sort().values
        read = 10 + int(lacks.diff()[9:30].argmax())  # the widest gap between the 10th and the 30th
        # the tilt falls in a gap far wider than two forwards differ, so the stage's forward reads the same verses
        # as their part (measured: gap 6.6e-6, difference 1.1e-8)
        assert lacks[read] - lacks[read - 1] > 100 * noise, (lacks, noise)
        teacher.classifier.out_proj.bias[gold] += (lacks[read - 1] + lacks[read]) / 2
    teacher_dir = root / "teacher_task"
    write_task_model(teacher_dir, teacher, tokenizer, task, labels, "en", root / "teacher", {"frozen": []})
    teacher_sha = model_hash(teacher_dir)
    out = root / "distill_task"
    overrides = ["--config", "configs/distill/task_tiny.yaml", f"student={student_dir}", f"teacher={teacher_dir}",
                 f"output_dir={out}", f"task.data_dir={data_dir}", "task.max_length=32", "sft.full_steps=3",
                 "sft.sparse_steps=3", "train.steps=3", "train.micro_batch_size=4", "train.schedule.warmup_steps=2",
                 "train.eval.every=0", "train.checkpoint.save_every=0", "train.precision=fp32",
                 "task.max_eval_examples=40", "tracking.enabled=false"]
    proc = subprocess.run([sys.executable, "evaluate/distill_task.py", *overrides], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert model_hash(teacher_dir) == teacher_sha  # its files untouched: re-scoring them below scores what it loaded

    sft = SparseFineTuning.load(out / "train" / "sft")
    fresh = load_task_model(student_dir, "classification", TASKS["verse_class"].labels)
    new = initialised_at_load(fresh, student_dir)
    assert new == {f"classifier.{layer}.{p}" for layer in ("dense", "out_proj") for p in ("weight", "bias")}
    part = partition_parameters(fresh, new=new)
    k = int(0.1 * part.eligible_numel)
    assert sft.info["k"] == k and k <= sft.numel < k + 20  # ties with the threshold are kept
    assert set(sft.abs) == new and not new & set(sft.diffs)  # the head: dense, stored whole

    model = AutoModelForSequenceClassification.from_pretrained(out / "model", local_files_only=True)
    assert model.config.num_hidden_layers == 2 and json.loads((out / "model" / "task.json").read_text())["sft"]
    vocab = StudentVocabulary(out / "model")
    assert vocab.tokenizer("sw")("Mungu")["input_ids"] == StudentVocabulary(student_dir).tokenizer("sw")("Mungu")[
        "input_ids"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"student/en/test/accuracy", "teacher/en/test/accuracy", "student/sw/test/accuracy"} <= set(metrics)
    # the teacher it trained beside and scored is the frozen task model: re-scored here on the same 40 test verses
    # (loaded as the stage loads it, with eager attention), `read` of them read as their part by the tilted head
    teacher = load_task_model(teacher_dir, "classification", attn_implementation="eager").eval()
    expected = score(scored, teacher, load_tokenizer(teacher_dir), "en", "test", 64)
    # read / 40 on the CPU, where the tilt was placed (a GPU's forward may read a verse next to it otherwise); a
    # teacher with another head reads none
    assert expected["n_examples"] == 40 and 0 < expected["accuracy"] < 1
    assert {k: metrics[f"teacher/en/test/{k}"] for k in expected} == expected


class _ScaledTeacher(torch.nn.Module):
    """A stand-in teacher whose state j is its embedding of each token scaled by SCALES[j]: each state has its own
    dominant directions, and the last state dwarfs the others."""
    SCALES = torch.tensor([[30.0, 30, 1, 1, 1, 1, 1, 1], [1, 1, 300, 300, 1, 1, 1, 1], [1, 1, 1, 1, 3000, 3000, 1, 1]])

    def __init__(self, seed: int):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=2, hidden_size=8)
        self.embed = torch.nn.Embedding(50, 8).requires_grad_(False)
        torch.nn.init.normal_(self.embed.weight, generator=torch.Generator().manual_seed(seed))
        self.base_model = self

    def forward(self, input_ids, attention_mask, output_hidden_states):
        e = self.embed(input_ids)
        return SimpleNamespace(hidden_states=tuple(e * scale for scale in self.SCALES))


def test_each_teacher_state_gets_the_top_singular_vectors_of_its_own_states(tmp_path):
    """Phase 1's projections (the reference's per-layer mappings): M[j] spans the top-d right singular vectors of
    teacher state j's unpadded token vectors from both teachers (numpy, by hand), not those of every state pooled;
    phase 2 reads the same file back and refuses an older run's single M."""
    rng = np.random.default_rng(0)
    teachers = {"en": _ScaledTeacher(0), "sw": _ScaledTeacher(1)}
    data = {lang: [{"input_ids": rng.integers(0, 50, 6), "attention_mask": np.array([1, 1, 1, 1, 0, 0])}
                   for _ in range(8)] for lang in teachers}
    m = fit_projections(teachers, data, tokens=10**6, d=2).double().numpy()

    def projector(v):  # onto the span of v's columns (singular vectors have a sign of their own)
        return v @ v.T

    states = [np.concatenate([teachers[lang].embed(torch.as_tensor(x["input_ids"][:4])).numpy() * scales.numpy()
                              for lang in teachers for x in data[lang]]) for scales in _ScaledTeacher.SCALES]
    assert m.shape == (3, 8, 2)
    for j, h in enumerate(states):
        _, _, vh = np.linalg.svd(h.astype(np.float64), full_matrices=False)
        np.testing.assert_allclose(projector(m[j]), projector(vh[:2].T), atol=1e-5)
    _, _, pooled = np.linalg.svd(np.concatenate(states).astype(np.float64), full_matrices=False)
    assert np.abs(projector(m[0]) - projector(pooled[:2].T)).max() > 0.5  # the pooled M is the loud last state's
    with pytest.raises(UserError, match="raise projection_tokens to at least 9"):  # 2 x 4 token states, d = 9
        fit_projections(teachers, data, tokens=2, d=9)

    path = tmp_path / "projection.safetensors"
    save_file({"M": torch.as_tensor(m).float()}, str(path))
    torch.testing.assert_close(load_projections(path, teachers["en"].config, 2), torch.as_tensor(m).float())
    save_file({"M": torch.as_tensor(m[0]).float()}, str(path))  # an older phase 1's one M for every state
    with pytest.raises(UserError, match=r"not one projection per teacher state .*rerun adapt/distill.py"):
        load_projections(path, teachers["en"].config, 2)
    with pytest.raises(UserError, match="does not exist: phase 1 writes its projections"):  # a student moved alone
        load_projections(tmp_path / "moved" / "projection.safetensors", teachers["en"].config, 2)


def _language_sft(root, lang: str, seed: int, method: str = "lt_sft"):
    """A hand-made language SFT of the teacher: 40 entries of its word embeddings and of every layer's query."""
    teacher = load_model(root / "teacher", AutoModelForMaskedLM)
    g = torch.Generator().manual_seed(seed)
    names = ["roberta.embeddings.word_embeddings.weight",
             *(f"roberta.encoder.layer.{i}.attention.self.query.weight" for i in range(4))]
    diffs = {}
    for name in names:
        shape = tuple(teacher.get_parameter(name).shape)
        indices = torch.randperm(int(np.prod(shape)), generator=g)[:40].sort().values
        diffs[name] = SparseDiff(shape, indices, torch.randn(40, generator=g))
    sft = SparseFineTuning(model_hash(root / "teacher"), diffs, info={"kind": "language", "method": method,
                                                                      "target_lang": lang})
    sft.save(root / "sfts" / method / lang)
    return root / "sfts" / method / lang, sft


def test_the_student_is_saved_at_the_fp32_values_bf16_training_left_a_bf16_module(world, tmp_path):
    """DeepSpeed's bf16 training casts the module in place: the trained values come from its fp32 masters and the
    frozen head from before training, and the student is saved in fp32, not rounded to bf16."""
    from minimodel.bistil.distill import VOCABULARY_FILE, _save_student
    from minimodel.bistil.student import StudentConfig, build_student
    from minimodel.config import load_config

    root, _ = world
    student = build_student(load_model(root / "teacher", AutoModelForMaskedLM), StudentConfig(layer_ratio=2))
    final = {name: p.detach().float() + 1e-3 * torch.randn_like(p, dtype=torch.float32)
             for name, p in student.named_parameters()}
    student.to(torch.bfloat16)
    (tmp_path / "vocabulary").mkdir()
    (tmp_path / "vocabulary" / VOCABULARY_FILE).write_text("{}")
    cfg = load_config(DistillConfig, overrides=[f"teacher_model={root / 'teacher'}", "target_langs=[sw]",
                                                f"target_teacher_model={root / 'plugged'}", "seq_length=32"])
    _save_student(student, final, tmp_path, {}, cfg, "sw")
    saved = load_file(tmp_path / "student" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    named = {id(p): name for name, p in student.named_parameters()}  # a tied tensor is saved under its other name
    for name, p in student.named_parameters(remove_duplicate=False):
        if name in saved:
            assert torch.equal(saved[name], final[named[id(p)]]), name


def test_a_student_depends_on_the_source_languages_data_too(world, tmp_path):
    """Phase 1 trains on both corpora: a student recorded the target's data only, so a rebuilt English corpus left
    it "already distilled" (and phase 2, zero-shot and the report read it)."""
    import shutil

    from minimodel import provenance
    from minimodel.bistil.distill import claim_student
    from minimodel.config import load_config

    root, data_dir = world
    data = shutil.copytree(data_dir, tmp_path / "data")
    cfg = load_config(DistillConfig, overrides=[f"output_dir={tmp_path / 'distill'}", f"data_dir={data}",
                                                f"teacher_model={root / 'teacher'}", "target_langs=[sw]",
                                                f"target_teacher_model={root / 'plugged'}", "seq_length=32"])
    run_dir, lang_cfg, claimed = claim_student(cfg, "sw")
    assert claimed == "new"
    provenance.finish_output(run_dir, lang_cfg, lang_cfg.neutral_keys())
    assert set(provenance.read(run_dir)["inputs"]["data_dir"]["parts"]) == {"en", "sw"}
    assert claim_student(cfg, "sw")[2] == "finished"
    whole = provenance.read(data)  # the data stage made English again: its part and the whole's list of parts
    provenance.write_part(data / "en", {**provenance.read(data / "en"), "digest": "rebuilt"})
    (data / provenance.RECORD).write_text(json.dumps({**whole, "parts": {**whole["parts"], "en": "rebuilt"}}))
    with pytest.raises(provenance.ConfigChanged, match="en"):
        claim_student(cfg, "sw")


def test_the_target_teacher_must_hold_the_target_languages_embeddings_in_this_primary(world, tmp_path):
    """plug.json names the language and the primary a plugged model was made for: Swahili's teacher distilling a
    Chichewa student, or embeddings plugged into another primary, were filed as that language's bistil student."""
    import shutil

    from minimodel.config import ConfigError, load_config
    from minimodel.adaptation.plug import PLUG_FILE

    root, _ = world
    plugged = shutil.copytree(root / "plugged", tmp_path / "plugged")
    record = {"method": "standard", "target_lang": "sw",
              "primary_model": {"path": str(root / "teacher"), "sha256": model_hash(root / "teacher")}}
    (plugged / PLUG_FILE).write_text(json.dumps(record))
    settings = [f"teacher_model={root / 'teacher'}", f"target_teacher_model={plugged}", "target_langs=[sw]",
                "seq_length=32"]
    assert load_config(DistillConfig, overrides=settings).target_teacher_model == str(plugged)
    with pytest.raises(ConfigError, match="holds the embeddings of sw, not of ny: run each target language"):
        load_config(DistillConfig, overrides=[*settings, "target_langs=[sw, ny]"])
    with pytest.raises(ConfigError, match="holds the embeddings of sw, not of ny$"):
        load_config(DistillConfig, overrides=[*settings, "target_langs=[ny]"])
    with pytest.raises(ConfigError, match=f"is {root / 'teacher'} with embeddings plugged in, not teacher_model"):
        load_config(DistillConfig, overrides=[*settings, f"teacher_model={plugged}"])


def test_phase_2s_teacher_must_be_fine_tuned_from_phase_1s_source_teacher(tmp_path):
    """Its token ids are read through phase 1's map of the source teacher's ids: a task model of another primary gave
    wrong ids silently (or an IndexError for a larger vocabulary)."""
    from minimodel.bistil.task import TaskDistillConfig
    from minimodel.config import ConfigError, load_config
    from minimodel.evaluation.models import TASK_FILE

    student, teacher = tmp_path / "student", tmp_path / "teacher"
    student.mkdir(), teacher.mkdir()
    (student / "vocabulary.json").write_text(json.dumps({"method": "bistil", "teacher_model": "/models/primary",
                                                         "teacher_sha256": "aaa"}))
    settings = [f"student={student}", f"teacher={teacher}", "task.data_dir=d"]
    with pytest.raises(ConfigError, match=f"student: {tmp_path} has no vocabulary.json: give phase 1's student"):
        load_config(TaskDistillConfig, overrides=[f"student={tmp_path}", f"teacher={teacher}", "task.data_dir=d"])
    for sha in ("aaa", "bbb"):
        (teacher / TASK_FILE).write_text(json.dumps({"primary_model": {"path": f"/models/{sha}", "sha256": sha}}))
        if sha == "aaa":
            assert load_config(TaskDistillConfig, overrides=settings).teacher == str(teacher)
        else:
            with pytest.raises(ConfigError, match="teacher: .* was fine-tuned from /models/bbb, not from phase 1's "
                                                  "source teacher /models/primary"):
                load_config(TaskDistillConfig, overrides=settings)


def test_bistil_at_lt_sft_distils_from_the_primary_with_each_languages_sft_and_starts_the_student_without(world):
    """bistil@lt_sft (the reference's teachers): the teacher of each language is the primary with lt_sft's SFT of
    that language applied (the source SFT on the English copy, the target's on the Swahili one); the student starts
    from the primary as it is. The settings are refused where they would file a run under the wrong method."""
    from minimodel.bistil.distill import load_teachers_and_student
    from minimodel.config import ConfigError, load_config

    root, _ = world
    (en_dir, en_sft), (sw_dir, sw_sft) = _language_sft(root, "en", 1), _language_sft(root, "sw", 2)
    settings = ["method=bistil@lt_sft", f"teacher_model={root / 'teacher'}", "target_langs=[sw]",
                f"teacher_sft={en_dir}", f"target_teacher_sft={sw_dir}", "student.layer_ratio=2",
                "student.init=teacher", "seq_length=32"]
    cfg = load_config(DistillConfig, overrides=settings)
    primary = load_model(root / "teacher", AutoModelForMaskedLM)
    vocab = {"rows": {"en": list(range(primary.config.vocab_size)), "sw": []}}
    teachers, student = load_teachers_and_student(cfg, {"en": cfg.teacher_model, "sw": cfg.teacher_model}, vocab)
    base = dict(primary.base_model.named_parameters(prefix="roberta"))
    for lang, sft in (("en", en_sft), ("sw", sw_sft)):  # the body, which the loss reads (the tied decoder moves too)
        for name, p in teachers[lang].base_model.named_parameters(prefix="roberta"):
            expected = base[name] + sft.diffs[name].dense() if name in sft.diffs else base[name]
            assert torch.equal(p, expected), (lang, name)
    assert torch.equal(student.get_input_embeddings().weight, primary.get_input_embeddings().weight)
    with pytest.raises(ConfigError, match="seq_length: 64 is longer than the positions of .* allow \\(38\\)"):
        load_config(DistillConfig, overrides=[*settings, "seq_length=64"])  # at load, before anything runs
    assert torch.equal(student.roberta.encoder.layer[0].attention.self.query.weight,
                       primary.roberta.encoder.layer[1].attention.self.query.weight)  # layer_ratio 2: layers 1, 3
    other_dir, _ = _language_sft(root, "sw", 3, method="lt_sft_vocab")
    for change, refusal in (
            (["target_teacher_sft=null"], "target_teacher_sft: is required by method bistil@lt_sft"),
            ([f"teacher_sft={sw_dir}"], f"teacher_sft: {sw_dir} is the language SFT of sw, not of en"),
            (["target_langs=[sw, ny]"], "the language SFT of sw, not of ny: run each target language with its own"),
            ([f"target_teacher_sft={other_dir}"], "was learned by method lt_sft_vocab, over another model"),
            ([f"target_teacher_sft={root / 'teacher'}"], "is not a language SFT"),
            ([f"target_teacher_model={root / 'plugged'}"], "drop target_teacher_model"),
            (["method=bistil"], "teacher_sft: language SFTs on the teachers are method bistil@lt_sft's"),
            (["method=bistil", "teacher_sft=null"], "target_teacher_sft: language SFTs on the teachers are"),
            ([f"teacher_model={root / 'plugged'}"], f"teacher_sft: {en_dir} was learned from .* not from teacher_model"),
            ([f"train.zero_config={REPO / 'configs/deepspeed/zero3.json'}"], "train.zero_config: .* is ZeRO stage 3")):
        with pytest.raises(ConfigError, match=refusal):
            load_config(DistillConfig, overrides=[*settings, *change])
    assert load_config(DistillConfig, overrides=[*settings, "target_langs=[sw, ny]", "target_lang=sw"])
