"""Shared pieces of the pretraining tests: a tiny corpus on disk and a torchrun launcher."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from process_helpers import describe_hang

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)  # the venv's here; the GPU machine's python3 (scripts/gpu_check.sh)
TRAIN_SCRIPT = ROOT / "pretrain" / "train.py"
TINY_CONFIG = ROOT / "configs" / "pretrain" / "minijoint_tiny.yaml"


def synthetic_sentences(n: int, seed: int) -> list[str]:
    """Sentences from a small vocabulary with some structure (an MLM can learn them a little)."""
    rng = random.Random(seed)
    nouns = ["king", "land", "water", "people", "house", "city", "day", "night", "son", "word", "road", "field"]
    verbs = ["saw", "built", "gave", "heard", "kept", "found", "left", "blessed"]
    adjs = ["great", "small", "old", "holy", "dark", "green"]
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(1, 3)):
            words += ["the", rng.choice(adjs), rng.choice(nouns), rng.choice(verbs), "the", rng.choice(nouns)]
            words.append(rng.choice(["and", "for", "then"]))
        out.append(" ".join(words[:-1]) + ".")
    return out


def build_tiny_corpus(out: Path, vocab_size: int = 50, n_train: int = 600, n_valid: int = 60) -> Path:
    """<out>/tokenizer, <out>/train.{bin,idx}, <out>/valid.{bin,idx}: the layout pretrain/prepare_data.py writes."""
    from minimodel.data.indexed import write_indexed
    from minimodel.data.tokenizer import load_tokenizer, train_tokenizer

    train, valid = synthetic_sentences(n_train, seed=1), synthetic_sentences(n_valid, seed=2)
    train_tokenizer(train, out / "tokenizer", vocab_size=vocab_size)
    tokenizer = load_tokenizer(out / "tokenizer")
    for split, sentences in (("train", train), ("valid", valid)):
        with write_indexed(out / split, vocab_size) as writer:
            for sentence in sentences:
                writer.add(tokenizer(sentence, add_special_tokens=False)["input_ids"])
    return out


def corpus_overrides(corpus: Path) -> list[str]:
    return [f"data.train_prefix={corpus / 'train'}", f"data.valid_prefix={corpus / 'valid'}",
            f"data.tokenizer_dir={corpus / 'tokenizer'}"]


def launch(nproc: int, overrides: list[str], log_path: Path, config: Path = TINY_CONFIG,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    """torchrun `nproc` workers of pretrain/train.py in a new session (extra `env` variables); output to `log_path`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    port = 20000 + random.Random(f"{os.getpid()}{log_path}").randint(0, 20000)
    cmd = [str(PYTHON), "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           str(TRAIN_SCRIPT), "--config", str(config), *overrides]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run(nproc: int, overrides: list[str], log_path: Path, timeout: float = 300, **kwargs) -> int:
    proc = launch(nproc, overrides, log_path, **kwargs)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the launch hung (no exit in {timeout:.0f} s): "
                             f"{describe_hang(proc.pid, log_path)}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


def train_losses(output_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (main, secondary) training loss from <output_dir>/metrics.jsonl (the last row of a redone step)."""
    losses = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/main_loss" in row:
            losses[row["step"]] = (row["train/main_loss"], row["train/secondary_loss"])
    return losses


def wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    path = output_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before step {step}")
        if path.is_file() and any(json.loads(line)["step"] >= step for line in path.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached within {timeout} s")


