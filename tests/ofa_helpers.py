"""Real (WordPiece, byte-level BPE) tokenizers with a hand-written vocabulary, for the OFA tests."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece(pieces: list[str]) -> PreTrainedTokenizerFast:
    """Ids: the five specials 0-4, then `pieces` in order."""
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(SPECIALS + pieces)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def byte_level_bpe(pieces: list[str]) -> PreTrainedTokenizerFast:
    """RoBERTa-style (pieces spelled in bytes, "Ġ" a word start); ids: <pad> 0, <unk> 1, then `pieces` in order."""
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(["<pad>", "<unk>"] + pieces)}, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
