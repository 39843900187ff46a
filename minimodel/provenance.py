"""Whether a stage's output directory holds a result of *this* config: one record per output directory.

Every stage function calls `claim_output(output_dir, cfg, ...)` before it writes anything and
`finish_output(output_dir, cfg)` once its result is complete. The record (`.minimodel-config.json`, written
atomically) holds the config that made the directory, minus the keys that do not change the result (NEUTRAL_KEYS:
tracking, output_dir, overwrite, plus the stage's own), and the records of the inputs it read (any config value
naming a path at or under another stage's output directory): so a result is "of this config" only if it was made
from the same upstream results too.

    same config and inputs, finished   -> "finished" (a training stage skips or resumes to the end: a no-op)
    same config and inputs, unfinished -> "resume"
    no record and nothing there        -> "new"
    another config, or files without a record (unknown config):
        resumable stages (checkpoints: pretrain, minipost, adapt, finetune): UserError naming the differing keys
        and the fix, unless `overwrite` (then the directory is emptied first: "new")
        other stages (replace their outputs atomically, whole: data, export, plug, zero_shot, report): "new",
        the change honoured by redoing them
Never a silent skip: a stage may skip only on "finished".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable, Literal

import torch.distributed as dist

from minimodel.errors import UserError
from minimodel.files import write_text_atomic

log = logging.getLogger(__name__)

RECORD = ".minimodel-config.json"
# Keys whose value does not change a stage's result (where it logs, where it writes, whether it may replace).
NEUTRAL_KEYS = ("tracking", "output_dir", "overwrite")

Claim = Literal["new", "resume", "finished"]


class ConfigChanged(UserError):
    """The output directory holds a result (or a partial run) of another config."""


def _leaves(value: Any, key: str = "") -> Iterable[tuple[str, Any]]:
    """("a.b", 1), ("c[0].d", "x"), ...: every scalar of a nested dict/list, under its dotted key."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{key}[{i}]")
    else:
        yield key, value


def _neutral(key: str, ignore: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith((f"{n}.", f"{n}[")) for n in (*NEUTRAL_KEYS, *ignore))


def read(path: str | Path) -> dict | None:
    try:
        return json.loads((Path(path) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def identity(path: str | Path) -> str | None:
    """The digest of the finished stage result `path` lies in (the nearest record at or above it), "unfinished"
    if that stage has not finished, None if no stage made it (e.g. a model or corpus the user brought)."""
    path = Path(path).absolute()
    for directory in (path, *path.parents):
        record = read(directory)
        if record is not None:
            return record["digest"] if record["status"] == "finished" else "unfinished"
    return None


def fingerprint(cfg: Any, ignore: tuple[str, ...] = ()) -> dict:
    """{"config": {dotted key: value}, "inputs": {dotted key: identity}, "digest"}: what decides the result."""
    config = {k: v for k, v in _leaves(dataclasses.asdict(cfg)) if not _neutral(k, ignore)}
    inputs = {}
    for key, value in config.items():
        if isinstance(value, str) and value and ("/" in value or Path(value).exists()):
            found = identity(value)
            if found is not None:
                inputs[key] = found
    digest = hashlib.sha256(json.dumps([config, inputs], sort_keys=True, default=str).encode()).hexdigest()
    return {"config": config, "inputs": inputs, "digest": digest}


def differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for each config key and input that differs."""
    old_config, new_config = old.get("config", {}), new["config"]
    lines = [f"{key}: {old_config.get(key, '(unset)')!r} -> {new_config.get(key, '(unset)')!r}"
             for key in sorted(set(old_config) | set(new_config)) if old_config.get(key) != new_config.get(key)]
    old_inputs, new_inputs = old.get("inputs", {}), new["inputs"]
    lines += [f"{key}: {new_config.get(key)} was made again since"
              for key in sorted(set(old_inputs) | set(new_inputs))
              if old_inputs.get(key) != new_inputs.get(key) and old_config.get(key) == new_config.get(key)]
    return lines


def _write(output_dir: Path, fingerprint_: dict, status: str) -> None:
    write_text_atomic(output_dir / RECORD, json.dumps({**fingerprint_, "status": status}, indent=1, default=str))


def claim_output(output_dir: str | Path, cfg: Any, *, resumable: bool, overwrite: bool = False,
                 ignore: tuple[str, ...] = ()) -> Claim:
    """Decide what `output_dir` holds for `cfg` (see the module doc) and record `cfg` as its config (status
    "started"). Raises ConfigChanged for a resumable stage whose directory holds another config's result or
    partial run, unless `overwrite`. Under torch.distributed, rank 0 decides and writes and every rank returns
    (or raises) the same; call it on rank 0 only before the process group is up."""
    if not dist.is_initialized():
        return _claim(Path(output_dir), fingerprint(cfg, ignore), resumable, overwrite)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = _claim(Path(output_dir), fingerprint(cfg, ignore), resumable, overwrite)
        except ConfigChanged as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], ConfigChanged):
        raise box[0]
    return box[0]


def _claim(output_dir: Path, new: dict, resumable: bool, overwrite: bool) -> Claim:
    old = read(output_dir)
    if old is not None and old["digest"] == new["digest"]:
        return "finished" if old["status"] == "finished" else "resume"
    holds_files = output_dir.is_dir() and any(p.name != RECORD for p in output_dir.iterdir())
    if resumable and (old is not None or holds_files):
        what = "files of a run whose config is unknown (no record)" if old is None else \
            f"{'a finished result' if old['status'] == 'finished' else 'a partial run'} of another config"
        if not overwrite:
            changed = "; ".join(differences(old, new)) if old is not None else f"no {RECORD}"
            raise ConfigChanged(
                f"{output_dir} holds {what} ({changed}): its checkpoints and results are not this config's. Use a "
                f"new output_dir to keep both, or pass overwrite=true to discard the old one")
        log.warning("%s: discarding %s (overwrite=true)", output_dir, what)
        shutil.rmtree(output_dir)
    elif old is not None:
        log.info("%s: config changed (%s): redoing it", output_dir, "; ".join(differences(old, new)))
    _write(output_dir, new, "started")
    return "new"


def finish_output(output_dir: str | Path, cfg: Any, ignore: tuple[str, ...] = ()) -> None:
    """Record `cfg`'s result in `output_dir` as complete (call it on one rank, after the last file is written).
    Written afresh, not updated: a stage may have replaced its whole output directory (plug); left alone when it
    already says so (a no-op rerun changes nothing)."""
    new, old = fingerprint(cfg, ignore), read(output_dir)
    if old is None or (old["digest"], old["status"]) != (new["digest"], "finished"):
        _write(Path(output_dir), new, "finished")
