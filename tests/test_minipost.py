"""MiniPost (paper step 1b): building the mini-model from a pretrained masked LM, freezing, checks, alignment."""
from __future__ import annotations

import copy

import pytest
import torch

from minimodel.minipost.alignment import alignment_report, linear_cka, mean_cosine
from minimodel.minipost.build import (MiniPostError, build_mini_model, changed_frozen_parameters, layers_name,
                                      load_source_model, resolve_source, split_parameters)
from minimodel.training.hf_mlm import DistilledMLMLoss, masked_lm_loss
from minipost_helpers import make_model, save_model

KINDS = ["xlmr", "xlmr-xl", "roberta", "bert", "megatron", "camembert", "deberta-v2", "mpnet"]


def _batch(vocab=120, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", KINDS)
def test_full_depth_mini_model_reproduces_source(kind):
    # k frozen + (L - k) new layers initialised from the source, head from the source == the source itself:
    # every weight (norms, the pre-LN top norm, tied decoder, biases) is copied to the right place.
    source = make_model(kind)
    mini, new = build_mini_model(source, layers=1, new_layers=3)
    batch = _batch()
    torch.testing.assert_close(mini(**batch).logits, source(**batch).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_freezing_split(kind):
    source = make_model(kind)
    mini, new = build_mini_model(source, layers=2, new_layers=1)
    assert mini.config.num_hidden_layers == 3 and type(mini) is type(source)
    stack = layers_name(mini)
    trainable = {n for n, p in mini.named_parameters() if p.requires_grad}
    assert trainable == set(new)
    assert {n for n in new if n.startswith(stack)} == {f"{stack}.2.{n}" for n, _ in
                                                       mini.get_submodule(stack)[2].named_parameters()}
    # The tied decoder weight is the frozen input embedding; the head's own parameters are new.
    assert mini.get_output_embeddings().weight is mini.get_input_embeddings().weight
    assert not mini.get_input_embeddings().weight.requires_grad
    head = [n for n in new if not n.startswith(mini.base_model_prefix + ".")]
    assert head and all("decoder.weight" not in n for n in new)
    if kind in ("megatron", "xlmr-xl"):  # pre-LN: the encoder's final norm sits on top of the new layer
        final_norm = {"megatron": "encoder.ln.weight", "xlmr-xl": "encoder.LayerNorm.weight"}[kind]
        assert f"{mini.base_model_prefix}.{final_norm}" in new
    # The frozen bottom computes exactly what the source's first k layers compute.
    batch = _batch()
    ours = mini(**batch, output_hidden_states=True).hidden_states[2]
    theirs = source(**batch, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # Only the new parameters receive gradients.
    mini.train()
    logits = mini(**batch).logits
    logits.logsumexp(-1).mean().backward()
    grads = {n for n, p in mini.named_parameters() if p.grad is not None}
    assert grads == set(new)


@pytest.mark.parametrize("kind", KINDS)
def test_whatever_the_new_parameters_become_the_frozen_bottom_computes_what_the_sources_does(kind):
    """Nothing the first k layers read is trained: DeBERTa's relative-position table and its norm, MPNet's attention
    bias sit outside the layers (they were new, so training moved the frozen layers' outputs away from the
    source's, and the mini-model out of alignment with the primary the embeddings are plugged into)."""
    source = make_model(kind)
    mini, new = build_mini_model(source, layers=2, new_layers=1)
    params = dict(mini.named_parameters())
    with torch.no_grad():
        for name in new:
            params[name].add_(torch.randn_like(params[name]))
    batch = _batch()
    ours = mini(**batch, output_hidden_states=True).hidden_states[2]
    theirs = source(**batch, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_random_init_options():
    source = make_model("xlmr")
    mini, _ = build_mini_model(source, layers=2, new_layers=1, new_layer_init="random", head_init="random")
    src, ours = source.state_dict(), mini.state_dict()
    assert not torch.equal(ours["roberta.encoder.layer.2.attention.self.query.weight"],
                           src["roberta.encoder.layer.2.attention.self.query.weight"])
    assert not torch.equal(ours["lm_head.dense.weight"], src["lm_head.dense.weight"])
    assert torch.equal(ours["roberta.encoder.layer.1.output.dense.weight"],
                       src["roberta.encoder.layer.1.output.dense.weight"])
    assert torch.equal(ours["lm_head.decoder.weight"], src["roberta.embeddings.word_embeddings.weight"])
    # New layers beyond the source's depth are allowed when initialised at random.
    deep, new = build_mini_model(source, layers=3, new_layers=2, new_layer_init="random")
    assert deep.config.num_hidden_layers == 5


@pytest.mark.parametrize("layers,new_layers,message", [
    (4, 1, "between 1 and 3"), (0, 1, "between 1 and 3"), (3, 2, "new_layer_init=random")])
def test_bad_depth(layers, new_layers, message):
    with pytest.raises(MiniPostError, match=message):
        build_mini_model(make_model("xlmr"), layers=layers, new_layers=new_layers)


def test_source_without_mlm_head(tmp_path):
    save_model(make_model("xlmr", with_head=False), tmp_path / "bare")
    with pytest.raises(MiniPostError, match="no masked-LM head.*head_init=random"):
        load_source_model(tmp_path / "bare")
    with pytest.raises(MiniPostError, match="no predictions to distill: set distill.weight=0"):
        load_source_model(tmp_path / "bare", head_init="random", distill=True)
    model = load_source_model(tmp_path / "bare", head_init="random")
    mini, new = build_mini_model(model, layers=2, head_init="random")
    assert "lm_head.dense.weight" in new


def test_resolve_source(tmp_path):
    save_model(make_model("megatron"), tmp_path / "export" / "primary")
    assert resolve_source(tmp_path / "export") == tmp_path / "export" / "primary"
    assert resolve_source(tmp_path / "export" / "primary") == tmp_path / "export" / "primary"
    with pytest.raises(MiniPostError, match="does not exist"):
        resolve_source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiniPostError, match="pretrain/export.py"):
        resolve_source(tmp_path / "empty")


def test_similarity_measures():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1.0)  # invariant to rotation and isotropic scaling
    # unrelated features: CKA at its chance level, by hand for independent Gaussian [n, p] and [n, q] (centred:
    # m = n - 1): E|Y'X|^2 = m p q, |X'X|^2 ~ p m^2 + p^2 m, so CKA ~ sqrt(p q) / (m + p) = 16 / 215 = 0.0744.
    # The mean of 20 draws lies within 3 of their standard errors of it (measured: mean 0.0732, off by 0.0012, sd
    # 0.0055, 3 se = 0.0037; over 200 draws the approximation's own bias is 0.0007). Related features give 1 above.
    draws = torch.tensor([linear_cka(x, torch.randn(200, 16, generator=g)) for _ in range(20)], dtype=torch.float64)
    chance = 16 / (199 + 16)
    assert abs(draws.mean() - chance) < 3 * draws.std() / 20 ** 0.5, (draws.mean(), draws.std())
    assert mean_cosine(x, 2 * x) == pytest.approx(1.0)
    assert mean_cosine(x, -x) == pytest.approx(-1.0)


def test_changed_frozen_parameters_detects_a_change():
    source = make_model("megatron")
    mini, new = build_mini_model(source, layers=2)
    frozen, _ = split_parameters(mini, 2)
    assert changed_frozen_parameters(mini, source, frozen) == []
    with torch.no_grad():
        mini.bert.encoder.layer[1].attention.ln.bias[0] += 1e-6
        mini.bert.encoder.layer[2].output.dense.bias[0] += 1.0  # new: allowed to change
    assert changed_frozen_parameters(mini, source, frozen) == ["bert.encoder.layer.1.attention.ln.bias"]


def _mlm_items(n=6, seq=12, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (seq,), generator=g)
        labels = torch.where(torch.rand(seq, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        items.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    return items


def test_alignment_report_measures_the_right_depths():
    source = make_model("xlmr")
    data = _mlm_items()
    # A mini-model equal to its source: same loss, identical representations.
    same, _ = build_mini_model(source, layers=2, new_layers=2)
    report = alignment_report(source, same, data, batch_size=4)
    assert report["mini_mlm_loss"] == pytest.approx(report["primary_mlm_loss"])
    assert report["cka"] == pytest.approx(1.0) and report["cosine"] == pytest.approx(1.0)
    assert report["prediction_kl"] == pytest.approx(0.0, abs=1e-6)
    assert report["tokens"] == 6 * 12 and report["primary_layer"] == 4
    # With no new layer, the (post-LN) mini's top is the source's layer 2: identical there, not at the top.
    bottom, _ = build_mini_model(source, layers=2, new_layers=0)
    assert alignment_report(source, bottom, data, primary_layer=2)["cosine"] == pytest.approx(1.0)
    assert alignment_report(source, bottom, data)["cosine"] < 0.999
    with pytest.raises(ValueError, match="primary_layer=5"):
        alignment_report(source, bottom, data, primary_layer=5)


def _masked_log_probs(model, items):
    """The model's own full forward (HF logits at every position), at the masked positions."""
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    selected = batch["labels"] != -100
    return torch.log_softmax(logits[selected].double(), -1), batch["labels"][selected]


def test_prediction_kl_is_the_mean_kl_of_the_masked_predictions():
    source, data = make_model("xlmr"), _mlm_items()
    mini, _ = build_mini_model(source, layers=2, new_layers=1, head_init="random", seed=3)
    (p, labels), (q, _) = _masked_log_probs(source, data), _masked_log_probs(mini, data)
    by_hand = float((p.exp() * (p - q)).sum(-1).mean())
    report = alignment_report(source, mini, data, batch_size=4)
    assert by_hand > 0.01 and report["prediction_kl"] == pytest.approx(by_hand, rel=1e-4)
    assert report["mini_mlm_loss"] == pytest.approx(float(-q[torch.arange(len(labels)), labels].mean()), rel=1e-5)


def test_distilled_mlm_loss_by_hand():
    torch.manual_seed(0)
    teacher, data = make_model("xlmr"), _mlm_items()
    student, _ = build_mini_model(teacher, layers=2, new_layers=1)
    batch = {k: torch.stack([item[k] for item in data]) for k in data[0]}
    (t, labels), (s, _) = _masked_log_probs(teacher, data), _masked_log_probs(student, data)
    gold = -s[torch.arange(len(labels)), labels].mean()
    weight, temperature = 0.3, 2.0
    t_soft, s_soft = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    by_hand = (1 - weight) * gold + weight * -(t_soft.exp() * s_soft).sum(-1).mean()
    with torch.no_grad():
        assert float(DistilledMLMLoss(teacher, weight, temperature)(student, batch)) == pytest.approx(
            float(by_hand), rel=1e-5)
        assert float(DistilledMLMLoss(teacher, 0.0)(student, batch)) == pytest.approx(float(gold), rel=1e-5)
        assert float(masked_lm_loss(student, batch)) == pytest.approx(float(gold), rel=1e-5)
    # Pure distillation towards a copy of the model itself: a fixed point, no gradient (alignment is kept).
    twin = copy.deepcopy(student)
    DistilledMLMLoss(twin, 1.0)(student, batch).backward()
    assert max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None) < 1e-6
    with pytest.raises(ValueError, match="between 0 and 1"):
        DistilledMLMLoss(teacher, 1.5)


def test_distillation_counts_the_teachers_forward():
    from minimodel.minipost.train import DistillConfig, _objective

    source = make_model("xlmr")  # 4 layers, hidden 32, FFN 64, vocabulary 120
    mini, _ = build_mini_model(source, layers=2, new_layers=1)
    batch = {k: torch.stack([item[k] for item in _mlm_items()]) for k in ("input_ids", "labels", "attention_mask")}
    loss_fn, flops_fn = _objective(DistillConfig(weight=0.0), mini, source, "cpu")
    assert loss_fn is masked_lm_loss and all(p.requires_grad for p in source.parameters())
    mlm_only = flops_fn(batch)
    _, flops_fn = _objective(DistillConfig(weight=0.5), mini, source, "cpu")
    b, s, h, f, v, n = 6, 12, 32, 64, 120, int((batch["labels"] != -100).sum())
    teacher_forward = b * 4 * (2 * s * (4 * h * h + 2 * h * f) + 4 * s * s * h) + 2 * n * (h * h + h * v)
    assert flops_fn(batch) == mlm_only + teacher_forward
    assert not any(p.requires_grad for p in source.parameters())
