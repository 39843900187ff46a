"""Adaptation methods as entries: which model the target embeddings are learned over, plus adaptation options.

A method is written as a spec `<model>[+<init>]`:
- `<model>` (MODELS): where the model for adaptation comes from: `standard` (the primary model itself, the baseline
  every other method is measured against), `minijoint` (the MiniJoint mini-model the export splits off the primary),
  `minipost` (the MiniPost mini-model built from the primary), `lt_sft` (no new embeddings: a sparse fine-tuning of
  the primary per language, adapt/sft.py, composed with a sparse task fine-tuning at zero-shot time: LT-SFT, Ansell
  et al. 2022), `lt_sft_vocab` (SPARSE_VOCAB, LT-SFT beyond the reference: for a language the primary's vocabulary
  cannot read, each target's language SFT is learned over the primary with standard adaptation's target embeddings
  plugged in, reading the target text with the target tokenizer; zero-shot composes that plugged model + its language
  SFT + lt_sft's task SFT; its compute is standard adaptation's plus the language SFT's; the plugged embeddings
  stay eligible in the SFT like the reference's word embeddings: they are the target vocabulary's own rows, so a
  sparse refinement of them applies to the very model it is composed with), `bistil` (DISTILLED, BiStil: a small
  bilingual student per target language distilled from the primary with standard adaptation's embeddings plugged
  in, adapt/distill.py, then taught the task by the fine-tuned task model, evaluate/distill_task.py; its compute is
  standard adaptation's plus the distillation's), or `none` (BASELINE: no adaptation at all, the primary as it is
  reads the target text with its own tokenizer and embeddings; the pipeline evaluates it on every zero-shot task
  whose metric compares tokenizers and the report draws it as the line an adapted method must beat);
- `+<init>`: the initialisation of the new embedding matrix, one of adaptation/vocab.py's INITIALISERS (e.g.
  `minipost+copy_shared`); without it, the adaptation config's `init.method`;
- `@<method>` (lt_sft_vocab and bistil, which build on another method's target embeddings): the embedding method
  they build on instead of standard adaptation, e.g. `bistil@minijoint` (BiStil x mini-models: its teacher reads the
  target with the embeddings MiniJoint adaptation learned, for a fraction of the compute) or `lt_sft_vocab@minipost`;
  or, for bistil, `bistil@lt_sft` (BiStil x LT-SFT, the BiStil reference's own teachers: the primary with lt_sft's
  language SFT of each language applied reads that language with the primary's vocabulary, and phase 2's teacher is
  lt_sft's task model, the primary + the source language's SFT + the task SFT; its compute counts both language SFTs).
So `methods: [standard, minipost, minipost+copy_shared]` runs three adaptations per language side by side. The spec is
the method's name everywhere: pipeline stage names, output directories, adapt.json, zero-shot results and the report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from minimodel.adaptation.vocab import INITIALISERS
from minimodel.config import ConfigError

REFERENCE = "standard"  # the report's reference: every method's compute is compared to this one's
BASELINE = "none"  # the unadapted primary: the quality an adapted method must beat (the pipeline always adds it)
SPARSE = "lt_sft"  # composable sparse fine-tuning: a language SFT + a task SFT of the primary, no new embeddings
SPARSE_VOCAB = "lt_sft_vocab"  # LT-SFT over a new vocabulary: standard's embeddings plugged in + a language SFT
DISTILLED = "bistil"  # bilingual distillation: a student model per target language (minimodel/bistil/)


@dataclass(frozen=True)
class ModelSource:
    name: str
    # what adaptation learns per target language: "embeddings" (adapt/train.py, plugged into the primary), "sft" (a
    # language SFT, adapt/sft.py, of the primary read with its own tokenizer, or with builds_on of the primary with
    # that method's target embeddings plugged in read with the target tokenizer), "student" (a model of its own for
    # the (source, target) pair, adapt/distill.py, with a tokenizer per language); None: nothing
    learns: Literal["embeddings", "sft", "student"] | None
    description: str
    # embeddings: adapt/train.py's `over`, the primary itself (full) or a mini-model aligned with it (mini)
    over: Literal["full", "mini"] | None = None
    # the method whose final embeddings per language this one starts from by default (a spec's `@<method>` names
    # another), plugged into the primary masked LM (the pipeline's plug_mlm-<lang>); its compute counts in this one's
    # (`@lt_sft`, where allowed: lt_sft's language SFTs instead, applied to the primary)
    builds_on: str | None = None
    # whether `@lt_sft` may name lt_sft's language SFTs instead (applied to the primary, which reads every language)
    builds_on_sft: bool = False

    @property
    def adapted(self) -> bool:
        """Whether the method adapts to each target language (an adaptation stage); `none` does not: zero-shot
        scores the source model with its own tokenizer on the target text."""
        return self.learns is not None


MODELS: dict[str, ModelSource] = {m.name: m for m in (
    ModelSource("standard", "embeddings", "the primary model itself (standard adaptation)", "full"),
    ModelSource("minijoint", "embeddings", "the MiniJoint mini-model exported with the primary", "mini"),
    ModelSource("minipost", "embeddings", "the MiniPost mini-model built from the primary", "mini"),
    ModelSource(SPARSE, "sft", "sparse fine-tunings of the primary per language and for the task (LT-SFT)"),
    ModelSource(SPARSE_VOCAB, "sft", "LT-SFT over the target vocabulary: a language SFT of the primary with standard "
                "adaptation's embeddings, composed with lt_sft's task SFT", builds_on=REFERENCE),
    ModelSource(DISTILLED, "student", "a bilingual student per language distilled from the primary with standard "
                "adaptation's embeddings (BiStil)", builds_on=REFERENCE, builds_on_sft=True),
    ModelSource(BASELINE, None, "no adaptation: the primary as it is, its own tokenizer and embeddings"),
)}


@dataclass(frozen=True)
class Method:
    model: str  # a key of MODELS
    init: str | None = None  # a key of INITIALISERS; None: the adaptation config's init.method
    base: str | None = None  # the embedding method it builds on when not its model's default builds_on

    @property
    def name(self) -> str:
        return self.model + (f"@{self.base}" if self.base else "") + (f"+{self.init}" if self.init else "")

    @property
    def source(self) -> ModelSource:
        return MODELS[self.model]

    @property
    def builds_on(self) -> str | None:
        """The spec of the method whose final result per target this one starts from: an embedding method's target
        embeddings, or (bistil@lt_sft) lt_sft's language SFTs; None: none."""
        return self.base or self.source.builds_on

    @property
    def adapted(self) -> bool:
        return self.source.adapted

    @property
    def learns_embeddings(self) -> bool:
        return self.source.learns == "embeddings"

    @property
    def builds_on_sfts(self) -> bool:
        """Whether it builds on lt_sft's language SFTs (bistil@lt_sft) rather than on target embeddings."""
        return self.builds_on == SPARSE

    @property
    def plugs_embeddings(self) -> bool:
        """Whether it reads the primary with the target embeddings of `builds_on` plugged in (the pipeline's
        plug_mlm stages): lt_sft_vocab, bistil and their @<embedding method>s."""
        return self.builds_on is not None and not self.builds_on_sfts

    def rests_on_source_sft(self, task) -> bool:
        """Whether its results on `task` (a TaskSpec) rest on lt_sft's source-language SFT: bistil@lt_sft's always
        (its source teacher applies it), a sparse method's on fine-tuned tasks (the task SFT was trained with it
        applied; elsewhere zero-shot reads the primary + the target's SFT alone)."""
        return self.builds_on_sfts or (self.source.learns == "sft" and task.fine_tuned)

    @property
    def reads_plugged(self) -> bool:
        """Whether each target is read by the primary with the target embeddings of `builds_on` plugged in, with the
        target tokenizer (lt_sft_vocab: the model its language SFT is learned over and applied to)."""
        return self.source.learns == "sft" and self.builds_on is not None

    def scored_on(self, task) -> bool:
        """Whether zero-shot scores this method on a task (a TaskSpec): new embeddings on every task; a method read
        with another tokenizer (an SFT of the primary, a student, none) only where the metric compares tokenizers;
        a student, a model of its own per target language (source side included), only on fine-tuned tasks, where
        each target's model is scored on its own (retrieval and target_mlm read one source model for all)."""
        if self.source.learns == "student":
            return task.fine_tuned and task.compares_tokenizers
        return self.learns_embeddings or task.compares_tokenizers

    def adapt_overrides(self) -> list[str]:
        """adapt/train.py settings that make a run this method (the mini-model's path is the caller's)."""
        return [f"method={self.name}", f"over={self.source.over}",
                *([f"init.method={self.init}"] if self.init else [])]


def job_name(stage: str, method: str, default: str) -> str:
    """The name of a method's per-language stages as one job (`-<lang>` added: each stage's and its MLflow run's):
    `stage` for the stage's default method, else `<stage>-<method>` (e.g. distill-bistil@minijoint)."""
    return stage if method == default else f"{stage}-{method}"


def known_methods() -> str:
    building = ", ".join(m for m in MODELS if MODELS[m].builds_on)
    on_sft = ", ".join(f"{m}@{SPARSE}" for m in MODELS if MODELS[m].builds_on_sft)
    return (f"<model>[+<init>] with model one of {', '.join(MODELS)} and init one of {', '.join(INITIALISERS)} "
            f"(e.g. minipost+copy_shared), <model>@<embedding method> for {building} (e.g. bistil@minijoint), or "
            f"{on_sft}")


def parse_method(spec: str, key: str = "method") -> Method:
    """The method a spec names; for anything else a ConfigError naming the setting `key` and the known methods."""
    model, at, base = spec.partition("@")
    if at:  # the rest is the method it builds on, itself a spec (minijoint+ofa), or lt_sft
        if model not in MODELS or not MODELS[model].builds_on:
            raise ConfigError(f"{key}: {spec!r}: only {', '.join(m for m in MODELS if MODELS[m].builds_on)} build "
                              f"on another method's embeddings (<model>@<method>); methods are {known_methods()}")
        below = parse_method(base, key)
        if below.name == SPARSE and MODELS[model].builds_on_sft:
            return Method(model, base=SPARSE)
        if not below.learns_embeddings:
            also = f", or on {SPARSE}'s language SFTs ({model}@{SPARSE})" if MODELS[model].builds_on_sft else ""
            raise ConfigError(f"{key}: {spec!r}: {model} builds on the target embeddings of a method that learns "
                              f"them ({', '.join(m for m in MODELS if MODELS[m].learns == 'embeddings')}, with "
                              f"an optional +<init>){also}, not on {base!r}")
        if below.name == MODELS[model].builds_on:  # one name per method
            raise ConfigError(f"{key}: {spec!r} is written {model!r} ({model} builds on {below.name} by default)")
        return Method(model, base=below.name)
    model, plus, init = spec.partition("+")
    if model not in MODELS or (plus and init not in INITIALISERS):
        raise ConfigError(f"{key}: unknown method {spec!r}; methods are {known_methods()}")
    if plus and MODELS[model].learns != "embeddings":
        raise ConfigError(f"{key}: {spec!r}: method {model} learns no new embeddings, so it has no embedding "
                          f"initialisation: write {model}")
    return Method(model, init if plus else None)


def parse_method_of(spec: str, model: str, key: str = "method") -> Method:
    """parse_method, refusing a method of another model than `model` (a stage of that model's, e.g. BiStil's)."""
    method = parse_method(spec, key)
    if method.model != model:
        building = f" or {model}@<method it builds on>" if MODELS[model].builds_on else ""
        raise ConfigError(f"{key}: {spec} is not a {model} method: write {model}{building}")
    return method


def parse_adapted_method(spec: str, key: str = "method") -> Method:
    """parse_method, refusing `none` where a setting names what adaptation learned (adapt/train.py, the pipeline's
    methods, the report's reference)."""
    method = parse_method(spec, key)
    if not method.adapted:
        raise ConfigError(f"{key}: {spec!r} is the unadapted baseline, not an adaptation method: the pipeline "
                          f"evaluates it on its own and the report draws it as a line; name an adaptation method "
                          f"({', '.join(m for m in MODELS if MODELS[m].adapted)}, with an optional +<init>)")
    return method
