"""The one DeepSpeed training loop: used by adaptation (adapt/train.py), MiniPost and task fine-tuning.

Interface
---------
    from minimodel.training.config import DeepSpeedLoopConfig
    from minimodel.training.deepspeed_loop import gather_full_params, optimizer_state_numel, train

    result = train(
        cfg,            # DeepSpeedLoopConfig; embed it in your stage config as its `train:` field
        model,          # torch.nn.Module with requires_grad ALREADY set: only those parameters are optimised,
                        # so the optimizer holds state for them only; everything else stays bit-identical
        train_data,     # map-style dataset: len() + item i -> dict of equal-shaped numpy arrays / tensors
        loss_fn,        # (model, batch) -> scalar loss tensor; batch = the items stacked, as tensors on the device
        flops_fn,       # (batch) -> float: FLOPs one forward+backward of this micro-batch really costs on one
                        # rank (see minimodel.training.hf_mlm.MLMFlops for BERT-class models)
        output_dir=run_dir,   # <run_dir>/checkpoints/ (resumed from automatically), <run_dir>/metrics.jsonl
        eval_data=None,       # same item format; mean loss over cfg.eval.batches micro-batches per rank
        tracker=None,         # minimodel.tracking.Tracker (inert off rank 0); metrics go there every step
        tokens_fn=None,       # (batch) -> int tokens processed; default: attention_mask.sum() or input_ids.numel()
        on_step=None,         # (engine, state) -> None, on EVERY rank after each optimizer step (e.g. adaptation's
                              # embedding snapshots; may call gather_full_params); state = cumulative
                              # {"step", "flops", "tokens", "wall_clock_s"}
        desc="train")         # progress-bar label
    result.step           # optimizer steps done (== cfg.steps unless interrupted)
    result.interrupted    # True when SIGTERM/SIGUSR1 stopped the run after a checkpoint: exit cleanly, resubmit
    result.engine         # the DeepSpeed engine, still alive: pass it to gather_full_params
    result.history        # rank 0: the per-step metric dicts of this launch (empty on other ranks)

    full = gather_full_params(result.engine, {"embeddings": model.get_input_embeddings().weight})
    # collective: call on EVERY rank; returns full fp32 CPU tensors (on every rank) whatever the ZeRO stage
    optimizer_state_numel(result.engine)  # collective: Adam state elements over all ranks (= trainable numel)
    release_engine(result.engine)  # before another engine trains the same model (LT-SFT's phases)

For a BERT-class *ForMaskedLM, minimodel.training.hf_mlm gives both callables:
    train(cfg, model, data, masked_lm_loss, MLMFlops(model), output_dir=...)   # MLMFlops: after requires_grad
Embed the config in a stage config and validate it there: `train: DeepSpeedLoopConfig = field(default_factory=...)`
(override on the command line as train.steps=..., train.optim.lr=..., train.zero_config=configs/deepspeed/zero3.json;
the names every training loop shares are in minimodel/training/config.py).

Semantics
- One step = one optimizer step = `grad_accumulation` micro-batches of `micro_batch_size` per rank. The samples of
  (step, micro-batch, rank) are a pure function of (seed, step), which is what makes resume exact and makes
  1 rank x accumulation 2 see the same samples as 2 ranks x accumulation 1. Dropout RNG is re-seeded from
  (seed, step, micro-batch, rank) for the same reason.
- DeepSpeed config = the ZeRO json (`zero_config`, one of configs/deepspeed/*.json: ZeRO stage and engine settings
  only) + what this dataclass says (batch sizes, AdamW, WarmupDecayLR, clipping, precision). A key set in both is
  refused. Precision "auto" is bf16 when the accelerator is CUDA with bf16 support, else fp32 (fp16 is not offered).
- Checkpoints: every `checkpoint.save_every` steps, at the end, and on SIGTERM/SIGUSR1 (Slurm preemption: the signal is
  noted, agreed on by all ranks at the next step boundary, then checkpoint + clean return; an evaluation due at that
  step is left to the next launch, which runs it first, at that step; a signal during the last step ends nothing
  early). The signal must
  reach the ranks themselves, as Slurm's `--signal` / `scancel --signal` do: the `deepspeed` runner does not
  forward it, and its launch.py dies on SIGUSR1 (the ranks still finish their checkpoint). A new launch with the
  same output_dir resumes from the latest checkpoint (model, optimizer, LR schedule, step, cumulative FLOPs,
  tokens and wall-clock); metrics.jsonl is truncated to the resumed step so it never holds duplicates. The newest
  `checkpoint.keep_last` checkpoints are kept.
- Metrics logged each step (Tracker + metrics.jsonl, rank 0): train/loss (mean over ranks and micro-batches),
  train/lr, train/grad_norm, compute/flops (cumulative FLOPs actually spent, all ranks), compute/tokens
  (cumulative), compute/wall_clock_s (cumulative training time over all launches), throughput/tokens_per_s,
  throughput/flops_per_s; eval/loss every `eval.every` steps and at the end.
- `on_step` runs before the step's checkpoint: whatever it writes at step N exists whenever a checkpoint of step
  >= N does, so a resumed run never lacks it (a launch killed in between redoes the step and writes it again).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import safe_get_full_fp32_param
from torch import nn
from tqdm import tqdm

from minimodel import faults
from minimodel.config import ConfigError
from minimodel.distributed import initialize_deepspeed
from minimodel.files import write_text_atomic
from minimodel.training.config import DeepSpeedLoopConfig
from minimodel.training.metrics import MetricSink
from minimodel.training.preemption import PreemptionSignal
from minimodel.training.sampler import MicroBatches, epochs_of, stack

log = logging.getLogger(__name__)

# WarmupDecayLR's constructor reads its own rate before its first step and warns about it, once per run: noise
logging.getLogger("DeepSpeed").addFilter(lambda record: "scheduler before it has started" not in record.getMessage())

# Keys the loop derives from DeepSpeedLoopConfig; a ZeRO json must not set them too.
_LOOP_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                    "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16")


@dataclass
class LoopResult:
    step: int
    interrupted: bool
    engine: Any
    history: list[dict] = field(default_factory=list)


def resolve_precision(precision: str) -> str:
    """"auto" -> bf16 on a CUDA accelerator that supports it, else fp32 (CPU: DeepSpeed refuses fp16 there)."""
    if precision != "auto":
        return precision
    acc = get_accelerator()
    return "bf16" if acc.device_name() == "cuda" and acc.is_bf16_supported() else "fp32"


def build_deepspeed_config(cfg: DeepSpeedLoopConfig, precision: str) -> dict:
    cfg.check_precision(precision)
    ds = cfg.zero_json()
    clash = [k for k in _LOOP_OWNED_KEYS if k in ds]
    if clash:
        raise ConfigError(f"train.zero_config: {cfg.zero_config} sets {clash[0]!r}, which the loop derives from "
                          "train.* (batch sizes, optimizer, schedule, clipping, precision): remove it from the json")
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation,
        "gradient_clipping": cfg.optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay, "torch_adam": cfg.torch_adam}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            # +1: the loop starts the schedule at iteration 1 (see train), so update `steps` runs at a positive lr
            "total_num_steps": cfg.steps + 1, "warmup_num_steps": cfg.schedule.warmup_steps, "warmup_min_lr": 0.0,
            "warmup_max_lr": cfg.optim.lr, "warmup_type": "linear"}},
        "bf16": {"enabled": precision == "bf16"},
    })
    ds.setdefault("steps_per_print", 10 ** 9)  # the loop does its own logging
    return ds


class _LossModule(nn.Module):
    """Lets DeepSpeed's engine.forward (ZeRO-3 hooks, backward scaling) run the caller's batch->loss function."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def _to_device(batch: dict, device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).to(device) for k, v in batch.items()}


def _default_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _save(engine, ckpt_dir: Path, step: int, state: dict, cfg: DeepSpeedLoopConfig) -> None:
    """Save checkpoint `step`; mark it complete and name it `latest` (atomically) once every rank has written its
    part, where DeepSpeed's rank 0 names it after its own part (a kill then left `latest` naming a checkpoint a shard
    is missing from). A folder never marked complete is a killed save's remains: removed, never counted among the
    `keep_last` kept."""
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=state, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        _mark_complete(ckpt_dir / tag)
        write_text_atomic(ckpt_dir / "latest", tag)
        saved = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
        complete = [p for p in saved if p.name <= tag and (p / COMPLETE).is_file()]
        for old in [p for p in saved if p not in complete] + cfg.checkpoint.expired(complete):
            shutil.rmtree(old, ignore_errors=True)


COMPLETE = ".complete"  # in a checkpoint folder every rank finished writing


def _mark_complete(folder: Path) -> None:
    write_text_atomic(folder / COMPLETE, "")


def train(cfg: DeepSpeedLoopConfig, model: nn.Module, train_data, loss_fn: Callable, flops_fn: Callable, *,
          output_dir: str | os.PathLike, eval_data=None, tracker=None, tokens_fn: Callable | None = None,
          on_step: Callable | None = None, desc: str = "train") -> LoopResult:
    initialize_deepspeed()
    rank, world = dist.get_rank(), dist.get_world_size()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
    tokens_fn = tokens_fn or _default_tokens
    precision = resolve_precision(cfg.precision)
    engine, *_ = deepspeed.initialize(model=_LossModule(model, loss_fn), model_parameters=trainable,
                                      config=build_deepspeed_config(cfg, precision))
    # WarmupDecayLR starts at iteration -1 and its linear warmup is 0 at iteration 0: updates 1 and 2 would run at
    # lr 0. Start it at 1, so update k uses the schedule's value at k. (A checkpoint restores its own position.)
    engine.lr_scheduler.step(1)
    device = engine.device
    if rank == 0:
        optimizer = "torch AdamW" if cfg.torch_adam else "DeepSpeed's fused Adam"
        log.info("%s: ZeRO stage %d, %s, %s, %d rank(s) on %s", desc, engine.zero_optimization_stage(), precision,
                 optimizer, world, torch.device(device).type)

    output_dir = Path(output_dir)
    ckpt_dir = output_dir / "checkpoints"
    state = {"step": 0, "flops": 0.0, "tokens": 0.0, "wall_clock_s": 0.0}
    eval_pending = False  # the evaluation due at state["step"] was left to the next launch (a stop signal came)
    if (ckpt_dir / "latest").is_file():
        model_states, client_state = engine.load_checkpoint(str(ckpt_dir))
        state.update({k: client_state[k] for k in state})
        if rank == 0:
            log.info("%s: resumed from %s at step %d", desc, Path(model_states).parent, state["step"])
            _mark_complete(Path(model_states).parent)  # `latest` named it (saved before completion marks)
        eval_pending = client_state.get("eval_pending", False)  # absent from checkpoints of older versions
    sink = MetricSink(output_dir / "metrics.jsonl", tracker, rank0=rank == 0)
    sink.resume(state["step"])

    samples = MicroBatches(epochs_of(train_data), seed=cfg.seed, shuffle=cfg.shuffle,
                           global_batch=cfg.micro_batch_size * cfg.grad_accumulation * world,
                           micro_batch=cfg.micro_batch_size, dp_size=world, dp_rank=rank)

    def evaluate() -> float:
        engine.eval()
        total, count = 0.0, 0
        n, micro = len(eval_data), cfg.micro_batch_size
        with torch.no_grad():
            # every rank runs as many forwards (ZeRO-3 gathers parameters in each, collectively); a rank past the
            # end of the held-out set runs its first batch again and counts nothing
            for b in range(min(cfg.eval.batches, math.ceil(n / (world * micro)))):
                start = (b * world + rank) * micro
                items = [eval_data[i] for i in range(start, min(start + micro, n))] or \
                    [eval_data[i] for i in range(min(micro, n))]
                loss = float(engine(_to_device(stack(items), device)))
                if start < n:
                    total, count = total + loss, count + 1
        engine.train()
        total, count = _all_reduce_sum([total, count], device)
        return total / max(count, 1)

    engine.train()
    interrupted = False
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=desc, disable=rank != 0, dynamic_ncols=True)
    with PreemptionSignal() as stop:
        if eval_pending and eval_data is not None:  # the last launch stopped at a step whose evaluation was due
            sink.amend({"eval/loss": evaluate()}, state["step"])
        while state["step"] < cfg.steps:
            step = state["step"]
            t0 = time.perf_counter()
            loss_sum = tokens = flops = 0.0
            for micro in range(cfg.grad_accumulation):
                # Dropout masks depend only on (seed, step, micro, rank): resume is exact without saving RNG state.
                torch.manual_seed(((cfg.seed * 1_000_003 + step) * 1_009 + micro) * 65_537 + rank)
                batch = _to_device(samples.microbatch(step, micro), device)
                loss = engine(batch)
                engine.backward(loss)
                lr = engine.get_lr()[0]  # the rate this step's update uses (engine.step advances the schedule)
                engine.step()
                loss_sum += float(loss.detach())
                tokens += tokens_fn(batch)
                flops += flops_fn(batch)
            loss_sum, tokens, flops = _all_reduce_sum([loss_sum, tokens, flops], device)
            elapsed = time.perf_counter() - t0
            state["step"] = step + 1
            state["flops"] += flops
            state["tokens"] += tokens
            state["wall_clock_s"] += elapsed
            grad_norm = engine.get_global_grad_norm()
            loss_mean = loss_sum / (cfg.grad_accumulation * world)
            metrics = {"train/loss": loss_mean, "train/lr": lr,
                       "compute/flops": state["flops"], "compute/tokens": state["tokens"],
                       "compute/wall_clock_s": state["wall_clock_s"],
                       "throughput/tokens_per_s": tokens / elapsed, "throughput/flops_per_s": flops / elapsed}
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            done = state["step"] == cfg.steps
            faults.point("step", state["step"])
            interrupted = bool(stop.vote(device)) and not done  # the last step ends the run anyway
            # a stop signal's grace period goes to the checkpoint: the evaluation due runs on resume
            eval_due = eval_data is not None and cfg.eval.due(state["step"], done)
            eval_pending = eval_due and interrupted
            if eval_due and not interrupted:
                metrics["eval/loss"] = evaluate()
            sink.log(metrics, state["step"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss_mean:.3f}", tok_s=f"{tokens / elapsed:.0f}")
            if on_step is not None:
                on_step(engine, dict(state))
            if cfg.checkpoint.due(state["step"], done, interrupted):
                _save(engine, ckpt_dir, state["step"], {**state, "eval_pending": eval_pending}, cfg)
            if interrupted:
                if rank == 0:
                    bar.write(f"{desc}: stop signal received: checkpointed step {state['step']} in {ckpt_dir}; "
                              "relaunch with the same output_dir to resume")
                break
    bar.close()
    if tracker is not None:
        tracker.flush()
    return LoopResult(step=state["step"], interrupted=interrupted, engine=engine, history=sink.history)


def gather_full_params(engine, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Full fp32 values of (possibly ZeRO-partitioned) parameters, as CPU tensors on every rank. Collective.

    ZeRO 1-3 keep the fp32 master copy in the optimizer (safe_get_full_fp32_param); at stage 0 the module's own
    parameter is the full fp32 tensor (bf16 is refused there: DeepSpeedLoopConfig.check_precision).
    """
    out = {}
    for name, p in params.items():
        full = safe_get_full_fp32_param(p)
        out[name] = (p.detach() if full is None else full).float().cpu().clone()
    return out


def release_engine(engine) -> None:
    """Tear the engine down now, and only now. DeepSpeed's engine.__del__ destroys it again whenever Python's GC
    reaches it, and a destroy unlinks every parameter from its fp32 master copy (`_hp_mapping = None`): run during a
    later engine over the same parameters, it makes that engine's gather_full_params return zeros (seen: the second
    phase of an LT-SFT, depending on when the GC ran)."""
    engine.destroy()  # its ZeRO gradient hooks must not fire under the next engine
    engine.destroy = lambda: None  # what __del__ calls


def optimizer_state_numel(engine) -> int:
    """Total elements of Adam's first-moment state over all ranks: equals the trainable numel (plus ZeRO padding)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    local = sum(s["exp_avg"].numel() for s in inner.state.values() if "exp_avg" in s)
    partitioned = engine.zero_optimization_stage() > 0
    total = _all_reduce_sum([float(local)], engine.device)[0] if partitioned else local
    return int(total)
