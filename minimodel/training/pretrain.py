"""MiniJoint pretraining: the megatron-core training loop (step 1 of the method).

One process per device, launched by torchrun. Each step runs `global_batch_size` sequences through megatron's
pipeline schedule in micro-batches (gradient accumulation), clips gradients, takes an optimizer step (optionally
the distributed optimizer) and advances the warmup + decay schedule. The loss is the main MLM loss plus the
weighted secondary MLM loss of the mini-model head (none with model.secondary_head=none); both are logged, and
evaluated on the validation split.

Metrics (MLflow and <output_dir>/metrics.jsonl, rank 0; the names of the DeepSpeed loop, training/deepspeed_loop.py):
train/loss, train/main_loss, train/secondary_loss, train/lr (the rate this step's update used), train/grad_norm,
compute/flops, compute/tokens, compute/wall_clock_s (cumulative over all launches), throughput/tokens_per_s,
throughput/flops_per_s every step; eval/loss, eval/main_loss, eval/secondary_loss every train.eval_every steps.

Resume is exact: the sample a rank sees depends only on (seed, step, micro-batch, data-parallel rank), and the
checkpoint holds model, optimizer, scheduler, step and every RNG state. Checkpoints are atomic
(minimodel/training/checkpoint.py). SIGTERM / SIGUSR1 (Slurm preemption) make every rank save a checkpoint at the
next step boundary and stop; `pretrain` then returns status "interrupted" and the entry point exits with
PREEMPTED_EXIT_CODE.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from minimodel.config import ConfigError, require, save_config
from minimodel.data.mlm_config import MLMDataConfig
from minimodel.distributed import ParallelConfig
from minimodel.models.minijoint.config import ModelConfig
from minimodel.stages import StageResult
from minimodel.tracking import Tracker, TrackingConfig, layout_tags
from minimodel.training import checkpoint as ckpt
from minimodel.training.preemption import PREEMPTED_EXIT_CODE, PreemptionSignal

log = logging.getLogger(__name__)



# -- configuration -----------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    lr: float = 5e-4
    min_lr: float = 1e-5
    warmup_steps: int = 100
    decay_style: Literal["linear", "cosine", "inverse-square-root", "constant"] = "linear"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-6
    clip_grad: float = 1.0  # max global gradient norm; 0 disables clipping

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr", f"{self.lr} must be positive")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", f"{self.min_lr} must be in [0, optim.lr={self.lr}]")
        require(self.warmup_steps >= 0, "optim.warmup_steps", f"{self.warmup_steps} must be >= 0")
        require(self.weight_decay >= 0, "optim.weight_decay", f"{self.weight_decay} must be >= 0")
        for key in ("adam_beta1", "adam_beta2"):
            value = getattr(self, key)
            require(0 <= value < 1, f"optim.{key}", f"{value} must be in [0, 1)")
        require(self.adam_eps > 0, "optim.adam_eps", f"{self.adam_eps} must be positive")
        require(self.clip_grad >= 0, "optim.clip_grad", f"{self.clip_grad} must be >= 0 (0 disables clipping)")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps (batch sizes: parallel.global_batch_size / micro_batch_size)
    eval_every: int = 100  # steps between validation runs (and at the last step)
    eval_steps: int = 10  # validation batches of global_batch_size sequences
    log_every: int = 10  # steps between console lines (metrics go to MLflow every step)
    seed: int = 1234

    def validate(self) -> None:
        for key in ("steps", "eval_every", "eval_steps", "log_every"):
            value = getattr(self, key)
            require(value >= 1, f"train.{key}", f"{value} must be >= 1")


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: <output_dir>/checkpoints
    save_every: int = 500  # steps between checkpoints (one is also written at the last step)
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    resume: bool = True  # continue from the newest complete checkpoint in `dir` if there is one

    def validate(self) -> None:
        require(self.save_every >= 1, "checkpoint.save_every", f"{self.save_every} must be >= 1")
        require(self.keep_last >= 1, "checkpoint.keep_last", f"{self.keep_last} must be >= 1")


@dataclass
class PretrainConfig:
    output_dir: str = "runs/pretrain/minijoint"
    data: MLMDataConfig = field(default_factory=MLMDataConfig)  # sequences are model.seq_length tokens
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(self.optim.warmup_steps < self.train.steps, "optim.warmup_steps",
                f"{self.optim.warmup_steps} must be < train.steps={self.train.steps}")

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.output_dir) / "checkpoints")


# -- data --------------------------------------------------------------------------------------------------------
class MicroBatches:
    """Deterministic data-parallel sampling of a map-style dataset.

    Sample positions form one stream: step s, data-parallel rank r, micro-batch j, row k reads position
    s*G + r*(G/dp) + j*m + k  (G global batch, m micro batch). Position p falls in epoch p // N of the N items;
    each epoch has its own seeded permutation and dataset (e.g. masking seed), so what a rank reads depends only
    on (seed, step, micro-batch, rank): exact resume at any step.
    """

    def __init__(self, make_dataset: Callable[[int], torch.utils.data.Dataset], *, seed: int, global_batch: int,
                 micro_batch: int, dp_size: int, dp_rank: int, shuffle: bool):
        self.make_dataset = make_dataset  # epoch -> dataset
        self.seed, self.shuffle = seed, shuffle
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.num_microbatches = global_batch // (micro_batch * dp_size)
        self._epochs: dict[int, tuple[torch.utils.data.Dataset, np.ndarray]] = {}
        self.num_items = len(self._epoch(0)[0])
        if self.num_items == 0:
            raise ValueError("the dataset has no sequences")

    def _epoch(self, epoch: int):
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # a step spans at most two epochs
                del self._epochs[min(self._epochs)]
            dataset = self.make_dataset(epoch)
            n = len(dataset)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._epochs[epoch] = (dataset, order)
        return self._epochs[epoch]

    def positions(self, step: int, microbatch: int) -> np.ndarray:
        start = (step * self.global_batch + self.dp_rank * self.micro_batch * self.num_microbatches
                 + microbatch * self.micro_batch)
        return np.arange(start, start + self.micro_batch)

    def microbatch(self, step: int, microbatch: int) -> dict[str, np.ndarray]:
        items = []
        for position in self.positions(step, microbatch):
            epoch, offset = divmod(int(position), self.num_items)
            dataset, order = self._epoch(epoch)
            items.append(dataset[int(order[offset])])
        return {key: np.stack([item[key] for item in items]) for key in items[0]}

    def step(self, step: int) -> list[dict[str, np.ndarray]]:
        return [self.microbatch(step, j) for j in range(self.num_microbatches)]


# -- preemption ----------------------------------------------------------------------------------------------------
def preemption_requested(preemption: PreemptionSignal, device: torch.device) -> int:
    """The signal any rank has received (0 if none), the same value on every rank (a collective)."""
    flag = torch.tensor([preemption.received or 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


# -- the loop ------------------------------------------------------------------------------------------------------
@dataclass
class PretrainResult:
    step: int  # optimizer steps done
    checkpoint: Path | None  # the last checkpoint written or loaded
    preempted: bool  # stopped early by SIGTERM / SIGUSR1, after saving `checkpoint`
    run_id: str | None  # MLflow run (rank 0)


def pretrain(cfg: PretrainConfig) -> StageResult:
    """Pretrain MiniJoint as `cfg` says, resuming from the newest checkpoint; collective over all ranks.
    Interrupted when a stop signal ended it early, after saving its checkpoint."""
    from minimodel import distributed
    from minimodel.data.tokenizer import load_tokenizer
    from minimodel.models.minijoint import parallelize

    cfg.data.check_files()
    tokenizer = load_tokenizer(cfg.data.tokenizer_dir)
    if len(tokenizer) != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} differs from the {len(tokenizer)} tokens of "
                          f"{cfg.data.tokenizer_dir}; set model.vocab_size={len(tokenizer)}")
    parallelize.setup(cfg.model, cfg.parallel, cfg.train.seed)
    try:
        trainer = Trainer(cfg, tokenizer)
        trainer.resume()
        result = trainer.train()
    finally:
        distributed.destroy()
    return StageResult("interrupted" if result.preempted else "finished",
                       {"checkpoint": result.checkpoint, "step": result.step})


class Trainer:
    """Model chunks, optimizer, schedule, data and tracking of one pretraining run (after parallelize.setup)."""

    def __init__(self, cfg: PretrainConfig, tokenizer):
        from megatron.core import parallel_state as mpu
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from minimodel import distributed
        from minimodel.models.minijoint import parallelize
        from minimodel.models.minijoint.model import flops_per_token

        self.cfg = cfg
        self.rank0 = dist.get_rank() == 0
        self.device = distributed.device()
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_root = cfg.checkpoint_root
        if self.rank0:
            save_config(cfg, self.output_dir / "config.yaml")

        self.model = parallelize.build_model(cfg.model, cfg.parallel)
        self.bf16 = cfg.parallel.bf16()  # precision "auto": bf16 with CUDA, fp32 on the CPU
        o = cfg.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                            adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                            clip_grad=o.clip_grad, bf16=self.bf16,
                            params_dtype=torch.bfloat16 if self.bf16 else torch.float32,
                            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer),
            self.model)
        parallelize.model_config(self.model).grad_scale_func = self.optimizer.scale_loss
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=cfg.train.steps, lr_decay_style=o.decay_style, start_wd=o.weight_decay,
            end_wd=o.weight_decay, wd_incr_steps=cfg.train.steps, wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)  # the config wins on resume

        dp_size = mpu.get_data_parallel_world_size()
        # Within a tensor-parallel group only rank 0 reads data; parallelize broadcasts it to the others.
        self.reads_data = mpu.get_tensor_model_parallel_rank() == 0
        sampling = dict(global_batch=cfg.parallel.global_batch_size, micro_batch=cfg.parallel.micro_batch_size,
                        dp_size=dp_size, dp_rank=mpu.get_data_parallel_rank())
        data, seq = cfg.data, cfg.model.seq_length
        self.train_data = MicroBatches(  # a new masking seed every epoch (dynamic masking), deterministic
            lambda epoch: data.dataset("train", tokenizer, seq, seed=cfg.train.seed + epoch),
            seed=cfg.train.seed, shuffle=True, **sampling)
        self.valid_data = MicroBatches(  # the same validation batches every time
            lambda epoch: data.dataset("valid", tokenizer, seq, seed=0), seed=0, shuffle=False, **sampling)

        self.layout = {"tp": cfg.parallel.tensor_model_parallel_size, "pp": cfg.parallel.pipeline_model_parallel_size,
                       "vpp": cfg.parallel.num_model_chunks, "dp": dp_size}
        self.tokens_per_step = cfg.parallel.global_batch_size * cfg.model.seq_length
        self.flops_per_step = flops_per_token(cfg.model) * self.tokens_per_step
        self.step = 0
        self.wall_clock_s = 0.0  # training time over all launches (compute/wall_clock_s)
        self.last_checkpoint: Path | None = None
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.tracker: Tracker | None = None
        self.bar: tqdm | None = None

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def _sharded_state_dict(self, is_loading: bool) -> dict:
        """Model (any layout) + optimizer. The distributed optimizer's state is saved "dp_reshardable" (fully
        parallel, Megatron-LM's default; megatron's layout-free formats fail with torch's Adam), so it reloads at
        the same TP/PP with any DP size."""
        from minimodel.models.minijoint import parallelize

        state = parallelize.sharded_state_dict(self.model)
        state["optimizer"] = self.optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
        return state

    def save(self) -> None:
        state = self._sharded_state_dict(is_loading=False)
        state.update(scheduler=self.scheduler.state_dict(), step=self.step, layout=self.layout,
                     wall_clock_s=self.wall_clock_s)
        self.last_checkpoint = ckpt.save_checkpoint(self.checkpoint_root, self.step, state,
                                                    keep_last=self.cfg.checkpoint.keep_last)
        self.say(f"saved checkpoint {self.last_checkpoint}")

    def resume(self) -> None:
        """Load the newest complete checkpoint under the checkpoint dir, if any (and checkpoint.resume)."""
        from minimodel.models.minijoint import parallelize

        if not self.cfg.checkpoint.resume:
            return
        found = [ckpt.latest_checkpoint(self.checkpoint_root) if self.rank0 else None]
        dist.broadcast_object_list(found, src=0)  # every rank loads the same one
        path = found[0]
        if path is None:
            return
        saved_layout = ckpt.load_common(path)["layout"]
        same_layout = saved_layout == self.layout  # RNG states are per rank: only restorable on the same layout
        model_split = {k: v for k, v in saved_layout.items() if k != "dp"}
        if self.cfg.parallel.use_distributed_optimizer and model_split != {k: self.layout[k] for k in model_split}:
            raise ConfigError(
                f"parallel: checkpoint {path} was saved with {saved_layout}; the distributed optimizer's state "
                f"reloads only with the same tensor/pipeline/virtual-pipeline sizes (any data-parallel size): "
                f"resume with those, or start a new checkpoint.dir")
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
        self.last_checkpoint = path
        log.info("resumed from %s at step %d%s", path, self.step,
                 "" if same_layout else f" (saved with layout {saved_layout}: RNG streams re-seeded)")

    def _allocate_optimizer_state(self) -> None:
        """Take one optimizer step with zero gradients and learning rate 0 (it changes nothing).

        torch's Adam (megatron's optimizer when neither Transformer Engine nor Apex is installed) allocates its
        state on the first step, and megatron's distributed optimizer cannot describe the state to load before.
        """
        from minimodel.models.minijoint import parallelize

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
                "world_size": dist.get_world_size(), "precision": "bf16" if self.bf16 else "fp32",
                "resumed_from_step": self.step or None}
        # a resumed run (requeued job, same command again) continues its MLflow run: one run per pretraining
        self.tracker = Tracker.resumable(cfg.tracking, cfg.output_dir, config=cfg, tags=tags, resume=self.step > 0)
        status = "FAILED"
        try:
            if self.step >= cfg.train.steps:
                self.say(f"training already complete: step {self.step} of train.steps={cfg.train.steps}")
            self.bar = tqdm(total=cfg.train.steps, initial=self.step, desc="pretrain", unit="step",
                            disable=not self.rank0, dynamic_ncols=True)
            stop_signal = 0
            with PreemptionSignal() as preemption:
                while self.step < cfg.train.steps and not stop_signal:
                    self.train_step()
                    stop_signal = preemption_requested(preemption, self.device)
                    last = self.step == cfg.train.steps
                    if self.step % cfg.train.eval_every == 0 or last:
                        self.evaluate()
                    if stop_signal or self.step % cfg.checkpoint.save_every == 0 or last:
                        self.save()
            self.bar.close()
            self.finish()
            if stop_signal:
                self.say(f"PREEMPTED by signal {signal.Signals(stop_signal).name}: checkpoint {self.last_checkpoint} "
                         f"saved at step {self.step}; exiting with code {PREEMPTED_EXIT_CODE}, rerun the same "
                         f"command to resume")
            status = "KILLED" if stop_signal else "FINISHED"
            return PretrainResult(self.step, self.last_checkpoint, bool(stop_signal), self.tracker.run_id)
        finally:
            self.tracker.finish(status)

    def _run(self, data: MicroBatches, index: int, forward_only: bool) -> dict[str, float]:
        """One step's losses: {"loss", "main_loss", "secondary_loss" (absent with secondary_head none)}."""
        from minimodel.models.minijoint import parallelize

        batches = iter(data.step(index)) if self.reads_data else None
        out = parallelize.forward_backward(self.model, batches, data.num_microbatches, forward_only=forward_only)
        names = {"loss": "loss", "lm_loss": "main_loss", "aux_loss": "secondary_loss"}
        return {ours: out[theirs] for theirs, ours in names.items() if theirs in out}

    def train_step(self) -> None:
        from minimodel.models.minijoint import parallelize

        start = time.perf_counter()
        parallelize.zero_grad_buffers(self.model)
        self.optimizer.zero_grad()
        losses = self._run(self.train_data, self.step, forward_only=False)
        # The schedule's value for update number step + 1: warmup starts at lr / warmup_steps (not 0), peaks at
        # update warmup_steps and ends at min_lr at the last update. (bf16/fp32 updates are never skipped: no
        # fp16 loss scaler, whose overflow would skip one.)
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()  # clips to optim.clip_grad
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.step += 1
        self.wall_clock_s += seconds
        metrics = {
            **{f"train/{k}": v for k, v in losses.items()},
            "train/lr": lr,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "compute/flops": self.flops_per_step * self.step,
            "compute/tokens": self.tokens_per_step * self.step,
            "compute/wall_clock_s": self.wall_clock_s,
            "throughput/tokens_per_s": self.tokens_per_step / seconds,
            "throughput/flops_per_s": self.flops_per_step / seconds,
        }
        self._log(metrics)
        secondary = f" | secondary loss {losses['secondary_loss']:.4f}" if "secondary_loss" in losses else ""
        self.bar.set_postfix(loss=f"{losses['main_loss']:.3f}", tok_s=f"{metrics['throughput/tokens_per_s']:.0f}",
                             refresh=False)
        self.bar.update(1)
        if self.step % self.cfg.train.log_every == 0 or self.step == 1:
            self.say(f"step {self.step}/{self.cfg.train.steps} | main loss {losses['main_loss']:.4f}{secondary} | "
                     f"lr {lr:.3g} | grad norm {metrics['train/grad_norm']:.3f} | "
                     f"{metrics['throughput/tokens_per_s']:,.0f} tokens/s | "
                     f"{metrics['throughput/flops_per_s'] / 1e9:,.3f} GFLOP/s")

    @torch.no_grad()
    def evaluate(self) -> None:
        for chunk in self.model:
            chunk.eval()
        totals: dict[str, float] = {}
        for index in range(self.cfg.train.eval_steps):
            for key, value in self._run(self.valid_data, index, forward_only=True).items():
                totals[f"eval/{key}"] = totals.get(f"eval/{key}", 0.0) + value / self.cfg.train.eval_steps
        for chunk in self.model:
            chunk.train()
        self._log(totals)
        secondary = f" | secondary loss {totals['eval/secondary_loss']:.4f}" if "eval/secondary_loss" in totals else ""
        self.say(f"step {self.step} | validation: main loss {totals['eval/main_loss']:.4f}{secondary}")

    # -- reporting -------------------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        """A console line from rank 0 that does not break the progress bar."""
        if self.rank0:
            tqdm.write(message)

    def _log(self, metrics: dict[str, float]) -> None:
        """To MLflow, and to <output_dir>/metrics.jsonl (the whole curve across resumes, for the plot)."""
        self.tracker.log_metrics(metrics, step=self.step)
        if self.rank0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def finish(self) -> None:
        if self.rank0 and self.metrics_path.is_file():
            plot = plot_losses(self.metrics_path, self.output_dir / "loss_curve.png")
            self.tracker.log_artifact(plot)


def read_metrics(path: str | Path) -> dict[int, dict]:
    """step -> metrics from a metrics.jsonl; a step logged again after a resume replaces the earlier row."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(row)
    return dict(sorted(by_step.items()))


def plot_losses(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Main and secondary MLM loss (training, and validation where evaluated) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in [("train/main_loss", "main head (train)", "-"),
                              ("train/secondary_loss", "secondary head (train)", "-"),
                              ("eval/main_loss", "main head (validation)", "o--"),
                              ("eval/secondary_loss", "secondary head (validation)", "s--")]:
        points = [(step, row[key]) for step, row in rows.items() if key in row]
        if points:
            ax.plot(*zip(*points), style, label=label, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("MLM loss")
    ax.set_title("MiniJoint pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path
