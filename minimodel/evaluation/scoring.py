"""Score a model on a task's examples in one language: the shared evaluation of fine-tuning and zero-shot."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minimodel.data.tokenizer import tokenizer_fingerprint
from minimodel.data.mlm import MaskedLMDataset
from minimodel.evaluation import EvaluationError
from minimodel.evaluation.features import QAEvalFeatures, classification_features, reads_segments
from minimodel.evaluation.metrics import correct, majority_share, qa_question_scores, retrieval_hits
from minimodel.evaluation.models import batches, device, mean_pooled, predict_logits
from minimodel.evaluation.tasks import TaskConfig, TaskDataError, load_examples, load_verse_pairs
from minimodel.hf import load_tokenizer
from minimodel.training.hf_mlm import masked_lm_loss

MAJORITY_METRIC = "baseline/majority"  # logged with every classification score: the chance level to beat


def score(task: TaskConfig, model, tokenizer, lang: str, split: str, batch_size: int,
          per_example: dict | None = None) -> dict[str, float]:
    """Metrics of a classification or QA task model on `split` of `task` in `lang` (plus n_examples); with
    `per_example`, also each example's score of the headline metric, for paired comparisons (see _per_example)."""
    examples = load_examples(task, lang, split)
    desc = f"{task.name}/{lang}/{split}"
    if task.spec.kind == "classification":
        features = classification_features(examples, tokenizer, task.max_length, reads_segments(model))
        (logits,) = predict_logits(model, features, batch_size, desc)
        labels = [e["label"] for e in examples]
        scores = {"accuracy": correct(logits.argmax(-1).tolist(), labels)}
        metrics = {"accuracy": float(np.mean(scores["accuracy"])), MAJORITY_METRIC: majority_share(labels)}
    elif task.spec.kind == "qa":
        features = QAEvalFeatures(examples, tokenizer, task.max_length, task.doc_stride, reads_segments(model))
        start, end = predict_logits(model, features.dataset, batch_size, desc, ("start_logits", "end_logits"))
        predictions = features.predictions(start, end, task.max_answer_length)
        scores = qa_question_scores(predictions, {e["id"]: [a["text"] for a in e["answers"]] for e in examples},
                                    lang)
        metrics = {metric: float(np.mean(values)) for metric, values in scores.items()}
    else:
        raise ValueError(f"task {task.name} is scored with score_retrieval")
    _per_example(per_example, task, examples, scores)
    return {**metrics, "n_examples": float(len(examples))}


def _per_example(into: dict | None, task: TaskConfig, examples: list, scores: dict) -> None:
    """Fill `into` (when given) with {"examples": a digest of what was scored, "scores": each example's score of
    the task's headline metric, in its units}: two evaluations of the same examples compare example by example."""
    if into is not None:
        digest = hashlib.sha256(json.dumps(examples, sort_keys=True, default=str).encode()).hexdigest()[:16]
        into.update(examples=digest, scores=[round(float(x), 6) for x in scores[task.spec.metric]])


def unknown_fraction(task: TaskConfig, tokenizer, lang: str, split: str) -> float:
    """The share of the tokens of `lang`'s task text (`split`) that `tokenizer` maps to its unknown token: whether a
    tokenizer can read the language at all (a script it lacks gives about one <unk> per word)."""
    if tokenizer.unk_token_id is None:  # byte-level: reads anything
        return 0.0
    fields = ("text_a", "text_b", "question", "context", "text")
    texts = [e[k] for e in load_examples(task, lang, split) for k in fields if e.get(k)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    total = sum(len(x) for x in ids)
    return sum(x.count(tokenizer.unk_token_id) for x in ids) / total if total else 0.0


def retrieval_layer(model, layer: int | None) -> int:
    """hidden_states index for retrieval: `layer` (negative counts from the top), default 2/3 of the depth (layer
    8 of 12, as SR-B evaluations of XLM-R / Glot500 use)."""
    depth = model.config.num_hidden_layers
    chosen = round(2 * depth / 3) if layer is None else (layer if layer >= 0 else depth + 1 + layer)
    if not 0 <= chosen <= depth:
        raise EvaluationError(f"retrieval_layer {layer} is outside 0..{depth} (0 = embeddings, {depth} = last "
                              "layer; negative counts from the top)")
    return chosen


def score_retrieval(task: TaskConfig, source_model, source_tokenizer, source_lang: str, target_model,
                    target_tokenizer, target_lang: str, split: str, batch_size: int,
                    layer: int | None = None, per_example: dict | None = None) -> dict[str, float]:
    """SR-B-style retrieval: for each held-out target verse, find its source verse among the held-out verses both
    languages hold (tasks.load_verse_pairs) by cosine of mean-pooled hidden states; top-1 / top-10 accuracy
    (`per_example`: as score's)."""
    pairs = load_verse_pairs(task, source_lang, target_lang, split)
    index = retrieval_layer(source_model, layer)
    candidates = mean_pooled(source_model, source_tokenizer, [src for src, _ in pairs], index, task.max_length,
                             batch_size, f"retrieval/{source_lang}")
    queries = mean_pooled(target_model, target_tokenizer, [tgt for _, tgt in pairs], index, task.max_length,
                          batch_size, f"retrieval/{target_lang}")
    hits = retrieval_hits(queries, candidates, ks=(1, 10))
    _per_example(per_example, task, pairs, hits)
    return {**{metric: float(np.mean(h)) for metric, h in hits.items()}, "n_examples": float(len(pairs)),
            "layer": float(index)}


@torch.no_grad()
def score_mlm(task: TaskConfig, model, tokenizer, lang: str, split: str, batch_size: int) -> dict[str, float]:
    """Masked-LM loss (nats per masked token) of a *ForMaskedLM `model` on `lang`'s held-out verses: the data
    stage's <data_dir>/<lang>/valid indexed dataset ("train" for split train), packed and masked by MaskedLMDataset
    with task.mlm_seed, max_eval_examples sequences spread over the split: the same positions for every model."""
    lang_dir = Path(task.data_dir) / lang
    if not (lang_dir / "valid.idx").is_file():
        raise TaskDataError(f"{lang_dir}/valid.idx does not exist: build language {lang!r} with "
                            "pretrain/prepare_data.py and set task.data_dir to its output_dir")
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(load_tokenizer(lang_dir / "tokenizer")):
        raise EvaluationError(f"the embeddings scored on {lang} belong to another tokenizer than {lang_dir}/tokenizer, "
                              "which its held-out data is encoded with: target_mlm compares methods on the data "
                              "stage's tokenization (adapt with tokenizer.mode=reuse)")
    data = MaskedLMDataset(lang_dir / ("train" if split == "train" else "valid"), tokenizer, task.max_length,
                           task.mlm_mask_prob, task.mlm_seed)
    n = min(task.max_eval_examples or len(data), len(data))
    chosen = np.unique(np.linspace(0, len(data) - 1, n).round().astype(int)).tolist()
    subset = torch.utils.data.Subset(data, chosen)
    model.to(device()).eval()
    total, count = 0.0, 0
    for batch in tqdm(batches(subset, batch_size), total=-(-len(subset) // batch_size),
                      desc=f"{task.name}/{lang}/{split}", leave=False):
        masked = int((batch["labels"] != -100).sum())
        total += float(masked_lm_loss(model, batch)) * masked
        count += masked
    return {"mlm_loss": total / count, "n_examples": float(len(subset)), "n_tokens": float(count)}
