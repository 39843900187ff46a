"""Which parameters a sparse fine-tuning may change, and the lottery-ticket selection of the K entries it does.

Eligibility is decided by module type, never by parameter name (MegatronBert calls its LayerNorms `ln`, XLM-R
`LayerNorm`): every parameter of the model's body (`model.base_model`: embeddings of every kind, Linear weights
and biases, ...) is *eligible* (sparse); normalisation layers anywhere are frozen unless asked for (then they are
eligible in the body and dense in the head); everything outside the body (the LM head's transform and bias, a
classifier) is *dense*: trained fully and stored whole. A parameter the caller froze (requires_grad False, e.g. a
frozen decoder) stays frozen.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from minimodel.config import ConfigError

# Norm layers outside torch's own classes (T5LayerNorm, LlamaRMSNorm, FusedLayerNorm, ...) by their class name.
_NORM_CLASS = re.compile(r"(LayerNorm|RMSNorm|GroupNorm|BatchNorm)\w*$")
_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, _TORCH_NORMS) or bool(_NORM_CLASS.search(type(module).__name__))


@dataclass
class Partition:
    eligible: dict[str, nn.Parameter]  # sparse: only the selected entries change (phase 2)
    dense: dict[str, nn.Parameter]  # trained fully in both phases, stored whole ("abs")
    frozen: list[str]  # names of the parameters that do not train at all

    @property
    def trainable(self) -> dict[str, nn.Parameter]:
        return {**self.eligible, **self.dense}

    @property
    def eligible_numel(self) -> int:
        return sum(p.numel() for p in self.eligible.values())


def partition_parameters(model: nn.Module, include_layer_norms: bool = False,
                         new: set[str] = frozenset()) -> Partition:
    """Split `model`'s parameters (as named_parameters names them: a tied weight once, under its name in the body,
    the one a task model, which has no output layer to tie it to, knows it by) and
    set requires_grad accordingly: frozen norms get requires_grad False. `new`: parameters the base model does not
    have (hf.initialised_at_load: a task model's pooler), dense even in the body: a difference from their random
    initial values would mean nothing once the SFT is applied to a freshly loaded model."""
    body = model.base_model
    if body is model:
        raise ConfigError(f"{type(model).__name__} has no separate body (base_model): sparse fine-tuning needs a "
                          "Hugging Face model with a head (e.g. *ForMaskedLM, *ForSequenceClassification)")
    norm_params = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    body_params = {id(p) for p in body.parameters()}
    eligible, dense, frozen = {}, {}, []
    prefix = getattr(model, "base_model_prefix", "")
    in_body = {id(p): f"{prefix}.{name}" for name, p in body.named_parameters()} \
        if prefix and getattr(model, prefix, None) is body else {}
    for name, p in model.named_parameters():
        name = in_body.get(id(p), name)
        if id(p) in norm_params and not include_layer_norms:
            p.requires_grad_(False)
        if not p.requires_grad:
            frozen.append(name)
        elif id(p) in body_params and name not in new:
            eligible[name] = p
        else:
            dense[name] = p
    if not eligible:
        raise ConfigError(f"{type(model).__name__}: no trainable parameter in its body: nothing to sparse-fine-tune")
    return Partition(eligible, dense, frozen)


def resolve_k(k: int | None, proportion: float, eligible_numel: int) -> int:
    """K as a count (`k`) or, when k is None, as a proportion of the eligible values."""
    count = k if k is not None else int(proportion * eligible_numel)
    if not 1 <= count <= eligible_numel:
        given = f"sft.k={k}" if k is not None else f"sft.k_proportion={proportion} x {eligible_numel}"
        raise ConfigError(f"{given} selects {count} values: it must be in 1..{eligible_numel} (the eligible values)")
    return count


def select_top_k(deltas: dict[str, torch.Tensor], k: int,
                 selected: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The lottery ticket: add to `selected` (boolean masks, none yet when None) the entries whose |delta| is among
    the k largest of the entries not yet selected, with ONE threshold over all tensors; entries tied with the
    threshold are all kept (so a selection can exceed k). Returns the new cumulative masks."""
    selected = selected or {n: torch.zeros(d.shape, dtype=torch.bool) for n, d in deltas.items()}
    free = torch.cat([d.abs().flatten()[~selected[n].flatten()] for n, d in deltas.items()])
    if k > free.numel():
        raise ConfigError(f"asked to select {k} more values but only {free.numel()} eligible values are left: "
                          "lower sft.k (or sft.k_proportion)")
    if not torch.isfinite(free).all():  # kthvalue ranks NaN largest: a NaN threshold selects nothing, silently
        raise FloatingPointError(f"{int((~torch.isfinite(free)).sum())} of the parameter changes are not finite: "
                                 "the full phase diverged; lower train.optim.lr or check the data")
    threshold = torch.kthvalue(free, free.numel() - k + 1).values  # the k-th largest
    if threshold == 0:  # fewer than k values moved: the ones that did (ties at 0 would select every free value)
        return {n: selected[n] | (d.abs() > 0) for n, d in deltas.items()}
    return {n: selected[n] | (d.abs() >= threshold) for n, d in deltas.items()}
