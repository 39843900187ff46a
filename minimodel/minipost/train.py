"""MiniPost, paper step 1b: train the new top of a mini-model cut from a pretrained masked LM.

    source model (HF dir, or export dir with primary/)  ->  mini-model: embeddings + first k layers (frozen)
                                                             + new layer(s) + head (trained on source-language MLM)
Outputs, under `output_dir`:
    config.yaml           the resolved config
    checkpoints/          DeepSpeed checkpoints (a relaunch with the same output_dir resumes)
    metrics.jsonl         per-step metrics (also in MLflow)
    mini/                 the mini-model: Hugging Face format, same class as the source, tokenizer files, and
                          minimodel.json (kind "minipost") naming the primary model it is aligned with
    alignment.json        the alignment report at the start and at the end (also an MLflow artifact)

The objective is the paper's masked-LM loss on the source text, optionally mixed with distillation from the source
model (`distill.weight`): matching its predictions keeps the mini-model aligned with it, where the gold tokens alone
can pull the new top away from a cut that already matches (benchmarks/RESULTS.md, section 1b).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from minimodel import distributed
from minimodel.config import require, save_config
from minimodel.data.mlm_config import MLMDataConfig
from minimodel.files import replace_dir, write_text_atomic
from minimodel.hf import load_tokenizer
from minimodel.manifest import check_aligned, write_manifest
from minimodel.minipost.alignment import alignment_report, plot_alignment
from minimodel.minipost.build import (Init, MiniPostError, build_mini_model, changed_frozen_parameters,
                                      check_same_vocabulary, check_tokenizer, count_values, load_source_model,
                                      resolve_source, source_model_dir, split_parameters)
from minimodel.provenance import claim_output, finish_output
from minimodel.stages import StageResult
from minimodel.tracking import Tracker, TrackingConfig
from minimodel.training.config import DeepSpeedLoopConfig
from minimodel.training.deepspeed_loop import gather_full_params, train
from minimodel.training.hf_mlm import DistilledMLMLoss, MLMFlops, masked_lm_loss, require_positions

log = logging.getLogger(__name__)


@dataclass
class MiniConfig:
    layers: int = 4  # k: the source's first k layers (and its embeddings) are kept, frozen
    new_layers: int = 1  # new trainable layers on top
    new_layer_init: Init = "source"  # source: from the source's layers k+1..k+new_layers; random: fresh init
    head_init: Init = "source"  # source: the source's MLM head; random: a new head (also for sources without one)
    # every layer kept, frozen, no new layer: only the head trains. For a checkpoint saved without its MLM head (with
    # head_init=random): the mini/ written is the whole model with a head, a primary standard and mini-model
    # adaptation can learn through (the pipeline's primary_head: train)
    head_only: bool = False
    seed: int = 0  # for whatever is initialised at random


@dataclass
class DataConfig(MLMDataConfig):
    seq_length: int = 128  # (MiniJoint pretraining takes it from its model config)

    def validate(self) -> None:
        super().validate()
        require(self.seq_length >= 8, "data.seq_length", "must be >= 8")


@dataclass
class AlignmentConfig:
    primary_layer: int | None = None  # the primary's depth to compare the mini's top with (None: final layer)
    batch_size: int = 8
    batches: int = 16  # held-out batches measured


@dataclass
class DistillConfig:
    # loss = (1 - weight) x MLM on the gold tokens + weight x soft cross-entropy against the source model's predictions
    # at the masked positions; > 0 runs the source model forward on every batch too. 0: the paper's MLM alone, whose
    # mini-model drifted from its primary and lost the transfer on 2 of 3 seeds (benchmarks/RESULTS.md, section 1b)
    weight: float = 1.0
    temperature: float = 1.0


@dataclass
class MiniPostConfig:
    source: str = ""  # Hugging Face masked-LM directory, or an export directory of pretrain/export.py (primary/)
    tokenizer: str | None = None  # None: the tokenizer saved with the source
    output_dir: str = "runs/minipost/default"
    mini: MiniConfig = field(default_factory=MiniConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: DeepSpeedLoopConfig = field(default_factory=DeepSpeedLoopConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # a directory holding another config's run (finished or not): discard it (else: an error naming the change)
    overwrite: bool = False
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(bool(self.source), "source", "give the pretrained masked LM to start from (a Hugging Face model "
                                             "directory or an export directory)")
        require(self.mini.layers >= 1, "mini.layers", "must be >= 1")
        require(self.mini.new_layers >= 0, "mini.new_layers", "must be >= 0")
        require(self.alignment.batches >= 1 and self.alignment.batch_size >= 1, "alignment.batches",
                "alignment.batches and alignment.batch_size must be >= 1")
        require(0.0 <= self.distill.weight <= 1.0, "distill.weight", "must be between 0 (MLM only) and 1 (only the "
                                                                    "source model's predictions)")
        require(self.distill.temperature > 0, "distill.temperature", "must be > 0")
        require_positions(self.data.seq_length, "data.seq_length", {"source": source_model_dir(self.source)})


def _write_mini_model(model, tokenizer, out_dir: Path, manifest: dict) -> Path:
    """Save atomically: a crash leaves the previous mini/ (if any) intact."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, **manifest)  # kind, layers, primary_dir, extra fields
    return replace_dir(tmp, out_dir)


def run_minipost(cfg: MiniPostConfig) -> StageResult:
    """Outputs on rank 0: the mini-model's directory and its alignment with the source at the end."""
    # Inputs first: a bad input fails here, before any run is created or anything written.
    cfg.data.check_files()
    source_dir = resolve_source(cfg.source)
    tokenizer_dir = Path(cfg.tokenizer) if cfg.tokenizer else source_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    source = load_source_model(source_dir, cfg.mini.head_init, distill=cfg.distill.weight > 0)
    check_tokenizer(tokenizer, source.config, str(tokenizer_dir))
    check_same_vocabulary(load_tokenizer(cfg.data.tokenizer_dir), tokenizer, cfg.data.tokenizer_dir,
                          str(tokenizer_dir))
    depth = source.config.num_hidden_layers
    if cfg.alignment.primary_layer is not None and not 1 <= cfg.alignment.primary_layer <= depth:
        raise MiniPostError(f"alignment.primary_layer={cfg.alignment.primary_layer}: the source has layers 1..{depth} "
                            f"(null compares with its final layer)")
    layers, new_layers = (depth, 0) if cfg.mini.head_only else (cfg.mini.layers, cfg.mini.new_layers)
    build = dict(layers=layers, new_layers=new_layers, new_layer_init=cfg.mini.new_layer_init,
                 head_init=cfg.mini.head_init, seed=cfg.mini.seed)
    mini, new_params = build_mini_model(source, **build)
    log.info("mini-model: %s, %d frozen + %d new layers; trainable: %d tensors, %.3gM values (of %.3gM)",
             type(mini).__name__, layers, new_layers, len(new_params),
             count_values(mini, new_params) / 1e6, sum(p.numel() for p in mini.parameters()) / 1e6)
    train_data = cfg.data.dataset("train", tokenizer, cfg.data.seq_length, seed=cfg.train.seed)
    valid_data = cfg.data.dataset("valid", tokenizer, cfg.data.seq_length, seed=0)

    distributed.initialize_deepspeed()
    rank0 = dist.get_rank() == 0
    device = torch.device(get_accelerator().device_name(int(os.environ["LOCAL_RANK"])))
    out = Path(cfg.output_dir)
    claimed = claim_output(out, cfg, resumable=True, overwrite=cfg.overwrite)
    if claimed == "finished" and (out / "alignment.json").is_file():
        if rank0:
            log.info("%s: already built with this config: skipping", out / "mini")
        return StageResult("finished", {"mini_model": out / "mini",
                                        "alignment": json.loads((out / "alignment.json").read_text())["end"]})
    if rank0:
        save_config(cfg, out / "config.yaml")
    tags = {"stage": "minipost", "method": "minipost", "source_lang": cfg.data.source_lang,
            "source_model": str(source_dir), "mini_layers": f"{layers}+{new_layers}"}

    def report(model) -> dict:
        return alignment_report(source, model, valid_data, cfg.alignment.batch_size, cfg.alignment.batches,
                                cfg.alignment.primary_layer, device)

    def log_report(tracker: Tracker, values: dict, step: int) -> None:
        tracker.log_metrics({f"alignment/{k}": values[k] for k in ("mini_mlm_loss", "primary_mlm_loss",
                                                                   "prediction_kl", "cka", "cosine")}, step=step)
        log.info("alignment at step %d: %s", step, values)

    with Tracker.resumable(cfg.tracking, out, cfg, tags=tags, resume=claimed == "resume") as tracker:
        start = report(mini) if rank0 else None
        if rank0:
            log_report(tracker, start, step=0)
        loss_fn, flops_fn = _objective(cfg.distill, mini, source, device)
        result = train(cfg.train, mini, train_data, loss_fn, flops_fn, output_dir=out,
                       eval_data=valid_data, tracker=tracker, desc="minipost")
        source.to("cpu")  # the teacher's place during training; the checks and the saved copy below read it there
        if result.interrupted:
            tracker.interrupted(result.step)
            return StageResult("interrupted", {"step": result.step})  # the same command resumes
        # Only the new parameters may have moved: checked on the trained model itself (collective).
        frozen_params, _ = split_parameters(mini, layers)
        changed = changed_frozen_parameters(mini, source, frozen_params)
        if changed:
            raise RuntimeError(f"frozen parameters changed during training: {changed[:5]}")
        params = dict(mini.named_parameters())
        trained = gather_full_params(result.engine, {name: params[name] for name in new_params})  # collective
        outputs = {}
        if rank0:
            # The saved model = a fresh copy of the source's frozen part (exact fp32 values whatever the training
            # precision) + the trained new parameters.
            final, _ = build_mini_model(source, **build)
            final.load_state_dict(trained, strict=False)
            mini_dir = _write_mini_model(final, tokenizer, out / "mini", dict(
                kind="minipost", layers=layers, primary_dir=source_dir, new_layers=new_layers,
                new_parameters=new_params, tokenizer=str(tokenizer_dir.resolve()), source_lang=cfg.data.source_lang))
            check_aligned(mini_dir, source_dir)
            alignment = {"start": start, "end": report(final), "frozen_parameters_checked": len(frozen_params)}
            log_report(tracker, alignment["end"], step=result.step)
            _write_report(alignment, out, tracker)
            finish_output(out, cfg)
            outputs = {"mini_model": mini_dir, "alignment": alignment["end"]}
        dist.barrier()
    return StageResult("finished", outputs)


def _objective(cfg: DistillConfig, mini, source, device):
    """(loss, FLOPs per batch) of MiniPost's training: MLM, or MLM mixed with distillation from the source model,
    whose forward pass (no backward: frozen) then counts in the FLOPs."""
    if cfg.weight == 0:
        return masked_lm_loss, MLMFlops(mini)
    source.requires_grad_(False).to(device)
    mini_flops, teacher_flops = MLMFlops(mini), MLMFlops(source)  # the source: forward only, nothing trains
    return (DistilledMLMLoss(source, cfg.weight, cfg.temperature),
            lambda batch: mini_flops(batch) + teacher_flops(batch))


def _write_report(alignment: dict, out: Path, tracker: Tracker) -> None:
    """alignment.json + alignment.png in the output dir and as MLflow artifacts."""
    # pyplot with the Agg backend (no display on compute nodes) only when drawing: importing this module must not
    # switch the backend of whoever imports it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    path = write_text_atomic(out / "alignment.json", json.dumps(alignment, indent=2))
    figure = plot_alignment(alignment)
    figure.savefig(out / "alignment.png", dpi=120)
    matplotlib.pyplot.close(figure)
    tracker.log_artifact(path)
    tracker.log_artifact(out / "alignment.png")
