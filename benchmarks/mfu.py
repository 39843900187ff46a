"""Model FLOPs utilisation (MFU) of pretraining and adaptation, against this machine's measured matmul peak.

    python benchmarks/mfu.py            # full run -> benchmarks/results/mfu.{json,png}
    python benchmarks/mfu.py --smoke    # tiny shapes, seconds (CI) -> runs/benchmarks/smoke/
    python benchmarks/mfu.py --base     # one GPU, bf16, base size, vocab 250002 -> benchmarks/results/gpu/

In one process, for several rounds: the peak (square fp32 matmuls, or bf16 where training runs in bf16), then
`steps` MiniJoint pretraining steps (megatron-core, the pretraining loop's step), then adaptation through the real
DeepSpeed loop (minimodel.training.deepspeed_loop.train, ZeRO config of configs/adapt/default.yaml, body frozen)
over the full model (standard) and over its mini-model (embeddings + first m layers + head).
MFU = model FLOPs per second / peak FLOPs per second, where model FLOPs come from the shapes
(models.minijoint.config.flops_per_token; training.hf_mlm.MLMFlops) and are checked once against torch's
FlopCounterMode. Reported against the best peak of the run (the machine's capability) and, round by round,
against that round's peak (which cancels part of the load other processes put on a shared machine).
`targets` holds what issue #19 asks to report against: pretraining MFU >= 45% of the measured peak, and the
mini-model's wall-clock saving per adaptation step (medians of the two loops, run side by side) >= 90% of its
FLOP saving.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import MegatronBertForMaskedLM  # noqa: E402

from benchmarks.common import (SUMMARY, MiniJointSteps, arg_parser, count_flops, free_memory,  # noqa: E402
                               header, matmul_flops_per_s, minijoint_config, parse_args, pyplot, save, summary,
                               synthetic_mlm_batch, timed)
from minimodel import distributed  # noqa: E402
from minimodel.adaptation.train import AdaptConfig, TrainableConfig, select_trainable  # noqa: E402
from minimodel.models.minijoint.hf_format import hf_config  # noqa: E402
from minimodel.training.config import (CheckpointConfig, DeepSpeedLoopConfig, OptimizerConfig,  # noqa: E402
                                       ScheduleConfig)
from minimodel.training.deepspeed_loop import release_engine, resolve_precision, train  # noqa: E402
from minimodel.training.hf_mlm import MLMFlops, masked_lm_loss  # noqa: E402

NAME = "mfu"
WORKLOADS = ("pretrain", "adapt_standard", "adapt_mini")
PRETRAIN_MFU_TARGET = 0.45  # of the measured peak (issue #19)
WALLCLOCK_OVER_FLOP_SAVING_TARGET = 0.9
# The GPU preset (--base) beside common.BASE_SHAPE: XLM-R's vocabulary, a matmul that fills an H100, enough products
# to time (50 x 1.4 ms), and rounds x steps that keep the whole run near a minute.
BASE = {"vocab": 250002, "matmul_size": 8192, "matmul_calls": 50, "rounds": 3, "steps": 10}
WORKLOAD = {"precision": str, "step_time_s": SUMMARY, "step_times_s": [[float]], "tokens_per_s": float,
            "model_flops_per_step": float, "counted_flops_per_step": float, "model_flops_per_s": SUMMARY,
            "mfu_vs_best_peak": float, "mfu_vs_round_peak": SUMMARY}
SCHEMA = {
    "peak": {"dtype": str, "matmul_size": int, "matmul_calls": int, "flops_per_s": SUMMARY, "best_flops_per_s": float},
    "model": {"num_layers": int, "hidden_size": int, "seq_length": int, "mini_layers": int, "vocab_size": int,
              "micro_batch": int},
    "workloads": {name: WORKLOAD for name in WORKLOADS},
    "targets": {"pretrain_mfu": float, "pretrain_mfu_target": float, "pretrain_mfu_reached": bool,
                "adapt_flop_saving": float, "adapt_wallclock_saving": float, "wallclock_over_flop_saving": float,
                "wallclock_over_flop_saving_per_round": SUMMARY, "target": float, "reached": bool},
}


class SyntheticMLM(torch.utils.data.Dataset):
    """`n` fixed synthetic masked-LM sequences in the item format of minimodel.data.mlm.MaskedLMDataset."""

    def __init__(self, vocab_size: int, seq: int, n: int, seed: int = 0):
        self.batch = {k: v.numpy() for k, v in synthetic_mlm_batch(vocab_size, n, seq, seed=seed).items()}

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.batch.items()}


def adaptation_model(model_cfg, layers: int):
    """A random-weight Hugging Face model of the exported MiniJoint shape (primary: all layers; mini-model: the
    first m), with adaptation's trainable set: token embeddings + tied output embeddings, the rest frozen."""
    model = MegatronBertForMaskedLM(hf_config(model_cfg, layers, tie_word_embeddings=True))
    select_trainable(model, TrainableConfig())
    return model


class Adaptation:
    """Adaptation steps through the real DeepSpeed loop; `run(steps)` -> per-step seconds (first step dropped)."""

    def __init__(self, model_cfg, layers: int, micro_batch: int):
        # pristine: every run trains a fresh copy. On the device, where the FLOP count below runs (a base-size
        # step on the CPU would take minutes).
        self.model = adaptation_model(model_cfg, layers).to(distributed.device())
        self.flops_fn = MLMFlops(self.model)
        self.data = SyntheticMLM(model_cfg.vocab_size, model_cfg.seq_length, 4 * micro_batch)
        batch = {k: torch.as_tensor(v[:micro_batch]).to(distributed.device()) for k, v in self.data.batch.items()}
        self.tokens = batch["input_ids"].numel()
        self.model_flops_per_step = self.flops_fn(batch)
        self.counted_flops_per_step = count_flops(lambda: masked_lm_loss(self.model, batch).backward())
        self.model.zero_grad(set_to_none=True)
        self.loop = DeepSpeedLoopConfig(micro_batch_size=micro_batch, optim=OptimizerConfig(lr=1e-4),
                                        schedule=ScheduleConfig(warmup_steps=2),
                                        checkpoint=CheckpointConfig(save_every=0), torch_adam=True,
                                        zero_config=AdaptConfig().train.zero_config)
        self.precision = resolve_precision(self.loop.precision)  # what train() runs in: bf16 on CUDA
        self.loss_fn = masked_lm_loss

    def run(self, steps: int) -> list[float]:
        """The loop's own step times (its step ends reading the loss back from the device, so they include the
        device work). The engine is released: free_memory() can then reclaim it."""
        out = Path(tempfile.mkdtemp(prefix="mfu-adapt-"))
        try:
            cfg = dataclasses.replace(self.loop, steps=steps + 1)
            # A fresh copy per run: DeepSpeed's ZeRO gradient hooks stay on a module it has initialised once.
            model = copy.deepcopy(self.model)
            result = train(cfg, model, self.data, self.loss_fn, self.flops_fn, output_dir=out, desc="adapt")
            release_engine(result.engine)  # else its ZeRO gradient hooks keep it (GBs at base size) from the GC
            return [self.tokens / row["throughput/tokens_per_s"] for row in result.history[1:]]
        finally:
            shutil.rmtree(out, ignore_errors=True)


def workload_summary(precision: str, round_peaks: list[tuple[list[float], float]], model_flops: float,
                     counted: float, tokens: int, best_peak: float) -> dict:
    """One workload's figures from its step times per round, each with that round's matmul peak (the raw times
    kept: a ratio can be recomputed per round)."""
    times = [t for ts, _ in round_peaks for t in ts]
    t = summary(times)
    per_round = [model_flops / statistics.median(ts) / peak for ts, peak in round_peaks]
    return {"precision": precision, "step_time_s": t, "step_times_s": [list(ts) for ts, _ in round_peaks],
            "tokens_per_s": tokens / t["median"],
            "model_flops_per_step": model_flops, "counted_flops_per_step": counted,
            "counted_vs_model": counted / model_flops,
            "model_flops_per_s": summary([model_flops / s for s in times]),
            "mfu_vs_best_peak": model_flops / t["median"] / best_peak, "mfu_vs_round_peak": summary(per_round)}


def targets(workloads: dict) -> dict:
    """Issue #19's targets: pretraining MFU against the best measured peak; the mini-model's saving per adaptation
    step in wall-clock (median step times) over its saving in model FLOPs."""
    mfu = workloads["pretrain"]["mfu_vs_best_peak"]
    full, mini = workloads["adapt_standard"], workloads["adapt_mini"]
    flop_saving = 1 - mini["model_flops_per_step"] / full["model_flops_per_step"]
    wallclock_saving = 1 - mini["step_time_s"]["median"] / full["step_time_s"]["median"]
    ratio = wallclock_saving / flop_saving
    per_round = [(1 - statistics.median(m) / statistics.median(f)) / flop_saving  # the same round's two workloads
                 for f, m in zip(full["step_times_s"], mini["step_times_s"])]
    return {"pretrain_mfu": mfu, "pretrain_mfu_target": PRETRAIN_MFU_TARGET,
            "pretrain_mfu_reached": mfu >= PRETRAIN_MFU_TARGET,
            "adapt_flop_saving": flop_saving, "adapt_wallclock_saving": wallclock_saving,
            "wallclock_over_flop_saving": ratio, "wallclock_over_flop_saving_per_round": summary(per_round),
            "target": WALLCLOCK_OVER_FLOP_SAVING_TARGET,
            "reached": ratio >= WALLCLOCK_OVER_FLOP_SAVING_TARGET}


def figure(result: dict):
    fig, ax = pyplot().subplots(figsize=(7.5, 4.2))
    labels = {"pretrain": "MiniJoint pretraining\n(megatron-core)", "adapt_standard": "adaptation, full model\n"
              "(standard; DeepSpeed)", "adapt_mini": "adaptation, mini-model\n(DeepSpeed)"}
    peak = result["peak"]["best_flops_per_s"]
    for i, name in enumerate(WORKLOADS):
        w = result["workloads"][name]
        f = w["model_flops_per_s"]
        ax.bar(i, f["median"] / 1e9, yerr=[[(f["median"] - f["q25"]) / 1e9], [(f["q75"] - f["median"]) / 1e9]],
               capsize=4, color="tab:blue")
        ax.text(i, f["q75"] / 1e9, f"MFU {100 * w['mfu_vs_best_peak']:.0f}%", ha="center", va="bottom",
                fontsize=9)
    ax.axhline(peak / 1e9, color="tab:red", ls="--",
               label=f"best measured {result['peak']['dtype']} matmul peak ({peak / 1e9:.0f} GFLOP/s)")
    ax.set_xticks(range(len(WORKLOADS)), [labels[n] for n in WORKLOADS], fontsize=8)
    ax.set_ylabel("model GFLOP/s (median, IQR)")
    m = result["model"]
    ax.set_title(f"{m['num_layers']} layers (mini: {m['mini_layers']}), hidden {m['hidden_size']}, vocab "
                 f"{m['vocab_size']}, {m['micro_batch']}x{m['seq_length']} tokens/step\n"
                 f"{result['machine']['cuda'] or result['machine']['cpu']}, "
                 f"{result['machine']['torch_threads']} threads", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> dict:
    parser = arg_parser(__doc__, "tiny shapes, 2 rounds (CI)", model_shape=True)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per workload per round")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-calls", type=int, default=3, help="products per peak measurement")
    args = parse_args(parser, argv, base=BASE)
    if args.smoke:
        args.vocab, args.matmul_size = 1000, 256
    if args.mini_layers >= args.layers:
        parser.error(f"--mini-layers {args.mini_layers} must be below --layers {args.layers}: the mini-model "
                     "must be smaller than the full model for a saving to measure")
    rounds = args.rounds or (2 if args.smoke else 5)
    steps = args.steps or (2 if args.smoke else 4)

    cfg = minijoint_config(args, args.vocab)
    result = header(NAME, args.smoke)  # date and load average at the start
    with MiniJointSteps.world(cfg, args.micro_batch):
        pretrain = MiniJointSteps(cfg, args.micro_batch)
        dtype = torch.bfloat16 if pretrain.parallel.bf16() else torch.float32
        pretrain_counted = count_flops(pretrain.step)
        adapt = {"adapt_standard": Adaptation(cfg, cfg.num_layers, args.micro_batch),
                 "adapt_mini": Adaptation(cfg, cfg.mini_layers, args.micro_batch)}
        precision = {"pretrain": "bf16" if pretrain.engine.bf16 else "fp32",
                     **{name: a.precision for name, a in adapt.items()}}
        free_memory()  # the FLOP counts' activations
        flops = {"pretrain": (pretrain.model_flops_per_step(), pretrain_counted, pretrain.tokens),
                 **{n: (a.model_flops_per_step, a.counted_flops_per_step, a.tokens) for n, a in adapt.items()}}
        peaks: list[float] = []
        times: dict[str, list[list[float]]] = {name: [] for name in WORKLOADS}
        for r in range(rounds):
            peaks.append(matmul_flops_per_s(args.matmul_size, dtype, args.matmul_calls))
            free_memory()  # the matmuls' operands
            pretrain.step()  # warm-up after the matmuls
            pretrain_times = [timed(pretrain.step) for _ in range(steps)]
            times["pretrain"].append(pretrain_times)
            for name, workload in adapt.items():
                times[name].append(workload.run(steps))
                free_memory()  # the run's engine and its fp32 master copy, before the next workload
            print(f"[{NAME}] round {r + 1}/{rounds}: peak {peaks[-1] / 1e9:.1f} GFLOP/s, pretrain step "
                  f"{statistics.median(pretrain_times):.3f} s, adaptation step full "
                  f"{statistics.median(times['adapt_standard'][-1]):.3f} s / mini "
                  f"{statistics.median(times['adapt_mini'][-1]):.3f} s", flush=True)
            best = max(peaks)
            result["peak"] = {"dtype": str(dtype).removeprefix("torch."), "matmul_size": args.matmul_size,
                              "matmul_calls": args.matmul_calls, "flops_per_s": summary(peaks),
                              "best_flops_per_s": best}
            result["model"] = {"num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                               "seq_length": cfg.seq_length, "mini_layers": cfg.mini_layers,
                               "vocab_size": cfg.vocab_size, "micro_batch": args.micro_batch,
                               "rounds": r + 1, "steps_per_round": steps}
            result["workloads"] = {
                name: workload_summary(precision[name], list(zip(times[name], peaks)), *flops[name], best)
                for name in WORKLOADS}
            result["targets"] = targets(result["workloads"])
            # after every round: a run stopped at its time limit (the GPU check's) keeps the rounds it finished
            save(NAME, result, SCHEMA, figure(result), args.out)
    for name in WORKLOADS:
        w = result["workloads"][name]
        print(f"[{NAME}] {name}: {w['model_flops_per_s']['median'] / 1e9:.1f} GFLOP/s, MFU "
              f"{100 * w['mfu_vs_best_peak']:.1f}% of the best peak ({best / 1e9:.1f} GFLOP/s), "
              f"{100 * w['mfu_vs_round_peak']['median']:.1f}% of the same round's; counted/model FLOPs "
              f"{w['counted_vs_model']:.4f}, {w['precision']}")
    t = result["targets"]
    print(f"[{NAME}] target: pretraining MFU {100 * t['pretrain_mfu']:.1f}% of the best measured peak "
          f"(target >= {100 * t['pretrain_mfu_target']:.0f}%: "
          f"{'reached' if t['pretrain_mfu_reached'] else 'NOT reached'})")
    rounds = t["wallclock_over_flop_saving_per_round"]
    print(f"[{NAME}] target: the mini-model saves {100 * t['adapt_flop_saving']:.1f}% of the FLOPs and "
          f"{100 * t['adapt_wallclock_saving']:.1f}% of the wall-clock per adaptation step: "
          f"{t['wallclock_over_flop_saving']:.2f} of the FLOP saving (per round {rounds['min']:.2f}-{rounds['max']:.2f}"
          f"; target >= {t['target']:.2f}: "
          f"{'reached' if t['reached'] else 'NOT reached'})")
    return result


if __name__ == "__main__":
    main()
