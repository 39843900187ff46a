"""The whole method end to end, each step a real process, all runs nested under one MLflow parent run:

    data -> MiniJoint pretraining (torchrun, model-parallel) -> export (primary + MiniJoint mini-model)
         -> MiniPost mini-model from the exported primary
         -> adaptation per target language: over the full model (standard), the MiniJoint and the MiniPost mini-model
         -> zero-shot tasks scored on the primary model itself (target_mlm: held-out target MLM loss), per method
         -> step 3: fine-tune the primary on the English task -> plug each language's embeddings into the task model
         -> step 4: zero-shot evaluation of the task model per method -> report (quality vs adaptation compute)
    method lt_sft (LT-SFT) instead: language SFTs of the primary (the source language's too) -> a task SFT with the
         source's applied -> zero-shot with each target's SFT composed with the task SFT
    method lt_sft_vocab (LT-SFT over the target vocabulary): standard adaptation's embeddings plugged into the primary
         masked LM per target language (plug_mlm-<lang>, BiStil's too) -> a language SFT of that plugged model on the
         target text read with the target tokenizer -> zero-shot of the plugged model + its SFT + lt_sft's task SFT
         (the source-language SFT and the task SFT as for lt_sft, run for either)
    method bistil (BiStil): standard adaptation's embeddings plugged into the primary masked LM per target language
         -> phase 1, a small bilingual student per target language distilled from the primary (source) and that
         plugged model (target) -> phase 2, the student learns the task from the step-3 task model -> zero-shot of
         each student task model on the fine-tuned tasks (its target tokenizer)
    bistil@<method>, lt_sft_vocab@<method>: the same over the embeddings another listed method learned (e.g.
         bistil@minijoint: BiStil x mini-models, its compute the MiniJoint adaptation's instead of standard's)
    bistil@lt_sft (the BiStil reference's teachers): phase 1 from the primary with lt_sft's SFT of each language
         applied (no plugging) -> phase 2 from lt_sft's task model (primary + source SFT + task SFT) -> zero-shot
    and always the unadapted baseline (method `none`): the primary as it is, reading the target text with its own
    tokenizer (the source tokenizer), on every zero-shot task whose metric compares tokenizers; the report draws it
    as a line and warns when an adapted method ends below it
    (steps 3-4 only when configs.zero_shot lists a fine-tuned task; `seed=N` seeds every training stage: a replicate)

From a model you have (`primary_model: <Hugging Face dir>`, e.g. XLM-R): no pretraining or export; the data stage
encodes the source language with the primary's tokenizer and each target with a new one of its own, and MiniPost,
standard and MiniPost adaptation, fine-tuning, zero-shot and the report follow (configs/pipeline/hf_tiny.yaml).

    python -m minimodel.pipeline --config configs/pipeline/tiny.yaml [key=value ...]
    python -m minimodel.pipeline --config configs/pipeline/tiny.yaml --plan   # the jobs as JSON (slurm/pipeline.sh)

Re-running skips every finished stage whose inputs did not change (minimodel/stages.py) and reuses the parent run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import AutoConfig

from minimodel import provenance
from minimodel.data.tokenizer import tokenizer_fingerprint
from minimodel.config import ConfigError, build_config, load_config, require, save_config, setting
from minimodel.data.prepare import DataConfig
from minimodel.evaluation.tasks import TASKS, TaskConfig
from minimodel.hf import HFLoadError, load_tokenizer
from minimodel.errors import UserError
from minimodel.layout import PipelineLayout
from minimodel.methods import BASELINE, DISTILLED, MODELS, REFERENCE, SPARSE, job_name, parse_method
from minimodel.minipost.build import MiniPostError, check_tokenizer
from minimodel.stages import KINDS, Stage, StageFailed, StageInterrupted, StopSignals, jobs
from minimodel.tracking import Tracker, TrackingConfig, link_run
from minimodel.training.config import LAYOUT_KEYS, PretrainConfig
from minimodel.training.hf_mlm import UnsupportedModelError, check_model_config
from minimodel.training.preemption import PREEMPTED_EXIT_CODE

log = logging.getLogger(__name__)


@dataclass
class StageConfigs:
    data: str = "configs/data/default.yaml"
    pretrain: str = "configs/pretrain/minijoint_tiny.yaml"
    minipost: str = "configs/minipost/tiny.yaml"
    adapt: str = "configs/adapt/tiny.yaml"
    finetune: str = "configs/evaluate/finetune/verse_class_tiny.yaml"
    # one zero-shot stage per config and method: fine-tuned tasks (classification, QA) score the plugged task
    # model; the others (target_mlm, verse_retrieval) the primary with the adapted embeddings plugged in memory
    zero_shot: list[str] = field(default_factory=lambda: ["configs/evaluate/zero_shot/verse_class_tiny.yaml",
                                                          "configs/evaluate/zero_shot/target_mlm_tiny.yaml"])
    report: str = "configs/evaluate/report.yaml"
    word_vectors: str = "configs/word_vectors/default.yaml"  # methods with +ofa: aligned word vectors learned first
    # methods lt_sft, lt_sft_vocab: a language SFT per language (lt_sft: the source language's too)
    lang_sft: str = "configs/sft/tiny.yaml"
    task_sft: str = "configs/evaluate/finetune/verse_class_sft_tiny.yaml"  # lt_sft, lt_sft_vocab: step 3, a task SFT
    distill: str = "configs/distill/tiny.yaml"  # method bistil: phase 1, a student per target language
    distill_task: str = "configs/distill/task_tiny.yaml"  # method bistil: phase 2, the student learns the task


@dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline/tiny"
    data_dir: str = "data/default"  # the data config's output_dir
    source_lang: str = "en"
    target_langs: list[str] = field(default_factory=lambda: ["ny", "sw"])
    # adaptation methods run side by side, each `<model>[+<init>]` (minimodel/methods.py), e.g. minipost+copy_shared;
    # the unadapted baseline (none) is evaluated without being listed
    methods: list[str] = field(default_factory=lambda: ["standard", "minijoint", "minipost"])
    # a Hugging Face masked LM directory (XLM-R, mBERT, ...) to start from instead of pretraining MiniJoint
    primary_model: str | None = None
    # its tokenizer directory; None: the one saved in primary_model (with primary_head=keep, it must hold this one too)
    primary_tokenizer: str | None = None
    # train: the primary was saved without its MLM head: a first MiniPost run with mini.head_only=true learns one
    # (every layer frozen) and its model is the primary of everything after
    primary_head: Literal["keep", "train"] = "keep"
    pretrain_nproc: int = 2  # torchrun processes for step 1
    adapt_nproc: int = 1  # deepspeed ranks per adaptation run (language SFTs and BiStil's phase 1 too)
    minipost_nproc: int = 1  # deepspeed ranks of MiniPost's step 1b (and of a head learned for a headless primary)
    finetune_nproc: int = 1  # deepspeed ranks of step 3: fine-tuning, LT-SFT's task SFT, BiStil's phase 2
    # Slurm nodes of each of those jobs (slurm/pipeline.sh), each with its *_nproc ranks; a local run has one node
    pretrain_nodes: int = 1
    adapt_nodes: int = 1
    minipost_nodes: int = 1
    finetune_nodes: int = 1
    configs: StageConfigs = field(default_factory=StageConfigs)
    # extra key=value overrides per stage name (data, pretrain, export, minipost, adapt, lang_sft, finetune, task_sft,
    # distill, distill_task, zero_shot, report)
    overrides: dict[str, list[str]] = field(default_factory=dict)
    # extra adaptation overrides per method (a spec of `methods`), after overrides.adapt: e.g. give a mini-model
    # method more steps for about the standard method's compute, {minipost: [train.steps=300]}
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    # the seed of every training stage (SEED_SETTINGS: data order, masking, initialisation, dropout), so that a
    # pipeline per seed is an independent replicate of the experiment; None: each stage config's own seeds. The data
    # and the evaluation (held-out split, its masking) stay fixed, so replicates are scored on the same examples.
    seed: int | None = None
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(run_name="pipeline"))

    def validate(self) -> None:
        require(self.source_lang not in self.target_langs, "target_langs",
                f"the source language {self.source_lang} cannot also be a target")
        require(len(self.target_langs) >= 1, "target_langs", "name at least one target language")
        for group in ("pretrain", "adapt", "minipost", "finetune"):
            for key, what in ((f"{group}_nproc", "processes"), (f"{group}_nodes", "nodes")):
                require(getattr(self, key) >= 1, key, f"{getattr(self, key)} {what}: give at least 1")
        parsed = [parse_method(spec, f"methods[{i}]") for i, spec in enumerate(self.methods)]
        for i, (spec, method) in enumerate(zip(self.methods, parsed)):
            what = "language SFTs" if method.builds_on_sfts else "target embeddings"
            require(method.builds_on is None or method.builds_on in self.methods, f"methods[{i}]",
                    f"{spec} builds on the {what} {method.builds_on} adaptation learns: add {method.builds_on!r} to "
                    "methods")
        models = {method.model for method in parsed}
        require(BASELINE not in models, "methods", f"{BASELINE} (the unadapted primary) is evaluated on every "
                "pipeline without being listed, as the report's baseline line: drop it from methods")
        require(len(set(self.methods)) == len(self.methods), "methods", "each method once")
        require(REFERENCE in self.methods, "methods",
                f"the report measures every method against {REFERENCE} adaptation: keep {REFERENCE!r} in the list")
        if self.primary_model is not None:
            self._check_primary(models)
        elif "minijoint" in models and Path(self.configs.pretrain).is_file():
            pretrain = load_config(PretrainConfig, self.configs.pretrain, self.overrides.get("pretrain", []))
            require(pretrain.model.secondary_head != "none", "methods",
                    "minijoint needs the secondary head, but the pretraining config sets model.secondary_head=none: "
                    "drop minijoint from methods or pick another secondary_head")
        known = {"data", "word_vectors", "pretrain", "export", "minipost", "adapt", "lang_sft", "finetune", "task_sft",
                 "distill", "distill_task", "zero_shot", "report"}
        for stage in self.overrides:
            require(stage in known, f"overrides.{stage}", f"not a stage; stages are {sorted(known)}")
        require(len(set(self.target_langs)) == len(self.target_langs), "target_langs",
                f"{self.target_langs} names a language twice: each once")
        for method in self.method_overrides:
            require(method in self.methods, f"method_overrides.{method}", f"not one of methods {self.methods}")
            require(parse_method(method).learns_embeddings, f"method_overrides.{method}",
                    "method_overrides set adaptation (adapt/train.py) settings of an embedding method; "
                    f"{method}'s stages take overrides.lang_sft, overrides.distill, ... (every run of that stage)")
        for name in ("data", *(["pretrain"] if self.primary_model is None else []), "minipost", "adapt", "finetune",
                     "report", *(["lang_sft", "task_sft"] if any(MODELS[m].learns == "sft" for m in models) else []),
                     *(["distill", "distill_task"] if DISTILLED in models else [])):
            path = getattr(self.configs, name)
            require(Path(path).is_file(), f"configs.{name}", f"{path} does not exist")
        # OFA's word vectors are learned for the methods named +ofa only: init.method=ofa set anywhere else would read
        # whatever vectors file lies at its default path
        init = {"configs.adapt": file_setting(self.configs.adapt, "init.method", None, "configs.adapt"),
                "overrides.adapt": setting(None, self.overrides.get("adapt", []), "init.method"),
                **{f"method_overrides.{m}": setting(None, o, "init.method") for m, o in self.method_overrides.items()}}
        for key, method in init.items():
            require(method != "ofa", key, "sets init.method=ofa, whose word vectors the pipeline learns for a method "
                    "named with +ofa only: name it so in methods (e.g. minijoint+ofa)")
        # the data stage's sources: checked now, and the files among them watched for changes (build_stages)
        try:
            data = load_config(DataConfig, self.configs.data, self.overrides.get("data", []))
        except ConfigError as e:
            raise ConfigError(f"configs.data ({self.configs.data}) with overrides.data: {e}", e.key) from None
        for lang in [self.source_lang, *self.target_langs]:
            require(lang in data.languages, "source_lang" if lang == self.source_lang else "target_langs",
                    f"{lang} is not a language of the data config {self.configs.data} (it has "
                    f"{', '.join(data.languages)}): add languages.{lang}.sources there, or pick one of those")
        require(bool(self.configs.zero_shot), "configs.zero_shot", "list at least one zero-shot config")
        for i, path in enumerate(self.configs.zero_shot):
            require(Path(path).is_file(), f"configs.zero_shot[{i}]", f"{path} does not exist")
            require(config_task(path) in TASKS, f"configs.zero_shot[{i}]",
                    f"{path}: task.name {config_task(path)!r} is not one of {sorted(TASKS)}")
        tasks = [config_task(path) for path in self.configs.zero_shot]
        twice = sorted({task for task in tasks if tasks.count(task) > 1})
        require(not twice, "configs.zero_shot", f"evaluates {', '.join(twice)} more than once: its results would "
                "share one directory (zero_shot/<task>/<method>); keep one config per task")
        fine_tuned = [path for path in self.configs.zero_shot if TASKS[config_task(path)].fine_tuned]
        trained = {name: self._trained_task(name) for name in (
            "finetune", *(["task_sft"] if any(MODELS[m].learns == "sft" for m in models) else []),
            *(["distill_task"] if DISTILLED in models else []))}
        for path in fine_tuned:  # scored with the one task model each of those stages trains
            for name, task in trained.items():
                require(config_task(path) == task, "configs.zero_shot",
                        f"{path} evaluates {config_task(path)} zero-shot, but configs.{name} "
                        f"({getattr(self.configs, name)}) trains the {task} model it would read: fine-tune that "
                        "task there, or drop the config")
        require(DISTILLED not in models or bool(fine_tuned), "methods", f"{DISTILLED} is scored on fine-tuned tasks "
                "only (its student learns the task from the step-3 task model): list one in configs.zero_shot or drop "
                "it")
        self._check_overrides()  # last: over config files checked above

    def _trained_task(self, name: str) -> str:
        """The task configs.<name> (a training stage's config) learns: its overrides' task.name, else its file's."""
        return setting(None, self.overrides.get(name, []), "task.name") or config_task(getattr(self.configs, name),
                                                                                        f"configs.{name}")

    def _check_overrides(self) -> None:
        """Every stage's overrides against its config class: a mistyped key or a value of the wrong type failed only
        when its stage started, after the stages before it had run."""
        given = [*((f"overrides.{s}", s, o) for s, o in self.overrides.items()),
                 *((f"method_overrides.{m}", "adapt", o) for m, o in self.method_overrides.items())]
        for what, stage, overrides in given:
            files = self.configs.zero_shot if stage == "zero_shot" else [getattr(self.configs, stage, None)]
            cls = KINDS["finetune" if stage == "task_sft" else stage].config_class()
            for path in files:
                try:
                    build_config(cls, path if path and Path(path).is_file() else None, overrides)
                except ConfigError as e:
                    raise ConfigError(f"{what}: {e}") from None

    def _check_primary(self, models: set[str]) -> None:
        require("minijoint" not in models, "methods",
                "minijoint needs the MiniJoint mini-model, which only MiniJoint pretraining makes; a primary_model "
                "is not pretrained here: use minipost (a mini-model built from the primary) or drop primary_model")
        config = Path(self.primary_model) / "config.json"
        require(config.is_file(), "primary_model", f"{self.primary_model} is not a Hugging Face model directory (no "
                "config.json): give a directory saved with save_pretrained (model + tokenizer)")
        model_config = AutoConfig.from_pretrained(str(config.parent))
        try:
            check_model_config(model_config, self.primary_model)
        except UnsupportedModelError as e:
            raise ConfigError(f"primary_model: {e}") from None
        architectures = model_config.architectures or []
        require(self.primary_head == "train" or any(a.endswith("ForMaskedLM") for a in architectures),
                "primary_head", f"{self.primary_model} was saved without a masked-LM head (as {architectures}): set "
                "primary_head=train so that a head is learned first (the body frozen), or give a *ForMaskedLM save")
        tokenizer_dir = self.primary_tokenizer or self.primary_model
        try:
            tokenizer = load_tokenizer(tokenizer_dir)
            check_tokenizer(tokenizer, model_config, tokenizer_dir)
        except (HFLoadError, MiniPostError) as e:
            key = "primary_tokenizer" if self.primary_tokenizer else "primary_model"
            raise ConfigError(f"{key}: {e}") from None
        if self.primary_tokenizer and self.primary_head == "keep":
            # the data and head stages take it apart from the model; every later stage reads the one primary_model holds
            try:
                saved = tokenizer_fingerprint(load_tokenizer(self.primary_model))
            except HFLoadError:
                saved = None
            require(saved == tokenizer_fingerprint(tokenizer), "primary_tokenizer",
                    f"the stages after the data read the tokenizer saved in {self.primary_model}, which "
                    f"{'has none' if saved is None else 'is another one'}: save this one there "
                    f"(AutoTokenizer.from_pretrained({self.primary_tokenizer!r}).save_pretrained(...)), or set "
                    "primary_head=train (its head stage writes the model with this tokenizer)")


# The settings that seed each training stage (PipelineConfig.seed sets them all).
SEED_SETTINGS: dict[str, tuple[str, ...]] = {
    "word_vectors": ("seed",),  # the randomized SVD's
    "pretrain": ("train.seed",),
    "minipost": ("train.seed", "mini.seed"),
    "adapt": ("data_seed", "init.seed", "train.seed"),
    "lang_sft": ("data_seed", "train.seed"),
    "finetune": ("train.seed",),
    "task_sft": ("train.seed",),
    "distill": ("data_seed", "student.seed", "train.seed"),
    "distill_task": ("train.seed",),
}


def file_setting(config_path: str, key: str, default, what: str):
    """The value of dotted `key` in a stage's config file, `default` where it is unset; `what`: the pipeline setting
    that names the file, for errors."""
    try:
        return setting(config_path, [], key, default)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None


def flow(value) -> str:
    """A string (or path) as a YAML flow scalar on a stage's command line: as it is where YAML reads it back as that
    string (so every stage's command line, and its hash, stays as it was), else quoted (language code no, a path
    holding ', ')."""
    text = str(value)
    try:
        plain = yaml.safe_load(f"[{text}]") == [text]
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def flow_list(items) -> str:
    return f"[{', '.join(map(flow, items))}]"


def flow_mapping(**fields) -> str:
    return "{" + ", ".join(f"{key}: {flow(value)}" for key, value in fields.items()) + "}"


def config_task(config_path: str, what: str = "configs.zero_shot") -> str:
    """The task name a stage's config file names (its task.name, else TaskConfig's default)."""
    return file_setting(config_path, "task.name", TaskConfig.name, what)


def build_stages(cfg: PipelineConfig, parent_run_id: str | None = None) -> list[Stage]:
    """The pipeline as a list of stages in run order (each names the stages it depends on)."""
    at = layout(cfg)
    src = cfg.source_lang
    # in one order whatever the config's: reordering target_langs redoes nothing (word vectors, zero-shot)
    target_langs = sorted(cfg.target_langs)
    methods = [parse_method(spec) for spec in cfg.methods]
    embedding_methods = [m for m in methods if m.learns_embeddings]
    sparse = [m for m in methods if m.source.learns == "sft"]  # LT-SFT: lt_sft, lt_sft_vocab
    distilled = [m for m in methods if m.model == DISTILLED]  # bistil, and bistil@<base> for another base

    def ranks(group: str) -> dict[str, int]:  # a training stage's ranks per node and nodes
        return {"nproc": getattr(cfg, f"{group}_nproc"), "nodes": getattr(cfg, f"{group}_nodes")}

    user_given: dict[str, str] = {}  # each of the user's overrides: the setting that gave it

    def extra(stage: str) -> list[str]:
        seeds = [f"{key}={cfg.seed}" for key in SEED_SETTINGS.get(stage, ())] if cfg.seed is not None else []
        user_given.update(dict.fromkeys(cfg.overrides.get(stage, []), f"overrides.{stage}"))
        return [*seeds, *cfg.overrides.get(stage, [])]  # an explicit override wins over the pipeline's seed

    stages: list[Stage] = []

    def add(name, kind, args, output_dir, after, **fields):
        stage = Stage(name, kind, [str(a) for a in args], Path(output_dir), after, **fields)
        stages.append(stage)
        return stage

    source_data = [f"data.train_prefix={at.dataset(src, 'train')}", f"data.valid_prefix={at.dataset(src, 'valid')}",
                   f"data.tokenizer_dir={at.tokenizer(src)}"]
    # a given primary's tokenizer encodes the source language (its data must be in the model's ids)
    primary_tokenizer = cfg.primary_tokenizer or cfg.primary_model
    given = [f"languages.{src}.tokenizer={primary_tokenizer}"] if cfg.primary_model else []
    data_args = [f"output_dir={at.data_dir}", *given, *extra("data")]
    data = load_config(DataConfig, cfg.configs.data, data_args)
    read = [s.path for lc in data.languages.values() for s in lc.sources if s.path and Path(s.path).exists()]
    read += [d for lang in data.languages if (d := data.given_tokenizer(lang))] + [cfg.primary_model or ""]
    prepare = add("data", "data", ["--config", cfg.configs.data, *data_args], at.data_dir, [],
                  watched=[path for path in dict.fromkeys(read) if path])
    if cfg.primary_model is None:
        pretrain_args = [f"output_dir={at.pretrain}", *source_data, *extra("pretrain")]
        pretrain = add("pretrain", "pretrain", ["--config", cfg.configs.pretrain, *pretrain_args],
                       at.pretrain, [prepare], **ranks("pretrain"), layout_keys=LAYOUT_KEYS)
        # where pretraining writes its checkpoints (train.checkpoint.dir may put them on scratch space)
        checkpoints = load_config(PretrainConfig, cfg.configs.pretrain, pretrain_args).checkpoint_root
        export = add("export", "export", [f"checkpoint={checkpoints}", f"tokenizer={at.tokenizer(src)}",
                                          f"output_dir={at.export}", *extra("export")], at.export, [pretrain])
    elif cfg.primary_head == "train":  # a head for a headless primary: what waited for the export waits for it
        export = add("head", "minipost", ["--config", cfg.configs.minipost, f"source={cfg.primary_model}",
                                          *([f"tokenizer={cfg.primary_tokenizer}"] if cfg.primary_tokenizer else []),
                                          f"output_dir={at.head}", *source_data, "mini.head_only=true",
                                          "mini.head_init=random", "distill.weight=0", *extra("minipost")],
                     at.head, [prepare], **ranks("minipost"))
    else:  # the primary exists: what waited for the export waits for the data
        export = prepare
    # the stage that makes each model source's model for adaptation (minimodel/methods.py MODELS)
    made_by = {"standard": export, "minijoint": export}
    if any(m.model == "minipost" for m in methods):
        made_by["minipost"] = add("minipost", "minipost",
                                  ["--config", cfg.configs.minipost, f"source={at.primary}",
                                   *([f"tokenizer={cfg.primary_tokenizer}"] if cfg.primary_tokenizer else []),
                                   f"output_dir={at.minipost}", *source_data, *extra("minipost")],
                                  at.minipost, [export], **ranks("minipost"))

    def adapt_settings(method) -> list[str]:  # the user's, after the pipeline's: an explicit setting wins
        user_given.update(dict.fromkeys(cfg.method_overrides.get(method.name, []), f"method_overrides.{method.name}"))
        return [*extra("adapt"), *cfg.method_overrides.get(method.name, [])]

    # OFA's aligned word vectors, learned from the data stage's verse-parallel corpora and split (its resolved
    # config; minimodel/ofa/learn.py), unless the user gives every +ofa method vectors of their own (in the adaptation
    # config file or its overrides); per (source, target) pair: vectors learned jointly change with every language
    # added, and so would every finished +ofa adaptation's input
    learned_vectors = [m for m in embedding_methods if m.init == "ofa"
                       and setting(cfg.configs.adapt, adapt_settings(m), "init.ofa.vectors") is None]
    word_vectors = {lang: add(f"word_vectors-{lang}", "word_vectors",
                              ["--config", cfg.configs.word_vectors, f"data={at.data_dir / 'config.yaml'}",
                               f"eval.source_lang={src}", *extra("word_vectors")],
                              at.word_vectors(lang), [prepare], job="word_vectors", lang=lang,
                              lang_args=[f"languages={flow_list([src, lang])}",
                                         f"output_dir={at.word_vectors(lang)}"])
                    for lang in (target_langs if learned_vectors else [])}

    # one adaptation job per method: a task per language (a Slurm array)
    adapted: dict[tuple[str, str], Stage] = {}
    for method in embedding_methods:
        args = ["--config", cfg.configs.adapt, *method.adapt_overrides(), f"primary_model={at.primary}",
                f"source_lang={src}", f"data_dir={at.data_dir}", f"output_dir={at.adapt(method.name)}"]
        if method.source.over == "mini":
            args.append(f"mini_model={at.model(method.model)}")
        args += adapt_settings(method)
        learned = method in learned_vectors
        for lang in target_langs:
            adapted[method.name, lang] = add(
                f"adapt-{method.name}-{lang}", "adapt", args, at.adapt(method.name, lang),
                [made_by[method.model], prepare, *([word_vectors[lang]] if learned else [])],
                **ranks("adapt"), job=f"adapt-{method.name}", lang=lang,
                lang_args=[f"target_langs={flow_list([lang])}",  # only its own language: adding another reruns nothing
                           *([f"init.ofa.vectors=[{flow_mapping(path=at.word_vectors(lang) / 'vectors.bin')}]"]
                             if learned else [])])
    # BiStil and lt_sft_vocab: the primary masked LM with the final embeddings of the method they build on, per
    # language (standard adaptation's, or a spec's @<base>: one plugged model per base and language)
    plugged_mlm: dict[tuple[str | None, str], Stage] = {}
    for base, below in dict.fromkeys((m.base, m.builds_on) for m in methods if m.plugs_embeddings):
        job = "plug_mlm" + (f"-{base}" if base else "")
        for lang in target_langs:
            plugged_mlm[base, lang] = add(
                f"{job}-{lang}", "plug", [f"model={at.primary}", f"primary_model={at.primary}"],
                at.plugged_mlm(lang, base), [adapted[below, lang]], job=job, lang=lang,
                lang_args=[f"embeddings={at.adapt(below, lang)}", f"output_dir={at.plugged_mlm(lang, base)}"])

    def language_sft(method: str, lang: str, over: Path, after: list[Stage]) -> Stage:
        """A language SFT of `over` (the model it is learned over, whose tokenizer reads the text), filed under
        `method`; lt_sft's stages keep their short names."""
        job = job_name("lang_sft", method, SPARSE)
        return add(f"{job}-{lang}", "lang_sft", ["--config", cfg.configs.lang_sft, f"method={method}",
                                                 f"source_lang={src}", f"data_dir={at.data_dir}",
                                                 f"output_dir={at.adapt(method)}", *extra("lang_sft")],
                   at.adapt(method, lang), after, **ranks("adapt"), job=job, lang=lang,
                   lang_args=[f"target_langs={flow_list([lang])}", f"primary_model={over}"])

    if sparse:  # LT-SFT: the source language's SFT of the primary is applied while the task SFT trains (every sparse
        # method's); a language SFT per target language of the primary (lt_sft) or of the plugged model (lt_sft_vocab)
        adapted[SPARSE, src] = language_sft(SPARSE, src, at.primary, [export, prepare])
        for method in sparse:
            for lang in target_langs:
                over, after = ((at.plugged_mlm(lang, method.base), [plugged_mlm[method.base, lang], prepare])
                               if method.reads_plugged else (at.primary, [export, prepare]))
                adapted[method.name, lang] = language_sft(method.name, lang, over, after)

    def targets(method, plugged: bool = False) -> list[str]:
        """zero_shot's targets of a method: its embeddings (plugged into the task model, or in memory) or language
        SFTs, or (none) just the languages."""
        if method.learns_embeddings and plugged:  # embeddings: zero_shot also scores the run's snapshots; the
            # tokenizer is the adaptation run's, which plug saved beside the model (tokenizer.mode may differ per run)
            return [flow_mapping(lang=lang, model_dir=at.plugged(method.name, lang),
                                 tokenizer=at.plugged(method.name, lang), embeddings=at.adapt(method.name, lang))
                    for lang in target_langs]
        if method.learns_embeddings:
            return [flow_mapping(lang=lang, embeddings=at.adapt(method.name, lang)) for lang in target_langs]
        if method.source.learns == "student":  # each language's student task model, read with its target tokenizer
            # (bistil@lt_sft's: the model's own, the one vocabulary its teachers shared)
            models = {lang: at.student_task_model(lang, method.name) for lang in target_langs}
            return [flow_mapping(lang=lang, model_dir=model, tokenizer=model if method.builds_on_sfts
                                 else at.student_target_tokenizer(lang, method.name))
                    for lang, model in models.items()]
        if method.reads_plugged:  # the plugged model its language SFT was learned over, with the target tokenizer
            return [flow_mapping(lang=lang, language_sft=at.language_sft(lang, method.name),
                                 model_dir=at.plugged_mlm(lang, method.base)) for lang in target_langs]
        if method.adapted:
            return [flow_mapping(lang=lang, language_sft=at.language_sft(lang)) for lang in target_langs]
        return [flow_mapping(lang=lang) for lang in target_langs]

    def task_data(config: str, what: str) -> list[str]:
        """The data stage's output for a task that reads it (verses, target text); an official release's
        directory (XNLI-1.0, MLQA_V1) stays the config's."""
        return [f"task.data_dir={at.data_dir}"] if TASKS[config_task(config, what)].prepared_data else []

    def zero_shot(config: str, method: str, source_model: Path, targets: list[str], after: list[Stage],
                  settings: tuple[str, ...] = ()) -> Stage:
        task = config_task(config)
        out = at.zero_shot(task, method)
        return add(f"zero_shot-{task}-{method}", "zero_shot",
                   ["--config", config, f"method={method}", f"source_lang={src}", f"source_model_dir={source_model}",
                    *task_data(config, "configs.zero_shot"), f"targets=[{', '.join(targets)}]", f"output_dir={out}",
                    *settings, *extra("zero_shot")], out, after)

    # The unadapted baseline (method none) on each task whose metric compares tokenizers: each target is only a
    # language, read by the source model (the primary, or the task model fine-tuned from it) with its own tokenizer.
    # So is LT-SFT, which keeps the primary's vocabulary; BiStil's students on the fine-tuned ones (Method.scored_on).
    baseline = parse_method(BASELINE)

    def evaluated(config: str) -> list:
        return [m for m in [*methods, baseline] if m.scored_on(TASKS[config_task(config)])]

    def adaptations(method) -> list[Stage]:
        return [adapted[method.name, lang] for lang in target_langs] if method.adapted else [export]

    # Tasks on the primary itself need only the adaptation runs: each checkpoint's embeddings plugged in memory.
    fine_tuned = {config: TASKS[config_task(config)].fine_tuned for config in cfg.configs.zero_shot}
    evaluations = [zero_shot(config, m.name, at.primary, targets(m), adaptations(m))
                   for config in cfg.configs.zero_shot if not fine_tuned[config] for m in evaluated(config)]

    # Step 3 (fine-tuning, plugging into the task model) only when a configured task needs it.
    fine_tuned_configs = [config for config in cfg.configs.zero_shot if fine_tuned[config]]
    if fine_tuned_configs:
        finetune = add("finetune", "finetune", ["--config", cfg.configs.finetune, f"model_dir={at.primary}",
                                                *task_data(cfg.configs.finetune, "configs.finetune"),
                                                f"source_lang={src}",
                                                f"output_dir={at.finetune}", *extra("finetune")], at.finetune, [export],
                       **ranks("finetune"))
        for method in embedding_methods:
            plugs = [add(f"plug-{method.name}-{lang}", "plug",
                         [f"embeddings={at.adapt(method.name, lang)}", f"model={at.task_model}",
                          f"primary_model={at.primary}", f"output_dir={at.plugged(method.name, lang)}"],
                         at.plugged(method.name, lang), [adapted[method.name, lang], finetune])
                     for lang in target_langs]
            evaluations += [zero_shot(config, method.name, at.task_model, targets(method, plugged=True), plugs)
                            for config in fine_tuned_configs]
        if sparse:  # the task SFT, trained with the source language's SFT applied; zero-shot swaps in the target's
            task_sft = add("task_sft", "finetune", ["--config", cfg.configs.task_sft, f"model_dir={at.primary}",
                                                    *task_data(cfg.configs.task_sft, "configs.task_sft"),
                                                    f"source_lang={src}",
                                                    f"method={SPARSE}", "sparse=true",
                                                    f"language_sft={at.language_sft(src)}",
                                                    f"output_dir={at.task_sft}", *extra("task_sft")],
                           at.task_sft, [export, adapted[SPARSE, src]], **ranks("finetune"))
            evaluations += [zero_shot(config, method.name, at.task_sft / "model", targets(method),
                                      [task_sft, *adaptations(method)])
                            for method in sparse for config in fine_tuned_configs]
        for method in distilled:  # BiStil: a student per target language, distilled from the primary and its
            # adapted twin (phase 1's target teacher: the primary with the embeddings of the method it builds on) or,
            # bistil@lt_sft, from the primary with each language's SFT applied, taught the task by lt_sft's task model
            name = method.name
            distill_job, task_job = job_name("distill", name, DISTILLED), job_name("distill_task", name, DISTILLED)
            named = [f"method={name}"] if method.base else []  # the default's command lines stay as they were
            if method.builds_on_sfts:
                teachers = [f"teacher_sft={at.language_sft(src)}"]
                task_teacher, task_teacher_job = at.task_sft / "model", task_sft
            else:
                teachers, task_teacher, task_teacher_job = [], at.task_model, finetune
            distilled_tasks = []
            for lang in target_langs:
                if method.builds_on_sfts:
                    target_teacher = [adapted[SPARSE, src], adapted[SPARSE, lang]]
                    target_args = [f"target_teacher_sft={at.language_sft(lang)}"]
                else:
                    target_teacher = [plugged_mlm[method.base, lang]]
                    target_args = [f"target_teacher_model={at.plugged_mlm(lang, method.base)}"]
                adapted[name, lang] = add(
                    f"{distill_job}-{lang}", "distill", ["--config", cfg.configs.distill, *named,
                                                         f"teacher_model={at.primary}", *teachers,
                                                         f"source_lang={src}", f"data_dir={at.data_dir}",
                                                         f"output_dir={at.adapt(name)}", *extra("distill")],
                    at.adapt(name, lang), [*target_teacher, export, prepare], **ranks("adapt"),
                    job=distill_job, lang=lang, lang_args=[f"target_langs={flow_list([lang])}", *target_args])
                distilled_tasks.append(add(
                    f"{task_job}-{lang}", "distill_task",
                    ["--config", cfg.configs.distill_task, *named, f"teacher={task_teacher}",
                     *task_data(cfg.configs.distill_task, "configs.distill_task"), *extra("distill_task")],
                    at.distill_task(lang, name), [adapted[name, lang], task_teacher_job], **ranks("finetune"),
                    job=task_job, lang=lang,
                    lang_args=[f"student={at.student(lang, name)}", f"output_dir={at.distill_task(lang, name)}"]))
            # every language has its student task model (its source-language scores: distill_task's metrics.json);
            # zero-shot scores each on its language, the first only standing in as the source model zero_shot loads
            evaluations += [zero_shot(config, name, at.student_task_model(target_langs[0], name),
                                      targets(method), distilled_tasks, ("evaluate_source=false",))
                            for config in fine_tuned_configs if method.scored_on(TASKS[config_task(config)])]
        evaluations += [zero_shot(config, baseline.name, at.task_model, targets(baseline), [finetune])
                        for config in fine_tuned_configs if baseline in evaluated(config)]
    tasks = ", ".join(dict.fromkeys(config_task(config) for config in cfg.configs.zero_shot))
    report = add("report", "report", ["--config", cfg.configs.report, f"output_dir={at.report}",
                                      f"pipeline_dir={at.root}", f"methods=[{', '.join(cfg.methods)}]",
                                      f"tasks=[{tasks}]", *extra("report")],
                 at.report, evaluations)
    report.always_run = True  # its files and headline numbers go to this pipeline run too
    if parent_run_id:
        report.run_args.append(f"parent_run_id={parent_run_id}")
    for stage in stages:
        _refuse_rewiring(stage, user_given, (at.root, at.data_dir))
    return stages


def _refuse_rewiring(stage: Stage, given: dict[str, str], roots: tuple[Path, ...]) -> None:
    """A user's override may not replace a path the pipeline wires between its stages (a stage's output directory,
    an upstream result, under the pipeline's output_dir or data_dir, also inside a list or mapping: zero-shot
    targets; a DATA setting, a task's data, may be the user's own): the pipeline skips, stamps and reads its
    layout's paths, and would take another directory's results as this run's."""
    data = provenance.data_keys(KINDS[stage.kind].config_class()) if KINDS[stage.kind].config else set()
    roots = tuple(root.absolute() for root in roots)

    def wired_path(value) -> bool:
        if isinstance(value, dict):
            return any(wired_path(v) for v in value.values())
        if isinstance(value, list):
            return any(wired_path(v) for v in value)
        if not isinstance(value, str) or not value:
            return False
        path = Path(value).absolute()
        return any(root in (path, *path.parents) for root in roots)

    wired = {}
    for arg in [*stage.args, *stage.lang_args]:
        key, _, value = arg.partition("=")
        try:
            read = yaml.safe_load(value) if value.startswith(("[", "{")) else value
        except yaml.YAMLError:
            read = value
        if arg not in given and key not in data and wired_path(read):
            wired[key] = value
    for arg in (arg for arg in stage.args if arg in given):
        key = arg.partition("=")[0].strip()
        for set_key, value in wired.items():
            if key == set_key or set_key.startswith(f"{key}.") or key.startswith(f"{set_key}."):
                raise ConfigError(f"{given[arg]}: {key} of stage {stage.name} is the pipeline's ({set_key}={value}): "
                                  "it lays out and reads its stages' outputs under output_dir and data_dir; set "
                                  "those (or primary_model) of the pipeline instead, or run the stage by itself",
                                  given[arg])


def layout(cfg: PipelineConfig) -> PipelineLayout:
    at = PipelineLayout(Path(cfg.output_dir), Path(cfg.data_dir))
    if cfg.primary_model is None:
        return at
    primary = at.head / "mini" if cfg.primary_head == "train" else Path(cfg.primary_model)
    return PipelineLayout(at.root, at.data_dir, primary)


def _runs_since(tracker: Tracker):
    """-> find_runs(start_time): the ids of this pipeline's child runs that ended since then (a stage that resumed
    its earlier run continues that run: it started before, but ends now). [] when the store cannot answer: the
    stage's result is on disk and is stamped; only the view loses the link."""
    def find_runs(start_time: float) -> list[str]:
        if not tracker.run_id:
            return []
        query = (f"tags.`mlflow.parentRunId` = '{tracker.run_id}' "
                 f"and attributes.end_time >= {int(start_time * 1000)} and attributes.status = 'FINISHED'")
        try:
            return [r.info.run_id for r in tracker.client.search_runs([tracker.experiment_id], query)]
        except Exception as e:  # noqa: BLE001 - any store failure
            log.warning("could not list the MLflow runs of the stage that just finished: %s", e)
            return []
    return find_runs


def _close_open_runs(tracker: Tracker, status: str) -> None:
    """End this pipeline's child runs a stage left RUNNING (killed outright, or by a signal before it could close
    its run): they would show as running for ever."""
    if not tracker.run_id:
        return
    query = f"tags.`mlflow.parentRunId` = '{tracker.run_id}' and attributes.status = 'RUNNING'"
    try:
        for run in tracker.client.search_runs([tracker.experiment_id], query):
            tracker.client.set_terminated(run.info.run_id, status)
    except Exception as e:  # noqa: BLE001 - any store failure: only the view is wrong
        log.warning("could not close the MLflow runs the stopped stage left open: %s", e)


def _link_earlier_runs(cfg: PipelineConfig, tracker: Tracker, stage: Stage) -> None:
    """A skipped stage shows up in this pipeline's run as links to the runs that did the work."""
    if tracker.run_id:
        for run_id in stage.stamp().get("run_ids", []):
            link_run(cfg.tracking, run_id, parent_run_id=tracker.run_id)


def _env(tracker: Tracker) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")  # DS_ACCELERATOR comes from the CPU layer (minimodel.compat.cpu.quiet)
    env.update(tracker.child_env())
    return env


def check_stage_configs(cfg: PipelineConfig) -> None:
    """Every stage's whole config loaded and validated as the stage will (Stage.check_config), before the pipeline
    starts its tracking run: a bad value fails at once."""
    for stage in build_stages(cfg, None):
        stage.check_config()


def run(cfg: PipelineConfig) -> Path:
    for group in ("pretrain", "adapt", "minipost", "finetune"):
        require(getattr(cfg, f"{group}_nodes") == 1, f"{group}_nodes",
                "a local run has one node: submit the pipeline to Slurm (bash slurm/pipeline.sh CONFIG) to run a "
                "stage on several")
    check_stage_configs(cfg)  # before anything is written or logged
    at = layout(cfg)
    save_config(cfg, at.config)
    tracker = Tracker(cfg.tracking, config=cfg, tags={"stage": "pipeline", "source_lang": cfg.source_lang,
                                                       "target_langs": ",".join(cfg.target_langs)})
    stages = build_stages(cfg, tracker.run_id)
    env, find_runs = _env(tracker), _runs_since(tracker)
    start = time.time()
    try:
        with StopSignals() as stop:  # a signal stops the running stage (checkpoint, exit 75), then the pipeline
            for i, stage in enumerate(stages, 1):
                if stop.received:
                    raise StageInterrupted(f"stopped by {signal.Signals(stop.received).name} before stage "
                                           f"{stage.name}: run the same command again to go on")
                if done_by := stage.done_by():
                    why = ("finished earlier with the same settings but for its launch and layout"
                           if done_by == "layout" else "finished earlier with the same inputs")
                    print(f"=== [{i}/{len(stages)}] {stage.name}: {why}: skipped", flush=True)
                    _link_earlier_runs(cfg, tracker, stage)
                    continue
                print(f"=== [{i}/{len(stages)}] {stage.name}", flush=True)
                seconds = stage.run(env, at.logs, find_runs, stop)
                tracker.log_metrics({f"seconds.{stage.name}": seconds}, step=0)
    except StageInterrupted as e:  # a signal stopped it after checkpointing: not stamped, the next run resumes it
        _close_open_runs(tracker, "KILLED")
        tracker.finish("KILLED")
        print(f"pipeline: {e}", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT_CODE) from None
    except StageFailed as e:
        _close_open_runs(tracker, "FAILED")
        tracker.finish("FAILED")
        print(f"pipeline: {e}\nFix the cause and run the same command again: finished stages are skipped.",
              file=sys.stderr)
        raise SystemExit(1) from None
    tracker.log_metrics({"pipeline_seconds": time.time() - start}, step=0)
    tracker.finish()
    report_dir = at.report
    print(f"\npipeline finished in {time.time() - start:.0f} s")
    print(f"report:  {report_dir / 'report.md'} (+ report.json, compute_vs_quality.png)")
    summary = report_dir / "report.json"
    for warning in json.loads(summary.read_text()).get("warnings", []) if summary.is_file() else []:
        print(f"WARNING: {warning}", flush=True)  # e.g. a method that ends below the unadapted baseline
    if tracker.run_id:
        print(f"MLflow:  `make ui`, then open run {tracker.run_id} (store: {tracker.uri})")
    return report_dir


def plan(cfg: PipelineConfig) -> dict:
    """The pipeline as batch jobs for slurm/pipeline.sh: {"env": the jobs' environment, "jobs": stages.jobs()},
    the per-language stages of a method already one job with an array task per language, reading copies of their
    settings files."""
    check_stage_configs(cfg)  # before anything is logged
    tracker = Tracker(cfg.tracking, config=cfg, tags={"stage": "pipeline", "source_lang": cfg.source_lang,
                                                       "target_langs": ",".join(cfg.target_langs)})
    stages = build_stages(cfg, tracker.run_id)
    memo: dict[int, str] = {}
    # the jobs read the settings this plan hashed: copies, kept in the output directory (a file edited before a job
    # starts would run under the hash of its old content)
    planned = jobs(stages, memo, layout(cfg).plan_settings)
    for stage in stages:
        if stage.done_by(memo):  # not submitted: shown in this pipeline's run as links to the runs that did the work
            _link_earlier_runs(cfg, tracker, stage)
    tracker.finish()  # the Slurm jobs log their runs under it
    return {"env": tracker.child_env(), "jobs": planned}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pipeline/tiny.yaml")
    parser.add_argument("--plan", action="store_true", help="print the jobs as JSON and exit")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides before and after --config alike, as every stage's
    try:
        cfg = load_config(PipelineConfig, args.config, args.overrides)
        if args.plan:
            print(json.dumps(plan(cfg)))
        else:
            run(cfg)
    except UserError as e:  # before any stage ran (a stage's failure is its own)
        print(f"{'config error' if isinstance(e, ConfigError) else 'error'}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
