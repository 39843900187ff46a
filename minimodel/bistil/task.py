"""BiStil phase 2, task distillation (step 3 for the student): the phase-1 student learns the source-language task
from the fine-tuned task model, its teacher (bistil@lt_sft: lt_sft's task model, the primary + the source
language's SFT + the task SFT, the reference's), as a sparse fine-tuning (LT-SFT, minimodel/sft/train.py): the body
changes at `sft.k` / `sft.k_proportion` of its entries, the task head (new at load) trains dense. Loss: hidden-state
MSE + attention-map MSE + soft cross-entropy to the teacher's logits at temperature `loss.temperature` (default 2;
QA: start's + end's), gold labels unused unless `loss.gold` > 0 (minimodel/bistil/loss.py).

The student reads the teacher's segmentation of each example mapped to its own ids (the student's vocabulary.json,
as in phase 1), so the state losses compare aligned positions; at evaluation it reads with its own tokenizers.

    deepspeed --num_gpus 1 evaluate/distill_task.py --config configs/distill/task_tiny.yaml \
        student=runs/distill/tiny/sw/student teacher=runs/evaluate/verse_class_tiny/model

Output in output_dir: train/ (both phases' loops, sft/: the task SFT of the student), model/ (the student task model:
student + task SFT, a plain Hugging Face directory with the student's tokenizers, vocabulary.json and task.json),
metrics.json (the student on the source language's eval splits and, through its target tokenizer, on the target
language's test split; the teacher on the source splits, for the side-by-side).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minimodel import distributed
from minimodel.bistil.distill import (PROJECTION_FILE, TARGET_TOKENIZER_DIR, VOCABULARY_FILE, StudentVocabulary,
                                      load_projections)
from minimodel.bistil.loss import DistillationWeights, distillation_loss
from minimodel.config import require, save_config
from minimodel.evaluation.features import training_features
from minimodel.evaluation.finetune import TaskFlops, finished_task_model
from minimodel.evaluation.models import load_sft_task_model, load_task_model, read_task_info, write_task_model
from minimodel.evaluation.scoring import score
from minimodel.evaluation.tasks import TaskConfig, load_examples
from minimodel.files import write_text_atomic
from minimodel.hf import load_tokenizer
from minimodel.layout import TASK_FILE
from minimodel.manifest import model_hash
from minimodel.methods import DISTILLED, SPARSE, job_name, parse_method_of
from minimodel.provenance import claim_output, finish_output
from minimodel.sft.train import SFTConfig, check_loop_config, train_sft
from minimodel.stages import StageResult
from minimodel.tracking import Tracker, TrackingConfig
from minimodel.training.config import DeepSpeedLoopConfig, OptimizerConfig, ScheduleConfig
from minimodel.training.hf_mlm import require_positions

GOLD = ("labels", "start_positions", "end_positions")  # the gold-label inputs of the task models


@dataclass
class TaskDistillConfig:
    output_dir: str = "runs/distill_task"
    method: str = DISTILLED  # its name in results and runs: bistil, or bistil@<base> (minimodel/methods.py)
    student: str | None = None  # phase 1's student directory (adapt/distill.py's <output_dir>/<lang>/student)
    teacher: str | None = None  # the fine-tuned task model (evaluate/finetune.py's <output_dir>/model)
    task: TaskConfig = field(default_factory=TaskConfig)
    loss: DistillationWeights = field(default_factory=lambda: DistillationWeights(soft_ce=1.0))
    # the student's body as a sparse fine-tuning: density k_proportion of its entries (the head dense)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(k_proportion=0.1))
    train: DeepSpeedLoopConfig = field(default_factory=lambda: DeepSpeedLoopConfig(
        steps=2000, micro_batch_size=32, optim=OptimizerConfig(lr=1e-4), schedule=ScheduleConfig(warmup_steps=200)))
    eval_splits: list[str] = field(default_factory=lambda: ["dev", "test"])
    eval_batch_size: int = 64
    overwrite: bool = False  # a directory holding another config's run: discard it (else: an error naming the change)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        parse_method_of(self.method, DISTILLED)
        require_positions(self.task.max_length, "task.max_length", {"teacher": self.teacher, "student": self.student})
        check_loop_config(self.train, self.sft)  # now, not after both models are loaded and the features built
        require(self.student is not None, "student",
                "is required: phase 1's student directory (<adapt/distill.py output_dir>/<lang>/student)")
        spec = Path(self.student) / VOCABULARY_FILE
        require(spec.is_file(), "student", f"{self.student} has no {VOCABULARY_FILE}: give phase 1's student "
                "directory (<adapt/distill.py output_dir>/<lang>/student), once phase 1 has finished")
        student = json.loads(spec.read_text())
        made_by = student.get("method", DISTILLED)
        require(made_by == self.method, "method", f"{self.student} was distilled by method {made_by}, not "
                f"{self.method}: its results would be filed under another method; name the one that made it")
        require(self.teacher is not None, "teacher",
                "is required: the fine-tuned task model (evaluate/finetune.py's <output_dir>/model)")
        task_file = Path(self.teacher) / TASK_FILE
        if task_file.is_file():  # the teacher of phase 1's source language, fine-tuned
            info = json.loads(task_file.read_text())
            if primary := student.get("teacher_sha256"):  # None: a student made before phase 1 recorded it
                tuned_from = info["primary_model"]
                require(tuned_from["sha256"] == primary, "teacher", f"{self.teacher} was fine-tuned from "
                        f"{tuned_from['path']}, not from phase 1's source teacher {student.get('teacher_model')}: its "
                        "token ids and states are another model's; give the task model fine-tuned from that primary")
            phase1 = student.get("teacher_sft")
            composed = (info.get("sft") or {}).get("language")
            require((phase1 and Path(phase1).resolve()) == (composed and Path(composed).resolve()), "teacher",
                    f"{self.teacher} was fine-tuned with source-language SFT {composed or 'none'}, but phase 1's "
                    f"source teacher applied {phase1 or 'none'}: the student would learn the task from another model "
                    f"than it was distilled from; give lt_sft's task model (task_sft/model) for "
                    f"{DISTILLED}@{SPARSE}, the dense fine-tuned one (finetune/model) for the other BiStil methods")
        require(self.task.spec.kind in ("classification", "qa"), "task.name",
                f"{self.task.name} has no task head to distil: classification and QA tasks are")
        require(self.loss.soft_ce > 0 or self.loss.gold > 0, "loss.soft_ce",
                "phase 2 learns the task from the teacher's logits (soft_ce) or the gold labels (gold): set one > 0")
        require(set(self.eval_splits) <= {"dev", "test"}, "eval_splits", "only dev and test can be evaluated")


def task_logits(out) -> tuple[torch.Tensor, ...]:
    """The logits soft cross-entropy compares: a classifier's, or a QA model's start and end logits (two terms)."""
    return (out.logits,) if hasattr(out, "logits") else (out.start_logits, out.end_logits)


class TaskDistillStep:
    """(student engine, batch) -> the phase-2 loss; the teacher frozen beside it on the same device."""

    def __init__(self, teacher, student, weights: DistillationWeights, projections: torch.Tensor | None):
        device = distributed.device()
        self.teacher = teacher.to(device)
        self.projections = None if projections is None else projections.to(device)
        self.weights = weights
        self.ratio = teacher.config.num_hidden_layers // student.config.num_hidden_layers
        self.student_flops, self.teacher_flops = TaskFlops(student), TaskFlops(teacher)

    def loss(self, student, batch) -> torch.Tensor:
        mask, gold = batch["attention_mask"], {k: batch[k] for k in GOLD if k in batch}
        extra = {k: batch[k] for k in ("token_type_ids",) if k in batch}
        with torch.no_grad():
            t = self.teacher(input_ids=batch["teacher_ids"], attention_mask=mask, output_hidden_states=True,
                             output_attentions=True, **extra)
        s = student(input_ids=batch["student_ids"], attention_mask=mask, output_hidden_states=True,
                    output_attentions=True, **extra, **(gold if self.weights.gold else {}))
        loss = distillation_loss(s, t, mask, self.ratio, self.weights, self.projections, task_logits)
        return loss + self.weights.gold * s.loss if self.weights.gold else loss

    def flops(self, batch) -> float:
        """The student's forward + backward and the teacher's forward (a third of its forward + backward)."""
        shape = batch["student_ids"].shape
        return self.student_flops.per_batch(*shape) + self.teacher_flops.per_batch(*shape) / 3


class StudentFeatures(torch.utils.data.Dataset):
    """The task's features in the teacher's ids, with the student's ids of the same positions."""

    def __init__(self, features, to_student: np.ndarray):
        self.features, self.to_student = features, to_student

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        item = dict(self.features[i])
        ids = item.pop("input_ids")
        return {**item, "teacher_ids": ids, "student_ids": self.to_student[ids]}


def distill_task(cfg: TaskDistillConfig) -> StageResult:
    """Learn the student's task SFT, write the student task model and score it (and the teacher) on rank 0.
    Outputs: the student task model's directory and its metrics; interrupted when a stop signal ended training."""
    distributed.initialize_deepspeed()
    rank = dist.get_rank()
    out = Path(cfg.output_dir)
    claimed = claim_output(out, cfg, resumable=True, overwrite=cfg.overwrite)
    if (done := finished_task_model(out, claimed, "distilled")) is not None:
        return done
    if rank == 0:
        save_config(cfg, out / "config.yaml")
    task, spec = cfg.task, cfg.task.spec
    info = read_task_info(cfg.teacher)
    vocab = json.loads((Path(cfg.student) / VOCABULARY_FILE).read_text())
    source_lang, target_lang = vocab["source_lang"], vocab["target_lang"]
    require(info["task"] == task.name, "teacher", f"{cfg.teacher} is a {info['task']} model, not {task.name}")
    require(info["source_lang"] == source_lang, "student",
            f"{cfg.student} reads source language {source_lang}, the teacher was fine-tuned on {info['source_lang']}")
    teacher_tokenizer = load_tokenizer(cfg.teacher)
    teacher = load_task_model(cfg.teacher, spec.kind, attn_implementation="eager").eval().requires_grad_(False)
    student = load_task_model(cfg.student, spec.kind, tuple(info["labels"]), seed=cfg.train.seed,
                              attn_implementation="eager")
    projections = None
    if student.config.hidden_size < teacher.config.hidden_size:  # phase 1's projections of the teacher's states
        projections = load_projections(Path(cfg.student).parent / PROJECTION_FILE, teacher.config,
                                       student.config.hidden_size)
    to_student = np.asarray(vocab["to_student"][source_lang], dtype=np.int64)
    # in the teacher's ids and segments (the student copies its layout): the inputs it was fine-tuned on
    train_data, eval_data = (
        StudentFeatures(training_features(task, load_examples(task, source_lang, split), teacher_tokenizer, teacher),
                        to_student) for split in ("train", "dev"))
    step = TaskDistillStep(teacher, student, cfg.loss, projections)
    student_sha = model_hash(cfg.student)
    tags = {"stage": "distill_task", "method": cfg.method, "source_lang": source_lang, "target_lang": target_lang,
            "task": task.name}
    name = f"{job_name('distill_task', cfg.method, DISTILLED)}-{target_lang}"  # the pipeline stage's
    with Tracker.resumable(dataclasses.replace(cfg.tracking, run_name=cfg.tracking.run_name or name), out,
                           config=cfg, tags=tags, resume=claimed == "resume") as tracker:
        sft = train_sft(cfg.sft, cfg.train, student, train_data, step.loss, step.flops, output_dir=out / "train",
                        base_sha256=student_sha, base_path=str(Path(cfg.student).resolve()), eval_data=eval_data,
                        tracker=tracker, desc=f"task distillation {task.name}",
                        info={"kind": "task", "method": cfg.method, "task": task.name, "source_lang": source_lang,
                              "teacher": str(Path(cfg.teacher).resolve())})
        if sft.status == "interrupted":
            tracker.interrupted()
            return StageResult("interrupted", {})
        model_dir = out / "model"
        metrics: dict[str, float] = {}
        if rank == 0:
            model = load_sft_task_model(cfg.student, spec.kind, tuple(info["labels"]), sft.sft_dir,
                                        base_sha=student_sha)
            students = StudentVocabulary(cfg.student)
            write_task_model(model_dir, model, students.tokenizer(source_lang), task, info["labels"], source_lang,
                             cfg.student, {"frozen": [], "sft": {"task": str(sft.sft_dir.resolve())}},
                             files={name: Path(cfg.student) / name for name in (VOCABULARY_FILE, TARGET_TOKENIZER_DIR)
                                    if (Path(cfg.student) / name).exists()})
            model = load_task_model(model_dir, spec.kind)
            for split in cfg.eval_splits:
                for who, m, tok in (("student", model, students.tokenizer(source_lang)),
                                    ("teacher", teacher, teacher_tokenizer)):
                    scores = score(task, m, tok, source_lang, split, cfg.eval_batch_size)
                    metrics.update({f"{who}/{source_lang}/{split}/{k}": v for k, v in scores.items()})
            scores = score(task, model, students.tokenizer(target_lang), target_lang, "test", cfg.eval_batch_size)
            metrics.update({f"student/{target_lang}/test/{k}": v for k, v in scores.items()})
            tracker.log_metrics(metrics, step=sft.steps)
            write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
            finish_output(out, cfg)
    dist.barrier()
    return StageResult("finished", {"task_model": model_dir, "metrics": metrics})
