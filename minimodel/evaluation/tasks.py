"""Evaluation tasks and their data loaders.

Tasks (TASKS): XNLI and PAWS-X (sentence-pair classification), MLQA (extractive QA), and three tasks built from the
verse-parallel Bible text of pretrain/prepare_data.py: verse classification by the part of the Bible, SR-B-style
verse retrieval, and target_mlm, the held-out masked-LM loss of the primary model with the target embeddings plugged
in (no task data: it reads the data stage's <data_dir>/<lang>/valid indexed dataset, see scoring.score_mlm).
Every loader returns plain Python examples:
    classification: {"text_a": str, "text_b": str | None, "label": int} (+ "verse_id" for verse_class)
    qa:             {"id": str, "question": str, "context": str, "answers": [{"text": str, "answer_start": int}]}
    retrieval:      {"verse_id": int, "text": str} (one list per language, aligned by verse id)

Sources, per split ("train" | "dev" | "test"):
- the official release files (`data_dir`, `train_file`):
    XNLI    data_dir = XNLI-1.0 (xnli.{dev,test}.{jsonl,tsv}, filtered by language);
            train_file = MultiNLI train (multinli_1.0_train.{jsonl,txt}) or XNLI-MT multinli.train.<lang>.tsv
    PAWS-X  data_dir = x-final (<lang>/{train|translated_train,dev_2k,test_2k}.tsv)
    MLQA    data_dir = MLQA_V1 ({dev,test}/{split}-context-<lang>-question-<lang>.json, SQuAD format);
            train_file = a SQuAD-format train file (SQuAD v1.1 train-v1.1.json)
    verse_* data_dir = a prepare_data output (<lang>/verses.jsonl); train = split "train", dev/test = split "valid"
- or a `datasets` dataset (`hf_dataset`): a directory written by save_to_disk (load_from_disk: a DatasetDict of one
  configuration's splits, one directory per language), else anything load_dataset takes (a hub name such as "xnli",
  or a local directory of data files other than the official TSVs); "{lang}" in the path / `hf_config` is replaced by
  the language (e.g. hf_config "mlqa.{lang}.{lang}"; a saved directory: hf_dataset "xnli_{lang}", no hf_config).
"""
from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from minimodel.config import require
from minimodel.data.corpora import saved_to_disk
from minimodel.provenance import DATA
from minimodel.evaluation import EvaluationError

# Parts of the Bible by book number (1-66, Protestant canon order): the labels of verse classification.
BIBLE_PARTS = ("law", "history", "wisdom", "prophets", "gospels", "epistles", "apocalypse")
_PART_FIRST_BOOK = (1, 6, 18, 23, 40, 44, 66)


def bible_part(book: int) -> int:
    """Index into BIBLE_PARTS of book number `book`: Genesis-Deuteronomy law, Joshua-Esther history, Job-Song of
    Songs wisdom/poetry, Isaiah-Malachi prophets, Matthew-John gospels, Acts-Jude acts/epistles, Revelation."""
    if not 1 <= book <= 66:
        raise ValueError(f"book number {book} is outside 1-66")
    return max(i for i, first in enumerate(_PART_FIRST_BOOK) if book >= first)


@dataclass(frozen=True)
class TaskSpec:
    kind: Literal["classification", "qa", "retrieval", "mlm"]
    metric: str  # the headline metric, as logged
    labels: tuple[str, ...] = ()
    description: str = ""  # what the metric measures, for the report
    # a perfect score: the metric is a mean of per-example scores in [0, full_score] (MLQA's F1 is in percent, as the
    # official script reports it); None: not such a mean (target_mlm's nats), so the report has no binomial noise bound
    full_score: float | None = 1.0
    # read from the data stage's output (prepare_data's verses.jsonl, target datasets), not an official release
    prepared_data: bool = False

    @property
    def fine_tuned(self) -> bool:
        """Scored with a task model fine-tuned on the source language (step 3), which is also scored on the source
        language as the reference; the other kinds use the primary model with the target embeddings plugged in."""
        return self.kind in ("classification", "qa")

    @property
    def compares_tokenizers(self) -> bool:
        """Its metric means the same whatever tokenizer reads the text, so the unadapted primary reading the target
        with its own tokenizer (method `none`) is comparable with the adapted methods. Not target_mlm: a per-token
        loss over the target tokenizer's held-out data, measured from the adaptation run's own initial embeddings."""
        return self.kind != "mlm"


TASKS = {
    "xnli": TaskSpec("classification", "accuracy", ("entailment", "neutral", "contradiction")),
    "pawsx": TaskSpec("classification", "accuracy", ("different", "paraphrase")),
    "mlqa": TaskSpec("qa", "f1", full_score=100.0),
    "verse_class": TaskSpec("classification", "accuracy", BIBLE_PARTS, prepared_data=True),
    "verse_retrieval": TaskSpec("retrieval", "top1", prepared_data=True),
    "target_mlm": TaskSpec("mlm", "mlm_gain", prepared_data=True, description=(
        "held-out target-language masked-LM loss of the primary model with the target embeddings plugged in (fixed "
        "masked positions); mlm_gain = that loss with the reference method's initial (step-0) embeddings minus the "
        "loss now, in nats, higher is better: one zero per language, so an initialisation's head start counts "
        "(zero_shot's own metrics.json measure each run from its own step 0)"), full_score=None),
}
SPLITS = ("train", "dev", "test")


@dataclass
class TaskConfig:
    name: Literal["xnli", "pawsx", "mlqa", "verse_class", "verse_retrieval", "target_mlm"] = "verse_class"
    # official release directory, or prepare_data output for verse_* tasks (DATA: a result records its files' hash)
    data_dir: str | None = field(default=None, metadata=DATA)
    train_file: str | None = None  # XNLI: MultiNLI train; MLQA: SQuAD-format train JSON
    # save_to_disk directory or load_dataset name ("{lang}" is substituted)
    hf_dataset: str | None = field(default=None, metadata=DATA)
    hf_config: str | None = None  # load_dataset config name ("{lang}" is substituted)
    # train split from another dataset (MLQA has none: e.g. "squad")
    hf_train_dataset: str | None = field(default=None, metadata=DATA)
    hf_train_config: str | None = None
    max_length: int = 128  # tokens per example (QA: per window; target_mlm: per packed sequence)
    doc_stride: int = 64  # QA: overlap between windows of a long context
    max_answer_length: int = 30  # QA: longest predicted span, in tokens
    max_train_examples: int | None = None
    max_eval_examples: int | None = None  # target_mlm: held-out sequences scored (spread over the split)
    mlm_mask_prob: float = 0.15  # target_mlm: masking of the held-out sequences ...
    mlm_seed: int = 0  # ... fixed, so every method and checkpoint is scored on the same masked positions

    def validate(self) -> None:
        require(self.data_dir is not None or self.hf_dataset is not None or self.train_file is not None,
                "task.data_dir", f"task {self.name} needs data: set task.data_dir (official files) or "
                "task.hf_dataset (a `datasets` dataset)")
        require(self.spec.kind != "mlm" or self.data_dir is not None, "task.data_dir",
                "target_mlm reads <data_dir>/<lang>/valid: set it to the data stage's output_dir")
        require(0 < self.mlm_mask_prob < 1, "task.mlm_mask_prob", "must be in (0, 1)")
        require(self.max_length >= 16, "task.max_length", "must be at least 16 tokens")
        if self.spec.kind == "qa":
            require(0 <= self.doc_stride < self.max_length // 2, "task.doc_stride",
                    "must be in [0, max_length / 2): windows overlap by doc_stride tokens")

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.name]


class TaskDataError(EvaluationError):
    """Task data missing or in an unexpected format; the message names the file and the fix."""


# -- official formats ----------------------------------------------------------------------------------
def _read_tsv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_table(path: Path) -> list[dict]:
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist")
    return _read_jsonl(path) if path.suffix == ".jsonl" else _read_tsv(path)


def _nli_rows_to_examples(rows: list[dict], path: Path, lang: str | None) -> list[dict]:
    labels = TASKS["xnli"].labels
    out = []
    for row in rows:
        if lang is not None and "language" in row and row["language"] != lang:
            continue
        label = row.get("gold_label", row.get("label"))
        label = "contradiction" if label == "contradictory" else label  # XNLI-MT spelling
        if label not in labels:  # MultiNLI marks pairs without annotator consensus "-"
            continue
        a, b = row.get("sentence1", row.get("premise")), row.get("sentence2", row.get("hypo"))
        if a is None or b is None:
            raise TaskDataError(f"{path}: expected sentence1/sentence2 (or premise/hypo) columns, got {sorted(row)}")
        out.append({"text_a": a, "text_b": b, "label": labels.index(label)})
    return out


def _xnli_official(cfg: TaskConfig, lang: str, split: str) -> list[dict]:
    if split == "train":
        if cfg.train_file is None:
            raise TaskDataError("XNLI has no training split: set task.train_file to MultiNLI's "
                                "multinli_1.0_train.jsonl (or XNLI-MT's multinli.train.<lang>.tsv)")
        path = Path(cfg.train_file)
        return _nli_rows_to_examples(_read_table(path), path, None)
    base = Path(cfg.data_dir)
    path = next((p for p in (base / f"xnli.{split}.jsonl", base / f"xnli.{split}.tsv") if p.is_file()), None)
    if path is None:
        raise TaskDataError(f"{base} holds neither xnli.{split}.jsonl nor xnli.{split}.tsv: point task.data_dir "
                            "at the unpacked XNLI-1.0 directory")
    examples = _nli_rows_to_examples(_read_table(path), path, lang)
    if not examples:
        raise TaskDataError(f"{path} has no examples in language {lang!r}")
    return examples


def _pawsx_official(cfg: TaskConfig, lang: str, split: str) -> list[dict]:
    base = Path(cfg.data_dir) / lang
    names = {"train": ["train.tsv", "translated_train.tsv"], "dev": ["dev_2k.tsv"], "test": ["test_2k.tsv"]}[split]
    if split == "train" and cfg.train_file:
        path = Path(cfg.train_file)
    else:
        path = next((base / n for n in names if (base / n).is_file()), None)
        if path is None:
            raise TaskDataError(f"{base} holds none of {names}: point task.data_dir at PAWS-X's x-final directory")
    out = []
    for row in _read_table(path):
        if row.get("label") not in ("0", "1"):  # a few translated rows are empty
            continue
        out.append({"text_a": row["sentence1"], "text_b": row["sentence2"], "label": int(row["label"])})
    return out


def read_squad(path: str | Path) -> list[dict]:
    """SQuAD-format JSON ({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}) -> QA examples."""
    path = Path(path)
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    if "data" not in data:
        raise TaskDataError(f"{path} is not SQuAD-format JSON (no top-level 'data')")
    return [{"id": str(qa["id"]), "question": qa["question"], "context": para["context"],
             "answers": [{"text": a["text"], "answer_start": int(a["answer_start"])} for a in qa["answers"]]}
            for article in data["data"] for para in article["paragraphs"] for qa in para["qas"]]


def _mlqa_official(cfg: TaskConfig, lang: str, split: str) -> list[dict]:
    if split == "train":
        if cfg.train_file is None:
            raise TaskDataError("MLQA has no training split: set task.train_file to a SQuAD-format train file "
                                "(SQuAD v1.1 train-v1.1.json)")
        return read_squad(cfg.train_file)
    path = Path(cfg.data_dir) / split / f"{split}-context-{lang}-question-{lang}.json"
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist: point task.data_dir at the unpacked MLQA_V1 directory")
    return read_squad(path)


def read_verses(data_dir: str | Path, lang: str) -> list[dict]:
    path = Path(data_dir) / lang / "verses.jsonl"
    if not path.is_file():
        raise TaskDataError(f"{path} does not exist: build it with pretrain/prepare_data.py (language {lang!r})")
    return _read_jsonl(path)


def _verse_split(cfg: TaskConfig, lang: str, split: str) -> list[dict]:
    """The verses of a split: records with a verse id (a language's free text, from its other sources, is none), for
    verse_class those of the 66 books it has parts for (a deuterocanonical book has none)."""
    wanted = "train" if split == "train" else "valid"  # held-out verse ids, the same in every language
    verses = [v for v in read_verses(cfg.data_dir, lang) if v["split"] == wanted and v["verse_id"] is not None]
    if cfg.name == "verse_class":
        verses = [v for v in verses if 1 <= v["book"] <= 66]
    if not verses:
        raise TaskDataError(f"task {cfg.name}: no {split} verses in language {lang!r} "
                            f"({Path(cfg.data_dir) / lang / 'verses.jsonl'} holds no {wanted} record with a verse id"
                            f"{' of books 1-66' if cfg.name == 'verse_class' else ''}): give the language a Bible "
                            f"source, or evaluate it on a task of its own data")
    return verses


# -- `datasets` --------------------------------------------------------------------------------------
_HF_SPLIT = {"train": "train", "dev": "validation", "test": "test"}


def _load_hf_split(name: str, config: str | None, lang: str, split: str):
    import datasets

    name = name.replace("{lang}", lang)
    config = config.replace("{lang}", lang) if config else None
    path = Path(name)
    if saved_to_disk(path):
        ds = datasets.load_from_disk(name)
        if config is not None:  # ignored, every language would read the one configuration saved there
            raise TaskDataError(f"{name} was written by save_to_disk, one configuration (it holds "
                                f"{list(ds) if isinstance(ds, datasets.DatasetDict) else 'one Dataset'}): leave "
                                f"task.hf_config unset and save one directory per language, named in task.hf_dataset "
                                f"with {{lang}} (e.g. xnli_{{lang}})")
        if not isinstance(ds, datasets.DatasetDict):  # every split would read the same rows
            raise TaskDataError(f"{name} holds one Dataset, not its splits: save a DatasetDict of them "
                                f"(train / validation / test)")
    elif path.is_dir() and any(path.rglob("*.tsv")):  # pandas' quoting merges or drops rows of the official TSVs
        raise TaskDataError(f"{name} holds TSV files: give the official release's directory as task.data_dir, whose "
                            "readers take its columns and quoting, not as task.hf_dataset")
    else:  # a hub name (a cluster with hub access or its cache), or a local directory of data files
        ds = datasets.load_dataset(name, config)
    if isinstance(ds, datasets.DatasetDict):
        key = _HF_SPLIT[split] if _HF_SPLIT[split] in ds else split
        if key not in ds:
            raise TaskDataError(f"dataset {name} ({config}) has splits {list(ds)}, none of them {split!r}")
        ds = ds[key]
    return ds


def _hf_label_index(ds, labels: tuple[str, ...]):
    import datasets

    feature = ds.features.get("label")
    if isinstance(feature, datasets.ClassLabel):
        names = [n.lower() for n in feature.names]
        if set(names) <= set(labels):  # map by name so a differently ordered dataset still agrees
            return lambda i: labels.index(names[i]) if i >= 0 else -1
    return lambda i: int(i)


def _hf_examples(cfg: TaskConfig, lang: str, split: str) -> list[dict]:
    train_source = split == "train" and cfg.hf_train_dataset
    ds = _load_hf_split(cfg.hf_train_dataset if train_source else cfg.hf_dataset,
                        cfg.hf_train_config if train_source else cfg.hf_config, lang, split)
    spec = cfg.spec
    if spec.kind == "qa":
        return [{"id": str(r["id"]), "question": r["question"], "context": r["context"],
                 "answers": [{"text": t, "answer_start": int(s)}
                             for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]} for r in ds]
    a_key, b_key = ("premise", "hypothesis") if "premise" in ds.column_names else ("sentence1", "sentence2")
    to_label = _hf_label_index(ds, spec.labels)
    out = [{"text_a": r[a_key], "text_b": r[b_key], "label": to_label(r["label"])} for r in ds]
    return [e for e in out if e["label"] >= 0]


# -- entry point -----------------------------------------------------------------------------------------
def load_examples(cfg: TaskConfig, lang: str, split: str) -> list[dict]:
    """Examples of task `cfg.name` in language `lang`, split "train" | "dev" | "test" (capped by max_*_examples)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    name = cfg.name
    if name.startswith("verse_"):
        if cfg.data_dir is None:
            raise TaskDataError(f"task {name} reads verses.jsonl: set task.data_dir to a prepare_data output dir")
        verses = _verse_split(cfg, lang, split)
        examples = ([{"text_a": v["text"], "text_b": None, "label": bible_part(v["book"]), "verse_id": v["verse_id"]}
                     for v in verses]
                    if name == "verse_class" else [{"verse_id": v["verse_id"], "text": v["text"]} for v in verses])
        if name == "verse_class" and split == "train" and len(parts := {e["label"] for e in examples}) < 2:
            raise TaskDataError(  # every example one label: fine-tuning learns a constant that scores 100%
                f"task verse_class: the {lang!r} training verses of {cfg.data_dir} are all of one part of the Bible "
                f"({BIBLE_PARTS[parts.pop()]}): it needs books of at least two parts (the data config's `books`)")
    else:
        use_hf = cfg.hf_dataset is not None and not (split == "train" and cfg.train_file)
        use_hf = use_hf or (split == "train" and cfg.hf_train_dataset is not None)
        if use_hf:
            examples = _hf_examples(cfg, lang, split)
        else:
            if cfg.data_dir is None and not (split == "train" and cfg.train_file):
                raise TaskDataError(f"task {name}: no source for split {split!r}: set task.data_dir or task.hf_dataset")
            official = {"xnli": _xnli_official, "pawsx": _pawsx_official, "mlqa": _mlqa_official}[name]
            examples = official(cfg, lang, split)
    if not examples:
        raise TaskDataError(f"task {name}: no {split} examples in language {lang!r}")
    cap = cfg.max_train_examples if split == "train" else cfg.max_eval_examples
    return _subsample(examples, cap) if cap else examples


def load_verse_pairs(cfg: TaskConfig, source_lang: str, target_lang: str, split: str) -> list[tuple[str, str]]:
    """verse_retrieval's (source text, target text) pairs: the held-out verses both languages hold, capped by
    max_eval_examples among those (capping each language first kept only the verses both caps happened to pick)."""
    uncapped = dataclasses.replace(cfg, max_eval_examples=None)
    source, target = ({e["verse_id"]: e["text"] for e in load_examples(uncapped, lang, split)}
                      for lang in (source_lang, target_lang))
    shared = [{"verse_id": i} for i in sorted(source.keys() & target.keys())]
    if not shared:
        raise TaskDataError(f"no verse ids shared by {source_lang} and {target_lang} in split {split}")
    if cfg.max_eval_examples:
        shared = _subsample(shared, cfg.max_eval_examples)
    return [(source[e["verse_id"]], target[e["verse_id"]]) for e in shared]


def _subsample(examples: list[dict], cap: int) -> list[dict]:
    """A spread-out, deterministic subset of `cap` examples, in their original order. Verses are chosen by verse
    id, so every language keeps the same verses (retrieval needs them aligned)."""
    if len(examples) <= cap:
        return examples
    keys = [e.get("verse_id", i) for i, e in enumerate(examples)]
    chosen = set(sorted(range(len(examples)), key=lambda i: (keys[i] * 2654435761) % 2**32)[:cap])
    return [e for i, e in enumerate(examples) if i in chosen]
