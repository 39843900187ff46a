"""What an adaptation run leaves for plugging, in `<output_dir>/<target_lang>/`:

    embeddings.safetensors  "input_embeddings" [V, h] fp32; "token_map" [V] int64 (the source row each target row
                            was initialised from, -1 if none: plug carries the LM-head bias over through it);
                            "output_embeddings" [V, h] only for untied models; "output_bias" [V] only if the bias
                            was trained; "embeddings.<name>" / "head.<name>" for any other parameter the config
                            made trainable (names relative to base_model.embeddings / the LM head)
    tokenizer/              the target-language Hugging Face tokenizer the rows belong to
    adapt.json              provenance: primary model (path + sha256), over mini|full, tokenizer fingerprint, shapes,
                            compute spent; written last, so its presence means the run completed
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

EMBEDDINGS_FILE = "embeddings.safetensors"
INFO_FILE = "adapt.json"
TOKENIZER_DIR = "tokenizer"


def write_artifact(run_dir: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    from safetensors.torch import save_file

    tmp = run_dir / (EMBEDDINGS_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, run_dir / EMBEDDINGS_FILE)
    tmp = run_dir / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / INFO_FILE)


def read_info(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def read_artifact(run_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    info = read_info(run_dir)
    if info is None or not (run_dir / EMBEDDINGS_FILE).is_file():
        raise FileNotFoundError(
            f"{run_dir} holds no completed adaptation ({EMBEDDINGS_FILE} + {INFO_FILE}): point at "
            f"<adapt output_dir>/<target_lang> of a finished `adapt/train.py` run")
    return load_file(str(run_dir / EMBEDDINGS_FILE)), info
