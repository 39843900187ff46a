"""Step 4: zero-shot transfer. Run a task model whose embeddings were swapped for a target language's (adapt/plug.py)
on that language's test set with the target tokenizer; the source-language task model is scored too, as the
upper reference (classification and QA: the fine-tuned tasks; classification also logs the majority-class share,
the chance level).

A target that names its adaptation run (`embeddings: <adapt output_dir>/<lang>`) also has the run's snapshots
(<run>/snapshots/step_<N>/, step 0 = the initial embeddings) scored: each is plugged into the source model in
memory, by the same function adapt/plug.py uses, so the report can draw quality against adaptation compute. Without
a `model_dir`, the run's final embeddings are plugged in memory too.

Task target_mlm scores the PRIMARY model (source_model_dir) with each checkpoint's embeddings plugged in by its
held-out target MLM loss (mlm_loss) and by mlm_gain = the loss with the step-0 snapshot's embeddings - the loss
now (how much this run learned), so the report's fractions of the standard method's final quality are fractions
of its improvement; the report re-measures every method's gain from the standard method's step 0, where an
initialisation's head start counts (evaluation/report.py, _from_common_zero).

Method `lt_sft` (LT-SFT) adapts by sparse fine-tunings instead of embeddings: each target names its language SFT
(`language_sft: <adapt/sft.py output_dir>/<lang>/sft`), read with the source tokenizer (the primary's). For a
fine-tuned task the target model is the primary + the target's language SFT + the task SFT the source task model
(evaluate/finetune.py sparse=true) was composed with, in place of the source language's SFT; for retrieval, the
primary + the language SFT. Not for target_mlm (its loss in the primary's vocabulary is no gain on the same scale
as the other methods').

Method `lt_sft_vocab` (LT-SFT over the target vocabulary) reads each target with the model its language SFT was
learned over, the primary with standard adaptation's (lt_sft_vocab@<base>: that method's) target embeddings plugged
in (`model_dir: <pipeline>/plugged_mlm[/<base>]/<lang>`, adapt/plug.py's output; `tokenizer`: the target tokenizer
saved there, the default),
+ the language SFT; for a fine-tuned task + the source task model's task SFT without its input-embedding
difference (the primary's vocabulary, replaced). Each SFT is refused (naming both hashes) unless applied to the
directory it was learned from: the language SFT to model_dir, the task SFT to the primary model_dir's plug.json
names (evaluation/models.py load_sft_task_model). Like lt_sft, not for target_mlm (Method.scored_on: its mlm_gain is
measured from an embedding run's step-0 snapshot).

Method `bistil` (BiStil) has a student task model per target language (evaluate/distill_task.py): each target names
it (`model_dir`) and its target tokenizer (`tokenizer: <model_dir>/target_tokenizer`; bistil@lt_sft's students read
both languages with one: `tokenizer: <model_dir>`), scored as it is; the source
model (a student task model, read with the source tokenizer saved at its top) is scored on the source language
only when evaluate_source (the pipeline leaves it to distill_task's metrics.json, one student per language). Only on
fine-tuned tasks (minimodel/methods.py Method.scored_on).

Method `none` (minimodel/methods.py BASELINE) adapts nothing: each target is just a language, read by the source
model with its own tokenizer (the primary as it is, or the task model fine-tuned from it): the unadapted baseline.
A language the tokenizer maps to its unknown token more often than the data stage accepts (UNK_REFUSED) is not
scored: its metrics are {unk_fraction, unreadable: 1}; a scored one carries its unk_fraction too. Not for target_mlm,
whose metric does not compare tokenizers (TaskSpec.compares_tokenizers).

One MLflow run per language and model scored, tagged stage=evaluate, method, target_lang, task and role ("target"
or "source"); a target's runs carry adapt_run_id, and a snapshot's adapt_step, so the report can place them on the
compute axis. Writes <output_dir>/metrics.json ({lang: {metric: value}}, final embeddings), with snapshots
<output_dir>/snapshots.json ({lang: {step: {metric: value}}}), and per_example.json (each target example's score of the
headline metric at each checkpoint: the report compares two results on the same examples paired).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from minimodel.adaptation.artifact import list_snapshots, read_info
from minimodel.adaptation.plug import PLUG_FILE, plug_model, plugged_info
from minimodel import faults
from minimodel.config import require, save_config
from minimodel.files import write_text_atomic
from minimodel.evaluation import EvaluationError
from minimodel.evaluation.models import check_tokenizer, load_sft_task_model, load_task_model, read_task_info
from minimodel.evaluation.scoring import score, score_mlm, score_retrieval, unknown_fraction
from minimodel.evaluation.tasks import TaskConfig
from minimodel.data.prepare import UNK_REFUSED
from minimodel.hf import load_masked_lm, load_tokenizer
from minimodel.layout import PER_EXAMPLE_FILE, STUDENT_VOCABULARY, TASK_FILE
from minimodel.manifest import model_hash
from minimodel.methods import parse_method
from minimodel.provenance import claim_output, finish_output
from minimodel.sft.file import MANIFEST_FILE, SparseFineTuning
from minimodel.stages import StageResult
from minimodel.tracking import Tracker, TrackingConfig
from minimodel.training.hf_mlm import require_positions

log = logging.getLogger(__name__)

UNREADABLE = "unreadable"  # method none's metric where the source tokenizer cannot read the target language


@dataclass
class TargetConfig:
    lang: str = ""
    model_dir: str = ""  # source model plugged with this language's embeddings; "": plug `embeddings` in memory
    tokenizer: str = ""  # model_dir's tokenizer (this language's)
    adapt_run_id: str | None = None  # the adaptation's MLflow run; None: the one model_dir's plug.json names
    adapt_step: int | None = None  # its checkpoint step (None: the final embeddings)
    embeddings: str | None = None  # the adaptation run dir (<adapt output_dir>/<lang>): also score its snapshots
    # methods lt_sft, lt_sft_vocab: this language's SFT (<adapt/sft.py output_dir>/<lang>/sft); lt_sft_vocab:
    # model_dir is the plugged model it was learned over
    language_sft: str | None = None


@dataclass
class ZeroShotConfig:
    output_dir: str = "runs/evaluate/zero_shot"
    task: TaskConfig = field(default_factory=TaskConfig)
    method: str = "standard"  # the method the target embeddings were learned by (minimodel/methods.py)
    source_lang: str = "en"
    source_model_dir: str = ""  # fine-tuned task model (retrieval: a model with the source embeddings;
    #                             target_mlm: the primary model)
    source_tokenizer: str | None = None  # default: the tokenizer saved in source_model_dir
    evaluate_source: bool = True  # score the source language too (the upper reference)
    targets: list[TargetConfig] = field(default_factory=list)
    split: str = "test"
    batch_size: int = 64
    retrieval_layer: int | None = None  # hidden_states index for retrieval; None = 2/3 of the depth
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        method = parse_method(self.method)
        adapted = method.adapted
        require(bool(self.source_model_dir), "source_model_dir", "set it to the fine-tuned task model directory")
        require_positions(self.task.max_length, "task.max_length", {
            "source_model_dir": self.source_model_dir,
            **{f"targets[{i}].model_dir": t.model_dir for i, t in enumerate(self.targets) if t.model_dir}})
        require(self.split in ("dev", "test"), "split", "must be dev or test")
        require(self.batch_size >= 1, "batch_size", f"{self.batch_size} must be >= 1")
        require(method.scored_on(self.task.spec), "method",
                f"{self.method} (not read with new embeddings of the primary) cannot be scored on {self.task.name}: "
                f"its {self.task.spec.metric} does not compare tokenizers, or (a student per language) the task is "
                "not fine-tuned; evaluate it on another task")
        for i, t in enumerate(self.targets):
            if method.source.learns == "student":
                require(bool(t.lang and t.model_dir and t.tokenizer) and not (t.embeddings or t.language_sft),
                        f"targets[{i}]", f"method {self.method} reads each target with its student task model: give "
                        "lang, model_dir and tokenizer (its target tokenizer; no embeddings or language_sft)")
                continue
            if method.reads_plugged:
                require(bool(t.lang and t.language_sft and t.model_dir) and not t.embeddings, f"targets[{i}]",
                        f"method {self.method} reads each target with the plugged model its language SFT was learned "
                        "over: give lang, language_sft and model_dir (<pipeline>/plugged_mlm[/<base>]/<lang>; "
                        "tokenizer: its own by default; no embeddings)")
                continue
            if adapted and not method.learns_embeddings:
                require(bool(t.lang and t.language_sft) and not (t.model_dir or t.tokenizer or t.embeddings),
                        f"targets[{i}]", f"method {self.method} reads each target with the primary's tokenizer and "
                        "the language's SFT: give lang and language_sft (no model_dir, tokenizer or embeddings)")
                continue
            require(not t.language_sft, f"targets[{i}].language_sft",
                    f"is for method lt_sft; method {self.method} reads a target through its embeddings")
            if not adapted:
                require(bool(t.lang) and not (t.model_dir or t.tokenizer or t.embeddings), f"targets[{i}]",
                        f"method {self.method} reads each target with the source model and its own tokenizer: give "
                        "only lang (no model_dir, tokenizer or embeddings)")
                continue
            require(bool(t.lang and (t.model_dir and t.tokenizer or t.embeddings)), f"targets[{i}]",
                    "each target needs lang and model_dir (plugged model) + tokenizer, or embeddings (an adaptation "
                    "run dir, plugged in memory)")
            require(self.task.spec.kind != "mlm" or bool(t.embeddings), f"targets[{i}].embeddings",
                    "target_mlm needs the adaptation run dir: its step-0 snapshot is the zero of mlm_gain")
        require(bool(self.targets) or self.evaluate_source, "targets",
                "nothing to evaluate: list target languages or set evaluate_source=true")
        langs = [t.lang for t in self.targets]  # metrics.json holds one result per language
        require(self.source_lang not in langs, "targets", f"names the source language {self.source_lang}: its "
                "result is the source reference's (evaluate_source); list target languages only")
        twice = sorted({lang for lang in langs if langs.count(lang) > 1})
        require(not twice, "targets", f"names {', '.join(twice)} more than once: one target per language")


def _load(cfg: ZeroShotConfig, model_dir: str, tokenizer_dir: str):
    model = load_task_model(model_dir, cfg.task.spec.kind)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_tokenizer(model, tokenizer, model_dir, tokenizer_dir)
    return model, tokenizer


def _check_target(cfg: ZeroShotConfig, target: TargetConfig, model, source_model) -> None:
    """Refuse a target model that is not the source task model plugged for this language by this method."""
    fix = "plug the target embeddings into the fine-tuned task model"
    if cfg.task.spec.fine_tuned and model.config.id2label != source_model.config.id2label:
        raise EvaluationError(f"{target.model_dir} has labels {model.config.id2label}, the task model "
                              f"{cfg.source_model_dir} {source_model.config.id2label}: {fix}")
    theirs, ours = model.config.architectures, source_model.config.architectures
    if cfg.task.spec.fine_tuned and theirs and ours and theirs != ours:  # QA heads have no labels to tell them apart
        raise EvaluationError(f"{target.model_dir} was saved as {theirs[0]}, the task model {cfg.source_model_dir} "
                              f"as {ours[0]} (its head would be drawn at random): {fix}")
    plugged = plugged_info(target.model_dir)
    if plugged is not None:
        _check_provenance(cfg, target, plugged, Path(target.model_dir) / PLUG_FILE)
    student = Path(target.model_dir) / STUDENT_VOCABULARY  # a BiStil student task model: its method and language
    if student.is_file():
        _check_provenance(cfg, target, json.loads(student.read_text()), student)


def _check_provenance(cfg: ZeroShotConfig, target: TargetConfig, info: dict, path: Path,
                      method: str | None = None) -> None:
    """Results must not be filed under another method (default: cfg.method) or language than the embeddings were
    learned for."""
    checks = (("method", method or cfg.method, "method"), ("target_lang", target.lang, "targets[].lang"))
    for key, expected, setting in checks:
        if info.get(key) not in (None, expected):
            raise EvaluationError(f"{target.model_dir} holds {key}={info[key]!r} embeddings (see {path}) "
                                  f"but is evaluated as {expected!r}: fix {setting}")


def _log_run(cfg: ZeroShotConfig, lang: str, role: str, metrics: dict[str, float], target: TargetConfig | None):
    tags = {"stage": "evaluate", "method": cfg.method, "target_lang": lang, "source_lang": cfg.source_lang,
            "task": cfg.task.name, "role": role, "metric": cfg.task.spec.metric}
    step = 0  # MLflow's: the adaptation step of the embeddings scored (the final's: the run's step count)
    if target is not None:
        final = target.adapt_step is None
        tags.update(adapt_run_id=target.adapt_run_id, adapt_step=target.adapt_step, model_dir=target.model_dir,
                    checkpoint="final" if final else "snapshot")
        step = target.adapt_step if not final else (read_info(target.embeddings) or {}).get("steps", 0) \
            if target.embeddings else 0
    tracking = cfg.tracking
    if tracking.run_name is None:
        suffix = f"-step{target.adapt_step}" if target is not None and target.adapt_step is not None else ""
        tracking = dataclasses.replace(tracking, run_name=f"evaluate-{cfg.task.name}-{cfg.method}-{lang}{suffix}")
    with Tracker(tracking, config=cfg, tags=tags) as tracker:
        tracker.log_metrics(metrics, step=step)


def _score(cfg: ZeroShotConfig, target: TargetConfig, model, tokenizer, source,
           per_example: dict | None = None) -> dict[str, float]:
    """The target's metrics; `per_example` (not for target_mlm: no mean of per-example scores) gets each example's
    score (scoring.score's)."""
    source_model, source_tok = source
    kind = cfg.task.spec.kind
    if kind == "retrieval":
        return score_retrieval(cfg.task, source_model, source_tok, cfg.source_lang, model, tokenizer, target.lang,
                               cfg.split, cfg.batch_size, cfg.retrieval_layer, per_example)
    if kind == "mlm":
        return score_mlm(cfg.task, model, tokenizer, target.lang, cfg.split, cfg.batch_size)
    return score(cfg.task, model, tokenizer, target.lang, cfg.split, cfg.batch_size, per_example)


def _primary_of(cfg: ZeroShotConfig) -> tuple[str, str]:
    """(directory, sha256) of the primary model the source task model was fine-tuned from (retrieval, target_mlm:
    the source model itself): the model every snapshot must have been learned for."""
    if not cfg.task.spec.fine_tuned:
        return cfg.source_model_dir, model_hash(cfg.source_model_dir)
    primary = read_task_info(cfg.source_model_dir)["primary_model"]
    return primary["path"], primary["sha256"]


def _plugged(cfg: ZeroShotConfig, target: TargetConfig, artifact: Path, source, primary, final: bool = False):
    """(target at the artifact's step (None: final), the source model with the artifact's embeddings plugged in
    memory, their tokenizer)."""
    info = read_info(artifact)
    at_step = dataclasses.replace(target, model_dir=str(artifact), adapt_step=None if final else info["steps"],
                                  adapt_run_id=info.get("adapt_run_id") or target.adapt_run_id)
    _check_provenance(cfg, at_step, info, artifact / "adapt.json")
    model = copy.deepcopy(source[0])
    tokenizer, _, _ = plug_model(model, artifact, model_dir=cfg.source_model_dir, primary_dir=primary[0],
                                 primary_sha=primary[1])
    return at_step, model, tokenizer


def _checkpoints(cfg: ZeroShotConfig, target: TargetConfig, source, primary):
    """(target at a checkpoint, model, tokenizer) for what is scored of one target: its final embeddings (the plugged
    model_dir, else plugged in memory), then each snapshot of its adaptation run before the final step. Lazy: one
    model copy at a time."""
    final = read_info(target.embeddings) if target.embeddings else None
    if target.embeddings and final is None:
        raise EvaluationError(f"targets[].embeddings: {target.embeddings} holds no finished adaptation (no "
                              "adapt.json): point at <adapt output_dir>/<lang> of a finished adapt/train.py run")
    if target.model_dir:
        model, tokenizer = _load(cfg, target.model_dir, target.tokenizer)
        _check_target(cfg, target, model, source[0])
        yield _with_run_id(target), model, tokenizer
    else:
        yield _plugged(cfg, target, Path(target.embeddings), source, primary, final=True)
    if not target.embeddings:
        return
    snapshots = [d for d in list_snapshots(target.embeddings) if read_info(d)["steps"] < final["steps"]]
    if not snapshots:
        log.warning("%s has no snapshots: only its final embeddings are scored (set snapshot_every in the "
                    "adaptation config for a quality-vs-compute curve)", target.embeddings)
    for snapshot in snapshots:
        yield _plugged(cfg, target, snapshot, source, primary)


def _add_mlm_gain(target: TargetConfig, scored: list[tuple[TargetConfig, dict]]) -> None:
    """mlm_gain = loss with the run's initial (step-0) embeddings - loss: the quality target_mlm reports."""
    initial = next((m["mlm_loss"] for at, m in scored if at.adapt_step == 0), None)
    if initial is None:
        raise EvaluationError(f"{target.embeddings} has no step-0 snapshot (snapshots/step_0/, the initial embeddings "
                              "that mlm_gain is measured from): it was adapted by an older adapt/train.py; delete the "
                              "run directory and adapt again")
    for _, metrics in scored:
        metrics["mlm_gain"] = initial - metrics["mlm_loss"]


def _sft_model(cfg: ZeroShotConfig, target: TargetConfig, source, primary):
    """(model, tokenizer) of a sparse method's target: the model the target's language SFT was learned over with
    that SFT applied, the primary read with the source tokenizer (lt_sft) or the plugged model_dir with the target
    tokenizer (lt_sft_vocab); for a fine-tuned task, + the source task model's task SFT (finetune's composition, the
    target's language SFT in place of the source's)."""
    language_sft = SparseFineTuning.load(target.language_sft)
    language_sft.check_language(target.lang, f"targets[].language_sft {target.language_sft}")
    _check_provenance(cfg, target, language_sft.info, Path(target.language_sft) / MANIFEST_FILE)
    if target.model_dir:  # lt_sft_vocab: plugged with the embeddings of the method it builds on, for this language
        plugged = plugged_info(target.model_dir)
        if plugged is None:
            raise EvaluationError(f"targets[].model_dir: {target.model_dir} has no {PLUG_FILE}: give the primary "
                                  "with the target embeddings plugged in by adapt/plug.py (<pipeline>/plugged_mlm"
                                  "[/<base>]/<lang>), the model the language SFT was learned over")
        _check_provenance(cfg, target, plugged, Path(target.model_dir) / PLUG_FILE,
                          method=parse_method(cfg.method).builds_on)
        model = _sft_composition(cfg, (target.model_dir, model_hash(target.model_dir)), language_sft)
        tokenizer = load_tokenizer(target.tokenizer or target.model_dir)
        check_tokenizer(model, tokenizer, target.model_dir, target.tokenizer or target.model_dir)
        return model, tokenizer
    return _sft_composition(cfg, primary, language_sft), source[1]


def _sft_composition(cfg: ZeroShotConfig, base: tuple[str, str], language_sft: SparseFineTuning):
    """The model `base` = (directory, hash) with the language SFT; for a fine-tuned task, + the source task model's
    task SFT."""
    if not cfg.task.spec.fine_tuned:
        model = load_masked_lm(base[0])
        language_sft.apply(model, base[1], with_abs=False, what=base[0])
        return model.base_model  # the encoder, named as the masked LM the SFT was learned on
    info = read_task_info(cfg.source_model_dir)
    task_sft = (info.get("sft") or {}).get("task")
    if task_sft is None:
        raise EvaluationError(f"source_model_dir: {cfg.source_model_dir} was not fine-tuned sparsely (its "
                              f"{TASK_FILE} names no task SFT): method {cfg.method} needs the task model of "
                              "evaluate/finetune.py sparse=true")
    if not info["sft"].get("language"):  # the target's SFT takes the place of the source's: there must be one
        raise EvaluationError(f"source_model_dir: {cfg.source_model_dir}'s task SFT was learned over the bare primary "
                              f"(no source-language SFT applied): method {cfg.method} composes a target's language "
                              "SFT with a task SFT learned over the source's (evaluate/finetune.py sparse=true "
                              "language_sft=<the source language's SFT>)")
    return load_sft_task_model(base[0], cfg.task.spec.kind, tuple(info["labels"]), task_sft, language_sft, base[1])


def _score_unadapted(cfg: ZeroShotConfig, target: TargetConfig, source, per_example: dict) -> dict[str, float]:
    """Method none: the source model reads the target text with its own tokenizer, where that tokenizer can."""
    unknown = unknown_fraction(cfg.task, source[1], target.lang, cfg.split)
    if unknown > UNK_REFUSED:
        log.warning("%s %s: the source tokenizer maps %.0f%% of %s's text to its unknown token: it cannot read the "
                    "language, so there is no unadapted baseline for it", cfg.task.name, cfg.method, 100 * unknown,
                    target.lang)
        return {"unk_fraction": unknown, UNREADABLE: 1.0}
    return {**_score(cfg, target, *source, source, per_example), "unk_fraction": unknown}


def _evaluate_target(cfg: ZeroShotConfig, target: TargetConfig, source,
                     primary) -> tuple[dict, dict[int, dict], dict[str, dict]]:
    """Score every checkpoint of one target and log a run for each; (final metrics, {snapshot step: metrics},
    {"final" or snapshot step: its per-example scores} where the task has them)."""
    def scored_at(at: TargetConfig, model, tokenizer) -> tuple[TargetConfig, dict, dict]:
        per_example: dict = {}
        return at, _score(cfg, at, model, tokenizer, source, per_example), per_example

    method = parse_method(cfg.method)
    if method.learns_embeddings or method.source.learns == "student":  # a student: its model_dir, no snapshots
        scored = [scored_at(*checkpoint) for checkpoint in _checkpoints(cfg, target, source, primary)]
    elif method.adapted:
        scored = [scored_at(target, *_sft_model(cfg, target, source, primary))]
    else:
        per_example: dict = {}
        scored = [(target, _score_unadapted(cfg, target, source, per_example), per_example)]
    if cfg.task.spec.kind == "mlm":
        _add_mlm_gain(target, [(at, metrics) for at, metrics, _ in scored])
    for at, metrics, _ in scored:
        log.info("%s %s %s (%s): %s", cfg.task.name, cfg.method, target.lang,
                 "final" if at.adapt_step is None else f"step {at.adapt_step}", metrics)
        _log_run(cfg, target.lang, "target", metrics, at)
    per_example = {"final" if i == 0 else str(at.adapt_step): scores
                   for i, (at, _, scores) in enumerate(scored) if scores}
    return scored[0][1], {at.adapt_step: metrics for at, metrics, _ in scored[1:]}, per_example


def _with_run_id(target: TargetConfig) -> TargetConfig:
    """The adaptation run of a plugged model, from its plug.json, unless given."""
    plugged = plugged_info(target.model_dir)
    if target.adapt_run_id or plugged is None:
        return target
    return dataclasses.replace(target, adapt_run_id=plugged.get("adapt_run_id"))


def zero_shot(cfg: ZeroShotConfig) -> StageResult:
    """Outputs: metrics per language ({lang: {metric: value}}) of the final embeddings, the source language
    included when evaluate_source."""
    out = Path(cfg.output_dir)
    if claim_output(out, cfg, resumable=False) == "new":  # an earlier config's scores are never this one's
        for stale in ("metrics.json", "snapshots.json", PER_EXAMPLE_FILE):
            (out / stale).unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")
    source_tokenizer = cfg.source_tokenizer or cfg.source_model_dir
    if cfg.task.spec.fine_tuned:
        info = read_task_info(cfg.source_model_dir)
        if info["task"] != cfg.task.name:
            raise EvaluationError(f"{cfg.source_model_dir} is a {info['task']} model, but task.name is "
                                  f"{cfg.task.name}")
    source = _load(cfg, cfg.source_model_dir, source_tokenizer)
    results: dict[str, dict[str, float]] = {}
    if cfg.evaluate_source and cfg.task.spec.fine_tuned:  # retrieval, target_mlm: no source-language reference
        results[cfg.source_lang] = score(cfg.task, *source, cfg.source_lang, cfg.split, cfg.batch_size)
        _log_run(cfg, cfg.source_lang, "source", results[cfg.source_lang], None)
    # the primary every run's embeddings must have been learned for: hashed once, not per target
    primary = _primary_of(cfg) if any(t.embeddings or t.language_sft for t in cfg.targets) else None
    snapshot_results, per_example = {}, {}
    for target in cfg.targets:
        results[target.lang], snapshots, per_example[target.lang] = _evaluate_target(cfg, target, source, primary)
        if snapshots:
            snapshot_results[target.lang] = snapshots
    faults.point("score")
    write_text_atomic(out / "metrics.json", json.dumps(results, indent=2))
    if snapshot_results:
        write_text_atomic(out / "snapshots.json", json.dumps(snapshot_results, indent=2))
    if per_example := {lang: scores for lang, scores in per_example.items() if scores}:
        write_text_atomic(out / PER_EXAMPLE_FILE, json.dumps(per_example))  # the report's paired comparisons
    finish_output(out, cfg)
    return StageResult("finished", results)
