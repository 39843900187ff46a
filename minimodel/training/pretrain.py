"""MiniJoint pretraining (step 1 of the method): its config and stage function; the loop is
minimodel/training/megatron_loop.py.

One process per device, launched by torchrun. Each step runs `global_batch_size` sequences through megatron's
pipeline schedule in micro-batches (gradient accumulation), clips gradients, takes an optimizer step (optionally
the distributed optimizer) and advances the warmup + decay schedule. The loss is the main MLM loss plus the
weighted secondary MLM loss of the mini-model head (none with model.secondary_head=none); both are logged, and
evaluated on the validation split.

Metrics (MLflow and <output_dir>/metrics.jsonl, rank 0; the names of the DeepSpeed loop, training/deepspeed_loop.py):
train/loss, train/main_loss, train/secondary_loss, train/lr (the rate this step's update used), train/grad_norm,
compute/flops, compute/tokens, compute/wall_clock_s (cumulative over all launches), throughput/tokens_per_s,
throughput/flops_per_s every step; eval/loss, eval/main_loss, eval/secondary_loss every train.eval.every steps.
The `train:` section uses the names every training loop shares (minimodel/training/config.py).

Resume is exact: the sample a rank sees depends only on (seed, step, micro-batch, data-parallel rank), and the
checkpoint holds model, optimizer, scheduler, step and every RNG state. Checkpoints are atomic
(minimodel/training/checkpoint.py). SIGTERM / SIGUSR1 (Slurm preemption) make every rank save a checkpoint at the
next step boundary and stop; `pretrain` then returns status "interrupted" and the entry point exits with
PREEMPTED_EXIT_CODE.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from minimodel.config import ConfigError
from minimodel.data.mlm_config import MLMDataConfig
from minimodel.distributed import ParallelConfig
from minimodel.hf import load_tokenizer
from minimodel.models.minijoint.config import ModelConfig
from minimodel.stages import StageResult
from minimodel.tracking import TrackingConfig
from minimodel.training.config import PretrainLoopConfig


@dataclass
class PretrainConfig:
    output_dir: str = "runs/pretrain/minijoint"
    data: MLMDataConfig = field(default_factory=MLMDataConfig)  # sequences are model.seq_length tokens
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: PretrainLoopConfig = field(default_factory=PretrainLoopConfig)  # steps, optim, schedule, eval, checkpoint
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.train.checkpoint.dir or Path(self.output_dir) / "checkpoints")


def pretrain(cfg: PretrainConfig) -> StageResult:
    """Pretrain MiniJoint as `cfg` says, resuming from the newest checkpoint; collective over all ranks.
    Interrupted when a stop signal ended it early, after saving its checkpoint."""
    # megatron-core only when training starts: the pipeline and the stage table import this module for its config
    from minimodel.training import megatron_loop

    cfg.data.check_files()
    tokenizer = load_tokenizer(cfg.data.tokenizer_dir)
    if len(tokenizer) != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} differs from the {len(tokenizer)} tokens of "
                          f"{cfg.data.tokenizer_dir}; set model.vocab_size={len(tokenizer)}")
    result = megatron_loop.run(cfg, tokenizer)
    return StageResult("interrupted" if result.preempted else "finished",
                       {"checkpoint": result.checkpoint, "step": result.step})
