"""Real (WordPiece) tokenizers with a hand-written vocabulary, for the OFA tests."""
from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def wordpiece(pieces: list[str]) -> PreTrainedTokenizerFast:
    """Ids: the five specials 0-4, then `pieces` in order."""
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(SPECIALS + pieces)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
