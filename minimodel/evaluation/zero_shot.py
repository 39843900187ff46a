"""Step 4: zero-shot transfer. Run a task model whose embeddings were swapped for a target language's (adapt/plug.py)
on that language's test set with the target tokenizer; the source-language task model is scored too, as the
upper reference.

One MLflow run per language scored, tagged stage=evaluate, method, target_lang, task and role ("target" or
"source"); evaluation of an intermediate adaptation checkpoint carries adapt_run_id / adapt_step tags so the
report can place it on the compute axis. Writes <output_dir>/metrics.json ({lang: {metric: value}}).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

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
    adapt_run_id: str | None = None  # the adaptation run the embeddings come from
    adapt_step: int | None = None  # its checkpoint step (None: the final embeddings)


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
    if plug_info.is_file():  # written by adapt/plug.py: results must not be filed under another method or language
        info = json.loads(plug_info.read_text())
        checks = (("method", cfg.method, "method"), ("target_lang", target.lang, "targets[].lang"))
        for key, expected, setting in checks:
            if info.get(key) not in (None, expected):
                raise EvaluationError(f"{target.model_dir} holds {key}={info[key]!r} embeddings (see {plug_info}) "
                                      f"but is evaluated as {expected!r}: fix {setting}")


def _log_run(cfg: ZeroShotConfig, lang: str, role: str, metrics: dict[str, float], target: TargetConfig | None):
    tags = {"stage": "evaluate", "method": cfg.method, "target_lang": lang, "source_lang": cfg.source_lang,
            "task": cfg.task.name, "role": role, "metric": cfg.task.spec.metric}
    if target is not None:
        tags.update(adapt_run_id=target.adapt_run_id, adapt_step=target.adapt_step, model_dir=target.model_dir)
    tracking = cfg.tracking
    if tracking.run_name is None:
        tracking = dataclasses.replace(tracking, run_name=f"evaluate-{cfg.task.name}-{cfg.method}-{lang}")
    with Tracker(tracking, config=cfg, tags=tags) as tracker:
        tracker.log_metrics(metrics, step=(target.adapt_step or 0) if target else 0)


def zero_shot(cfg: ZeroShotConfig) -> dict[str, dict[str, float]]:
    """Metrics per language ({lang: {metric: value}}), the source language included when evaluate_source."""
    out = Path(cfg.output_dir)
    save_config(cfg, out / "config.yaml")
    source_tokenizer = cfg.source_tokenizer or cfg.source_model_dir
    if cfg.task.spec.kind != "retrieval":
        info = read_task_info(cfg.source_model_dir)
        if info["task"] != cfg.task.name:
            raise EvaluationError(f"{cfg.source_model_dir} is a {info['task']} model, but task.name is "
                                  f"{cfg.task.name}")
    source_model, source_tok = _load(cfg, cfg.source_model_dir, source_tokenizer)
    results: dict[str, dict[str, float]] = {}
    retrieval = cfg.task.spec.kind == "retrieval"
    if cfg.evaluate_source and not retrieval:  # retrieving a language from itself is no reference
        results[cfg.source_lang] = score(cfg.task, source_model, source_tok, cfg.source_lang, cfg.split,
                                         cfg.batch_size)
        _log_run(cfg, cfg.source_lang, "source", results[cfg.source_lang], None)
    for target in cfg.targets:
        model, tokenizer = _load(cfg, target.model_dir, target.tokenizer)
        _check_target(cfg, target, model, source_model)
        if retrieval:
            metrics = score_retrieval(cfg.task, source_model, source_tok, cfg.source_lang, model, tokenizer,
                                      target.lang, cfg.split, cfg.batch_size, cfg.retrieval_layer)
        else:
            metrics = score(cfg.task, model, tokenizer, target.lang, cfg.split, cfg.batch_size)
        results[target.lang] = metrics
        log.info("%s %s %s: %s", cfg.task.name, cfg.method, target.lang, metrics)
        _log_run(cfg, target.lang, "target", metrics, target)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "metrics.json")
    return results
