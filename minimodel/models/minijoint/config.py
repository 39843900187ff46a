"""MiniJoint model shape and objective (a plain dataclass: loading a config does not import megatron)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from minimodel.config import require

SecondaryHead = Literal["separate", "shared_transform", "none"]


@dataclass
class ModelConfig:
    vocab_size: int = 32000  # the tokenizer's size; padded up to make_vocab_size_divisible_by inside the model
    hidden_size: int = 768
    num_layers: int = 12
    num_attention_heads: int = 12
    ffn_hidden_size: int | None = None  # None: 4 x hidden_size
    seq_length: int = 512  # also the number of learned position embeddings
    mini_layers: int = 4  # m: the secondary head reads the output of layer m (1-based); the mini-model's depth
    # The MLM head after layer m (the mini-model's head):
    #   separate          its own final LayerNorm + dense + LayerNorm + bias (projection: see below)
    #   shared_transform  the main head itself (same parameters) applied to layer m's output: the mini-model's head
    #                     IS the primary's, so output embeddings learned through one fit the other
    #   none              plain MLM: no secondary head, no auxiliary loss, no MiniJoint mini-model
    secondary_head: SecondaryHead = "separate"
    aux_weight: float = 1.0  # loss = main + aux_weight * secondary
    share_aux_output_embedding: bool = True  # secondary head projects with the tied word embeddings
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    # Padding the vocabulary to a multiple of this keeps checkpoints independent of the TP size (it must be a
    # multiple of tensor_model_parallel_size) and the projection GPU-friendly.
    make_vocab_size_divisible_by: int = 128

    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "seq_length",
                    "make_vocab_size_divisible_by"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        require(self.ffn_hidden_size is None or self.ffn_hidden_size >= 1, "ffn_hidden_size",
                f"must be >= 1 or null, got {self.ffn_hidden_size}")
        require(1 <= self.mini_layers <= self.num_layers, "mini_layers",
                f"the secondary head must follow one of layers 1..num_layers={self.num_layers}, "
                f"got {self.mini_layers}")
        require(self.aux_weight >= 0, "aux_weight", f"must be >= 0, got {self.aux_weight}")
        require(self.secondary_head != "shared_transform" or self.share_aux_output_embedding,
                "share_aux_output_embedding", "secondary_head=shared_transform uses the main head, whose "
                "projection is the tied word embeddings: set model.share_aux_output_embedding=true (or "
                "model.secondary_head=separate)")
        for key in ("hidden_dropout", "attention_dropout"):
            require(0 <= getattr(self, key) < 1, key, f"must be in [0, 1), got {getattr(self, key)}")
        require(self.layernorm_epsilon > 0, "layernorm_epsilon", "must be > 0")
        require(self.init_method_std > 0, "init_method_std", "must be > 0")

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def padded_vocab_size(self) -> int:
        d = self.make_vocab_size_divisible_by
        return math.ceil(self.vocab_size / d) * d


def flops_per_token(cfg: ModelConfig, mask_fraction: float = 0.15) -> float:
    """Model FLOPs per sequence token of a training step (forward + backward = 3 x forward; matmuls, 2 per MAC).

    Every token goes through each layer's QKV, attention-output and MLP matmuls and attends over seq_length keys;
    only the masked tokens (`mask_fraction` of them) go through the MLM heads (dense + vocabulary projection): two,
    or one with secondary_head "none".
    """
    h, s, f, v = cfg.hidden_size, cfg.seq_length, cfg.ffn_size, cfg.padded_vocab_size
    per_layer = 2 * (4 * h * h + 2 * h * f) + 2 * 2 * s * h
    num_heads = 1 if cfg.secondary_head == "none" else 2
    heads = mask_fraction * num_heads * 2 * (h * h + h * v)
    return 3.0 * (cfg.num_layers * per_layer + heads)


def head_flops_per_token(cfg: ModelConfig, mask_fraction: float = 0.15) -> float:
    """What one MLM head adds to flops_per_token (MiniJoint's secondary head: its cost in pretraining)."""
    h, v = cfg.hidden_size, cfg.padded_vocab_size
    return 3.0 * mask_fraction * 2 * (h * h + h * v)
