"""Aligned multilingual word vectors: reading and writing them.

Formats (chosen by the file name; `.gz` on top of either is read through gzip):
- text (`.vec`, `.txt`): word2vec / fastText text format, an optional header line "<count> <dim>", then one line per
  word: the word and its values separated by spaces;
- binary (`.bin`): word2vec's C binary format, which gensim (`KeyedVectors.load_word2vec_format(binary=True)`,
  `save_word2vec_format(binary=True)`), word2vec and fastText's `.vec`-to-`.bin` tools all read and write: a header
  line "<count> <dim>", then per word its UTF-8 bytes, a space and <dim> little-endian float32 values. numpy reads it
  exactly; gensim itself is not a dependency here (its own pickle-based `.kv` files need gensim to read: export them
  with save_word2vec_format).

Keys follow OFA's convention: `<lang>:<word>` (e.g. `eng:house`, `sw:nyumba`) where <lang> is a configured language
code or its ISO 639-3 code (OFA's ColexNet+ uses those), and a key without one (no code of two or three letters
before a colon) is an English word, as OFA reads them; a file given with `lang` holds plain words of that language
instead. Only the configured languages' words are kept.
"""
from __future__ import annotations

import gzip
import io
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minimodel.config import require
from minimodel.errors import UserError

# ISO 639-3 codes of the corpora's languages (OFA's keys), mapped to this project's codes.
ISO3 = {"eng": "en", "fra": "fr", "spa": "es", "ita": "it", "deu": "de", "por": "pt", "tgl": "tl", "swh": "sw",
        "swa": "sw", "hin": "hi", "ben": "bn", "pes": "fa", "fas": "fa", "arb": "ar", "ara": "ar", "tur": "tr",
        "rus": "ru", "ukr": "uk", "pol": "pl", "ron": "ro", "ind": "id", "vie": "vi", "zho": "zh", "cmn": "zh",
        "jpn": "ja", "kor": "ko", "nya": "ny"}


class VectorFileError(UserError):
    """A word-vector file that cannot be used; the message names the file (and line) and the fix."""


@dataclass
class VectorFileConfig:
    path: str = ""
    lang: str | None = None  # every word in the file is this language's; None: keys are `<lang>:<word>`

    def validate(self) -> None:
        require(bool(self.path), "path", "name a word-vector file (.vec, .txt or .bin, optionally .gz)")


@dataclass
class WordVectors:
    """Vectors of (language, word) pairs: row i of `matrix` is the vector of `keys[i]`."""
    keys: list[tuple[str, str]]
    matrix: np.ndarray  # [n, dim] float32
    index: dict[tuple[str, str], int] = field(init=False, repr=False)

    def __post_init__(self):
        self.index = {key: i for i, key in enumerate(self.keys)}

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    def words(self, lang: str) -> list[str]:
        return [w for l, w in self.keys if l == lang]

    def rows(self, lang: str) -> np.ndarray:
        return np.array([i for i, (l, _) in enumerate(self.keys) if l == lang], dtype=np.int64)


def _split_key(key: str, file_lang: str | None, languages: set[str]) -> tuple[str, str] | None:
    """(language, word) for a key, or None when its language is not configured."""
    if file_lang is not None:
        return (file_lang, key) if file_lang in languages else None
    prefix, sep, word = key.partition(":")
    code = prefix in languages or 2 <= len(prefix) <= 3 and prefix.isascii() and prefix.isalpha()  # ISO 639-1/3
    if not sep or not code:  # no language in front (a word with a colon: 12:30): OFA reads it as English
        prefix, word = "eng", key
    lang = prefix if prefix in languages else ISO3.get(prefix, prefix)  # a language named by its ISO-3 code stays
    if not word or lang not in languages:
        return None
    return lang, word


def _open(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _format(path: Path) -> str:
    suffixes = path.suffixes[:-1] if path.suffix == ".gz" else path.suffixes
    last = suffixes[-1] if suffixes else ""
    if last in (".vec", ".txt"):
        return "text"
    if last == ".bin":
        return "binary"
    raise VectorFileError(f"{path}: unknown word-vector format {last or '(no extension)'!r}: name text files "
                          ".vec or .txt and word2vec binary files .bin (optionally .gz)")


def _header(line: bytes) -> tuple[int, int] | None:
    parts = line.split()
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


def _read_text(path: Path, file_lang, languages, dim: int | None):
    keys, rows = [], []
    with _open(path) as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and _header(raw) is not None:
                count, dim_in_header = _header(raw)
                if dim is not None and dim_in_header != dim:
                    raise VectorFileError(f"{path}, line 1: header says dimension {dim_in_header}, but the other "
                                          f"vectors have {dim}: every file must have the same dimension")
                dim = dim_in_header
                continue
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise VectorFileError(f"{path}, line {number}: not UTF-8 text: is it a binary file? name it .bin") \
                    from None
            if not text.strip():
                continue
            parts = text.rstrip().split(" ")
            if len(parts) < 2:
                raise VectorFileError(f"{path}, line {number}: malformed line (a word and its values expected, "
                                      f"got {text[:60]!r})")
            try:
                values = np.array(parts[1:], dtype=np.float32)
            except ValueError:
                raise VectorFileError(f"{path}, line {number}: malformed line: the values after the word are not "
                                      f"all numbers ({text[:60]!r})") from None
            if dim is None:
                dim = len(values)
            elif len(values) != dim:
                raise VectorFileError(f"{path}, line {number}: dimension mismatch: {len(values)} values, expected "
                                      f"{dim} (the header's or the first vector's)")
            key = _split_key(parts[0], file_lang, languages)
            if key is not None:
                keys.append(key)
                rows.append(values)
    return keys, rows, dim


def _read_binary(path: Path, file_lang, languages, dim: int | None):
    keys, rows = [], []
    with _open(path) as f:
        header = _header(f.readline())
        if header is None:
            raise VectorFileError(f"{path}, line 1: a word2vec binary file starts with '<count> <dim>'")
        count, file_dim = header
        if dim is not None and file_dim != dim:
            raise VectorFileError(f"{path}, line 1: dimension mismatch: the file's vectors have dimension "
                                  f"{file_dim}, the other files' {dim}: every file must have the same dimension")
        width = 4 * file_dim
        for number in range(1, count + 1):
            word = bytearray()
            while (byte := f.read(1)) != b" ":
                if not byte:
                    raise VectorFileError(f"{path}, entry {number}: the file ends before its {count} entries "
                                          "(truncated?)")
                if byte != b"\n":  # word2vec writes a newline after each vector
                    word += byte
            data = f.read(width)
            if len(data) != width:
                raise VectorFileError(f"{path}, entry {number}: the file ends inside a vector (truncated?)")
            try:
                text = word.decode("utf-8")
            except UnicodeDecodeError:
                raise VectorFileError(f"{path}, entry {number}: the word is not UTF-8") from None
            key = _split_key(text, file_lang, languages)
            if key is not None:
                keys.append(key)
                rows.append(np.frombuffer(data, dtype="<f4").astype(np.float32))
    return keys, rows, file_dim


def load_word_vectors(files: list[VectorFileConfig], languages: list[str] | set[str]) -> WordVectors:
    """The configured languages' vectors from `files` (a key seen twice: the later file's vector); a file of another
    language (its `lang`) is not read: one file per language serves every target's adaptation."""
    languages = set(languages)
    if not files:
        raise VectorFileError("no word-vector file configured: learn them with pretrain/word_vectors.py or name "
                              "a .vec/.bin file")
    merged: dict[tuple[str, str], np.ndarray] = {}
    dim = None
    for file in files:
        path = Path(file.path)
        if not path.is_file():
            raise VectorFileError(f"{path}: no such word-vector file: learn vectors with pretrain/word_vectors.py "
                                  f"or fix the path")
        if file.lang is not None and file.lang not in languages:  # another target's file (one file per language)
            continue
        reader = _read_text if _format(path) == "text" else _read_binary
        keys, rows, dim = reader(path, file.lang, languages, dim)
        merged.update(zip(keys, rows))
    if not merged:
        raise VectorFileError(f"{', '.join(f.path for f in files)}: no file holds a vector of the configured languages "
                              f"{sorted(languages)}: set each file's lang (or its keys' '<lang>:' prefixes) or the "
                              "languages")
    keys = list(merged)
    return WordVectors(keys, np.stack([merged[k] for k in keys]).astype(np.float32))


def write_word2vec_binary(vectors: WordVectors, path: str | os.PathLike) -> Path:
    """word2vec binary format, keys `<lang>:<word>`; written beside `path` and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(f"{len(vectors.keys)} {vectors.dim}\n".encode())
            for (lang, word), row in zip(vectors.keys, vectors.matrix):
                f.write(f"{lang}:{word} ".encode("utf-8") + row.astype("<f4").tobytes() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
