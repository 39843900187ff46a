"""Adaptation compute to matched quality: standard adaptation vs MiniJoint and MiniPost mini-model adaptation.

    python benchmarks/adaptation_compute.py            # full run -> benchmarks/results/adaptation_compute.{json,png}
    python benchmarks/adaptation_compute.py --smoke    # tiny, a few minutes (CI) -> runs/benchmarks/smoke/

The paper's claim: mini-model adaptation matches standard adaptation with 2.3x less compute on average. This
measures this project's own figure with the pipeline itself (minimodel.pipeline, tracking off), one pipeline per
seed under <work>/seed<N>/ (`seed=N`: every training stage seeded with N, an independent replicate; the data under
<work>/data is shared), each with this benchmark's model sizes as pipeline overrides (Setup.pipeline):

  data -> MiniJoint pretraining (L layers, secondary head after layer m) -> export (primary + MiniJoint mini-model)
  -> MiniPost mini-model from the primary -> adaptation per target language over the full model (standard), the
  MiniJoint and the MiniPost mini-model (mini-models get more steps: about the standard's compute), an embedding
  snapshot every `snapshot_every` steps -> zero-shot target_mlm over every snapshot: the held-out target MLM loss of
  the PRIMARY model with the snapshot's embeddings plugged in; quality = mlm_gain, the loss drop from the run's
  step-0 embeddings (identical across methods within a seed) -> report.

The savings are the report's (minimodel.evaluation.report: collect + summarize): per seed and language, the FLOPs
the standard method needs to reach X% of its own final gain / the FLOPs the method needs (the snapshot from which on
its gain stays at or above it); this benchmark aggregates them over seeds (median, min-max, how many seeds reached
it) and averages over languages. Rerunning the same command skips every finished stage. Each seed's resolved
pipeline config is <work>/seed<N>/config.yaml: `python -m minimodel.pipeline --config <that>` reruns that seed
alone.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, SUMMARY, arg_parser, header, language_axes, parse_args, save, summary  # noqa: E402
from minimodel import pipeline  # noqa: E402
from minimodel.adaptation.artifact import read_info  # noqa: E402
from minimodel.evaluation.report import collect, summarize  # noqa: E402
from minimodel.layout import PipelineLayout  # noqa: E402
from minimodel.methods import REFERENCE  # noqa: E402
from minimodel.pipeline import PipelineConfig, StageConfigs  # noqa: E402
from minimodel.tracking import TrackingConfig  # noqa: E402

NAME = "adaptation_compute"
METHODS = ("standard", "minijoint", "minipost")
MINI_METHODS = METHODS[1:]
COLOURS = {"standard": "tab:gray", "minijoint": "tab:blue", "minipost": "tab:orange"}  # per model, in the figures
THRESHOLDS = (0.95, 0.99, 1.0)
TASK = "target_mlm"
QUALITY_SIGNAL = ("zero-shot target_mlm: mlm_gain = held-out target MLM loss of the primary model with the run's "
                  "step-0 embeddings plugged in minus the loss with the snapshot's embeddings (fixed masking); "
                  "saving at X% = standard's FLOPs to reach X% of its final gain for good / the method's")

SCHEMA = {
    "setup": {"num_layers": int, "mini_layers": int, "minipost_layers": str, "target_langs": [str], "seeds": [int],
              "steps": {m: int for m in METHODS}, "work_dir": str},
    "quality_signal": str,
    "pipelines": [{"seed": int, "output_dir": str}],
    "flops_per_step": {m: float for m in METHODS},
    "seconds_per_step": {m: SUMMARY for m in METHODS},
    "curves": [{"method": str, "lang": str, "seed": int,
                "points": [{"step": int, "flops": float, "wall_clock_s": float, "quality": float}]}],
    "compute_to_quality": [{"method": str, "lang": str, "threshold": float, "seeds": int, "reached": int,
                            "per_seed_saving": [(float, None)], "saving": (SUMMARY, None),
                            "wall_clock_saving": (SUMMARY, None)}],
    "average_saving": {m: {str(t): (float, None) for t in THRESHOLDS} for m in MINI_METHODS},
}


@dataclass
class Setup:
    """Sizes of one benchmark run (the smoke and full presets below; CLI flags override)."""
    data_config: str = "configs/data/default.yaml"
    vocab_size: int = 8000  # the data config's tokenizer size (the pretrained model's vocabulary)
    target_langs: list[str] = field(default_factory=lambda: ["ny", "sw", "tl"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_layers: int = 12
    mini_layers: int = 3  # MiniJoint: the secondary head after layer 3 of 12
    secondary_head: str = "separate"  # MiniJoint's secondary head: separate | shared_transform (ModelConfig)
    minipost_layers: int = 2  # MiniPost: the primary's first 2 layers, frozen ...
    minipost_new_layers: int = 1  # ... + 1 new layer (3 layers, like MiniJoint's mini-model)
    minipost_distill: float = 1.0  # MiniPost's distill.weight (0: the paper's MLM alone; RESULTS.md section 1b)
    hidden_size: int = 128
    seq_length: int = 64
    pretrain_steps: int = 400
    pretrain_batch: int = 16
    minipost_steps: int = 200
    # Standard adaptation's steps; the mini-models get `mini_steps_factor` times as many (about 0.9x the standard's
    # compute at 3 of 12 layers), so a mini-model that needs more compute than the standard shows as "not reached".
    adapt_steps: int = 100
    mini_steps_factor: int = 3
    adapt_batch: int = 8
    adapt_lr: float = 2e-3
    snapshot_every: int = 10
    eval_sequences: int = 32  # held-out target sequences target_mlm scores at every snapshot

    def steps(self, method: str) -> int:
        return self.adapt_steps * (1 if method == REFERENCE else self.mini_steps_factor)

    def pipeline(self, work: Path, seed: int) -> PipelineConfig:
        """The pipeline of one seed: <work>/seed<N>, data in <work>/data, these sizes as its overrides."""
        s = self
        pretrain = [
            "parallel.tensor_model_parallel_size=2", f"model.vocab_size={s.vocab_size}",
            f"model.num_layers={s.num_layers}", f"model.mini_layers={s.mini_layers}",
            f"model.hidden_size={s.hidden_size}",
            f"model.num_attention_heads={max(2, s.hidden_size // 32)}",  # at least 2: TP=2 splits them
            f"model.seq_length={s.seq_length}", f"model.secondary_head={s.secondary_head}",
            f"parallel.micro_batch_size={s.pretrain_batch}", f"parallel.global_batch_size={s.pretrain_batch}",
            f"train.steps={s.pretrain_steps}", f"train.schedule.warmup_steps={max(1, s.pretrain_steps // 20)}",
            f"train.eval.every={max(1, s.pretrain_steps // 4)}", f"train.log_every={max(1, s.pretrain_steps // 10)}",
            f"train.checkpoint.save_every={max(1, s.pretrain_steps // 4)}"]
        minipost = [
            f"mini.layers={s.minipost_layers}", f"mini.new_layers={s.minipost_new_layers}",
            f"data.seq_length={s.seq_length}", f"train.steps={s.minipost_steps}",
            f"train.schedule.warmup_steps={max(2, s.minipost_steps // 10)}",
            f"train.checkpoint.save_every={s.minipost_steps}", f"train.eval.every={s.minipost_steps}",
            f"distill.weight={s.minipost_distill}"]
        adapt = [f"seq_length={s.seq_length}", f"train.micro_batch_size={s.adapt_batch}",
                 f"train.optim.lr={s.adapt_lr}", "train.eval.every=0", "train.eval.batches=4",
                 "train.checkpoint.save_every=0", "train.torch_adam=true", f"snapshot_every={s.snapshot_every}"]

        def method_steps(method: str) -> list[str]:
            n = s.steps(method)
            return [f"train.steps={n}", f"train.schedule.warmup_steps={max(2, n // 10)}"]

        cfg = PipelineConfig(
            output_dir=str(work / f"seed{seed}"), data_dir=str(work / "data"), target_langs=list(s.target_langs),
            methods=list(METHODS), pretrain_nproc=2, seed=seed,
            configs=StageConfigs(data=s.data_config, adapt="configs/adapt/default.yaml",
                                 zero_shot=["configs/evaluate/zero_shot/target_mlm_tiny.yaml"]),
            overrides={"pretrain": pretrain, "minipost": minipost, "adapt": adapt,
                       "zero_shot": [f"task.max_length={s.seq_length}", f"task.max_eval_examples={s.eval_sequences}"]},
            method_overrides={m: method_steps(m) for m in METHODS},
            tracking=TrackingConfig(enabled=False))  # results on disk; nothing needs MLflow
        cfg.validate()
        return cfg


SMOKE = Setup(data_config="configs/data/smoke.yaml", vocab_size=1000, target_langs=["ny"], seeds=[0], num_layers=4,
              mini_layers=1, minipost_layers=1, minipost_new_layers=1, hidden_size=64, seq_length=32,
              pretrain_steps=20, pretrain_batch=8, minipost_steps=4, adapt_steps=8, mini_steps_factor=2,
              snapshot_every=4, eval_sequences=8)

# Command-line flags that change a Setup field (flag dest -> field): add_setup_flags adds the ones every benchmark
# on this protocol takes, a benchmark may add the others.
SETUP_FLAGS = {"langs": "target_langs", "seeds": "seeds", "secondary_head": "secondary_head",
               "adapt_steps": "adapt_steps", "pretrain_steps": "pretrain_steps", "minipost_distill": "minipost_distill"}


def add_setup_flags(parser) -> None:
    parser.add_argument("--langs", nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--secondary-head", choices=["separate", "shared_transform"], default=None,
                        help="MiniJoint's secondary MLM head (model.secondary_head)")
    parser.add_argument("--minipost-distill", type=float, default=None,
                        help="MiniPost's distill.weight: 0 trains on the gold tokens alone (the paper's MLM), 1 on "
                             "the primary's predictions alone")


def setup_from_flags(args) -> Setup:
    """SMOKE under --smoke, else the full Setup, with each Setup flag the command line gave."""
    setup = dataclasses.replace(SMOKE) if args.smoke else Setup()
    for dest, name in SETUP_FLAGS.items():
        if getattr(args, dest, None) is not None:
            setattr(setup, name, getattr(args, dest))
    return setup


def run_seed(setup: Setup, work: Path, seed: int) -> dict:
    """One seed's pipeline (finished stages are skipped), then its report summary of target_mlm."""
    cfg = setup.pipeline(work, seed)
    print(f"[{NAME}] seed {seed}: pipeline {cfg.output_dir}", flush=True)
    pipeline.run(cfg)
    layout = PipelineLayout(Path(cfg.output_dir))
    return summarize(collect(layout, list(METHODS), [TASK]), REFERENCE, list(THRESHOLDS), methods=list(METHODS))


def savings(per_seed: dict[int, dict], langs: list[str]) -> tuple[list[dict], dict]:
    """The report's per-seed savings (summarize's reach) aggregated over seeds, per language, method and threshold,
    and averaged over languages (only where every language reached it in every seed; else null: not matched)."""
    rows = []
    for lang in langs:
        for method in MINI_METHODS:
            for t in THRESHOLDS:
                reach = [s["tasks"][TASK]["languages"][lang]["methods"][method]["reach"][f"{t:g}"]
                         for s in per_seed.values()]
                flops = [r["flops_saving"] for r in reach]
                reached = [x for x in flops if x is not None]
                wall = [r["wall_clock_saving"] for r in reach if r["wall_clock_saving"] is not None]
                rows.append({"method": method, "lang": lang, "threshold": t, "seeds": len(flops),
                             "reached": len(reached), "per_seed_saving": flops,
                             "saving": summary(reached) if reached else None,
                             "wall_clock_saving": summary(wall) if wall else None})
    average = {m: {} for m in MINI_METHODS}
    for m in MINI_METHODS:
        for t in THRESHOLDS:
            matched = [r for r in rows if r["method"] == m and r["threshold"] == t]
            all_reached = all(r["reached"] == r["seeds"] for r in matched)
            average[m][str(t)] = statistics.mean(r["saving"]["median"] for r in matched) if all_reached else None
    return rows, average


def figure(result: dict):
    langs = result["setup"]["target_langs"]
    fig, axes = language_axes(langs)
    first_seed = min(result["setup"]["seeds"])
    for ax, lang in zip(axes, langs):
        finals = []
        for c in (c for c in result["curves"] if c["lang"] == lang):
            label = c["method"] if c["seed"] == first_seed else None
            ax.plot([p["flops"] / 1e9 for p in c["points"]], [p["quality"] for p in c["points"]], "-",
                    color=COLOURS[c["method"]], alpha=0.8, lw=1.2, label=label)
            if c["method"] == REFERENCE:
                finals.append(c["points"][-1]["quality"])
        ax.axhline(statistics.mean(finals), color="tab:gray", ls=":", lw=1, label="standard, final")
        ax.set_xlabel("adaptation GFLOPs (cumulative)")
        ax.set_ylabel("held-out MLM gain (nats), primary + plugged embeddings", fontsize=8)
        rows = {(r["method"], r["threshold"]): r for r in result["compute_to_quality"] if r["lang"] == lang}
        text = [f"{m} saving " + ", ".join(
            f"{int(100 * t)}%: " + (f"{rows[m, t]['saving']['median']:.2f}x" if rows[m, t]["saving"] else "-")
            + f" ({rows[m, t]['reached']}/{rows[m, t]['seeds']})" for t in (0.95, 0.99)) for m in MINI_METHODS]
        ax.set_title(f"{lang}\n" + "\n".join(text), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = result["setup"]
    fig.suptitle(f"Embedding adaptation to matched quality: primary {s['num_layers']} layers; MiniJoint mini-model "
                 f"{s['mini_layers']} layers ({s['secondary_head']} head), MiniPost {s['minipost_layers']}; seeds "
                 f"{s['seeds']}\nsaving = standard's FLOPs / method's FLOPs to reach X% of standard's final gain for "
                 f"good (seeds reaching it)", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> dict:
    parser = arg_parser(__doc__, "tiny model, data and runs (CI)")
    parser.add_argument("--work", type=Path, default=None,
                        help="work dir for the data and the per-seed pipelines (default: runs/benchmarks/"
                             "adaptation_compute[_smoke]); re-running the same command skips finished stages there")
    add_setup_flags(parser)
    parser.add_argument("--adapt-steps", type=int, default=None, help="standard adaptation steps")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    args = parse_args(parser, argv)
    setup = setup_from_flags(args)
    work = (args.work or REPO / "runs" / "benchmarks" / (NAME + ("_smoke" if args.smoke else ""))).resolve()

    result = header(NAME, args.smoke)  # the machine, date and load as the runs start
    per_seed = {seed: run_seed(setup, work, seed) for seed in setup.seeds}
    curves, flops_per_step, seconds_per_step = [], {m: [] for m in METHODS}, {m: [] for m in METHODS}
    for seed, report in per_seed.items():
        for lang in setup.target_langs:
            for method, entry in report["tasks"][TASK]["languages"][lang]["methods"].items():
                info = read_info(PipelineLayout(work / f"seed{seed}").adapt(method, lang))
                # the snapshots and the final embeddings (adapt_step None: the last step's, often also a snapshot)
                points = {info["steps"] if p["adapt_step"] is None else p["adapt_step"]: p for p in entry["points"]}
                curves.append({"method": method, "lang": lang, "seed": seed, "points": [
                    {"step": step, "flops": p["flops"], "wall_clock_s": p["wall_clock_s"], "quality": p["quality"]}
                    for step, p in sorted(points.items())]})
                flops_per_step[method].append(info["flops"] / info["steps"])
                seconds_per_step[method].append(info["wall_clock_s"] / info["steps"])
    rows, average = savings(per_seed, setup.target_langs)

    result["setup"] = {**dataclasses.asdict(setup), "steps": {m: setup.steps(m) for m in METHODS},
                       "minipost_layers": f"{setup.minipost_layers}+{setup.minipost_new_layers}",
                       "work_dir": str(work)}
    result["quality_signal"] = QUALITY_SIGNAL
    result["pipelines"] = [{"seed": seed, "output_dir": str(work / f"seed{seed}")} for seed in setup.seeds]
    result["flops_per_step"] = {m: statistics.median(f) for m, f in flops_per_step.items()}
    result["seconds_per_step"] = {m: summary(t) for m, t in seconds_per_step.items()}
    result["curves"] = curves
    result["compute_to_quality"] = rows
    result["average_saving"] = average
    save(NAME, result, SCHEMA, figure(result), args.out)
    for m in MINI_METHODS:
        cells = ", ".join(f"{int(100 * t)}%: " + (f"{average[m][str(t)]:.2f}x" if average[m][str(t)] else "not matched")
                          for t in THRESHOLDS)
        print(f"[{NAME}] {m}: compute saving vs standard (mean over languages of the median over seeds) {cells}")
    return result


if __name__ == "__main__":
    main()
