"""Small random-weight Hugging Face masked LMs for the MiniPost tests (built from configs, saved to disk)."""
from __future__ import annotations

from pathlib import Path

import torch

SIZES = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=130, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def make_model(kind: str, vocab_size: int = 120, pad_token_id: int = 1, seed: int = 0, with_head: bool = True,
               **overrides):
    """A random-weight model of `kind` in {"xlmr", "bert", "megatron"} (XLM-R id conventions: pad=1)."""
    import transformers as tf

    torch.manual_seed(seed)
    sizes = {**SIZES, **overrides}
    if kind == "xlmr":
        config = tf.XLMRobertaConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=0,
                                     eos_token_id=2, type_vocab_size=1, **sizes)
        cls = tf.XLMRobertaForMaskedLM if with_head else tf.XLMRobertaModel
    elif kind == "bert":
        config = tf.BertConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, **sizes)
        cls = tf.BertForMaskedLM if with_head else tf.BertModel
    elif kind == "megatron":
        config = tf.MegatronBertConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, **sizes)
        cls = tf.MegatronBertForMaskedLM if with_head else tf.MegatronBertModel
    else:
        raise ValueError(kind)
    model = cls(config)
    # Random LayerNorm gains and biases so that a wrongly copied norm cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith(".ln.weight") or name.endswith(".ln.bias") or name.endswith(
                    "bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_model(model, out_dir: Path, tokenizer=None) -> Path:
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
