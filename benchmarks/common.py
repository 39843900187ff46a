"""What every benchmark shares: side-by-side timing, the machine's matmul peak, FLOP counting, result files.

Timings on a shared machine are noisy, so variants are always measured in one process, interleaved round-robin
(A B C A B C ...), and summarised by their median and spread; never compare numbers from different runs.
Results are JSON (checked against each benchmark's schema before they are written, atomically) plus a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from minimodel import distributed
from minimodel.distributed import ParallelConfig
from minimodel.files import write_text_atomic
from minimodel.models.minijoint import parallelize
from minimodel.models.minijoint.config import ModelConfig, flops_per_token
from minimodel.training.config import OptimizerConfig, PretrainLoopConfig
from minimodel.training.megatron_loop import Engine

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
SMOKE_DIR = REPO / "runs" / "benchmarks" / "smoke"
BASE_DIR = RESULTS_DIR / "gpu"


# -- statistics and timing ---------------------------------------------------------------------------------------
def summary(values: list[float]) -> dict[str, float]:
    """Median and spread of repeated measurements."""
    ordered = sorted(values)
    # inclusive: quartiles within the data (the default extrapolates beyond min/max for few values)
    q = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) >= 2 else [ordered[0]] * 3
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "q25": q[0], "q75": q[2], "n": len(ordered)}


def synchronize() -> None:
    """Wait for the device work queued so far (CUDA kernels run asynchronously; the CPU has nothing queued)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds `fn()` takes, its device work included (not only the time to launch it)."""
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def free_memory() -> None:
    """Hand the memory of finished workloads back (their engines hold reference cycles), so the next one fits."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, measured round-robin so that load changes hit every variant alike.

    A variant that needs set-up between calls (e.g. switching a head on) does it inside its callable."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return times


def matmul_flops_per_s(size: int, dtype: torch.dtype = torch.float32, calls: int = 3) -> float:
    """Achieved FLOP/s of `calls` square matmuls of `size` (2 n^3 FLOPs each) on this process's device and threads."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.mm(a, b)  # warm-up (allocation, kernel choice)

    def products():
        for _ in range(calls):
            torch.mm(a, b)

    return 2.0 * size ** 3 * calls / timed(products)


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs torch's FlopCounterMode counts for `fn()` (matmuls, attention, convolutions; forward and backward)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


# -- machine and provenance ----------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine() -> dict[str, Any]:
    """Where and when the numbers were measured (the load average says how shared the machine was)."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "git_commit": _git_commit(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min"] = list(os.getloadavg())
    return info


def command_line() -> str:
    return " ".join(["python", *sys.argv])


# -- result files ----------------------------------------------------------------------------------------------------
class SchemaError(ValueError):
    pass


def check_schema(value: Any, schema: Any, where: str = "$") -> None:
    """Raise SchemaError naming the first place where `value` does not fit `schema`.

    schema: a type (float accepts int), {key: schema} for an object with at least those keys, [schema] for a
    non-empty list of such elements, or a tuple of alternatives (None among them allows null)."""
    if isinstance(schema, tuple):
        if value is None and None in schema:
            return
        errors = []
        for alternative in (s for s in schema if s is not None):
            try:
                return check_schema(value, alternative, where)
            except SchemaError as e:
                errors.append(str(e))
        raise SchemaError(" / ".join(errors) if value is not None else f"{where}: null is not allowed here")
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            raise SchemaError(f"{where}: expected an object, got {type(value).__name__}")
        for key, sub in schema.items():
            if key not in value:
                raise SchemaError(f"{where}: missing key {key!r}")
            check_schema(value[key], sub, f"{where}.{key}")
    elif isinstance(schema, list):
        if not isinstance(value, list) or not value:
            raise SchemaError(f"{where}: expected a non-empty list, got {value!r:.80}")
        for i, item in enumerate(value):
            check_schema(item, schema[0], f"{where}[{i}]")
    else:
        allowed = (schema, int) if schema is float else (schema,)
        if isinstance(value, bool) and schema is not bool or not isinstance(value, allowed):
            raise SchemaError(f"{where}: expected {schema.__name__}, got {type(value).__name__} {value!r:.80}")


SUMMARY = {"median": float, "min": float, "max": float, "q25": float, "q75": float, "n": int}
HEADER = {"benchmark": str, "smoke": bool, "command": str, "machine": {"date_utc": str, "cpu": str,
                                                                       "torch_threads": int}}


def write_result(path: Path, result: dict, schema: dict) -> Path:
    """Check `result` against `schema` (and the common header), then write it atomically as JSON."""
    check_schema(result, {**HEADER, **schema})
    if hasattr(os, "getloadavg"):  # how shared the machine was by the end (the header has it at the start)
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
    return write_text_atomic(path, json.dumps(result, indent=2, allow_nan=False) + "\n")  # strict JSON only


def header(name: str, smoke: bool) -> dict[str, Any]:
    return {"benchmark": name, "smoke": smoke, "command": command_line(), "machine": machine()}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def language_axes(langs: list[str]):
    """A figure with one panel per target language, side by side: (figure, [axes])."""
    fig, axes = pyplot().subplots(1, len(langs), figsize=(max(9.0, 5.2 * len(langs)), 4.6), squeeze=False)
    return fig, list(axes[0])


def save(name: str, result: dict, schema: dict, figure, out_dir: Path) -> Path:
    """<out_dir>/<name>.json (checked against `schema`, see write_result) and `figure` as <name>.png."""
    path = write_result(out_dir / f"{name}.json", result, schema)
    figure.tight_layout()
    figure.savefig(path.with_suffix(".png"), dpi=120)
    pyplot().close(figure)
    print(f"[{name}] wrote {path} and {path.with_suffix('.png')}")
    return path


# -- the command line ------------------------------------------------------------------------------------------------
SMOKE_SHAPE = {"layers": 2, "hidden": 64, "seq": 32, "micro_batch": 2, "mini_layers": 1}
# configs/pretrain/minijoint_base.yaml's model (RoBERTa/XLM-R base: 12 heads of 64) and its micro-batch of 16, here on
# one GPU without tensor parallelism (the config's TP=2 halves each GPU's share). 16 x 512 tokens also keeps
# head_cost's full-sequence projection at 250k (fp32 logits, 8 GB per head) well inside an 80 GB card.
BASE_SHAPE = {"layers": 12, "hidden": 768, "seq": 512, "micro_batch": 16, "mini_layers": 4}


def arg_parser(doc: str, smoke_help: str, model_shape: bool = False) -> argparse.ArgumentParser:
    """--smoke and --out, which every benchmark takes; with `model_shape`, the MiniJoint model's shape flags
    (see minijoint_config), which --smoke sets to SMOKE_SHAPE, and --base, the GPU preset (see parse_args)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--smoke", action="store_true", help=smoke_help)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output dir (default: {RESULTS_DIR.relative_to(REPO)}, "
                             f"{SMOKE_DIR.relative_to(REPO)} with --smoke, {BASE_DIR.relative_to(REPO)} with --base)")
    if model_shape:
        preset.add_argument("--base", action="store_true",
                            help=f"GPU preset, bf16: base-size shapes {BASE_SHAPE} and the benchmark's own "
                                 "GPU settings, as defaults that explicit flags override; refused without CUDA")
        parser.add_argument("--layers", type=int, default=12)
        parser.add_argument("--hidden", type=int, default=256)
        parser.add_argument("--seq", type=int, default=128)
        parser.add_argument("--micro-batch", type=int, default=8)
        parser.add_argument("--mini-layers", type=int, default=3)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None,
               base: dict[str, Any] | None = None) -> argparse.Namespace:
    """The parsed flags, with --out (and --work) resolved, in the repository root; under --smoke, the model shape (if any) set to SMOKE_SHAPE; under
    --base, every flag not given defaults to BASE_SHAPE and the benchmark's own GPU settings `base`."""
    args = parser.parse_args(argv)
    if getattr(args, "base", False):
        if not torch.cuda.is_available():
            parser.error("--base is the GPU preset (base-size shapes in bf16) and this machine has no CUDA device: "
                         "on the CPU it would take hours. Use the CPU defaults or --smoke here")
        parser.set_defaults(**BASE_SHAPE, **(base or {}))
        args = parser.parse_args(argv)  # again, so that the flags given win over the preset
    args.out = Path(args.out or (SMOKE_DIR if args.smoke else BASE_DIR if getattr(args, "base", False)
                                 else RESULTS_DIR)).resolve()
    if getattr(args, "work", None):
        args.work = Path(args.work).resolve()
    os.chdir(REPO)  # the pipelines name their configs and entry points relative to the repository root
    if args.smoke and hasattr(args, "layers"):
        vars(args).update(SMOKE_SHAPE)
    return args


def minijoint_config(args: argparse.Namespace, vocab_size: int, **fields):
    """The MiniJoint ModelConfig of the shape flags (one attention head per 64 hidden units)."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                       num_attention_heads=max(1, args.hidden // 64), seq_length=args.seq,
                       mini_layers=args.mini_layers, **fields)


# -- MiniJoint pretraining steps in this process (megatron-core, one rank, TP=1/PP=1) -------------------------------
def synthetic_mlm_batch(vocab_size: int, batch: int, seq: int, mask_fraction: float = 0.15,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens with exactly round(mask_fraction * seq) predicted positions per sequence (no padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch, seq), generator=g)
    masked = max(1, round(mask_fraction * seq))
    positions = torch.rand(batch, seq, generator=g).argsort(dim=1)[:, :masked]
    labels = torch.full_like(ids, -100)
    labels.scatter_(1, positions, ids.gather(1, positions))
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


class MiniJointSteps:
    """A MiniJoint model on one rank with the pretraining loop's engine (minimodel.training.megatron_loop.Engine: the
    megatron optimizer and schedule) and one fixed synthetic micro-batch; `step()` is the loop's own update.

    Build it inside `with MiniJointSteps.world(model_cfg, micro_batch):`; every model there shares its layout."""

    def __init__(self, model_cfg, micro_batch: int, seed: int = 0):
        self.cfg = model_cfg
        self.parallel = ParallelConfig(micro_batch_size=micro_batch, global_batch_size=micro_batch)
        self.engine = Engine(model_cfg, self.parallel, PretrainLoopConfig(optim=OptimizerConfig(lr=1e-4,
                                                                                                weight_decay=0.01)))
        self.batch = synthetic_mlm_batch(model_cfg.vocab_size, micro_batch, model_cfg.seq_length, seed=seed)
        self.tokens = micro_batch * model_cfg.seq_length
        self.mask_fraction = float((self.batch["labels"] != -100).float().mean())

    @staticmethod
    @contextlib.contextmanager
    def world(model_cfg, micro_batch: int, seed: int = 0):
        """The one-rank megatron world (TP=1/PP=1) the MiniJointSteps of the block live in; destroyed after it."""
        distributed.single_process_env()
        parallelize.setup(model_cfg, ParallelConfig(micro_batch_size=micro_batch, global_batch_size=micro_batch),
                          seed)
        try:
            yield
        finally:
            distributed.destroy()

    def step(self) -> None:
        self.engine.update(iter([self.batch]), 1)

    def model_flops_per_step(self) -> float:
        """Model FLOPs of one step from the model's shapes (minimodel.models.minijoint.config.flops_per_token)."""
        return flops_per_token(self.cfg, self.mask_fraction) * self.tokens

    def chunk(self):
        return parallelize.unwrap(self.engine.model[0])
