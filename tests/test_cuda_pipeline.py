"""The smoke pipeline end to end on one GPU: MiniJoint pretraining, export, MiniPost, adaptation, fine-tuning, plug,
zero-shot and the report, every stage a real process on CUDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from cuda_helpers import CUDA, GPU_DATA_CONFIG, ROOT, record

pytestmark = CUDA


def test_smoke_pipeline_end_to_end_on_the_gpu(tmp_path):
    """configs/pipeline/smoke.yaml with one GPU: TP 1, its corpus read from JSONL, MiniJoint / MiniPost / standard
    (MINIMODEL_GPU_METHODS to change), tracked in a local MLflow store. Every stage exits 0 and the report has
    every method and the unadapted baseline."""
    assert GPU_DATA_CONFIG.is_file(), f"{GPU_DATA_CONFIG} is missing: run `bash scripts/gpu_check.sh prepare` first"
    config = yaml.safe_load((ROOT / "configs/pipeline/smoke.yaml").read_text())
    methods = os.environ.get("MINIMODEL_GPU_METHODS", "standard,minijoint,minipost").split(",")
    config.update(output_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), methods=methods,
                  pretrain_nproc=1)
    config["configs"]["data"] = str(GPU_DATA_CONFIG)
    config["overrides"]["pretrain"] = [o.replace("tensor_model_parallel_size=2", "tensor_model_parallel_size=1")
                                       for o in config["overrides"]["pretrain"]]
    config["tracking"]["store_dir"] = str(tmp_path / "mlflow")
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MINIMODEL_TRACKING")}
    result = subprocess.run([sys.executable, "-m", "minimodel.pipeline", "--config", str(path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout[-4000:], result.stderr[-4000:])
    report = json.loads((tmp_path / "run/report/report.json").read_text())
    scored = report["tasks"]["target_mlm"]["languages"]["ny"]["methods"]
    assert set(methods) <= set(scored), sorted(scored)
    # verse_class: every method, and the unadapted baseline (method none, the primary reading ny with its own
    # tokenizer; minimodel/pipeline.py runs it only where the task's metric compares tokenizers, so not target_mlm)
    verse_class = report["tasks"]["verse_class"]["languages"]["ny"]
    assert set(methods) <= set(verse_class["methods"]), sorted(verse_class["methods"])
    unadapted = verse_class["baseline"]["quality"]  # an accuracy; None would mean the primary could not read ny
    assert isinstance(unadapted, float) and 0.0 <= unadapted <= 1.0, verse_class["baseline"]
    assert report["tasks"]["target_mlm"]["languages"]["ny"]["baseline"] is None
    alignment = json.loads((tmp_path / "run/minipost/alignment.json").read_text()) if "minipost" in methods else {}
    record("smoke_pipeline", methods=methods, unadapted_verse_class=unadapted,
           report_warnings=report.get("warnings", []), minipost_alignment=alignment,
           seconds_per_stage=_stage_seconds(tmp_path / "run"))


def _stage_seconds(output_dir: Path) -> dict[str, float]:
    """Each stage's wall clock from its stamp (minimodel/stages.py), where the stamp records it."""
    seconds = {}
    for stamp in output_dir.rglob(".stage.json"):
        info = json.loads(stamp.read_text())
        if "seconds" in info:
            seconds[str(stamp.parent.relative_to(output_dir))] = info["seconds"]
    return seconds
