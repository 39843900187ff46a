"""Lottery-ticket sparse fine-tuning (LT-SFT, Ansell et al. 2022) inside the shared DeepSpeed loop.

Each iteration (`sft.iterations`, usually 1):
  phase 1  full fine-tuning of every trainable parameter (`sft.full_steps` steps of the caller's `train:` config);
  select   ONE threshold over |theta - theta0| across all eligible tensors: the K / iterations largest entries not
           selected yet join the mask (ties with the threshold included);
  rewind   EVERY parameter to its value before phase 1 (theta0 in the first iteration);
  phase 2  a fresh engine (fresh optimizer and schedule) for `sft.sparse_steps` steps, with the gradient of each
           eligible entry outside the mask zeroed before DeepSpeed accumulates, reduces, clips or steps it, so those
           entries stay exactly at their rewound values (AdamW without weight decay never moves a zero-gradient
           entry whose moments are zero). The dense parameters (the head) train fully.
An optional L1 pull toward theta0, lambda * sum|theta - theta0| / N with N the model's parameter count (the
reference's normalisation), adds lambda * sign(theta - theta0) / N to each optimizer step's gradient; in phase 2 it
is masked like the rest.

Output under output_dir (every file written atomically; a relaunch resumes where a kill left off):
    iteration_<i>/full/      phase 1's loop directory (checkpoints/, metrics.jsonl)
    iteration_<i>/mask.safetensors    the cumulative mask after iteration i's selection: a relaunch in phase 2
                                      trains with exactly this mask
    iteration_<i>/sparse/    phase 2's loop directory
    iteration_<i>/end.safetensors     the trainable parameters after iteration i (all but the last): the next
                                      iteration's rewind point
    sft/                     the result (minimodel/sft/file.py): the masked entries' differences and the dense
                             parameters, with the base model's hash and the compute spent
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minimodel.config import ConfigError, require
from minimodel.distributed import initialize_deepspeed, on_rank0
from minimodel.hf import initialised_at_load
from minimodel.sft.file import MANIFEST_FILE, SFT_DIR, SparseDiff, SparseFineTuning
from minimodel.sft.select import Partition, partition_parameters, resolve_k, select_top_k
from minimodel.training.config import DeepSpeedLoopConfig
from minimodel.training.deepspeed_loop import gather_full_params, release_engine, resolve_precision, train
from minimodel.training.metrics import read_metrics

log = logging.getLogger(__name__)

MASK_FILE = "mask.safetensors"
END_FILE = "end.safetensors"


@dataclass
class SFTConfig:
    """A stage config's `sft:` section. Each phase runs the stage's `train:` config with its own step count."""
    k: int | None = None  # values the SFT may change; None: k_proportion of the eligible values
    k_proportion: float = 0.01
    iterations: int = 1  # select / rewind / sparse rounds, each freeing k / iterations more values
    full_steps: int | None = None  # phase 1 (full fine-tuning) steps per iteration; None: train.steps
    sparse_steps: int | None = None  # phase 2 (sparse fine-tuning) steps per iteration; None: train.steps
    # lambda of the L1 pull toward theta0 in phase 1 (reference: 0.1 for language SFTs), per optimizer step whatever
    # train.grad_accumulation; the reference multiplies it by its accumulation (2 in its language-SFT scripts), so
    # their 0.1 at accumulation 2 is 0.2 here
    full_l1: float = 0.0
    sparse_l1: float = 0.0  # ... and in phase 2
    l1_eligible_only: bool = False  # L1 on the eligible parameters only (default: on the dense head too)
    include_layer_norms: bool = False  # normalisation layers eligible (body) / dense (head) instead of frozen

    def validate(self) -> None:
        require(self.k is None or self.k >= 1, "sft.k", f"{self.k} must be >= 1 (or unset: sft.k_proportion)")
        require(0 < self.k_proportion <= 1, "sft.k_proportion", f"{self.k_proportion} must be in (0, 1]")
        require(self.iterations >= 1, "sft.iterations", f"{self.iterations} must be >= 1")
        for key in ("full_steps", "sparse_steps"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"sft.{key}", f"{value} must be >= 1 (or unset: train.steps)")
        require(self.full_l1 >= 0, "sft.full_l1", f"{self.full_l1} must be >= 0")
        require(self.sparse_l1 >= 0, "sft.sparse_l1", f"{self.sparse_l1} must be >= 0")

    def steps(self, train_cfg: DeepSpeedLoopConfig) -> tuple[int, int]:
        """(phase 1, phase 2) steps per iteration."""
        return self.full_steps or train_cfg.steps, self.sparse_steps or train_cfg.steps


@dataclass
class SFTResult:
    status: str  # "finished" | "interrupted" (relaunch with the same output_dir to resume)
    sft_dir: Path | None  # <output_dir>/sft when finished
    steps: int = 0  # optimizer steps of both phases of every iteration, when finished


def check_loop_config(train_cfg: DeepSpeedLoopConfig, cfg: SFTConfig) -> None:
    """What LT-SFT needs of the loop: no weight decay (AdamW's decoupled decay would move masked entries), warmup
    within each phase, ZeRO 0-2 (at stage 3 the parameters the gradient hooks and the rewind touch are partitions)."""
    require(train_cfg.optim.weight_decay == 0, "train.optim.weight_decay",
            f"{train_cfg.optim.weight_decay}: sparse fine-tuning needs 0 (AdamW's decoupled decay would move the "
            "entries outside the mask away from theta0)")
    full_steps, sparse_steps = cfg.steps(train_cfg)
    require(train_cfg.schedule.warmup_steps <= min(full_steps, sparse_steps), "train.schedule.warmup_steps",
            f"{train_cfg.schedule.warmup_steps} must be <= the phases' steps (sft.full_steps {full_steps}, "
            f"sft.sparse_steps {sparse_steps}): each phase has its own warmup")
    stage = train_cfg.zero_stage()
    if stage > 2:
        raise ConfigError(f"train.zero_config: {train_cfg.zero_config} is ZeRO stage {stage}; sparse fine-tuning "
                          "runs at stages 0-2 (configs/deepspeed/zero2.json): at stage 3 each rank holds only a "
                          "partition of the parameters its gradient masks and rewind act on")
    train_cfg.check_precision(resolve_precision(train_cfg.precision))  # now, not after the data is prepared


def bf16_caveats(cfg: SFTConfig, precision: str, n_params: int) -> list[str]:
    """What bf16 does to LT-SFT where it applies (the reference trains in fp32): its L1 term is added to bf16
    gradients, whose rounding drops a term of lambda / N; an iteration after the first starts from the bf16 image of
    the one before (DeepSpeed makes its fp32 masters from the bf16 module)."""
    if precision != "bf16":
        return []
    caveats = []
    if (l1 := max(cfg.full_l1, cfg.sparse_l1)) > 0:
        caveats.append(f"LT-SFT under bf16: the L1 pull toward the pretrained values ({l1} / {n_params} parameters "
                       f"= {l1 / n_params:.1e} per entry) is added to bf16 gradients, which keep it only where "
                       f"|gradient| is below about {256 * l1 / n_params:.0e}: elsewhere this trains without it; "
                       "train.precision=fp32 keeps the reference's regularisation")
    if cfg.iterations > 1:
        caveats.append(f"LT-SFT under bf16 with sft.iterations={cfg.iterations}: each iteration after the first "
                       "starts from the bf16 rounding of the one before (2^-9 of each value, a sizeable part of small "
                       "changes); train.precision=fp32 carries them over exactly")
    return caveats


def l1_gradient(p: torch.Tensor, p0: torch.Tensor, scale: float) -> torch.Tensor:
    """d/dtheta of scale * sum|theta - theta0|: scale * sign(theta - theta0) (0 where theta == theta0). Compared in
    the module's dtype: under bf16 the module holds bf16(theta), and an untouched entry is bf16(theta0), which an
    fp32 theta0 would see as moved (a push every step, Adam moving it about lr each time)."""
    return scale * torch.sign((p.detach() - p0.to(p.dtype)).float())


class GradientHooks:
    """Tensor hooks on the trainable parameters: grad -> (grad + L1 term) masked. A parameter's tensor hook runs
    before its gradient is accumulated, so DeepSpeed's reduction (ZeRO 1/2), clipping and step see the result."""

    def __init__(self, params: dict[str, nn.Parameter], theta0: dict[str, torch.Tensor],
                 masks: dict[str, torch.Tensor] | None, *, l1: float = 0.0, n_params: int = 1,
                 accumulation: int = 1, l1_names: set[str] = frozenset()):
        # the step's L1 gradient lambda * sign / N, spread over its micro-batches (DeepSpeed sums their gradients
        # after scaling each loss by 1 / accumulation)
        l1_scale = l1 / n_params / accumulation
        self.theta0, self.masks, self.l1_scale, self.l1_names = theta0, masks or {}, l1_scale, l1_names
        self._on_device: dict[tuple[str, str], torch.Tensor] = {}
        self.handles = [p.register_hook(partial(self._hook, name, p)) for name, p in params.items()
                        if name in self.masks or (l1_scale and name in l1_names)]

    def _device(self, kind: str, name: str, source: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
        key = (kind, name)
        if key not in self._on_device or (self._on_device[key].device, self._on_device[key].dtype) != (device, dtype):
            self._on_device[key] = source.to(device=device, dtype=dtype)
        return self._on_device[key]

    def _hook(self, name: str, p: nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
        if self.l1_scale and name in self.l1_names:
            # kept in the module's dtype, all l1_gradient compares in: under bf16 half the memory of an fp32 copy
            p0 = self._device("theta0", name, self.theta0[name], grad.device, p.dtype)
            grad = grad + l1_gradient(p, p0, self.l1_scale).to(grad.dtype)
        if name in self.masks:
            grad = grad.masked_fill(~self._device("mask", name, self.masks[name], grad.device, torch.bool), 0)
        return grad

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _set_params(params: dict[str, nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    """Give each parameter a fresh fp32 copy of its value: also cuts it loose from a previous engine's flat buffers
    and bf16 cast, so the next engine starts from exactly these values."""
    for name, p in params.items():
        p.data = values[name].detach().to(torch.float32).clone()


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class _PhaseTracker:
    """The stage's tracker seen by one phase: steps and cumulative compute continue across phases (`before`: the
    earlier phases' compute, _compute's), each row says its phase."""

    def __init__(self, tracker, offset: int, iteration: int, phase: int, before: dict[str, float]):
        self.tracker, self.offset, self.extra = tracker, offset, {"sft/iteration": iteration, "sft/phase": phase}
        self.before = {f"compute/{key}": before[key] for key in COMPUTE_KEYS}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        so_far = {key: value + self.before[key] for key, value in metrics.items() if key in self.before}
        self.tracker.log_metrics({**metrics, **so_far, **self.extra}, step=step + self.offset)

    def flush(self) -> None:
        self.tracker.flush()


def train_sft(cfg: SFTConfig, train_cfg: DeepSpeedLoopConfig, model: nn.Module, train_data, loss_fn: Callable,
              flops_fn: Callable, *, output_dir: str | os.PathLike, base_sha256: str, base_path: str | None = None,
              eval_data=None, tracker=None, info: dict | None = None, desc: str = "sft") -> SFTResult:
    """Learn an SFT of `model` (whose current weights are theta0: the model loaded from the directory with hash
    `base_sha256`, plus whatever SFT the caller applied) with the DeepSpeed loop. Call on every rank; rank 0 writes
    <output_dir>/sft/. Arguments as deepspeed_loop.train's; `info` goes into the SFT's manifest; `base_path`: that
    directory, whose weights say which parameters were initialised at load (trained dense, stored whole)."""
    initialize_deepspeed()
    check_loop_config(train_cfg, cfg)
    out = Path(output_dir)
    full_steps, sparse_steps = cfg.steps(train_cfg)
    total_steps = cfg.iterations * (full_steps + sparse_steps)
    if (out / SFT_DIR / MANIFEST_FILE).is_file():
        return SFTResult("finished", out / SFT_DIR, total_steps)
    new = initialised_at_load(model, base_path) if base_path else set()  # e.g. a task head: stored whole
    part = partition_parameters(model, cfg.include_layer_norms, new)
    k = resolve_k(cfg.k, cfg.k_proportion, part.eligible_numel)
    if cfg.iterations > k:
        raise ConfigError(f"sft.iterations={cfg.iterations} exceeds K={k}: each iteration must free >= 1 value")
    n_params = sum(p.numel() for p in model.parameters())
    for caveat in bf16_caveats(cfg, resolve_precision(train_cfg.precision), n_params):
        log.warning(caveat)
    l1_names = set(part.eligible) if cfg.l1_eligible_only else set(part.trainable)
    theta0 = {n: p.detach().float().cpu().clone() for n, p in part.trainable.items()}
    # a tied parameter by the partition's name (an earlier version saved it under the first one transformers lists)
    alias = {other: name for name, p in part.trainable.items()
             for other, q in model.named_parameters(remove_duplicate=False) if q is p}

    def saved(path: Path) -> dict[str, torch.Tensor]:  # a mask or an iteration's end, as saved in an earlier launch
        return {alias.get(name, name): tensor for name, tensor in load_file(str(path)).items()}
    start, masks, offset, final = theta0, None, 0, None
    for it in range(1, cfg.iterations + 1):
        it_dir = out / f"iteration_{it}"
        if it < cfg.iterations and (it_dir / END_FILE).is_file():  # finished in an earlier launch
            start, masks = (saved(it_dir / name) for name in (END_FILE, MASK_FILE))
            offset += full_steps + sparse_steps
            continue
        k_it = k // cfg.iterations + (k % cfg.iterations if it == cfg.iterations else 0)
        phase = partial(_run_phase, train_cfg, model, part, train_data, loss_fn, flops_fn, eval_data=eval_data,
                        theta0=theta0, n_params=n_params, l1_names=l1_names, tracker=tracker, iteration=it)
        if not (it_dir / MASK_FILE).is_file():
            _set_params(part.trainable, start)
            result = phase(full_steps, it_dir / "full", None, cfg.full_l1, offset, f"{desc} it{it} full")
            if result is None:
                return SFTResult("interrupted", None)

            def select():
                chosen = select_top_k(learned_change(part, theta0, result), k_it, masks)
                selected = sum(int(m.sum()) for m in chosen.values())
                log.info("%s: iteration %d selected %d of %d eligible values", desc, it, selected,
                         part.eligible_numel)
                _save_tensors(it_dir / MASK_FILE, chosen)
                _drop_checkpoints(it_dir / "full")  # the mask is what phase 2 resumes from

            on_rank0(select)  # its errors (too few values left) on every rank, not rank 0 alone
        offset += full_steps
        masks = saved(it_dir / MASK_FILE)
        _set_params(part.trainable, start)  # the rewind
        final = phase(sparse_steps, it_dir / "sparse", masks, cfg.sparse_l1, offset, f"{desc} it{it} sparse")
        if final is None:
            return SFTResult("interrupted", None)
        offset += sparse_steps
        if it < cfg.iterations:
            def end():
                _save_tensors(it_dir / END_FILE, final)
                _drop_checkpoints(it_dir / "sparse")

            on_rank0(end)
            start = final

    def save():
        sft = difference(part, trained_from(part, theta0), final, masks, base_sha256, base_path)
        sft.info = {**(info or {}), **_compute(_phase_dirs(out, cfg.iterations)), "k": k,
                    "eligible_numel": part.eligible_numel, "iterations": cfg.iterations, "frozen": part.frozen,
                    "dense": sorted(part.dense)}
        sft.save(out / SFT_DIR)
        _drop_checkpoints(*_phase_dirs(out, cfg.iterations))

    on_rank0(save)
    return SFTResult("finished", out / SFT_DIR, total_steps)


def _drop_checkpoints(*phase_dirs: Path) -> None:
    """A phase's DeepSpeed checkpoints (model + optimizer: several GB each at XLM-R's size), once what comes after it
    no longer resumes from them; its metrics.jsonl (the SFT's compute) stays."""
    for phase_dir in phase_dirs:
        shutil.rmtree(phase_dir / "checkpoints", ignore_errors=True)


def _run_phase(train_cfg, model, part: Partition, train_data, loss_fn, flops_fn, steps: int, run_dir: Path,
               masks, l1: float, offset: int, desc: str, *, eval_data, theta0, n_params, l1_names, tracker,
               iteration: int) -> dict[str, torch.Tensor] | None:
    """One phase on a fresh engine; the trainable parameters' full fp32 values after it, or None if interrupted."""
    hooks = GradientHooks(part.trainable, theta0, masks, l1=l1, n_params=n_params,
                          accumulation=train_cfg.grad_accumulation, l1_names=l1_names)
    if tracker is not None:
        phases = _phase_dirs(run_dir.parent.parent, iteration)
        before = _compute(phases[:phases.index(run_dir)])
        tracker = _PhaseTracker(tracker, offset, iteration, 1 if masks is None else 2, before)
    try:
        result = train(dataclasses.replace(train_cfg, steps=steps), model, train_data, loss_fn, flops_fn,
                       output_dir=run_dir, eval_data=eval_data, tracker=tracker, desc=desc)
        values = None if result.interrupted else gather_full_params(result.engine, part.trainable)  # collective
        release_engine(result.engine)
    finally:
        hooks.remove()
    return values


def trained_from(part: Partition, theta0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """theta0 as training saw it: under bf16 DeepSpeed casts the module before it makes its fp32 masters, so an entry
    that never moved differs from the fp32 theta0 by its rounding (up to 2^-9 of it), more than a task SFT's changes."""
    return {n: theta0[n].to(p.dtype).float() for n, p in part.trainable.items()}


def learned_change(part: Partition, theta0: dict[str, torch.Tensor],
                   values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What training changed in each eligible parameter (the deltas the top-K selection ranks)."""
    start = trained_from(part, theta0)
    return {n: values[n] - start[n] for n in part.eligible}


def difference(part: Partition, theta0: dict[str, torch.Tensor], final: dict[str, torch.Tensor],
               masks: dict[str, torch.Tensor], base_sha256: str, base_path: str | None) -> SparseFineTuning:
    """The SFT: theta - theta0 at every selected entry, the dense parameters' values."""
    diffs = {}
    for name in part.eligible:
        indices = masks[name].flatten().nonzero().flatten()
        values = (final[name] - theta0[name]).flatten()[indices]
        diffs[name] = SparseDiff(tuple(theta0[name].shape), indices, values)
    return SparseFineTuning(base_sha256, diffs, {n: final[n] for n in part.dense}, base_path)


COMPUTE_KEYS = ("flops", "tokens", "wall_clock_s")


def _phase_dirs(out: Path, iterations: int) -> list[Path]:
    """The run directories of both phases of every iteration up to `iterations`, in order."""
    return [out / f"iteration_{it}" / phase for it in range(1, iterations + 1) for phase in ("full", "sparse")]


def _compute(phase_dirs: list[Path]) -> dict:
    """FLOPs, tokens, wall-clock and steps of the phases run in `phase_dirs` (each phase counts from 0)."""
    total = {"flops": 0.0, "tokens": 0.0, "wall_clock_s": 0.0, "steps": 0}
    for phase_dir in phase_dirs:
        step, last = list(read_metrics(phase_dir / "metrics.jsonl").items())[-1]
        total["steps"] += step
        for key in COMPUTE_KEYS:
            total[key] += last[f"compute/{key}"]
    return total
