"""The sparse fine-tuning library in one process, against numpy, hand computation and the reference's semantics:
eligibility by module type, the global top-K (ties kept), the L1 gradient, the reference file layout, apply /
revert / compose. (Training inside DeepSpeed, under real launchers: tests/test_sft_train.py.)"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (BertConfig, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification, XLMRobertaConfig,
                          MegatronBertForMaskedLM, XLMRobertaForMaskedLM)

from minimodel.config import ConfigError
from minimodel.hf import initialised_at_load
from minimodel.manifest import model_hash
from minimodel.models.minijoint.config import ModelConfig
from minimodel.models.minijoint.hf_format import hf_config
from minimodel.sft.file import SFTError, SparseDiff, SparseFineTuning, compose, read_reference, write_reference
from minimodel.sft.select import partition_parameters, resolve_k, select_top_k
from minimodel.sft.train import GradientHooks, SFTConfig, check_loop_config, difference, l1_gradient
from minimodel.training.config import DeepSpeedLoopConfig, OptimizerConfig, ScheduleConfig

TINY = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def bert():
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(**TINY))


def xlmr():
    torch.manual_seed(0)
    return XLMRobertaForMaskedLM(XLMRobertaConfig(**TINY))


def minijoint_export():
    """The class and config the MiniJoint export writes (models/minijoint/hf_format.py): MegatronBert, whose
    LayerNorms are named `ln`."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, hidden_size=8, num_layers=2, num_attention_heads=2, ffn_hidden_size=16,
                      seq_length=16, mini_layers=1)
    return MegatronBertForMaskedLM(hf_config(cfg, 2, tie_word_embeddings=True))


def _expected_partition(model):
    """Independently: LayerNorm params by class, head = outside base_model; a tied weight by its name in the body."""
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    body = {id(p) for p in model.base_model.parameters()}
    body_names = {id(p): f"{model.base_model_prefix}.{n}" for n, p in model.base_model.named_parameters()}
    named = {body_names.get(id(p), n): p for n, p in model.named_parameters()}
    eligible = {n for n, p in named.items() if id(p) in body and id(p) not in norms}
    dense = {n for n, p in named.items() if id(p) not in body and id(p) not in norms}
    return eligible, dense, {n for n, p in named.items() if id(p) in norms}


@pytest.mark.parametrize("build", [bert, xlmr, minijoint_export])
def test_selection_is_numpy_top_k_over_all_eligible_deltas_with_ties_and_never_a_norm_or_head(build):
    model = build()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}  # every tied name
    part = partition_parameters(model)
    eligible, dense, norms = _expected_partition(model)
    assert set(part.eligible) == eligible and set(part.dense) == dense and set(part.frozen) == norms
    assert norms and dense  # the case has both kinds to exclude
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in norms)
    if build is minijoint_export:
        assert any(".ln." in n or n.endswith("ln.weight") for n in norms)  # caught by class, not by name

    # "training": every trainable entry moves; quarter-steps make many exact ties in |delta|
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in part.trainable.values():
            p.add_(torch.round(torch.randn(p.shape, generator=g) * 4) / 4)
    deltas = {n: p.detach() - theta0[n] for n, p in part.eligible.items()}
    k = resolve_k(None, 0.05, part.eligible_numel)
    masks = select_top_k(deltas, k)

    flat = np.concatenate([deltas[n].abs().numpy().ravel() for n in part.eligible])
    threshold = np.sort(flat)[-k]
    expected = flat >= threshold
    got = np.concatenate([masks[n].numpy().ravel() for n in part.eligible])
    np.testing.assert_array_equal(got, expected)
    assert got.sum() > k  # ties with the threshold are all kept
    assert set(masks) == eligible  # no norm, no head entry can be selected

    # a second iteration selects k more among the entries not selected yet (the threshold over those only)
    more = select_top_k(deltas, 10, masks)
    rest = np.where(expected, -1.0, flat)
    expected2 = expected | (rest >= np.sort(rest)[-10])
    np.testing.assert_array_equal(np.concatenate([more[n].numpy().ravel() for n in part.eligible]), expected2)


def test_norms_can_be_made_eligible_and_k_counts_are_checked():
    model = bert()
    part = partition_parameters(model, include_layer_norms=True)
    assert any("LayerNorm" in n for n in part.eligible) and not part.frozen
    assert resolve_k(7, 0.5, 100) == 7 and resolve_k(None, 0.25, 100) == 25
    with pytest.raises(ConfigError, match="must be in 1..100"):
        resolve_k(101, 0.5, 100)


def test_l1_gradient_is_lambda_sign_over_n_accumulated_over_micro_batches_and_masked():
    theta0 = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    p = nn.Parameter(torch.tensor([[1.5, -2.0, 0.25], [2.0, 0.1, -1.0]]))
    lam, n_params = 0.3, 40
    hooks = GradientHooks({"w": p}, {"w": theta0}, None, l1=lam, n_params=n_params, accumulation=2,
                          l1_names={"w"})
    for _ in range(2):  # two micro-batches whose task loss has zero gradient: only the L1 term is left
        (0.0 * p.sum() / 2).backward()
    expected = lam * np.sign(p.detach().numpy() - theta0.numpy()) / n_params
    np.testing.assert_allclose(p.grad.numpy(), expected, rtol=1e-6, atol=0)
    assert p.grad[0, 1] == 0 and p.grad[1, 2] == 0  # at theta0 the subgradient is 0

    # the reference's form: lambda * sum|theta - theta0| / N through autograd, same gradient
    ref = p.detach().clone().requires_grad_(True)
    (lam * (ref - theta0).abs().sum() / n_params).backward()
    np.testing.assert_allclose(p.grad.numpy(), ref.grad.numpy(), rtol=1e-6)
    hooks.remove()

    mask = torch.tensor([[True, False, True], [False, True, False]])
    p.grad = None
    hooks = GradientHooks({"w": p}, {"w": theta0}, {"w": mask}, l1=lam, n_params=n_params, l1_names={"w"})
    (p * torch.arange(6.0).view(2, 3)).sum().backward()
    task = np.arange(6.0).reshape(2, 3)
    np.testing.assert_allclose(p.grad.numpy(), np.where(mask.numpy(), task + expected, 0.0), rtol=1e-6)
    hooks.remove()


def test_l1_gradient_of_an_untouched_bf16_entry_is_zero():
    """DeepSpeed's bf16 module holds bf16(theta): an entry training never moved is bf16(theta0), no pull at all."""
    theta0 = torch.tensor([0.1, 1.0 / 3.0, -2.7, 5.0])  # most not representable in bf16
    untouched = theta0.to(torch.bfloat16)
    assert not torch.equal(untouched.float(), theta0)
    assert torch.equal(l1_gradient(untouched, theta0, 0.5), torch.zeros(4))
    moved = untouched.clone()
    moved[0] += 0.5
    assert torch.equal(l1_gradient(moved, theta0, 0.5), torch.tensor([0.5, 0.0, 0.0, 0.0]))

    # the hooks keep theta0 on the parameter's device in its dtype (half an fp32 copy's memory), same gradient
    p = nn.Parameter(moved.clone())
    hooks = GradientHooks({"w": p}, {"w": theta0}, None, l1=2.0, n_params=4, l1_names={"w"})
    (0.0 * p.sum()).backward()
    assert torch.equal(p.grad.float(), l1_gradient(moved, theta0, 0.5))
    assert hooks._on_device["theta0", "w"].dtype == torch.bfloat16
    hooks.remove()


def test_bf16_drops_the_l1_term_where_gradients_are_large_and_a_run_says_so():
    """The reference adds lambda / N to fp32 gradients; under bf16 (a GPU's precision: auto) the sum rounds it away
    wherever |g| is much larger, so an LT-SFT run there trains without L1 for those entries: measured here, and
    said by a warning naming the fp32 setting that keeps it."""
    from minimodel.sft.train import SFTConfig, bf16_caveats

    n, l1 = 278_000_000, 0.2  # XLM-R base, the language SFT's default L1
    term = torch.tensor(l1 / n)
    for g, kept in ((1e-4, False), (1e-5, False), (1e-8, True)):
        grad = torch.tensor(g, dtype=torch.bfloat16)
        assert ((grad + term.to(torch.bfloat16)) != grad).item() is kept, g
        assert (torch.tensor(g) + term != torch.tensor(g)).item()  # fp32 keeps it at each
    [caveat] = bf16_caveats(SFTConfig(full_l1=l1), "bf16", n)
    assert "7.2e-10 per entry" in caveat and "train.precision=fp32" in caveat
    assert bf16_caveats(SFTConfig(full_l1=l1), "fp32", n) == [] and bf16_caveats(SFTConfig(), "bf16", n) == []
    # a later iteration starts from the bf16 image of the one before: said too
    [later] = bf16_caveats(SFTConfig(iterations=2), "bf16", n)
    assert "sft.iterations=2" in later and "bf16 rounding" in later


def test_loop_settings_that_would_break_sparsity_are_refused():
    cfg = SFTConfig(full_steps=4, sparse_steps=4)
    ok = DeepSpeedLoopConfig(steps=4, schedule=ScheduleConfig(warmup_steps=2))
    check_loop_config(ok, cfg)
    with pytest.raises(ConfigError, match="weight_decay"):
        check_loop_config(DeepSpeedLoopConfig(optim=OptimizerConfig(weight_decay=0.01),
                                              schedule=ScheduleConfig(warmup_steps=2)), cfg)
    with pytest.raises(ConfigError, match="ZeRO stage 3"):
        check_loop_config(DeepSpeedLoopConfig(zero_config="configs/deepspeed/zero3.json",
                                              schedule=ScheduleConfig(warmup_steps=2)), cfg)
    with pytest.raises(ConfigError, match="warmup_steps"):
        check_loop_config(DeepSpeedLoopConfig(schedule=ScheduleConfig(warmup_steps=5)), cfg)
    stage0 = dict(zero_config="configs/deepspeed/zero0.json", schedule=ScheduleConfig(warmup_steps=2))
    check_loop_config(DeepSpeedLoopConfig(**stage0, precision="fp32"), cfg)
    with pytest.raises(ConfigError, match="ZeRO stage 0, whose bf16 optimizer keeps no fp32 copy"):
        check_loop_config(DeepSpeedLoopConfig(**stage0, precision="bf16"), cfg)


# -- files -----------------------------------------------------------------------------------------------------------
def test_reference_layout_round_trips_a_hand_written_3x4_example(tmp_path):
    # entries (0,1)=0.5, (2,1)=-1.25, (1,3)=2.0; column-major flat index = row + 3 * col: 3, 5, 10
    written = {"diffs": {"w": {"size": torch.Size([3, 4]), "index_steps": [np.int64(3), 2, 5],
                               "values": torch.tensor([0.5, -1.25, 2.0])}},
               "abs": {"head.bias": torch.tensor([1.0, 2.0])}}
    (tmp_path / "in").mkdir()
    torch.save(written, tmp_path / "in" / "pytorch_diff.bin")
    sft = read_reference(tmp_path / "in", base_sha256="abc")
    dense = torch.zeros(3, 4)
    dense[0, 1], dense[2, 1], dense[1, 3] = 0.5, -1.25, 2.0
    assert torch.equal(sft.diffs["w"].dense(), dense)
    assert sft.diffs["w"].indices.tolist() == [1, 7, 9]  # row-major, ascending
    assert torch.equal(sft.abs["head.bias"], torch.tensor([1.0, 2.0]))

    sft.save(tmp_path / "ours")
    back = SparseFineTuning.load(tmp_path / "ours")
    assert back.base_sha256 == "abc" and torch.equal(back.diffs["w"].dense(), dense)
    write_reference(back, tmp_path / "out")
    again = torch.load(tmp_path / "out" / "pytorch_diff.bin", weights_only=True)
    assert again["diffs"]["w"]["size"] == torch.Size([3, 4])
    assert again["diffs"]["w"]["index_steps"] == [3, 2, 5]
    assert torch.equal(again["diffs"]["w"]["values"], torch.tensor([0.5, -1.25, 2.0]))
    assert torch.equal(again["abs"]["head.bias"], written["abs"]["head.bias"])


def test_reference_files_saved_under_numpy_1_are_read(tmp_path):
    """numpy 1 pickles the reference's np.int64 index step as numpy.core.multiarray.scalar (numpy 2:
    numpy._core): every released composable-sft file was refused as an unsupported global."""
    import zipfile

    (tmp_path / "v2").mkdir()
    torch.save({"diffs": {"w": {"size": torch.Size([3, 4]), "index_steps": [np.int64(3), 2, 5],
                                "values": torch.tensor([0.5, -1.25, 2.0])}}, "abs": {}},
               tmp_path / "v2" / "pytorch_diff.bin")
    (tmp_path / "v1").mkdir()
    with zipfile.ZipFile(tmp_path / "v2" / "pytorch_diff.bin") as src, \
            zipfile.ZipFile(tmp_path / "v1" / "pytorch_diff.bin", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")  # as numpy 1 wrote it
            dst.writestr(item, data)
    assert read_reference(tmp_path / "v1", base_sha256="abc").diffs["w"].indices.tolist() == [1, 7, 9]


def _random_sft(part, theta0, masks, g, base_sha256):
    """Move the selected entries and the dense parameters as training would, return (trained values, SFT)."""
    final = {}
    for n, p in part.trainable.items():
        step = torch.randn(p.shape, generator=g) * 0.1
        final[n] = theta0[n] + (step * masks[n] if n in masks else step)
    return final, difference(part, theta0, final, masks, base_sha256, None)


def _max_ulp(a: torch.Tensor, b: torch.Tensor) -> None:
    np.testing.assert_array_max_ulp(a.detach().numpy(), b.detach().numpy(), maxulp=1)


def test_language_plus_task_sft_reproduces_the_trained_task_model_and_revert_restores_theta0(tmp_path):
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    BertForPreTraining(BertConfig(**TINY)).save_pretrained(base_dir)  # with the pooler the task model reads
    base_sha = model_hash(base_dir)
    g = torch.Generator().manual_seed(3)

    # language SFT: learned on the MLM model
    lm = BertForMaskedLM.from_pretrained(base_dir)
    lm_part = partition_parameters(lm)
    lm0 = {n: p.detach().clone() for n, p in lm_part.trainable.items()}
    lm_masks = select_top_k({n: torch.rand(p.shape, generator=g) for n, p in lm_part.eligible.items()}, 300)
    _, lang = _random_sft(lm_part, lm0, lm_masks, g, base_sha)
    lang.save(tmp_path / "lang")

    # task SFT: learned on the task model with the language SFT applied (without its MLM head)
    torch.manual_seed(5)
    task_model = BertForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    SparseFineTuning.load(tmp_path / "lang").apply(task_model, base_sha, with_abs=False)
    part = partition_parameters(task_model)
    start = {n: p.detach().clone() for n, p in part.trainable.items()}
    masks = select_top_k({n: torch.rand(p.shape, generator=g) for n, p in part.eligible.items()}, 300)
    trained, task = _random_sft(part, start, masks, g, base_sha)
    task.save(tmp_path / "task")
    assert "classifier.weight" in task.abs and not any(n.startswith("cls.") for n in task.diffs)

    # zero-shot: a fresh task model (another random head) + language SFT + task SFT
    torch.manual_seed(6)
    fresh = BertForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    theta0 = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    lang2, task2 = SparseFineTuning.load(tmp_path / "lang"), SparseFineTuning.load(tmp_path / "task")
    lang2.apply(fresh, base_sha, with_abs=False)
    task2.apply(fresh, base_sha)
    params = dict(fresh.named_parameters())
    for n, value in trained.items():
        _max_ulp(params[n], value)
    # revert: each addition rounded once, to within half a unit in the last place of the value it produced, and
    # that cannot be undone: theta0 comes back to within 1 ulp of the largest value the entry took (2 applies +
    # 2 reverts: 4 half-ulps)
    lang_applied = {n: theta0[n] + lang2.diffs[n].dense() if n in lang2.diffs else theta0[n] for n in theta0}
    both_applied = {n: p.detach().clone() for n, p in params.items()}
    task2.revert(fresh, base_sha)
    lang2.revert(fresh, base_sha)
    for n, p in fresh.named_parameters():
        if n in task.abs:  # the head keeps the task's values, as in the reference
            continue
        largest = np.maximum.reduce([theta0[n].abs().numpy(), lang_applied[n].abs().numpy(),
                                     both_applied[n].abs().numpy()])
        assert (np.abs(p.detach().numpy() - theta0[n].numpy()) <= 2 * np.spacing(largest)).all(), n

    # one composed SFT moves the same entries by the sum of both differences
    both = compose(lang2, task2)
    for n, d in both.diffs.items():
        expected = lang2.diffs[n].dense() + task2.diffs[n].dense() if n in lang2.diffs else task2.diffs[n].dense()
        torch.testing.assert_close(d.dense(), expected, rtol=0, atol=1e-7)


def test_an_sft_refuses_a_model_it_was_not_learned_from(tmp_path):
    bert().save_pretrained(tmp_path / "a")
    other = bert()
    with torch.no_grad():
        other.bert.embeddings.word_embeddings.weight[0, 0] += 1
    other.save_pretrained(tmp_path / "b")
    sha_a, sha_b = model_hash(tmp_path / "a"), model_hash(tmp_path / "b")
    sft = SparseFineTuning(sha_a, {"bert.embeddings.word_embeddings.weight": SparseDiff(
        (40, 8), torch.tensor([0, 5]), torch.tensor([1.0, 2.0]))})
    model = BertForMaskedLM.from_pretrained(tmp_path / "b")
    with pytest.raises(SFTError) as e:
        sft.apply(model, sha_b)
    assert sha_a in str(e.value) and sha_b in str(e.value)
    with pytest.raises(SFTError, match="different base models"):
        compose(sft, SparseFineTuning(sha_b))
    # a dense part of another shape (a task head of another label count) is refused before the model changes
    head = {"cls.predictions.bias": torch.zeros(7)}
    before = model.bert.embeddings.word_embeddings.weight.clone()
    with pytest.raises(SFTError, match=r"cls.predictions.bias: the SFT's dense part is \(7,\), the model's \(40,\)"):
        SparseFineTuning(sha_b, sft.diffs, head).apply(model, sha_b)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, before)


def test_a_language_sft_applies_to_a_masked_lm_with_tied_embeddings_under_either_name():
    """A language SFT is learned with the decoder untied, so it names the input embeddings; a masked LM loaded with
    them tied lists that tensor under one name only (transformers 5: the decoder's). Either name reaches the tensor;
    an SFT naming both names of one tied tensor (a reference SFT learned untied, decoder trained) is refused rather
    than added twice."""
    model = xlmr()
    assert model.lm_head.decoder.weight is model.roberta.embeddings.word_embeddings.weight
    before = model.roberta.embeddings.word_embeddings.weight.detach().clone()
    diff = SparseDiff((40, 8), torch.tensor([3, 17]), torch.tensor([1.0, -2.0]))
    SparseFineTuning("x", {"roberta.embeddings.word_embeddings.weight": diff}).apply(model, "x", with_abs=False)
    assert torch.equal(model.roberta.embeddings.word_embeddings.weight, before + diff.dense())
    both = {"roberta.embeddings.word_embeddings.weight": diff, "lm_head.decoder.weight": diff}
    with pytest.raises(SFTError, match="changes both roberta.embeddings.word_embeddings.weight and "
                                       "lm_head.decoder.weight, which are one tied tensor"):
        SparseFineTuning("x", both).apply(model, "x", with_abs=False)


def test_layer_norms_saved_under_their_old_names_are_not_taken_for_new_parameters(tmp_path):
    """bert-base-uncased's file names its LayerNorms gamma/beta, which transformers renames when it loads them."""
    from safetensors.torch import load_file, save_file

    base_dir = tmp_path / "mlm"
    bert().save_pretrained(base_dir)
    weights = load_file(base_dir / "model.safetensors")
    renamed = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
               for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    save_file(renamed, base_dir / "model.safetensors", metadata={"format": "pt"})
    task_model = BertForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    assert initialised_at_load(task_model, base_dir) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                                         "classifier.weight", "classifier.bias"}


def test_parameters_a_task_model_initialises_at_load_are_dense_so_the_composed_model_is_the_trained_one(tmp_path):
    """A masked-LM checkpoint has no pooler: BERT's classification model draws one at load, as it does the
    classifier. An SFT of such a parameter as a sparse difference would be added to ANOTHER random draw when the
    task model is composed again (zero-shot); stored whole, the composed model is the trained one, whatever the
    draw."""
    base_dir = tmp_path / "mlm"
    bert().save_pretrained(base_dir)
    base_sha = model_hash(base_dir)
    torch.manual_seed(1)
    task_model = BertForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    new = initialised_at_load(task_model, base_dir)
    assert new == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    part = partition_parameters(task_model, new=new)
    assert set(part.dense) == new and not new & set(part.eligible) and "bert.encoder.layer.0.output.dense.weight" \
        in part.eligible
    g = torch.Generator().manual_seed(2)
    start = {n: p.detach().clone() for n, p in part.trainable.items()}
    masks = select_top_k({n: torch.rand(p.shape, generator=g) for n, p in part.eligible.items()}, 200)
    trained, sft = _random_sft(part, start, masks, g, base_sha)
    torch.manual_seed(7)  # another draw of the pooler and classifier
    fresh = BertForSequenceClassification.from_pretrained(base_dir, num_labels=3)
    assert not torch.equal(fresh.bert.pooler.dense.weight, trained["bert.pooler.dense.weight"])
    sft.apply(fresh, base_sha)
    params = dict(fresh.named_parameters())
    for n, value in trained.items():
        _max_ulp(params[n], value)


@pytest.mark.parametrize("build", [bert, xlmr])
def test_a_language_sft_of_tied_embeddings_saved_under_one_name_reaches_the_task_model(build, tmp_path):
    """XLM-R saved as safetensors holds its tied embeddings under the input embeddings' name while transformers lists
    the tied matrix as lm_head.decoder.weight: it counted as initialised at load, was stored whole, and a language
    SFT applied to a task model (no head: with_abs=False) dropped every embedding change. A tied weight is loaded if
    any of its names is in the file, and the SFT names it as the body does."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    base_dir = tmp_path / "mlm"
    build().save_pretrained(base_dir)  # safetensors
    base_sha, mlm = model_hash(base_dir), AutoModelForMaskedLM.from_pretrained(base_dir)
    part = partition_parameters(mlm, new=initialised_at_load(mlm, base_dir))
    embeddings = f"{mlm.base_model_prefix}.embeddings.word_embeddings.weight"
    assert embeddings in part.eligible and not [n for n in part.dense if "embeddings" in n or "decoder.weight" in n]
    g = torch.Generator().manual_seed(2)
    start = {n: p.detach().clone() for n, p in part.trainable.items()}
    masks = select_top_k({n: torch.rand(p.shape, generator=g) for n, p in part.eligible.items()}, 200)
    trained, sft = _random_sft(part, start, masks, g, base_sha)
    task = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    before = task.get_input_embeddings().weight.detach().clone()
    sft.apply(task, base_sha, with_abs=False)
    changed = task.get_input_embeddings().weight != before
    assert changed.any() and torch.equal(changed, masks[embeddings].bool())


def test_the_selection_and_the_sft_measure_what_bf16_training_changed():
    """Under bf16 the fp32 masters start at bf16(theta0): measured from the fp32 theta0, entries that never moved
    carry their rounding (up to 2^-9 |w|), which outranked a task SFT's small real changes."""
    from minimodel.sft.select import partition_parameters, select_top_k
    from minimodel.sft.train import difference, learned_change, trained_from

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.base_model = torch.nn.Linear(64, 64)
    model.head = torch.nn.Linear(64, 2)
    part = partition_parameters(model)
    theta0 = {n: p.detach().float().clone() for n, p in part.trainable.items()}
    model.to(torch.bfloat16)  # what DeepSpeed's bf16 engine does to the module
    final = {n: t.bfloat16().float() for n, t in theta0.items()}  # the masters, started from the cast
    final["base_model.weight"].view(-1)[[5, 77]] += 1e-4  # the two values training moved
    masks = select_top_k(learned_change(part, theta0, final), 2)
    assert masks["base_model.weight"].view(-1).nonzero().flatten().tolist() == [5, 77]
    sft = difference(part, trained_from(part, theta0), final, masks, "sha", None)
    torch.testing.assert_close(sft.diffs["base_model.weight"].values, torch.full((2,), 1e-4), rtol=1e-3, atol=0)


def test_a_diverged_phase_is_refused_not_selected_from():
    """NaN changes (a diverged full phase): kthvalue ranked them largest, the threshold came out NaN and nothing was
    selected, and the stage finished as an SFT without body differences."""
    from minimodel.sft.select import select_top_k

    with pytest.raises(FloatingPointError, match="2 of the parameter changes are not finite"):
        select_top_k({"w": torch.tensor([0.1, float("nan"), 0.3, float("nan")])}, 1)


def test_only_a_language_sft_of_the_language_read_is_composed_as_one():
    """finetune's language_sft and zero-shot's targets[].language_sft: a task SFT (no language) or another
    language's SFT passed the base-hash check and composed silently."""
    from minimodel.sft.file import SFTError, SparseFineTuning

    SparseFineTuning("sha", info={"kind": "language", "target_lang": "sw"}).check_language("sw", "d")
    with pytest.raises(SFTError, match="d is a task SFT, not a language SFT: give adapt/sft.py's <output_dir>/sw/sft"):
        SparseFineTuning("sha", info={"kind": "task"}).check_language("sw", "d")
    with pytest.raises(SFTError, match="d is the language SFT of en, not of sw"):
        SparseFineTuning("sha", info={"kind": "language", "target_lang": "en"}).check_language("sw", "d")


def test_the_loop_settings_sft_needs_are_checked_when_the_config_loads():
    """Weight decay, a warmup longer than a phase, ZeRO-3: refused at config load (exit 2 naming the key), not after
    the data was prepared and the model loaded (for a language SFT: one more "failed" language, exit 1)."""
    from minimodel.bistil.task import TaskDistillConfig
    from minimodel.config import load_config
    from minimodel.evaluation.finetune import FinetuneConfig
    from minimodel.sft.language import LanguageSFTConfig

    for cls, settings in ((LanguageSFTConfig, ["primary_model=x"]),
                          (FinetuneConfig, ["model_dir=x", "sparse=true", "task.data_dir=d"]),
                          (TaskDistillConfig, ["task.data_dir=d"])):  # BiStil's phase 2: its student's task SFT
        with pytest.raises(ConfigError, match="train.optim.weight_decay: 0.01: sparse fine-tuning needs 0"):
            load_config(cls, overrides=[*settings, "train.optim.weight_decay=0.01"])
    load_config(FinetuneConfig, overrides=["model_dir=x", "task.data_dir=d", "train.optim.weight_decay=0.01"])


def test_when_fewer_values_moved_than_k_only_those_are_selected():
    """A threshold of 0 (fewer than K values changed in the full phase) selected every free value by the tie rule:
    a 'sparse' file larger than the dense model, of exact zeros."""
    from minimodel.sft.select import select_top_k

    masks = select_top_k({"w": torch.tensor([0.0, 0.5, 0.0, -0.2, 0.0, 0.0])}, 4)
    assert masks["w"].tolist() == [False, True, False, True, False, False]


ROOT = Path(__file__).resolve().parents[1]

# Both phases of one iteration in one process (a world of one), logging to a tracker that records each row
PHASES_LOGGED = """
import dataclasses, json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from sft_helpers import BASE_SHA, SFT, loop_config, tiny_data, tiny_model
from minimodel.sft.file import read_sft_info
from minimodel.sft.train import train_sft
from minimodel.training.hf_mlm import masked_lm_loss

class Recorded:
    rows = []
    def log_metrics(self, metrics, step):
        self.rows.append([step, metrics["compute/flops"], metrics["compute/wall_clock_s"]])
    def flush(self):
        pass

out = Path(sys.argv[1])
train_sft(dataclasses.replace(SFT, full_steps=3, sparse_steps=3), loop_config(0), tiny_model(), tiny_data(),
          masked_lm_loss, lambda batch: 10.0, output_dir=out, base_sha256=BASE_SHA, tracker=Recorded())
json.dump({"rows": Recorded.rows, "info": read_sft_info(out / "sft")}, open(out / "logged.json", "w"))
"""


def test_an_sfts_mlflow_compute_counts_on_across_its_phases(tmp_path):
    """Each phase is a fresh loop whose cumulative compute starts at 0: the run's compute/flops in MLflow fell back at
    phase 2 and ended at phase 2's alone, half of what the SFT (and the report) counts."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **({} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    run = subprocess.run([sys.executable, "-c", PHASES_LOGGED, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    logged = json.loads((tmp_path / "logged.json").read_text())
    steps, flops, seconds = zip(*logged["rows"])
    assert steps == (1, 2, 3, 4, 5, 6) and flops == tuple(flops[0] * step for step in steps)  # same work per step
    assert list(seconds) == sorted(seconds)
    assert flops[-1] == logged["info"]["flops"] and seconds[-1] == pytest.approx(logged["info"]["wall_clock_s"])


# One iteration over a tiny XLM-R whose decoder is tied to its input embeddings (a language SFT with
# freeze_decoder=false); argv: output dir, then "rename" to make the saved mask an earlier version's and resume
TIED_RESUMED = """
import dataclasses, json, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from transformers import XLMRobertaConfig, XLMRobertaForMaskedLM
sys.path.insert(0, "tests")
from sft_helpers import BASE_SHA, SFT, loop_config, tiny_data
from minimodel.sft.file import SparseFineTuning
from minimodel.sft.train import train_sft
from minimodel.training.hf_mlm import masked_lm_loss

out = Path(sys.argv[1])
if sys.argv[2] == "rename":  # phase 1 done by an earlier version: its mask names the tied matrix as it was listed
    mask = out / "iteration_1" / "mask.safetensors"
    tensors = load_file(str(mask))
    tensors["lm_head.decoder.weight"] = tensors.pop("roberta.embeddings.word_embeddings.weight")
    save_file(tensors, str(mask))
    shutil.rmtree(out / "sft")
    shutil.rmtree(out / "iteration_1" / "sparse")
torch.manual_seed(0)
model = XLMRobertaForMaskedLM(XLMRobertaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=32, max_position_embeddings=18,
                                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
train_sft(dataclasses.replace(SFT, full_steps=3, sparse_steps=3), loop_config(0), model, tiny_data(),
          masked_lm_loss, lambda batch: 10.0, output_dir=out, base_sha256=BASE_SHA)
sft = SparseFineTuning.load(out / "sft")
json.dump({n: d.indices.tolist() for n, d in sft.diffs.items()}, open(out / f"diffs-{sys.argv[2]}.json", "w"))
"""


def test_an_sft_resumes_from_a_mask_an_earlier_version_saved_under_a_tied_weights_other_name(tmp_path):
    """The SFT now names a tied weight as the body does (roberta.embeddings...); a mask saved before, under the
    name transformers lists first (lm_head.decoder.weight), left the embeddings unmasked in phase 2 and the save
    raised KeyError."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **({} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    for step in ("first", "rename"):
        run = subprocess.run([sys.executable, "-c", TIED_RESUMED, str(tmp_path), step], env=env, capture_output=True,
                             text=True, timeout=600, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
    first, resumed = (json.loads((tmp_path / f"diffs-{step}.json").read_text()) for step in ("first", "rename"))
    assert resumed == first and "roberta.embeddings.word_embeddings.weight" in first
