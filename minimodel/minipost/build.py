"""Build a MiniPost mini-model from a pretrained masked LM (paper step 1b, before training).

The mini-model is the source's own Hugging Face class with `layers + new_layers` transformer layers:
    embeddings + layers 1..k          copied from the source, frozen
    layers k+1..k+n                   new, trainable (initialised from the source's layers k+1..k+n, or at random)
    top norm (pre-LN models) + head   new, trainable (initialised from the source's, or at random)
The head's decoder weight is tied to the (frozen) input embeddings, so only its dense/LayerNorm/bias train.
Everything works through the generic Hugging Face API (any BERT-class AutoModelForMaskedLM: XLM-R, RoBERTa, BERT,
MegatronBert): because the mini-model is a prefix of the source, its state dict is a subset of the source's.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Literal

import deepspeed
import torch
from torch import nn
from transformers import AutoModelForMaskedLM

from minimodel.errors import UserError
from minimodel.hf import embeddings_fit, load_model
from minimodel.training.hf_mlm import check_architecture, encoder_layers, mlm_head

log = logging.getLogger(__name__)

Init = Literal["source", "random"]


class MiniPostError(UserError):
    """A problem with MiniPost's inputs; the message says what is wrong and how to fix it."""


def source_model_dir(path: str | os.PathLike) -> Path | None:
    """The Hugging Face model directory `path` names: an export directory's (pretrain/export.py) primary/, or `path`
    itself; None where there is neither (yet)."""
    path = Path(path)
    return next((d for d in (path / "primary", path) if (d / "config.json").is_file()), None)


def resolve_source(path: str | os.PathLike) -> Path:
    """A Hugging Face model directory, or an export directory (pretrain/export.py) holding primary/."""
    path = Path(path)
    if (found := source_model_dir(path)) is not None:
        return found
    if not path.exists():
        raise MiniPostError(f"source {path} does not exist: give a Hugging Face model directory or an export "
                            f"directory written by pretrain/export.py")
    raise MiniPostError(f"source {path} is neither a Hugging Face model directory (no config.json) nor an export "
                        f"directory (no primary/config.json); export a megatron checkpoint with pretrain/export.py "
                        f"first")


def load_source_model(model_dir: str | os.PathLike, head_init: Init = "source", distill: bool = False) -> nn.Module:
    """Load the source masked LM (fp32, eval mode) offline; refuse a checkpoint without an MLM head unless
    head_init="random" (then the head is created at random and the log says so) and nothing distills from its
    predictions (`distill`)."""
    model, info = load_model(model_dir, AutoModelForMaskedLM, output_loading_info=True)  # refuses a missing body
    head_missing = sorted(info["missing_keys"])
    if head_missing:
        if head_init == "source":
            raise MiniPostError(
                f"{model_dir} has no masked-LM head (missing {', '.join(head_missing)}): it was saved without one "
                f"(as {model.config.architectures}). Use a checkpoint with its MLM head, or set mini.head_init=random "
                f"to train a new head from scratch (with mini.head_only=true: the whole model with a trained head, "
                f"a primary for every adaptation method)")
        if distill:
            raise MiniPostError(f"{model_dir} has no masked-LM head, so it has no predictions to distill: set "
                                f"distill.weight=0 to train the new head on the gold tokens alone")
        log.warning("%s has no masked-LM head: MiniPost creates a new one at random (mini.head_init=random)", model_dir)
    check_architecture(model, str(model_dir))
    model.eval()
    return model


def check_tokenizer(tokenizer, config, where: str) -> None:
    """Refuse a tokenizer that does not belong to a model with this config."""
    n, vocab = len(tokenizer), config.vocab_size
    if n > vocab:
        raise MiniPostError(f"the tokenizer from {where} has {n} tokens but the model has only {vocab} embedding "
                            f"rows: they do not belong together; use the tokenizer the model was trained with")
    if not embeddings_fit(n, vocab):
        raise MiniPostError(f"the tokenizer from {where} has {n} tokens but the model has {vocab} embedding rows "
                            f"(more than vocabulary padding explains): use the tokenizer the model was trained with")
    if tokenizer.mask_token_id is None:
        raise MiniPostError(f"the tokenizer from {where} has no mask token: masked-LM training needs one")
    pad = getattr(config, "pad_token_id", None)
    if pad is not None and tokenizer.pad_token_id != pad:
        raise MiniPostError(f"the tokenizer from {where} pads with id {tokenizer.pad_token_id} but the model's "
                            f"pad_token_id is {pad}: use the tokenizer the model was trained with")


def check_same_vocabulary(data_tokenizer, model_tokenizer, data_where: str, model_where: str) -> None:
    if data_tokenizer.get_vocab() != model_tokenizer.get_vocab():
        raise MiniPostError(f"the data was tokenized with {data_where}, whose vocabulary differs from the model's "
                            f"tokenizer ({model_where}): build the data with the model's tokenizer")


def layers_name(model: nn.Module) -> str:
    """The state-dict prefix of the transformer layers, e.g. "roberta.encoder.layer"."""
    layers = encoder_layers(model)
    return next(name for name, module in model.named_modules() if module is layers)


# Norms applied after the last layer, by model type: the mini-model's own, trained with its new layers.
TOP_NORMS = {"megatron-bert": ("encoder.ln",), "xlm-roberta-xl": ("encoder.LayerNorm",)}


def split_parameters(mini: nn.Module, frozen_layers: int) -> tuple[list[str], list[str]]:
    """(frozen, new) parameter names of a mini-model: the layers after the first `frozen_layers`, the head except
    the tied decoder weight, and a top norm (TOP_NORMS) are new; everything else is frozen: the embeddings, the
    first layers and what they read besides (DeBERTa's relative-position table, MPNet's attention bias). Decided by
    identity, so a tied parameter counts once, as the embedding it is."""
    new_ids = {id(p) for layer in encoder_layers(mini)[frozen_layers:] for p in layer.parameters()}
    new_ids.update(id(p) for p in mlm_head(mini).parameters())
    for name in TOP_NORMS.get(mini.config.model_type, ()):
        new_ids.update(id(p) for p in mini.base_model.get_submodule(name).parameters())
    new_ids -= {id(p) for p in mini.base_model.embeddings.parameters()}
    frozen, new = [], []
    for name, p in mini.named_parameters():
        (new if id(p) in new_ids else frozen).append(name)
    return frozen, new


def freeze(model: nn.Module, trainable: list[str]) -> None:
    """requires_grad only on the named parameters."""
    trainable = set(trainable)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def build_mini_model(source: nn.Module, layers: int, new_layers: int = 1, new_layer_init: Init = "source",
                     head_init: Init = "source", seed: int = 0) -> tuple[nn.Module, list[str]]:
    """The mini-model (same class as `source`, `layers + new_layers` layers) with only its new parameters
    trainable, and the names of those new parameters."""
    n_source = source.config.num_hidden_layers
    head_only = layers == n_source and new_layers == 0  # every layer frozen, the head trained (mini.head_only)
    if not (1 <= layers < n_source or head_only):
        raise MiniPostError(f"mini.layers={layers}: the mini-model keeps the first k layers of the {n_source}-layer "
                            f"source and adds new ones on top, so k must be between 1 and {n_source - 1} (or set "
                            f"mini.head_only=true to keep all layers and train the head alone)")
    if new_layers < 0:
        raise MiniPostError(f"mini.new_layers={new_layers} must be >= 0")
    depth = layers + new_layers
    if new_layer_init == "source" and depth > n_source:
        raise MiniPostError(f"mini.new_layers={new_layers} initialised from the source's layers "
                            f"{layers + 1}..{depth} needs layers + new_layers <= {n_source}; use fewer new layers "
                            f"or mini.new_layer_init=random")
    config = copy.deepcopy(source.config)
    config.num_hidden_layers = depth
    with torch.random.fork_rng(devices=[]):  # reproducible random init, global RNG untouched
        torch.manual_seed(seed)
        mini = type(source)(config)
    mini.eval()

    frozen, new = split_parameters(mini, layers)
    stack = layers_name(mini) + "."
    prefix = mini.base_model_prefix + "."

    def from_source(key: str) -> bool:
        if key.startswith(stack):
            index = int(key[len(stack):].split(".")[0])
            return index < layers or new_layer_init == "source"
        if not key.startswith(prefix):  # the head
            return head_init == "source"
        return True

    source_state = source.state_dict()
    mini.load_state_dict({k: source_state[k] for k in mini.state_dict() if from_source(k)}, strict=False)
    freeze(mini, new)
    return mini, new


def count_values(model: nn.Module, names: list[str]) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in names)


def changed_frozen_parameters(mini: nn.Module, source: nn.Module, frozen: list[str]) -> list[str]:
    """Names of `frozen` parameters of the (trained) mini-model whose values differ from the source's, compared
    in the mini-model's dtype (bf16 training casts the module). ZeRO-3-partitioned parameters are gathered first:
    a collective, so call it on every rank."""
    params = dict(mini.named_parameters())
    source_state = source.state_dict()
    changed = []
    for name in frozen:
        p = params[name]
        with deepspeed.zero.GatheredParameters([p]):  # a no-op unless ZeRO-3 partitioned p
            if not torch.equal(p.detach().cpu(), source_state[name].to(p.dtype)):
                changed.append(name)
    return changed
