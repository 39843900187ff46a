"""Step 3: fine-tune the primary model on a source-language task with the token embeddings frozen.

The model comes from any BERT-class masked-LM directory (our MegatronBertForMaskedLM export, XLM-R, BERT, ...),
loaded with the task's Auto class (sequence classification or extractive QA: a new, trainable head). Token
embeddings (and an LM head, where the class keeps one) are frozen, so that step 4 can swap in target-language
embeddings; the body, position embeddings and head train through the shared DeepSpeed loop
(minimodel/training/deepspeed_loop.py), which checkpoints and resumes.

Output <output_dir>/:
    model/          the task model (HF save_pretrained) + the source tokenizer + task.json
    train/          loop checkpoints and metrics.jsonl
    metrics.json    source-language dev/test metrics
    config.yaml     the resolved config
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch.distributed as dist

from minimodel import distributed
from minimodel.config import require, save_config
from minimodel.files import write_text_atomic
from minimodel.evaluation.features import training_features
from minimodel.evaluation.models import (check_tokenizer, freeze_embeddings, load_sft_task_model, load_task_model,
                                         write_task_model)
from minimodel.evaluation.scoring import score
from minimodel.evaluation.tasks import TaskConfig, load_examples
from minimodel.hf import load_tokenizer, require_model_dir
from minimodel.manifest import model_hash
from minimodel.sft.file import SparseFineTuning
from minimodel.sft.train import SFTConfig, check_loop_config, train_sft
from minimodel.provenance import claim_output, finish_output
from minimodel.stages import StageResult
from minimodel.tracking import Tracker, TrackingConfig
from minimodel.training.config import DeepSpeedLoopConfig, OptimizerConfig, ScheduleConfig
from minimodel.training.deepspeed_loop import gather_full_params, train
from minimodel.training.hf_mlm import require_positions

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    output_dir: str = "runs/evaluate/finetune"
    model_dir: str = ""  # the primary model: a Hugging Face masked-LM directory
    tokenizer: str | None = None  # the source tokenizer; default: the one saved in model_dir
    source_lang: str = "en"
    method: str = "shared"  # MLflow tag: step 3 is shared by every adaptation method of the same primary model
    task: TaskConfig = field(default_factory=TaskConfig)
    train: DeepSpeedLoopConfig = field(default_factory=lambda: DeepSpeedLoopConfig(
        steps=2000, micro_batch_size=32, optim=OptimizerConfig(lr=1e-5), schedule=ScheduleConfig(warmup_steps=200),
        zero_config="configs/deepspeed/zero1.json"))
    eval_splits: list[str] = field(default_factory=lambda: ["dev", "test"])
    eval_batch_size: int = 64
    # a directory holding another config's run (finished or not): discard it (else: an error naming the change)
    overwrite: bool = False
    # LT-SFT (method lt_sft): a sparse task fine-tuning (minimodel/sft/; embeddings sparse like the rest of the body,
    # the head dense) instead of dense fine-tuning with frozen embeddings, trained with the source-language SFT
    # `language_sft` (adapt/sft.py's <output_dir>/<lang>/sft) applied, as the reference does. The task SFT goes to
    # <output_dir>/train/sft/; model/ holds the primary + language SFT + task SFT.
    sparse: bool = False
    sft: SFTConfig = field(default_factory=SFTConfig)
    language_sft: str | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(bool(self.model_dir), "model_dir", "set it to the primary model's Hugging Face directory")
        require_positions(self.task.max_length, "task.max_length", {"model_dir": self.model_dir})
        require(self.task.spec.fine_tuned, "task.name",
                f"{self.task.name} has no fine-tuning step: score it directly with evaluate/zero_shot.py")
        require(set(self.eval_splits) <= {"dev", "test"}, "eval_splits", "only dev and test can be evaluated")
        require(self.eval_batch_size >= 1, "eval_batch_size", f"{self.eval_batch_size} must be >= 1 (scoring after "
                "training would fail on it)")
        require(self.language_sft is None or self.sparse, "language_sft",
                "is applied before a task SFT only: set sparse=true, or drop language_sft")
        if self.sparse:  # now, not after the model is loaded
            check_loop_config(self.train, self.sft)


class TaskFlops:
    """batch -> FLOPs of one forward + backward (padding included: the model computes it). Per token: 6 x the
    non-embedding parameters for the matmuls plus 12 x layers x hidden x sequence length for the attention scores
    and their weighted sum (forward 4, backward 8). Built before DeepSpeed, which empties partitioned parameters."""

    def __init__(self, model):
        cfg = model.config
        self.body = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
        self.layers, self.hidden = cfg.num_hidden_layers, cfg.hidden_size

    def __call__(self, batch) -> float:
        return self.per_batch(*batch["input_ids"].shape)

    def per_batch(self, batch_size: int, seq_length: int) -> float:
        return float(batch_size * seq_length * (6 * self.body + 12 * self.layers * self.hidden * seq_length))


def _save_task_model(cfg: FinetuneConfig, model, engine, tokenizer, labels) -> Path:
    """Write the trained task model: trainable parameters from the optimizer's fp32 master copy; frozen ones as
    loaded (a bf16 run keeps only a bf16 image of them in the engine). Collective; rank 0 writes."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    full = gather_full_params(engine, trainable)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    with deepspeed.zero.GatheredParameters(frozen):
        frozen_state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if not p.requires_grad}
    out = Path(cfg.output_dir) / "model"
    if dist.get_rank() == 0:
        task_model = load_task_model(cfg.model_dir, cfg.task.spec.kind, labels)
        state = task_model.state_dict()
        for name, value in frozen_state.items():
            if value.dtype == state[name].dtype:  # bf16 engine copies of frozen fp32 weights are not kept
                state[name] = value
        state.update(full)
        task_model.load_state_dict(state)
        _write_task_model(cfg, task_model, tokenizer, labels, {"frozen": sorted(frozen_state)})
    dist.barrier()
    return out


def _compose_task_model(cfg: FinetuneConfig, tokenizer, labels, language_sft, task_sft_dir: Path) -> Path:
    """Write the task model of a task SFT: the primary + the language SFT (body only) + the task SFT (with its
    head). Rank 0 writes; every rank returns the directory."""
    if dist.get_rank() == 0:
        task_model = load_sft_task_model(cfg.model_dir, cfg.task.spec.kind, labels, task_sft_dir, language_sft)
        _write_task_model(cfg, task_model, tokenizer, labels,
                          {"frozen": [], "sft": {"language": str(Path(cfg.language_sft).resolve()) if cfg.language_sft
                                                 else None, "task": str(task_sft_dir.resolve())}})
    dist.barrier()
    return Path(cfg.output_dir) / "model"


def _write_task_model(cfg: FinetuneConfig, task_model, tokenizer, labels, extra: dict) -> None:
    write_task_model(Path(cfg.output_dir) / "model", task_model, tokenizer, cfg.task, labels, cfg.source_lang,
                     cfg.model_dir, extra)


def finished_task_model(out: Path, claimed: str, done: str) -> StageResult | None:
    """The outputs of a task-model stage whose directory `out` holds its finished result for this config (a rerun
    skips it: no step, no scoring, no MLflow run again); None where there is work to do."""
    if claimed != "finished" or not (out / "metrics.json").is_file():
        return None
    if distributed.is_rank0():
        log.info("%s: already %s with this config: skipping", out / "model", done)
    return StageResult("finished", {"task_model": out / "model",
                                    "metrics": json.loads((out / "metrics.json").read_text())})


def finetune(cfg: FinetuneConfig) -> StageResult:
    """Fine-tune, save the task model, score it on the source language. Outputs: the task model's directory and
    (rank 0) its metrics; interrupted when a stop signal ended training (relaunch with the same output_dir to
    resume)."""
    distributed.initialize_deepspeed()
    rank = dist.get_rank()
    out = Path(cfg.output_dir)
    # its inputs before its claim: the run of a mistyped path would hold the directory and refuse the corrected one
    require_model_dir(cfg.model_dir, "model_dir")
    task = cfg.task
    examples, dev = (load_examples(task, cfg.source_lang, split) for split in ("train", "dev"))
    claimed = claim_output(out, cfg, resumable=True, overwrite=cfg.overwrite, ignore=("method",))  # a tag only
    if (done := finished_task_model(out, claimed, "fine-tuned")) is not None:
        return done
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    spec = cfg.task.spec
    tokenizer_dir = cfg.tokenizer or cfg.model_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_task_model(cfg.model_dir, spec.kind, spec.labels, seed=cfg.train.seed)
    check_tokenizer(model, tokenizer, cfg.model_dir, tokenizer_dir)
    base_sha = model_hash(cfg.model_dir)
    language_sft = SparseFineTuning.load(cfg.language_sft) if cfg.language_sft else None
    if language_sft is not None:
        language_sft.check_language(cfg.source_lang, f"language_sft {cfg.language_sft}")
        language_sft.apply(model, base_sha, with_abs=False)
    frozen = [] if cfg.sparse else freeze_embeddings(model)

    train_data, eval_data = (training_features(task, split, tokenizer, model) for split in (examples, dev))

    def loss_fn(m, batch):
        return m(**batch).loss

    # the pipeline's stage name, which also names the run: a task SFT beside the dense fine-tuning is not a second
    # "finetune-en"
    tags = {"stage": "task_sft" if cfg.sparse else "finetune", "method": cfg.method, "source_lang": cfg.source_lang,
            "task": task.name}
    with Tracker.resumable(cfg.tracking, out, config=cfg, tags=tags, resume=claimed == "resume") as tracker:
        tracker.set_tags({"frozen": ",".join(frozen)})
        if cfg.sparse:
            sft = train_sft(cfg.sft, cfg.train, model, train_data, loss_fn, TaskFlops(model), output_dir=out / "train",
                            base_sha256=base_sha, base_path=str(Path(cfg.model_dir).resolve()), eval_data=eval_data,
                            tracker=tracker, desc=f"task SFT {task.name}",
                            info={"kind": "task", "task": task.name, "source_lang": cfg.source_lang,
                                  "language_sft": cfg.language_sft})
            if sft.status == "interrupted":
                tracker.interrupted()
                return StageResult("interrupted", {})
            model_dir = _compose_task_model(cfg, tokenizer, spec.labels, language_sft, sft.sft_dir)
            step = sft.steps
        else:
            result = train(cfg.train, model, train_data, loss_fn, TaskFlops(model), output_dir=out / "train",
                           eval_data=eval_data, tracker=tracker, desc=f"finetune {task.name}")
            if result.interrupted:
                tracker.interrupted(result.step)
                return StageResult("interrupted", {"step": result.step})
            model_dir = _save_task_model(cfg, model, result.engine, tokenizer, spec.labels)
            step = result.step
        metrics: dict[str, float] = {}
        if rank == 0:
            task_model = load_task_model(model_dir, spec.kind)
            for split in cfg.eval_splits:
                scores = score(task, task_model, tokenizer, cfg.source_lang, split, cfg.eval_batch_size)
                metrics.update({f"{split}/{k}": v for k, v in scores.items()})
            tracker.log_metrics(metrics, step=step)
            write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
            finish_output(out, cfg, ("method",))
    dist.barrier()  # the other ranks wait while rank 0 scores: all return, and tear down (minimodel.cli), together
    return StageResult("finished", {"task_model": model_dir, "metrics": metrics})
