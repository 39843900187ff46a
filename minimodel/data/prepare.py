"""The data stage: corpora -> cleaned, deduplicated verses -> train/valid split -> tokenizers -> indexed datasets.

Layout under `output_dir`, per language L:
    <L>/tokenizer/                 Hugging Face tokenizer directory: trained here (XLM-R ids), or the files of a given
                                   tokenizer of any family (languages.<L>.tokenizer, tokenizer.pretrained)
    <L>/train.bin|.idx, valid.*    megatron-core IndexedDataset, one document per verse (ids without <s> </s>)
    <L>/verses.jsonl               the documents in the order they were written, with their split
    <L>/build.json                 completion marker: input hash, file sizes, counts
    <L>/.minimodel-config.json     the language's provenance record (minimodel/provenance.py, a part): its settings
                                   (the config less the other languages'), its input hash as digest
    manifest.json                  what was built; config.yaml: the resolved config

A language's documents are written to its verses.jsonl as they are read (deduplicated by a digest of each) and read
back from it to train its tokenizer and to encode: memory does not grow with the corpus, but for the tokenizer's
sample (tokenizer.input_sentence_size pieces, which SentencePiece holds).

A language is built in a hidden sibling directory and renamed into place only once complete, so an interrupted
build never leaves a directory that looks finished; the next run removes the leftover and rebuilds. A language
whose build.json matches the current input hash (config, source fingerprints, code versions) and whose files have
their recorded sizes is not rebuilt: re-running with the same inputs changes nothing.

Provenance is per language: adding a language builds that language only and leaves the others' records, and so
every stage that read them (pretraining on en/, the adaptation to sw), valid. A changed setting of a language
(its sources, vocab_size, or a shared one) rebuilds it, logging the keys; the stages that consumed it then refuse
their old result (or redo it) naming the keys.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from minimodel.config import require, save_config
from minimodel.data.clean import CLEANING_VERSION, clean_verse, normalize_spaces
from minimodel.data.corpora import Document, Source, SourceConfig, SourceError, split_verse_id
from minimodel.data.indexed import load_megatron_datasets, write_indexed
from minimodel.data.tokenizer import (TokenizerError, copy_tokenizer, is_tokenizer_file, load_tokenizer, make_encoder,
                                      train_tokenizer)
from minimodel.hf import is_tokenizer_dir
from minimodel import faults
from minimodel.files import replace_dir, write_text_atomic
from minimodel import provenance
from minimodel.provenance import claim_output, finish_output
from minimodel.stages import StageResult
from minimodel.tracking import Tracker, TrackingConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the output layout, packing or text normalisation changes (2: Unicode NFC)
SPLITS = ("train", "valid")
BUILD_MARKER = "build.json"
VERSES = "verses.jsonl"
MANIFEST = "manifest.json"
# a language whose tokens are <unk> this often is refused (above a twentieth, warned about): a script the tokenizer
# lacks gives a <unk> per word (about half the tokens, with the word markers), not "mostly" <unk> by count
UNK_REFUSED, UNK_WARNED = 0.25, 0.05
ENCODE_BATCH = 4096


@dataclass
class LanguageConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # read in order and concatenated
    vocab_size: int | None = None  # None: tokenizer.vocab_size
    # an existing Hugging Face tokenizer (or model) directory for this language instead of a trained tokenizer, e.g.
    # the primary model's for the source language; overrides tokenizer.pretrained
    tokenizer: str | None = None


@dataclass
class TokenizerConfig:
    vocab_size: int = 8000  # total, as the model sees it: pieces + <s> <pad> </s> <unk> <mask>
    model_type: str = "unigram"
    character_coverage: float = 0.9995
    seed: int = 0
    num_threads: int = 1  # SentencePiece's result depends on it: part of reproducibility, not of the machine
    # documents (each long one as pieces of up to 16k characters) sampled with seed to train on; 0: all.
    # SentencePiece holds the sample, about 20 bytes a character: lower it for long documents (web pages)
    input_sentence_size: int = 1_000_000
    joint: bool = False  # one tokenizer over all languages (copied into each <L>/tokenizer) instead of one each
    # An existing Hugging Face tokenizer directory (e.g. models/xlm-roberta-base) used for every language instead
    # of training one: the data for a pretrained model (MiniPost from XLM-R). Any family (is_tokenizer_file).
    pretrained: str | None = None

    def validate(self) -> None:
        # XLMRobertaTokenizer is a unigram model; a SentencePiece BPE/word model converted to it segments text
        # differently from SentencePiece itself (measured), so the ids in the datasets would not be the model's.
        require(self.model_type == "unigram", "tokenizer.model_type",
                f"{self.model_type!r} is not supported: the XLM-R tokenizer format is a unigram model; use unigram")
        require(0.9 <= self.character_coverage <= 1.0, "tokenizer.character_coverage",
                "must be in [0.9, 1] (0.9995 for alphabetic scripts, lower only for very large alphabets)")
        require(self.num_threads >= 1, "tokenizer.num_threads", "must be >= 1")
        require(self.input_sentence_size >= 0, "tokenizer.input_sentence_size", "must be >= 0 (0: all sentences)")
        if self.pretrained is not None:
            _check_tokenizer_dir(self.pretrained, "tokenizer.pretrained")
            require(not self.joint, "tokenizer.joint", "a pretrained tokenizer is shared by every language already: "
                    "set joint=false")


@dataclass
class DataConfig:
    output_dir: str = "data/default"
    languages: dict[str, LanguageConfig] = field(default_factory=dict)
    books: list[int] = field(default_factory=list)  # Bible books kept (1-66); empty: all. Free text is always kept
    valid_fraction: float = 0.05  # share of verse ids held out, the same ids in every language
    split_seed: int = 0
    clean: bool = True  # remove headings, cross-references, footnote marks from verses (minimodel/data/clean.py)
    dedup: bool = True  # drop documents whose cleaned text already occurred in the language
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        require(bool(self.languages), "languages", "no language configured: add e.g. languages.en.sources "
                "(see configs/data/default.yaml)")
        for lang, lc in self.languages.items():
            require(lang.replace("_", "").replace("-", "").isalnum(), f"languages.{lang}",
                    "a language code is letters/digits (it names the output directory)")
            require(bool(lc.sources), f"languages.{lang}.sources", "is empty: list at least one source")
            for i, src in enumerate(lc.sources):
                src.check(f"languages.{lang}.sources[{i}]", lang)
            require(self.vocab_size(lang) > 5, f"languages.{lang}.vocab_size", "must be > 5")
            if lc.tokenizer is not None:
                _check_tokenizer_dir(lc.tokenizer, f"languages.{lang}.tokenizer")
                require(not self.tokenizer.joint, "tokenizer.joint", f"languages.{lang} has its own tokenizer: a "
                        "joint tokenizer would replace it; set joint=false")
        require(all(1 <= b <= 66 for b in self.books), "books", "Bible books are numbered 1 (Genesis) to 66")
        require(0.0 < self.valid_fraction < 1.0, "valid_fraction",
                "must be in (0, 1): every training stage evaluates on the held-out split")
        if self.tokenizer.joint:
            sizes = {self.vocab_size(lang) for lang in self.languages}
            require(len(sizes) == 1, "tokenizer.joint", "a joint tokenizer has one vocabulary size: remove the "
                    "per-language vocab_size settings")

    def vocab_size(self, lang: str) -> int:
        return self.languages[lang].vocab_size or self.tokenizer.vocab_size

    def given_tokenizer(self, lang: str) -> str | None:
        """The existing tokenizer directory `lang` is encoded with; None: a tokenizer is trained for it."""
        return self.languages[lang].tokenizer or self.tokenizer.pretrained


def _check_tokenizer_dir(path: str, key: str) -> None:
    require(is_tokenizer_dir(path), key, f"{path} is not a Hugging Face tokenizer directory (no tokenizer_config.json "
            "or tokenizer.json): give a directory saved with save_pretrained, e.g. the model's own directory")


# -- split, cleaning, dedup ---------------------------------------------------------------------------------------

def _unit_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64


def split_of(doc: Document, valid_fraction: float, seed: int) -> str:
    """'valid' for a fixed pseudo-random share of verse ids (the same ids in every language), else 'train'.
    Free text without a verse id is split by a hash of its text."""
    key = f"{seed}:verse:{doc.verse_id}" if doc.verse_id is not None else f"{seed}:text:{doc.text}"
    return "valid" if _unit_hash(key) < valid_fraction else "train"


@dataclass
class Record:
    text: str
    verse_id: int | None
    source: str
    split: str

    def to_json(self) -> str:
        book, chapter, verse = split_verse_id(self.verse_id) if self.verse_id is not None else (None, None, None)
        return json.dumps({"verse_id": self.verse_id, "book": book, "chapter": chapter, "verse": verse,
                           "text": self.text, "split": self.split, "source": self.source}, ensure_ascii=False)


@dataclass
class Collected:
    """A language's documents as collected (cleaned, filtered, deduplicated, split), spooled to `path` one Record
    per line (the language's verses.jsonl): read again as often as needed, never all held in memory."""
    path: Path
    counts: dict[str, int]  # documents per split
    dropped: dict[str, int]

    def __iter__(self) -> Iterator[Record]:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                yield Record(row["text"], row["verse_id"], row["source"], row["split"])

    def texts(self, split: str) -> Iterable[str]:
        """The texts of one split, in order, as an iterable that reads them anew each time (a tokenizer's two
        passes)."""
        return _Texts([self], split)


class _Texts:
    def __init__(self, collected: list[Collected], split: str):
        self.collected, self.split = collected, split

    def __iter__(self) -> Iterator[str]:
        return (r.text for c in self.collected for r in c if r.split == self.split)


def collect(cfg: DataConfig, sources: list[Source], into: Path) -> Collected:
    """A language's documents, in source order then document order: cleaned, filtered, deduplicated (by a digest of
    each text: a corpus larger than memory), split, and written to `into`."""
    books = set(cfg.books)
    seen: set[bytes] = set()
    counts, dropped = {split: 0 for split in SPLITS}, {"empty": 0, "duplicate": 0}
    with open(into, "w", encoding="utf-8") as spool:
        for source in sources:
            name = source.cfg.describe()
            for doc in source.documents():
                if doc.verse_id is not None:
                    if books and doc.verse_id // 1_000_000 not in books:
                        continue
                    text = clean_verse(doc.text, doc.verse_id) if cfg.clean else normalize_spaces(doc.text)
                else:
                    text = normalize_spaces(doc.text)
                if not text:
                    dropped["empty"] += 1
                    continue
                if cfg.dedup:
                    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
                    if digest in seen:
                        dropped["duplicate"] += 1
                        continue
                    seen.add(digest)
                split = split_of(Document(text, doc.verse_id), cfg.valid_fraction, cfg.split_seed)
                spool.write(Record(text, doc.verse_id, name, split).to_json() + "\n")
                counts[split] += 1
    return Collected(into, counts, dropped)


def _check_splits(cfg: DataConfig, lang: str, collected: Collected) -> None:
    """Both splits hold text, or a SourceError that says what the sources gave and what to change."""
    counts, dropped = collected.counts, collected.dropped
    empty = [split for split in SPLITS if not counts[split]]
    if not empty:
        return
    if not sum(counts.values()):
        fix = "check that the sources hold text (the field read, the path" + (", `books`" if cfg.books else "") + ")"
    elif "valid" in empty:
        fix = f"raise valid_fraction (now {cfg.valid_fraction}) or add text"
    else:
        fix = f"lower valid_fraction (now {cfg.valid_fraction}) or add text"
    raise SourceError(
        f"languages.{lang}: the {' and '.join(empty)} split(s) would be empty: {counts['train']} train and "
        f"{counts['valid']} valid documents from {', '.join(s.describe() for s in cfg.languages[lang].sources)} "
        f"({dropped['empty']} empty, {dropped['duplicate']} duplicate dropped"
        f"{f'; books {cfg.books}' if cfg.books else ''}): {fix}")


# -- hashing and completion markers -------------------------------------------------------------------------------

def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def language_hash(cfg: DataConfig, lang: str, fingerprints: dict[str, list[str]]) -> str:
    """Everything a language's output depends on. With a joint tokenizer that is every language's input. A language
    encoded with a given tokenizer depends on its content, not on the settings of the tokenizers trained here (a new
    target vocabulary size would otherwise rebuild the source language and redo everything made from it)."""
    langs = list(cfg.languages) if cfg.tokenizer.joint else [lang]
    given = cfg.given_tokenizer(lang)
    return _digest({
        "format": FORMAT_VERSION, "cleaning": CLEANING_VERSION if cfg.clean else None, "lang": lang,
        "inputs": {l: {"sources": [dataclasses.asdict(s) for s in cfg.languages[l].sources],
                       "fingerprints": fingerprints[l]} for l in langs},
        "books": sorted(cfg.books), "valid_fraction": cfg.valid_fraction, "split_seed": cfg.split_seed,
        "clean": cfg.clean, "dedup": cfg.dedup, "tokenizer": None if given else dataclasses.asdict(cfg.tokenizer),
        "vocab_size": None if given else cfg.vocab_size(lang), "pretrained_tokenizer": _pretrained_fingerprint(given),
        "libraries": {p: metadata.version(p) for p in ("sentencepiece", "transformers", "megatron-core")},
    })


def language_fingerprint(cfg: DataConfig, lang: str, input_hash: str) -> dict:
    """The provenance record of `<output_dir>/<lang>` (a part): its digest is the language's input hash, its config
    the data config less the other languages' keys (all of them count with a joint tokenizer)."""
    others = () if cfg.tokenizer.joint else tuple(f"languages.{other}" for other in cfg.languages if other != lang)
    return provenance.part_fingerprint(cfg, input_hash, ignore=others)


def _pretrained_fingerprint(tokenizer_dir: str | None) -> str | None:
    """A given tokenizer's content (its files may change under the same path)."""
    if tokenizer_dir is None:
        return None
    files = sorted(p for p in Path(tokenizer_dir).iterdir() if is_tokenizer_file(p.name))
    return _digest({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files})


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_build(lang_dir: Path) -> dict | None:
    return _read_json(lang_dir / BUILD_MARKER)


def is_complete(lang_dir: Path, input_hash: str) -> bool:
    """True if `lang_dir` holds a finished build of exactly these inputs with every file at its recorded size."""
    build = read_build(lang_dir)
    if build is None or build.get("input_hash") != input_hash:
        return False
    for name, size in build["files"].items():
        path = lang_dir / name
        if not path.is_file() or path.stat().st_size != size:
            log.warning("%s: %s is missing or has the wrong size: rebuilding", lang_dir, name)
            return False
    return True


@contextlib.contextmanager
def _locked(out: Path):
    """One build per output directory at a time (e.g. several jobs of a pipeline starting together); the lock lies
    beside it (inside, it would be a file no stage's record covers)."""
    with open(out.parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_interrupted(out: Path) -> None:
    for leftover in sorted(out.glob(".*.partial-*")) + sorted(out.glob(".*.old-*")):
        log.warning("removing %s, left by an interrupted build", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


# -- building one language ------------------------------------------------------------------------------------------

def _train_tokenizer(cfg: DataConfig, texts: Iterable[str], out_dir: Path, vocab_size: int) -> Path:
    t = cfg.tokenizer
    return train_tokenizer(texts, out_dir, vocab_size, model_type=t.model_type,
                           character_coverage=t.character_coverage, seed=t.seed, num_threads=t.num_threads,
                           input_sentence_size=t.input_sentence_size)


def build_language(cfg: DataConfig, lang: str, tmp: Path, collected: Collected, input_hash: str, out: Path,
                   joint_tokenizer: Path | None = None) -> dict:
    """Build `<out>/<lang>` in the hidden directory `tmp` (which holds the collected documents, its verses.jsonl)
    and rename it into place once complete, with its provenance record; returns its stats."""
    start = time.perf_counter()
    given = cfg.given_tokenizer(lang)
    if given is not None:  # its tokenizer files only: the directory may hold a model too
        copy_tokenizer(given, tmp / "tokenizer")
        log.info("%s: encoding with the given tokenizer %s", lang, given)
    elif joint_tokenizer is not None:
        shutil.copytree(joint_tokenizer, tmp / "tokenizer")
    else:
        log.info("%s: training a %d-token tokenizer on %d documents", lang, cfg.vocab_size(lang),
                 collected.counts["train"])
        _train_tokenizer(cfg, collected.texts("train"), tmp / "tokenizer", cfg.vocab_size(lang))
    tokenizer = load_tokenizer(tmp / "tokenizer")
    vocab_size = len(tokenizer)
    encoder = make_encoder(tmp / "tokenizer", [r.text for r in itertools.islice(collected, 64)])
    unknown = 0

    docs = {split: 0 for split in SPLITS}
    tokens = {split: 0 for split in SPLITS}
    with contextlib.ExitStack() as stack:
        writers = {split: stack.enter_context(write_indexed(tmp / split, vocab_size)) for split in SPLITS}
        bar = stack.enter_context(tqdm(total=sum(collected.counts.values()), desc=f"{lang}: tokenize + write",
                                       unit="doc", dynamic_ncols=True))
        records = iter(collected)
        while batch := list(itertools.islice(records, ENCODE_BATCH)):
            for record, ids in zip(batch, encoder.encode([r.text for r in batch])):
                writers[record.split].add(ids)
                docs[record.split] += 1
                tokens[record.split] += len(ids)
                unknown += int((ids == tokenizer.unk_token_id).sum())
            bar.update(len(batch))
    _check_unknown(cfg, lang, unknown / max(sum(tokens.values()), 1), tmp)
    seconds = time.perf_counter() - start
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    stats = {"documents": docs, "tokens": tokens, "dropped": collected.dropped, "vocab_size": vocab_size,
             "unk_fraction": round(unknown / max(sum(tokens.values()), 1), 6), "encoder": type(encoder).__name__,
             "sources": [s.describe() for s in cfg.languages[lang].sources], "seconds": round(seconds, 2)}
    write_text_atomic(tmp / BUILD_MARKER, json.dumps({"input_hash": input_hash, "files": files, **stats}, indent=2))
    # after build.json's file list: the record may be rewritten in place (settings that do not change the build)
    provenance.write_part(tmp, language_fingerprint(cfg, lang, input_hash), replaces=out / lang)

    faults.point("build")
    replace_dir(tmp, out / lang)
    return stats


def _check_unknown(cfg: DataConfig, lang: str, fraction: float, tmp: Path) -> None:
    """Refuse (or warn about) text the tokenizer cannot read: a model's tokenizer given for a script it lacks."""
    if fraction <= UNK_WARNED:
        return
    where = f"{lang}: the tokenizer {cfg.given_tokenizer(lang) or 'trained here'} maps {fraction:.0%} of the tokens " \
            f"of {', '.join(s.describe() for s in cfg.languages[lang].sources)} to its unknown token"
    if fraction > UNK_REFUSED:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TokenizerError(f"{where}: it does not cover this language's script. Train a tokenizer for it (drop "
                             f"languages.{lang}.tokenizer / tokenizer.pretrained: the language then gets its own) "
                             f"or use a model whose tokenizer covers the script")
    log.warning("%s: check that the tokenizer covers the language's script", where)


# -- the stage -------------------------------------------------------------------------------------------------------

def _summary(stats: dict[str, dict], built: list[str], seconds: float) -> str:
    header = f"{'lang':<6}{'train docs':>11}{'valid docs':>11}{'train tokens':>14}{'valid tokens':>14}" \
             f"{'vocab':>7}{'dups':>6}{'unk':>7}{'tokens/s':>11}{'encoder':>13}  sources"
    lines = [header, "-" * len(header)]
    for lang, s in stats.items():
        d, t = s["documents"], s["tokens"]
        rate = f"{sum(t.values()) / s['seconds']:,.0f}" if lang in built and s["seconds"] > 0 else "(cached)"
        lines.append(f"{lang:<6}{d['train']:>11,}{d['valid']:>11,}{t['train']:>14,}{t['valid']:>14,}"
                     f"{s['vocab_size']:>7}{s['dropped']['duplicate']:>6}{s.get('unk_fraction', 0):>7.1%}{rate:>11}"
                     f"{s.get('encoder', '?'):>13}  {', '.join(s['sources'])}")
    total_docs = sum(sum(s["documents"].values()) for s in stats.values())
    total_tokens = sum(sum(s["tokens"].values()) for s in stats.values())
    built_tokens = sum(sum(stats[lang]["tokens"].values()) for lang in built)
    lines.append(f"total: {total_docs:,} documents, {total_tokens:,} tokens; built {len(built)} language(s) in "
                 f"{seconds:.1f} s ({built_tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    return "\n".join(lines)


def _build(cfg: DataConfig, todo: list[str], sources: dict[str, list[Source]], hashes: dict[str, str],
           out: Path) -> None:
    """Build the languages in `todo`, each in a hidden directory that only a complete build leaves (renamed into
    place), one language's documents in memory at a time: a batch of them."""
    if not todo:
        return
    partial = {lang: out / f".{lang}.partial-{uuid.uuid4().hex[:8]}" for lang in todo}
    joint = None
    try:
        collected = {}
        for lang in todo:
            partial[lang].mkdir()
            collected[lang] = collect(cfg, sources[lang], partial[lang] / VERSES)
            _check_splits(cfg, lang, collected[lang])
        load_megatron_datasets()  # its import takes seconds: keep it out of the per-language timings
        if cfg.tokenizer.joint:  # every language is in todo: the joint tokenizer needs every language's text
            joint = out / f".joint-tokenizer.partial-{uuid.uuid4().hex[:8]}"
            # in sorted order, as the hash sees the languages: a reordered config trains the same tokenizer
            texts = _Texts([collected[lang] for lang in sorted(cfg.languages)], "train")
            log.info("training a joint %d-token tokenizer on %d documents", cfg.tokenizer.vocab_size,
                     sum(c.counts["train"] for c in collected.values()))
            _train_tokenizer(cfg, texts, joint, cfg.tokenizer.vocab_size)
        for lang in todo:
            build_language(cfg, lang, partial[lang], collected[lang], hashes[lang], out, joint)
    finally:  # what did not become a language (a built one was renamed away)
        for path in [*partial.values(), *([joint] if joint else [])]:
            shutil.rmtree(path, ignore_errors=True)


def _report(tracker: Tracker, stats: dict[str, dict], built: list[str], seconds: float) -> None:
    log.info("\n%s", _summary(stats, built, seconds))
    metrics = {"seconds": seconds}
    for lang, s in stats.items():
        for split in SPLITS:
            metrics[f"{lang}.{split}_documents"] = s["documents"][split]
            metrics[f"{lang}.{split}_tokens"] = s["tokens"][split]
    built_tokens = sum(sum(stats[lang]["tokens"].values()) for lang in built)
    metrics["tokens_per_s"] = built_tokens / max(seconds, 1e-9)
    tracker.log_metrics(metrics, step=0)


def _finish(cfg: DataConfig, out: Path, hashes: dict[str, str]) -> None:
    """Every language's record (a language built before records were per language gets one now), then the
    whole's, listing the languages' digests."""
    for lang in cfg.languages:
        provenance.write_part(out / lang, language_fingerprint(cfg, lang, hashes[lang]))
    finish_output(out, cfg, parts=hashes)


def prepare_data(cfg: DataConfig) -> StageResult:
    """Build every configured language under cfg.output_dir (skipping up-to-date ones); outputs: the manifest's
    path."""
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        claim_output(out, cfg, resumable=False)
        _remove_interrupted(out)
        sources = {lang: [Source(s) for s in lc.sources] for lang, lc in cfg.languages.items()}
        fingerprints = {lang: [s.fingerprint for s in srcs] for lang, srcs in sources.items()}
        hashes = {lang: language_hash(cfg, lang, fingerprints) for lang in cfg.languages}
        input_hash = _digest(hashes)
        todo = [lang for lang in cfg.languages if not is_complete(out / lang, hashes[lang])]
        if todo and cfg.tokenizer.joint:  # one tokenizer trained now: every language encoded with it, none kept
            todo = list(cfg.languages)
        for lang in todo:
            changed = provenance.differences(old, language_fingerprint(cfg, lang, hashes[lang])) \
                if (old := provenance.read(out / lang)) is not None else []
            if changed:
                log.info("%s: settings changed (%s): rebuilding it", lang, "; ".join(changed))
        manifest_path = out / MANIFEST
        old_manifest = _read_json(manifest_path) or {}
        tags = {"stage": "data", "method": "prepare_data", "languages": ",".join(cfg.languages)}
        with Tracker(cfg.tracking, config=cfg, tags=tags) as tracker:
            if not todo and old_manifest.get("input_hash") == input_hash:
                log.info("%s is up to date (input hash %s): nothing to do", out, input_hash[:12])
                tracker.set_tags({"up_to_date": True})
                _finish(cfg, out, hashes)
                return StageResult("finished", {"manifest": manifest_path})
            for lang in cfg.languages:
                log.info("%s: %s", lang, "building" if lang in todo else "up to date, kept")

            _build(cfg, todo, sources, hashes, out)
            stats = {lang: {k: v for k, v in read_build(out / lang).items() if k not in ("files", "input_hash")}
                     for lang in cfg.languages}
            manifest = {"format": FORMAT_VERSION, "input_hash": input_hash, "valid_fraction": cfg.valid_fraction,
                        "split_seed": cfg.split_seed, "books": cfg.books, "joint_tokenizer": cfg.tokenizer.joint,
                        "languages": {lang: {"hash": hashes[lang], **stats[lang]} for lang in cfg.languages}}
            save_config(cfg, out / "config.yaml")
            write_text_atomic(manifest_path, json.dumps(manifest, indent=2))
            _report(tracker, stats, todo, time.perf_counter() - start)
            tracker.log_artifact(manifest_path)
        _finish(cfg, out, hashes)
        return StageResult("finished", {"manifest": manifest_path})
