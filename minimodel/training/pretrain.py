"""MiniJoint pretraining (step 1 of the method): its stage function; its config is PretrainConfig
(minimodel/training/config.py), the loop minimodel/training/megatron_loop.py.

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
checkpoint holds model, optimizer, scheduler, step and every RNG state. At another layout a run resumes too, the same
up to summation order and its dropout streams (per rank: re-seeded from the step). Checkpoints are atomic
(minimodel/training/checkpoint.py). SIGTERM / SIGUSR1 (Slurm preemption) make every rank save a checkpoint at the
next step boundary and stop (an evaluation due at that step runs first thing in the next launch); `pretrain` then
returns status "interrupted" and the entry point exits with PREEMPTED_EXIT_CODE.
"""
from __future__ import annotations

from pathlib import Path

from minimodel import distributed
from minimodel.config import ConfigError
from minimodel.hf import load_tokenizer
from minimodel.provenance import claim_output, finish_output
from minimodel.stages import StageResult
from minimodel.training import megatron_loop
from minimodel.training.config import LAYOUT_KEYS, PretrainConfig



def pretrain(cfg: PretrainConfig) -> StageResult:
    """Pretrain MiniJoint as `cfg` says, resuming from the newest checkpoint; collective over all ranks.
    Interrupted when a stop signal ended it early, after saving its checkpoint."""
    cfg.data.check_files()
    tokenizer = load_tokenizer(cfg.data.tokenizer_dir)
    if len(tokenizer) != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} differs from the {len(tokenizer)} tokens of "
                          f"{cfg.data.tokenizer_dir}; set model.vocab_size={len(tokenizer)}")
    # A checkpoint dir outside output_dir (scratch space) is claimed too: it resumes only this config's run
    # (overwrite=true discards another's), as output_dir does. Where the stage writes is no input of it.
    claimed = [cfg.output_dir] + ([] if cfg.checkpoint_root.resolve().is_relative_to(Path(cfg.output_dir).resolve())
                                  else [cfg.checkpoint_root])
    writes = ("train.checkpoint.dir",)
    if distributed.is_rank0():  # before the process group is up: the others wait for rank 0 in it
        for directory in claimed:
            claim_output(directory, cfg, resumable=True, overwrite=cfg.overwrite, ignore=LAYOUT_KEYS, writes=writes)
    result = megatron_loop.run(cfg, tokenizer)
    if not result.preempted and distributed.is_rank0():
        for directory in claimed:
            finish_output(directory, cfg, LAYOUT_KEYS, writes=writes)
    return StageResult("interrupted" if result.preempted else "finished",
                       {"checkpoint": result.checkpoint, "step": result.step})
