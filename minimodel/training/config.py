"""The training vocabulary both loops share: the megatron-core pretraining loop (training/megatron_loop.py) and the
DeepSpeed loop (training/deepspeed_loop.py: adaptation, MiniPost, fine-tuning). Every stage's `train:` section
says the same thing with the same names:

    train:
      steps: 1000              optimizer steps
      seed: 0
      optim:      {lr, weight_decay, betas, eps, grad_clip}    AdamW, global gradient-norm clipping
      schedule:   {warmup_steps}                                linear warmup to optim.lr, then decay
      eval:       {every, batches}                              when to evaluate, on how much held-out data
      checkpoint: {save_every, keep_last}                       when to save, how many to keep

so `train.optim.lr=1e-3` means the same for every stage. Each loop's config extends `LoopConfig` with what only its
engine has (pretraining: the decay style, the checkpoint directory; DeepSpeed: batch sizes, the ZeRO json).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from minimodel.config import ConfigError, require
from minimodel.data.mlm_config import MLMDataConfig
from minimodel.distributed import ParallelConfig
from minimodel.provenance import RANKS
from minimodel.models.minijoint.config import ModelConfig
from minimodel.tracking import TrackingConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class OptimizerConfig:
    """AdamW, the optimizer of both loops."""
    lr: float = 1e-3  # peak learning rate (after warmup)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping

    def validate(self) -> None:
        require(self.lr > 0, "train.optim.lr", f"{self.lr} must be positive")
        require(self.weight_decay >= 0, "train.optim.weight_decay", f"{self.weight_decay} must be >= 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.optim.betas",
                f"{self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.98]")
        require(self.eps > 0, "train.optim.eps", f"{self.eps} must be positive")
        require(self.grad_clip >= 0, "train.optim.grad_clip", f"{self.grad_clip} must be >= 0 (0 disables clipping)")


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100  # linear warmup to train.optim.lr over this many updates, then decay

    def validate(self) -> None:
        require(self.warmup_steps >= 0, "train.schedule.warmup_steps", f"{self.warmup_steps} must be >= 0")


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations (0: only at the last step); also at the last step
    batches: int = 20  # held-out batches per evaluation (what a batch is: see the loop's config)

    def validate(self) -> None:
        require(self.every >= 0, "train.eval.every", f"{self.every} must be >= 0 (0: only at the last step)")
        require(self.batches >= 1, "train.eval.batches", f"{self.batches} must be >= 1")

    def due(self, step: int, last: bool) -> bool:
        return last or (self.every > 0 and step % self.every == 0)


@dataclass
class CheckpointConfig:
    """The checkpoint policy: when to save, how many to keep."""
    save_every: int = 500  # steps between checkpoints (0: none but the last step's and a stop signal's)
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted after each save

    def validate(self) -> None:
        require(self.save_every >= 0, "train.checkpoint.save_every", f"{self.save_every} must be >= 0")
        require(self.keep_last >= 1, "train.checkpoint.keep_last", f"{self.keep_last} must be >= 1")

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        """Save after `step`: at the last step, when a stop signal was agreed on, and every save_every steps."""
        return last or stopping or (self.save_every > 0 and step % self.save_every == 0)

    def expired(self, checkpoints: list[Path]) -> list[Path]:
        """Of the complete checkpoints, oldest first, those to delete."""
        return checkpoints[:-self.keep_last]


@dataclass
class LoopConfig:
    """What every training loop is configured with (a stage config's `train:` section)."""
    steps: int = 1000  # optimizer steps
    seed: int = 0  # data order and dropout
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> None:
        require(self.steps >= 1, "train.steps", f"{self.steps} must be >= 1")


# -- the two loops' configs ------------------------------------------------------------------------------------------
@dataclass
class DecayScheduleConfig(ScheduleConfig):
    """Warmup, then megatron's decay styles down to min_lr at the last step."""
    decay_style: Literal["linear", "cosine", "inverse-square-root", "constant"] = "linear"
    min_lr: float = 1e-5


@dataclass
class CheckpointDirConfig(CheckpointConfig):
    dir: str | None = None  # None: <output_dir>/checkpoints
    resume: bool = True  # continue from the newest complete checkpoint in `dir` if there is one


@dataclass
class PretrainLoopConfig(LoopConfig):
    """The megatron-core pretraining loop (training/megatron_loop.py). Batch sizes are parallel.global_batch_size /
    micro_batch_size; an evaluation reads `eval.batches` batches of global_batch_size sequences."""
    seed: int = 1234
    log_every: int = 10  # steps between console lines (metrics go to MLflow every step)
    optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-4, weight_decay=0.01))
    schedule: DecayScheduleConfig = field(default_factory=DecayScheduleConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=100, batches=10))
    checkpoint: CheckpointDirConfig = field(default_factory=CheckpointDirConfig)

    def validate(self) -> None:
        super().validate()
        require(self.log_every >= 1, "train.log_every", f"{self.log_every} must be >= 1")
        require(self.schedule.warmup_steps < self.steps, "train.schedule.warmup_steps",
                f"{self.schedule.warmup_steps} must be < train.steps={self.steps}")
        require(0 <= self.schedule.min_lr <= self.optim.lr, "train.schedule.min_lr",
                f"{self.schedule.min_lr} must be in [0, train.optim.lr={self.optim.lr}]")


@dataclass
class DeepSpeedLoopConfig(LoopConfig):
    """The DeepSpeed loop (training/deepspeed_loop.py; a stage config's `train:` section). The schedule is DeepSpeed's
    WarmupDecayLR: linear warmup from 0, then linear decay towards 0 at `steps`. An evaluation reads
    `eval.batches` micro-batches per rank."""
    micro_batch_size: int = 16  # sequences per rank per micro-batch
    grad_accumulation: int = 1
    zero_config: str = "configs/deepspeed/zero2.json"  # relative paths: from the cwd, else from the repo root
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    torch_adam: bool = False  # true: torch's AdamW instead of DeepSpeed's fused op (no JIT build; CPU tests)
    shuffle: bool = True

    def validate(self) -> None:
        super().validate()
        require(self.micro_batch_size > 0, "train.micro_batch_size", "must be > 0")
        require(self.grad_accumulation > 0, "train.grad_accumulation", "must be > 0")
        require(self.schedule.warmup_steps >= 2, "train.schedule.warmup_steps", f"{self.schedule.warmup_steps}: "
                "DeepSpeed's WarmupDecayLR warms up over at least 2 updates (it runs 1 as 2): set 2 or more")
        require(self.schedule.warmup_steps <= self.steps, "train.schedule.warmup_steps",
                f"{self.schedule.warmup_steps} must be <= train.steps ({self.steps})")
        self.zero_json()  # there, and JSON
        self.check_precision(self.precision)  # "auto" is checked where it resolves (build_deepspeed_config)

    def zero_json(self) -> dict:
        path = resolve_zero_config(self.zero_config)
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"train.zero_config: {path} is not valid JSON ({e})") from None

    def zero_stage(self) -> int:
        """The ZeRO stage zero_config names (0 when it has no zero_optimization section)."""
        return int(self.zero_json().get("zero_optimization", {}).get("stage", 0))

    def check_precision(self, precision: str) -> None:
        """Refuse bf16 at ZeRO stage 0: its optimizer keeps fp32 master weights no parameter can be read back from,
        so every saved result (embeddings, SFT differences, a task model) would be its bf16 rounding."""
        require(precision != "bf16" or self.zero_stage() > 0, "train.zero_config",
                f"{self.zero_config} is ZeRO stage 0, whose bf16 optimizer keeps no fp32 copy the results can be read "
                "back from (they would be bf16 roundings): use stages 1-2 (configs/deepspeed/zero2.json) or "
                "train.precision=fp32")


def resolve_zero_config(path: str) -> Path:
    candidate = Path(path)
    for p in (candidate, REPO_ROOT / candidate):
        if p.is_file():
            return p
    shipped = ", ".join(sorted(p.name for p in (REPO_ROOT / "configs" / "deepspeed").glob("*.json")))
    raise ConfigError(f"train.zero_config: {path} does not exist (shipped in configs/deepspeed/: {shipped})")


# How a run is spread over processes: the same training up to summation order and the random streams (dropout, and
# the initial weights on GPUs without use_cpu_initialization), as global_batch_size fixes the batch and the sampler's
# order does not depend on the layout. A run resumes at another layout, as megatron's checkpoints load at any.
LAYOUT_KEYS = tuple(f"parallel.{key}" for key in (
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "sequence_parallel", "overlap_grad_reduce", "timeout_minutes")) + (RANKS,)


@dataclass
class PretrainConfig:
    """MiniJoint pretraining, step 1 (pretrain/train.py; its stage function is minimodel/training/pretrain.py)."""
    output_dir: str = "runs/pretrain/minijoint"
    data: MLMDataConfig = field(default_factory=MLMDataConfig)  # sequences are model.seq_length tokens
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: PretrainLoopConfig = field(default_factory=PretrainLoopConfig)  # steps, optim, schedule, eval, checkpoint
    # a directory holding another config's run (finished or not): discard it (else: an error naming the change)
    overwrite: bool = False
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.train.checkpoint.dir or Path(self.output_dir) / "checkpoints")
