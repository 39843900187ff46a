"""Typed configuration: dataclasses loaded from YAML with `key.sub=value` command-line overrides.

Every stage declares its config as a (nested) dataclass. `load_config` merges, in order: the dataclass defaults,
the YAML file, and the overrides; it checks every key and type and then calls each dataclass's `validate()` (if it
has one) so impossible combinations fail at start-up with the offending key in the message. `save_config` writes
the resolved config next to a run's outputs.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from minimodel.errors import UserError
from minimodel.files import write_text_atomic

T = TypeVar("T")


class ConfigError(UserError):
    """A configuration problem; the message names the key and how to fix it (`key`: that key, where one is named)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


@dataclasses.dataclass(frozen=True)
class _CommandLineScalar:
    """A key=value override: parsed as YAML, with its text kept for str fields (run id 0123 is not the int 83, a
    run name "ablation #3" has no YAML comment in it, "2024-05-01" is no date). `error`: YAML refused the text
    (e.g. "*.txt"), which matters only for a field that is not a string."""
    text: str
    value: Any
    error: str | None = None

# What YAML 1.1 reads as something other than a string where a string is meant (e.g. language code `no`).
_QUOTE_IT = "YAML reads no/yes/on/off/true/false as booleans and bare digits as numbers: quote it, e.g. 'no'"


def _coerce(value: Any, tp: Any, key: str, default: Any = None) -> Any:
    """Check `value` against the annotation `tp` (converting where lossless, e.g. int -> float). A mapping for a
    dataclass field updates the field's `default` (a section given in part keeps the stage's other defaults)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _CommandLineScalar):
        if tp is str or (origin in (Union, types.UnionType) and str in args):
            text = value.text
            if text == "None" and type(None) in args:  # Python's spelling: YAML reads the text "None"
                raise ConfigError(f"{key}=None: write {key}=null for no value (None is the text 'None'; quote it "
                                  "to mean that)")
            quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and isinstance(value.value, str)
            value = value.value if quoted or (value.value is None and value.error is None and text) else text
        elif value.error is not None:
            raise ConfigError(f"bad override {key}={value.text}: value is not valid YAML ({value.error})")
        else:
            value = value.value
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        detail = f" ({errors[0]})" if len(errors) == 1 else ""  # one alternative (X | None): its own reason
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}{detail}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_tp, val_tp = args if len(args) == 2 else (Any, Any)
        for k in value:
            if key_tp is str and not isinstance(k, str):
                raise ConfigError(f"{key}: key {k!r} is not a string ({_QUOTE_IT})")
        return {k: _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, default if isinstance(default, tp) else None)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf passes `lr > 0`, nan every comparison's negation
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            hint = f" ({_QUOTE_IT})" if isinstance(value, (bool, int, float)) else ""
            raise ConfigError(f"{key}: expected a string, got {value!r}{hint}")
        # a path under the home directory: a shell expands `key=~/x` only at the start of a word, YAML never
        return os.path.expanduser(value) if value.startswith("~") else value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _build(cls: type[T], data: dict, prefix: str = "", base: T | None = None) -> T:
    """`cls` from `data`; keys absent from `data` take their values from `base`, else the field defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = set(fields)
    unknown = sorted(map(str, set(data) - names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]} (valid keys{' of ' + prefix if prefix else ''}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name in names:
        default = getattr(base, name) if base is not None else None
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            if default is None and dataclasses.is_dataclass(hints[name]):
                default = _field_default(fields[name])
            kwargs[name] = _coerce(data[name], hints[name], key, default)
        elif base is not None:
            kwargs[name] = default
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    old = node.get(parts[-1])  # a section given after some of its keys keeps them (train.seed=7 train={steps: 5})
    node[parts[-1]] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ["a.b=1", "c=[x, y]"] into a nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"bad override {item!r}: write it as key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:  # an error only if the field is not a string (see _coerce)
            value = _CommandLineScalar(raw, None, str(e).replace("\n", " "))
        if not isinstance(value, (dict, list, _CommandLineScalar)):
            value = _CommandLineScalar(raw, value)
        _set_path(tree, key.strip(), value)
    return tree


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _validate(obj: Any, path: str = "") -> None:
    """Every dataclass's validate(), nested ones first (those in lists and mappings too); `path`: where `obj` is,
    e.g. "init.ofa.", which a nested section's message gets in front of its key unless it names it in full."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _validate_section(value, f"{path}{f.name}.")
        items = enumerate(value) if isinstance(value, list) else value.items() if isinstance(value, dict) else ()
        for k, item in items:
            if dataclasses.is_dataclass(item):
                _validate_section(item, f"{path}{f.name}[{k}]." if isinstance(value, list) else f"{path}{f.name}.{k}.")
    if hasattr(obj, "validate"):
        obj.validate()


def _validate_section(section: Any, path: str) -> None:
    try:
        _validate(section, path)
    except ConfigError as e:
        if str(e).startswith(path):
            raise
        raise ConfigError(f"{path}{e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (the later one would silently
    replace the whole earlier section)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged by the safe loader itself
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _settings(path: str | os.PathLike | None, overrides: list[str] | None) -> dict:
    """A config file's mapping (none: {}) with `overrides` applied, as load_config reads them."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {path} {what} (see configs/ for the shipped ones)")
        try:
            data = copy.deepcopy(_parsed_yaml(path.read_text())) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return _merge(data, parse_overrides(overrides or []))


@functools.lru_cache(maxsize=256)
def _parsed_yaml(text: str) -> Any:
    """A config file's text parsed, once per process and content: a pipeline reads each of its config files dozens of
    times as it validates and hashes its stages (each caller gets a copy: nothing it changes reaches the next)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    cfg = _build(cls, _settings(path, overrides))
    _validate(cfg)
    return cfg


def build_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """load_config without the config's own validation (which needs its inputs: a pipeline's results that do not
    exist yet, the data a finished run read): still a ConfigError for a key `cls` lacks or a value of the wrong
    type."""
    return _build(cls, _settings(path, overrides))


def setting(path: str | os.PathLike | None, overrides: list[str], key: str, default: Any = None) -> Any:
    """The value dotted `key` has in the config file `path` (None: no file) with `overrides` applied, as a stage reads
    them (a section given whole included: task={name: xnli}); `default` where neither sets it."""
    value: Any = _settings(path, overrides)
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(value, dict):
            section = ".".join(parts[:i]) or "the file"
            raise ConfigError(f"{path or 'overrides'}: {section} must be a mapping (of {part}: ...), not {value!r}")
        if value.get(part) is None:
            return default
        value = value[part]
    return _as_read(value)


def _as_read(value: Any) -> Any:
    """A setting's value: an override's parsed value (its text where YAML refused it)."""
    if isinstance(value, _CommandLineScalar):
        return value.text if value.error is not None else value.value
    return value


def settings(path: str | os.PathLike | None, overrides: list[str]) -> dict[str, Any]:
    """Every value the config file `path` (None: no file) with `overrides` applied sets, under its dotted key (a list
    item under its index: `targets[0].model_dir`), as a stage reads them."""
    leaves = flatten(_settings(path, overrides), lists=True)
    return {key: _as_read(value) for key, value in leaves.items()}


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically."""
    return write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flatten(value: Any, *, lists: bool = False) -> dict[str, Any]:
    """Every leaf of nested mappings under its dotted key: {"a": {"b": 1}, "c": [2, {"d": 3}]} -> {"a.b": 1,
    "c": [2, {"d": 3}]}. With `lists`, list (and tuple) items are leaves too, under an index: {"a.b": 1, "c[0]": 2,
    "c[1].d": 3}. A config as MLflow params (a list is one param) or as a provenance record (lists=True: a change
    names the item). An empty mapping or list has no leaves."""
    out: dict[str, Any] = {}

    def walk(v: Any, key: str) -> None:
        if isinstance(v, dict):
            for k, item in v.items():
                walk(item, f"{key}.{k}" if key else str(k))
        elif lists and isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                walk(item, f"{key}[{i}]")
        else:
            out[key] = v

    walk(value, "")
    return out


def require(condition: bool, key: str, message: str) -> None:
    """Raise a ConfigError naming `key` unless `condition` holds; for validate() methods."""
    if not condition:
        raise ConfigError(f"{key}: {message}", key)


class PerLanguageRun:
    """For configs of stages run once per target language over masked-LM text (adaptation, language SFT,
    distillation): their fields `target_langs`, `target_lang` (one of them: a Slurm array task), `seq_length` and
    `mask_prob` are checked, and the languages to run are listed, in one place."""

    def validate_languages(self) -> None:
        require(bool(self.target_langs), "target_langs", "is empty: list at least one target language")
        require(self.target_lang is None or self.target_lang in self.target_langs, "target_lang",
                f"{self.target_lang!r} is not one of target_langs {self.target_langs}")
        require(self.seq_length >= 8, "seq_length", "must be >= 8")
        require(0 < self.mask_prob < 1, "mask_prob", "must be in (0, 1)")

    def languages(self) -> list[str]:
        return [self.target_lang] if self.target_lang else list(self.target_langs)

    def require_language_of(self, key: str, artifact: str, held: str | None, langs: list[str] | None = None) -> None:
        """Refuse `key`, naming one language's artifact (`artifact`: "<path> holds the embeddings of"), unless every
        language it is read for (`langs`; default: the languages this run learns) is the one it holds."""
        langs = self.languages() if langs is None else langs
        others = [lang for lang in langs if lang != held]
        require(not others, key, f"{artifact} {held}, not of {', '.join(others)}" +
                (": run each target language with its own" if len(langs) > 1 else ""))

    def neutral_keys(self) -> tuple[str, ...]:
        """The config keys one language's result does not depend on (provenance.claim_output's `ignore`): a
        language's run is the same whichever other languages the stage (or its array job) lists."""
        return "target_langs", "target_lang"


def parse_cli(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """`script.py --config file.yaml key.sub=value ...` -> a validated config of type `cls`.

    Exits with the ConfigError's message (status 2) instead of a traceback, since it is the user's input.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_intermixed_args(argv)  # overrides before and after --config alike
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
