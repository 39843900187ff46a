"""Vocabulary extension (adapt/train.py `tokenizer.mode=extend`, OFA's setting): the target tokenizer is the
primary's vocabulary plus pieces learned from target text, so every source token keeps its id and its trained
embedding and only the new pieces need initialising.

New pieces come from a tokenizer of the primary's kind trained on the target text (Unigram: SentencePiece, the
pieces' log-probabilities as scores, never below the primary's lowest so its <unk> penalty stays; WordPiece: the
pieces of a WordPiece vocabulary trained there), those the primary lacks, best first, appended after the primary's
ids. Source text must read as before: a new piece that changes the tokenisation of any source training text is
dropped (a segmentation changes only by using a new piece: Unigram's best path under the old pieces is still there;
WordPiece's longest match is one), until none does. How much held-out source text still reads the same is measured
by the caller (ExtendSummary).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenizers import BertWordPieceTokenizer, Tokenizer

from minimodel.data.tokenizer import (TokenizerError, VocabularyTooLarge, save_tokenizer_json, train_tokenizer,
                                      unigram_vocab)
from minimodel.hf import load_tokenizer


@dataclass
class ExtendSummary:
    base_size: int  # the primary's vocabulary
    added: int  # new pieces in the extended vocabulary
    dropped: int  # candidates dropped because they changed the tokenisation of source text
    rounds: int

    def __str__(self) -> str:
        return (f"{self.base_size} + {self.added} target pieces ({self.dropped} candidates dropped: they changed how "
                f"source text reads; {self.rounds} rounds)")


def _candidates(kind: str, texts: list[str], size: int, base_vocab: set[str], floor: float | None, **options):
    """[(piece, score)] learned from `texts` that the base vocabulary lacks, best first (`options`: SentencePiece's
    seed and character coverage)."""
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "Unigram":
            try:
                trained = train_tokenizer(texts, tmp, size, **options)
            except VocabularyTooLarge as e:  # `size` is a buffer over the pieces wanted: as many as the text holds
                trained = train_tokenizer(texts, tmp, e.most, **options)
            specials = set(load_tokenizer(trained).all_special_tokens)
            learned = json.loads((Path(tmp) / "tokenizer.json").read_text())["model"]["vocab"]
            pieces = sorted(((p, max(s, floor)) for p, s in learned if p not in specials), key=lambda ps: -ps[1])
        else:
            wordpiece = BertWordPieceTokenizer(lowercase=False)
            wordpiece.train_from_iterator(texts, vocab_size=size)
            by_id = sorted(wordpiece.get_vocab().items(), key=lambda kv: kv[1])
            pieces = [(p, None) for p, _ in by_id]
    return [(p, s) for p, s in pieces if p not in base_vocab]


def _with_pieces(spec: dict, pieces: list[tuple[str, float | None]], first_id: int,
                 added: dict[int, str]) -> dict:
    """`spec` (tokenizer.json) with `pieces` at ids first_id, first_id + 1, ..., and the added tokens past its
    model's vocabulary (`added`: {id: content}, tokenizer.add_tokens') in it at their ids: left out, a reload would
    move them after the new pieces and leave their ids to others."""
    spec = json.loads(json.dumps(spec))
    model = spec["model"]
    if model["type"] == "Unigram":  # ids are list positions; an added token at the lowest score (matched before the
        floor = min(s for _, s in model["vocab"])  # model segments the text, it changes no segmentation)
        placed = {**dict(enumerate(model["vocab"])), **{i: [content, floor] for i, content in added.items()},
                  **{first_id + i: [p, s] for i, (p, s) in enumerate(pieces)}}
        model["vocab"] = unigram_vocab(placed, floor=floor, size=first_id + len(pieces))
    else:
        model["vocab"].update({**{content: i for i, content in added.items()},
                               **{p: first_id + i for i, (p, _) in enumerate(pieces)}})
    return spec


def extend_tokenizer(base_dir: str | os.PathLike, target_texts: list[str], source_texts: list[str], new_pieces: int,
                     out_dir: str | os.PathLike, seed: int = 0, character_coverage: float = 0.9995) -> ExtendSummary:
    """Write the base tokenizer extended with up to `new_pieces` pieces learned from `target_texts` (a SentencePiece
    unigram model of `seed` and `character_coverage` for a Unigram base) to `out_dir`; `source_texts` read exactly
    as with the base tokenizer."""
    tokenizer = load_tokenizer(base_dir)
    if not tokenizer.is_fast:
        raise TokenizerError(f"{base_dir}: tokenizer.mode=extend edits tokenizer.json: save the tokenizer with a "
                             "transformers version that converts it to a fast one")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = spec["model"]["type"]
    if kind not in ("Unigram", "WordPiece"):
        raise TokenizerError(f"{base_dir}: tokenizer.mode=extend extends Unigram (XLM-R) and WordPiece (BERT) "
                             f"vocabularies, not {kind}: use tokenizer.mode=train (a new target vocabulary)")
    base_vocab = set(tokenizer.get_vocab())
    floor = min(s for _, s in spec["model"]["vocab"]) if kind == "Unigram" else None
    pieces = _candidates(kind, target_texts, new_pieces * 2 + 100, base_vocab, floor, seed=seed,
                         character_coverage=character_coverage)[:new_pieces]
    first_id, wanted = len(tokenizer), len(pieces)
    size = len(spec["model"]["vocab"])
    added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items() if i >= size}
    base = Tokenizer.from_str(json.dumps(spec))
    before = [e.ids for e in base.encode_batch(source_texts, add_special_tokens=False)]
    rounds = 0
    while True:
        rounds += 1
        extended = Tokenizer.from_str(json.dumps(_with_pieces(spec, pieces, first_id, added)))
        after = [e.ids for e in extended.encode_batch(source_texts, add_special_tokens=False)]
        changed = [a for b, a in zip(before, after) if a != b]
        if not changed:
            break
        used = {i for a in changed for i in a if i >= first_id}
        if not used:  # cannot happen by the argument above; never loop on it
            raise TokenizerError(f"{base_dir}: extending changed how source text reads without using a new piece")
        pieces = [ps for i, ps in enumerate(pieces) if first_id + i not in used]
    save_tokenizer_json(tokenizer, _with_pieces(spec, pieces, first_id, added), out_dir)
    vocab = tokenizer.get_vocab()
    if moved := {t: i for t, i in load_tokenizer(out_dir).get_vocab().items() if t in vocab and vocab[t] != i}:
        raise TokenizerError(f"{base_dir}: extending moved tokens {sorted(moved.items())[:5]}: every source token must "
                             "keep its id; use tokenizer.mode=train (a new target vocabulary)")
    return ExtendSummary(first_id, len(pieces), wanted - len(pieces), rounds)
