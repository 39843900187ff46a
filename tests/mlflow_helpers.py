"""MLflow test helpers: fresh stores, and a synthetic tracked pipeline logged through Tracker as the stages do (a
parent run, one child run per stage and language with the config as params, the standard tags, stepped
training/eval metrics)."""
from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from minimodel.tracking import Tracker, TrackingConfig, layout_tags, local_store_uri


@dataclass
class ToyModel:
    hidden_size: int = 64
    num_layers: int = 4
    mini_layers: int = 2


@dataclass
class ToyStageConfig:
    output_dir: str = "out"
    lr: float = 1e-3
    steps: int = 30
    model: ToyModel = field(default_factory=ToyModel)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@functools.cache
def _migrated_db() -> Path:
    from mlflow import MlflowClient

    store = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
    MlflowClient(local_store_uri(store)).search_experiments()  # creates the schema (seconds on a busy machine)
    return store / "mlflow.db"


def new_store(path: Path) -> Path:
    """A fresh, empty store directory whose SQLite schema is already created (a copy of a template)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(_migrated_db(), path / "mlflow.db")
    return path


STAGES = [("pretrain", "minijoint", "en", None), ("adapt", "minijoint", "en", "sw"),
          ("adapt", "minijoint", "en", "ny")]


def loss_at(step: int, stage_index: int) -> float:
    return 2.0 + 6.0 * math.exp(-step / 8) + 0.3 * stage_index


def log_synthetic_pipeline(tracking: TrackingConfig, steps: int = 30) -> dict:
    """Log a parent run with three child runs; returns their ids and names."""
    out = {"children": {}}
    with Tracker(dataclasses.replace(tracking, run_name="pipeline-demo"), None,
                 tags={"stage": "pipeline", "method": "minijoint"}) as parent:
        out["parent"], out["experiment_id"] = parent.run_id, parent.experiment_id
        child_tracking = dataclasses.replace(tracking, parent_run_id=parent.run_id)
        for i, (stage, method, src, tgt) in enumerate(STAGES):
            cfg = ToyStageConfig(output_dir=f"out/{stage}-{tgt or src}", steps=steps, tracking=child_tracking)
            tags = {"stage": stage, "method": method, "source_lang": src, "target_lang": tgt, **layout_tags()}
            with Tracker(child_tracking, cfg, tags) as t:
                for step in range(1, steps + 1):
                    t.log_metrics({"train/loss": loss_at(step, i), "lr": 1e-3 * min(1, step / 5),
                                   "grad_norm": 1.0 / step, "tokens_per_s": 1000.0 + step,
                                   "flops": 1e12 * step}, step)
                    if step % 10 == 0:
                        t.log_metrics({"eval/loss": loss_at(step, i) + 0.2}, step)
                out["children"][t.run_name] = t.run_id
        parent.log_metrics({"xnli/sw/accuracy": 61.0, "xnli/ny/accuracy": 58.0}, 0)
    return out
