"""Factorised embeddings (OFA): E [V, h] ~ C [V, d] P [d, h].

From the SVD E_src = U S V^T: primitives P = S_d V_d^T (d x h), source coordinates C_src = U_d (orthonormal
columns). Adaptation learns the target coordinates C_t (V_t x d) with P frozen: V_t * d trainable values instead of
V_t * h. The model computes input embeddings C_t[ids] P and tied output logits (x P^T) C_t^T, through the d-dim space
and never materialising the V x h matrix; plugging writes E_t = C_t P into a plain model (adaptation/plug.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimodel.config import require


def factorize(embeddings: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coordinates C [V, d], primitives P [d, h], all singular values S) of `embeddings`, in float64."""
    vocab, hidden = embeddings.shape
    if not 1 <= dim <= min(vocab, hidden):
        raise ValueError(f"embedding.factorized_dim={dim} must be in [1, min(vocabulary, hidden) = "
                         f"{min(vocab, hidden)}]")
    u, s, vh = torch.linalg.svd(embeddings.detach().double().cpu(), full_matrices=False)
    return u[:, :dim].contiguous(), (s[:dim, None] * vh[:dim]).contiguous(), s


class FactorizedEmbedding(nn.Module):
    """Input embeddings C[ids] P. `weight` is C (what trains), so code that asks a model for its input embeddings'
    weight gets the trainable matrix; `primitives` is P (frozen)."""

    def __init__(self, coordinates: torch.Tensor, primitives: torch.Tensor, padding_idx: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(coordinates.float().clone())
        self.primitives = nn.Parameter(primitives.float().clone(), requires_grad=False)
        self.padding_idx = padding_idx

    @property
    def rank(self) -> int:
        return self.weight.shape[1]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight, self.padding_idx) @ self.primitives

    def full(self) -> torch.Tensor:
        """E = C P [V, h]."""
        return self.weight @ self.primitives


class FactorizedDecoder(nn.Module):
    """Tied output logits x (C P)^T + b computed as (x P^T) C^T + b. Holds the input embeddings' parameters (the
    same objects) and the LM head's bias."""

    def __init__(self, embedding: FactorizedEmbedding, bias: nn.Parameter | None):
        super().__init__()
        self.embedding = embedding
        self.bias = bias

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    @property
    def rank(self) -> int:
        return self.embedding.rank

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(hidden, self.embedding.primitives), self.embedding.weight, self.bias)


def install_factorized(model: nn.Module, coordinates: torch.Tensor, primitives: torch.Tensor,
                       pad_id: int | None) -> FactorizedEmbedding:
    """Replace `model`'s input embeddings (and its tied output embeddings) with the factorised pair. The model must
    already have the target vocabulary installed (its LM-head bias is kept)."""
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is model.get_input_embeddings().weight
    if out is not None and not tied:
        raise ValueError(f"{type(model).__name__} has untied output embeddings: factorised embeddings are tied "
                         "(OFA's setting); use a model with tied embeddings or unset embedding.factorized_dim")
    embedding = FactorizedEmbedding(coordinates, primitives, pad_id)
    model.set_input_embeddings(embedding)
    if out is not None:
        model.set_output_embeddings(FactorizedDecoder(embedding, out.bias))
    return embedding


def check_rank(dim: int | None, key: str = "embedding.factorized_dim") -> None:
    require(dim is None or dim >= 1, key, "must be >= 1 (unset: no factorisation)")
