"""SentencePiece tokenizers with XLM-R's id convention, saved as Hugging Face tokenizer directories, and the
encoders that turn text into a tokenizer's ids (any tokenizer family; SentencePiece's own fast path where it applies).

ids: <s>=0 <pad>=1 </s>=2 <unk>=3, then the SentencePiece pieces (SentencePiece id + 1), <mask>=last, exactly as
XLM-R, so `len(tokenizer) == vocab_size` and every consumer loads it with minimodel.hf.load_tokenizer.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from minimodel.config import ConfigError
from minimodel.files import replace_dir
from minimodel.hf import load_tokenizer  # loads what train_tokenizer saves

SPM_FILE = "sentencepiece.bpe.model"  # XLM-R's file name (the model inside may be unigram or bpe)
NUM_SPECIAL_ADDED = 2  # <pad> and <mask> exist on the Hugging Face side only


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's (piece, id) table: equal fingerprints <=> the ids mean the same tokens."""
    table = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(table, ensure_ascii=False).encode()).hexdigest()


def is_vocabulary_file(name: str) -> bool:
    """A file of a tokenizer directory that describes its vocabulary another way than tokenizer.json: a SentencePiece
    model of any family's name (XLM-R's sentencepiece.bpe.model, T5's spiece.model, DeBERTa-v3's spm.model,
    tokenizer.model), WordPiece's vocab.txt, byte-level BPE's vocab.json + merges.txt."""
    return name.endswith(".model") or name in ("vocab.txt", "vocab.json", "merges.txt")


def is_tokenizer_file(name: str) -> bool:
    """A file of a Hugging Face tokenizer directory (what a model directory holds besides weights and config)."""
    return is_vocabulary_file(name) or name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                                "added_tokens.json")


def copy_tokenizer(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """The tokenizer files of `source` (a tokenizer or model directory: its weights stay) into the new directory
    `dest`."""
    return Path(shutil.copytree(source, dest, ignore=lambda _, names: [n for n in names if not is_tokenizer_file(n)]))


def save_tokenizer_json(tokenizer, spec: dict, out_dir: str | os.PathLike,
                        id_map: dict[int, int] | None = None) -> Path:
    """Save the fast `tokenizer` to `out_dir` (atomically) with `spec` as its tokenizer.json (a vocabulary edited
    there: trimmed, renumbered, extended). The other vocabulary files are dropped, tokenizer.json rules alone; with
    `id_map` (old id -> new id) the added tokens' ids are renumbered, those it lacks dropped."""
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    for path in tmp.iterdir():
        if is_vocabulary_file(path.name):
            path.unlink()
    (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
    if id_map is not None and "added_tokens_decoder" in config:  # keyed by id
        by_old = {int(i): t for i, t in config["added_tokens_decoder"].items()}
        config["added_tokens_decoder"] = {str(id_map[i]): t for i, t in by_old.items() if i in id_map}
    # loaded by its own class, a family's tokenizer may rebuild parts of tokenizer.json (transformers 5's
    # XLMRobertaTokenizer: unk_id 3 whatever the file says, so a trimmed vocabulary read unknown text as </s>)
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=list(tokenizer.model_input_names))
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return replace_dir(tmp, out)


def unigram_vocab(pieces: dict[int, list], floor: float, size: int | None = None) -> list[list]:
    """A Unigram model's vocab list (ids are list positions) of `size` entries (default: up to the highest id):
    `pieces` ({id: [piece, score]}) at their ids, every other id a placeholder `<unused:i>` no text contains, scored
    `floor` (for vocabularies trimmed, renumbered or extended at ids past their end)."""
    size = 1 + max(pieces) if size is None else size
    return [list(pieces[i]) if i in pieces else [f"<unused:{i}>", floor] for i in range(size)]


class TokenizerError(ConfigError):
    """A tokenizer that cannot be built or loaded as asked; the message says how to fix it."""


class VocabularyTooLarge(TokenizerError):
    """The text holds too few distinct pieces for the vocabulary size asked; `most`: the largest size it allows."""

    def __init__(self, message: str, most: int):
        super().__init__(message)
        self.most = most


TRAINING_PIECE_CHARS = 16_384  # longer documents are cut at spaces to train the tokenizer (see training_pieces)


def training_pieces(text: str) -> list[str]:
    """`text` cut at spaces into pieces of at most TRAINING_PIECE_CHARS characters (without spaces, e.g. Chinese, at
    that length), for tokenizer training only: SentencePiece's search for seed pieces slows down steeply on a long
    line with repeated spans (a 1.2 MB one ran for minutes; encoding it takes 0.1 s)."""
    pieces, start, end = [], 0, len(text)
    while end - start > TRAINING_PIECE_CHARS:  # by index: slicing off the rest each time took quadratic time
        cut = text.rfind(" ", start, start + TRAINING_PIECE_CHARS + 1)
        cut = cut if cut > start else start + TRAINING_PIECE_CHARS
        pieces.append(text[start:cut])
        start = cut
        while start < end and text[start] == " ":
            start += 1
    return [*pieces, text[start:]] if start < end else pieces


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int, model_type: str = "unigram",
                    character_coverage: float = 0.9995, seed: int = 0, num_threads: int = 1,
                    input_sentence_size: int = 1_000_000) -> Path:
    """Train SentencePiece on `texts` and write a Hugging Face XLM-R tokenizer directory to `out_dir`.

    The model is a pure function of (texts, arguments): a text longer than TRAINING_PIECE_CHARS counts as its
    pieces (training_pieces), and at most `input_sentence_size` texts (0: all) are sampled
    with `seed` (here, since SentencePiece's own sampler ignores its seed when fed an iterator), and the result
    also depends on `num_threads`, which is therefore an argument rather than the machine's core count. `texts` is
    read twice, to count its pieces and to keep the sample, and never held whole: a list, or an object each iteration
    of which reads the texts anew (a corpus larger than memory, spooled to a file); a one-pass iterator is listed.
    """
    import sentencepiece as spm
    from transformers import XLMRobertaTokenizer

    if vocab_size <= NUM_SPECIAL_ADDED + 3:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: it must leave room for the 5 special tokens")
    if iter(texts) is texts:  # a generator: it would be empty the second time
        texts = list(texts)
    count, longest = 0, 0
    for piece in (piece for text in texts for piece in training_pieces(text)):
        count, longest = count + 1, max(longest, len(piece.encode("utf-8")))
    # random.sample draws its indices from the population's size alone: sampling range(count) picks the pieces
    # sampling the list of every piece would, in the same order
    chosen = random.Random(seed).sample(range(count), input_sentence_size) if 0 < input_sentence_size < count \
        else range(count)
    position = {index: i for i, index in enumerate(chosen)}
    sample: list[str] = [""] * len(chosen)
    for index, piece in enumerate(piece for text in texts for piece in training_pieces(text)):
        if (i := position.get(index)) is not None:
            sample[i] = piece
    texts = sample
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model,
            vocab_size=vocab_size - NUM_SPECIAL_ADDED, model_type=model_type,
            character_coverage=character_coverage, num_threads=num_threads,
            input_sentence_size=0,  # sampled above
            max_sentence_length=max(4192, longest),  # its default (4192 bytes) skips longer documents silently
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # XLM-R's SentencePiece layout
            minloglevel=2,
        )
    except RuntimeError as e:
        limit = re.search(r"Vocabulary size too high.*<= (\d+)", str(e))
        if limit:
            most = int(limit.group(1)) + NUM_SPECIAL_ADDED
            raise VocabularyTooLarge(
                f"the text is too small for a vocabulary of {vocab_size}: set the vocabulary size "
                f"(tokenizer.vocab_size or languages.<lang>.vocab_size) to at most {most}, or add text", most) from None
        chars = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if chars:  # a piece per character kept, <unk> <s> </s> and the Hugging Face side's <pad> <mask> besides
            least = int(chars.group(1)) + 3 + NUM_SPECIAL_ADDED + 1
            raise TokenizerError(
                f"the text's characters need {chars.group(1)} pieces (at character_coverage={character_coverage}), "
                f"more than a vocabulary of {vocab_size} holds: set the vocabulary size (tokenizer.vocab_size or "
                f"languages.<lang>.vocab_size) to at least {least}, or lower tokenizer.character_coverage") from None
        raise
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spm_path = Path(tmp) / SPM_FILE
        spm_path.write_bytes(model.getvalue())
        tokenizer = XLMRobertaTokenizer.from_pretrained(tmp, local_files_only=True)  # converts the .model
        tokenizer.save_pretrained(str(out_dir))
        shutil.copyfile(spm_path, out_dir / SPM_FILE)
    return out_dir


class HFEncoder:
    """Batch encoding through the Hugging Face tokenizer of any family (SentencePiece, WordPiece, byte-level BPE,
    a tokenizer.json), without special tokens: the ids the model sees between its <s>/[CLS] and </s>/[SEP]."""

    def __init__(self, tokenizer_dir: str | os.PathLike):
        self.dir = Path(tokenizer_dir)
        self.tokenizer = load_tokenizer(self.dir)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [np.asarray(x, dtype=np.int64) for x in ids]


def make_encoder(tokenizer_dir: str | os.PathLike, sample: list[str]):
    """The fastest encoder that gives the Hugging Face tokenizer's ids: SentencePiece itself for the XLM-R-layout
    directories train_tokenizer writes (checked against the Hugging Face tokenizer on `sample`), else HFEncoder."""
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / SPM_FILE).is_file():
        encoder = FastEncoder(tokenizer_dir)
        try:
            encoder.check_agrees(sample)
            return encoder
        except TokenizerError:  # a SentencePiece model in another id layout (e.g. CamemBERT's): the HF tokenizer's ids
            pass
    return HFEncoder(tokenizer_dir)


class FastEncoder:
    """Batch encoding with the SentencePiece model itself, in the Hugging Face tokenizer's ids (no <s> </s>).

    It is faster than the Hugging Face tokenizer on many short texts (measured once: 492k vs 68k tokens/s over four
    Gospels with a 2000-piece XLM-R-layout model, 2 cores shared at load average 8; the data summary logs the rate of
    every build and which encoder made it) and gives the same ids
    for the unigram models `train_tokenizer` writes; `check_agrees` verifies that on real text.
    """

    def __init__(self, tokenizer_dir: str | os.PathLike):
        import sentencepiece as spm

        self.dir = Path(tokenizer_dir)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.dir / SPM_FILE))
        self.tokenizer = load_tokenizer(self.dir)
        # the Hugging Face tokenizer reads an added token's text ("<mask>", "</s>", ...) in a text as that token,
        # SentencePiece as pieces: a text holding one is encoded by the former (rare in real text)
        added = sorted(self.tokenizer.get_added_vocab(), key=len, reverse=True)
        self.added_token = re.compile("|".join(map(re.escape, added))) if added else None

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        out = []
        for text, ids in zip(texts, self.sp.encode(texts)):
            if self.added_token is not None and self.added_token.search(text):
                out.append(np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64))
                continue
            ids = np.asarray(ids, dtype=np.int64) + 1  # pieces: SentencePiece id + 1
            ids[ids == 1] = 3  # SentencePiece <unk> (0) -> XLM-R <unk> (3)
            out.append(ids)
        return out

    def check_agrees(self, texts: list[str]) -> None:
        hf = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        for text, ours, theirs in zip(texts, self.encode(texts), hf):
            if ours.tolist() != list(theirs):
                raise TokenizerError(f"SentencePiece and the Hugging Face tokenizer in {self.dir} disagree on "
                                     f"{text[:80]!r}: was the tokenizer directory edited by hand? Delete it and rebuild")
