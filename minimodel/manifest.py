"""The mini-model manifest: which primary model a mini-model is aligned with.

A mini-model directory (Hugging Face format) carries `minimodel.json`:
    {"kind": "minijoint" | "minipost", "layers": k, "primary_model": {"path": ..., "sha256": ...},
     "new_parameters": [...], "tokenizer": ...}
Embeddings learned over a mini-model only make sense inside the primary model it was aligned with, so adaptation
and plugging call `check_aligned` and refuse a mismatch.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from minimodel.errors import UserError
from minimodel.files import files_under, write_text_atomic

MANIFEST_NAME = "minimodel.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_hashes: dict[tuple, str] = {}  # _remembered's: (names, (path, inode, size, mtime) of each file) -> sha256
_SETTLED_NS = 2_000_000_000  # files unchanged for this long are remembered by _remembered


class ManifestError(UserError):
    pass


def _weight_files(model_dir: Path) -> list[Path]:
    """The files transformers loads the weights from: the safetensors ones where there are any (a hub download often
    holds pytorch_model.bin too), else the .bin ones; never a trainer's state (optimizer, scheduler, RNG, args)."""
    found = [p for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES
             and not any(state in p.name for state in ("optimizer", "scheduler", "rng_state", "training_args"))]
    safetensors = [p for p in found if p.suffix == ".safetensors"]
    return sorted(safetensors or found)


def model_hash(model_dir: str | os.PathLike) -> str:
    """sha256 over a Hugging Face model directory's weight files (names and bytes, in sorted order)."""
    model_dir = Path(model_dir)
    files = _weight_files(model_dir)
    if not files:
        raise ManifestError(f"{model_dir} holds no weight files (*.safetensors / *.bin): is it a model directory?")
    return _remembered(files, [path.name for path in files])


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (a corpus, word vectors), remembered as model_hash's."""
    return _remembered([Path(path)], None)


def directory_sha256(directory: str | os.PathLike) -> str:
    """sha256 over every file under `directory` (a task's data: relative paths and bytes, in sorted order),
    remembered as model_hash's."""
    directory = Path(directory)
    files = files_under(directory)
    return _remembered(files, [str(path.relative_to(directory)) for path in files])


def _remembered(files: list[Path], names: list[str] | None) -> str:
    """sha256 over `files` (each one's name in `names` before its bytes), remembered per process while every file
    keeps its inode, size and mtime: a stage checks one model several times (each SFT's base, each teacher), and a
    large model's (or corpus') bytes take seconds to read."""
    now = time.time_ns()
    stats = [path.stat() for path in files]
    key = (None if names is None else tuple(names),
           *((str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns) for path, st in zip(files, stats)))
    if key in _hashes:
        return _hashes[key]
    digest = hashlib.sha256()
    for i, path in enumerate(files):
        if names is not None:
            digest.update(names[i].encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    # a file written moments ago could be rewritten within its mtime's granularity unseen (git's "racy" case)
    if now - max((st.st_mtime_ns for st in stats), default=0) > _SETTLED_NS:
        _hashes[key] = digest.hexdigest()
    return digest.hexdigest()


def write_manifest(mini_dir: str | os.PathLike, kind: str, layers: int, primary_dir: str | os.PathLike,
                   **extra: Any) -> Path:
    primary_dir = Path(primary_dir).resolve()
    data = {"kind": kind, "layers": layers,
            "primary_model": {"path": str(primary_dir), "sha256": model_hash(primary_dir)}, **extra}
    path = Path(mini_dir) / MANIFEST_NAME
    return write_text_atomic(path, json.dumps(data, indent=2))


def read_manifest(mini_dir: str | os.PathLike) -> dict | None:
    path = Path(mini_dir) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def check_aligned(mini_dir: str | os.PathLike, primary_dir: str | os.PathLike) -> dict:
    """Raise ManifestError unless `mini_dir` is a mini-model aligned with the model in `primary_dir`."""
    manifest = read_manifest(mini_dir)
    if manifest is None:
        raise ManifestError(
            f"{mini_dir} has no {MANIFEST_NAME}: it is not a mini-model built by pretrain/export.py or "
            f"pretrain/minipost.py, so its alignment with {primary_dir} cannot be checked")
    expected = manifest["primary_model"]["sha256"]
    actual = model_hash(primary_dir)
    if expected != actual:
        raise ManifestError(
            f"mini-model {mini_dir} is aligned with {manifest['primary_model']['path']} (sha256 {expected[:12]}), "
            f"not with {primary_dir} (sha256 {actual[:12]}): plug its embeddings into the primary model it was "
            f"built from, or build a mini-model from this one")
    return manifest
