"""The export stage: a MiniJoint checkpoint (any TP/PP layout) to two Hugging Face MegatronBertForMaskedLM
directories (the mapping itself: minimodel/models/minijoint/hf_format.py).

    <out>/primary/     embeddings + all L layers + the main MLM head
    <out>/mini/        embeddings + layers 1..m + the secondary head, with minimodel.json (kind "minijoint") pointing
                       at primary/; with secondary_head "none" the model has no mini-model and only primary/ is written
    <out>/export.json  the checkpoint exported and the logit check (max |HF - megatron| per model)

The export loads the checkpoint into an unpipelined TP=1 model in this process and checks that the Hugging Face
models reproduce its logits before anything is moved into place.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minimodel import distributed, faults
from minimodel.config import ConfigError, require, save_config
from minimodel.distributed import ParallelConfig
from minimodel.errors import MissingInputError
from minimodel.files import replace_dir, write_text_atomic
from minimodel.hf import load_tokenizer
from minimodel.manifest import write_manifest
from minimodel.models.minijoint import parallelize
from minimodel.models.minijoint.config import ModelConfig
from minimodel.models.minijoint.hf_format import hf_models, special_token_ids
from minimodel.provenance import claim_output, finish_output
from minimodel.stages import StageResult
from minimodel.tracking import Tracker, TrackingConfig
from minimodel.training.checkpoint import latest_checkpoint
from minimodel.training.hf_mlm import save_tokenizer_beside

PARITY_TOLERANCE = 1e-4


def _save(model, tokenizer_dir: Path, final_dir: Path) -> None:
    """save_pretrained, with the tokenizer's special ids, + the tokenizer (cut at the model's positions) into
    final_dir, atomically (a temporary directory renamed)."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    model.config.update(special_token_ids(tokenizer))
    model.save_pretrained(tmp)
    save_tokenizer_beside(model, tokenizer, tokenizer_dir, tmp)
    replace_dir(tmp, final_dir)


def _parity(megatron_chunk, models, cfg: ModelConfig, seed: int = 0) -> dict[str, float]:
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
        if name not in models:
            continue
        with torch.no_grad():
            theirs = models[name](input_ids=ids, attention_mask=mask).logits
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

    hf = hf_models(sd, saved, with_mini)  # in eval mode (no dropout); their configs keep the training values
    diffs = _parity(chunk, hf, saved)
    bad = {k: d for k, d in diffs.items() if not d <= PARITY_TOLERANCE}
    if bad:
        raise RuntimeError(f"exported models do not reproduce the megatron logits (max |diff| {bad} > "
                           f"{PARITY_TOLERANCE}); nothing was written")

    output_dir.mkdir(parents=True, exist_ok=True)
    primary, mini_dir = output_dir / "primary", output_dir / "mini"
    _save(hf["primary"], tokenizer_dir, primary)
    faults.point("write")
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
    claim_output(cfg.output_dir, cfg, resumable=False)
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
    finish_output(cfg.output_dir, cfg)
    mini = result["mini"] or ("not exported (mini=false)" if cfg.mini is False else
                              "none (the model has no secondary head; build one with pretrain/minipost.py)")
    return StageResult("finished", {**result, "mini": mini})
