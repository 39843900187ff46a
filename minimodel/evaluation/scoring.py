"""Score a model on a task's examples in one language: the shared evaluation of fine-tuning and zero-shot."""
from __future__ import annotations

from minimodel.evaluation import EvaluationError
from minimodel.evaluation.features import QAEvalFeatures, classification_features
from minimodel.evaluation.metrics import accuracy, qa_scores, retrieval_accuracy
from minimodel.evaluation.models import mean_pooled, predict_logits
from minimodel.evaluation.tasks import TaskConfig, TaskDataError, load_examples


def score(task: TaskConfig, model, tokenizer, lang: str, split: str, batch_size: int) -> dict[str, float]:
    """Metrics of a classification or QA task model on `split` of `task` in `lang` (plus n_examples)."""
    examples = load_examples(task, lang, split)
    desc = f"{task.name}/{lang}/{split}"
    if task.spec.kind == "classification":
        (logits,) = predict_logits(model, classification_features(examples, tokenizer, task.max_length), batch_size,
                                   desc)
        metrics = {"accuracy": accuracy(logits.argmax(-1).tolist(), [e["label"] for e in examples])}
    elif task.spec.kind == "qa":
        features = QAEvalFeatures(examples, tokenizer, task.max_length, task.doc_stride)
        start, end = predict_logits(model, features.dataset, batch_size, desc, ("start_logits", "end_logits"))
        predictions = features.predictions(start, end, task.max_answer_length)
        metrics = qa_scores(predictions, {e["id"]: [a["text"] for a in e["answers"]] for e in examples}, lang)
    else:
        raise ValueError(f"task {task.name} is scored with score_retrieval")
    return {**metrics, "n_examples": float(len(examples))}


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
                    layer: int | None = None) -> dict[str, float]:
    """SR-B-style retrieval: for each held-out target verse, find its source verse among all held-out source verses
    by cosine of mean-pooled hidden states; top-1 / top-10 accuracy."""
    source = {e["verse_id"]: e["text"] for e in load_examples(task, source_lang, split)}
    target = {e["verse_id"]: e["text"] for e in load_examples(task, target_lang, split)}
    ids = sorted(source.keys() & target.keys())
    if not ids:
        raise TaskDataError(f"no verse ids shared by {source_lang} and {target_lang} in split {split}")
    index = retrieval_layer(source_model, layer)
    candidates = mean_pooled(source_model, source_tokenizer, [source[i] for i in ids], index, task.max_length,
                             batch_size, f"retrieval/{source_lang}")
    queries = mean_pooled(target_model, target_tokenizer, [target[i] for i in ids], index, task.max_length,
                          batch_size, f"retrieval/{target_lang}")
    metrics = retrieval_accuracy(queries, candidates, ks=(1, 10))
    return {**metrics, "n_examples": float(len(ids)), "layer": float(index)}
