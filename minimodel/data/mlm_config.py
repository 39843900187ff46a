"""The data section of a masked-LM training stage's config (MiniJoint pretraining, MiniPost): which prepared corpus
(pretrain/prepare_data.py) to train and validate on, and how to mask it. A plain dataclass: loading a config does
not import torch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from minimodel.config import ConfigError, require
from minimodel.data.mlm import MaskedLMDataset

_FIX = "build them with: python pretrain/prepare_data.py --config configs/data/default.yaml"


@dataclass
class MLMDataConfig:
    train_prefix: str = "data/default/en/train"  # megatron indexed dataset, path without .bin/.idx
    valid_prefix: str = "data/default/en/valid"  # held-out text: validation loss (and MiniPost's alignment report)
    tokenizer_dir: str = "data/default/en/tokenizer"  # the data's tokenizer: must have the model's vocabulary
    source_lang: str = "en"
    mask_prob: float = 0.15

    def validate(self) -> None:
        require(0.0 < self.mask_prob < 1.0, "data.mask_prob", f"{self.mask_prob} must be in (0, 1)")

    def check_files(self) -> None:
        """The inputs exist (checked at start-up, not at config load, so configs load without the data)."""
        for key in ("train_prefix", "valid_prefix"):
            prefix = getattr(self, key)
            for ext in (".bin", ".idx"):
                if not Path(prefix + ext).is_file():
                    raise ConfigError(f"data.{key}: {prefix}{ext} does not exist; {_FIX}")
        if not Path(self.tokenizer_dir).is_dir():
            raise ConfigError(f"data.tokenizer_dir: {self.tokenizer_dir} is not a directory; {_FIX}")
        self._check_encoded_with_tokenizer_dir()

    def _check_encoded_with_tokenizer_dir(self) -> None:
        """The data stage keeps each language's tokenizer beside its datasets (<lang>/{train,valid,tokenizer}): data
        encoded with another vocabulary than tokenizer_dir's would train on ids read as other tokens (every
        language's default vocabulary is 8000: nothing else would notice)."""
        from minimodel.data.tokenizer import load_tokenizer, tokenizer_fingerprint

        encoders: dict[Path, str] = {}  # each folder's tokenizer once: train and valid usually share it
        for key in ("train_prefix", "valid_prefix"):
            encoders.setdefault(Path(getattr(self, key)).parent / "tokenizer", key)
        given = None
        for encoded_with, key in encoders.items():
            if not encoded_with.is_dir() or encoded_with.resolve() == Path(self.tokenizer_dir).resolve():
                continue
            given = given or tokenizer_fingerprint(load_tokenizer(self.tokenizer_dir))
            if tokenizer_fingerprint(load_tokenizer(encoded_with)) != given:
                raise ConfigError(f"data.{key}: {getattr(self, key)} was encoded with {encoded_with}, another "
                                  f"vocabulary than data.tokenizer_dir={self.tokenizer_dir}: set "
                                  f"data.tokenizer_dir={encoded_with}, or use data encoded with it")

    def dataset(self, split: Literal["train", "valid"], tokenizer, seq_length: int, seed: int):
        """The split as a MaskedLMDataset of `seq_length`-token sequences, masked with `seed`."""
        prefix = self.train_prefix if split == "train" else self.valid_prefix
        return MaskedLMDataset(prefix, tokenizer, seq_length, self.mask_prob, seed=seed)
