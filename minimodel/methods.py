"""Adaptation methods as entries: which model the target embeddings are learned over, plus adaptation options.

A method is written as a spec `<model>[+<init>]`:
- `<model>` (MODELS): where the model for adaptation comes from: `standard` (the primary model itself, the baseline
  every other method is measured against), `minijoint` (the MiniJoint mini-model the export splits off the primary),
  `minipost` (the MiniPost mini-model built from the primary);
- `+<init>`: the initialisation of the new embedding matrix, one of adaptation/vocab.py's INITIALISERS (e.g.
  `minipost+copy_shared`); without it, the adaptation config's `init.method`.
So `methods: [standard, minipost, minipost+copy_shared]` runs three adaptations per language side by side. The spec is
the method's name everywhere: pipeline stage names, output directories, adapt.json, zero-shot results and the report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from minimodel.adaptation.vocab import INITIALISERS
from minimodel.config import ConfigError

REFERENCE = "standard"  # the report's reference: every method's compute is compared to this one's


@dataclass(frozen=True)
class ModelSource:
    name: str
    over: Literal["full", "mini"]  # adapt/train.py's `over`: the primary itself, or a mini-model aligned with it
    description: str


MODELS: dict[str, ModelSource] = {m.name: m for m in (
    ModelSource("standard", "full", "the primary model itself (standard adaptation)"),
    ModelSource("minijoint", "mini", "the MiniJoint mini-model exported with the primary"),
    ModelSource("minipost", "mini", "the MiniPost mini-model built from the primary"),
)}


@dataclass(frozen=True)
class Method:
    model: str  # a key of MODELS
    init: str | None = None  # a key of INITIALISERS; None: the adaptation config's init.method

    @property
    def name(self) -> str:
        return self.model if self.init is None else f"{self.model}+{self.init}"

    @property
    def source(self) -> ModelSource:
        return MODELS[self.model]

    def adapt_overrides(self) -> list[str]:
        """adapt/train.py settings that make a run this method (the mini-model's path is the caller's)."""
        return [f"method={self.name}", f"over={self.source.over}",
                *([f"init.method={self.init}"] if self.init else [])]


def known_methods() -> str:
    return (f"<model>[+<init>] with model one of {', '.join(MODELS)} and init one of {', '.join(INITIALISERS)} "
            f"(e.g. minipost+copy_shared)")


def parse_method(spec: str, key: str = "method") -> Method:
    """The method a spec names; for anything else a ConfigError naming the setting `key` and the known methods."""
    model, plus, init = spec.partition("+")
    if model not in MODELS or (plus and init not in INITIALISERS):
        raise ConfigError(f"{key}: unknown method {spec!r}; methods are {known_methods()}")
    return Method(model, init if plus else None)
