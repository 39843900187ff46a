"""The megatron-core pretraining loop (the pretraining stage, minimodel/training/pretrain.py, runs it).

`Engine` is the model chunks, the megatron optimizer and schedule and one update; `Trainer` adds the data (the shared
sampler), checkpoints (atomic, resumable: training/checkpoint.py; when and how many: the shared checkpoint policy),
the preemption vote, evaluation and the metric sink. `run` is one pretraining run, collective over all ranks.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mpu
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from tqdm import tqdm

from minimodel import distributed, faults
from minimodel.config import ConfigError, save_config
from minimodel.distributed import ParallelConfig
from minimodel.models.minijoint import parallelize
from minimodel.models.minijoint.config import ModelConfig, flops_per_token
from minimodel.tracking import Tracker, exit_status, layout_tags
from minimodel.training import checkpoint as ckpt
from minimodel.training.config import PretrainConfig, PretrainLoopConfig
from minimodel.training.metrics import MetricSink, plot_losses
from minimodel.training.preemption import PREEMPTED_EXIT_CODE, PreemptionSignal
from minimodel.training.sampler import MicroBatches, epochs_of

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    step: int  # optimizer steps done
    checkpoint: Path | None  # the last checkpoint written or loaded
    preempted: bool  # stopped early by SIGTERM / SIGUSR1, after saving `checkpoint`
    run_id: str | None  # MLflow run (rank 0)


class Engine:
    """The MiniJoint model chunks, megatron optimizer and learning-rate schedule, and the update step (after
    parallelize.setup): what the pretraining loop trains with, and what the benchmarks time."""

    def __init__(self, model_cfg: ModelConfig, parallel: ParallelConfig, train: PretrainLoopConfig):
        self.model = parallelize.build_model(model_cfg, parallel)
        self.bf16 = parallel.bf16()  # precision "auto": bf16 with CUDA, fp32 on the CPU
        o, schedule = train.optim, train.schedule
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=schedule.min_lr, weight_decay=o.weight_decay,
                            adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.grad_clip,
                            bf16=self.bf16, params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
                            use_distributed_optimizer=parallel.use_distributed_optimizer),
            self.model)
        parallelize.model_config(self.model).grad_scale_func = self.optimizer.scale_loss
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=o.lr, min_lr=schedule.min_lr,
            lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=train.steps, lr_decay_style=schedule.decay_style,
            start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=train.steps, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)  # the config wins on resume

    def losses(self, batches, num_microbatches: int, forward_only: bool = False) -> dict[str, float]:
        """Forward (and backward) over `num_microbatches` micro-batches (an iterator; None on ranks that read no
        data): {"loss", "main_loss", "secondary_loss" (absent with secondary_head none)}."""
        out = parallelize.forward_backward(self.model, batches, num_microbatches, forward_only=forward_only)
        names = {"loss": "loss", "lm_loss": "main_loss", "aux_loss": "secondary_loss"}
        return {ours: out[theirs] for theirs, ours in names.items() if theirs in out}

    def update(self, batches, num_microbatches: int) -> tuple[dict[str, float], float, float]:
        """One optimizer step over the micro-batches: (losses, the learning rate the update used, gradient norm)."""
        parallelize.zero_grad_buffers(self.model)
        self.optimizer.zero_grad()
        losses = self.losses(batches, num_microbatches)
        # The schedule's value for update number step + 1: warmup starts at lr / warmup_steps (not 0), peaks at
        # update warmup_steps and ends at min_lr at the last update. (bf16/fp32 updates are never skipped: no
        # fp16 loss scaler, whose overflow would skip one.)
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()  # clips to train.optim.grad_clip
        return losses, lr, float(grad_norm) if grad_norm is not None else math.nan


class Trainer:
    """The engine, data, checkpoints and metrics of one pretraining run (after parallelize.setup)."""

    def __init__(self, cfg: PretrainConfig, tokenizer):
        self.cfg = cfg
        self.rank0 = dist.get_rank() == 0
        self.device = distributed.device()
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_root = cfg.checkpoint_root
        if self.rank0:
            save_config(cfg, self.output_dir / "config.yaml")
        self.engine = Engine(cfg.model, cfg.parallel, cfg.train)
        self.model, self.optimizer, self.scheduler = self.engine.model, self.engine.optimizer, self.engine.scheduler

        dp_size = mpu.get_data_parallel_world_size()
        # Within a tensor-parallel group only rank 0 reads data; parallelize broadcasts it to the others.
        self.reads_data = mpu.get_tensor_model_parallel_rank() == 0
        sampling = dict(global_batch=cfg.parallel.global_batch_size, micro_batch=cfg.parallel.micro_batch_size,
                        dp_size=dp_size, dp_rank=mpu.get_data_parallel_rank())
        data, seq = cfg.data, cfg.model.seq_length
        self.train_data = MicroBatches(  # each epoch masked afresh (dynamic masking), deterministic
            epochs_of(data.dataset("train", tokenizer, seq, seed=cfg.train.seed)),
            seed=cfg.train.seed, shuffle=True, **sampling)
        self.valid_data = MicroBatches(  # the same validation batches every time
            lambda epoch: data.dataset("valid", tokenizer, seq, seed=0), seed=0, shuffle=False, **sampling)

        self.layout = {"tp": cfg.parallel.tensor_model_parallel_size, "pp": cfg.parallel.pipeline_model_parallel_size,
                       "vpp": cfg.parallel.num_model_chunks, "dp": dp_size}
        self.tokens_per_step = cfg.parallel.global_batch_size * cfg.model.seq_length
        self.flops_per_step = flops_per_token(cfg.model, cfg.data.mask_prob) * self.tokens_per_step
        self.step = 0
        self.wall_clock_s = 0.0  # training time over all launches (compute/wall_clock_s)
        self.eval_pending = False  # the evaluation due at `step` was left to the next launch (a stop signal came)
        self.last_checkpoint: Path | None = None
        self.tracker: Tracker | None = None
        self.metrics: MetricSink | None = None
        self.bar: tqdm | None = None

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _sharded_state_dict(self, is_loading: bool) -> dict:
        """Model (any layout) + optimizer. The distributed optimizer's state is saved "dp_reshardable" (fully
        parallel, Megatron-LM's default; megatron's layout-free formats fail with torch's Adam), so it reloads at
        the same TP/PP with any DP size."""
        state = parallelize.sharded_state_dict(self.model)
        state["optimizer"] = self.optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
        return state

    def save(self) -> None:
        # one training time for the replicated state: each rank clocked its own (megatron warns when they differ)
        wall_clock = torch.tensor(self.wall_clock_s, dtype=torch.float64, device=distributed.device())
        dist.all_reduce(wall_clock, op=dist.ReduceOp.MAX)
        self.wall_clock_s = float(wall_clock)
        state = self._sharded_state_dict(is_loading=False)
        state.update(scheduler=self.scheduler.state_dict(), step=self.step, layout=self.layout,
                     grad_bucket_size=parallelize.grad_bucket_size(self.cfg.parallel),
                     wall_clock_s=self.wall_clock_s, eval_pending=self.eval_pending)
        self.last_checkpoint = ckpt.save_checkpoint(self.checkpoint_root, self.step, state,
                                                    self.cfg.train.checkpoint)
        self.say(f"saved checkpoint {self.last_checkpoint}")

    def resume(self) -> None:
        """Load the newest complete checkpoint under the checkpoint dir, if any (and train.checkpoint.resume)."""
        if not self.cfg.train.checkpoint.resume:
            return
        found = [ckpt.latest_checkpoint(self.checkpoint_root) if self.rank0 else None]
        dist.broadcast_object_list(found, src=0)  # every rank loads the same one
        path = found[0]
        if path is None:
            return
        common = ckpt.load_common(path)
        saved_layout = common["layout"]
        same_layout = saved_layout == self.layout  # RNG states are per rank: only restorable on the same layout
        model_split = {k: v for k, v in saved_layout.items() if k != "dp"}
        if self.cfg.parallel.use_distributed_optimizer and model_split != {k: self.layout[k] for k in model_split}:
            raise ConfigError(
                f"parallel: checkpoint {path} was saved with {saved_layout}; the distributed optimizer's state "
                f"reloads only with the same tensor/pipeline/virtual-pipeline sizes (any data-parallel size): "
                f"resume with those, or start a new train.checkpoint.dir")
        buckets = parallelize.grad_bucket_size(self.cfg.parallel)
        if self.cfg.parallel.use_distributed_optimizer and common.get("grad_bucket_size", buckets) != buckets:
            raise ConfigError(  # its state is laid out by the gradient buckets, which overlapping the reduction sets
                f"parallel.overlap_grad_reduce: checkpoint {path} was saved with overlap_grad_reduce="
                f"{str(not self.cfg.parallel.overlap_grad_reduce).lower()}; the distributed optimizer's state reloads "
                f"only with the same setting: resume with it, or start a new train.checkpoint.dir")
        self._allocate_optimizer_state()
        parallelize.load_checkpoint_into(self.model, path)  # checks the model shape, any saved layout
        optimizer_state = {"optimizer": self._sharded_state_dict(is_loading=True)["optimizer"]}
        loaded = ckpt.load_checkpoint(path, optimizer_state, restore_rng=same_layout)
        with torch.no_grad():  # it copies into parameters (megatron's dp_reshardable path is not under no_grad)
            self.optimizer.load_state_dict(loaded["optimizer"])
        self._restore_adam_steps()
        self.scheduler.load_state_dict(loaded["scheduler"])
        self.step = int(loaded["step"])
        self.wall_clock_s = float(loaded.get("wall_clock_s", 0.0))  # absent from checkpoints of older versions
        self.eval_pending = bool(loaded.get("eval_pending", False))
        self.last_checkpoint = path
        if not same_layout:  # fresh streams for the steps to come, not a replay of those after the start-up seeding
            distributed.seed_all(self.cfg.train.seed + 1_000_003 * self.step)
        log.info("resumed from %s at step %d%s", path, self.step,
                 "" if same_layout else f" (saved with layout {saved_layout}: RNG streams re-seeded)")

    def _allocate_optimizer_state(self) -> None:
        """Take one optimizer step with zero gradients and learning rate 0 (it changes nothing).

        torch's Adam (megatron's optimizer when neither Transformer Engine nor Apex is installed) allocates its
        state on the first step, and megatron's distributed optimizer cannot describe the state to load before.
        """
        parallelize.zero_grad_buffers(self.model)
        self.optimizer.zero_grad()
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        self.optimizer.step()
        self.scheduler.step(increment=0)  # restores the learning rates

    def _restore_adam_steps(self) -> None:
        """Set every parameter's Adam step count to the checkpoint's.

        megatron's distributed optimizer keeps torch Adam's step count (Adam without TE/Apex) in its param groups;
        on load it assigns ONE tensor to every parameter's state (which torch's multi-tensor Adam then increments
        once per parameter) or leaves the count of the step that allocated the state. Either breaks Adam's bias
        correction after a resume.
        """
        for megatron_optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            adam = megatron_optimizer.optimizer
            for group in adam.param_groups:
                if "step" in group:
                    for param in group["params"]:
                        adam.state[param]["step"] = torch.tensor(float(group["step"]))

    # -- training --------------------------------------------------------------------------------------------------
    def train(self) -> PretrainResult:
        cfg = self.cfg
        tags = {"stage": "pretrain", "method": "minijoint", "source_lang": cfg.data.source_lang,
                **layout_tags(self.layout["tp"], self.layout["pp"]), "vpp": self.layout["vpp"],
                "world_size": dist.get_world_size(), "precision": "bf16" if self.engine.bf16 else "fp32",
                "resumed_from_step": self.step or None}
        # a resumed run (requeued job, same command again) continues its MLflow run: one run per pretraining
        self.tracker = Tracker.resumable(cfg.tracking, cfg.output_dir, config=cfg, tags=tags, resume=self.step > 0)
        self.metrics = MetricSink(self.output_dir / "metrics.jsonl", self.tracker, rank0=self.rank0)
        self.metrics.resume(self.step)
        train = cfg.train
        try:
            if self.step >= cfg.train.steps:
                self.say(f"training already complete: step {self.step} of train.steps={cfg.train.steps}")
            self.bar = tqdm(total=cfg.train.steps, initial=self.step, desc="pretrain", unit="step",
                            disable=not self.rank0, dynamic_ncols=True)
            stop_signal = 0
            with PreemptionSignal() as preemption:
                if self.eval_pending:  # the last launch stopped at a step whose evaluation was due
                    self.metrics.amend(self.evaluate(), self.step)
                    self.eval_pending = False
                while self.step < train.steps and not stop_signal:
                    metrics = self.train_step()
                    faults.point("step", self.step)
                    last = self.step == train.steps
                    stop_signal = 0 if last else preemption.vote(self.device)  # the last step ends the run anyway
                    # a stop signal's grace period goes to the checkpoint: the evaluation due runs on resume
                    eval_due = train.eval.due(self.step, last)
                    self.eval_pending = eval_due and bool(stop_signal)
                    if eval_due and not stop_signal:
                        metrics.update(self.evaluate())
                    self.metrics.log(metrics, self.step)
                    if train.checkpoint.due(self.step, last, bool(stop_signal)):
                        self.save()
            self.bar.close()
            self.finish()
            if stop_signal:
                self.say(f"PREEMPTED by signal {signal.Signals(stop_signal).name}: checkpoint {self.last_checkpoint} "
                         f"saved at step {self.step}; exiting with code {PREEMPTED_EXIT_CODE}, rerun the same "
                         f"command to resume")
            status = "KILLED" if stop_signal else "FINISHED"
            return PretrainResult(self.step, self.last_checkpoint, bool(stop_signal), self.tracker.run_id)
        except BaseException as e:  # a crash: FAILED; a stop signal outside the steps' own handler: KILLED
            status = exit_status(type(e))
            raise
        finally:
            self.tracker.finish(status)

    def _batches(self, data: MicroBatches, index: int):
        """Step `index`'s micro-batches; None on ranks that read no data (parallelize broadcasts it to them)."""
        return iter(data.step(index)) if self.reads_data else None

    def train_step(self) -> dict[str, float]:
        """One update; returns its metrics."""
        start = time.perf_counter()
        losses, lr, grad_norm = self.engine.update(self._batches(self.train_data, self.step),
                                                   self.train_data.num_microbatches)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.step += 1
        self.wall_clock_s += seconds
        metrics = {
            **{f"train/{k}": v for k, v in losses.items()},
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "compute/flops": self.flops_per_step * self.step,
            "compute/tokens": self.tokens_per_step * self.step,
            "compute/wall_clock_s": self.wall_clock_s,
            "throughput/tokens_per_s": self.tokens_per_step / seconds,
            "throughput/flops_per_s": self.flops_per_step / seconds,
        }
        secondary = f" | secondary loss {losses['secondary_loss']:.4f}" if "secondary_loss" in losses else ""
        self.bar.set_postfix(loss=f"{losses['main_loss']:.3f}", tok_s=f"{metrics['throughput/tokens_per_s']:.0f}",
                             refresh=False)
        self.bar.update(1)
        if self.step % self.cfg.train.log_every == 0 or self.step == 1:
            self.say(f"step {self.step}/{self.cfg.train.steps} | main loss {losses['main_loss']:.4f}{secondary} | "
                     f"lr {lr:.3g} | grad norm {metrics['train/grad_norm']:.3f} | "
                     f"{metrics['throughput/tokens_per_s']:,.0f} tokens/s | "
                     f"{metrics['throughput/flops_per_s'] / 1e9:,.3f} GFLOP/s")
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean losses over train.eval.batches validation batches: {"eval/loss", "eval/main_loss", ...}."""
        for chunk in self.model:
            chunk.eval()
        totals: dict[str, float] = {}
        batches = self.cfg.train.eval.batches
        for index in range(batches):
            losses = self.engine.losses(self._batches(self.valid_data, index), self.valid_data.num_microbatches,
                                        forward_only=True)
            for key, value in losses.items():
                totals[f"eval/{key}"] = totals.get(f"eval/{key}", 0.0) + value / batches
        for chunk in self.model:
            chunk.train()
        secondary = f" | secondary loss {totals['eval/secondary_loss']:.4f}" if "eval/secondary_loss" in totals else ""
        self.say(f"step {self.step} | validation: main loss {totals['eval/main_loss']:.4f}{secondary}")
        return totals

    # -- reporting -------------------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        """A console line from rank 0 that does not break the progress bar."""
        if self.rank0:
            tqdm.write(message)

    def finish(self) -> None:
        if self.rank0 and self.metrics.path.is_file():
            plot = plot_losses(self.metrics.path, self.output_dir / "loss_curve.png", LOSS_CURVES,
                               title="MiniJoint pretraining")
            self.tracker.log_artifact(plot)


LOSS_CURVES = {"train/main_loss": "main head (train)", "train/secondary_loss": "secondary head (train)",
               "eval/main_loss": "main head (validation)", "eval/secondary_loss": "secondary head (validation)"}


def run(cfg: PretrainConfig, tokenizer) -> PretrainResult:
    """Pretrain as `cfg` says, resuming from the newest checkpoint; collective over all ranks."""
    parallelize.setup(cfg.model, cfg.parallel, cfg.train.seed)
    try:
        trainer = Trainer(cfg, tokenizer)
        trainer.resume()
        return trainer.train()
    finally:
        distributed.destroy()
