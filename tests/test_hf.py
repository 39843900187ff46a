"""minimodel.hf: every Hugging Face model and tokenizer is loaded there, and a directory that is not what it should
be gives one clear user error (exit 2 at an entry point, no traceback) instead of a transformers traceback."""
from __future__ import annotations

import time

import pytest
import torch
from transformers import (AutoConfig, AutoModelForMaskedLM, AutoModelForSequenceClassification, GPT2Config, GPT2Model,
                          MegatronBertConfig, MegatronBertForMaskedLM)

from minimodel.data.tokenizer import train_tokenizer
from minimodel.errors import UserError
from minimodel.hf import HFLoadError, load_model, load_tokenizer
from minimodel.training.hf_mlm import (UnsupportedModelError, check_architecture, check_model_config,
                                       masked_lm_logits, max_sequence_length)
from minipost_helpers import make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    config = MegatronBertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16)
    MegatronBertForMaskedLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def test_loads_in_fp32_as_asked_or_as_the_config_names(model_dir):
    model = load_model(model_dir)
    assert type(model).__name__ == "MegatronBertForMaskedLM"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    task = load_model(model_dir, AutoModelForSequenceClassification, num_labels=3)
    assert task.config.num_labels == 3
    model, info = load_model(model_dir, AutoModelForMaskedLM, output_loading_info=True)
    assert not info["missing_keys"]


def test_a_new_task_head_is_named_in_one_line_and_a_missing_body_weight_is_refused(model_dir, tmp_path, caplog):
    """A task model over a masked-LM checkpoint gets a new head (and BERT's pooler): one log line names them, in
    place of transformers' table. A checkpoint lacking a weight of the body (transformers would leave it random) is
    refused, naming it."""
    import logging

    from safetensors.torch import load_file, save_file

    with caplog.at_level(logging.INFO):
        load_model(model_dir, AutoModelForSequenceClassification, num_labels=3)
    assert "LOAD REPORT" not in caplog.text
    new = next(r.getMessage() for r in caplog.records if r.name == "minimodel.hf")
    assert new.startswith("MegatronBertForSequenceClassification from ") and \
        "bert.pooler.dense.bias, bert.pooler.dense.weight, classifier.bias, classifier.weight new" in new, new
    assert "saved weights unused (e.g. cls.predictions" in new

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    del weights["bert.encoder.layer.0.attention.self.query.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    for auto_class in (AutoModelForMaskedLM, AutoModelForSequenceClassification):
        with pytest.raises(HFLoadError, match=r"lacks weights of the MegatronBert\w+ body \(bert\.encoder\.layer\.0\."
                                              r"attention\.self\.query\.weight: 1 in all\)"):
            load_model(broken, auto_class)


def test_loading_prints_no_tensor_parallel_plan_check(model_dir):
    """Raising transformers' load-report logger to ERROR (to silence its table) switches on its tensor-parallel plan
    check, which printed every layer of every model a stage loaded as "not sharded"; nothing here loads with one.
    (A process of its own: pytest's capture holds transformers' handler's stream.)"""
    import subprocess
    import sys

    code = ("import sys; from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification; "
            "from minimodel.hf import load_model; load_model(sys.argv[1], AutoModelForMaskedLM); "
            "load_model(sys.argv[1], AutoModelForSequenceClassification, num_labels=3)")
    run = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "not sharded" not in run.stderr and "TP rules" not in run.stderr, run.stderr


def test_tokenizer_round_trip(tmp_path):
    out = train_tokenizer([f"word{i} other{i % 7} text" for i in range(300)], tmp_path / "tok", 40)
    assert len(load_tokenizer(out)) == 40


@pytest.mark.parametrize("case,message", [
    ("missing", r"not a Hugging Face model directory \(does not exist\): give a directory written by"),
    ("empty", r"not a Hugging Face model directory \(has no config.json\)"),
    ("no_weights", r"cannot load the model in .*no_weights"),
    ("no_mlm_class", r"cannot load .*gpt2 as AutoModelForMaskedLM \(model type 'gpt2'\)"),
])
def test_model_dir_errors(tmp_path, case, message):
    path = tmp_path / case
    if case == "empty":
        path.mkdir()
    elif case == "no_weights":
        MegatronBertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(path)
    elif case == "no_mlm_class":
        path = tmp_path / "gpt2"
        GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(path)
    with pytest.raises(HFLoadError, match=message) as raised:
        load_model(path, AutoModelForMaskedLM)
    assert isinstance(raised.value, UserError)


def test_tokenizer_dir_errors(tmp_path, model_dir):
    with pytest.raises(HFLoadError, match=r"not a tokenizer directory \(does not exist\)"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(HFLoadError, match=r"not a tokenizer directory \(has no tokenizer_config.json or "
                                          r"tokenizer.json\): give <data output_dir>/<lang>/tokenizer"):
        load_tokenizer(model_dir)  # a model saved without its tokenizer


def test_model_hash_covers_the_weights_transformers_loads_only(tmp_path):
    """A trainer's training_args.bin, or the pytorch_model.bin a hub download holds beside model.safetensors, is
    not the model: adding or deleting one refused every mini-model and SFT made from the directory."""
    from minimodel.manifest import model_hash

    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    before = model_hash(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"the same weights, pickled")
    (tmp_path / "training_args.bin").write_bytes(b"args")
    assert model_hash(tmp_path) == before
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert model_hash(tmp_path) != before
    (tmp_path / "model.safetensors").unlink()  # .bin weights alone: they are the model, the trainer's args are not
    bin_only = model_hash(tmp_path)
    (tmp_path / "training_args.bin").write_bytes(b"other args")
    assert model_hash(tmp_path) == bin_only
    (tmp_path / "pytorch_model.bin").write_bytes(b"other weights, pickled")
    assert model_hash(tmp_path) != bin_only


def test_model_hash_reads_settled_weights_once_per_process(tmp_path, monkeypatch):
    """BiStil x LT-SFT checks its primary's hash four times per rank (each SFT's base, each teacher): a large model's
    bytes are read once; weights that changed (in place, replaced, or written moments ago) are read again."""
    import hashlib
    import os

    from minimodel import manifest

    reads, sha256 = [], hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda: reads.append(1) or sha256())
    # "moments ago": within 10 minutes here (2 s in the code), so that a stalled test process reads the same
    monkeypatch.setattr(manifest, "_SETTLED_NS", 600 * 10**9)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights A")
    hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(weights, ns=(hour_ago, hour_ago))
    first = manifest.model_hash(tmp_path)
    assert manifest.model_hash(tmp_path) == first and len(reads) == 1
    weights.write_bytes(b"weights B")  # in place, same size: a new mtime, too new to be remembered
    second = manifest.model_hash(tmp_path)
    assert second != first and manifest.model_hash(tmp_path) == second and len(reads) == 3
    (tmp_path / "new").write_bytes(b"weights A")  # replaced by rename (a new inode), with the first's old mtime
    os.utime(tmp_path / "new", ns=(hour_ago, hour_ago))
    (tmp_path / "new").replace(weights)
    assert manifest.model_hash(tmp_path) == first and len(reads) == 4


# -- which masked LMs the masked-LM code reads right ----------------------------------------------------------------
SMALL = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.mark.parametrize("kind", ["xlmr", "xlmr-xl", "roberta", "bert", "megatron", "camembert", "deberta-v2",
                                  "mpnet"])
def test_supported_families_pass_the_architecture_check_and_take_their_longest_input(kind):
    model = make_model(kind)
    check_architecture(model, kind)
    check_model_config(model.config, kind)
    longest = max_sequence_length(model)
    model(input_ids=torch.full((1, longest), 5))  # RoBERTa-style positions start at pad + 1: two rows fewer
    if kind != "deberta-v2":  # relative positions only: any length
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, longest + 1), 5))


@pytest.mark.parametrize("family, sizes, why", [
    ("electra", {"embedding_size": 32}, "its logits are not its LM head applied to the top hidden states"),
    ("electra", {"embedding_size": 16}, "its LM head does not take the top hidden states"),
    ("distilbert", dict(vocab_size=120, dim=32, n_layers=2, n_heads=2, hidden_dim=64), "layers are not at"),
    ("albert", {"embedding_size": 32}, "layers are not at base_model.encoder.layer"),
    ("xlm", dict(vocab_size=120, emb_dim=32, n_layers=2, n_heads=2), "layers are not at base_model.encoder.layer"),
    ("rembert", {"input_embedding_size": 16, "output_embedding_size": 24}, "output embeddings are not of its input"),
])
def test_families_the_masked_lm_code_would_read_wrong_are_refused_by_name(family, sizes, why):
    config = AutoConfig.for_model(family, **(sizes if "vocab_size" in sizes else {**SMALL, **sizes}))
    with pytest.raises(UnsupportedModelError, match=rf"models/x: \w+ is not supported \(.*{why}.*; supported are BERT"):
        check_model_config(config, "models/x")


@pytest.mark.parametrize("family, sizes, why", [
    # MobileBERT and FNet pass the layout checks, then crash in adaptation (resize_token_embeddings) or have their
    # FLOPs miscounted; Funnel and ESM crashed the check itself (a traceback where a config error belonged)
    ("mobilebert", dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, embedding_size=16, intra_bottleneck_size=32),
     "model type 'mobilebert': not one this code is tested on"),
    ("fnet", dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, intermediate_size=64),
     "model type 'fnet': not one this code is tested on"),
    ("funnel", dict(vocab_size=120, d_model=32, n_head=2, d_head=16, d_inner=64, block_sizes=[1, 1]),
     "no masked LM of one layer can be built from it: NotImplementedError"),
])
def test_families_of_the_right_layout_but_untested_are_refused_by_name(family, sizes, why):
    config = AutoConfig.for_model(family, **sizes)
    with pytest.raises(UnsupportedModelError, match=rf"models/x: \w+ is not supported \(.*{why}.*; supported are BERT"):
        check_model_config(config, "models/x")


def test_electras_masked_lm_logits_are_not_its_logits_which_is_why_it_is_refused():
    """ELECTRA's head transform is a child of its own: the masked-LM code would train and score the bare decoder."""
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model("electra", embedding_size=32, **SMALL)).eval()
    ids = torch.arange(4, 12)[None]
    batch = {"input_ids": ids, "labels": ids}
    _, ours = masked_lm_logits(model, batch)
    assert not torch.allclose(ours, model(input_ids=ids).logits[0], atol=1e-3)


@pytest.mark.parametrize("padding, fits", [(0, True), (99, True), (1024, True), (1025, False), (-1, False)])
def test_one_rule_says_how_many_more_embeddings_than_tokens_a_model_may_have(padding, fits, tmp_path):
    """DeBERTa-v3 has 128100 rows for 128001 tokens: the pipeline and MiniPost took it (up to 1024 rows of padding),
    then fine-tuning and zero-shot refused its own tokenizer (padding to a power-of-two multiple only)."""
    from ofa_helpers import wordpiece
    from transformers import BertConfig, BertForMaskedLM

    from minimodel.evaluation.models import TokenizerMismatchError, check_tokenizer as evaluation_check
    from minimodel.minipost.build import MiniPostError, check_tokenizer as minipost_check

    tokenizer = wordpiece([f"w{i}" for i in range(95)])  # 100 tokens
    model = BertForMaskedLM(BertConfig(vocab_size=100 + padding, hidden_size=8, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=16))
    model_dir = tmp_path / "model"  # carries no tokenizer: only the sizes are checked
    model_dir.mkdir()
    for check, error in ((lambda: evaluation_check(model, tokenizer, model_dir, tmp_path / "tok"),
                          TokenizerMismatchError),
                         (lambda: minipost_check(tokenizer, model.config, "models/x"), MiniPostError)):
        if fits:
            check()
        else:
            with pytest.raises(error, match="100 tokens but"):
                check()
