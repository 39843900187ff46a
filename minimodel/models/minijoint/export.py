"""Export a MiniJoint checkpoint (any TP/PP layout) to two Hugging Face MegatronBertForMaskedLM directories.

    <out>/primary/   embeddings + all L layers + the main MLM head
    <out>/export.json  the checkpoint exported and the logit check (max |HF - megatron| per model)
    <out>/mini/      embeddings + layers 1..m + the secondary head (its final LayerNorm becomes encoder.ln),
                     with minimodel.json (kind "minijoint") pointing at primary/. With secondary_head
                     "shared_transform" that head is the main head's own parameters; with "none" the model has no
                     mini-model and only primary/ is written.

Both are pre-LayerNorm MegatronBert models with exact (erf) gelu, learned positions from 0, and a single,
zeroed token-type embedding (type_vocab_size=1), so HF adds nothing to our embeddings. The padded vocabulary
rows are dropped. The export loads the checkpoint into an unpipelined TP=1 model in this process and checks that
the Hugging Face models reproduce its logits before anything is moved into place.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minimodel import distributed
from minimodel.config import ConfigError, require, save_config
from minimodel.distributed import ParallelConfig
from minimodel.errors import MissingInputError
from minimodel.files import replace_dir, write_text_atomic
from minimodel.manifest import write_manifest
from minimodel.models.minijoint import parallelize
from minimodel.models.minijoint.config import ModelConfig
from minimodel.stages import StageResult
from minimodel.tracking import Tracker, TrackingConfig

PARITY_TOLERANCE = 1e-4
# The megatron module whose parameters are the mini-model's MLM head, per ModelConfig.secondary_head.
MINI_HEAD = {"separate": "aux_head", "shared_transform": "lm_head"}


def hf_config(cfg: ModelConfig, layers: int, tie_word_embeddings: bool):
    from transformers import MegatronBertConfig

    return MegatronBertConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=layers,
        num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.ffn_size, hidden_act="gelu",
        hidden_dropout_prob=cfg.hidden_dropout, attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.seq_length, type_vocab_size=1, initializer_range=cfg.init_method_std,
        layer_norm_eps=cfg.layernorm_epsilon, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings)


def hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, layers: int, head: str) -> dict[str, torch.Tensor]:
    """Map an unpipelined TP=1 MiniJoint state dict to MegatronBertForMaskedLM with `layers` layers and the
    MLM head `head` ("lm_head" or "aux_head")."""
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
        for ours, theirs in (("input_layernorm", "attention.ln"), ("self_attention.linear_proj", "attention.output.dense"),
                             ("pre_mlp_layernorm", "ln"), ("mlp.linear_fc1", "intermediate.dense"),
                             ("mlp.linear_fc2", "output.dense")):
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


def _hf_model(sd, cfg: ModelConfig, layers: int, head: str, tie: bool):
    from transformers import MegatronBertForMaskedLM

    model = MegatronBertForMaskedLM(hf_config(cfg, layers, tie)).eval()
    model.load_state_dict(hf_state_dict(sd, cfg, layers, head), strict=True)
    return model


def _save(model, tokenizer_dir: Path, final_dir: Path) -> None:
    """save_pretrained + the tokenizer files into final_dir, atomically (a temporary directory renamed)."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, final_dir)


def _parity(megatron_chunk, hf_models, cfg: ModelConfig, seed: int = 0) -> dict[str, float]:
    """Max |logit difference| between the megatron heads and the exported models on a random padded batch."""
    g = torch.Generator().manual_seed(seed)
    seq = min(cfg.seq_length, 32)
    dev = distributed.device()
    ids = torch.randint(3, cfg.vocab_size, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, seq // 2:] = 0
    main, secondary = megatron_chunk.mlm_logits(ids.to(dev), mask.to(dev))
    keep = mask.bool()
    diffs = {}
    for name, ours in (("primary", main), ("mini", secondary)):
        if name not in hf_models:
            continue
        with torch.no_grad():
            theirs = hf_models[name](input_ids=ids, attention_mask=mask).logits
        diffs[name] = (ours.float().cpu()[keep] - theirs[keep]).abs().max().item()
    return diffs


def export(checkpoint: str | os.PathLike, tokenizer_dir: str | os.PathLike, output_dir: str | os.PathLike,
           mini: bool | None = None) -> dict:
    """Write <output_dir>/primary and <output_dir>/mini from a MiniJoint checkpoint; returns
    {"primary": path, "mini": path or None, "max_logit_diff": {"primary": ..., "mini": ...}}.

    `mini`: None exports the mini-model when the model has one (not with secondary_head "none"); True requires
    it; False skips it.
    """
    checkpoint, tokenizer_dir, output_dir = Path(checkpoint), Path(tokenizer_dir), Path(output_dir)
    if not (checkpoint / "metadata.json").is_file():
        raise MissingInputError(f"{checkpoint} is not a megatron dist_checkpointing checkpoint (no metadata.json); "
                                f"pass the directory a pretraining run saved, e.g. <run>/checkpoints/iter_0000100")
    if not tokenizer_dir.is_dir():
        raise MissingInputError(f"tokenizer directory {tokenizer_dir} does not exist (pretrain/prepare_data.py "
                                f"writes it to <data>/<lang>/tokenizer)")
    single = ParallelConfig(micro_batch_size=1, global_batch_size=1, precision="fp32")
    if not distributed.is_initialized():
        distributed.initialize(single, seed=0)
    if distributed.world_size() != 1:
        raise RuntimeError("export runs in one process: start it with python, not torchrun")
    # Exact weights, no dropout: the exported configs keep the training dropout values.
    saved = parallelize.read_model_config(checkpoint)
    has_mini = saved.secondary_head != "none"
    if mini and not has_mini:
        raise ConfigError(f"mini: checkpoint {checkpoint} was pretrained without a secondary head "
                          f"(model.secondary_head=none, plain MLM), so it has no MiniJoint mini-model; export it "
                          f"with mini=false and build a mini-model from the exported primary with pretrain/minipost.py")
    with_mini = has_mini if mini is None else mini
    cfg = dataclasses.replace(saved, hidden_dropout=0.0, attention_dropout=0.0)
    model = parallelize.build_model(cfg, single)
    parallelize.load_checkpoint_into(model, checkpoint)
    chunk = parallelize.unwrap(model[0]).eval()
    sd = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}

    hf = {"primary": _hf_model(sd, saved, saved.num_layers, "lm_head", tie=True)}
    if with_mini:
        hf["mini"] = _hf_model(sd, saved, saved.mini_layers, MINI_HEAD[saved.secondary_head],
                               tie=saved.share_aux_output_embedding)
    for m in hf.values():  # compare without dropout; the saved config keeps the training values
        m.eval()
    diffs = _parity(chunk, hf, saved)
    bad = {k: d for k, d in diffs.items() if not d <= PARITY_TOLERANCE}
    if bad:
        raise RuntimeError(f"exported models do not reproduce the megatron logits (max |diff| {bad} > "
                           f"{PARITY_TOLERANCE}); nothing was written")

    output_dir.mkdir(parents=True, exist_ok=True)
    primary, mini_dir = output_dir / "primary", output_dir / "mini"
    _save(hf["primary"], tokenizer_dir, primary)
    if not with_mini:
        shutil.rmtree(mini_dir, ignore_errors=True)  # an earlier export's mini-model is not aligned with this primary
        return {"primary": str(primary), "mini": None, "max_logit_diff": diffs}
    _save(hf["mini"], tokenizer_dir, mini_dir)
    write_manifest(mini_dir, kind="minijoint", layers=saved.mini_layers, primary_dir=primary,
                   new_parameters=[], tokenizer=str(tokenizer_dir.resolve()), checkpoint=str(checkpoint.resolve()),
                   secondary_head=saved.secondary_head, shares_output_embedding=saved.share_aux_output_embedding)
    return {"primary": str(primary), "mini": str(mini_dir), "max_logit_diff": diffs}


@dataclass
class ExportConfig:
    checkpoint: str = ""  # a checkpoint dir saved by pretrain/train.py, or their root (its newest complete one)
    tokenizer: str = ""  # the HF tokenizer directory the model was trained with
    output_dir: str = "export"
    # Also export the MiniJoint mini-model (mini/): null = when the model has one (not with secondary_head none)
    mini: bool | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(bool(self.checkpoint), "checkpoint", "give the checkpoint directory to export (checkpoint=...)")
        require(bool(self.tokenizer), "tokenizer", "give the tokenizer directory (tokenizer=<data>/<lang>/tokenizer)")


def run(cfg: ExportConfig) -> StageResult:
    """The export stage: resolved config saved, one tracked run; outputs: export()'s paths and logit differences."""
    from minimodel.training.checkpoint import latest_checkpoint

    save_config(cfg, Path(cfg.output_dir) / "config.yaml")
    checkpoint = Path(cfg.checkpoint)
    if not (checkpoint / "metadata.json").is_file():  # a checkpoint root: export its newest complete checkpoint
        newest = latest_checkpoint(checkpoint)
        if newest is None:
            raise MissingInputError(f"{checkpoint} holds no complete checkpoint: give a directory written by "
                                    f"pretrain/train.py (e.g. <output_dir>/checkpoints)")
        checkpoint = newest
    with Tracker(cfg.tracking, config=cfg, tags={"stage": "export", "method": "minijoint"}) as tracker:
        result = export(checkpoint, cfg.tokenizer, cfg.output_dir, mini=cfg.mini)
        write_text_atomic(Path(cfg.output_dir) / "export.json", json.dumps(
            {"checkpoint": str(checkpoint), "max_logit_diff": result["max_logit_diff"]}, indent=2))
        tracker.log_metrics({f"max_logit_diff_{k}": v for k, v in result["max_logit_diff"].items()}, step=0)
    mini = result["mini"] or "none (the model has no secondary head; build one with pretrain/minipost.py)"
    return StageResult("finished", {**result, "mini": mini})
