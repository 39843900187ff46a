"""BiStil's distillation losses (both phases), on Hugging Face outputs with hidden states and attention maps.

- hidden: mean over student states i = 0..L_s (0: the embeddings' output) of the MSE between the student's state i
  and the teacher's state i*r, projected by M[i*r] when the student is narrower (M [L+1, h, d]: M[j] the top-d
  right singular vectors of teacher state j's token vectors alone, `state_projection`; the reference's per-layer
  mappings); over the real (unpadded) tokens.
- attention: mean over student layers i of the MSE between the student's attention probabilities and the teacher
  layer (i+1)r-1's, over the entries where the teacher's attention is not 0 (padded keys are exactly 0).
- soft cross-entropy (phase 2): -sum softmax(t / T) log softmax(s / T), mean over examples, no T^2 factor, summed
  over the task's logits (a QA model's start and end: CE_start + CE_end; both the reference's); gold labels are not
  used unless `gold` > 0 (the caller adds the model's own task loss).
The loss map is the reference's whatever the student's initialisation: the student learns the teacher's output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from minimodel.training.hf_mlm import soft_cross_entropy


def state_projection(teacher_states: torch.Tensor, d: int) -> torch.Tensor:
    """M [h, d]: the top-d right singular vectors of teacher states [N, h] (rows: tokens)."""
    _, _, vh = torch.linalg.svd(teacher_states.detach().double(), full_matrices=False)
    return vh[:d].T.to(teacher_states.dtype)


def hidden_loss(student_states, teacher_states, ratio: int, mask: torch.Tensor,
                projections: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over student states i of the masked MSE against teacher state i * ratio, projected by
    projections[i * ratio] (M [L+1, h, d]) when given."""
    keep = mask.unsqueeze(-1).float()  # sums and counts in fp32: bf16 rounds a count of 3000 tokens to 3008
    terms = []
    for i, s in enumerate(student_states):
        t = teacher_states[i * ratio].detach()
        if projections is not None:
            t = t @ projections[i * ratio]
        terms.append(((s.float() - t.float()) ** 2 * keep).sum() / (keep.sum() * s.shape[-1]))
    return torch.stack(terms).mean()


def attention_loss(student_attentions, teacher_attentions, ratio: int) -> torch.Tensor:
    """Mean over student layers i of the MSE against teacher layer (i+1)*ratio - 1, where the teacher's is not 0."""
    terms = []
    for i, s in enumerate(student_attentions):
        t = teacher_attentions[(i + 1) * ratio - 1].detach()
        where = (t != 0).float()
        terms.append(((s.float() - t.float()) ** 2 * where).sum() / where.sum())
    return torch.stack(terms).mean()


@dataclass
class DistillationWeights:
    hidden: float = 1.0
    attention: float = 1.0
    soft_ce: float = 0.0  # phase 2 (task distillation): 1.0
    temperature: float = 2.0
    gold: float = 0.0  # phase 2: weight of the task loss on the gold labels (the reference: none)


def distillation_loss(student_out, teacher_out, mask: torch.Tensor, ratio: int, weights: DistillationWeights,
                      projections: torch.Tensor | None = None,
                      logits: Callable[[Any], tuple[torch.Tensor, ...]] = lambda out: (out.logits,)) -> torch.Tensor:
    """The weighted sum of the three losses on outputs of model(..., output_hidden_states=True,
    output_attentions=True); the teacher's outputs are constants. `logits`: output -> the logits soft
    cross-entropy compares, one tensor per head (their soft cross-entropies add up)."""
    loss = weights.hidden * hidden_loss(student_out.hidden_states, teacher_out.hidden_states, ratio, mask,
                                        projections)
    loss = loss + weights.attention * attention_loss(student_out.attentions, teacher_out.attentions, ratio)
    if weights.soft_ce:
        loss = loss + weights.soft_ce * sum(soft_cross_entropy(s, t, weights.temperature)
                                            for s, t in zip(logits(student_out), logits(teacher_out), strict=True))
    return loss
