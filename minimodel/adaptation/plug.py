"""Step 4 of the method: put learned target-language embeddings into the primary model or a task model.

The result is a plain Hugging Face model directory (same class as the receiving model) with the target tokenizer:
input embeddings = the learned matrix; tied output embeddings follow; an untied output matrix or a trained LM-head
bias is taken from the adaptation when it has one; otherwise the receiving model's own LM-head bias is carried over
through the adaptation's token map (zeros for tokens that had no source row). Parameters of the embeddings module
that adaptation trained (e.g. position embeddings) are installed too; a trained LM-head transform only when the
adaptation ran over this very model (over=full) and the receiving model has that head.

Refused, with the reason: a tokenizer that is not the one the embeddings were learned for; a hidden size that
differs; a primary model other than the one the adaptation (or its mini-model) is aligned with.

`plug` writes the plugged model directory (adapt/plug.py); `plug_model` does the same swap in memory, on a model
already loaded (zero-shot evaluation of an adaptation's snapshots): one code path for both.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from minimodel.adaptation.artifact import read_artifact, tokenizer_dir as artifact_tokenizer
from minimodel.adaptation.vocab import install_vocabulary
from minimodel.data.tokenizer import tokenizer_fingerprint
from minimodel import faults
from minimodel.config import require, save_config
from minimodel.errors import UserError
from minimodel.files import replace_dir
from minimodel.hf import load_model, load_tokenizer
from minimodel.layout import TASK_FILE
from minimodel.manifest import ManifestError, check_aligned, model_hash
from minimodel.provenance import claim_output, finish_output, keep_claim
from minimodel.stages import StageResult
from minimodel.training.hf_mlm import mlm_head, save_tokenizer_beside

log = logging.getLogger(__name__)

PLUG_FILE = "plug.json"  # what `plug` records in a plugged model directory (plugged_info reads it)


class PlugError(UserError):
    pass


@dataclass
class PlugConfig:
    embeddings: str | None = None  # an adaptation run dir <adapt output_dir>/<target_lang>, or a snapshot of it
    model: str | None = None  # the receiving HF model dir: the primary model or a task model fine-tuned from it
    primary_model: str | None = None  # the primary model `model` was fine-tuned from; None: `model` is the primary
    tokenizer: str | None = None  # None: <embeddings>/tokenizer (a snapshot's: its run's)
    output_dir: str | None = None  # the new HF model dir (replaced atomically)

    def validate(self) -> None:
        for key in ("embeddings", "model", "output_dir"):
            require(getattr(self, key) is not None, key, "is required (adapt/plug.py embeddings=... model=... "
                    "output_dir=...)")


def check_compatible(info: dict, model, model_dir: str, primary_dir: str, tokenizer,
                     primary_sha: str | None = None) -> None:
    """Raise PlugError / ManifestError naming the mismatch, if any. `primary_sha`: model_hash(primary_dir), if
    the caller already has it."""
    vocab, hidden = info["vocab_size"], info["hidden_size"]
    if len(tokenizer) != vocab or tokenizer_fingerprint(tokenizer) != info["tokenizer_sha256"]:
        raise PlugError(
            f"the tokenizer ({len(tokenizer)} tokens) is not the one the embeddings were learned with ({vocab} "
            f"tokens, fingerprint {info['tokenizer_sha256'][:12]}): use the tokenizer/ directory saved beside them")
    if model.config.hidden_size != hidden:
        raise PlugError(f"shape mismatch: the embeddings are {vocab} x {hidden} but {model_dir} has hidden size "
                        f"{model.config.hidden_size}: they belong to another model")
    if info["over"] == "mini" and Path(info["adapted_model"]).is_dir():
        check_aligned(info["adapted_model"], primary_dir)  # the mini-model's own word, when it is still there
    expected = info["primary_model"]["sha256"]
    task_file = Path(model_dir) / TASK_FILE
    tuned_from = json.loads(task_file.read_text()).get("primary_model") if task_file.is_file() else None
    if tuned_from and tuned_from["sha256"] != expected:  # a task model: its own record of its primary
        raise ManifestError(
            f"{model_dir} was fine-tuned from {tuned_from['path']} (sha256 {tuned_from['sha256'][:12]}, its "
            f"{TASK_FILE}), but the embeddings were learned for {info['primary_model']['path']} (sha256 "
            f"{expected[:12]}): plug them into a task model fine-tuned from that primary")
    actual = primary_sha or model_hash(primary_dir)
    if actual != expected:
        learned_over = "its mini-model is" if info["over"] == "mini" else "they were learned over the model"
        raise ManifestError(
            f"the embeddings in question were learned for the primary model {info['primary_model']['path']} "
            f"(sha256 {expected[:12]}; {learned_over} aligned with it), not for {primary_dir} (sha256 "
            f"{actual[:12]}): plug them into that model or a task model fine-tuned from it (primary_model=...)")


def plug_model(model, embeddings: str | os.PathLike, *, model_dir: str, primary_dir: str | None = None,
               tokenizer_dir: str | os.PathLike | None = None, primary_sha: str | None = None):
    """Swap the learned embeddings of the artifact `embeddings` into `model` (loaded from `model_dir`, fine-tuned
    from `primary_dir`, default: it is the primary) in place, after checking they belong together.
    Returns (the target tokenizer, its directory, the artifact's adapt.json)."""
    tensors, info = read_artifact(embeddings)
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else artifact_tokenizer(embeddings)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_compatible(info, model, model_dir, primary_dir or model_dir, tokenizer, primary_sha)

    if "coordinates" in tensors:  # factorised (minimodel/ofa/factorized.py): a plain model gets E = C P
        tensors["input_embeddings"] = tensors.pop("coordinates") @ tensors.pop("primitives")
    out = model.get_output_embeddings()
    install_vocabulary(model, tensors["input_embeddings"], tensors["token_map"], info["pad_token_id"],
                       output_weight=tensors.get("output_embeddings", tensors["input_embeddings"]) if out is not None
                       else None,  # untied, yet learned tied: the learned rows are the output's too
                       output_bias=tensors.get("output_bias") if out is not None else None)
    embeddings_module = dict(model.base_model.embeddings.named_parameters())
    head_params = {}
    if out is not None and info["over"] == "full":
        head_params = dict(mlm_head(model).named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            group, _, name = key.partition(".")
            target = {"embeddings": embeddings_module, "head": head_params}.get(group, {}).get(name)
            if group == "head" and target is None:
                log.warning("%s was trained over another model's LM head: not installed", key)
            if target is not None:
                if target.shape != value.shape:
                    raise PlugError(f"shape mismatch for {key}: {tuple(value.shape)} learned, "
                                    f"{tuple(target.shape)} in {model_dir}")
                target.copy_(value)
    return tokenizer, tokenizer_dir, info


def plugged_info(model_dir: str | os.PathLike) -> dict | None:
    """`plug`'s record in a plugged model directory ({"primary_model": {"path", "sha256"}, "method", "target_lang",
    "adapt_run_id", ...}); None for a model that was not plugged."""
    path = Path(model_dir) / PLUG_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def plug(cfg: PlugConfig) -> StageResult:
    """Outputs: the plugged model's directory."""
    model = load_model(cfg.model)  # the class its config.json names: a masked LM or a task model
    tokenizer, tokenizer_dir, info = plug_model(model, cfg.embeddings, model_dir=cfg.model,
                                                primary_dir=cfg.primary_model, tokenizer_dir=cfg.tokenizer)
    claim_output(cfg.output_dir, cfg, resumable=False)  # after the input checks: a refusal writes nothing

    output_dir = Path(cfg.output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.with_name(f".{output_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    model.save_pretrained(tmp)
    save_tokenizer_beside(model, tokenizer, tokenizer_dir, tmp)
    if (Path(cfg.model) / TASK_FILE).is_file():  # a task model's task, labels and primary stay with it
        shutil.copyfile(Path(cfg.model) / TASK_FILE, tmp / TASK_FILE)
    (tmp / PLUG_FILE).write_text(json.dumps({
        "embeddings": str(Path(cfg.embeddings).resolve()), "model": str(Path(cfg.model).resolve()),
        "primary_model": info["primary_model"], "target_lang": info["target_lang"], "method": info["method"],
        "over": info["over"], "adapt_run_id": info.get("adapt_run_id"), "adapt_steps": info.get("steps")}, indent=2))
    save_config(cfg, tmp / "plug_config.yaml")
    faults.point("write")
    keep_claim(output_dir, tmp)
    replace_dir(tmp, output_dir)
    finish_output(output_dir, cfg)
    return StageResult("finished", {"plugged": output_dir})
