"""Small stand-ins for the evaluation tests: a toy verse-parallel Bible in two languages, word-level tokenizers
with XLM-R's special ids, tiny random MegatronBert masked LMs, and a "perfect adaptation" that builds the target
embeddings by mapping every target word to its source word's embedding row.

The target language is a cipher of the source (each word spelled backwards + "x", fixed word order), so a model
with perfectly learned target embeddings behaves exactly as on the source: zero-shot scores can be checked
against the source scores exactly, and retrieval must find every verse.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from minimodel.evaluation.tasks import BIBLE_PARTS, bible_part

REPO = Path(__file__).resolve().parents[1]
EMBEDDINGS = "bert.embeddings.word_embeddings.weight"  # MegatronBert task models' token embeddings
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0-3, <mask> last (XLM-R's convention)
COMMON = "and the of he said unto them lord his they all was is in".split()


def stage_env() -> dict:
    """Environment for a stage subprocess: one thread per rank, DeepSpeed on CPU (its JIT ops: the environment's
    TORCH_EXTENSIONS_DIR, minimodel.compat.jit_builds)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def part_words(part: int) -> list[str]:
    return [f"{BIBLE_PARTS[part]}{i}" for i in range(12)]


def source_vocab() -> list[str]:
    return COMMON + [w for p in range(len(BIBLE_PARTS)) for w in part_words(p)]


def cipher(word: str) -> str:
    return word[::-1] + "x"


def toy_bible(verses_per_book: int = 10, seed: int = 0) -> list[dict]:
    """Verses of books 1-66: 9 words, 4 common ones and 5 typical of the book's part of the Bible; ~15% held out."""
    rng = random.Random(seed)
    out = []
    for book in range(1, 67):
        for v in range(1, verses_per_book + 1):
            words = rng.choices(COMMON, k=4) + rng.choices(part_words(bible_part(book)), k=5)
            rng.shuffle(words)
            verse_id = book * 1_000_000 + 1_000 + v
            out.append({"verse_id": verse_id, "book": book, "chapter": 1, "verse": v, "text": " ".join(words),
                        "split": "valid" if rng.random() < 0.15 else "train"})
    return out


def write_verses(data_dir: Path, lang: str, verses: list[dict], translate=None) -> Path:
    path = data_dir / lang / "verses.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for v in verses:
            text = " ".join(map(translate, v["text"].split())) if translate else v["text"]
            f.write(json.dumps({**v, "text": text}) + "\n")
    return path


def word_tokenizer(words: list[str], out_dir: Path):
    """A fast word-level HF tokenizer: <s>=0 <pad>=1 </s>=2 <unk>=3, words, <mask>=last; RoBERTa-style pairs."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + words + ["<mask>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                   model_input_names=["input_ids", "attention_mask"])
    fast.save_pretrained(out_dir)
    return fast


def tiny_mlm(vocab_size: int, out_dir: Path, tokenizer=None, layers: int = 2, seed: int = 0) -> Path:
    """A random-weight MegatronBertForMaskedLM (our export's class) saved with save_pretrained. Weights drawn with
    std 0.2 (not 0.02): with frozen random embeddings the body then learns the toy task in a few hundred steps."""
    from transformers import MegatronBertConfig, MegatronBertForMaskedLM

    torch.manual_seed(seed)
    config = MegatronBertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=layers,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                initializer_range=0.2)
    MegatronBertForMaskedLM(config).save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def cipher_token_map(source_tok, target_tok) -> torch.Tensor:
    """For each target id, the source id of its deciphered word (specials map to specials), -1 if none."""
    src_vocab = source_tok.get_vocab()
    inverse = {cipher(w): w for w in src_vocab}
    mapping = torch.full((len(target_tok),), -1, dtype=torch.long)
    for token, i in target_tok.get_vocab().items():
        source_token = token if token in SPECIALS + ["<mask>"] else inverse.get(token)
        if source_token in src_vocab:
            mapping[i] = src_vocab[source_token]
    return mapping


def perfect_target_embeddings(source_embeddings: torch.Tensor, source_tok, target_tok, seed: int = 0):
    """Target embedding matrix whose row for cipher(w) is the source row of w (specials map to specials); target
    tokens without a source word get random rows."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(len(target_tok), source_embeddings.shape[1], generator=g) * 0.02
    mapping = cipher_token_map(source_tok, target_tok)
    known = mapping >= 0
    target[known] = source_embeddings[mapping[known]]
    return target


def adaptation_artifact(run_dir: Path, embeddings: torch.Tensor, target_tokenizer_dir: Path, primary_dir: Path,
                        lang: str, method: str, steps: int = 1, adapt_run_id: str | None = None,
                        snapshots: dict[int, torch.Tensor] | None = None,
                        token_map: torch.Tensor | None = None) -> Path:
    """What a finished adapt/train.py run leaves for plugging (minimodel/adaptation/artifact.py), with `embeddings`
    as the learned matrix after `steps` steps and `snapshots` ({step: matrix}) as its snapshots: lets the tests
    plug chosen embeddings with the real adapt/plug.py code. `token_map`: the source row of each target row
    (plug carries the LM-head bias over through it); default: none (-1)."""
    import shutil

    from transformers import AutoTokenizer

    from minimodel.adaptation.artifact import TOKENIZER_DIR, snapshot_dir, write_artifact
    from minimodel.data.tokenizer import tokenizer_fingerprint
    from minimodel.manifest import model_hash

    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(target_tokenizer_dir, run_dir / TOKENIZER_DIR, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(target_tokenizer_dir)
    info = {"over": "full", "method": method, "source_lang": "en", "target_lang": lang,
            "primary_model": {"path": str(Path(primary_dir).resolve()), "sha256": model_hash(primary_dir)},
            "vocab_size": embeddings.shape[0], "hidden_size": embeddings.shape[1],
            "pad_token_id": tokenizer.pad_token_id, "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "adapt_run_id": adapt_run_id}
    if token_map is None:
        token_map = torch.full((embeddings.shape[0],), -1, dtype=torch.long)
    for step, matrix in (snapshots or {}).items():
        write_artifact(snapshot_dir(run_dir, step), {"input_embeddings": matrix.float().contiguous(),
                                                     "token_map": token_map}, {**info, "steps": step})
    write_artifact(run_dir, {"input_embeddings": embeddings.float().contiguous(), "token_map": token_map},
                   {**info, "steps": steps})
    return run_dir


def plug(artifact: Path, model_dir: Path, primary_dir: Path, out_dir: Path) -> Path:
    """adapt/plug.py's function, as the pipeline calls it."""
    from minimodel.adaptation.plug import PlugConfig, plug as plug_embeddings

    return plug_embeddings(PlugConfig(embeddings=str(artifact), model=str(model_dir), primary_model=str(primary_dir),
                                      output_dir=str(out_dir))).outputs["plugged"]


def write_indexed_verses(data_dir: Path, lang: str, tokenizer) -> Path:
    """<data_dir>/<lang>/{train,valid}.bin|.idx from its verses.jsonl, one document per verse, as the data stage
    writes them (token ids without <s> </s>)."""
    import numpy as np

    from minimodel.data.indexed import write_indexed

    lang_dir = data_dir / lang
    verses = [json.loads(line) for line in (lang_dir / "verses.jsonl").read_text().splitlines()]
    for split in ("train", "valid"):
        with write_indexed(lang_dir / split, len(tokenizer)) as writer:
            for v in verses:
                if v["split"] == split:
                    writer.add(np.asarray(tokenizer(v["text"], add_special_tokens=False)["input_ids"]))
    return lang_dir


def squad(verses, rng) -> dict:
    """Questions "find w1 w2" whose answer is the span "w1 w2" of the verse (the context)."""
    paragraphs = []
    for v in verses:
        words = v["text"].split()
        i = rng.randrange(len(words) - 1)
        answer = " ".join(words[i:i + 2])
        paragraphs.append({"context": v["text"], "qas": [{
            "id": str(v["verse_id"]), "question": f"find {answer}",
            "answers": [{"text": answer, "answer_start": len(" ".join(words[:i])) + (1 if i else 0)}]}]})
    return {"version": "1.0", "data": [{"title": "toy", "paragraphs": paragraphs}]}


def mlqa_world(root: Path) -> tuple[Path, Path]:
    """Extractive QA on the toy Bible in MLQA's layout (<root>/MLQA_V1/{dev,test}, 40 questions each) with a SQuAD
    training file, and a tiny primary model over the source words + "find". Returns (primary, training file)."""
    rng = random.Random(0)
    verses = toy_bible()
    train = root / "train-v1.1.json"
    train.write_text(json.dumps(squad([v for v in verses if v["split"] == "train"], rng)))
    for split in ("dev", "test"):
        path = root / "MLQA_V1" / split / f"{split}-context-en-question-en.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(squad([v for v in verses if v["split"] == "valid"][:40], rng)))
    tok = word_tokenizer(source_vocab() + ["find"], root / "tokenizer")
    return tiny_mlm(len(tok), root / "primary", tok), train
