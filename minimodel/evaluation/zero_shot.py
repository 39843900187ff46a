"""Step 4: zero-shot transfer. Run a task model whose embeddings were swapped for a target language's (adapt/plug.py)
on that language's test set with the target tokenizer; the source-language task model is scored too, as the
upper reference.

A target that names its adaptation run (`embeddings: <adapt output_dir>/<lang>`) also has the run's intermediate
snapshots (<run>/snapshots/step_<N>/) scored: each is plugged into the source task model in memory, by the same
function adapt/plug.py uses, so the report can draw quality against adaptation compute.

One MLflow run per language and model scored, tagged stage=evaluate, method, target_lang, task and role ("target"
or "source"); a target's runs carry adapt_run_id, and a snapshot's adapt_step, so the report can place them on the
compute axis. Writes <output_dir>/metrics.json ({lang: {metric: value}}, final embeddings) and, with snapshots,
<output_dir>/snapshots.json ({lang: {step: {metric: value}}}).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from minimodel.adaptation.artifact import list_snapshots, read_info
from minimodel.adaptation.plug import plug_model
from minimodel.config import require, save_config
from minimodel.evaluation import EvaluationError
from minimodel.evaluation.models import check_tokenizer, load_task_model, read_task_info
from minimodel.evaluation.scoring import score, score_retrieval
from minimodel.evaluation.tasks import TaskConfig
from minimodel.tracking import Tracker, TrackingConfig

log = logging.getLogger(__name__)

PLUG_FILE = "plug.json"  # provenance adapt/plug.py writes into a plugged model directory
METHODS = ("standard", "minijoint", "minipost")


@dataclass
class TargetConfig:
    lang: str = ""
    model_dir: str = ""  # task model plugged with this language's embeddings (retrieval: any model with them)
    tokenizer: str = ""  # this language's tokenizer directory
    adapt_run_id: str | None = None  # the adaptation's MLflow run; None: the one model_dir's plug.json names
    adapt_step: int | None = None  # its checkpoint step (None: the final embeddings)
    embeddings: str | None = None  # the adaptation run dir (<adapt output_dir>/<lang>): also score its snapshots


@dataclass
class ZeroShotConfig:
    output_dir: str = "runs/evaluate/zero_shot"
    task: TaskConfig = field(default_factory=TaskConfig)
    method: str = "standard"  # how the target embeddings were learned: standard | minijoint | minipost
    source_lang: str = "en"
    source_model_dir: str = ""  # fine-tuned task model (retrieval: a model with the source embeddings)
    source_tokenizer: str | None = None  # default: the tokenizer saved in source_model_dir
    evaluate_source: bool = True  # score the source language too (the upper reference)
    targets: list[TargetConfig] = field(default_factory=list)
    split: str = "test"
    batch_size: int = 64
    retrieval_layer: int | None = None  # hidden_states index for retrieval; None = 2/3 of the depth
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(self.method in METHODS, "method", f"{self.method!r} is not one of {list(METHODS)}")
        require(bool(self.source_model_dir), "source_model_dir", "set it to the fine-tuned task model directory")
        require(self.split in ("dev", "test"), "split", "must be dev or test")
        for i, t in enumerate(self.targets):
            require(bool(t.lang and t.model_dir and t.tokenizer), f"targets[{i}]",
                    "each target needs lang, model_dir (plugged model) and tokenizer")
        require(bool(self.targets) or self.evaluate_source, "targets",
                "nothing to evaluate: list target languages or set evaluate_source=true")


def _load(cfg: ZeroShotConfig, model_dir: str, tokenizer_dir: str):
    from transformers import AutoTokenizer

    model = load_task_model(model_dir, cfg.task.spec.kind)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_tokenizer(model, tokenizer, model_dir, tokenizer_dir)
    return model, tokenizer


def _check_target(cfg: ZeroShotConfig, target: TargetConfig, model, source_model) -> None:
    """Refuse a target model that is not the source task model plugged for this language by this method."""
    if cfg.task.spec.kind != "retrieval" and model.config.id2label != source_model.config.id2label:
        raise EvaluationError(f"{target.model_dir} has labels {model.config.id2label}, the task model "
                              f"{cfg.source_model_dir} {source_model.config.id2label}: plug the target embeddings "
                              "into the fine-tuned task model")
    plug_info = Path(target.model_dir) / PLUG_FILE
    if plug_info.is_file():  # written by adapt/plug.py
        _check_provenance(cfg, target, json.loads(plug_info.read_text()), plug_info)


def _check_provenance(cfg: ZeroShotConfig, target: TargetConfig, info: dict, path: Path) -> None:
    """Results must not be filed under another method or language than the embeddings were learned for."""
    checks = (("method", cfg.method, "method"), ("target_lang", target.lang, "targets[].lang"))
    for key, expected, setting in checks:
        if info.get(key) not in (None, expected):
            raise EvaluationError(f"{target.model_dir} holds {key}={info[key]!r} embeddings (see {path}) "
                                  f"but is evaluated as {expected!r}: fix {setting}")


def _log_run(cfg: ZeroShotConfig, lang: str, role: str, metrics: dict[str, float], target: TargetConfig | None):
    tags = {"stage": "evaluate", "method": cfg.method, "target_lang": lang, "source_lang": cfg.source_lang,
            "task": cfg.task.name, "role": role, "metric": cfg.task.spec.metric}
    if target is not None:
        tags.update(adapt_run_id=target.adapt_run_id, adapt_step=target.adapt_step, model_dir=target.model_dir)
    tracking = cfg.tracking
    if tracking.run_name is None:
        step = f"-step{target.adapt_step}" if target is not None and target.adapt_step is not None else ""
        tracking = dataclasses.replace(tracking, run_name=f"evaluate-{cfg.task.name}-{cfg.method}-{lang}{step}")
    with Tracker(tracking, config=cfg, tags=tags) as tracker:
        tracker.log_metrics(metrics, step=(target.adapt_step or 0) if target else 0)


def _score_target(cfg: ZeroShotConfig, target: TargetConfig, model, tokenizer, source) -> dict[str, float]:
    source_model, source_tok = source
    if cfg.task.spec.kind == "retrieval":
        metrics = score_retrieval(cfg.task, source_model, source_tok, cfg.source_lang, model, tokenizer,
                                  target.lang, cfg.split, cfg.batch_size, cfg.retrieval_layer)
    else:
        metrics = score(cfg.task, model, tokenizer, target.lang, cfg.split, cfg.batch_size)
    step = "final" if target.adapt_step is None else f"step {target.adapt_step}"
    log.info("%s %s %s (%s): %s", cfg.task.name, cfg.method, target.lang, step, metrics)
    _log_run(cfg, target.lang, "target", metrics, target)
    return metrics


def _primary_of(cfg: ZeroShotConfig) -> tuple[str, str]:
    """(directory, sha256) of the primary model the source task model was fine-tuned from (retrieval: the source
    model itself): the model every snapshot must have been learned for."""
    if cfg.task.spec.kind == "retrieval":
        from minimodel.manifest import model_hash

        return cfg.source_model_dir, model_hash(cfg.source_model_dir)
    primary = read_task_info(cfg.source_model_dir)["primary_model"]
    return primary["path"], primary["sha256"]


def _score_snapshots(cfg: ZeroShotConfig, target: TargetConfig, source) -> dict[int, dict[str, float]]:
    """Score each intermediate snapshot of the target's adaptation run, plugged into the source model in memory
    (the final step is the run's own artifact, scored through target.model_dir)."""
    final = read_info(target.embeddings)
    if final is None:
        raise EvaluationError(f"targets[].embeddings: {target.embeddings} holds no finished adaptation (no "
                              "adapt.json): point at <adapt output_dir>/<lang> of a finished adapt/train.py run")
    snapshots = [(d, read_info(d)) for d in list_snapshots(target.embeddings)]
    snapshots = [(d, info) for d, info in snapshots if info["steps"] < final["steps"]]
    if not snapshots:
        log.warning("%s has no intermediate snapshots: only its final embeddings are scored (set snapshot_every "
                    "in the adaptation config for a quality-vs-compute curve)", target.embeddings)
    primary_dir, primary_sha = _primary_of(cfg)
    results = {}
    for snapshot, info in snapshots:
        at_step = dataclasses.replace(target, model_dir=str(snapshot), adapt_step=info["steps"],
                                      adapt_run_id=info.get("adapt_run_id"))
        _check_provenance(cfg, at_step, info, snapshot / "adapt.json")
        model = copy.deepcopy(source[0])
        tokenizer, _, _ = plug_model(model, snapshot, model_dir=cfg.source_model_dir, primary_dir=primary_dir,
                                     primary_sha=primary_sha)
        results[info["steps"]] = _score_target(cfg, at_step, model, tokenizer, source)
    return results


def _with_run_id(target: TargetConfig) -> TargetConfig:
    """The adaptation run of a plugged model, from its plug.json, unless given."""
    plug_info = Path(target.model_dir) / PLUG_FILE
    if target.adapt_run_id or not plug_info.is_file():
        return target
    return dataclasses.replace(target, adapt_run_id=json.loads(plug_info.read_text()).get("adapt_run_id"))


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def zero_shot(cfg: ZeroShotConfig) -> dict[str, dict[str, float]]:
    """Metrics per language ({lang: {metric: value}}) of the final embeddings, the source language included when
    evaluate_source."""
    out = Path(cfg.output_dir)
    save_config(cfg, out / "config.yaml")
    source_tokenizer = cfg.source_tokenizer or cfg.source_model_dir
    if cfg.task.spec.kind != "retrieval":
        info = read_task_info(cfg.source_model_dir)
        if info["task"] != cfg.task.name:
            raise EvaluationError(f"{cfg.source_model_dir} is a {info['task']} model, but task.name is "
                                  f"{cfg.task.name}")
    source = _load(cfg, cfg.source_model_dir, source_tokenizer)
    results: dict[str, dict[str, float]] = {}
    if cfg.evaluate_source and cfg.task.spec.kind != "retrieval":  # retrieving a language from itself: no reference
        results[cfg.source_lang] = score(cfg.task, *source, cfg.source_lang, cfg.split, cfg.batch_size)
        _log_run(cfg, cfg.source_lang, "source", results[cfg.source_lang], None)
    snapshot_results = {}
    for target in cfg.targets:
        model, tokenizer = _load(cfg, target.model_dir, target.tokenizer)
        _check_target(cfg, target, model, source[0])
        results[target.lang] = _score_target(cfg, _with_run_id(target), model, tokenizer, source)
        if target.embeddings:
            snapshot_results[target.lang] = _score_snapshots(cfg, target, source)
    _write_json(out / "metrics.json", results)
    if snapshot_results:
        _write_json(out / "snapshots.json", snapshot_results)
    return results
