"""Task models on the Hugging Face side: load from any BERT-class masked-LM or task directory, freeze the token
embeddings, check that a tokenizer fits a model's embeddings, and run batched inference.

A task model directory (written by fine-tuning) holds the HF model, the source tokenizer and `task.json`
({"task", "kind", "labels", "source_lang", "max_length", ...}); plugging target embeddings into it (adapt/plug.py)
keeps `task.json`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import (AutoModel, AutoModelForQuestionAnswering,
                          AutoModelForSequenceClassification)

from minimodel.adaptation.plug import plugged_info
from minimodel.evaluation import EvaluationError
from minimodel.files import replace_dir
from minimodel.hf import embeddings_fit, is_tokenizer_dir, load_masked_lm, load_model, load_tokenizer
from minimodel.layout import STUDENT_TARGET_TOKENIZER, TASK_FILE
from minimodel.manifest import model_hash
from minimodel.sft.file import SparseFineTuning



class TokenizerMismatchError(EvaluationError):
    """The tokenizer's ids do not index this model's embedding matrix."""


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_task_model(model_dir: str | os.PathLike, kind: str, labels: tuple[str, ...] | None = None, seed: int = 0,
                    **kwargs):
    """The HF model class for a task `kind` from `model_dir`: a masked-LM directory (pass `labels`: a new
    classification head) or a task model (labels from its config). A new head is initialised from `seed`, the same
    in every process (the global RNG is left as it was). `kwargs` go to from_pretrained (e.g.
    attn_implementation="eager", for attention maps)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load_task_model(model_dir, kind, labels, **kwargs)


def _load_task_model(model_dir, kind: str, labels: tuple[str, ...] | None, **kwargs):
    if kind == "classification":
        if labels is None:
            return load_model(model_dir, AutoModelForSequenceClassification, **kwargs)
        return load_model(model_dir, AutoModelForSequenceClassification, num_labels=len(labels),
                          id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
                          **kwargs)
    if kind == "qa":
        return load_model(model_dir, AutoModelForQuestionAnswering, **kwargs)
    if kind == "retrieval":
        return load_model(model_dir, AutoModel, **kwargs)
    if kind == "mlm":
        return load_masked_lm(model_dir)
    raise ValueError(f"unknown task kind {kind!r}")


def load_sft_task_model(base_dir: str | os.PathLike, kind: str, labels: tuple[str, ...], task_sft: str | os.PathLike,
                        language_sft: SparseFineTuning | None = None, base_sha: str | None = None):
    """LT-SFT's task model: `base_dir`, the model the language SFT was learned over, loaded for the task `kind`, + the
    language SFT (body only) + the task SFT (with its dense head). `base_dir` is the primary (lt_sft) or the primary
    with target embeddings plugged in (lt_sft_vocab: adapt/plug.py's output, with plug.json). Each SFT is checked
    against the directory it was learned from: the language SFT against base_dir (`base_sha`: its manifest hash,
    when the caller has it), the task SFT against the primary, which for a plugged base_dir is the one its plug.json
    names; there the task SFT's difference of the input embeddings (rows of the primary's vocabulary, which the
    plugged embeddings replaced) is left out, as plugging replaces a dense task model's embeddings."""
    model = load_task_model(base_dir, kind, labels)
    base_sha = base_sha or model_hash(base_dir)
    if language_sft is not None:
        language_sft.apply(model, base_sha, with_abs=False, what=str(base_dir))
    task = SparseFineTuning.load(task_sft)
    plugged = plugged_info(base_dir)
    if plugged is None:
        task.apply(model, base_sha, what=str(base_dir))
    else:
        embeddings = model.get_input_embeddings().weight
        name = next(n for n, p in model.named_parameters() if p is embeddings)
        primary = plugged["primary_model"]
        task.without({name}).apply(model, primary["sha256"],
                                   what=f"the primary {primary['path']} that {base_dir} was plugged from")
    return model


def write_task_model(out: str | os.PathLike, task_model, tokenizer, task, labels, source_lang: str,
                     primary_dir: str | os.PathLike, extra: dict, files: dict[str, Path] | None = None) -> Path:
    """A task model directory, replaced atomically: the model, the source tokenizer, `files` ({name: file or
    directory copied in}) and task.json naming the task and the primary it was fine-tuned from, plus `extra`."""
    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    task_model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, path in (files or {}).items():
        (shutil.copytree if Path(path).is_dir() else shutil.copy2)(path, tmp / name)
    info = {"task": task.name, "kind": task.spec.kind, "labels": list(labels), "source_lang": source_lang,
            "max_length": task.max_length,
            "primary_model": {"path": str(Path(primary_dir).resolve()), "sha256": model_hash(primary_dir)}, **extra}
    (tmp / TASK_FILE).write_text(json.dumps(info, indent=2))
    return replace_dir(tmp, out)


def freeze_embeddings(model) -> list[str]:
    """Freeze the token embeddings (and an LM head, where the class has one); return the frozen parameter names."""
    frozen = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        frozen |= {id(p) for p in head.parameters()}
    names = []
    for name, p in model.named_parameters():
        if id(p) in frozen:
            p.requires_grad_(False)
            names.append(name)
    return names


def read_task_info(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / TASK_FILE
    if not path.is_file():
        raise EvaluationError(f"{model_dir} has no {TASK_FILE}: is it a task model written by evaluate/finetune.py "
                                "(or plugged from one)?")
    return json.loads(path.read_text())


def _dir_vocab(model_dir: Path) -> dict | None:
    return load_tokenizer(model_dir).get_vocab() if is_tokenizer_dir(model_dir) else None


def check_tokenizer(model, tokenizer, model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike) -> None:
    """Refuse a tokenizer whose ids do not fit the model's token embeddings.

    The embedding matrix must have one row per token id, plus padding (hf.embeddings_fit: the rule every stage
    checks a model and its tokenizer by), and if the model directory carries a tokenizer (a plugged model carries
    the one its embeddings were learned with) it must be the same vocabulary.
    """
    rows = model.get_input_embeddings().num_embeddings
    n = len(tokenizer)
    fix = ("evaluate a model with the tokenizer its embeddings were learned with: the source tokenizer for the "
           "fine-tuned task model, the target tokenizer for a model plugged with target embeddings")
    student = Path(model_dir).resolve()
    if (student / STUDENT_TARGET_TOKENIZER).is_dir() and Path(tokenizer_dir).resolve() in (
            student, student / STUDENT_TARGET_TOKENIZER):
        # a BiStil student (task model) and one of its two tokenizers: each numbers its language's block of the
        # rows (the source's at the directory's top, target_tokenizer/ the rest, the specials shared)
        top = max(tokenizer.get_vocab().values())
        if top >= rows:
            raise TokenizerMismatchError(f"tokenizer {tokenizer_dir} has ids up to {top} but {model_dir} has {rows} "
                                         f"token embeddings: {fix}")
        return
    if not embeddings_fit(n, rows):
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_dir} has {n} tokens but {model_dir} has {rows} token embeddings: {fix}")
    own = _dir_vocab(Path(model_dir))
    if own is not None and Path(model_dir).resolve() != Path(tokenizer_dir).resolve() and own != tokenizer.get_vocab():
        raise TokenizerMismatchError(
            f"{model_dir} carries a different tokenizer from {tokenizer_dir} (vocabularies differ): {fix}")


def batches(dataset, batch_size: int):
    """`dataset`'s items collated into batches of tensors on the evaluation device, in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    dev = device()
    for batch in loader:
        yield {k: v.to(dev) for k, v in batch.items()}


_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@torch.no_grad()
def predict_logits(model, dataset, batch_size: int, desc: str, outputs: tuple[str, ...] = ("logits",)):
    """Concatenated output tensors (numpy) of `model` over `dataset`, in order."""
    model.to(device()).eval()
    collected: dict[str, list[np.ndarray]] = {k: [] for k in outputs}
    for batch in tqdm(batches(dataset, batch_size), total=-(-len(dataset) // batch_size), desc=desc, leave=False):
        out = model(**{k: v for k, v in batch.items() if k in _INPUTS})
        for k in outputs:
            collected[k].append(out[k].float().cpu().numpy())
    return [np.concatenate(collected[k]) for k in outputs]


@torch.no_grad()
def mean_pooled(model, tokenizer, texts: list[str], layer: int, max_length: int, batch_size: int,
                desc: str) -> np.ndarray:
    """Mean over non-padding tokens of hidden_states[layer] (0 = embeddings output, L = last layer)."""
    model.to(device()).eval()
    dev = device()
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
        enc = tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        enc = {k: v.to(dev) for k, v in enc.items() if k in _INPUTS}
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1)).float().cpu().numpy())
    return np.concatenate(out)
