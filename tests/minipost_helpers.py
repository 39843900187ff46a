"""Small random-weight Hugging Face masked LMs for the MiniPost tests (built from configs, saved to disk)."""
from __future__ import annotations

from pathlib import Path

import torch

SIZES = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
             max_position_embeddings=130, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def make_model(kind: str, vocab_size: int = 120, pad_token_id: int = 1, seed: int = 0, with_head: bool = True,
               **overrides):
    """A random-weight model of `kind` in {"xlmr", "xlmr-xl", "roberta", "bert", "megatron", "camembert",
    "deberta-v2", "mpnet"} (pad id 1, as XLM-R)."""
    import transformers as tf

    torch.manual_seed(seed)
    sizes = {**SIZES, **overrides}
    if kind == "xlmr":
        config = tf.XLMRobertaConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=0,
                                     eos_token_id=2, type_vocab_size=1, **sizes)
        cls = tf.XLMRobertaForMaskedLM if with_head else tf.XLMRobertaModel
    elif kind == "xlmr-xl":  # pre-LN, with a final encoder LayerNorm
        config = tf.XLMRobertaXLConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=0,
                                       eos_token_id=2, type_vocab_size=1, **sizes)
        cls = tf.XLMRobertaXLForMaskedLM if with_head else tf.XLMRobertaXLModel
    elif kind == "roberta":
        config = tf.RobertaConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=0,
                                  eos_token_id=2, type_vocab_size=1, **sizes)
        cls = tf.RobertaForMaskedLM if with_head else tf.RobertaModel
    elif kind == "bert":
        config = tf.BertConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, **sizes)
        cls = tf.BertForMaskedLM if with_head else tf.BertModel
    elif kind == "megatron":
        config = tf.MegatronBertConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, **sizes)
        cls = tf.MegatronBertForMaskedLM if with_head else tf.MegatronBertModel
    elif kind == "camembert":  # positions numbered from the pad id, as RoBERTa's
        config = tf.CamembertConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=0,
                                    eos_token_id=2, type_vocab_size=1, **sizes)
        cls = tf.CamembertForMaskedLM if with_head else tf.CamembertModel
    elif kind == "deberta-v2":  # a relative-position table and its norm outside the layers, read by every layer
        config = tf.DebertaV2Config(vocab_size=vocab_size, pad_token_id=pad_token_id, relative_attention=True,
                                    position_buckets=16, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                                    position_biased_input=False, type_vocab_size=0, **sizes)
        cls = tf.DebertaV2ForMaskedLM if with_head else tf.DebertaV2Model
    elif kind == "mpnet":  # a relative attention bias outside the layers, read by every layer
        config = tf.MPNetConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=0, eos_token_id=2,
                                **sizes)
        cls = tf.MPNetForMaskedLM if with_head else tf.MPNetModel
    else:
        raise ValueError(kind)
    model = cls(config)
    # Random LayerNorm gains and biases so that a wrongly copied norm cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or ".ln." in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_model(model, out_dir: Path, tokenizer=None) -> Path:
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def minijoint_export(tokenizer_dir: Path, out: Path, seq_length: int = 64) -> Path:
    """A random-weight MiniJoint model (megatron-core, one process) saved as a checkpoint and exported by the real
    exporter (pretrain/export.py's code) to <out>/export/{primary,mini}. Run in its own process (see __main__)."""
    import shutil

    from megatron.core import dist_checkpointing

    from minimodel.data.tokenizer import load_tokenizer
    from minimodel.distributed import ParallelConfig
    from minimodel.models.minijoint import parallelize as P
    from minimodel.models.minijoint.config import ModelConfig
    from minimodel.models.minijoint.export import export

    cfg = ModelConfig(vocab_size=len(load_tokenizer(tokenizer_dir)), hidden_size=32, num_layers=4,
                      num_attention_heads=2, ffn_hidden_size=64, seq_length=seq_length, mini_layers=2,
                      hidden_dropout=0.0, attention_dropout=0.0)
    parallel = ParallelConfig(micro_batch_size=1, global_batch_size=1, precision="fp32")
    P.setup(cfg, parallel, seed=3)
    model = P.build_model(cfg, parallel)
    ckpt = out / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir(parents=True)
    dist_checkpointing.save(P.sharded_state_dict(model), str(ckpt))
    export(ckpt, tokenizer_dir, out / "export")
    return out / "export"


if __name__ == "__main__":  # python tests/minipost_helpers.py <tokenizer_dir> <out>; dist_checkpointing needs the guard
    import sys

    minijoint_export(Path(sys.argv[1]), Path(sys.argv[2]))
