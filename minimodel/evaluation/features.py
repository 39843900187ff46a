"""Examples -> fixed-length model inputs (numpy int64 arrays, so the default collate batches them), and QA
predictions -> answer strings.

QA contexts longer than a window are split into overlapping windows (HF's return_overflowing_tokens with a
stride); training windows that do not contain the answer point at the <s> token (SQuAD v1.1 practice), and at
prediction time the best span over all windows of a question wins.
"""
from __future__ import annotations

import numpy as np
import torch

from minimodel.evaluation import EvaluationError


def _arrays(encoding, names) -> list[dict[str, np.ndarray]]:
    n = len(encoding["input_ids"])
    return [{k: np.asarray(encoding[k][i], dtype=np.int64) for k in names} for i in range(n)]


def _model_inputs(encoding) -> list[str]:
    return [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoding]


def reads_segments(model) -> bool:
    """Whether `model` embeds token_type_ids (BERT, mBERT: a second segment), which a tokenizer of another layout
    (the target tokenizers trained here, XLM-R's) does not produce."""
    return getattr(model.config, "type_vocab_size", 1) > 1


def _add_segments(encoding) -> None:
    """BERT's segments for pairs a tokenizer encoded without them (else the model reads the second text as the
    first): 1 from the second text's first token to the end of the input (its closing separator included), 0
    before it and on padding."""
    if "token_type_ids" in encoding:
        return
    types = []
    for i, mask in enumerate(encoding["attention_mask"]):
        ids = encoding.sequence_ids(i)
        start = next((j for j, s in enumerate(ids) if s == 1), len(ids))
        types.append([int(j >= start and m == 1) for j, m in enumerate(mask)])
    encoding["token_type_ids"] = types


class FeatureDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, np.ndarray]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.items[i]


def classification_features(examples: list[dict], tokenizer, max_length: int, segments: bool = False
                            ) -> FeatureDataset:
    """{"input_ids", "attention_mask"[, "token_type_ids"], "labels"} per example, padded to max_length; `segments`:
    the model reads token types (reads_segments), made here for pairs if the tokenizer gives none."""
    a = [e["text_a"] for e in examples]
    b = [e["text_b"] for e in examples] if examples and examples[0]["text_b"] is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length, padding="max_length")
    if segments and b is not None:
        _add_segments(enc)
    items = _arrays(enc, _model_inputs(enc))
    for item, e in zip(items, examples):
        item["labels"] = np.asarray(e["label"], dtype=np.int64)
    return FeatureDataset(items)


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise EvaluationError(f"QA needs a fast (Rust `tokenizers`) tokenizer for character offsets; "
                              f"{type(tokenizer).__name__} is not one: save the tokenizer with tokenizer.json")


def _qa_windows(examples: list[dict], tokenizer, max_length: int, doc_stride: int, segments: bool):
    _require_fast(tokenizer)
    if tokenizer.padding_side != "right":
        raise EvaluationError(f"the tokenizer pads on the {tokenizer.padding_side}: QA windows put the question first, "
                              "then the context, then padding; save the tokenizer with padding_side='right'")
    # a question is cut to what leaves the context's windows more than doc_stride tokens (BERT's max_query_length):
    # the tokenizer cannot window a context past a longer one (a panic, no exception)
    room = max_length - doc_stride - tokenizer.num_special_tokens_to_add(pair=True) - 1
    questions = [e["question"].lstrip() for e in examples]
    spans = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    questions = [q[:offsets[room - 1][1]] if len(offsets) > room else q for q, offsets in zip(questions, spans)]
    enc = tokenizer(questions, [e["context"] for e in examples],
                    truncation="only_second", max_length=max_length, stride=doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")
    if segments:
        _add_segments(enc)
    return enc


def training_features(task, examples: list[dict], tokenizer, model):
    """A classification or QA task's (`task`: a TaskConfig) examples as training features for `model` (its segments
    where it embeds them): what fine-tuning and BiStil's task distillation train and evaluate the loss on."""
    segments = reads_segments(model)
    if task.spec.kind == "classification":
        return classification_features(examples, tokenizer, task.max_length, segments)
    return qa_train_features(examples, tokenizer, task.max_length, task.doc_stride, segments)


def qa_train_features(examples: list[dict], tokenizer, max_length: int, doc_stride: int, segments: bool = False
                      ) -> FeatureDataset:
    """Windows with "start_positions"/"end_positions" of the first gold answer (0 when outside the window);
    `segments` as classification_features."""
    enc = _qa_windows(examples, tokenizer, max_length, doc_stride, segments)
    items = _arrays(enc, _model_inputs(enc))
    for i, item in enumerate(items):
        example = examples[enc["overflow_to_sample_mapping"][i]]
        seq_ids = enc.sequence_ids(i)
        offsets = enc["offset_mapping"][i]
        start = end = 0
        if example["answers"]:
            answer = example["answers"][0]
            a_start = answer["answer_start"]
            a_end = a_start + len(answer["text"])
            ctx = [j for j, s in enumerate(seq_ids) if s == 1]
            if ctx and offsets[ctx[0]][0] <= a_start and offsets[ctx[-1]][1] >= a_end:
                start = next(j for j in ctx if offsets[j][1] > a_start)
                end = next(j for j in reversed(ctx) if offsets[j][0] < a_end)
        item["start_positions"] = np.asarray(start, dtype=np.int64)
        item["end_positions"] = np.asarray(end, dtype=np.int64)
    return FeatureDataset(items)


class QAEvalFeatures:
    """Windows for prediction plus what is needed to map token spans back to context characters."""

    def __init__(self, examples: list[dict], tokenizer, max_length: int, doc_stride: int, segments: bool = False):
        enc = _qa_windows(examples, tokenizer, max_length, doc_stride, segments)
        self.examples = examples
        self.dataset = FeatureDataset(_arrays(enc, _model_inputs(enc)))
        self.example_index = list(enc["overflow_to_sample_mapping"])
        # character offsets of context tokens only; None elsewhere (question, special tokens, padding)
        self.offsets = [[o if s == 1 else None for o, s in zip(enc["offset_mapping"][i], enc.sequence_ids(i))]
                        for i in range(len(self.example_index))]

    def predictions(self, start_logits: np.ndarray, end_logits: np.ndarray, max_answer_length: int,
                    n_best: int = 20) -> dict[str, str]:
        """Best valid span (start <= end, both in the context, length <= max_answer_length) per question."""
        best: dict[int, tuple[float, str]] = {}
        for w, ex_i in enumerate(self.example_index):
            offsets = self.offsets[w]
            starts = np.argsort(start_logits[w])[::-1][:n_best]
            ends = np.argsort(end_logits[w])[::-1][:n_best]
            for s in starts:
                for e in ends:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(start_logits[w][s] + end_logits[w][e])
                    if ex_i not in best or score > best[ex_i][0]:
                        context = self.examples[ex_i]["context"]
                        best[ex_i] = (score, context[offsets[s][0]:offsets[e][1]])
        return {e["id"]: best[i][1] if i in best else "" for i, e in enumerate(self.examples)}
