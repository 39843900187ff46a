"""Learn aligned multilingual word vectors from verse-parallel text, and measure how well they are aligned.

Method (the "inverted index" of Søgaard et al., 2015, with the PPMI weighting of Levy et al., 2015): one row per
(language, word) of the training verses, one column per verse id. Every language's Bible has the same verse ids, so a
word and its translation occur in the same columns and get similar rows whatever their language. Each language's
block of counts becomes positive PMI against its own marginals (so a large language does not set the others' scale;
column probabilities smoothed with exponent 0.75), the blocks are stacked, and a truncated SVD (randomized, seeded)
gives U_d sqrt(S_d): the vectors, normalised to unit length. Keys are `<lang>:<word>`, as OFA's ColexNet+ vectors.

Alignment is measured on verses the vectors never saw (the data config's held-out split): gold translation pairs are
the mutual best Dice matches of words over the held-out verses (a word and its translation occur in the same verses),
and precision@k is the share of gold pairs whose target word is among the k target-language words nearest (cosine)
to the source word. The gold pairs are noisy (occurrence matching, not a dictionary): read the figures as a
comparison between settings, not as dictionary-induction accuracy.

Writes, under output_dir: vectors.bin (word2vec binary, see minimodel/ofa/vectors.py), summary.json (sizes, the
alignment figures, sample pairs; written last: its presence marks a complete build of its `input_hash`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from collections import Counter
from importlib import metadata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.utils.extmath import randomized_svd
from tqdm import tqdm

from minimodel.config import load_config, require, save_config, to_dict
from minimodel.errors import UserError
from minimodel.data.corpora import Source
from minimodel.data.clean import CLEANING_VERSION
from minimodel.data.prepare import FORMAT_VERSION, DataConfig, collect
from minimodel.files import write_text_atomic
from minimodel.manifest import file_sha256
from minimodel.ofa.vectors import WordVectors, write_word2vec_binary
from minimodel.provenance import claim_output, finish_output, reopen_output
from minimodel.stages import StageResult

log = logging.getLogger(__name__)

# Letters, with inner apostrophes kept (Chichewa ng'ombe); digits and punctuation are not words.
WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")
VECTORS_FILE = "vectors.bin"
SUMMARY_FILE = "summary.json"


def words_of(text: str) -> list[str]:
    return WORD.findall(text.lower())


@dataclass
class AlignmentEvalConfig:
    source_lang: str = "en"  # pairs are source -> each other language
    min_verses: int = 5  # a word takes part in gold pairs if it occurs in at least this many held-out verses
    min_dice: float = 0.5  # and its mutual best match has at least this Dice coefficient
    ks: list[int] = field(default_factory=lambda: [1, 10])


@dataclass
class WordVectorConfig:
    data: str = "configs/data/default.yaml"  # the data config: its corpora, books and train/held-out verse split
    languages: list[str] = field(default_factory=list)  # empty: every language of the data config
    output_dir: str = "data/word_vectors"
    dim: int = 200  # OFA's ColexNet+ vectors are 200-d
    min_count: int = 3  # words seen fewer times in the training verses get no vector
    context_smoothing: float = 0.75  # exponent on the verse (context) probabilities in PMI
    svd_iterations: int = 7
    seed: int = 0
    eval: AlignmentEvalConfig = field(default_factory=AlignmentEvalConfig)

    def validate(self) -> None:
        require(self.dim >= 2, "dim", "must be >= 2")
        require(self.min_count >= 1, "min_count", "must be >= 1")
        require(0 < self.context_smoothing <= 1, "context_smoothing", "must be in (0, 1]")
        require(all(k >= 1 for k in self.eval.ks), "eval.ks", "must be >= 1")


@dataclass
class VerseText:
    """One language's verses as word lists, by split."""
    train: list[tuple[int, list[str]]]
    held_out: list[tuple[int, list[str]]]


def read_languages(cfg: WordVectorConfig) -> dict[str, VerseText]:
    data = load_config(DataConfig, cfg.data)
    langs = cfg.languages or list(data.languages)
    missing = [lang for lang in langs if lang not in data.languages]
    require(not missing, "languages", f"{missing} are not languages of the data config {cfg.data} "
            f"({', '.join(data.languages)}): add them there or drop them here")
    require(len(langs) >= 2, "languages", "aligning words needs at least two languages")
    require(cfg.eval.source_lang in langs, "eval.source_lang", f"{cfg.eval.source_lang!r} is not one of {langs}")
    out = {}
    for lang in tqdm(langs, desc="read verses", unit="lang", dynamic_ncols=True):
        with tempfile.TemporaryDirectory() as tmp:  # the documents as the data stage collects them
            collected = collect(data, [Source(s) for s in data.languages[lang].sources], Path(tmp) / "verses.jsonl")
            verses = [(r.verse_id, words_of(r.text), r.split) for r in collected if r.verse_id is not None]
        if not verses:
            raise UserError(f"{lang}: no Bible verse in its sources: word vectors are learned from verse-parallel "
                            f"text (sources with verse ids: verse_id or book/chapter/verse fields); drop {lang} from "
                            "languages or give it a verse-aligned source")
        out[lang] = VerseText([(v, w) for v, w, s in verses if s == "train"],
                              [(v, w) for v, w, s in verses if s == "valid"])
    return out


def ppmi(counts: sp.csr_matrix, smoothing: float) -> sp.csr_matrix:
    """max(0, log p(w, v) / (p(w) p_s(v))) over the nonzero counts, p_s(v) ~ count(v)^smoothing."""
    counts = counts.tocoo()
    total = counts.sum()
    p_word = np.asarray(counts.sum(axis=1)).ravel() / total
    col = np.asarray(counts.sum(axis=0)).ravel() ** smoothing
    p_verse = col / col.sum()
    pmi = np.log(counts.data / total / (p_word[counts.row] * p_verse[counts.col]))
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep], (counts.row[keep], counts.col[keep])), shape=counts.shape)


def learn_vectors(texts: dict[str, VerseText], cfg: WordVectorConfig) -> WordVectors:
    """Rows in language order, words sorted within a language: the same input gives the same file."""
    verse_ids = sorted({v for t in texts.values() for v, _ in t.train})
    column = {v: j for j, v in enumerate(verse_ids)}
    keys, blocks = [], []
    for lang, text in texts.items():
        frequency = Counter(w for _, ws in text.train for w in ws)
        vocab = sorted(w for w, c in frequency.items() if c >= cfg.min_count)
        row = {w: i for i, w in enumerate(vocab)}
        cells = Counter((row[w], column[v]) for v, ws in text.train for w in ws if w in row)
        (r, c), n = (zip(*cells) if cells else ((), ())), list(cells.values())
        counts = sp.csr_matrix((np.array(n, dtype=np.float64), (np.array(r), np.array(c))),
                               shape=(len(vocab), len(verse_ids)))
        blocks.append(ppmi(counts, cfg.context_smoothing))
        keys += [(lang, w) for w in vocab]
        log.info("%s: %d words with >= %d occurrences in %d training verses", lang, len(vocab), cfg.min_count,
                 len(text.train))
    matrix = sp.vstack(blocks).tocsr()
    dim = min(cfg.dim, min(matrix.shape) - 1)
    log.info("truncated SVD of the %d x %d PPMI matrix (%d nonzeros) to %d dimensions", *matrix.shape, matrix.nnz,
             dim)
    u, s, _ = randomized_svd(matrix, dim, n_iter=cfg.svd_iterations, random_state=cfg.seed)
    vectors = u * np.sqrt(s)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return WordVectors(keys, vectors.astype(np.float32))


def _occurrences(verses: list[tuple[int, list[str]]], vocab: list[str], columns: dict[int, int]) -> sp.csr_matrix:
    """Binary word x held-out-verse matrix."""
    row = {w: i for i, w in enumerate(vocab)}
    cells = {(row[w], columns[v]) for v, ws in verses for w in ws if w in row}
    r, c = (np.array(x) for x in zip(*cells)) if cells else (np.array([], int), np.array([], int))
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(vocab), len(columns)))


def gold_pairs(source: list[tuple[int, list[str]]], target: list[tuple[int, list[str]]], source_vocab: set[str],
               target_vocab: set[str], min_verses: int, min_dice: float) -> list[tuple[str, str, float]]:
    """Mutual best Dice matches over the verses both languages hold, among words with vectors occurring in at least
    `min_verses` of those verses: (source word, target word, Dice)."""
    shared = sorted({v for v, _ in source} & {v for v, _ in target})
    columns = {v: j for j, v in enumerate(shared)}
    source = [(v, ws) for v, ws in source if v in columns]
    target = [(v, ws) for v, ws in target if v in columns]

    def frequent(verses, vocab):
        seen = Counter(w for _, ws in verses for w in set(ws) if w in vocab)
        return sorted(w for w, n in seen.items() if n >= min_verses)

    s_words, t_words = frequent(source, source_vocab), frequent(target, target_vocab)
    if not s_words or not t_words:
        return []
    xs, xt = _occurrences(source, s_words, columns), _occurrences(target, t_words, columns)
    both = (xs @ xt.T).toarray()
    dice = 2 * both / (np.asarray(xs.sum(1)) + np.asarray(xt.sum(1)).T)
    best_t, best_s = dice.argmax(axis=1), dice.argmax(axis=0)
    return [(s_words[i], t_words[j], float(dice[i, j])) for i, j in enumerate(best_t)
            if best_s[j] == i and dice[i, j] >= min_dice]


def precision_at(vectors: WordVectors, source_lang: str, target_lang: str, pairs: list[tuple[str, str, float]],
                 ks: list[int]) -> dict[str, float]:
    """Share of pairs whose target word is among the k target-language words nearest the source word (cosine)."""
    rows = vectors.rows(target_lang)
    candidates = vectors.matrix[rows]
    candidates = candidates / np.maximum(np.linalg.norm(candidates, axis=1, keepdims=True), 1e-12)
    position = {vectors.keys[r][1]: i for i, r in enumerate(rows)}
    queries = vectors.matrix[[vectors.index[(source_lang, s)] for s, _, _ in pairs]]
    sims = queries @ candidates.T
    gold = sims[np.arange(len(pairs)), [position[t] for _, t, _ in pairs]]
    rank = (sims > gold[:, None]).sum(axis=1)  # 0: the gold word is the nearest
    return {f"p@{k}": float((rank < k).mean()) for k in ks}


def evaluate_alignment(vectors: WordVectors, texts: dict[str, VerseText], cfg: AlignmentEvalConfig) -> dict:
    src = cfg.source_lang
    results = {}
    for lang in texts:
        if lang == src:
            continue
        pairs = gold_pairs(texts[src].held_out, texts[lang].held_out, set(vectors.words(src)),
                           set(vectors.words(lang)), cfg.min_verses, cfg.min_dice)
        if not pairs:
            results[f"{src}-{lang}"] = {"pairs": 0}
            continue
        results[f"{src}-{lang}"] = {"pairs": len(pairs), **precision_at(vectors, src, lang, pairs, cfg.ks),
                                    "chance@1": 1 / len(vectors.words(lang)),
                                    "sample_pairs": [f"{s}={t}" for s, t, _ in pairs[:: max(1, len(pairs) // 12)]]}
    return results


def _summary_table(summary: dict) -> str:
    lines = [f"{'pair':<8}{'gold pairs':>11}" + "".join(f"{k:>8}" for k in summary["ks"])]
    for pair, r in summary["alignment"].items():
        lines.append(f"{pair:<8}{r['pairs']:>11}" + "".join(f"{r.get(k, float('nan')):>8.3f}" for k in summary["ks"]))
    return "\n".join(lines)


def _input_hash(cfg: WordVectorConfig) -> str:
    """What the vectors depend on: the config, the data config's text, the content of every corpus it reads (the
    data stage's source fingerprints: a corpus file edited in place makes them again), the data stage's cleaning and
    splitting (its versions: the text is read through them) and the libraries that learn them."""
    data_text = Path(cfg.data).read_text() if Path(cfg.data).is_file() else ""
    corpora = {}
    if data_text:
        data = load_config(DataConfig, cfg.data)
        corpora = {lang: [Source(s).fingerprint for s in data.languages[lang].sources]
                   for lang in cfg.languages or data.languages if lang in data.languages}
    versions = {"cleaning": CLEANING_VERSION, "format": FORMAT_VERSION,
                "libraries": {p: metadata.version(p) for p in ("numpy", "scipy", "scikit-learn")}}
    return hashlib.sha256(json.dumps([to_dict(cfg), data_text, corpora, versions],
                                     sort_keys=True).encode()).hexdigest()


def build_word_vectors(cfg: WordVectorConfig) -> StageResult:
    """Outputs: the vectors file and the precision@k figures."""
    start = time.perf_counter()
    out = Path(cfg.output_dir)
    claimed = claim_output(out, cfg, resumable=False)
    save_config(cfg, out / "config.yaml")
    input_hash = _input_hash(cfg)
    summary_path = out / SUMMARY_FILE
    if summary_path.is_file() and (out / VECTORS_FILE).is_file():
        old = json.loads(summary_path.read_text())
        if old.get("input_hash") == input_hash:
            log.info("%s is up to date (input hash %s): nothing to do", out, input_hash[:12])
            finish_output(out, cfg, content=file_sha256(out / VECTORS_FILE))
            return StageResult("finished", {"vectors": out / VECTORS_FILE})
    if claimed == "finished":  # the same config, but what it reads changed in place (or its files are gone)
        reopen_output(out, "made again from the same config: its corpora, their cleaning or a library changed")
    texts = read_languages(cfg)
    vectors = learn_vectors(texts, cfg)
    summary_path.unlink(missing_ok=True)  # from here on the vectors are not the old summary's
    write_word2vec_binary(vectors, out / VECTORS_FILE)
    log.info("measuring alignment on the held-out verses")
    alignment = evaluate_alignment(vectors, texts, cfg.eval)
    summary = {"input_hash": input_hash, "dim": vectors.dim, "seed": cfg.seed, "min_count": cfg.min_count,
               "words": {lang: len(vectors.words(lang)) for lang in texts},
               "training_verses": {lang: len(t.train) for lang, t in texts.items()},
               "held_out_verses": {lang: len(t.held_out) for lang, t in texts.items()},
               "ks": [f"p@{k}" for k in cfg.eval.ks], "alignment": alignment,
               "seconds": round(time.perf_counter() - start, 1)}
    write_text_atomic(summary_path, json.dumps(summary, indent=2, ensure_ascii=False))
    log.info("%d word vectors (%s) in %s\n%s", len(vectors.keys),
             ", ".join(f"{lang} {n}" for lang, n in summary["words"].items()), out / VECTORS_FILE,
             _summary_table(summary))
    # consumers record the vectors by their bytes: learned again the same (another eval setting, another language's
    # data changed), they are the same input; learned from other text (a corpus edited in place), another one
    finish_output(out, cfg, content=file_sha256(out / VECTORS_FILE))
    return StageResult("finished", {"vectors": out / VECTORS_FILE,
                                    **{pair: {k: r[k] for k in summary["ks"] if k in r}
                                       for pair, r in alignment.items()}})
