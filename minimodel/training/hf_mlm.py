"""The masked-LM objective and its compute cost for any Hugging Face BERT-class *ForMaskedLM model.

Works with MegatronBert (our exports), BERT, RoBERTa and XLM-R alike: the body is `model.base_model`, its layers
`base_model.encoder.layer`, and the LM head is the model's child module holding `get_output_embeddings()`.

- `masked_lm_loss(model, batch)`: cross-entropy at the masked positions only. The head (dense + vocabulary
  projection) runs on those positions alone, not on every token as `model(...)` would: with a 50k vocabulary the
  projection is most of the step's cost at 15% masking.
- `DistilledMLMLoss(teacher, weight, temperature)`: the same loss mixed with matching a frozen teacher's
  predictions at those positions (soft cross-entropy), e.g. MiniPost's mini-model kept aligned with its primary.
- `MLMFlops(model)(batch)`: FLOPs one forward + backward of that loss really costs, from the model's shapes and
  from which parameters require gradients (frozen weights get no weight-gradient matmul; layers below every
  trainable parameter get no backward at all). Matmul FLOPs only, the usual convention (elementwise ops, softmax,
  LayerNorm are ignored); padded positions cost what real ones cost, as they do in dense kernels.
"""
from __future__ import annotations

import copy
import functools
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM

from minimodel.config import ConfigError
from minimodel.errors import UserError

# The model types the masked-LM code, the mini-model and the FLOP count are tested on (tests/test_hf.py): others
# of the same layout may read wrong all the same (MobileBERT's embeddings do not resize, FNet's FLOPs are not
# counted right, a pre-LN RoBERTa's final norm would stay frozen in the mini-model)
SUPPORTED_TYPES = {"bert": "BERT, mBERT", "roberta": "RoBERTa", "xlm-roberta": "XLM-R",
                   "xlm-roberta-xl": "XLM-R XL/XXL", "camembert": "CamemBERT",
                   "deberta-v2": "DeBERTa-v2/v3 (legacy MLM head)", "megatron-bert": "MegatronBERT", "mpnet": "MPNet"}
SUPPORTED = f"BERT-class encoders: {', '.join(SUPPORTED_TYPES.values())}"
PRE_LN_TYPES = {"megatron-bert", "xlm-roberta-xl"}  # a layer norm before attention; the others' Q, K, V read the input


class UnsupportedModelError(UserError):
    """A masked LM whose layout the code here does not read right."""


def mlm_head(model: nn.Module) -> nn.Module:
    """The child module of a *ForMaskedLM model that maps hidden states to vocabulary logits."""
    out = model.get_output_embeddings()
    if out is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings: a *ForMaskedLM model is needed here")
    for child in model.children():
        if child is not model.base_model and any(m is out for m in child.modules()):
            return child
    raise ValueError(f"cannot find the LM head of {type(model).__name__} (no child module holds its output embeddings)")


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} is not a BERT-class encoder (its layers are not at "
                         "base_model.encoder.layer)")
    return layers


def check_architecture(model: nn.Module, where: str) -> None:
    """Refuse, naming the class, a masked LM this module would read wrong: layers not at base_model.encoder.layer
    (ALBERT, DistilBERT, XLM, ModernBERT), input and output embeddings of different widths (RemBERT), logits that
    are not mlm_head applied to the top hidden states (ELECTRA, whose head transform is another child), or a model
    type not in SUPPORTED_TYPES."""
    def refuse(why: str):
        raise UnsupportedModelError(f"{where}: {type(model).__name__} is not supported ({why}); supported are "
                                    f"{SUPPORTED}")

    try:
        encoder_layers(model)
        head = mlm_head(model)
    except ValueError as e:
        refuse(str(e))
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or inputs.weight.shape[1] != outputs.weight.shape[1]:
        refuse("its output embeddings are not of its input embeddings' width")
    if inputs.weight.shape[0] != outputs.weight.shape[0]:  # e.g. DeBERTa-v2's non-legacy head names its h x h dense
        refuse("its output embeddings are not a projection onto its vocabulary")
    pad = model.config.pad_token_id
    ids = torch.tensor([[i for i in range(1, 10) if i != pad][:8]], device=inputs.weight.device)
    training = model.training
    model.eval()  # dropout off: the two paths must agree exactly
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            direct = head(model.base_model(input_ids=ids).last_hidden_state)
    except (RuntimeError, TypeError) as e:  # e.g. a head that expects a projection, or other arguments
        refuse(f"its LM head does not take the top hidden states: {e}")
    finally:
        model.train(training)
    if not torch.allclose(direct, logits, rtol=1e-5, atol=1e-5 * float(logits.abs().max())):
        refuse("its logits are not its LM head applied to the top hidden states: part of the head sits elsewhere")
    if model.config.model_type not in SUPPORTED_TYPES:
        refuse(f"model type {model.config.model_type!r}: not one this code is tested on")


def _one_layer_model(config, where: str) -> nn.Module:
    """A masked LM of this config with one layer of random weights (and a small vocabulary when its special ids
    allow): what the config says, without loading the weights."""
    small = copy.deepcopy(config)
    special = [v for k, v in vars(config).items() if k.endswith("token_id") and isinstance(v, int)]
    if max(special, default=0) < 64:
        small.vocab_size = min(config.vocab_size, 64)
    try:
        small.num_hidden_layers = 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return AutoModelForMaskedLM.from_config(small)
    except Exception as e:  # e.g. Funnel's config refuses a layer count, ESM's model needs settings it lacks
        raise UnsupportedModelError(f"{where}: {type(config).__name__} is not supported (no masked LM of one layer "
                                    f"can be built from it: {type(e).__name__}: {e}); supported are {SUPPORTED}")


def check_model_config(config, where: str) -> None:
    """check_architecture on a one-layer model of this config: the check without loading the weights."""
    check_architecture(_one_layer_model(config, where), where)


@functools.lru_cache(maxsize=64)
def _positions(config_json: str, modified_ns: int) -> int | None:
    try:
        config = AutoConfig.from_pretrained(str(Path(config_json).parent), local_files_only=True)
        return max_sequence_length(_one_layer_model(config, config_json))
    except (OSError, ValueError, UnsupportedModelError):  # not a model this code reads: its stage says so
        return None


def require_positions(length: int, key: str, models: dict[str, str | os.PathLike | None]) -> None:
    """`key`'s sequence length within the positions of every model ({config key: directory}) that exists (one a
    stage before makes is checked when it has): a config check, not an index error after hours of the stages
    before, or a claimed output directory that refuses the corrected command."""
    for model_key, model_dir in models.items():
        config = Path(model_dir or "") / "config.json"
        longest = _positions(str(config.absolute()), config.stat().st_mtime_ns) if config.is_file() else None
        if longest is not None and length > longest:  # keyed by the model: one a stage before makes again is its
            raise ConfigError(f"{key}: {length} is longer than the positions of {model_dir} ({model_key}) allow "
                              f"({longest}): lower {key}", model_key)


def max_sequence_length(model: nn.Module) -> int:
    """The longest input its position embeddings take: RoBERTa-style embeddings (XLM-R, CamemBERT, MPNet) number
    positions from padding_idx + 1, leaving those first rows unused."""
    padding_idx = getattr(model.base_model.embeddings, "padding_idx", None)
    return model.config.max_position_embeddings - (0 if padding_idx is None else padding_idx + 1)


def save_tokenizer_beside(model: nn.Module, tokenizer, source_dir: str | os.PathLike,
                          model_dir: str | os.PathLike) -> None:
    """Save `tokenizer` (read from `source_dir`) into `model_dir`, cut at what the model's positions take:
    truncation=True then stops where the model must (a tokenizer trained here has no limit, and a long text indexed
    past the position embeddings); the files save_pretrained does not write (sentencepiece.bpe.model) are copied."""
    tokenizer.model_max_length = max_sequence_length(model)
    tokenizer.save_pretrained(str(model_dir))
    for extra in Path(source_dir).iterdir():
        if extra.is_file() and not (Path(model_dir) / extra.name).exists():
            shutil.copyfile(extra, Path(model_dir) / extra.name)


def masked_lm_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(top hidden states [batch, seq, h], vocabulary logits at the positions with labels != -100 [n, V])."""
    body = model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    hidden = body.last_hidden_state
    return hidden, mlm_head(model)(hidden[batch["labels"] != -100])


def masked_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over positions with labels != -100; batch: input_ids, labels, attention_mask."""
    hidden, logits = masked_lm_logits(model, batch)
    labels = batch["labels"]
    if logits.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph (and DeepSpeed's hooks) intact on an all-unmasked batch
    return F.cross_entropy(logits.float(), labels[labels != -100])


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 2.0) -> torch.Tensor:
    """-sum softmax(t/T) * log_softmax(s/T) over the last dimension, averaged over the rest."""
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)  # fp32: bf16 logits, a 250k softmax
    return -(target * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(-1).mean()


class DistilledMLMLoss:
    """(model, batch) -> (1 - weight) x masked_lm_loss + weight x soft cross-entropy against a frozen teacher's
    logits at the same masked positions (the teacher: a *ForMaskedLM with the model's vocabulary, on its device)."""

    def __init__(self, teacher: nn.Module, weight: float, temperature: float = 1.0):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distillation weight {weight} must be between 0 and 1")
        self.teacher, self.weight, self.temperature = teacher, weight, temperature

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden, logits = masked_lm_logits(model, batch)
        labels = batch["labels"]
        if logits.shape[0] == 0:
            return hidden.sum() * 0.0  # as masked_lm_loss
        with torch.no_grad():
            _, teacher_logits = masked_lm_logits(self.teacher, batch)
        gold = F.cross_entropy(logits.float(), labels[labels != -100])
        soft = soft_cross_entropy(logits.float(), teacher_logits.float(), self.temperature)
        return (1.0 - self.weight) * gold + self.weight * soft


def _requires_grad(module: nn.Module | None, exclude: set[int] = frozenset()) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters() if id(p) not in exclude)


class MLMFlops:
    """batch -> FLOPs of forward + backward of `masked_lm_loss` on that batch (one rank).

    Per sequence of length s, with hidden h, FFN width f, vocabulary V and n masked positions:
      layer forward: linear 2s(4h^2 + 2hf) + attention 4s^2h
      layer backward (if a gradient passes through it): activation gradients = linear + 2 x attention,
                      + weight gradients = linear when the layer itself trains; the lowest layer that trains
                      (nothing below it does) of a post-LN model (BERT, XLM-R: Q, K and V read the layer's input)
                      needs no gradient into its input through them: - 2s 3h^2
      head forward:  2n(h^2 + hV); backward: activation gradients through the projection 2nhV when anything
                      below or the head's dense layer trains, through the dense layer 2nh^2 when anything below
                      trains, + 2nhV if the vocabulary projection trains, + 2nh^2 if the head's dense layer trains.
    Factorised embeddings of rank d (minimodel/ofa/factorized.py: E = C P, tied): the projection hV becomes
    hd + dV (its weight gradient dV, P frozen), and the input side costs 2s dh per sequence (C[ids] P), twice when
    C trains (the gradient into C's rows).
    DeBERTa's disentangled attention, with t of its c2p / p2c terms over a span of k relative positions: attention
    + 4tskh per sequence (in the backward once, toward the queries, and twice where the layer trains: its relative
    keys then need gradients too), and per layer and batch the projection of the 2k relative embeddings, 2t(2k)h^2
    (twice when the layer trains: its weight gradient).
    The trainability pattern is read once, at construction: build this after setting requires_grad.
    """

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.hidden = cfg.hidden_size
        self.ffn = cfg.intermediate_size
        # DeBERTa(-v2)'s relative positions: 2 x span embeddings, each scored by t of c2p / p2c (0: BERT's attention)
        self.relative_span, self.relative_terms = 0, 0
        if getattr(cfg, "relative_attention", False):
            span = getattr(cfg, "position_buckets", -1)
            if span <= 0:
                span = cfg.max_relative_positions if cfg.max_relative_positions > 0 else cfg.max_position_embeddings
            self.relative_span = span
            self.relative_terms = len({"c2p", "p2c"} & set(getattr(cfg, "pos_att_type", None) or []))
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.rank = getattr(model.get_output_embeddings(), "rank", None)  # factorised embeddings, else None
        head = mlm_head(model)
        out_weight = model.get_output_embeddings().weight
        out_bias = model.get_output_embeddings().bias
        self.decoder_trains = out_weight.requires_grad
        head_own = {id(out_weight)} | ({id(out_bias)} if out_bias is not None else set())
        self.head_dense_trains = _requires_grad(head, exclude=head_own)
        grad_below = _requires_grad(model.base_model.embeddings)
        post_ln = cfg.model_type not in PRE_LN_TYPES
        self.layer_modes = []  # per layer: (backward through it?, weight gradients?, gradient into Q, K, V's input?)
        for layer in encoder_layers(model):
            trains = _requires_grad(layer)
            self.layer_modes.append((grad_below or trains, trains, grad_below or not post_ln))
            grad_below = grad_below or trains
        self.head_backward = grad_below
        self.layers = len(self.layer_modes)

    def per_batch(self, batch_size: int, seq_len: int, masked: int) -> float:
        h, f, s, v = self.hidden, self.ffn, seq_len, self.vocab
        linear, attention = 2.0 * s * (4 * h * h + 2 * h * f), 4.0 * s * s * h  # one layer's forward, a sequence
        relative = 4.0 * self.relative_terms * s * self.relative_span * h
        positions = 2.0 * self.relative_terms * 2 * self.relative_span * h * h  # once per batch, in every layer
        body, shared = 0.0, 0.0
        for backward, weight_grads, into_qkv in self.layer_modes:
            body += linear + attention + relative
            shared += positions * (2 if weight_grads else 1)
            if backward:
                body += linear - (0.0 if into_qkv else 6.0 * s * h * h) + 2 * attention
                body += relative * (2 if weight_grads else 1) + (linear if weight_grads else 0.0)
        if self.rank is None:
            projection, projection_weights, inputs = h * v, h * v, 0.0
        else:
            d = self.rank
            projection, projection_weights = h * d + d * v, d * v
            inputs = 2.0 * batch_size * seq_len * d * h * (2 if self.decoder_trains else 1)
        head = 2.0 * masked * (h * h + projection)
        if self.head_backward or self.head_dense_trains:  # the gradient into the dense layer's output
            head += 2.0 * masked * projection
        if self.head_backward:  # ... and on through it to the layers below
            head += 2.0 * masked * h * h
        head += (2.0 * masked * projection_weights if self.decoder_trains else 0.0)
        head += (2.0 * masked * h * h if self.head_dense_trains else 0.0)
        return batch_size * body + shared + head + inputs

    def __call__(self, batch: dict[str, torch.Tensor]) -> float:
        batch_size, seq_len = batch["input_ids"].shape
        return self.per_batch(batch_size, seq_len, int((batch["labels"] != -100).sum()))
