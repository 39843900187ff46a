"""megatron-core indexed datasets (`<prefix>.bin` + `<prefix>.idx`): one document per verse (or text document), packed
into training sequences by minimodel/data/mlm.py."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np


def load_megatron_datasets():
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


class _Writer:
    def __init__(self, builder, dtype):
        self._builder = builder
        self._dtype = dtype

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=self._dtype)
        self._builder.add_document(ids, [ids.size])


@contextlib.contextmanager
def write_indexed(prefix: str | os.PathLike, vocab_size: int) -> Iterator[_Writer]:
    """`with write_indexed(prefix, vocab_size) as w: w.add(ids)`; the .idx is written (and both files synced) on
    a clean exit only."""
    mod = load_megatron_datasets()
    prefix = str(prefix)
    dtype = mod.DType.optimal_dtype(vocab_size)
    builder = mod.IndexedDatasetBuilder(mod.get_bin_path(prefix), dtype=dtype)
    try:
        yield _Writer(builder, dtype)
    except BaseException:
        builder.data_file.close()
        raise
    builder.finalize(mod.get_idx_path(prefix))
    for path in (mod.get_bin_path(prefix), mod.get_idx_path(prefix)):
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def open_indexed(prefix: str | os.PathLike):
    """The megatron-core IndexedDataset at `prefix` (memory-mapped)."""
    mod = load_megatron_datasets()
    prefix = str(prefix)
    if not mod.IndexedDataset.exists(prefix):
        raise FileNotFoundError(f"no indexed dataset at {prefix} (.bin/.idx): build it with "
                                f"pretrain/prepare_data.py, and pass the path without the extension")
    return mod.IndexedDataset(prefix)

