"""BiStil step 1: trim a model's vocabulary to the tokens a language pair uses.

A token is kept when its relative frequency in the source or in the target corpus (each encoded with the model's
tokenizer) reaches `threshold` (the reference's 1e-6), plus every special token, in the old order. The model keeps
the rows of its input embeddings, output embeddings and LM-head bias for the kept tokens (`install_rows`, through
adaptation/vocab.install_vocabulary); the tokenizer keeps their pieces, renumbered.

Re-tokenising text whose old tokens are all kept gives the old ids mapped to the new ones, by construction per
tokenizer model: Unigram (XLM-R, SentencePiece) picks the best-scoring segmentation, and removing pieces that
segmentation does not use leaves it the best; WordPiece (BERT) matches the longest piece left to right, and removed
pieces were never those matches; BPE (RoBERTa) builds tokens by merges, so a kept token's merge parts are kept too
(the only tokens kept beyond the threshold) and only the merges between kept tokens remain.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np
import torch
from torch import nn

from minimodel.adaptation.vocab import install_vocabulary
from minimodel.data.indexed import open_indexed
from minimodel.data.tokenizer import save_tokenizer_json, unigram_vocab
from minimodel.hf import load_tokenizer

Renumber = Callable[[np.ndarray], dict[int, int]]


def token_counts(prefix: str | os.PathLike, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """How often each id occurs in the indexed dataset at `prefix` (a data stage's <lang>/train)."""
    dataset = open_indexed(prefix)
    tokens = np.memmap(f"{prefix}.bin", dtype=dataset.index.dtype, mode="r")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        counts += np.bincount(tokens[start:start + chunk], minlength=vocab_size)[:vocab_size]
    return counts


def kept_ids(counts: list[np.ndarray], special_ids: list[int], threshold: float = 1e-6) -> np.ndarray:
    """The ids whose relative frequency in any of the corpora is >= threshold, plus the special ids, ascending."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold {threshold} must be in [0, 1]")
    keep = np.zeros(len(counts[0]), dtype=bool)
    for c in counts:
        if c.sum() == 0:
            raise ValueError("an empty corpus: no token counts to trim by")
        keep |= c / c.sum() >= threshold
    keep[np.asarray(special_ids, dtype=np.int64)] = True
    return np.flatnonzero(keep)


def install_rows(model: nn.Module, blocks: list[tuple[nn.Module, np.ndarray]], pad_id: int | None) -> None:
    """Give `model` the vocabulary made of blocks of rows, in order: each (donor model, its old ids ascending)
    brings those rows of its input embeddings, output embeddings (when untied) and LM-head bias. Trimming is one
    block of the model itself; BiStil's two-teacher student is the source teacher's block, then the target's."""
    index = [torch.as_tensor(rows, dtype=torch.long) for _, rows in blocks]
    weight = torch.cat([d.get_input_embeddings().weight.detach()[i] for (d, _), i in zip(blocks, index)])
    out = model.get_output_embeddings()
    untied = out is not None and out.weight is not model.get_input_embeddings().weight
    output = torch.cat([d.get_output_embeddings().weight.detach()[i] for (d, _), i in zip(blocks, index)]) \
        if untied else None
    bias = torch.cat([d.get_output_embeddings().bias.detach()[i] for (d, _), i in zip(blocks, index)]) \
        if out is not None and out.bias is not None else None
    install_vocabulary(model, weight.clone(), torch.arange(len(weight)), pad_id, output_weight=output,
                       output_bias=bias)


def _merge_parts(merge: str | list[str]) -> tuple[str, str]:
    """A BPE merge as its two parts (tokenizer.json writes "a b" or ["a", "b"])."""
    a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
    return a, b


def _bpe_closure(model: dict, keep: set[str]) -> set[str]:
    """`keep` plus, recursively, the two parts of every merge that makes a kept token (of each merge: which one
    applies to a word depends on the merges' ranks and its neighbours, so any may)."""
    parts: dict[str, list[str]] = {}
    for merge in model["merges"]:
        a, b = _merge_parts(merge)
        parts.setdefault(a + b, []).extend((a, b))
    todo, closed = list(keep), set(keep)
    while todo:
        for part in parts.get(todo.pop(), ()):
            if part not in closed:
                closed.add(part)
                todo.append(part)
    return closed


def _trim_tokenizer_json(spec: dict, kept_pieces: set[str], renumber: Renumber | None) -> tuple[dict, dict]:
    """The tokenizer.json with only `kept_pieces` (BPE: and their merge parts), numbered in old order or by
    `renumber`; returns it and old id -> new id."""
    model = spec["model"]
    kind = model["type"]
    if kind not in ("Unigram", "WordPiece", "BPE"):
        raise ValueError(f"cannot trim a {kind} tokenizer model: BiStil trims Unigram (XLM-R), WordPiece (BERT) and "
                         "BPE (RoBERTa) tokenizers")
    if kind == "BPE":
        kept_pieces = _bpe_closure(model, kept_pieces)
        model["merges"] = [m for m in model["merges"]
                           if all(p in kept_pieces for p in (*_merge_parts(m), "".join(_merge_parts(m))))]
    in_model = ({p: i for i, (p, _) in enumerate(model["vocab"])} if kind == "Unigram" else dict(model["vocab"]))
    old_ids = {**in_model, **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    kept_old = sorted(old_ids[p] for p in kept_pieces if p in old_ids)
    old_to_new = renumber(np.array(kept_old)) if renumber else {old: i for i, old in enumerate(kept_old)}
    new_ids = {p: old_to_new[i] for p, i in old_ids.items() if i in old_to_new}
    if kind == "Unigram":  # ids are list positions: ids no kept piece takes hold a piece no text contains
        if model.get("unk_id") is not None:
            model["unk_id"] = new_ids[model["vocab"][model["unk_id"]][0]]
        model["vocab"] = unigram_vocab({new_ids[p]: [p, s] for p, s in model["vocab"] if p in new_ids},
                                       floor=min(s for _, s in model["vocab"]))
    else:
        model["vocab"] = {p: new_ids[p] for p in in_model if p in new_ids}
    spec["added_tokens"] = [{**t, "id": new_ids[t["content"]]} for t in spec.get("added_tokens", [])
                            if t["content"] in new_ids]
    _renumber_post_processor(spec.get("post_processor"), new_ids)
    if spec.get("padding"):
        spec["padding"]["pad_id"] = new_ids[spec["padding"]["pad_token"]]
    return spec, old_to_new


def _renumber_post_processor(proc: dict | None, new_ids: dict[str, int]) -> None:
    if not proc:
        return
    if proc["type"] == "Sequence":
        for p in proc["processors"]:
            _renumber_post_processor(p, new_ids)
    elif proc["type"] == "TemplateProcessing":
        for special in proc["special_tokens"].values():
            special["ids"] = [new_ids[t] for t in special["tokens"]]
    elif proc["type"] in ("RobertaProcessing", "BertProcessing"):
        for key in ("sep", "cls"):
            proc[key] = [proc[key][0], new_ids[proc[key][0]]]


def trim_tokenizer(tokenizer_dir: str | os.PathLike, kept: np.ndarray, out_dir: str | os.PathLike,
                   renumber: Renumber | None = None) -> np.ndarray:
    """Write the tokenizer of `tokenizer_dir` trimmed to the old ids `kept` into `out_dir` (atomically). Returns the
    old ids it keeps, ascending: `kept`, plus BPE merge parts. Numbered 0.. in old order, or by `renumber` (the
    kept old ids -> {old id: new id}): a block of a larger vocabulary (BiStil's two-teacher student)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    if not tokenizer.is_fast:
        raise ValueError(f"{tokenizer_dir}: BiStil trims fast tokenizers (tokenizer.json); save this one with a "
                         "transformers version that converts it")
    vocab = {i: p for p, i in tokenizer.get_vocab().items()}
    spec, old_to_new = _trim_tokenizer_json(json.loads(tokenizer.backend_tokenizer.to_str()),
                                            {vocab[int(i)] for i in kept}, renumber)
    save_tokenizer_json(tokenizer, spec, out_dir, old_to_new)
    return np.array(sorted(old_to_new), dtype=np.int64)
