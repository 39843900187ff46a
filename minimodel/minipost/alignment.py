"""How well a mini-model stays aligned with its primary model, measured on held-out source-language text.

- MLM loss (token-weighted cross-entropy over the masked positions) of the primary model and of the mini-model;
- prediction KL: KL(primary || mini) of their masked-LM predictions at those positions, mean over them (0: the
  mini-model predicts exactly what the primary does);
- linear CKA (Kornblith et al., 2019) and mean cosine similarity between the mini-model's top representation and
  the primary model's representation at a chosen depth (default: its final layer), over the non-padding tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from minimodel.training.hf_mlm import mlm_head


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between two [tokens, features] representations of the same tokens (1.0: same up to rotation and
    isotropic scaling)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).pow(2).sum()
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()))


def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cosine_similarity(x.double(), y.double(), dim=-1).mean())


@torch.no_grad()
def alignment_report(primary: nn.Module, mini: nn.Module, dataset: Dataset, batch_size: int = 8,
                     max_batches: int = 16, primary_layer: int | None = None,
                     device: torch.device | str | None = None) -> dict:
    """Compare `mini` with `primary` on the first `max_batches` batches of a masked-LM dataset, computed on
    `device` (both models are moved there for the measurement and back afterwards).

    primary_layer: the primary model's depth to compare with (1..L; None = its final representation, after the
    encoder's final norm in pre-LN models).
    """
    depth = primary.config.num_hidden_layers
    if primary_layer is not None and not 1 <= primary_layer <= depth:
        raise ValueError(f"alignment.primary_layer={primary_layer} must be between 1 and {depth} "
                         f"(or null for the final layer)")
    models = (primary, mini)
    before = [(next(m.parameters()).device, m.training) for m in models]
    device = torch.device(device) if device is not None else before[0][0]
    try:
        for m in models:
            m.to(device).eval()
        return _measure(primary, mini, dataset, batch_size, max_batches, primary_layer, device)
    finally:
        for m, (where, training) in zip(models, before):
            m.to(where).train(training)


def _measure(primary, mini, dataset, batch_size, max_batches, primary_layer, device) -> dict:
    depth = primary.config.num_hidden_layers
    loss_sums = {"primary": 0.0, "mini": 0.0}
    kl_sum = 0.0
    reps: dict[str, list[torch.Tensor]] = {"primary": [], "mini": []}
    masked = 0
    for i, batch in enumerate(DataLoader(dataset, batch_size=batch_size, shuffle=False)):
        if i >= max_batches:
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        selected = labels != -100
        tokens = batch["attention_mask"].bool()
        masked += int(selected.sum())
        log_probs = {}
        for name, model in (("primary", primary), ("mini", mini)):
            out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   output_hidden_states=True)
            log_probs[name] = F.log_softmax(mlm_head(model)(out.last_hidden_state[selected]).float(), dim=-1)
            loss_sums[name] += float(F.nll_loss(log_probs[name], labels[selected], reduction="sum"))
            compare_at = primary_layer if name == "primary" and primary_layer not in (None, depth) else None
            hidden = out.last_hidden_state if compare_at is None else out.hidden_states[compare_at]
            reps[name].append(hidden[tokens].float())
        kl_sum += float(F.kl_div(log_probs["mini"], log_probs["primary"], log_target=True, reduction="sum"))
    if masked == 0:
        raise ValueError("the held-out data has no masked tokens: is the validation split empty?")
    x, y = torch.cat(reps["mini"]), torch.cat(reps["primary"])
    return {
        "primary_mlm_loss": loss_sums["primary"] / masked,
        "mini_mlm_loss": loss_sums["mini"] / masked,
        "prediction_kl": kl_sum / masked,
        "cka": linear_cka(x, y),
        "cosine": mean_cosine(x, y),
        "primary_layer": primary_layer or depth,
        "tokens": int(x.shape[0]),
        "masked_tokens": masked,
    }


def plot_alignment(alignment: dict):
    """Two panels: held-out MLM loss (primary; mini-model before and after training) and similarity to the primary
    (CKA, cosine; before and after)."""
    import matplotlib.pyplot as plt  # when drawing only: the caller picks the backend (minipost/train.py: Agg)

    start, end = alignment["start"], alignment["end"]
    figure, (losses, similarity) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = ["primary", "mini (start)", "mini (end)"]
    values = [end["primary_mlm_loss"], start["mini_mlm_loss"], end["mini_mlm_loss"]]
    losses.bar(names, values, color=["grey", "lightsteelblue", "steelblue"])
    losses.set_title("held-out MLM loss")
    for i, v in enumerate(values):
        losses.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    width = 0.35
    for offset, (label, report) in zip((-width / 2, width / 2), (("start", start), ("end", end))):
        similarity.bar([i + offset for i in range(2)], [report["cka"], report["cosine"]], width, label=label)
    similarity.set_xticks(range(2), ["linear CKA", "mean cosine"])
    similarity.set_ylim(min(0.0, start["cosine"], end["cosine"]), 1.0)
    similarity.set_title(f"mini top vs primary layer {end['primary_layer']}")
    similarity.legend()
    figure.tight_layout()
    return figure
