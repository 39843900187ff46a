"""OFA x mini-models: compute to matched quality with random vs OFA-initialised new embeddings (issue #16).

    python benchmarks/ofa_compute.py                        # full protocol -> benchmarks/results/ofa_compute.{json,png}
    python benchmarks/ofa_compute.py --factorized-dim 100   # the same with factorised embeddings (rank 100) for +ofa
    python benchmarks/ofa_compute.py --ofa-lr 5e-4          # the +ofa methods at their own learning rate
    python benchmarks/ofa_compute.py --smoke                # tiny, for a check of the wiring

Protocol: benchmarks/adaptation_compute.py's (RESULTS.md section 1: its Setup, one pipeline per seed, quality =
held-out target MLM of the PRIMARY with each snapshot's embeddings plugged in), with six methods: standard,
minijoint and minipost, each with random (the paper's baseline) and OFA initialisation (+ofa, word vectors learned by
the pipeline's word_vectors stages from the same corpora, one per language pair). `--factorized-dim d` gives every
+ofa method factorised embeddings of rank d, and `--ofa-lr` their own adaptation learning rate (random init keeps
Setup.adapt_lr, which was tuned for random rows); each flag gives a separate work dir whose pipelines re-run from
pretraining, same seeds.

OFA's starting point is the thing being measured, so quality has ONE zero per seed and language, the pipeline
report's: quality = mlm_loss(standard-random's step-0 embeddings) - mlm_loss(snapshot). Reported per method: the
initial quality (step 0), the final quality, the FLOPs to reach 95/99/100% of standard-random's final quality for good
and the saving against standard-random's own FLOPs to get there, and the trainable parameters (adapt.json's
trainable_numel). The goal it reports against: an OFA x mini-model
method reaching 100% of standard's final quality with at least 5x less compute.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.adaptation_compute import COLOURS, Setup, add_setup_flags, setup_from_flags  # noqa: E402
from benchmarks.common import REPO, arg_parser, header, language_axes, parse_args, save  # noqa: E402
from minimodel import pipeline  # noqa: E402
from minimodel.adaptation.artifact import read_info  # noqa: E402
from minimodel.evaluation.report import Point, collect, compute_to_reach  # noqa: E402
from minimodel.layout import PipelineLayout  # noqa: E402
from minimodel.methods import REFERENCE, parse_method  # noqa: E402

NAME = "ofa_compute"
METHODS = ("standard", "standard+ofa", "minijoint", "minijoint+ofa", "minipost", "minipost+ofa")
THRESHOLDS = (0.95, 0.99, 1.0)
TASK = "target_mlm"
GOAL = 5.0  # the goal: >= 5x less compute to 100% of standard's final quality

SCHEMA = {
    "setup": {"target_langs": [str], "seeds": [int], "secondary_head": str, "factorized_dim": (int, None),
              "ofa_lr": float, "random_lr": float, "steps": {m: int for m in METHODS}, "work_dir": str},
    "curves": [{"method": str, "lang": str, "seed": int, "trainable_numel": int,
                "points": [{"step": int, "flops": float, "quality": float}]}],
    "methods": [{"method": str, "lang": str, "initial_quality": float, "final_quality": float,
                 "trainable_numel": int, "reach": [{"threshold": float, "seeds": int, "reached": int,
                                                    "reached_at_start": int, "saving": (float, None)}]}],
}


def steps(setup: Setup, method: str) -> int:
    """Standard (random or OFA) adaptation: setup.adapt_steps; mini-models: mini_steps_factor times as many."""
    return setup.adapt_steps * (1 if parse_method(method).model == REFERENCE else setup.mini_steps_factor)


def pipeline_config(setup: Setup, work: Path, seed: int, factorized_dim: int | None, ofa_lr: float | None):
    cfg = setup.pipeline(work, seed)
    overrides = {}
    for m in METHODS:
        n = steps(setup, m)
        overrides[m] = [f"train.steps={n}", f"train.schedule.warmup_steps={max(2, n // 10)}"]
        if parse_method(m).init == "ofa":
            overrides[m] += [f"embedding.factorized_dim={factorized_dim}"] if factorized_dim else []
            overrides[m] += [f"train.optim.lr={ofa_lr}"] if ofa_lr else []
    cfg = dataclasses.replace(cfg, methods=list(METHODS), method_overrides=overrides)
    cfg.validate()
    return cfg


def curves_of(layout: PipelineLayout, seed: int, langs: list[str]) -> list[dict]:
    """Each method's curve of one seed's pipeline: the report's target_mlm points (one zero per language, standard's
    step-0 loss: evaluation/report.py's collect), the final embeddings at their adaptation step."""
    points = collect(layout, list(METHODS), [TASK])["points"][TASK]
    curves = []
    for lang in langs:
        for method in METHODS:
            info = read_info(layout.adapt(method, lang))
            curves.append({"method": method, "lang": lang, "seed": seed, "trainable_numel": info["trainable_numel"],
                           "points": [{"step": info["steps"] if p.adapt_step is None else p.adapt_step,
                                       "flops": p.flops, "quality": p.quality} for p in points[lang][method]]})
    return curves


def flops_to_reach(points: list[dict], target: float) -> float | None:
    """FLOPs from which on the curve (in step order) stays at or above `target`, the pipeline report's rule
    (report.compute_to_reach: a curve that falls back below it had not reached it); None where it ends below."""
    hit = compute_to_reach([Point(p["quality"], p["flops"], None, p["step"]) for p in points], target)
    return None if hit is None else hit.flops


def summarise(curves: list[dict], langs: list[str]) -> list[dict]:
    """Per method and language: median initial/final quality over seeds, and per threshold the median saving
    (standard-random's FLOPs to reach X% of its own final quality / the method's) over the seeds that reached it."""
    rows = []
    for lang in langs:
        by = {(c["method"], c["seed"]): c for c in curves if c["lang"] == lang}
        seeds = sorted({seed for _, seed in by})
        for method in METHODS:
            mine = [by[method, s] for s in seeds]
            reach = []
            for t in THRESHOLDS:
                savings, at_start = [], 0
                for s in seeds:
                    reference = by[REFERENCE, s]["points"]
                    target = t * reference[-1]["quality"]
                    ours, theirs = flops_to_reach(by[method, s]["points"], target), flops_to_reach(reference, target)
                    if ours == 0:  # its initialisation alone reaches it: no finite saving (init cost not counted)
                        at_start += 1
                    elif ours is not None and theirs is not None:
                        savings.append(theirs / ours)
                reach.append({"threshold": t, "seeds": len(seeds), "reached": len(savings) + at_start,
                              "reached_at_start": at_start,
                              "saving": statistics.median(savings) if savings else None})
            rows.append({"method": method, "lang": lang,
                         "initial_quality": statistics.median(c["points"][0]["quality"] for c in mine),
                         "final_quality": statistics.median(c["points"][-1]["quality"] for c in mine),
                         "trainable_numel": mine[0]["trainable_numel"], "reach": reach})
    return rows


def figure(result: dict):
    langs = result["setup"]["target_langs"]
    fig, axes = language_axes(langs)
    first_seed = min(result["setup"]["seeds"])
    for ax, lang in zip(axes, langs):
        for c in (c for c in result["curves"] if c["lang"] == lang):
            method = parse_method(c["method"])
            ax.plot([p["flops"] / 1e9 for p in c["points"]], [p["quality"] for p in c["points"]],
                    "--" if method.init == "ofa" else "-", color=COLOURS[method.model], alpha=0.8, lw=1.2,
                    label=c["method"] if c["seed"] == first_seed else None)
        ax.set_xlabel("adaptation GFLOPs (cumulative)")
        ax.set_ylabel("held-out MLM loss drop from standard-random's step 0 (nats)", fontsize=8)
        ax.set_title(lang)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    s = result["setup"]
    rank = s["factorized_dim"] or "none (full)"
    fig.suptitle(f"Random (solid, lr {s['random_lr']:g}) vs OFA (dashed, lr {s['ofa_lr']:g}) initialisation; "
                 f"factorised rank {rank}; MiniJoint {s['secondary_head']} head; seeds {s['seeds']}", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> dict:
    parser = arg_parser(__doc__, "tiny model, data and runs (a wiring check)")
    parser.add_argument("--work", type=Path, default=None)
    add_setup_flags(parser)
    parser.add_argument("--factorized-dim", type=int, default=None, help="rank of the +ofa methods' embeddings")
    parser.add_argument("--ofa-lr", type=float, default=None,
                        help="the +ofa methods' adaptation learning rate (default: the random-init methods')")
    args = parse_args(parser, argv)
    setup = setup_from_flags(args)
    suffix = (("_smoke" if args.smoke else "") + (f"_rank{args.factorized_dim}" if args.factorized_dim else "")
              + (f"_lr{args.ofa_lr:g}" if args.ofa_lr else ""))
    work = (args.work or REPO / "runs" / "benchmarks" / (NAME + suffix)).resolve()

    result = header(NAME, args.smoke)  # the machine, date and load as the runs start
    curves = []
    for seed in setup.seeds:
        cfg = pipeline_config(setup, work, seed, args.factorized_dim, args.ofa_lr)
        print(f"[{NAME}] seed {seed}: pipeline {cfg.output_dir}", flush=True)
        pipeline.run(cfg)
        curves += curves_of(PipelineLayout(Path(cfg.output_dir)), seed, setup.target_langs)
    result["setup"] = {"target_langs": setup.target_langs, "seeds": setup.seeds,
                       "secondary_head": setup.secondary_head, "factorized_dim": args.factorized_dim,
                       "ofa_lr": args.ofa_lr or setup.adapt_lr, "random_lr": setup.adapt_lr,
                       "steps": {m: steps(setup, m) for m in METHODS}, "work_dir": str(work)}
    result["curves"] = curves
    result["methods"] = summarise(curves, setup.target_langs)
    save(NAME + suffix, result, SCHEMA, figure(result), args.out)
    for row in result["methods"]:
        full = next(r for r in row["reach"] if r["threshold"] == 1.0)
        saving = full["saving"]
        cell = "not reached" if saving is None else f"{saving:.2f}x"
        if full["reached_at_start"]:
            cell += f"; reached by its initialisation alone in {full['reached_at_start']} of {full['seeds']} seeds"
        if saving is not None and parse_method(row["method"]).model != REFERENCE:
            cell += f" (goal {GOAL:g}x: {'met' if saving >= GOAL else 'not met'})"
        print(f"[{NAME}] {row['lang']} {row['method']}: initial quality {row['initial_quality']:.3f}, final "
              f"{row['final_quality']:.3f}, saving at 100% of standard's final: {cell}; trainable "
              f"{row['trainable_numel']:,}")
    return result


if __name__ == "__main__":
    main()
