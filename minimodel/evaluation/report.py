"""The pipeline report: zero-shot quality per language and adaptation method against the adaptation compute spent.

Reads a pipeline's results from its output directory (minimodel/layout.py), never from MLflow:
- zero-shot results, <pipeline_dir>/zero_shot/<task>/<method>/: metrics.json (per language, the final embeddings';
  the source language's is the reference) and snapshots.json (per language and adaptation step);
- the compute each evaluated checkpoint cost, <pipeline_dir>/adapt/<method>/<lang>/: adapt.json of the final
  embeddings and of each snapshots/step_<N>/ (FLOPs and wall clock spent up to it); LT-SFT: the language SFT's
  manifest, sft/sft.json (both phases), + on fine-tuned tasks the source language's (adapt/lt_sft/<source>/sft/
  sft.json: the task SFT was trained with it applied; one for all targets, counted whole for each, as one target
  alone needs it; retrieval reads the primary + the target's SFT alone), for lt_sft_vocab + standard adaptation's
  final adapt.json (the embeddings its SFT was learned over; a method's `builds_on`, methods.py: another method's
  for lt_sft_vocab@<method>); BiStil: standard adaptation's final
  adapt.json (the embeddings its target teacher reads with; bistil@<method>: that method's; bistil@lt_sft: lt_sft's
  target and source language SFTs, its teachers') + phase 1's training compute, the last row of adapt/<bistil
  method>/<lang>/train/metrics.jsonl (teachers' forwards included) + phase 2's, distill_task/.../<lang>/train/sft/
  sft.json (the student learning the task: each language's own, where the other methods' step 3, not counted, is one
  task model for every target).

For each task and language it finds, for every method, the compute from which on its quality stays at or above 95%
/ 99% / 100% of the standard method's final quality (over the evaluated checkpoints, in order of compute: a noisy
curve that falls back below a target had not reached it; with final evaluations only, each method has one point),
and the saving against the standard method. What it leaves out, it says (report.json's `left_out`, report.md, the
warnings): a zero-shot directory whose stage did not finish for its current config (its metrics.json is an older
run's), a name this version does not know, a snapshot whose compute is unknown. A task whose
source-language reference is not above the majority-class share (logged by zero_shot as baseline/majority) by
`chance_margin` gets a warning: its numbers are at chance and say nothing about the methods; so does a language
where the reference method's final quality is not above its first checkpoint's by more than two standard errors
(where they are unknown, `chance_margin` of a perfect score; target_mlm's nats are no mean of bounded scores, so
always chance_margin nats there): "no gain".
The unadapted baseline (method `none`, <pipeline_dir>/zero_shot/<task>/none/: the primary reading the target text
with its own tokenizer) is no method with compute: it is drawn as a horizontal line per language, and an adapted
method gets a warning (logged, and in report.json's `warnings` and report.md) where its final quality ends below
it by more than two standard errors of the difference ("made the model worse"; `below_baseline`; any gap below it
where the evaluations logged no n_examples) or within two standard errors of it, either side ("no measurable gain";
`within_baseline_noise`): a 0.006 gap on 500 examples is noise, neither harm nor gain. Two results scored on the same
examples (zero_shot's per_example.json) are compared paired, example by example; else as independent samples, which
over-states the noise.
What is spent once for every target language (a head for a headless primary, MiniPost's step 1b), and OFA's word
vectors (one per language pair, wall clock only: summed), are in no language's compute: report.json's `one_off` and
report.md list them apart.
Writes report.json, report.md and compute_vs_quality.png to output_dir; with tracking, they and the headline
numbers are also attached to the pipeline's MLflow run, for people to look at.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from minimodel.adaptation.artifact import read_info, snapshot_dir
from minimodel import faults, provenance
from minimodel.config import ConfigError, build_config, require, save_config
from minimodel.files import write_text_atomic
from minimodel.evaluation import EvaluationError
from minimodel.evaluation.scoring import MAJORITY_METRIC
from minimodel.evaluation.tasks import TASKS
from minimodel.layout import PER_EXAMPLE_FILE, PipelineLayout
from minimodel.methods import BASELINE, MODELS, REFERENCE, SPARSE, parse_adapted_method, parse_method
from minimodel.provenance import claim_output, finish_output
from minimodel.sft.file import SFT_DIR, read_sft_info
from minimodel.models.minijoint.config import flops_per_token, head_flops_per_token
from minimodel.training.config import PretrainConfig
from minimodel.training.metrics import read_metrics
from minimodel.stages import StageResult
from minimodel.tracking import TrackingConfig, attach_to_run

log = logging.getLogger(__name__)


@dataclass
class ReportConfig:
    output_dir: str = "runs/evaluate/report"
    pipeline_dir: str = "runs/pipeline/tiny"  # the pipeline's output_dir, whose results are reported
    reference_method: str = REFERENCE  # whose final quality the thresholds are fractions of
    # the methods reported, in this order (minimodel/methods.py specs); []: every method found, the reference
    # first, then in methods.py's order
    methods: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)  # the zero-shot tasks reported; []: every one found
    fractions: list[float] = field(default_factory=lambda: [0.95, 0.99, 1.0])
    # a share of a perfect score: a source reference this close to the majority-class share is "at chance"; also the
    # "no gain" noise where two standard errors are unknown
    chance_margin: float = 0.02
    log_to_parent: bool = True  # attach the report files (and headline metrics) to the pipeline's MLflow run
    parent_run_id: str | None = None  # that run; None: tracking.parent_run_id or $MINIMODEL_PARENT_RUN_ID
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(all(0 < f <= 1.5 for f in self.fractions), "fractions", "each must be in (0, 1.5], e.g. 0.95")
        parse_adapted_method(self.reference_method, "reference_method")
        for i, spec in enumerate(self.methods):
            parse_adapted_method(spec, f"methods[{i}]")
        require(not self.methods or self.reference_method in self.methods, "reference_method",
                f"{self.reference_method!r} is not one of methods {self.methods}")
        for i, task in enumerate(self.tasks):
            require(task in TASKS, f"tasks[{i}]", f"{task!r} is not one of {sorted(TASKS)}")


@dataclass
class Point:
    quality: float
    flops: float | None
    wall_clock_s: float | None
    adapt_step: int | None  # None: final embeddings
    n_examples: float | None = None  # what the quality was measured on (None: not logged)
    # each example's score, {"examples": digest, "scores": [...]} (zero_shot's per_example.json); not in report.json
    per_example: dict | None = None

    def as_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "per_example"}


def _compute(artifact: Path, learns: str = "embeddings") -> tuple[float | None, float | None]:
    """(FLOPs, wall-clock seconds) adaptation had spent when it wrote this artifact (final or snapshot; LT-SFT: the
    run directory of a language SFT; BiStil: of phase 1), by what the method learns (ModelSource.learns)."""
    if learns == "sft":
        info = read_sft_info(artifact / SFT_DIR)
    elif learns == "student":
        info = _distill_info(artifact)
    else:
        info = read_info(artifact)
    if info is None:
        log.warning("%s holds no record of its compute (adapt.json, sft/sft.json or train/metrics.jsonl): the compute "
                    "of the checkpoint evaluated there is unknown", artifact)
        return None, None
    return info["flops"], info["wall_clock_s"]


def _distill_info(run_dir: Path) -> dict | None:
    """BiStil phase 1's training compute."""
    return _loop_compute(run_dir / "train" / "metrics.jsonl")


def _loop_compute(path: Path) -> dict | None:
    """A training loop's compute, {"flops", "wall_clock_s"}: the cumulative totals of its last metrics.jsonl row."""
    if not path.is_file() or not (rows := read_metrics(path)):
        return None
    last = rows[max(rows)]
    return {"flops": last["compute/flops"], "wall_clock_s": last["compute/wall_clock_s"]}


def _method_compute(layout: PipelineLayout, method: str, lang: str, artifact: Path, source_lang: str,
                    task: str) -> tuple[float | None, ...]:
    """_compute of the artifact, plus the final compute of the method it builds on (BiStil: standard adaptation's;
    bistil@minijoint: MiniJoint adaptation's; bistil@lt_sft: lt_sft's language SFT), where its results on `task`
    rest on lt_sft's source-language SFT, that SFT's whole (shared by every target, but one target alone needs it),
    and BiStil's phase 2 (the language's student learning the task: per language, unlike every other method's step
    3, one task model for all targets)."""
    method = parse_method(method)
    parts = [_compute(artifact, method.source.learns)]
    if method.builds_on:
        below = parse_method(method.builds_on)
        parts.append(_compute(layout.adapt(below.name, lang), below.source.learns))
    if method.rests_on_source_sft(TASKS[task]):
        parts.append(_compute(layout.adapt(SPARSE, source_lang), "sft"))
    if method.source.learns == "student":  # phase 2: each language's student learns the task itself
        parts.append(_compute(layout.distill_task(lang, method.name) / "train", "sft"))
    return tuple(None if any(p[i] is None for p in parts) else sum(p[i] for p in parts) for i in range(2))


def _from_common_zero(points: dict[str, list[Point]], starts: dict[str, tuple[float, str | None]], reference: str,
                      where: str) -> None:
    """target_mlm: each method's gain from the reference's initial embeddings instead of its own (mlm_gain as
    zero_shot writes it): loss(reference's step 0) - loss, one zero per language, so that an initialisation's head
    start (OFA's) counts. Random-init runs of one seed start from the same rows, so their gains do not move. A method
    that reads the target through another tokenizer keeps its own zero (its losses are over other tokens), said."""
    if reference not in starts:
        log.warning("%s: %s has no step-0 result, so each method's mlm_gain stays measured from its own start (an "
                    "initialisation's head start does not show)", where, reference)
        return
    zero, tokenizer = starts[reference]
    for method, (start, its_tokenizer) in starts.items():
        if its_tokenizer != tokenizer:
            log.warning("%s: %s reads the target through another tokenizer than %s: its mlm_gain stays measured from "
                        "its own start", where, method, reference)
            continue
        for point in points[method]:
            point.quality += zero - start


def _subdirs(path: Path) -> list[str]:
    return sorted(d.name for d in path.iterdir() if d.is_dir()) if path.is_dir() else []


def _not_a_result(out: Path) -> str | None:
    """Why a zero-shot directory holds no result of its current config; None where it does."""
    if not (out / "metrics.json").is_file():
        return "no metrics.json (its zero-shot stage did not run or did not finish)"
    if provenance.identity(out) == "unfinished":  # a changed config's rerun replaces it when done
        return "its zero-shot stage did not finish for its current config: the metrics.json there is an older run's"
    if changed := provenance.changed_inputs(out):  # its scores beside the new run's compute would be another's
        return f"scored results that changed since ({'; '.join(changed)}): run its zero-shot stage again"
    return None


def collect(layout: PipelineLayout, methods: list[str] | None = None, tasks: list[str] | None = None,
            reference: str = REFERENCE) -> dict:
    """{"points": {task: {lang: {method: [Point...]}}}, "source": {task: {lang: quality}}, "metric": {task: name},
    "majority": {task: {lang: majority-class share of the source evaluation}},
    "baseline": {task: {lang: {"quality": the unadapted primary's (None: unreadable), "unk_fraction": ...}}}}
    from the zero-shot results of `tasks` x `methods` (default: every one there is) and the baseline's; target_mlm's
    gains from `reference`'s start (_from_common_zero); "left_out": what was asked for or found but is not reported,
    and why (a result of another config or none, an unknown name, a snapshot of unknown compute)."""
    left_out: list[str] = []

    def leave_out(what: Path | str, why: str) -> None:  # logged with the summary's warnings
        left_out.append(f"{what}: {why}")

    points: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    starts: dict = defaultdict(lambda: defaultdict(dict))  # mlm tasks: {task: {lang: {method: (step-0 loss, tok)}}}
    source: dict = defaultdict(dict)
    own_source: dict = defaultdict(dict)  # {task: {method: {source lang: quality}}}: a method's own task model's
    majority: dict = defaultdict(dict)
    baseline: dict = defaultdict(dict)
    baseline_examples: dict = defaultdict(dict)  # {task: {lang: the baseline's per-example scores}}
    metric_of: dict[str, str] = {}
    for task in tasks or _subdirs(layout.root / "zero_shot"):
        if task not in TASKS:  # found, not asked for (ReportConfig checks tasks): another version's name
            leave_out(layout.root / "zero_shot" / task, f"not a task of this version ({', '.join(sorted(TASKS))}): "
                      "set tasks, or remove the directory")
            continue
        if not (layout.root / "zero_shot" / task).is_dir():
            leave_out(layout.root / "zero_shot" / task, "no zero-shot result of this task")
            continue
        metric = TASKS[task].metric
        unadapted = layout.zero_shot(task, BASELINE) / "metrics.json"
        if not (why := _not_a_result(unadapted.parent)):
            metric_of[task] = metric
            source_lang = yaml.safe_load((unadapted.parent / "config.yaml").read_text())["source_lang"]
            examples = _json_or_empty(unadapted.parent / PER_EXAMPLE_FILE)
            for lang, final in json.loads(unadapted.read_text()).items():
                if lang == source_lang:
                    continue
                quality = final.get(metric)
                if quality is not None and not math.isfinite(quality):
                    leave_out(unadapted.parent, f"the unadapted baseline's {lang} {metric} is {quality}")
                    continue
                baseline[task][lang] = {"quality": quality, "unk_fraction": final.get("unk_fraction"),
                                        "n_examples": final.get("n_examples")}
                baseline_examples[task][lang] = examples.get(lang, {}).get("final")
        elif unadapted.parent.is_dir() or parse_method(BASELINE).scored_on(TASKS[task]):
            leave_out(unadapted.parent, f"the unadapted baseline, the line to beat: {why}")
        for method in [m for m in methods or _subdirs(layout.root / "zero_shot" / task) if m != BASELINE]:
            out = layout.zero_shot(task, method)
            try:
                parsed = parse_method(method)
            except ConfigError as e:  # found, not asked for (ReportConfig checks methods): another version's name
                leave_out(out, f"{e}; set methods, or remove the directory")
                continue
            if not parsed.scored_on(TASKS[task]):
                continue  # e.g. LT-SFT on target_mlm: the primary's own vocabulary, no gain comparable to the others'
            if why := _not_a_result(out):
                leave_out(out, why)
                continue
            source_lang = yaml.safe_load((out / "config.yaml").read_text())["source_lang"]
            snapshots, examples = _json_or_empty(out / "snapshots.json"), _json_or_empty(out / PER_EXAMPLE_FILE)
            for lang, final in json.loads((out / "metrics.json").read_text()).items():
                metric_of[task] = metric
                if not math.isfinite(final[metric]):  # a diverged run: no place on the quality axis
                    leave_out(out, f"{method}'s {lang} {metric} is {final[metric]}")
                    continue
                if lang == source_lang:  # the reference's source model (LT-SFT's is another: its task SFT)
                    if parsed.source.learns == "sft":  # LT-SFT's own task model (its task SFT); the others
                        own_source[task][method] = {lang: final[metric]}  # score the reference's again
                    elif method == reference or lang not in source[task]:  # another's stands in for a missing one
                        source[task][lang] = final[metric]
                        if MAJORITY_METRIC in final:
                            majority[task][lang] = final[MAJORITY_METRIC]
                    continue
                run_dir = layout.adapt(method, lang)
                checkpoints = [(None, final, run_dir)] + [(int(step), m, snapshot_dir(run_dir, int(step)))
                                                          for step, m in snapshots.get(lang, {}).items()]
                for step, m, artifact in checkpoints:
                    if not math.isfinite(m[metric]):
                        leave_out(artifact, f"the {task} score of {method}'s {lang} snapshot is {m[metric]}")
                        continue
                    point = Point(m[metric], *_method_compute(layout, method, lang, artifact, source_lang, task),
                                  step, m.get("n_examples"),
                                  examples.get(lang, {}).get("final" if step is None else str(step)))
                    if point.flops is None and step is not None:  # no place on the compute axis
                        leave_out(artifact, f"the {task} score of {method}'s {lang} snapshot: its compute is unknown")
                    else:
                        points[task][lang][method].append(point)
                if TASKS[task].kind == "mlm" and "0" in snapshots.get(lang, {}):
                    starts[task][lang][method] = (snapshots[lang]["0"]["mlm_loss"],
                                                  (read_info(run_dir) or {}).get("tokenizer_sha256"))
    for task, per_lang in starts.items():
        for lang, per_method in per_lang.items():
            _from_common_zero(points[task][lang], per_method, reference, f"{task} {lang}")
    for per_lang in points.values():
        for per_method in per_lang.values():
            for pts in per_method.values():  # the final embeddings last, whatever their compute
                pts.sort(key=lambda p: (p.adapt_step is None, math.inf if p.flops is None else p.flops,
                                        p.adapt_step or 0))
    for task in tasks or []:
        if task not in metric_of and (layout.root / "zero_shot" / task).is_dir():
            leave_out(layout.root / "zero_shot" / task, "none of its zero-shot results could be reported")
    found = {m for per_lang in points.values() for per_method in per_lang.values() for m in per_method}
    return {"points": points, "source": source, "own_source": own_source, "metric": metric_of, "majority": majority,
            "baseline": baseline, "baseline_examples": baseline_examples, "left_out": left_out,
            "one_off": one_off_costs(layout, sorted(found))}


def _json_or_empty(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def one_off_costs(layout: PipelineLayout, methods: list[str]) -> dict[str, dict]:
    """What is spent once for every target language, in no language's compute above: a head learned for a headless
    primary (all methods), MiniPost's step 1b (its mini-model), MiniJoint's secondary head (the FLOPs it adds to
    pretraining; no wall clock of its own), OFA's word vectors (wall clock only: the SVD's FLOPs are not counted), each
    for the methods that use it, themselves or through the method they build on.
    {what: {"flops", "wall_clock_s", "methods"}} for those that finished for their current config."""
    def lineage(method) -> list:  # the method and the one it builds on
        return [method, *([parse_method(method.builds_on)] if method.builds_on else [])]

    uses = {name: lineage(parse_method(name)) for name in methods}
    costs = {}
    for what, run_dir, users in (
            ("head", layout.head, list(methods)),
            ("minipost", layout.minipost, [n for n, ms in uses.items() if any(m.model == "minipost" for m in ms)])):
        compute = _loop_compute(run_dir / "metrics.jsonl") if users and _finished(run_dir / "metrics.jsonl") else None
        if compute:
            costs[what] = {**compute, "methods": users}
    minijoint = [n for n, ms in uses.items() if any(m.model == "minijoint" for m in ms)]
    pretrained = layout.pretrain / "metrics.jsonl"
    if minijoint and _finished(pretrained) and (compute := _loop_compute(pretrained)):
        pretraining = build_config(PretrainConfig, layout.pretrain / "config.yaml")  # the data may be gone since
        share = head_flops_per_token(pretraining.model, pretraining.data.mask_prob) / flops_per_token(
            pretraining.model, pretraining.data.mask_prob)
        costs["minijoint_head"] = {"flops": compute["flops"] * share, "wall_clock_s": None, "methods": minijoint}
    # the pipeline's word vectors (one per language pair) that each +ofa method's adaptations read: not those a
    # method given vectors of its own never read, though they lie there from an earlier config
    read = {n: set().union(*(_learned_vectors(layout, m.name) for m in ms if m.init == "ofa"))
            for n, ms in uses.items()}
    summaries = [d / "summary.json" for d in sorted(set().union(*read.values()))]
    if finished := [json.loads(s.read_text())["seconds"] for s in summaries if _finished(s)]:
        costs["word_vectors"] = {"flops": None, "wall_clock_s": sum(finished),
                                 "methods": [n for n, dirs in read.items() if dirs]}
    return costs


def _learned_vectors(layout: PipelineLayout, method: str) -> set[Path]:
    """The word-vector directories under the pipeline's word_vectors/ that `method`'s adaptations read (their
    records' init.ofa.vectors paths)."""
    learned = (layout.root / "word_vectors").absolute()
    found = set()
    for run in sorted(layout.adapt(method).glob("*/")):
        config = (provenance.read(run) or {}).get("config", {})
        paths = [Path(v).absolute() for k, v in config.items() if k.startswith("init.ofa.vectors[") and
                 k.endswith(".path")]
        found |= {path.parent for path in paths if path.is_relative_to(learned)}
    return found


def _finished(path: Path) -> bool:
    """`path` is there, in a stage result finished for its current config."""
    return path.is_file() and provenance.identity(path) not in (None, "unfinished")


def compute_to_reach(points: list[Point], target: float) -> Point | None:
    """The point, in order of compute, from which on the quality stays at or above `target` (a curve that falls
    back below it had not reached it for good); None where the last point is below it."""
    reached = None
    for p in points:
        reached = (reached or p) if p.quality >= target else None
    return reached


def _registry_order(spec: str) -> tuple[int, str]:
    """minimodel/methods.py's order of models, then the spec."""
    return list(MODELS).index(parse_method(spec).model), spec


def summarize(data: dict, reference: str, fractions: list[float], chance_margin: float = 0.02,
              methods: list[str] | None = None) -> dict:
    """The report as plain JSON-able data: per task and language, each method's points and thresholds; `methods`
    (default: every method found, the reference first, then in minimodel/methods.py's order) chooses and orders the
    methods."""
    found = {m for per_lang in data["points"].values() for per_method in per_lang.values() for m in per_method}
    order = [m for m in methods or [reference, *sorted(found - {reference}, key=_registry_order)] if m in found]
    baselines = data.get("baseline", {})
    tasks, warnings = {}, []
    for task in sorted(set(data["points"]) | set(baselines)):
        per_lang, langs, below, within = data["points"].get(task, {}), {}, [], []
        full_score = TASKS[task].full_score
        for lang in sorted(set(per_lang) | set(baselines.get(task, {}))):
            per_method = per_lang.get(lang, {})
            ref_points = per_method.get(reference, [])
            ref_final = ref_points[-1].quality if ref_points else None
            methods = {}
            for method, pts in ((m, per_method[m]) for m in order if m in per_method):
                final = pts[-1]
                entry = {"final": {"quality": final.quality, "flops": final.flops,
                                   "wall_clock_s": final.wall_clock_s},
                         "points": [p.as_json() for p in pts], "reach": {}}
                for frac in fractions:
                    if ref_final is None:
                        continue
                    hit = compute_to_reach(pts, frac * ref_final)
                    ref_hit = compute_to_reach(ref_points, frac * ref_final)
                    entry["reach"][f"{frac:g}"] = {
                        "target_quality": frac * ref_final, "reached": hit is not None,
                        "flops": hit.flops if hit else None,
                        "wall_clock_s": hit.wall_clock_s if hit else None,
                        "flops_saving": _ratio(ref_hit.flops if ref_hit else None, hit.flops if hit else None),
                        "wall_clock_saving": _ratio(ref_hit.wall_clock_s if ref_hit else None,
                                                    hit.wall_clock_s if hit else None),
                    }
                methods[method] = entry
            # how much the reference method improved over its first checkpoint (step 0), and what is noise: two
            # standard errors where both evaluations logged n_examples, else chance_margin
            ref_gain, ref_noise = None, None
            if len(ref_points) > 1:
                first, last = ref_points[0], ref_points[-1]
                ref_gain = last.quality - first.quality
                ref_noise = two_standard_errors(last.quality, last.n_examples, first.quality, first.n_examples,
                                                full_score, (last.per_example, first.per_example))
            margin = chance_margin * (full_score or 1.0)  # chance_margin is a share of a perfect score
            langs[lang] = {"reference_final": ref_final, "reference_gain": ref_gain,
                           "reference_gain_noise": margin if ref_noise is None else ref_noise,
                           "methods": methods, "baseline": baselines.get(task, {}).get(lang)}
            unadapted = (langs[lang]["baseline"] or {}, data.get("baseline_examples", {}).get(task, {}).get(lang))
            cases = [c for m in methods if (c := _against_baseline(lang, m, per_method[m][-1], *unadapted, full_score))]
            for verdict, into in ((False, below), (True, within)):
                if group := [c for c in cases if c["within_noise"] is verdict]:
                    into += group
                    warnings.append(_baseline_warning(task, data["metric"].get(task), group))
        source, majority = dict(data["source"].get(task, {})), dict(data.get("majority", {}).get(task, {}))
        tasks[task] = {"metric": data["metric"].get(task), "languages": langs, "source": source,
                       "description": TASKS[task].description,
                       "majority": majority, "at_chance": bool(majority) and all(
                           source[lang] <= majority[lang] + chance_margin for lang in majority if lang in source),
                       "no_gain": [lang for lang, e in langs.items() if e["reference_gain"] is not None
                                   and e["reference_gain"] <= e["reference_gain_noise"]],
                       "below_baseline": below, "within_baseline_noise": within,
                       # a method with a task model of its own (LT-SFT's task SFT) scoring at chance on the source
                       "methods_at_chance": sorted(
                           method for method, scores in data.get("own_source", {}).get(task, {}).items()
                           if method in order and any(lang in majority and q <= majority[lang] + chance_margin
                                                      for lang, q in scores.items()))}
        if tasks[task]["at_chance"]:
            warnings.append(f"{task}: the source-language reference scores at chance (majority class {majority}): "
                            "its numbers and savings say nothing about the methods")
        if tasks[task]["no_gain"]:
            warnings.append(f"{task}: {reference} adaptation did not improve on its first checkpoint beyond noise in "
                            f"{', '.join(tasks[task]['no_gain'])}: the savings there are reached by noise")
        if tasks[task]["methods_at_chance"]:
            warnings.append(f"{task}: the task models of {', '.join(tasks[task]['methods_at_chance'])} score at chance "
                            f"on the source language (majority class {majority}): their zero-shot rows say nothing")
    left_out = list(data.get("left_out", []))
    warnings += [f"left out: {what}" for what in left_out]
    return {"reference_method": reference, "methods": order, "fractions": fractions, "chance_margin": chance_margin,
            "baseline_method": BASELINE, "tasks": tasks, "warnings": warnings, "left_out": left_out,
            "one_off": data.get("one_off", {})}


def two_standard_errors(a: float, n_a: float | None, b: float, n_b: float | None, full_score: float | None = 1.0,
                        per_example: tuple[dict | None, dict | None] = (None, None)) -> float | None:
    """Two standard errors of the difference a - b of two mean scores in [0, full_score] over n_a and n_b examples,
    in the scores' units (None: a count unknown, no full_score (not a mean of bounded scores), or a score outside
    the range). Where both `per_example` scores are of the same examples (one digest), paired: 2 sd(a_i - b_i) /
    sqrt(n), as two models scored on one test set differ. Else as independent samples: a per-example score in [0, 1]
    with mean p has variance at most p(1 - p), so this bounds accuracy, top-1 and F1 alike, and over-states the noise
    of two results on the same examples (their scores are correlated), so a gap beyond it is a real one."""
    if full_score is None or not n_a or not n_b or not (0 <= a <= full_score and 0 <= b <= full_score):
        return None
    ours, theirs = per_example
    if ours and theirs and ours["examples"] == theirs["examples"] and len(ours["scores"]) > 1:
        differences = np.asarray(ours["scores"]) - np.asarray(theirs["scores"])
        return 2 * float(differences.std(ddof=1)) / math.sqrt(len(differences))
    a, b = a / full_score, b / full_score
    return full_score * 2 * math.sqrt(a * (1 - a) / n_a + b * (1 - b) / n_b)


def _against_baseline(lang: str, method: str, final: Point, unadapted: dict, unadapted_examples: dict | None,
                      full_score: float | None) -> dict | None:
    """A method's final quality against the unadapted primary's: None where it is measurably above it (or there is
    no baseline), else the case to warn about; `within_noise`: the gap is within two standard errors."""
    if unadapted.get("quality") is None:
        return None
    noise = two_standard_errors(final.quality, final.n_examples, unadapted["quality"], unadapted.get("n_examples"),
                                full_score, (final.per_example, unadapted_examples))
    within = noise is not None and abs(final.quality - unadapted["quality"]) <= noise
    if not within and final.quality >= unadapted["quality"]:
        return None
    return {"lang": lang, "method": method, "quality": final.quality, "baseline": unadapted["quality"],
            "noise": noise, "within_noise": within}


def _baseline_warning(task: str, metric: str | None, cases: list[dict]) -> str:
    """One warning for the cases of one task, language and verdict (_against_baseline's), naming each method."""
    lang, unadapted = cases[0]["lang"], cases[0]["baseline"]
    methods, scores = ", ".join(c["method"] for c in cases), ", ".join(f"{c['quality']:.4g}" for c in cases)
    head = f"{task} {lang}: {methods} {'ends' if len(cases) == 1 else 'end'} at {metric} {scores}"
    baseline = f"the unadapted primary ({BASELINE}: its own tokenizer and embeddings) at {unadapted:.4g}"
    noises = [c["noise"] for c in cases if c["noise"] is not None]
    if cases[0]["within_noise"]:
        return (f"{head}, within two standard errors ({max(noises):.2g}) of {baseline}: no measurable gain over not "
                f"adapting; evaluate on more examples to tell them apart, or adapt better")
    beyond = ", by more than two standard errors" if noises else ""
    return (f"{head}, below {baseline}{beyond}: adapting made the model worse than not adapting it; ship the "
            f"unadapted primary for {lang} or adapt better")


def _by_language(cases: list[dict]) -> list[list[dict]]:
    """Cases grouped by language, in order (a warning each)."""
    langs = dict.fromkeys(c["lang"] for c in cases)
    return [[c for c in cases if c["lang"] == lang] for lang in langs]


def _ratio(reference: float | None, value: float | None) -> float | None:
    return reference / value if reference and value else None


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def markdown(summary: dict) -> str:
    fracs = [f"{f:g}" for f in summary["fractions"]]
    ref = summary["reference_method"]
    lines = ["# Zero-shot quality against adaptation compute", "",
             f"Reference: the final quality of `{ref}` adaptation; \"FLOPs to x%\" is the adaptation compute at the "
             f"first evaluated checkpoint from which on the quality stays at or above x% of it (saving = {ref}'s "
             "compute to reach it / the method's); points: the checkpoints evaluated (adaptation snapshots + the "
             "final embeddings); quality and compute columns are the final embeddings'.", ""]
    if summary.get("left_out"):
        lines += ["**Left out** (no result of this config to report):", "",
                  *(f"- {what}" for what in summary["left_out"]), ""]
    if summary.get("one_off"):
        lines += ["**One-off costs** (spent once for every target language; in no language's compute below):", "",
                  "| what | FLOPs | wall clock (s) | methods |", "|---|---|---|---|",
                  *(f"| {what} | {_fmt(c['flops'])} | {_fmt(c['wall_clock_s'], '.0f')} | {', '.join(c['methods'])} |"
                    for what, c in summary["one_off"].items()), ""]
    for task, t in summary["tasks"].items():
        metric = t["metric"]
        source = ", ".join(f"{lang} {_fmt(v, '.4g')}" for lang, v in t["source"].items())
        lines += [f"## {task} ({metric})", ""]
        if t.get("description"):
            lines += [f"{metric}: {t['description']}.", ""]
        if t["source"]:
            lines += [f"Source-language reference (upper bound): {source}", ""]
        unadapted = {lang: e["baseline"] for lang, e in t["languages"].items() if e.get("baseline")}
        if unadapted:
            lines += [f"Unadapted baseline (`{BASELINE}`: the primary as it is, reading the target text with its own "
                      "tokenizer and embeddings; a horizontal line on the plot): " + ", ".join(
                          f"{lang} {_fmt(b['quality'], '.4g')}" if b["quality"] is not None else
                          f"{lang} not scored (its tokenizer maps {b['unk_fraction']:.0%} of the text to <unk>)"
                          for lang, b in unadapted.items()), ""]
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
                    if r is None:
                        row.append("—")
                    elif r["flops"] is None:
                        row.append("reached (compute unknown)" if r["reached"] else "not reached")
                    elif r["flops"] == 0:  # its initial embeddings already reach it (an init's head start)
                        row.append("0 (at its start)")
                    else:  # no saving where the reference reached it at its start
                        saving = r["flops_saving"]
                        row.append(f"{_fmt(r['flops'])} ({'—' if saving is None else f'{saving:.2f}x'})")
                lines.append("| " + " | ".join(row) + " |")
        if t.get("at_chance"):
            chance = ", ".join(f"{lang} {_fmt(v, '.4g')}" for lang, v in t["majority"].items())
            lines += ["", f"**Warning: at chance.** The source-language reference is not above the majority-class "
                          f"share ({chance}) by more than {_fmt(summary.get('chance_margin'), 'g')}: the model did not "
                          f"learn this task at this scale, so these {metric} numbers and savings are at chance and "
                          "say nothing about the adaptation methods."]
        if t.get("methods_at_chance"):
            lines += ["", f"**Warning: at chance.** The task models of {', '.join(t['methods_at_chance'])} (their own, "
                          "not the reference's) score the source language at the majority-class share: their rows "
                          "say nothing about those methods."]
        for key, headline in (("below_baseline", "below"), ("within_baseline_noise", "no measurable gain over")):
            for cases in _by_language(t.get(key, [])):
                lines += ["", f"**Warning: {headline} the unadapted baseline.** "
                              f"{_baseline_warning(task, metric, cases)}."]
        if t.get("no_gain"):
            noise = ", ".join(f"{lang} {_fmt(t['languages'][lang]['reference_gain_noise'], '.2g')}"
                              for lang in t["no_gain"])
            lines += ["", f"**Warning: no gain.** `{ref}` adaptation did not improve {metric} over its first "
                          f"checkpoint by more than its noise (two standard errors where the evaluations' example "
                          f"counts are known, else the chance margin: {noise}): the "
                          "thresholds there are reached by noise, and those rows' savings say nothing about the "
                          "methods."]
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(summary)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def figure(summary: dict):
    """Quality against adaptation FLOPs and wall clock, a row per task: a curve per method and language, horizontal
    lines for the source reference, the majority class and the unadapted baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"].items())
    fig, axes = plt.subplots(max(len(tasks), 1), 2, figsize=(14, 4 * max(len(tasks), 1)), squeeze=False)
    # one colour per method on every plot (tab20 past the 10 default colours: 11 methods made two share one)
    palette = [f"C{i}" for i in range(10)] if len(summary["methods"]) <= 10 else list(plt.cm.tab20.colors)
    colors = {m: palette[i % len(palette)] for i, m in enumerate(summary["methods"])}
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
            for li, (lang, entry) in enumerate(t["languages"].items()):
                if (entry.get("baseline") or {}).get("quality") is not None:  # no compute: a line across
                    ax.axhline(entry["baseline"]["quality"], color="black", linestyle=styles[li % len(styles)],
                               linewidth=1.5, label=f"unadapted ({BASELINE}) {lang}")
            ax.set_xlabel(label)  # linear: the step-0 snapshots sit at compute 0
            ax.set_ylabel(t["metric"])
            ax.set_title(f"{task}: zero-shot {t['metric']}" + (" (AT CHANCE)" if t.get("at_chance") else ""))
            ax.grid(alpha=0.3)
        labelled = {}  # one legend per row, beside it (inside, it hid points); a line may be on one plot only
        for ax in axes[row]:
            labelled.update(zip(*reversed(ax.get_legend_handles_labels())))
        if labelled:
            axes[row][1].legend(labelled.values(), labelled.keys(), fontsize=8, loc="upper left",
                                bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.tight_layout()
    return fig



def headline_metrics(summary: dict) -> dict[str, float]:
    """Final quality per task/language/method and the FLOPs saving at 100% of the reference, for the parent run; no
    saving where the reference is at chance or did not gain beyond noise (the report's warnings): it would say
    nothing."""
    out = {}
    for task, t in summary["tasks"].items():
        for lang, entry in t["languages"].items():
            meaningless = t.get("at_chance") or lang in t.get("no_gain", [])
            for method, m in entry["methods"].items():
                out[f"{task}/{lang}/{method}/{t['metric']}"] = m["final"]["quality"]
                saving = m["reach"].get("1", {}).get("flops_saving")
                if saving is not None and not meaningless:
                    out[f"{task}/{lang}/{method}/flops_saving"] = saving
            if (entry.get("baseline") or {}).get("quality") is not None:
                out[f"{task}/{lang}/{BASELINE}/{t['metric']}"] = entry["baseline"]["quality"]
    return out


REPORT_NEUTRAL = ("log_to_parent", "parent_run_id")  # where its files are attached in MLflow


def report(cfg: ReportConfig) -> StageResult:
    """Build the report of one pipeline; outputs: the {"json", "markdown", "png"} paths."""
    out = Path(cfg.output_dir)
    claim_output(out, cfg, resumable=False, ignore=REPORT_NEUTRAL)
    save_config(cfg, out / "config.yaml")
    layout = PipelineLayout(Path(cfg.pipeline_dir))
    data = collect(layout, cfg.methods, cfg.tasks, cfg.reference_method)
    summary = summarize(data, cfg.reference_method, cfg.fractions, cfg.chance_margin, cfg.methods)
    if not summary["tasks"]:
        raise EvaluationError(f"{layout.root / 'zero_shot'} holds no zero-shot results (<task>/<method>/metrics.json):"
                              " set pipeline_dir to the pipeline's output_dir, and run its zero-shot stages first")
    for warning in summary["warnings"]:
        log.warning("%s", warning)
    faults.point("write")
    paths = {"json": write_text_atomic(out / "report.json", json.dumps(summary, indent=2, allow_nan=False)),
             "markdown": write_text_atomic(out / "report.md", markdown(summary)),
             "png": plot(summary, out / "compute_vs_quality.png")}
    if cfg.log_to_parent:
        attach_to_run(cfg.tracking, cfg.parent_run_id, list(paths.values()), "report", headline_metrics(summary))
    finish_output(out, cfg, REPORT_NEUTRAL)
    return StageResult("finished", paths)
