"""What the MiniJoint heads cost in pretraining, measured side by side in one process.

    python benchmarks/head_cost.py            # full run -> benchmarks/results/head_cost.{json,png}
    python benchmarks/head_cost.py --smoke    # tiny shapes, seconds (CI) -> runs/benchmarks/smoke/
    python benchmarks/head_cost.py --base     # one GPU, bf16, base size -> benchmarks/results/gpu/

A. The secondary (mini-model) MLM head: training steps of the same MiniJoint model, same layout, with and without
   the secondary head (`model.secondary_head=none`; `aux_weight=0` would not remove the head's compute). The
   plain-MLM model is loaded with the MiniJoint model's weights, so both variants share weights and batch and differ
   only in the head's work.
B. The masked-positions-only LM heads vs a full-sequence vocabulary projection (megatron's BertModel computes logits
   at every position and masks the loss) at vocabularies of 32k and 250k: the head alone (forward + backward on
   fixed hidden states) and a full training step, with both MLM heads switched between the two forms.

Every pair is timed interleaved (A B A B ...); FLOPs per step are both predicted from the shapes and counted by
torch's FlopCounterMode.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402

from benchmarks.common import (SUMMARY, MiniJointSteps, arg_parser, count_flops, free_memory,  # noqa: E402
                               header, interleaved, minijoint_config, parse_args, pyplot, save, summary)
from minimodel.models.minijoint.model import IGNORE_INDEX, MaskedLMHead  # noqa: E402

NAME = "head_cost"
# The GPU preset (--base) beside common.BASE_SHAPE: XLM-R's vocabulary for the large one, and repeats enough for
# medians of steps that take tens of milliseconds there.
BASE = {"vocabs": [32000, 250002], "repeats": 20}
VARIANT = {"step_time_s": SUMMARY, "tokens_per_s": float, "counted_flops_per_step": float}
SCHEMA = {
    "model": {"num_layers": int, "hidden_size": int, "seq_length": int, "mini_layers": int, "micro_batch": int,
              "vocab_size": int},
    "secondary_head": {
        "with_head": VARIANT, "without_head": VARIANT,
        "overhead_time_fraction": float,  # median step time with / without - 1
        "overhead_flops_fraction": float,  # counted FLOPs with / without - 1
        "predicted_flops_fraction": float,  # from flops_per_token's head term
    },
    "lm_head": [{
        "vocab_size": int,
        "head_only": {"masked_s": SUMMARY, "full_sequence_s": SUMMARY, "speedup": float,
                      "masked_flops": float, "full_sequence_flops": float},
        "full_step": {"masked_s": SUMMARY, "full_sequence_s": SUMMARY, "speedup": float,
                      "masked_flops": float, "full_sequence_flops": float},
    }],
}


# -- the two variants ------------------------------------------------------------------------------------------------
class FullSequenceLMHead(MaskedLMHead):
    """The baseline: vocabulary logits and cross-entropy at EVERY position, the loss then masked to the predicted
    ones (megatron's BertModel). Same parameters as MaskedLMHead; TP=1 only."""

    def forward(self, hidden, labels, output_weight):
        s, b, h = hidden.shape
        logits = self.logits(hidden.reshape(s * b, h), output_weight)
        target = labels.t().reshape(-1)
        keep = target != IGNORE_INDEX
        losses = tensor_parallel.vocab_parallel_cross_entropy(
            logits.float().unsqueeze(1), target.clamp(min=0).unsqueeze(1)).squeeze(1)
        return (losses * keep).sum() / keep.sum().clamp(min=1)


@contextlib.contextmanager
def head_form(heads, cls):
    """Switch the MLM heads' forward to `cls` (same parameters) for the duration."""
    previous = [head.__class__ for head in heads]
    for head in heads:
        head.__class__ = cls
    try:
        yield
    finally:
        for head, old in zip(heads, previous):
            head.__class__ = old


# -- measurements ----------------------------------------------------------------------------------------------------
def secondary_head_cost(steps: MiniJointSteps, repeats: int) -> dict:
    plain = MiniJointSteps(dataclasses.replace(steps.cfg, secondary_head="none"), steps.parallel.micro_batch_size)
    missing, _ = plain.chunk().load_state_dict(steps.chunk().state_dict(), strict=False)  # all but the aux head
    assert not [k for k in missing if not k.endswith("_extra_state")], missing
    without = plain.step

    times = interleaved({"with_head": steps.step, "without_head": without}, repeats)
    with_flops = count_flops(steps.step)
    without_flops = count_flops(without)
    cfg = steps.cfg
    n = steps.mask_fraction * steps.tokens
    head_flops = 3 * 2 * n * (cfg.hidden_size ** 2 + cfg.hidden_size * cfg.padded_vocab_size)  # one head, fwd+bwd
    predicted = steps.model_flops_per_step()
    out = {name: {"step_time_s": summary(t), "tokens_per_s": steps.tokens / summary(t)["median"]}
           for name, t in times.items()}
    out["with_head"]["counted_flops_per_step"] = with_flops
    out["without_head"]["counted_flops_per_step"] = without_flops
    out["overhead_time_fraction"] = summary(times["with_head"])["median"] / summary(times["without_head"])["median"] - 1
    out["overhead_flops_fraction"] = with_flops / without_flops - 1
    out["predicted_flops_fraction"] = head_flops / (predicted - head_flops)
    out["predicted_flops_per_step_with_head"] = predicted
    return out


def lm_head_cost(steps: MiniJointSteps, repeats: int) -> dict:
    full_cls = FullSequenceLMHead
    chunk = steps.chunk()
    heads = [chunk.lm_head] + ([chunk.aux_head] if chunk.has_secondary_head else [])
    cfg = steps.cfg
    b = steps.batch["input_ids"].shape[0]
    g = torch.Generator().manual_seed(1)
    weight = chunk.embedding.word_embeddings.weight
    # what the head gets in training: hidden states on the model's device, in its dtype (bf16 on CUDA)
    hidden = torch.randn(cfg.seq_length, b, cfg.hidden_size, generator=g).to(weight.device, weight.dtype)
    hidden.requires_grad_()
    labels = steps.batch["labels"].to(weight.device)

    def head_step():
        loss = chunk.lm_head(hidden, labels, weight)
        loss.backward()
        hidden.grad = None

    def full_head_step():
        with head_form([chunk.lm_head], full_cls):
            head_step()

    def full_step():
        with head_form(heads, full_cls):
            steps.step()

    result = {"vocab_size": cfg.vocab_size}
    for key, masked, full in (("head_only", head_step, full_head_step), ("full_step", steps.step, full_step)):
        times = interleaved({"masked": masked, "full_sequence": full}, repeats)
        m, f = summary(times["masked"]), summary(times["full_sequence"])
        result[key] = {"masked_s": m, "full_sequence_s": f, "speedup": f["median"] / m["median"],
                       "masked_flops": count_flops(masked), "full_sequence_flops": count_flops(full)}
    steps.engine.optimizer.zero_grad()
    return result


def figure(result: dict):
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    sh = result["secondary_head"]
    names = ["with_head", "without_head"]
    med = [sh[n]["step_time_s"]["median"] for n in names]
    err = [[m - sh[n]["step_time_s"]["q25"] for m, n in zip(med, names)],
           [sh[n]["step_time_s"]["q75"] - m for m, n in zip(med, names)]]
    ax1.bar(["MiniJoint\n(secondary head)", "same model\nwithout it"], med, yerr=err, capsize=4,
            color=["tab:blue", "tab:gray"])
    ax1.set_ylabel("training step time (s), median, IQR")
    ax1.set_title(f"secondary head: +{100 * sh['overhead_time_fraction']:.1f}% time "
                  f"(+{100 * sh['overhead_flops_fraction']:.1f}% FLOPs)", fontsize=10)
    labels, masked, full = [], [], []
    for row in result["lm_head"]:
        for key, label in (("head_only", "head alone"), ("full_step", "full step")):
            labels.append(f"{label}\nV={row['vocab_size'] // 1000}k")
            masked.append(row[key]["masked_s"]["median"])
            full.append(row[key]["full_sequence_s"]["median"])
    x = range(len(labels))
    ax2.bar([i - 0.2 for i in x], masked, 0.4, label="masked positions only (ours)")
    ax2.bar([i + 0.2 for i in x], full, 0.4, label="full-sequence projection")
    for i, (m, f) in enumerate(zip(masked, full)):
        ax2.text(i, max(m, f) * 1.15, f"{f / m:.1f}x", ha="center", fontsize=9)
    ax2.set_xticks(list(x), labels, fontsize=8)
    ax2.set_yscale("log")
    ax2.set_ylabel("seconds, median (log)")
    ax2.set_title("MLM head: masked-only vs full-sequence vocabulary projection", fontsize=10)
    ax2.legend(fontsize=8, loc="upper left")
    m = result["model"]
    fig.suptitle(f"MiniJoint {m['num_layers']} layers, hidden {m['hidden_size']}, {m['micro_batch']}x"
                 f"{m['seq_length']} tokens, 15% masked; {result['machine']['cuda'] or result['machine']['cpu']}, "
                 f"{result['machine']['torch_threads']} threads", fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> dict:
    parser = arg_parser(__doc__, "tiny shapes, 2 repeats (CI)", model_shape=True)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 250000])
    args = parse_args(parser, argv, base=BASE)
    if args.smoke:
        args.vocabs = [1000, 4000]
    repeats = args.repeats or (2 if args.smoke else 7)

    def model_cfg(vocab):
        return minijoint_config(args, vocab, hidden_dropout=0.1, attention_dropout=0.1)

    result = header(NAME, args.smoke)
    result["model"] = {**{k: v for k, v in dataclasses.asdict(model_cfg(args.vocabs[0])).items()
                          if k in ("num_layers", "hidden_size", "seq_length", "mini_layers", "vocab_size",
                                   "num_attention_heads", "ffn_hidden_size")},
                       "micro_batch": args.micro_batch, "repeats": repeats}
    result["lm_head"] = []
    with MiniJointSteps.world(model_cfg(args.vocabs[0]), args.micro_batch):
        for i, vocab in enumerate(args.vocabs):
            steps = MiniJointSteps(model_cfg(vocab), args.micro_batch)
            if i == 0:
                print(f"[{NAME}] secondary head, vocab {vocab}", flush=True)
                result["secondary_head"] = secondary_head_cost(steps, repeats)
            print(f"[{NAME}] LM head forms, vocab {vocab}", flush=True)
            result["lm_head"].append(lm_head_cost(steps, repeats))
            del steps
            free_memory()  # this vocabulary's models, before the next one's
    save(NAME, result, SCHEMA, figure(result), args.out)
    sh = result["secondary_head"]
    print(f"[{NAME}] secondary head: +{100 * sh['overhead_time_fraction']:.1f}% step time, "
          f"+{100 * sh['overhead_flops_fraction']:.1f}% FLOPs")
    for row in result["lm_head"]:
        print(f"[{NAME}] V={row['vocab_size']}: full-sequence projection is {row['head_only']['speedup']:.1f}x slower "
              f"(head alone), {row['full_step']['speedup']:.2f}x (full step)")
    return result


if __name__ == "__main__":
    main()
