"""Task metrics: accuracy (and the majority-class baseline), MLQA exact match / F1 (the official MLQA evaluation's normalisation), retrieval top-k.

The MLQA normalisation follows facebookresearch/MLQA `mlqa_evaluation_v1.py`: lower-case, drop every Unicode
punctuation character, drop the language's articles, then split on whitespace (or, for Chinese, split every CJK
character and punctuation mark into its own token). Languages the official script does not know (it raises)
are treated as whitespace languages without articles, so target languages outside MLQA can still be scored.
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

_ASCII_PUNCT = frozenset(string.punctuation)
MIXED_SEGMENTATION_LANGS = {"zh"}
_ARTICLES = {
    "en": re.compile(r"\b(a|an|the)\b"),
    "es": re.compile(r"\b(un|una|unos|unas|el|la|los|las)\b"),
    "vi": re.compile(r"\b(của|là|cái|chiếc|những)\b"),
    "de": re.compile(r"\b(ein|eine|einen|einem|eines|einer|der|die|das|den|dem|des)\b"),
    "ar": re.compile(r"\sال^|ال"),  # as in the official script: removes every "ال"
}
_CJK = re.compile(r"[\u4e00-\u9fa5]")


def correct(predictions: Sequence[int], labels: Sequence[int]) -> np.ndarray:
    """1.0 for each prediction equal to its label, else 0.0: accuracy is their mean."""
    if len(predictions) != len(labels) or not len(labels):
        raise ValueError(f"accuracy needs as many predictions as labels (>0), got {len(predictions)} and {len(labels)}")
    return (np.asarray(predictions) == np.asarray(labels)).astype(np.float64)


def majority_share(labels: Sequence[int]) -> float:
    """The accuracy of always predicting the most frequent label: the chance level a classifier must beat."""
    if not labels:
        raise ValueError("majority_share needs at least one label")
    return Counter(labels).most_common(1)[0][1] / len(labels)


def _is_punctuation(char: str) -> bool:
    """A Unicode punctuation character (category P*) or ASCII punctuation, as the official script's set of them (looked
    up per character: building that set walks every code point, ~0.8 s at each import of this module)."""
    return char in _ASCII_PUNCT or unicodedata.category(char).startswith("P")


def _mixed_segmentation(text: str) -> list[str]:
    tokens: list[str] = []
    pending = ""
    for char in text:
        if _CJK.search(char) or _is_punctuation(char):
            tokens.extend(pending.split())
            pending = ""
            tokens.append(char)
        else:
            pending += char
    tokens.extend(pending.split())
    return tokens


def normalize_answer(text: str, lang: str) -> str:
    """MLQA answer normalisation: lower, drop punctuation, drop articles, re-tokenise, join with spaces."""
    text = "".join(ch for ch in text.lower() if not _is_punctuation(ch))
    if lang in _ARTICLES:
        text = _ARTICLES[lang].sub(" ", text)
    tokens = _mixed_segmentation(text) if lang in MIXED_SEGMENTATION_LANGS else text.split()
    return " ".join(t for t in tokens if t.strip())


def qa_exact_match(prediction: str, truth: str, lang: str) -> float:
    return float(normalize_answer(prediction, lang) == normalize_answer(truth, lang))


def qa_f1(prediction: str, truth: str, lang: str) -> float:
    pred_tokens = normalize_answer(prediction, lang).split()
    truth_tokens = normalize_answer(truth, lang).split()
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_question_scores(predictions: dict[str, str], answers: dict[str, list[str]], lang: str) -> dict[str, list]:
    """{"exact_match", "f1"}: each question's score in percent (answers' order), the max over its gold answers;
    an unanswered question scores 0."""
    if not answers:
        raise ValueError("qa_question_scores: no questions to score")
    scores = {"exact_match": [], "f1": []}
    for qid, truths in answers.items():
        answered = qid in predictions
        scores["exact_match"].append(100.0 * max(qa_exact_match(predictions[qid], t, lang) for t in truths)
                                     if answered else 0.0)
        scores["f1"].append(100.0 * max(qa_f1(predictions[qid], t, lang) for t in truths) if answered else 0.0)
    return scores


def retrieval_hits(queries: np.ndarray, candidates: np.ndarray, gold: Iterable[int] | None = None,
                   ks: Sequence[int] = (1, 10)) -> dict[str, np.ndarray]:
    """{"top<k>": 1.0 for each query whose gold candidate gold[i] is among its k most cosine-similar, else 0.0}.

    queries: [n, d], candidates: [m, d]; gold defaults to the identity (query i pairs with candidate i).
    Ties are broken against the gold candidate (a constant embedding never counts as a hit).
    """
    queries = np.asarray(queries, dtype=np.float64)
    candidates = np.asarray(candidates, dtype=np.float64)
    gold_idx = np.arange(len(queries)) if gold is None else np.asarray(list(gold))
    if len(gold_idx) != len(queries) or len(queries) == 0:
        raise ValueError(f"retrieval_hits: {len(queries)} queries but {len(gold_idx)} gold indices")
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    c = candidates / np.maximum(np.linalg.norm(candidates, axis=1, keepdims=True), 1e-12)
    sims = q @ c.T
    gold_sim = sims[np.arange(len(q)), gold_idx]
    # rank of the gold candidate = number of candidates at least as similar, other than itself
    rank = (sims >= gold_sim[:, None]).sum(axis=1) - 1
    return {f"top{k}": (rank < k).astype(np.float64) for k in ks}
