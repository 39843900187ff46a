"""The benchmarks' smoke modes (real models and stages, tiny shapes) and their result schemas.

Timings are never asserted (they are what the benchmarks measure); what is asserted is that each benchmark runs
from its one command, writes JSON that fits its schema plus a PNG, and that its FLOP accounting agrees with torch's
FlopCounterMode and with itself.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import adaptation_compute, head_cost, mfu  # noqa: E402
from benchmarks.common import HEADER, SchemaError, check_schema  # noqa: E402


def run_smoke(script: str, out: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MLFLOW_TRACKING_URI="",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "torch_extensions")))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--smoke", "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} --smoke failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert (out / f"{script}.png").stat().st_size > 0
    result = json.loads((out / f"{script}.json").read_text())
    module = {"head_cost": head_cost, "mfu": mfu, "adaptation_compute": adaptation_compute}[script]
    check_schema(result, {**HEADER, **module.SCHEMA})
    assert result["smoke"] is True and result["benchmark"] == script
    return result


def test_head_cost_smoke(tmp_path):
    r = run_smoke("head_cost", tmp_path)
    sh = r["secondary_head"]
    # Counted FLOPs: the secondary head costs exactly what flops_per_token's head term says.
    assert sh["with_head"]["counted_flops_per_step"] == pytest.approx(sh["predicted_flops_per_step_with_head"],
                                                                      rel=1e-9)
    assert sh["overhead_flops_fraction"] == pytest.approx(sh["predicted_flops_fraction"], rel=1e-9)
    assert sh["overhead_flops_fraction"] > 0
    for row in r["lm_head"]:
        for key in ("head_only", "full_step"):
            # the full-sequence projection does ~1/mask_fraction times the head's vocabulary work
            assert row[key]["full_sequence_flops"] > row[key]["masked_flops"]
    assert [row["vocab_size"] for row in r["lm_head"]] == [1000, 4000]


def test_mfu_smoke(tmp_path):
    r = run_smoke("mfu", tmp_path)
    assert r["peak"]["best_flops_per_s"] == r["peak"]["flops_per_s"]["max"] > 0
    for name, w in r["workloads"].items():
        assert w["counted_flops_per_step"] == pytest.approx(w["model_flops_per_step"], rel=1e-9), name
        assert 0 < w["mfu_vs_best_peak"] == pytest.approx(
            w["model_flops_per_step"] / w["step_time_s"]["median"] / r["peak"]["best_flops_per_s"])
    # the mini-model (1 of 2 layers) costs less per step than the full model
    assert r["workloads"]["adapt_mini"]["model_flops_per_step"] < r["workloads"]["adapt_standard"]["model_flops_per_step"]


def test_adaptation_compute_smoke(tmp_path):
    r = run_smoke("adaptation_compute", tmp_path / "out", "--work", str(tmp_path / "work"))
    for method, check in r["flop_check"].items():
        assert check["counted_vs_model"] == pytest.approx(1.0, rel=1e-9), method
    fps = r["flops_per_step"]
    assert fps["minijoint"] < fps["standard"] and fps["minipost"] < fps["standard"]
    curves = {(c["method"], c["lang"], c["seed"]): c["points"] for c in r["curves"]}
    assert set(curves) == {(m, "ny", 0) for m in adaptation_compute.METHODS}
    for (method, _, _), points in curves.items():
        steps = [p["step"] for p in points]
        assert steps[0] == 0 and steps[-1] == r["setup"]["steps"][method] and steps == sorted(steps)
        assert points[0]["loss"] == curves["standard", "ny", 0][0]["loss"]  # same initial embeddings
        assert points[-1]["loss"] < points[0]["loss"], f"{method}: adaptation did not lower the plugged loss"
    accuracy = r["zero_shot_accuracy"]["per_method"]
    assert all(0 <= accuracy[m]["ny"]["median"] <= 1 for m in adaptation_compute.METHODS)
    assert {(row["method"], row["threshold"]) for row in r["compute_to_quality"]} == {
        (m, t) for m in adaptation_compute.MINI_METHODS for t in adaptation_compute.THRESHOLDS}


# -- the analysis and the schema checker, on known inputs ------------------------------------------------------------
def _curve(flops_and_losses):
    return [{"step": i, "flops": f, "wall_clock_s": f / 10, "loss": loss} for i, (f, loss) in
            enumerate(flops_and_losses)]


def test_compute_to_reach_interpolates_and_reports_unreached():
    curve = _curve([(0, 10.0), (100, 6.0), (200, 5.0)])
    assert adaptation_compute.compute_to_reach(curve, 8.0) == pytest.approx(50.0)
    assert adaptation_compute.compute_to_reach(curve, 5.0) == pytest.approx(200.0)
    assert adaptation_compute.compute_to_reach(curve, 5.5, key="wall_clock_s") == pytest.approx(15.0)
    assert adaptation_compute.compute_to_reach(curve, 4.9) is None


def test_analyse_speedups():
    setup = adaptation_compute.Setup(target_langs=["ny"], seeds=[0, 1])
    standard = _curve([(0, 10.0), (100, 6.0), (200, 5.0)])
    fast = _curve([(0, 10.0), (50, 5.0)])  # reaches the standard's final loss with a quarter of its compute
    never = _curve([(0, 10.0), (50, 7.0)])
    curves = {("standard", "ny", s): standard for s in (0, 1)}
    curves.update({("minijoint", "ny", 0): fast, ("minijoint", "ny", 1): fast,
                   ("minipost", "ny", 0): fast, ("minipost", "ny", 1): never})
    rows, average = adaptation_compute.analyse(curves, setup)
    by = {(r["method"], r["threshold"]): r for r in rows}
    assert by["minijoint", 1.0]["per_seed_speedup"] == pytest.approx([4.0, 4.0])
    # 95% of the standard's loss reduction: loss 5.25, standard at 175 FLOPs, the fast curve at 47.5
    assert by["minijoint", 0.95]["speedup"]["median"] == pytest.approx(175 / 47.5)
    assert by["minipost", 1.0]["per_seed_speedup"][1] is None and by["minipost", 1.0]["reached"] == 1
    assert average["minijoint"]["1.0"] == pytest.approx(4.0)
    assert average["minipost"]["1.0"] is None  # not matched in every seed: no average claimed


def test_check_schema_names_the_problem():
    schema = {"a": {"b": [float]}, "c": (int, None)}
    check_schema({"a": {"b": [1, 2.5]}, "c": None}, schema)
    for bad, where in (({"a": {"b": []}, "c": 1}, "$.a.b"), ({"a": {"b": [1.0]}}, "missing key 'c'"),
                       ({"a": {"b": ["x"]}, "c": 1}, "$.a.b[0]"), ({"a": {"b": [True]}, "c": 1}, "$.a.b[0]")):
        with pytest.raises(SchemaError, match=where.replace("$", r"\$").replace("[", r"\[")):
            check_schema(bad, schema)
