"""The main job end to end: the shortened pipeline (configs/pipeline/smoke.yaml) as real processes, nested MLflow runs,
and a re-run that skips finished stages and links to their runs instead of duplicating them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from minimodel.config import ConfigError, load_config
from minimodel.pipeline import PipelineConfig, build_stages

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs/pipeline/smoke.yaml"


def run_pipeline(tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "minimodel.pipeline", "--config", str(SMOKE), f"output_dir={tmp / 'run'}",
         f"data_dir={tmp / 'data'}", f"tracking.store_dir={tmp / 'store'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_stages_follow_the_method_and_validate():
    cfg = load_config(PipelineConfig, SMOKE)
    stages = build_stages(cfg, parent_run_id="abc")
    names = [s.name for s in stages]
    assert names[:4] == ["data", "pretrain", "export", "minipost"] and names[-1] == "report"
    assert {f"adapt-{m}-ny" for m in ("standard", "minijoint", "minipost")} <= set(names)
    by_name = {s.name: s for s in stages}
    assert "torch.distributed.run" in by_name["pretrain"].argv and "--nproc-per-node" in by_name["pretrain"].argv
    assert "over=full" in by_name["adapt-standard-ny"].argv
    assert [a.name for a in by_name["adapt-minipost-ny"].after] == ["minipost", "data"]
    assert by_name["report"].command[-1] == "parent_run_id=abc" and by_name["report"].always_run
    with pytest.raises(ConfigError, match="target_langs"):
        load_config(PipelineConfig, SMOKE, ["target_langs=[en]"])
    with pytest.raises(ConfigError, match="overrides.adapter"):
        load_config(PipelineConfig, SMOKE, ["overrides.adapter=[x=1]"])


@pytest.mark.slow
def test_smoke_pipeline_end_to_end_then_rerun_skips_and_links(tmp_path):
    first = run_pipeline(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    report = json.loads((tmp_path / "run/report/report.json").read_text())
    assert (tmp_path / "run/report/compute_vs_quality.png").stat().st_size > 0
    text = json.dumps(report)
    for method in ("standard", "minijoint", "minipost"):
        assert method in text

    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("minimodel")
    parents = client.search_runs([exp.experiment_id], "tags.stage = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = children(client, parents[0].info.run_id)
    stages = {r.data.tags.get("stage") for r in kids}
    assert {"data", "pretrain", "export", "minipost", "adapt", "finetune", "evaluate"} <= stages, stages
    adapt_runs = [r for r in kids if r.data.tags.get("stage") == "adapt"]
    assert {r.data.tags.get("method") for r in adapt_runs} == {"standard", "minijoint", "minipost"}
    flops = {r.data.tags["method"]: r.data.metrics["compute/flops"] for r in adapt_runs}
    assert flops["minijoint"] < flops["standard"]  # the mini-model runs fewer layers for the same steps
    pretrain = next(r for r in kids if r.data.tags.get("stage") == "pretrain")
    assert pretrain.data.tags.get("tp") == "2"  # the model-parallel layout

    second = run_pipeline(tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    skipped = [line for line in second.stdout.splitlines() if line.endswith("skipped")]
    assert len(skipped) == len(build_stages(load_config(PipelineConfig, SMOKE))) - 1  # all but the report
    parents = client.search_runs([exp.experiment_id], "tags.stage = 'pipeline'", order_by=["start_time DESC"])
    assert len(parents) == 2
    relinked = children(client, parents[0].info.run_id)
    reused = [r for r in relinked if r.data.tags.get("reused_run_id")]
    first_runs = {r.info.run_id for r in kids if r.data.tags.get("stage") != "report"}
    assert {r.data.tags["reused_run_id"] for r in reused} == first_runs  # every earlier run linked, none re-run
    assert not [r for r in relinked if r.data.tags.get("stage") == "adapt" and not r.data.tags.get("reused_run_id")]
