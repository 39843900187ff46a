"""The target vocabulary: its tokenizer, the initial embedding matrix, and installing a vocabulary in a model.

Initialisations (`INITIALISERS`, selected by `init.method`), all with the signature
    init(source_weight [V_src, h], token_map [V_trg] (source id or -1), target_tokenizer, *, std, pad_id, generator)
        -> (weight [V_trg, h], used_map [V_trg]: the source row each target row was copied from, or -1)
- "random":          normal(0, std), padding row zeroed: the paper's baseline (nothing is copied).
- "copy_shared":     rows of tokens the source vocabulary also has (same piece, or same special-token role) are
                     copied; the rest as "random".
- "ofa":             OFA (Liu et al., 2023): shared tokens copied (exactly, then after normalising case and the
                     word-boundary marker), the others from their nearest source tokens in aligned word-vector space,
                     random from the source matrix's spread without a vector (minimodel/ofa/init.py); it also takes
                     `ofa=OFAInputs(...)`: the source tokenizer, the word vectors, the languages.
The used map travels with the learned embeddings, so plugging can carry over the receiving model's LM-head bias for
the copied tokens (zeros for the others) exactly as adaptation did.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from minimodel.ofa import init as ofa_init

_SPECIAL_ROLES = ("pad_token", "unk_token", "mask_token", "cls_token", "sep_token", "bos_token", "eos_token")


def token_map(source_tokenizer, target_tokenizer) -> torch.Tensor:
    """For each target id, the source id of the same token (special tokens matched by role, pieces by string), or -1."""
    source_vocab = source_tokenizer.get_vocab()
    mapping = torch.full((len(target_tokenizer),), -1, dtype=torch.long)
    for piece, tid in target_tokenizer.get_vocab().items():
        sid = source_vocab.get(piece)
        if sid is not None and tid < len(mapping):
            mapping[tid] = sid
    for role in _SPECIAL_ROLES:
        tid = getattr(target_tokenizer, f"{role}_id", None)
        sid = getattr(source_tokenizer, f"{role}_id", None)
        if tid is not None and sid is not None:
            mapping[tid] = sid
    return mapping


def _random(source_weight, mapping, target_tokenizer, *, std, pad_id, generator):
    weight = torch.randn(len(mapping), source_weight.shape[1], generator=generator) * std
    if pad_id is not None:
        weight[pad_id] = 0.0
    return weight, torch.full_like(mapping, -1)


def _copy_shared(source_weight, mapping, target_tokenizer, *, std, pad_id, generator):
    weight, _ = _random(source_weight, mapping, target_tokenizer, std=std, pad_id=pad_id, generator=generator)
    shared = mapping >= 0
    weight[shared] = source_weight[mapping[shared]].float()
    return weight, mapping.clone()


INITIALISERS: dict[str, Callable] = {"random": _random, "copy_shared": _copy_shared, "ofa": ofa_init.initialise}


def remap_rows(old: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """new[i] = old[mapping[i]] where mapping[i] >= 0, else 0 (used for the LM-head bias)."""
    new = torch.zeros(len(mapping), *old.shape[1:], dtype=old.dtype)
    kept = mapping >= 0
    new[kept] = old[mapping[kept]]
    return new


def install_vocabulary(model: nn.Module, weight: torch.Tensor, mapping: torch.Tensor, pad_id: int | None,
                       output_weight: torch.Tensor | None = None, output_bias: torch.Tensor | None = None) -> None:
    """Give `model` a new vocabulary: input embeddings `weight`, the output embeddings (tied: the same matrix;
    untied: `output_weight`, default the model's own output rows carried over through `mapping`, `weight`'s rows
    for unmapped tokens) and the LM-head bias (`output_bias`, default the model's own bias carried over through
    `mapping`, zeros for unmapped tokens). Works for *ForMaskedLM and task models (no output embeddings)."""
    old_embeddings = model.get_input_embeddings()
    roberta_style_padding = getattr(model.base_model.embeddings, "padding_idx", None)
    if roberta_style_padding is not None and pad_id is not None and roberta_style_padding != pad_id:
        raise ValueError(
            f"the target tokenizer's padding id is {pad_id} but {type(model).__name__} derives position ids from "
            f"padding id {roberta_style_padding}: use a tokenizer with the same id convention (XLM-R's: <pad>=1)")
    out = model.get_output_embeddings()
    old_bias = out.bias.detach().clone() if out is not None and out.bias is not None else None
    tied = out is not None and out.weight is old_embeddings.weight
    if out is not None and not tied and output_weight is None:  # a kept token predicts as it did
        output_weight = weight.clone()
        kept = mapping >= 0
        output_weight[kept] = out.weight.detach()[mapping[kept]].to(weight.dtype)
    model.resize_token_embeddings(weight.shape[0], mean_resizing=False)
    new_embeddings = model.get_input_embeddings()
    with torch.no_grad():
        new_embeddings.weight.copy_(weight)
        new_embeddings.padding_idx = pad_id
        out = model.get_output_embeddings()
        if out is not None and not tied:
            out.weight.copy_(output_weight)
        if out is not None and out.bias is not None:
            out.bias.copy_(remap_rows(old_bias, mapping) if output_bias is None else output_bias)
    if out is not None and out.bias is not None and not tied:
        # an untied head keeps its own `bias` beside the decoder's (saved, not used): the resize left it at the old
        # size (XLM-R: the save no longer loads) or made it the decoder's tensor (BERT: the save drops one of the
        # two, and the reload draws the decoder's bias at random)
        for head in (m for m in model.modules() if getattr(m, "decoder", None) is out):
            if isinstance(getattr(head, "bias", None), nn.Parameter):
                head.bias = nn.Parameter(out.bias.detach().clone())
    if pad_id is not None:
        model.config.pad_token_id = pad_id
