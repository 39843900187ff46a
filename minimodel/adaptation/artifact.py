"""What an adaptation run leaves for plugging, in `<output_dir>/<target_lang>/`:

    embeddings.safetensors  "input_embeddings" [V, h] fp32; "token_map" [V] int64 (the source row each target row
                            was initialised from, -1 if none: plug carries the LM-head bias over through it);
                            "output_embeddings" [V, h] only for untied models; "output_bias" [V] only if the bias
                            was trained; "embeddings.<name>" / "head.<name>" for any other parameter the config
                            made trainable (names relative to base_model.embeddings / the LM head); factorised
                            (embedding.factorized_dim=d): "coordinates" [V, d] and "primitives" [d, h] instead of
                            "input_embeddings" (plug installs their product)
    tokenizer/              the target-language Hugging Face tokenizer the rows belong to
    adapt.json              provenance: primary model (path + sha256), over mini|full, tokenizer fingerprint, shapes,
                            steps and compute spent (flops, wall_clock_s), the MLflow run (adapt_run_id); written
                            last, so its presence means the run completed
    snapshots/step_<N>/     the same artifact (embeddings.safetensors + adapt.json, no tokenizer/: the run's) at
                            step 0 (the initial embeddings, compute 0) and every `snapshot_every` steps, "steps" = N
                            and the compute spent up to step N: the points of the compute-vs-quality curve
                            (evaluate/zero_shot.py evaluates them)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from minimodel import faults
from minimodel.errors import MissingInputError
from minimodel.files import write_text_atomic

EMBEDDINGS_FILE = "embeddings.safetensors"
INFO_FILE = "adapt.json"
TOKENIZER_DIR = "tokenizer"
SNAPSHOTS_DIR = "snapshots"


def write_artifact(run_dir: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Each file replaced atomically, adapt.json last: a reader that finds adapt.json finds its embeddings."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (EMBEDDINGS_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, run_dir / EMBEDDINGS_FILE)
    faults.point("snapshot", info.get("steps"))
    write_text_atomic(run_dir / INFO_FILE, json.dumps(info, indent=2))


def read_info(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_artifact(run_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    run_dir = Path(run_dir)
    info = read_info(run_dir)
    if info is None or not (run_dir / EMBEDDINGS_FILE).is_file():
        raise MissingInputError(
            f"{run_dir} holds no completed adaptation ({EMBEDDINGS_FILE} + {INFO_FILE}): point at "
            f"<adapt output_dir>/<target_lang> of a finished `adapt/train.py` run")
    return load_file(str(run_dir / EMBEDDINGS_FILE)), info


def snapshot_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / SNAPSHOTS_DIR / f"step_{step}"


def list_snapshots(run_dir: str | os.PathLike) -> list[Path]:
    """The completed snapshots of an adaptation run (those with adapt.json), in step order."""
    found = [d for d in (Path(run_dir) / SNAPSHOTS_DIR).glob("step_*")
             if d.name[5:].isdigit() and (d / INFO_FILE).is_file()]
    return sorted(found, key=lambda d: int(d.name[5:]))


def tokenizer_dir(artifact_dir: str | os.PathLike) -> Path:
    """The tokenizer the rows of an artifact belong to: its own tokenizer/, for a snapshot its run's."""
    artifact_dir = Path(artifact_dir)
    if artifact_dir.parent.name == SNAPSHOTS_DIR and not (artifact_dir / TOKENIZER_DIR).is_dir():
        return artifact_dir.parent.parent / TOKENIZER_DIR
    return artifact_dir / TOKENIZER_DIR
