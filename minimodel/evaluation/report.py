"""The pipeline report: zero-shot quality per language and adaptation method against the adaptation compute spent.

Reads the child runs of a pipeline's parent run (minimodel/evaluation/runs.py):
- adaptation runs (tag stage=adapt, method, target_lang) with their per-step histories of compute/flops and
  compute/wall_clock_s;
- evaluation runs (tag stage=evaluate, role=target|source, method, target_lang, task, metric) written by
  zero_shot; a run tagged adapt_step scores that adaptation checkpoint, otherwise the final embeddings. The
  evaluation is tied to its adaptation run by the tag adapt_run_id, else by (method, target_lang).

For each task and language it finds, for every method, the compute at which its quality first reached 95% /
99% / 100% of the standard method's final quality (over the evaluated checkpoints, in order of compute; with
final evaluations only, each method has one point), and the saving against the standard method. A task whose
source-language reference is not above the majority-class share (logged by zero_shot as baseline/majority) by
`chance_margin` gets a warning: its numbers are at chance and say nothing about the methods.
Writes report.json, report.md and compute_vs_quality.png to output_dir and attaches them to the parent run.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from minimodel.config import require, save_config
from minimodel.files import write_text_atomic
from minimodel.evaluation import EvaluationError
from minimodel.evaluation.runs import FLOPS_METRIC, WALL_CLOCK_METRIC, PipelineRuns, RunInfo
from minimodel.evaluation.scoring import MAJORITY_METRIC
from minimodel.evaluation.tasks import TASKS
from minimodel.methods import REFERENCE, parse_method
from minimodel.stages import StageResult
from minimodel.tracking import TrackingConfig

log = logging.getLogger(__name__)


@dataclass
class ReportConfig:
    output_dir: str = "runs/evaluate/report"
    parent_run_id: str | None = None  # the pipeline's run; None: tracking.parent_run_id or $MINIMODEL_PARENT_RUN_ID
    reference_method: str = REFERENCE  # whose final quality the thresholds are fractions of
    # the methods reported, in this order (minimodel/methods.py specs); []: every method found, the reference first
    methods: list[str] = field(default_factory=list)
    fractions: list[float] = field(default_factory=lambda: [0.95, 0.99, 1.0])
    chance_margin: float = 0.02  # a source reference within this of the majority-class share is "at chance"
    log_to_parent: bool = True  # attach the report files (and headline metrics) to the parent run
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(all(0 < f <= 1.5 for f in self.fractions), "fractions", "each must be in (0, 1.5], e.g. 0.95")

        for i, spec in enumerate(self.methods):
            parse_method(spec, f"methods[{i}]")
        require(not self.methods or self.reference_method in self.methods, "reference_method",
                f"{self.reference_method!r} is not one of methods {self.methods}")

@dataclass
class Point:
    quality: float
    flops: float | None
    wall_clock_s: float | None
    adapt_step: int | None  # None: final embeddings
    run_id: str


def _at_step(history: list[tuple[int, float]], step: int | None) -> float | None:
    """The cumulative value logged at `step` (or the last one before it); the final value when step is None; 0 at
    step 0 (the initial embeddings: nothing spent yet)."""
    if not history:
        return None
    if step is None:
        return history[-1][1]
    before = [v for s, v in history if s <= step]
    return before[-1] if before else (0.0 if step == 0 else None)


def _find_adapt_run(run: RunInfo, adapt_runs: list[RunInfo]) -> RunInfo | None:
    wanted = run.tags.get("adapt_run_id")
    if wanted:
        match = [a for a in adapt_runs if a.run_id == wanted or a.tags.get("reused_run_id") == wanted]
        return match[0] if match else None
    match = [a for a in adapt_runs if a.tags.get("method") == run.tags.get("method")
             and a.tags.get("target_lang") == run.tags.get("target_lang")]
    if len(match) > 1:
        log.warning("%d adaptation runs for method %s, language %s: using the last; tag evaluation runs with "
                    "adapt_run_id to choose", len(match), run.tags.get("method"), run.tags.get("target_lang"))
    return match[-1] if match else None


def collect(runs: PipelineRuns) -> dict:
    """{"points": {task: {lang: {method: [Point...]}}}, "source": {task: {lang: quality}}, "metric": {task: name},
    "majority": {task: {lang: majority-class share of the source evaluation}}}."""
    children = runs.children()
    adapt_runs = [r for r in children if r.stage == "adapt"]
    histories: dict[str, tuple] = {}
    points: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    source: dict = defaultdict(dict)
    majority: dict = defaultdict(dict)
    metric_of: dict[str, str] = {}
    for run in children:
        if run.stage != "evaluate":
            continue
        task = run.tags.get("task", "?")
        metric = run.tags.get("metric") or (TASKS[task].metric if task in TASKS else None)
        if metric not in run.metrics:
            log.warning("evaluation run %s has no metric %r: skipped", run.name, metric)
            continue
        metric_of[task] = metric
        lang = run.tags.get("target_lang", "?")
        if run.tags.get("role") == "source":
            source[task][lang] = run.metrics[metric]
            if MAJORITY_METRIC in run.metrics:
                majority[task][lang] = run.metrics[MAJORITY_METRIC]
            continue
        step = int(run.tags["adapt_step"]) if run.tags.get("adapt_step") not in (None, "", "None") else None
        adapt = _find_adapt_run(run, adapt_runs)
        flops = wall = None
        if adapt is None:
            log.warning("no adaptation run found for evaluation run %s: its compute is unknown", run.name)
        else:
            if adapt.run_id not in histories:
                histories[adapt.run_id] = (runs.history(adapt.run_id, FLOPS_METRIC),
                                           runs.history(adapt.run_id, WALL_CLOCK_METRIC))
            flops_hist, wall_hist = histories[adapt.run_id]
            flops, wall = _at_step(flops_hist, step), _at_step(wall_hist, step)
        points[task][lang][run.tags.get("method", "?")].append(
            Point(run.metrics[metric], flops, wall, step, run.run_id))
    for per_lang in points.values():
        for per_method in per_lang.values():
            for pts in per_method.values():
                pts.sort(key=lambda p: (math.inf if p.flops is None else p.flops,
                                        math.inf if p.adapt_step is None else p.adapt_step))
    return {"points": points, "source": source, "metric": metric_of, "majority": majority}


def compute_to_reach(points: list[Point], target: float) -> Point | None:
    """The first point, in order of compute, whose quality reaches `target`."""
    return next((p for p in points if p.quality >= target), None)


def summarize(data: dict, reference: str, fractions: list[float], chance_margin: float = 0.02,
              methods: list[str] | None = None) -> dict:
    """The report as plain JSON-able data: per task and language, each method's points and thresholds; `methods`
    (default: every method found, the reference first) chooses and orders the methods."""
    found = {m for per_lang in data["points"].values() for per_method in per_lang.values() for m in per_method}
    order = [m for m in methods or [reference, *sorted(found - {reference})] if m in found]
    tasks = {}
    for task, per_lang in sorted(data["points"].items()):
        langs = {}
        for lang, per_method in sorted(per_lang.items()):
            ref_points = per_method.get(reference, [])
            ref_final = ref_points[-1].quality if ref_points else None
            methods = {}
            for method, pts in ((m, per_method[m]) for m in order if m in per_method):
                final = pts[-1]
                entry = {"final": {"quality": final.quality, "flops": final.flops,
                                   "wall_clock_s": final.wall_clock_s},
                         "points": [vars(p) for p in pts], "reach": {}}
                for frac in fractions:
                    if ref_final is None:
                        continue
                    hit = compute_to_reach(pts, frac * ref_final)
                    ref_hit = compute_to_reach(ref_points, frac * ref_final)
                    entry["reach"][f"{frac:g}"] = {
                        "target_quality": frac * ref_final,
                        "flops": hit.flops if hit else None,
                        "wall_clock_s": hit.wall_clock_s if hit else None,
                        "flops_saving": _ratio(ref_hit.flops if ref_hit else None, hit.flops if hit else None),
                        "wall_clock_saving": _ratio(ref_hit.wall_clock_s if ref_hit else None,
                                                    hit.wall_clock_s if hit else None),
                    }
                methods[method] = entry
            # how much the reference method improved over its first checkpoint (step 0): none means noise
            ref_gain = ref_final - ref_points[0].quality if len(ref_points) > 1 else None
            langs[lang] = {"reference_final": ref_final, "reference_gain": ref_gain, "methods": methods}
        source, majority = dict(data["source"].get(task, {})), dict(data.get("majority", {}).get(task, {}))
        tasks[task] = {"metric": data["metric"].get(task), "languages": langs, "source": source,
                       "description": TASKS[task].description if task in TASKS else "",
                       "majority": majority, "at_chance": bool(majority) and all(
                           source[lang] <= majority[lang] + chance_margin for lang in majority if lang in source),
                       "no_gain": [lang for lang, e in langs.items()
                                   if e["reference_gain"] is not None and e["reference_gain"] <= chance_margin]}
    return {"reference_method": reference, "methods": order, "fractions": fractions, "chance_margin": chance_margin,
            "tasks": tasks}


def _ratio(reference: float | None, value: float | None) -> float | None:
    return reference / value if reference and value else None


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def markdown(summary: dict) -> str:
    fracs = [f"{f:g}" for f in summary["fractions"]]
    ref = summary["reference_method"]
    lines = ["# Zero-shot quality against adaptation compute", "",
             f"Reference: the final quality of `{ref}` adaptation; \"FLOPs to x%\" is the adaptation compute at the "
             f"first evaluated checkpoint reaching x% of it (saving = {ref}'s compute to reach it / the method's); "
             "points: the checkpoints evaluated (adaptation snapshots + the final embeddings); quality and compute "
             "columns are the final embeddings'.", ""]
    for task, t in summary["tasks"].items():
        metric = t["metric"]
        source = ", ".join(f"{lang} {_fmt(v, '.4g')}" for lang, v in t["source"].items())
        lines += [f"## {task} ({metric})", ""]
        if t.get("description"):
            lines += [f"{metric}: {t['description']}.", ""]
        if t["source"]:
            lines += [f"Source-language reference (upper bound): {source}", ""]
        head = ["language", "method", "points", metric, "FLOPs", "wall-clock s"]
        head += [f"FLOPs to {float(f) * 100:g}% (saving)" for f in fracs]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for lang, entry in t["languages"].items():
            for method, m in entry["methods"].items():
                final = m["final"]
                row = [lang, method, str(len(m["points"])), _fmt(final["quality"], ".4g"), _fmt(final["flops"]),
                       _fmt(final["wall_clock_s"])]
                for f in fracs:
                    r = m["reach"].get(f)
                    if r is None or r["flops"] is None:
                        row.append("not reached" if r is not None else "—")
                    else:
                        row.append(f"{_fmt(r['flops'])} ({_fmt(r['flops_saving'], '.2f')}x)")
                lines.append("| " + " | ".join(row) + " |")
        if t.get("at_chance"):
            chance = ", ".join(f"{lang} {_fmt(v, '.4g')}" for lang, v in t["majority"].items())
            lines += ["", f"**Warning: at chance.** The source-language reference is not above the majority-class "
                          f"share ({chance}) by more than {_fmt(summary.get('chance_margin'), 'g')}: the model did not "
                          f"learn this task at this scale, so these {metric} numbers and savings are at chance and "
                          "say nothing about the adaptation methods."]
        if t.get("no_gain"):
            lines += ["", f"**Warning: no gain.** `{ref}` adaptation did not improve {metric} over its first "
                          f"checkpoint by more than {_fmt(summary.get('chance_margin'), 'g')} for "
                          f"{', '.join(t['no_gain'])}: the thresholds there are reached by noise, and those rows' "
                          "savings say nothing about the methods."]
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"].items())
    fig, axes = plt.subplots(max(len(tasks), 1), 2, figsize=(12, 4 * max(len(tasks), 1)), squeeze=False)
    colors = {m: f"C{i % 10}" for i, m in enumerate(summary["methods"])}  # one colour per method on every plot
    markers, styles = "osD^v<>p*h", ["-", "--", ":", "-."]
    for row, (task, t) in enumerate(tasks):
        for col, (key, label) in enumerate([("flops", "adaptation FLOPs"),
                                            ("wall_clock_s", "adaptation wall-clock (s)")]):
            ax = axes[row][col]
            for li, (lang, entry) in enumerate(t["languages"].items()):
                for method, m in entry["methods"].items():
                    pts = [p for p in m["points"] if p[key] is not None]
                    if not pts:
                        continue
                    ax.plot([p[key] for p in pts], [p["quality"] for p in pts], marker=markers[li % len(markers)],
                            linestyle=styles[li % len(styles)], color=colors[method],
                            label=f"{method} {lang}")
            for lang, value in t["source"].items():
                ax.axhline(value, color="grey", linestyle="--", linewidth=1, label=f"source {lang}")
            for lang, value in t.get("majority", {}).items():
                ax.axhline(value, color="red", linestyle=":", linewidth=1, label=f"majority class {lang}")
            ax.set_xlabel(label)  # linear: the step-0 snapshots sit at compute 0
            ax.set_ylabel(t["metric"])
            ax.set_title(f"{task}: zero-shot {t['metric']}" + (" (AT CHANCE)" if t.get("at_chance") else ""))
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path



def headline_metrics(summary: dict) -> dict[str, float]:
    """Final quality per task/language/method and the FLOPs saving at 100% of the reference, for the parent run."""
    out = {}
    for task, t in summary["tasks"].items():
        for lang, entry in t["languages"].items():
            for method, m in entry["methods"].items():
                out[f"{task}/{lang}/{method}/{t['metric']}"] = m["final"]["quality"]
                saving = m["reach"].get("1", {}).get("flops_saving")
                if saving is not None:
                    out[f"{task}/{lang}/{method}/flops_saving"] = saving
    return out


def report(cfg: ReportConfig) -> StageResult:
    """Build the report of one pipeline; outputs: the {"json", "markdown", "png"} paths."""
    out = Path(cfg.output_dir)
    save_config(cfg, out / "config.yaml")
    runs = PipelineRuns(cfg.tracking, cfg.parent_run_id)
    summary = summarize(collect(runs), cfg.reference_method, cfg.fractions, cfg.chance_margin, cfg.methods)
    if not summary["tasks"]:
        raise EvaluationError(f"pipeline run {runs.parent_run_id} has no evaluation runs (stage=evaluate) with "
                              "metrics: run evaluate/zero_shot.py with tracking.parent_run_id set to it first")
    paths = {"json": write_text_atomic(out / "report.json", json.dumps(summary, indent=2)),
             "markdown": write_text_atomic(out / "report.md", markdown(summary)),
             "png": plot(summary, out / "compute_vs_quality.png")}
    if cfg.log_to_parent:
        runs.log_to_parent(list(paths.values()), "report", headline_metrics(summary))
    return StageResult("finished", paths)
