"""Fixtures for the adaptation tests: real Bible data (the data stage, one book), a tiny MegatronBert primary model
pretrained in-process on English MLM jointly with an aligned 2-layer mini-model (MiniJoint's recipe on the Hugging
Face side: shared embeddings and first layers, a second MLM head after layer 2), and the deepspeed launcher."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from minimodel.distributed import free_port
from minimodel.stages import DEEPSPEED
from process_helpers import describe_hang

REPO = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)  # the venv's here; the GPU machine's python3 (scripts/gpu_check.sh)
PRIMARY_LAYERS, MINI_LAYERS, HIDDEN, FFN, SEQ = 4, 2, 64, 256, 64
LAUNCH_TIMEOUT = 900  # seconds; a launch takes ~20 s on an idle machine, minutes when the cores are shared


@dataclass
class World:
    root: Path
    data_dir: Path
    primary: Path
    mini: Path


def prepare_tiny_data(out: Path, config: Path = REPO / "configs/data/tiny.yaml", target: str = "sw",
                      books: tuple[int, ...] = (43, 65)) -> Path:
    """English and `target`, a few books (default: the Gospel of John, and Jude for verse classification's second
    class) of a data config's corpora."""
    from minimodel.config import load_config
    from minimodel.data.prepare import DataConfig, prepare_data

    d = yaml.safe_load(config.read_text())
    d["languages"] = {k: v for k, v in d["languages"].items() if k in ("en", target)}
    d.update(output_dir=str(out), books=list(books), tracking={"enabled": False})
    d["tokenizer"]["vocab_size"] = 1000
    d["languages"][target]["vocab_size"] = 800  # unlike the source's: a shape error cannot hide
    path = out.parent / "data.yaml"
    path.write_text(yaml.safe_dump(d))
    prepare_data(load_config(DataConfig, path))
    return out


def tiny_config(vocab_size: int, layers: int):
    from transformers import MegatronBertConfig

    return MegatronBertConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=layers,
                              num_attention_heads=4, intermediate_size=FFN, max_position_embeddings=SEQ,
                              pad_token_id=1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def pretrain_primary_and_mini(data_dir: Path, out: Path, steps: int = 400, seed: int = 0) -> tuple[Path, Path]:
    """Joint MLM pretraining of a 4-layer primary and its 2-layer mini-model (shared embeddings + layers 1-2)."""
    from transformers import MegatronBertForMaskedLM

    from minimodel.data.mlm import MaskedLMDataset
    from minimodel.data.tokenizer import load_tokenizer
    from minimodel.manifest import write_manifest
    from minimodel.training.hf_mlm import masked_lm_loss

    torch.manual_seed(seed)  # threads follow OMP_NUM_THREADS: another count pretrains another world, as another CPU may
    tokenizer = load_tokenizer(data_dir / "en" / "tokenizer")
    primary = MegatronBertForMaskedLM(tiny_config(len(tokenizer), PRIMARY_LAYERS))
    mini = MegatronBertForMaskedLM(tiny_config(len(tokenizer), MINI_LAYERS))
    mini.bert.embeddings = primary.bert.embeddings
    for i in range(MINI_LAYERS):
        mini.bert.encoder.layer[i] = primary.bert.encoder.layer[i]
    mini.cls.predictions.decoder.weight = primary.bert.embeddings.word_embeddings.weight
    params = list({id(p): p for p in [*primary.parameters(), *mini.parameters()]}.values())
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 30))
    data = MaskedLMDataset(data_dir / "en" / "train", tokenizer, SEQ, seed=seed)
    rng = np.random.default_rng(seed)
    primary.train(), mini.train()
    for _ in range(steps):
        idx = rng.integers(len(data), size=16)
        batch = {k: torch.as_tensor(np.stack([data[int(i)][k] for i in idx])) for k in data[0]}
        loss = masked_lm_loss(primary, batch) + masked_lm_loss(mini, batch)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    primary_dir, mini_dir = out / "primary", out / "mini"
    for model, path in ((primary, primary_dir), (mini, mini_dir)):
        model.save_pretrained(path)
        tokenizer.save_pretrained(str(path))
    write_manifest(mini_dir, "minijoint", MINI_LAYERS, primary_dir)
    return primary_dir, mini_dir


def world_seed() -> int:
    """The seed of the tiny world's pretraining: MINIMODEL_TEST_WORLD_SEED (default 0) checks that the tests' quality
    margins hold for another world too."""
    return int(os.environ.get("MINIMODEL_TEST_WORLD_SEED", "0"))


def build_world(root: Path, **data) -> World:
    """The tiny world under `root`; `data`: prepare_tiny_data's choice of corpus."""
    data_dir = prepare_tiny_data(root / "data", **data)
    primary, mini = pretrain_primary_and_mini(data_dir, root / "models", seed=world_seed())
    return World(root, data_dir, primary, mini)


def extend_args(world: World, out: Path, lang: str, steps: int, micro_batch_size: int) -> list[str]:
    """adapt/train.py's settings of a short tokenizer.mode=extend adaptation (ZeRO-2) over `world`'s mini-model."""
    return [f"output_dir={out}", "over=mini", f"primary_model={world.primary}", f"mini_model={world.mini}",
            f"data_dir={world.data_dir}", f"target_langs=[{lang}]", "seq_length=64", "tokenizer.mode=extend",
            "tokenizer.new_pieces=200", "init.method=copy_shared", f"train.steps={steps}",
            f"train.micro_batch_size={micro_batch_size}", "train.optim.lr=0.01", "train.schedule.warmup_steps=2",
            f"train.eval.every={steps}", "train.eval.batches=2", "train.zero_config=configs/deepspeed/zero2.json",
            "tracking.enabled=false"]


def launch_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MLFLOW_DISABLE_TELEMETRY="true")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def deepspeed_command(script: str, overrides: list[str], config: Path | None = None, ranks: int = 2) -> list[str]:
    cmd = [DEEPSPEED, "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(REPO / script)]
    if config is not None:
        cmd += ["--config", str(config)]
    return cmd + overrides


def run_deepspeed(script: str, overrides: list[str], log: Path, config: Path | None = None,
                  timeout: float = LAUNCH_TIMEOUT, ranks: int = 2) -> int:
    """Run a launch to completion in the log's directory (MLflow's local artifacts land there, not in the repo).
    On a timeout every process of the launch is killed, not only the runner."""
    with open(log, "w") as f:
        proc = subprocess.Popen(deepspeed_command(script, overrides, config, ranks), cwd=log.parent, env=launch_env(),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the launch hung (no exit in {timeout:.0f} s): {describe_hang(proc.pid, log)}") from None
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def run_deepspeed_and_signal(script: str, overrides: list[str], log: Path, watch: Path, after_lines: int,
                             sig: int = signal.SIGTERM, timeout: float = LAUNCH_TIMEOUT,
                             ranks_only: bool = False, ranks: int = 2) -> tuple[bool, int]:
    """run_and_signal for a DeepSpeed launch of `script` with `overrides`."""
    return run_and_signal(deepspeed_command(script, overrides, ranks=ranks), log, watch, after_lines, sig, timeout,
                          ranks_only, env=launch_env(), cwd=log.parent)


def run_and_signal(cmd: list[str], log: Path, watch: Path, after_lines: int, sig: int = signal.SIGTERM,
                   timeout: float = LAUNCH_TIMEOUT, ranks_only: bool = False, env: dict | None = None,
                   cwd: Path | None = None) -> tuple[bool, int]:
    """Launch, wait until `watch` (a metrics.jsonl) has `after_lines` lines, then send `sig` to every process of
    the launch, as Slurm does on preemption, or with `ranks_only` to the processes running the script (the
    launchers outlive them and pass their exit code on); wait until all are gone. Returns whether the signal was
    sent and the launch's exit code."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    sent = False
    try:
        while proc.poll() is None and time.time() < deadline:
            if watch.is_file() and len(watch.read_text().splitlines()) >= after_lines:
                for pid in _ranks(proc.pid) if ranks_only else [-proc.pid]:  # -pid: the launch's process group
                    os.kill(pid, sig)
                sent = True
                break
            time.sleep(0.05)
        proc.wait(timeout=max(1.0, deadline - time.time()))
        while _group_alive(proc.pid) and time.time() < deadline:  # the ranks outlive the launcher's runner
            time.sleep(0.2)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    return sent, proc.returncode


def _ranks(runner_pid: int) -> list[int]:
    """The ranks of a DeepSpeed launch: the processes its per-node launchers (deepspeed.launcher.launch) started."""
    import psutil

    launchers = [p for p in psutil.Process(runner_pid).children(recursive=True)
                 if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
    return [rank.pid for launcher in launchers for rank in launcher.children()]


def resumed_at(log: str, step: int) -> bool:
    """Whether the DeepSpeed loop's log says it resumed from its checkpoint of `step` (training/deepspeed_loop.py)."""
    return re.search(rf"resumed from \S+step_{step:08d} at step {step}\b", log) is not None


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def copy_language(data_dir: Path, src: str, dst: str) -> None:
    """A second language that is the same corpus: two runs that must agree exactly."""
    if not (data_dir / dst).exists():
        shutil.copytree(data_dir / src, data_dir / dst)


