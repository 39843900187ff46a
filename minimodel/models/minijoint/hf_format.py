"""The MiniJoint model in Hugging Face's format: which parts make the primary model and the mini-model, their
MegatronBertConfig, and the mapping of an unpipelined TP=1 megatron state dict to MegatronBertForMaskedLM's. Pure:
no checkpoint or file I/O (minimodel/models/minijoint/export.py is the stage that reads and writes).

Both models are pre-LayerNorm MegatronBert with exact (erf) gelu, learned positions from 0 and a single, zeroed
token-type embedding (type_vocab_size=1), so HF adds nothing to our embeddings. The padded vocabulary rows are
dropped.
    primary: embeddings + all L layers + the main MLM head
    mini:    embeddings + layers 1..m + the secondary head (its final LayerNorm becomes encoder.ln); with
             secondary_head "shared_transform" that head is the main head's own parameters
"""
from __future__ import annotations

import torch
from transformers import MegatronBertConfig, MegatronBertForMaskedLM

from minimodel.models.minijoint.config import ModelConfig

# Megatron's Transformer Engine layer spec (GPU clusters) fuses each norm into the linear after it: its names -> the
# local spec's, which the mapping below reads (model.layer_spec's sharded_state_dict_keys_map, the other way round)
TE_NORM_NAMES = {".self_attention.linear_qkv.layer_norm_": ".input_layernorm.",
                 ".mlp.linear_fc1.layer_norm_": ".pre_mlp_layernorm."}

# The megatron module whose parameters are the mini-model's MLM head, per ModelConfig.secondary_head ("none": the
# model has no mini-model).
MINI_HEAD = {"separate": "aux_head", "shared_transform": "lm_head"}


def hf_config(cfg: ModelConfig, layers: int, tie_word_embeddings: bool) -> MegatronBertConfig:
    return MegatronBertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.ffn_size, hidden_act="gelu",
        hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.seq_length, type_vocab_size=1, initializer_range=cfg.init_method_std,
        layer_norm_eps=cfg.layernorm_epsilon, tie_word_embeddings=tie_word_embeddings)


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """The config's special ids of the tokenizer a model was trained with: a model config's pad id is its embedding's
    padding_idx (a row that never learns) and what loaders pad with. <s>/</s>, or [CLS]/[SEP] where there are none."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": bos, "eos_token_id": eos}


def hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, layers: int, head: str) -> dict[str, torch.Tensor]:
    """Map an unpipelined TP=1 MiniJoint state dict to MegatronBertForMaskedLM with `layers` layers and the
    MLM head `head` ("lm_head" or "aux_head"), whichever layer spec (local or Transformer Engine) named it."""
    for fused, local in TE_NORM_NAMES.items():
        sd = {k.replace(fused, local): t for k, t in sd.items()}
    v, h, nh = cfg.vocab_size, cfg.hidden_size, cfg.num_attention_heads
    word = sd["embedding.word_embeddings.weight"][:v]
    out = {
        "bert.embeddings.word_embeddings.weight": word,
        "bert.embeddings.position_embeddings.weight": sd["embedding.position_embeddings.weight"],
        "bert.embeddings.token_type_embeddings.weight": torch.zeros(1, h, dtype=word.dtype),
    }
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        # megatron's fused QKV rows are grouped per head: [head][q|k|v][head_dim].
        qkv_w = sd[src + "self_attention.linear_qkv.weight"].view(nh, 3, h // nh, h)
        qkv_b = sd[src + "self_attention.linear_qkv.bias"].view(nh, 3, h // nh)
        for j, name in enumerate(("query", "key", "value")):
            out[f"{dst}attention.self.{name}.weight"] = qkv_w[:, j].reshape(h, h)
            out[f"{dst}attention.self.{name}.bias"] = qkv_b[:, j].reshape(h)
        for ours, theirs in (("input_layernorm", "attention.ln"),
                             ("self_attention.linear_proj", "attention.output.dense"), ("pre_mlp_layernorm", "ln"),
                             ("mlp.linear_fc1", "intermediate.dense"), ("mlp.linear_fc2", "output.dense")):
            for p in ("weight", "bias"):
                out[f"{dst}{theirs}.{p}"] = sd[f"{src}{ours}.{p}"]
    for ours, theirs in (("final_layernorm", "bert.encoder.ln"), ("dense", "cls.predictions.transform.dense"),
                         ("layer_norm", "cls.predictions.transform.LayerNorm")):
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = sd[f"{head}.{ours}.{p}"]
    own_projection = sd.get(f"{head}.output_layer.weight")
    out["cls.predictions.decoder.weight"] = own_projection[:v] if own_projection is not None else word
    out["cls.predictions.bias"] = out["cls.predictions.decoder.bias"] = sd[f"{head}.output_layer.bias"][:v]
    return {k: t.detach().float().cpu().contiguous().clone() for k, t in out.items()}


def hf_models(sd: dict[str, torch.Tensor], cfg: ModelConfig, mini: bool) -> dict[str, MegatronBertForMaskedLM]:
    """{"primary": model, "mini": model (if `mini`)} in eval mode, holding the weights of `sd`."""
    parts = {"primary": (cfg.num_layers, "lm_head", True)}
    if mini:
        parts["mini"] = (cfg.mini_layers, MINI_HEAD[cfg.secondary_head], cfg.share_aux_output_embedding)
    models = {}
    for name, (layers, head, tie) in parts.items():
        models[name] = MegatronBertForMaskedLM(hf_config(cfg, layers, tie)).eval()
        models[name].load_state_dict(hf_state_dict(sd, cfg, layers, head), strict=True)
    return models
