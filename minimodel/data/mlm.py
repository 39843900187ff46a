"""Masked-LM training examples from an indexed dataset of verses.

The documents (verses), in order, form one token stream with no separator between them, cut into windows of
`seq_length - 2` tokens, each framed as `<s> tokens... </s>` (only the last window is padded): no compute is spent
on padding, and a verse may continue in the next sequence, as in RoBERTa's FULL-SENTENCES packing (which also puts
</s> between documents: consecutive verses read on, unlike unrelated documents). Masking is a pure function of
(seed, epoch, index), so every process, worker and resumed run sees exactly the same item i; each epoch masks afresh
(`for_epoch`: dynamic masking, as RoBERTa), so a long run on a small corpus does not learn the same masks over and
over.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import torch

from minimodel.data.indexed import open_indexed
from minimodel.hf import load_tokenizer

IGNORE_INDEX = -100


class MaskedLMDataset(torch.utils.data.Dataset):
    """item i -> {"input_ids", "labels" (-100 where not predicted), "attention_mask"}: int64[seq_length] arrays.

    Of the non-special tokens, each is selected with probability `mask_prob` (at least one per sequence); a selected
    token becomes <mask> 80% of the time, a random ordinary token 10% (of `replacement_ids` where given: e.g. those
    a distilled student also has), and stays itself 10% (BERT's recipe).
    """

    def __init__(self, prefix: str | os.PathLike, tokenizer, seq_length: int, mask_prob: float = 0.15, seed: int = 0,
                 replacement_ids: np.ndarray | None = None):
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        if seq_length < 3:
            raise ValueError(f"seq_length {seq_length} leaves no room for tokens between <s> and </s>: use >= 3")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob {mask_prob} must be in (0, 1)")
        self.prefix = str(prefix)
        self.seq_length = seq_length
        self.mask_prob = mask_prob
        self.seed = seed
        self.epoch = 0
        # a sequence's first and last special tokens: <s> </s> (XLM-R, RoBERTa), [CLS] [SEP] (BERT, which has no bos)
        self.bos_id = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
        self.eos_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.mask_id = tokenizer.mask_token_id
        self.vocab_size = len(tokenizer)
        # Random replacements are ordinary tokens: every id except the special ones (of `replacement_ids`, if given)
        self._replacement_ids = np.setdiff1d(np.arange(self.vocab_size) if replacement_ids is None else
                                             replacement_ids, tokenizer.all_special_ids)
        # never targets: specials that text spelling them ("<mask>", "</s>") put into the stream (<unk> stays one)
        self._special_ids = np.setdiff1d(tokenizer.all_special_ids, [tokenizer.unk_token_id])
        self._docs = open_indexed(prefix)
        self._capacity = seq_length - 2
        self._doc_ends = np.cumsum(self._docs.sequence_lengths, dtype=np.int64)  # stream offset after each verse
        self.num_tokens = int(self._doc_ends[-1]) if len(self._doc_ends) else 0

    def __len__(self) -> int:
        return -(-self.num_tokens // self._capacity)

    def for_epoch(self, epoch: int) -> MaskedLMDataset:
        """The same sequences masked as epoch `epoch` masks them (epoch 0: as this dataset does)."""
        dataset = copy.copy(self)
        dataset.epoch = epoch
        return dataset

    def tokens(self, index: int) -> np.ndarray:
        """The unmasked tokens of sequence `index` (without <s>, </s> and padding)."""
        start = index * self._capacity
        end = min(start + self._capacity, self.num_tokens)
        first, last = np.searchsorted(self._doc_ends, [start, end - 1], side="right")
        parts = []
        for doc in range(int(first), int(last) + 1):
            doc_start = int(self._doc_ends[doc]) - int(self._docs.sequence_lengths[doc])
            lo, hi = max(start, doc_start), min(end, int(self._doc_ends[doc]))
            parts.append(self._docs.get(doc, offset=lo - doc_start, length=hi - lo))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} sequences")
        tokens = self.tokens(index)
        n = len(tokens)
        # epoch 0 seeds as before epochs varied the masks, so earlier runs stay reproducible
        rng = np.random.default_rng([self.seed, index] + ([self.epoch] if self.epoch else []))
        ordinary = ~np.isin(tokens, self._special_ids)
        selected = (rng.random(n) < self.mask_prob) & ordinary
        candidates = np.flatnonzero(ordinary)
        if not selected.any() and candidates.size:
            selected[candidates[rng.integers(candidates.size)]] = True
        action = rng.random(n)
        replacements = rng.choice(self._replacement_ids, size=n)
        masked = np.where(action < 0.8, self.mask_id, np.where(action < 0.9, replacements, tokens))

        input_ids = np.full(self.seq_length, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_length, IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros(self.seq_length, dtype=np.int64)
        input_ids[0], input_ids[n + 1] = self.bos_id, self.eos_id
        input_ids[1:n + 1] = np.where(selected, masked, tokens)
        labels[1:n + 1] = np.where(selected, tokens, IGNORE_INDEX)
        attention_mask[:n + 2] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
