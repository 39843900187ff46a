"""OFA's initialisation of a new vocabulary's embeddings (Liu et al., 2023), over any source embedding matrix.

Rules, in order, for each target token (counts of each go to the log and adapt.json):
1. copied:   the source vocabulary has the same token (same piece or special-token role: the token map) -> its row;
2. copied (normalised): the same piece after normalising the word-boundary marker (SentencePiece "▁", byte-level
   BPE "Ġ" with its pieces decoded to text, WordPiece's unmarked word starts), in the same case if there is one, else
   in any case (OFA's order: "▁The" takes "The", not "the") -> that source row (the lowest id of equals);
3. neighbours: the token has a subword vector -> sum_j softmax(cos(t, s_j) / T) E_src[j] over its k source tokens
   of highest cosine (ties: lower id first). As in the reference implementation every source token is a candidate,
   one without a subword vector at cosine 0;
4. random: no vector -> a draw from N(mean, std) of the source matrix, per dimension.
A subword's vector is the mean of the aligned word vectors of every word of the token's side (source languages for
source tokens, the target language for target tokens) whose tokenisation contains it, each word counted once; a word
is tokenised as is, with a leading space, and capitalised with a leading space (OFA's spellings: _spellings).
`E_src` is whatever matrix the caller passes: the primary's embeddings, or its SVD coordinates when the embeddings
are factorised (minimodel/ofa/factorized.py), so the same rules run in coordinate space.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from minimodel.config import require
from minimodel.ofa.vectors import VectorFileConfig, VectorFileError, WordVectors

log = logging.getLogger(__name__)

RULES = ("copied", "copied_normalised", "neighbours", "random")
ENCODE_BATCH = 4096


@dataclass
class OFAConfig:
    # aligned word vectors (minimodel/ofa/vectors.py); the default is what pretrain/word_vectors.py writes
    vectors: list[VectorFileConfig] = field(
        default_factory=lambda: [VectorFileConfig("data/word_vectors/vectors.bin")])
    # languages whose words give the source tokens their vectors (the primary's languages); empty: source_lang
    source_langs: list[str] = field(default_factory=list)
    neighbors: int = 10
    temperature: float = 0.1

    def validate(self) -> None:
        require(self.neighbors >= 1, "init.ofa.neighbors", "must be >= 1")
        require(self.temperature > 0, "init.ofa.temperature", "must be > 0")


@dataclass
class OFAInputs:
    """What the OFA initialiser needs beyond the common initialiser arguments (adaptation/vocab.py)."""
    source_tokenizer: object
    vectors: WordVectors
    source_langs: list[str]
    target_lang: str
    neighbors: int = 10
    temperature: float = 0.1
    summary: dict[str, int] = field(default_factory=dict)  # filled by the initialiser: rows per rule


def _style(tokenizer) -> str:
    """The family whose marker most pieces carry (one stray "▁" piece in a WordPiece vocabulary does not decide)."""
    pieces = tokenizer.get_vocab()
    counts = {style: sum(p.startswith(marker) for p in pieces)
              for style, marker in (("sentencepiece", "▁"), ("bpe", "Ġ"), ("wordpiece", "##"))}
    style = max(counts, key=counts.get)
    return style if counts[style] else "plain"


def normalised_pieces(tokenizer) -> dict[int, str]:
    """id -> the piece's text with a word start written as a leading space, whatever the tokenizer family."""
    style = _style(tokenizer)
    out = {}
    for piece, tid in tokenizer.get_vocab().items():
        if style == "sentencepiece":
            piece = piece.replace("▁", " ")
        elif style == "bpe":  # byte-level pieces spell non-ASCII text as bytes ("Ã©" is "é"); a partial character stays
            text = tokenizer.convert_tokens_to_string([piece])
            piece = piece.replace("Ġ", " ") if "\ufffd" in text else text
        elif style == "wordpiece":
            piece = piece[2:] if piece.startswith("##") else " " + piece
        out[tid] = piece
    return out


def _spellings(word: str) -> tuple[str, str, str]:
    """A word as OFA's reference tokenises it: as is, after a space, and capitalised after a space; a `$` in it
    (ColexNet+'s keys) is read as a space, and a word starting with one is capitalised without it."""
    text = word.replace("$", " ")
    capitalised = text[1:2].upper() + text[2:] if word.startswith("$") else " " + text[:1].upper() + text[1:]
    return text, " " + text, capitalised


def subword_vectors(tokenizer, vectors: WordVectors, langs: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """([size, dim] mean word vector per token id, [size] bool: the token has one). Special tokens get none."""
    rows = np.concatenate([vectors.rows(lang) for lang in langs]) if langs else np.zeros(0, np.int64)
    words = [vectors.keys[r][1] for r in rows]
    special = set(tokenizer.all_special_ids)
    ids_of_word: list[set[int]] = [set() for _ in words]
    spelled = [_spellings(w) for w in words]
    for variant in range(3):
        for start in range(0, len(words), ENCODE_BATCH):
            batch = [spellings[variant] for spellings in spelled[start:start + ENCODE_BATCH]]
            for i, ids in enumerate(tokenizer(batch, add_special_tokens=False)["input_ids"], start=start):
                ids_of_word[i].update(t for t in ids if t not in special and t < size)
    cols = [i for i, ids in enumerate(ids_of_word) for _ in ids]
    token_rows = [t for ids in ids_of_word for t in sorted(ids)]
    member = sp.csr_matrix((np.ones(len(cols)), (token_rows, cols)), shape=(size, len(words)))
    count = np.asarray(member.sum(axis=1)).ravel()
    sums = member @ vectors.matrix[rows].astype(np.float64) if len(words) else np.zeros((size, vectors.dim))
    covered = count > 0
    means = np.zeros((size, vectors.dim))
    means[covered] = sums[covered] / count[covered, None]
    return means, covered


def top_k(sims: np.ndarray, k: int) -> np.ndarray:
    """Per row, the ids of the k highest values, highest first, ties to the lower id; linear in the row length
    (a full sort of a 250k-token source vocabulary per target token would dominate the initialisation)."""
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    out = np.empty((len(sims), k), dtype=np.int64)
    for i, (row, bound) in enumerate(zip(sims, kth)):
        above = np.flatnonzero(row > bound)
        chosen = np.concatenate([above, np.flatnonzero(row == bound)[:k - len(above)]])
        out[i] = chosen[np.lexsort((chosen, -row[chosen]))]
    return out


def neighbour_rows(target: np.ndarray, source_vectors: np.ndarray, source_matrix: np.ndarray, k: int,
                   temperature: float) -> np.ndarray:
    """Each row of `target` -> sum softmax(cos / T) source_matrix over its k source rows of highest cosine."""
    def unit(x):
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)  # a zero vector: cosine 0 with everything

    source_unit = unit(source_vectors)
    out = np.zeros((len(target), source_matrix.shape[1]))
    k = min(k, len(source_vectors))
    batch = max(1, 2 ** 24 // len(source_vectors))  # similarity blocks of at most 16M entries
    for start in range(0, len(target), batch):
        sims = unit(target[start:start + batch]) @ source_unit.T
        top = top_k(sims, k)
        top_sims = np.take_along_axis(sims, top, axis=1) / temperature
        weights = np.exp(top_sims - top_sims.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        out[start:start + batch] = np.einsum("bk,bkh->bh", weights, source_matrix[top])
    return out


def initialise(source_weight: torch.Tensor, mapping: torch.Tensor, target_tokenizer, *, std, pad_id, generator,
               ofa: OFAInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The INITIALISERS signature (adaptation/vocab.py) plus `ofa`; `std` is unused: the fallback takes the source
    matrix's own per-dimension spread. Returns (weight, used map: the source row of copied tokens, else -1)."""
    source = source_weight.detach().double().cpu().numpy()
    used = mapping.clone()
    counts = dict.fromkeys(RULES, 0)
    counts["copied"] = int((mapping >= 0).sum())
    source_norm, target_norm = normalised_pieces(ofa.source_tokenizer), normalised_pieces(target_tokenizer)
    for case in (str, str.lower):  # the same case first, then any case
        first_of = {}
        for sid in sorted(source_norm):
            if sid < len(source):
                first_of.setdefault(case(source_norm[sid]), sid)
        for tid, piece in target_norm.items():
            if tid < len(used) and used[tid] < 0 and case(piece) in first_of:
                used[tid] = first_of[case(piece)]
                counts["copied_normalised"] += 1

    weight = np.zeros((len(used), source.shape[1]))
    copied = (used >= 0).numpy()
    weight[copied] = source[used[used >= 0].numpy()]
    source_vecs, source_covered = subword_vectors(ofa.source_tokenizer, ofa.vectors, ofa.source_langs, len(source))
    target_vecs, covered = subword_vectors(target_tokenizer, ofa.vectors, [ofa.target_lang], len(used))
    by_neighbours = covered & ~copied
    if by_neighbours.any() and not source_covered.any():  # every cosine 0: each the mean of source rows 0..k-1
        raise VectorFileError(f"no token of the primary's tokenizer is in a word vector of {ofa.source_langs}: set "
                              "init.ofa.source_langs to the languages the primary's vocabulary reads")
    weight[by_neighbours] = neighbour_rows(target_vecs[by_neighbours], source_vecs, source, ofa.neighbors,
                                           ofa.temperature)
    counts["neighbours"] = int(by_neighbours.sum())
    rest = torch.from_numpy(~covered & ~copied)
    result = torch.from_numpy(weight).float()
    mean, spread = source_weight.detach().float().mean(0), source_weight.detach().float().std(0, unbiased=False)
    draws = torch.randn(int(rest.sum()), source.shape[1], generator=generator)
    result[rest] = mean + spread * draws
    if pad_id is not None and used[pad_id] < 0:  # a padding row no source row was copied to: zero, as `random` does
        result[pad_id] = 0
    counts["random"] = int(rest.sum())
    ofa.summary.update(counts)
    log.info("OFA initialisation of %d %s rows: %s", len(used), ofa.target_lang,
             ", ".join(f"{n} {rule}" for rule, n in counts.items()))
    return result, used
