"""BiStil step 5: the student beside its teacher, in one run: zero-shot quality on the target language (verse
retrieval against the source language, which needs no task model), parameters, encoder FLOPs per token and
measured inference throughput (the two models timed alternately on the same batches, so drift hits both)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from minimodel.evaluation.models import device
from minimodel.evaluation.scoring import score_retrieval
from minimodel.evaluation.tasks import TaskConfig
from minimodel.training.hf_mlm import MLMFlops


@dataclass
class Reader:
    """A model as it reads a language pair: the model (or two of one architecture) and each language's tokenizer."""
    source_model: nn.Module
    source_tokenizer: object
    target_model: nn.Module
    target_tokenizer: object


def encoder_flops_per_token(model: nn.Module, seq_length: int) -> float:
    """Forward FLOPs of the encoder per token of a `seq_length` sequence (inference: nothing trains)."""
    model.requires_grad_(False)
    return MLMFlops(model).per_batch(1, seq_length, 0) / seq_length


@torch.no_grad()
def tokens_per_second(models: dict[str, nn.Module], tokenizers: dict[str, object], texts: list[str],
                      seq_length: int, batch_size: int, rounds: int = 3) -> dict[str, float]:
    """Encoder forward throughput of each model on the same padded batches of `texts`, timed round-robin; the
    median round per model. The models must share an attention implementation (eager vs sdpa alone changes it)."""
    implementations = {name: model.config._attn_implementation for name, model in models.items()}
    if len(set(implementations.values())) > 1:
        raise ValueError(f"timing models of different attention implementations compares those: {implementations}")
    times: dict[str, list[float]] = {name: [] for name in models}
    batches = {name: [tokenizers[name](texts[i:i + batch_size], padding="max_length", truncation=True,
                                       max_length=seq_length, return_tensors="pt")
                      for i in range(0, len(texts), batch_size)] for name in models}
    on = device()
    for model in models.values():
        model.to(on).eval()
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            for batch in batches[name]:
                model.base_model(input_ids=batch["input_ids"].to(on), attention_mask=batch["attention_mask"].to(on))
            if on.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    tokens = len(texts) * seq_length
    return {name: tokens / float(np.median(t)) for name, t in times.items()}


def compare(task: TaskConfig, readers: dict[str, Reader], source_lang: str, target_lang: str, split: str,
            batch_size: int, seq_length: int, throughput_texts: list[str]) -> dict[str, dict[str, float]]:
    """{name: {"retrieval/top1", "retrieval/top10", "parameters", "flops_per_token", "tokens_per_s"}}."""
    out = {}
    for name, r in readers.items():
        quality = score_retrieval(task, r.source_model, r.source_tokenizer, source_lang, r.target_model,
                                  r.target_tokenizer, target_lang, split, batch_size)
        out[name] = {"retrieval/top1": quality["top1"], "retrieval/top10": quality["top10"],
                     "parameters": float(sum(p.numel() for p in r.target_model.parameters())),
                     "flops_per_token": encoder_flops_per_token(r.target_model, seq_length)}
    speed = tokens_per_second({n: r.target_model for n, r in readers.items()},
                              {n: r.target_tokenizer for n, r in readers.items()}, throughput_texts, seq_length,
                              batch_size)
    for name in readers:
        out[name]["tokens_per_s"] = speed[name]
    return out
