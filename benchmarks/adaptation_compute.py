"""Adaptation compute to matched quality: standard adaptation vs MiniJoint and MiniPost mini-model adaptation.

    python benchmarks/adaptation_compute.py            # full run -> benchmarks/results/adaptation_compute.{json,png}
    python benchmarks/adaptation_compute.py --smoke    # tiny, about a minute (CI) -> runs/benchmarks/smoke/

The paper's claim: mini-model adaptation matches standard adaptation with 2.3x less compute on average. This
measures this project's own figure with the project's own stages, called in this process (resumable: finished
work under the work dir is reused when the same command runs again):

  1. data (minimodel.data.prepare) -> MiniJoint pretraining, L layers, secondary head after layer m
     (minimodel.training.pretrain) -> export primary + MiniJoint mini-model (models.minijoint.export)
     -> MiniPost mini-model from the primary (minimodel.minipost.train)
  2. per target language and seed, step 2 (minimodel.adaptation.train.run_adaptation, the DeepSpeed loop) over the
     full model (standard), the MiniJoint and the MiniPost mini-model, checkpointing every `eval_every` steps.
  3. quality at every checkpoint: the learned embeddings plugged into the PRIMARY model (as adapt/plug.py does;
     the final point is checked against plug() itself), masked-LM loss on held-out target verses. Quality
     fraction q = (L_init - L) / (L_init - L_standard_final): 100% = where standard adaptation ends.
  4. per language, threshold (95/99/100% of the standard's final quality) and seed: the FLOPs each method needs
     to reach it (interpolated between checkpoints) divided by the FLOPs the standard method needs -> the
     compute saving (speedup = standard / method), also in wall-clock. FLOPs are the loop's, counted from the
     model shapes (training.hf_mlm.MLMFlops), and checked against torch's FlopCounterMode on one step.
  5. the task-level check of the final embeddings (steps 3-4 of the method, minimodel.evaluation): the primary
     fine-tuned on English verse classification with its embeddings frozen, each run's final embeddings plugged
     into that task model, zero-shot accuracy on the target's held-out verses. Step 4's signal uses only the input
     embeddings; the MLM signal of 3. also needs the output embeddings to fit the primary's own LM head.

Step 1 runs once (seeds vary step 2: data order, masking, embedding init). MiniPost's one-off step-1b cost is
reported beside, not added to the per-language figure.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (REPO, SUMMARY, arg_parser, count_flops, header, parse_args, pyplot,  # noqa: E402
                               save, summary)
from minimodel import distributed  # noqa: E402
from minimodel.files import write_text_atomic  # noqa: E402

NAME = "adaptation_compute"
METHODS = ("standard", "minijoint", "minipost")
MINI_METHODS = METHODS[1:]
THRESHOLDS = (0.95, 0.99, 1.0)
QUALITY_SIGNAL = ("masked-LM loss of the primary model with the learned target embeddings plugged in, on held-out "
                  "target verses (fixed masking); quality fraction = (L_init - L) / (L_init - L_standard_final)")

SCHEMA = {
    "setup": {"num_layers": int, "mini_layers": int, "minipost_layers": str, "target_langs": [str], "seeds": [int],
              "steps": {m: int for m in METHODS}},
    "quality_signal": str,
    "flop_check": {m: {"model_flops": float, "counted_flops": float, "counted_vs_model": float} for m in METHODS},
    "step_time_s": {m: SUMMARY for m in METHODS},
    "flops_per_step": {m: float for m in METHODS},
    "curves": [{"method": str, "lang": str, "seed": int,
                "points": [{"step": int, "flops": float, "wall_clock_s": float, "loss": float}]}],
    "compute_to_quality": [{"method": str, "lang": str, "threshold": float, "seeds": int, "reached": int,
                            "per_seed_speedup": [(float, None)], "speedup": (SUMMARY, None),
                            "wall_clock_speedup": (SUMMARY, None)}],
    "average_speedup": {m: {str(t): (float, None) for t in THRESHOLDS} for m in MINI_METHODS},
    "zero_shot_accuracy": ({"task": str, "source_accuracy": float, "per_method": {m: dict for m in METHODS}}, None),
}


@dataclass
class Setup:
    """Sizes of one benchmark run (the smoke and full presets below; CLI flags override)."""
    data_config: str = "configs/data/default.yaml"
    target_langs: list[str] = field(default_factory=lambda: ["ny", "sw", "tl"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_layers: int = 12
    mini_layers: int = 3  # MiniJoint: the secondary head after layer 3 of 12
    secondary_head: str = "separate"  # MiniJoint's secondary head: separate | shared_transform (ModelConfig)
    minipost_layers: int = 2  # MiniPost: the primary's first 2 layers, frozen ...
    minipost_new_layers: int = 1  # ... + 1 new layer (3 layers, like MiniJoint's mini-model)
    hidden_size: int = 128
    seq_length: int = 64
    pretrain_steps: int = 400
    pretrain_batch: int = 16
    pretrain_save_every: int = 100
    minipost_steps: int = 200
    # Standard adaptation's steps; the mini-models get `mini_steps_factor` times as many (about 0.9x the standard's
    # compute at 3 of 12 layers), so a mini-model that needs more compute than the standard shows as "not reached".
    adapt_steps: int = 100
    mini_steps_factor: int = 3
    adapt_batch: int = 8
    adapt_lr: float = 2e-3
    eval_every: int = 10
    eval_sequences: int = 32
    finetune_steps: int = 200  # step 3 (English verse classification) for the task-level check
    zero_shot_examples: int = 600  # target verses scored per run in step 4

    def steps(self, method: str) -> int:
        return self.adapt_steps * (1 if method == "standard" else self.mini_steps_factor)

    def key(self) -> str:
        """Hash of everything that shapes step 1 (pretraining, export, MiniPost)."""
        upstream = {k: v for k, v in dataclasses.asdict(self).items()
                    if k not in ("target_langs", "seeds", "adapt_steps", "mini_steps_factor", "adapt_batch",
                                 "adapt_lr", "eval_every", "eval_sequences", "finetune_steps", "zero_shot_examples")}
        return hashlib.sha256(json.dumps(upstream, sort_keys=True).encode()).hexdigest()[:12]


SMOKE = Setup(data_config="configs/data/tiny.yaml", target_langs=["ny"], seeds=[0], num_layers=4, mini_layers=1,
              minipost_layers=1, minipost_new_layers=1, hidden_size=64, seq_length=32, pretrain_steps=20,
              pretrain_batch=8, pretrain_save_every=20, minipost_steps=4, adapt_steps=8, mini_steps_factor=2, adapt_batch=8, eval_every=4,
              eval_sequences=8, finetune_steps=4, zero_shot_examples=32)


# -- step 1: data, pretraining, export, MiniPost ------------------------------------------------------------------
def _stamp(path: Path, key: str) -> bool:
    """True if `path` holds the stamp of `key` (the work there is done with these settings)."""
    return path.is_file() and path.read_text().strip() == key


def _write_stamp(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(key + "\n")


def _ensure_process_group() -> None:
    """One-process group for the DeepSpeed stages (after megatron's stages destroyed theirs)."""
    distributed.initialize_deepspeed()


def prepare(setup: Setup, work: Path) -> Path:
    from minimodel.config import load_config
    from minimodel.data.prepare import DataConfig, prepare_data

    data_dir = work / "data"
    cfg = load_config(DataConfig, REPO / setup.data_config, [f"output_dir={data_dir}", "tracking.enabled=false"])
    prepare_data(cfg)  # incremental: languages already built with the same inputs are kept
    return data_dir


def pretrain_and_export(setup: Setup, work: Path, data_dir: Path) -> Path:
    from minimodel.config import load_config
    from minimodel.data.tokenizer import load_tokenizer
    from minimodel.models.minijoint.export import export
    from minimodel.training.checkpoint import latest_checkpoint
    from minimodel.training.pretrain import PretrainConfig, pretrain

    export_dir = work / "export"
    if _stamp(export_dir / "benchmark.stamp", setup.key()):
        return export_dir
    if (work / "pretrain").exists() and not _stamp(work / "pretrain" / "benchmark.stamp", setup.key()):
        raise SystemExit(f"{work} holds step-1 results of other settings: use another --work dir or delete it")
    _write_stamp(work / "pretrain" / "benchmark.stamp", setup.key())
    en = data_dir / "en"
    s = setup
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/minijoint_tiny.yaml", [
        f"output_dir={work / 'pretrain'}", f"data.train_prefix={en / 'train'}", f"data.valid_prefix={en / 'valid'}",
        f"data.tokenizer_dir={en / 'tokenizer'}", f"model.vocab_size={len(load_tokenizer(en / 'tokenizer'))}",
        f"model.num_layers={s.num_layers}", f"model.mini_layers={s.mini_layers}", f"model.hidden_size={s.hidden_size}",
        f"model.secondary_head={s.secondary_head}",
        f"model.num_attention_heads={max(1, s.hidden_size // 32)}", f"model.seq_length={s.seq_length}",
        f"parallel.micro_batch_size={s.pretrain_batch}", f"parallel.global_batch_size={s.pretrain_batch}",
        f"train.steps={s.pretrain_steps}", f"train.schedule.warmup_steps={max(1, s.pretrain_steps // 20)}",
        f"train.eval.every={max(1, s.pretrain_steps // 4)}", f"train.log_every={max(1, s.pretrain_steps // 10)}",
        f"train.checkpoint.save_every={s.pretrain_save_every}", "tracking.enabled=false"])
    print(f"[{NAME}] step 1: MiniJoint pretraining, {s.num_layers} layers, mini-model {s.mini_layers}", flush=True)
    if pretrain(cfg).status != "finished":
        raise SystemExit(f"[{NAME}] pretraining stopped by a signal after a checkpoint: run the same command again "
                         f"to resume")
    export(latest_checkpoint(cfg.checkpoint_root), en / "tokenizer", export_dir)
    _write_stamp(export_dir / "benchmark.stamp", setup.key())
    return export_dir


def minipost(setup: Setup, work: Path, data_dir: Path, export_dir: Path) -> Path:
    from minimodel.config import load_config
    from minimodel.minipost.train import MiniPostConfig, run_minipost

    out = work / "minipost"
    if _stamp(out / "benchmark.stamp", setup.key()):
        return out / "mini"
    en = data_dir / "en"
    cfg = load_config(MiniPostConfig, REPO / "configs/minipost/tiny.yaml", [
        f"source={export_dir}", f"output_dir={out}", f"mini.layers={setup.minipost_layers}",
        f"mini.new_layers={setup.minipost_new_layers}", f"data.train_prefix={en / 'train'}",
        f"data.valid_prefix={en / 'valid'}", f"data.tokenizer_dir={en / 'tokenizer'}",
        f"data.seq_length={setup.seq_length}", f"train.steps={setup.minipost_steps}",
        f"train.schedule.warmup_steps={max(1, setup.minipost_steps // 10)}",
        f"train.checkpoint.save_every={setup.minipost_steps}", f"train.eval.every={setup.minipost_steps}", "tracking.enabled=false"])
    print(f"[{NAME}] step 1b: MiniPost mini-model, {setup.minipost_layers} frozen + {setup.minipost_new_layers} new "
          f"layers", flush=True)
    _ensure_process_group()
    if run_minipost(cfg).status != "finished":
        raise SystemExit(f"[{NAME}] MiniPost training stopped by a signal after a checkpoint: run the same command "
                         f"again to resume")
    _write_stamp(out / "benchmark.stamp", setup.key())
    return out / "mini"


# -- step 2: adaptation runs ------------------------------------------------------------------------------------------
def adapt(setup: Setup, work: Path, data_dir: Path, primary: Path, minis: dict[str, Path], method: str, lang: str,
          seed: int) -> Path:
    """One adaptation run (skipped when already done), checkpointed every eval_every steps."""
    from minimodel.adaptation.train import AdaptConfig, run_adaptation
    from minimodel.config import load_config

    out = work / "adapt" / method / f"seed{seed}"
    steps = setup.steps(method)
    over = ["over=full"] if method == "standard" else ["over=mini", f"mini_model={minis[method]}"]
    cfg = load_config(AdaptConfig, REPO / "configs/adapt/default.yaml", [
        *over, f"primary_model={primary}", f"target_langs=[{lang}]", f"data_dir={data_dir}", f"output_dir={out}",
        f"seq_length={setup.seq_length}", f"data_seed={seed}", f"init.seed={seed}", f"train.seed={seed}",
        f"train.steps={steps}", f"train.micro_batch_size={setup.adapt_batch}", f"train.optim.lr={setup.adapt_lr}",
        f"train.schedule.warmup_steps={max(1, steps // 10)}", f"train.checkpoint.save_every={setup.eval_every}",
        f"train.checkpoint.keep_last={steps // setup.eval_every + 2}", "train.eval.every=0", "train.eval.batches=4",
        "train.torch_adam=true", "tracking.enabled=false"])
    _ensure_process_group()
    status = run_adaptation(cfg).outputs[lang]
    if status != "done":
        raise RuntimeError(f"adaptation {method}/{lang}/seed {seed} did not finish: {status} "
                           f"(see {out / lang / 'error.txt'})")
    return out / lang


# -- step 3: quality at every checkpoint ---------------------------------------------------------------------------
class PluggedEvaluator:
    """Held-out target MLM loss of the primary model with given target embeddings installed (as plug() does)."""

    def __init__(self, primary_dir: Path, data_dir: Path, lang: str, setup: Setup):
        from transformers import AutoModelForMaskedLM

        from minimodel.data.mlm import MaskedLMDataset
        from minimodel.hf import load_model, load_tokenizer

        self.primary = load_model(primary_dir, AutoModelForMaskedLM).eval()
        self.tokenizer = load_tokenizer(data_dir / lang / "tokenizer")
        valid = MaskedLMDataset(data_dir / lang / "valid", self.tokenizer, setup.seq_length, 0.15, seed=0)
        n = min(setup.eval_sequences, len(valid))
        items = [valid[i] for i in range(n)]
        self.batches = [{k: torch.as_tensor(np.stack([it[k] for it in items[i:i + 16]]))
                         for k in items[0]} for i in range(0, n, 16)]

    def model_with(self, weight: torch.Tensor, token_map: torch.Tensor):
        from minimodel.adaptation.vocab import install_vocabulary

        model = copy.deepcopy(self.primary)
        install_vocabulary(model, weight, token_map, self.tokenizer.pad_token_id)
        return model.eval()

    @torch.no_grad()
    def loss(self, model) -> float:
        from minimodel.training.hf_mlm import masked_lm_loss

        model.eval()
        total = sum(float(masked_lm_loss(model, b)) * int((b["labels"] != -100).sum()) for b in self.batches)
        return total / sum(int((b["labels"] != -100).sum()) for b in self.batches)

    def initial_weight(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings adaptation starts from (adapt_language's random init with init.seed = seed)."""
        from minimodel.adaptation.vocab import INITIALISERS

        mapping = torch.full((len(self.tokenizer),), -1, dtype=torch.long)
        source = self.primary.get_input_embeddings().weight.detach()
        return INITIALISERS["random"](source, mapping, self.tokenizer, std=0.02, pad_id=self.tokenizer.pad_token_id,
                                      generator=torch.Generator().manual_seed(seed))


def _checkpoint_embeddings(ckpt: Path, vocab: int) -> torch.Tensor:
    """The token-embedding matrix in a DeepSpeed checkpoint of the adaptation loop (module states)."""
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    found = [v for k, v in states.items() if k.endswith("embeddings.word_embeddings.weight") and v.shape[0] == vocab]
    if len(found) != 1:
        raise RuntimeError(f"{ckpt}: expected one {vocab}-row word-embedding matrix, found {len(found)}")
    return found[0].float()


def quality_curve(run_dir: Path, evaluator: PluggedEvaluator, initial_loss: float) -> list[dict]:
    """[{step, flops, wall_clock_s, loss}] from step 0 to the end; cached in <run_dir>/quality_curve.json. The
    intermediate checkpoints are deleted once read (the final embeddings stay in the adaptation artifact)."""
    from minimodel.adaptation.artifact import read_artifact

    cache = run_dir / "quality_curve.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    metrics = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    tensors, info = read_artifact(run_dir)
    token_map = tensors["token_map"]
    points = [{"step": 0, "flops": 0.0, "wall_clock_s": 0.0, "loss": initial_loss}]
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        step = int(ckpt.name.removeprefix("step_"))
        weight = _checkpoint_embeddings(ckpt, info["vocab_size"])
        points.append({"step": step, "flops": metrics[step]["compute/flops"],
                       "wall_clock_s": metrics[step]["compute/wall_clock_s"],
                       "loss": evaluator.loss(evaluator.model_with(weight, token_map))})
    if points[-1]["step"] != info["steps"]:
        raise RuntimeError(f"{run_dir}: no checkpoint of the final step {info['steps']}")
    plugged = plug_final(run_dir, evaluator)
    if not math.isclose(plugged, points[-1]["loss"], rel_tol=1e-4):
        raise RuntimeError(f"{run_dir}: plug() gives loss {plugged}, the checkpoint {points[-1]['loss']}")
    write_text_atomic(cache, json.dumps(points))
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*"))[:-1]:
        shutil.rmtree(ckpt, ignore_errors=True)
    return points


def plug_final(run_dir: Path, evaluator: PluggedEvaluator) -> float:
    """The final embeddings plugged into the primary by adapt/plug.py's function, evaluated."""
    from minimodel.adaptation.plug import PlugConfig, plug
    from minimodel.hf import load_model

    out = run_dir / "plugged_primary"
    primary_dir = json.loads((run_dir / "adapt.json").read_text())["primary_model"]["path"]
    plug(PlugConfig(embeddings=str(run_dir), model=primary_dir, output_dir=str(out)))
    loss = evaluator.loss(load_model(out))
    shutil.rmtree(out, ignore_errors=True)
    return loss


def flop_check(model_dir: Path, evaluator: PluggedEvaluator, data_dir: Path, lang: str, setup: Setup) -> dict:
    """MLMFlops (what the loop logs) vs torch's FlopCounterMode on one adaptation step of this model."""
    from transformers import AutoModelForMaskedLM

    from minimodel.adaptation.train import TrainableConfig, select_trainable
    from minimodel.adaptation.vocab import install_vocabulary
    from minimodel.data.mlm import MaskedLMDataset
    from minimodel.hf import load_model
    from minimodel.training.hf_mlm import MLMFlops, masked_lm_loss

    model = load_model(model_dir, AutoModelForMaskedLM).train()
    weight, mapping = evaluator.initial_weight(0)
    install_vocabulary(model, weight, mapping, evaluator.tokenizer.pad_token_id)
    select_trainable(model, TrainableConfig())
    data = MaskedLMDataset(data_dir / lang / "train", evaluator.tokenizer, setup.seq_length, 0.15, seed=0)
    batch = {k: torch.as_tensor(np.stack([data[i][k] for i in range(setup.adapt_batch)])) for k in data[0]}
    predicted = MLMFlops(model)(batch)
    counted = count_flops(lambda: masked_lm_loss(model, batch).backward())
    return {"model_flops": predicted, "counted_flops": counted, "counted_vs_model": counted / predicted}


# -- step 5: zero-shot task accuracy of the final embeddings ------------------------------------------------------
def task_model(setup: Setup, work: Path, data_dir: Path, primary: Path) -> Path:
    """Step 3: the primary fine-tuned on English verse classification (embeddings frozen); done once."""
    from minimodel.config import load_config
    from minimodel.evaluation.finetune import FinetuneConfig, finetune

    out = work / "finetune"
    if _stamp(out / "benchmark.stamp", setup.key()):
        return out / "model"
    cfg = load_config(FinetuneConfig, REPO / "configs/evaluate/finetune/verse_class_tiny.yaml", [
        f"model_dir={primary}", f"task.data_dir={data_dir}", f"output_dir={out}", "source_lang=en",
        f"task.max_length={setup.seq_length}", f"train.steps={setup.finetune_steps}",
        f"train.schedule.warmup_steps={max(1, setup.finetune_steps // 10)}", f"train.eval.every={setup.finetune_steps}",
        "eval_splits=[test]", "tracking.enabled=false"])
    print(f"[{NAME}] step 3: fine-tuning the primary on English verse classification", flush=True)
    _ensure_process_group()
    result = finetune(cfg)
    if result.status != "finished":
        raise SystemExit(f"[{NAME}] fine-tuning stopped by a signal: run the same command again to resume")
    _write_stamp(out / "benchmark.stamp", setup.key())
    return Path(result.outputs["task_model"])


def zero_shot_accuracy(run_dir: Path, task_dir: Path, primary: Path, data_dir: Path, lang: str, method: str,
                       setup: Setup) -> float:
    """Step 4: the run's final embeddings plugged into the task model, accuracy on held-out target verses
    (cached in <run_dir>/zero_shot/metrics.json)."""
    from minimodel.adaptation.plug import PlugConfig, plug
    from minimodel.config import load_config
    from minimodel.evaluation.zero_shot import ZeroShotConfig, zero_shot

    out = run_dir / "zero_shot"
    if not (out / "metrics.json").is_file():
        plugged = run_dir / "plugged_task_model"
        plug(PlugConfig(embeddings=str(run_dir), model=str(task_dir), primary_model=str(primary),
                        output_dir=str(plugged)))
        cfg = load_config(ZeroShotConfig, REPO / "configs/evaluate/zero_shot/verse_class_tiny.yaml", [
            f"method={method}", f"source_model_dir={task_dir}", f"task.data_dir={data_dir}",
            f"task.max_length={setup.seq_length}", f"task.max_eval_examples={setup.zero_shot_examples}",
            f"targets=[{{lang: {lang}, model_dir: {plugged}, tokenizer: {data_dir / lang / 'tokenizer'}}}]",
            "evaluate_source=false", f"output_dir={out}", "tracking.enabled=false"])
        zero_shot(cfg)
        shutil.rmtree(plugged, ignore_errors=True)
    return json.loads((out / "metrics.json").read_text())[lang]["accuracy"]


# -- step 4: compute to matched quality ---------------------------------------------------------------------------
def compute_to_reach(points: list[dict], target_loss: float, key: str = "flops") -> float | None:
    """The `key` (FLOPs or seconds) at which the curve first reaches `target_loss`, linearly interpolated between
    the checkpoints around that crossing; None if it never does."""
    for before, after in zip(points, points[1:]):
        if after["loss"] <= target_loss:
            if before["loss"] <= target_loss:
                return before[key]
            frac = (before["loss"] - target_loss) / (before["loss"] - after["loss"])
            return before[key] + frac * (after[key] - before[key])
    return None


def analyse(curves: dict[tuple[str, str, int], list[dict]], setup: Setup) -> tuple[list[dict], dict]:
    rows = []
    for lang in setup.target_langs:
        for method in MINI_METHODS:
            for t in THRESHOLDS:
                speedups, wall = [], []
                for seed in setup.seeds:
                    standard = curves.get(("standard", lang, seed))
                    mini = curves.get((method, lang, seed))
                    if standard is None or mini is None:
                        continue
                    start, end = standard[0]["loss"], standard[-1]["loss"]
                    target = start - t * (start - end)
                    reach = {k: (compute_to_reach(standard, target, k), compute_to_reach(mini, target, k))
                             for k in ("flops", "wall_clock_s")}
                    speedups.append(reach["flops"][0] / reach["flops"][1] if reach["flops"][1] else None)
                    wall.append(reach["wall_clock_s"][0] / reach["wall_clock_s"][1]
                                if reach["wall_clock_s"][1] else None)
                if not speedups:
                    continue
                reached = [s for s in speedups if s is not None]
                reached_wall = [s for s in wall if s is not None]
                rows.append({"method": method, "lang": lang, "threshold": t, "seeds": len(speedups),
                             "reached": len(reached), "per_seed_speedup": speedups,
                             "speedup": summary(reached) if reached else None,
                             "wall_clock_speedup": summary(reached_wall) if reached_wall else None})
    average = {m: {} for m in MINI_METHODS}
    for m in MINI_METHODS:
        for t in THRESHOLDS:
            medians = [r["speedup"]["median"] for r in rows if r["method"] == m and r["threshold"] == t
                       and r["speedup"] is not None and r["reached"] == r["seeds"]]
            langs = {r["lang"] for r in rows if r["method"] == m and r["threshold"] == t}
            # Averaged only when every language reached it in every seed; else null (not matched).
            average[m][str(t)] = statistics.mean(medians) if medians and len(medians) == len(langs) else None
    return rows, average


def figure(result: dict):
    langs = result["setup"]["target_langs"]
    fig, axes = pyplot().subplots(1, len(langs), figsize=(5.2 * len(langs), 4.6), squeeze=False)
    colours = {"standard": "tab:gray", "minijoint": "tab:blue", "minipost": "tab:orange"}
    for ax, lang in zip(axes[0], langs):
        final = []
        for c in result["curves"]:
            if c["lang"] != lang:
                continue
            label = c["method"] if c["seed"] == min(x["seed"] for x in result["curves"] if x["lang"] == lang) else None
            ax.plot([p["flops"] / 1e9 for p in c["points"]], [p["loss"] for p in c["points"]], "-",
                    color=colours[c["method"]], alpha=0.8, lw=1.2, label=label)
            if c["method"] == "standard":
                final.append(c["points"][-1]["loss"])
        if final:
            ax.axhline(statistics.mean(final), color="tab:gray", ls=":", lw=1, label="standard, final")
        ax.set_xlabel("adaptation GFLOPs (cumulative)")
        ax.set_ylabel("held-out MLM loss, primary + plugged embeddings", fontsize=8)
        rows = {(r["method"], r["threshold"]): r for r in result["compute_to_quality"] if r["lang"] == lang}
        text = []
        for m in MINI_METHODS:
            cells = []
            for t in (0.95, 0.99):
                r = rows.get((m, t))
                if r is not None:
                    cells.append(f"{int(100 * t)}%: " + (f"{r['speedup']['median']:.2f}x" if r["speedup"] else "-")
                                 + f" ({r['reached']}/{r['seeds']})")
            text.append(f"{m} saving {', '.join(cells)}")
        ax.set_title(f"{lang}\n" + "\n".join(text), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = result["setup"]
    seeds = sorted({c["seed"] for c in result["curves"]})
    fig.suptitle(f"Embedding adaptation to matched quality: primary {s['num_layers']} layers; MiniJoint mini-model "
                 f"{s['mini_layers']} layers ({s.get('secondary_head', 'separate')} head), MiniPost "
                 f"{s['minipost_layers']}; seeds {seeds}\nsaving = standard's "
                 f"FLOPs / method's FLOPs to reach X% of standard's final loss reduction (seeds reaching it)",
                 fontsize=9)
    return fig


def main(argv: list[str] | None = None) -> dict:
    parser = arg_parser(__doc__, "tiny model, data and runs (CI)")
    parser.add_argument("--work", type=Path, default=None,
                        help="work dir for data, models and runs (default: runs/benchmarks/adaptation_compute"
                             "[_smoke]); re-running the same command reuses what is finished there")
    parser.add_argument("--langs", nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--adapt-steps", type=int, default=None, help="standard adaptation steps")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--secondary-head", choices=["separate", "shared_transform"], default=None,
                        help="MiniJoint's secondary MLM head (model.secondary_head)")
    parser.add_argument("--no-zero-shot", action="store_true",
                        help="skip step 5 (fine-tuning + zero-shot accuracy of the final embeddings)")
    args = parse_args(parser, argv)
    setup = dataclasses.replace(SMOKE) if args.smoke else Setup()
    for key, value in (("target_langs", args.langs), ("seeds", args.seeds), ("adapt_steps", args.adapt_steps),
                       ("pretrain_steps", args.pretrain_steps), ("secondary_head", args.secondary_head)):
        if value is not None:
            setattr(setup, key, value)
    work = (args.work or REPO / "runs" / "benchmarks" / (NAME + ("_smoke" if args.smoke else ""))).resolve()

    data_dir = prepare(setup, work)
    export_dir = pretrain_and_export(setup, work, data_dir)
    primary = export_dir / "primary"
    minis = {"minijoint": export_dir / "mini", "minipost": minipost(setup, work, data_dir, export_dir)}

    curves: dict[tuple[str, str, int], list[dict]] = {}
    checks: dict[str, dict] = {}
    step_times: dict[str, list[float]] = {m: [] for m in METHODS}
    flops_per_step: dict[str, list[float]] = {m: [] for m in METHODS}
    evaluators = {lang: PluggedEvaluator(primary, data_dir, lang, setup) for lang in setup.target_langs}
    for seed in setup.seeds:  # seed-major: an interrupted run has every language of the first seeds
        for lang, evaluator in evaluators.items():
            initial = evaluator.loss(evaluator.model_with(*evaluator.initial_weight(seed)))
            for method in METHODS:  # interleaved per (seed, language): load changes hit every method alike
                print(f"[{NAME}] step 2: {method} adaptation to {lang}, seed {seed}", flush=True)
                run_dir = adapt(setup, work, data_dir, primary, minis, method, lang, seed)
                curves[method, lang, seed] = quality_curve(run_dir, evaluator, initial)
                rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                wall = [r["compute/wall_clock_s"] for r in rows]
                step_times[method] += [b - a for a, b in zip([0.0] + wall, wall)][1:]  # the first step warms up
                flops_per_step[method].append(rows[-1]["compute/flops"] / rows[-1]["step"])
                if method not in checks:
                    model_dir = primary if method == "standard" else minis[method]
                    checks[method] = flop_check(model_dir, evaluator, data_dir, lang, setup)

    zero_shot_result = None
    if not args.no_zero_shot:
        task_dir = task_model(setup, work, data_dir, primary)
        accuracy: dict[str, dict[str, list[float]]] = {m: {lang: [] for lang in setup.target_langs} for m in METHODS}
        for (method, lang, seed) in curves:
            run_dir = work / "adapt" / method / f"seed{seed}" / lang
            accuracy[method][lang].append(zero_shot_accuracy(run_dir, task_dir, primary, data_dir, lang, method,
                                                             setup))
        zero_shot_result = {
            "task": "verse_class (Bible part of a verse), step 3 on English, final embeddings plugged (step 4)",
            "source_accuracy": json.loads((work / "finetune" / "metrics.json").read_text())["test/accuracy"],
            "per_method": {m: {lang: summary(v) for lang, v in by_lang.items() if v} for m, by_lang in accuracy.items()}}

    rows, average = analyse(curves, setup)
    minipost_metrics = (work / "minipost" / "metrics.jsonl").read_text().splitlines()
    result = header(NAME, args.smoke)
    result["setup"] = {**dataclasses.asdict(setup), "steps": {m: setup.steps(m) for m in METHODS},
                       "minipost_layers": f"{setup.minipost_layers}+{setup.minipost_new_layers}",
                       "work_dir": str(work)}
    result["quality_signal"] = QUALITY_SIGNAL
    result["flop_check"] = checks
    result["step_time_s"] = {m: summary(t) for m, t in step_times.items()}
    result["flops_per_step"] = {m: statistics.median(f) for m, f in flops_per_step.items()}
    result["minipost_step1b_flops"] = json.loads(minipost_metrics[-1])["compute/flops"]
    result["curves"] = [{"method": m, "lang": lang, "seed": seed, "points": pts}
                        for (m, lang, seed), pts in curves.items()]
    result["compute_to_quality"] = rows
    result["zero_shot_accuracy"] = zero_shot_result
    result["average_speedup"] = average
    save(NAME, result, SCHEMA, figure(result), args.out)
    for m in MINI_METHODS:
        cells = ", ".join(f"{int(100 * t)}%: " + (f"{average[m][str(t)]:.2f}x" if average[m][str(t)] else "not matched")
                          for t in THRESHOLDS)
        print(f"[{NAME}] {m}: compute saving vs standard (mean over languages of the median over seeds) {cells}")
    return result


if __name__ == "__main__":
    main()
