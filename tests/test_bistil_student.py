"""BiStil's student (its config, layer map and initialisation) and the distillation losses against hand
computations on a 4-layer teacher and a 2-layer student."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (XLMRobertaConfig, XLMRobertaForMaskedLM, XLMRobertaForQuestionAnswering,
                          XLMRobertaForSequenceClassification)

from minimodel.bistil.loss import (DistillationWeights, attention_loss, distillation_loss, hidden_loss,
                                   soft_cross_entropy, state_projection)
from minimodel.bistil.student import StudentConfig, build_student, embedding_projection, teacher_layers
from minimodel.bistil.task import TaskDistillStep
from minimodel.config import ConfigError


def _teacher(hidden: int = 32) -> XLMRobertaForMaskedLM:
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=60, hidden_size=hidden, num_hidden_layers=4, num_attention_heads=2,
                              intermediate_size=4 * hidden, max_position_embeddings=40, pad_token_id=1,
                              attn_implementation="eager")
    return XLMRobertaForMaskedLM(config).eval()


IDS = torch.tensor([[0, 5, 9, 12, 7, 2, 1, 1], [0, 33, 8, 2, 1, 1, 1, 1]])
MASK = (IDS != 1).long()


def _outputs(model):
    return model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True, output_attentions=True)


def test_student_config_and_layer_maps():
    teacher = _teacher()
    student = build_student(teacher, StudentConfig(layer_ratio=2, hidden_ratio=2, init="svd"))
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads) == (2, 16, 64, 2)
    assert c.hidden_dropout_prob == c.attention_probs_dropout_prob == 0 and type(student) is type(teacher)
    assert teacher_layers(4, StudentConfig(layer_map="regular")) == [1, 3]
    assert teacher_layers(12, StudentConfig(layer_ratio=3, layer_map="bottom")) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="student.layer_ratio"):
        build_student(teacher, StudentConfig(layer_ratio=3))
    with pytest.raises(ConfigError, match="student.init"):
        build_student(teacher, StudentConfig(hidden_ratio=2, init="teacher"))


def test_a_bottom_student_is_the_teachers_first_layers():
    teacher = _teacher()
    student = build_student(teacher, StudentConfig(layer_map="bottom")).eval()
    with torch.no_grad():
        t, s = _outputs(teacher), _outputs(student)
    for i in range(3):  # the embeddings' output and the two layers: the same computation
        torch.testing.assert_close(s.hidden_states[i], t.hidden_states[i], rtol=0, atol=0)
    regular = build_student(teacher, StudentConfig(layer_map="regular"))
    for name, p in regular.roberta.encoder.layer[1].named_parameters():
        assert torch.equal(p, dict(teacher.roberta.encoder.layer[3].named_parameters())[name])
    assert torch.equal(regular.lm_head.dense.weight, teacher.lm_head.dense.weight)
    assert regular.get_output_embeddings().weight is regular.get_input_embeddings().weight


@pytest.mark.parametrize("kind", ["xlmr", "bert", "megatron", "deberta-v2", "mpnet", "xlmr-xl"])
def test_a_student_of_full_depth_is_the_teacher(kind):
    """layer_ratio=1, init=teacher: the same model. MegatronBERT's final LayerNorm (where the MiniJoint export puts
    the trained one), DeBERTa-v2's relative positions and MPNet's relative attention bias sit outside the layers,
    and were left at their initial values."""
    from minipost_helpers import make_model

    teacher = make_model(kind, seed=3)
    with torch.no_grad():  # every parameter away from its initial value, LayerNorms and position tables included
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.eval()
    student = build_student(teacher, StudentConfig(layer_ratio=1)).eval()
    ids = torch.tensor([[0, 5, 9, 12, 7, 2], [0, 33, 8, 2, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids, attention_mask=(ids != 1).long()).logits,
                                   teacher(input_ids=ids, attention_mask=(ids != 1).long()).logits)


def test_svd_embeddings_are_the_rank_d_coordinates():
    weight = _teacher().get_input_embeddings().weight.detach()
    coords = embedding_projection(weight, 16)
    s = np.linalg.svd(weight.double().numpy(), compute_uv=False)
    _, _, vh = np.linalg.svd(weight.double().numpy(), full_matrices=False)
    error = np.linalg.norm(coords.double().numpy() @ vh[:16] - weight.double().numpy())
    assert error == pytest.approx(np.sqrt((s[16:] ** 2).sum()), rel=1e-5)  # the best rank-16 approximation


def test_svd_scale_unit_starts_from_the_left_singular_vectors_as_the_reference():
    teacher = _teacher()
    weight = teacher.get_input_embeddings().weight.detach()
    unit = embedding_projection(weight, 16, unit=True).double()
    np.testing.assert_allclose((unit.T @ unit).numpy(), np.eye(16), atol=1e-5)  # U_d: orthonormal columns
    s = np.linalg.svd(weight.double().numpy(), compute_uv=False)
    np.testing.assert_allclose(unit.numpy() * s[:16], embedding_projection(weight, 16).double().numpy(), atol=1e-4)
    student = build_student(teacher, StudentConfig(hidden_ratio=2, init="svd", svd_scale="unit"))
    assert torch.equal(student.get_input_embeddings().weight.detach(), unit.float())
    with pytest.raises(ConfigError, match="student.svd_scale: scales init=svd's embeddings"):
        StudentConfig(svd_scale="unit").validate()


def _projections(teacher, d: int = 16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """M [L+1, h, d] fitted on each teacher state's own token vectors (64 tokens: more than d), and those states."""
    torch.manual_seed(2)
    with torch.no_grad():
        out = teacher.base_model(input_ids=torch.randint(3, 60, (4, 16)), output_hidden_states=True)
    states = [h.reshape(-1, h.shape[-1]) for h in out.hidden_states]
    return torch.stack([state_projection(h, d) for h in states]), states


def _hand_loss(s, t, ratio, mask, m):
    """The losses with explicit loops over layers, sequences, tokens (numpy, float64); m[j] projects teacher state j."""
    hidden = []
    for i in range(len(s.hidden_states)):
        hs, ht = s.hidden_states[i].double().numpy(), t.hidden_states[i * ratio].double().numpy() @ m[i * ratio]
        errs = [((hs[b, k] - ht[b, k]) ** 2).mean() for b in range(hs.shape[0]) for k in range(hs.shape[1])
                if mask[b, k]]
        hidden.append(np.mean(errs))
    attention = []
    for i in range(len(s.attentions)):
        a_s, a_t = s.attentions[i].double().numpy(), t.attentions[(i + 1) * ratio - 1].double().numpy()
        where = a_t != 0
        attention.append(((a_s - a_t) ** 2)[where].mean())
    return np.mean(hidden), np.mean(attention)


def test_distillation_loss_equals_a_hand_computation():
    teacher = _teacher()
    student = build_student(teacher, StudentConfig(hidden_ratio=2, init="svd")).eval()
    with torch.no_grad():
        t, s = _outputs(teacher), _outputs(student)
    m, states = _projections(teacher)
    hidden, attention = _hand_loss(s, t, 2, MASK.numpy(), m.double().numpy())
    weights = DistillationWeights(hidden=0.5, attention=2.0)
    loss = distillation_loss(s, t, MASK, 2, weights, m)
    assert float(loss) == pytest.approx(0.5 * hidden + 2.0 * attention, rel=1e-6)
    assert float(attention_loss(s.attentions, t.attentions, 2)) == pytest.approx(attention, rel=1e-6)
    # M[j]: orthonormal columns spanning the top-16 right singular vectors of teacher state j
    _, _, vh = np.linalg.svd(states[2].double().numpy(), full_matrices=False)
    md = m[2].double().numpy()
    np.testing.assert_allclose(md.T @ md, np.eye(16), atol=1e-6)
    np.testing.assert_allclose(md @ md.T, vh[:16].T @ vh[:16], atol=1e-6)
    # the projections differ per state, so a shared one would give another loss
    shared = m[0].expand_as(m)
    assert float(distillation_loss(s, t, MASK, 2, weights, shared)) != pytest.approx(float(loss), rel=1e-3)


def test_soft_cross_entropy_at_temperature_2():
    torch.manual_seed(1)
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    p = np.exp(t.double().numpy() / 2)
    p /= p.sum(-1, keepdims=True)
    z = s.double().numpy() / 2
    log_q = z - np.log(np.exp(z).sum(-1, keepdims=True))
    assert float(soft_cross_entropy(s, t, 2.0)) == pytest.approx(-(p * log_q).sum(-1).mean(), rel=1e-6)


def test_training_the_student_leaves_the_teacher_unchanged():
    teacher = _teacher().requires_grad_(False)
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    student = build_student(teacher, StudentConfig()).train()
    start = {n: p.clone() for n, p in student.state_dict().items()}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(3):
        with torch.no_grad():
            t = _outputs(teacher)
        loss = distillation_loss(_outputs(student), t, MASK, 2, DistillationWeights(soft_ce=1.0))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, before[n]) for n, p in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert not all(torch.equal(p, start[n]) for n, p in student.state_dict().items())  # the student did train


def _classifier(layers: int, seed: int) -> XLMRobertaForSequenceClassification:
    torch.manual_seed(seed)
    return XLMRobertaForSequenceClassification(XLMRobertaConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, pad_token_id=1, num_labels=3, attn_implementation="eager")).eval()


@torch.no_grad()
def test_task_distillation_loss_is_the_formula_and_ignores_gold_labels_unless_weighted():
    """Phase 2's step: hidden + attention MSE + soft CE of the classifier logits at T = 2 against the teacher's, the
    same whatever the gold labels say; with loss.gold > 0 the student's own task loss on them is added."""
    teacher, student = _classifier(4, 0), _classifier(2, 1)
    batch = {"teacher_ids": IDS, "student_ids": IDS, "attention_mask": MASK, "labels": torch.tensor([0, 2])}
    step = TaskDistillStep(teacher, student, DistillationWeights(soft_ce=1.0), None)
    loss = step.loss(student, batch)
    s, t = (m(input_ids=IDS, attention_mask=MASK, output_hidden_states=True, output_attentions=True)
            for m in (student, teacher))
    by_hand = (hidden_loss(s.hidden_states, t.hidden_states, 2, MASK) + attention_loss(s.attentions, t.attentions, 2)
               + soft_cross_entropy(s.logits, t.logits, 2.0))
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(step.loss(student, {**batch, "labels": torch.tensor([1, 1])})) == float(loss)
    gold = TaskDistillStep(teacher, student, DistillationWeights(soft_ce=1.0, gold=0.5), None)
    with_labels = float(gold.loss(student, batch))
    assert with_labels == pytest.approx(float(loss) + 0.5 * float(F.cross_entropy(s.logits, batch["labels"])),
                                        rel=1e-6)
    assert float(gold.loss(student, {**batch, "labels": torch.tensor([1, 1])})) != with_labels


@torch.no_grad()
def test_qa_task_distillation_sums_the_start_and_end_soft_cross_entropies():
    """Phase 2 on QA, a half-width student: the soft cross-entropy is CE(start) + CE(end), each at T = 2 (the
    reference's, not their mean), and the hidden loss projects teacher state j by M[j]."""
    torch.manual_seed(0)
    config = dict(vocab_size=60, num_attention_heads=2, max_position_embeddings=40, pad_token_id=1,
                  attn_implementation="eager")
    teacher = XLMRobertaForQuestionAnswering(XLMRobertaConfig(hidden_size=32, num_hidden_layers=4,
                                                              intermediate_size=64, **config)).eval()
    student = XLMRobertaForQuestionAnswering(XLMRobertaConfig(hidden_size=16, num_hidden_layers=2,
                                                              intermediate_size=32, **config)).eval()
    s, t = (model(input_ids=IDS, attention_mask=MASK, output_hidden_states=True, output_attentions=True)
            for model in (student, teacher))
    m, _ = _projections(teacher)
    batch = {"teacher_ids": IDS, "student_ids": IDS, "attention_mask": MASK,
             "start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 2])}
    loss = float(TaskDistillStep(teacher, student, DistillationWeights(soft_ce=1.0), m).loss(student, batch))

    def ce(s_logits, t_logits):  # -sum softmax(t / 2) log softmax(s / 2), mean over the examples
        return float(-(torch.softmax(t_logits / 2, -1) * torch.log_softmax(s_logits / 2, -1)).sum(-1).mean())

    hidden, attention = _hand_loss(s, t, 2, MASK.numpy(), m.double().numpy())
    start, end = ce(s.start_logits, t.start_logits), ce(s.end_logits, t.end_logits)
    assert loss == pytest.approx(hidden + attention + start + end, rel=1e-5)
    assert loss != pytest.approx(hidden + attention + (start + end) / 2, rel=1e-3)


def test_throughput_is_compared_at_one_attention_implementation():
    """The teachers are loaded eager (their attention maps are phase 1's targets); the student came back from disk
    at the library's default, sdpa, and was timed faster by that alone."""
    from minimodel.bistil.compare import tokens_per_second
    from minipost_helpers import make_model

    teacher = _teacher()
    student = build_student(teacher, StudentConfig())

    def tokenizer(texts, **kwargs):  # ids ready-made
        return {"input_ids": IDS[:len(texts)], "attention_mask": MASK[:len(texts)]}

    speed = tokens_per_second({"teacher": teacher, "student": student}, {"teacher": tokenizer, "student": tokenizer},
                              ["a", "b"], IDS.shape[1], 2, rounds=1)
    assert set(speed) == {"teacher", "student"} and min(speed.values()) > 0
    other = make_model("xlmr")
    other.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="different attention implementations"):
        tokens_per_second({"teacher": teacher, "student": other}, {"teacher": tokenizer, "student": tokenizer},
                          ["a", "b"], IDS.shape[1], 2, rounds=1)


def test_the_losses_sum_and_count_in_fp32_under_bf16():
    """bf16 states and attention maps (bf16 training): the losses are those of the same values in fp32; bf16 sums
    and counts were off by a few tenths of a percent (3000 tokens counted as 3008)."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 1000, dtype=torch.long)
    states = [torch.randn(3, 1000, 8, generator=g).bfloat16() for _ in range(3)]
    teacher = [torch.randn(3, 1000, 8, generator=g).bfloat16() for _ in range(5)]
    maps = [torch.rand(3, 2, 40, 40, generator=g).bfloat16() for _ in range(2)]
    teacher_maps = [torch.rand(3, 2, 40, 40, generator=g).bfloat16() for _ in range(4)]
    logits = torch.randn(3, 1000, generator=g).bfloat16(), torch.randn(3, 1000, generator=g).bfloat16()
    for low, high in ((hidden_loss(states, teacher, 2, mask), hidden_loss([s.float() for s in states],
                                                                          [t.float() for t in teacher], 2, mask)),
                      (attention_loss(maps, teacher_maps, 2), attention_loss([m.float() for m in maps],
                                                                             [t.float() for t in teacher_maps], 2)),
                      (soft_cross_entropy(*logits), soft_cross_entropy(*(x.float() for x in logits)))):
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, high, rtol=1e-6, atol=0)
