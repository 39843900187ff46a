"""The benchmarks' smoke modes (real models and stages, tiny shapes) and their result schemas.

Timings are never asserted (they are what the benchmarks measure); what is asserted is that each benchmark runs
from its one command, writes JSON that fits its schema plus a PNG, and that its FLOP accounting agrees with torch's
FlopCounterMode and with itself. Their GPU preset (--base) is checked here for its refusal without CUDA only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import adaptation_compute, head_cost, mfu  # noqa: E402
from benchmarks.common import HEADER, SchemaError, check_schema, summary, write_result  # noqa: E402
from minimodel.evaluation.report import Point, summarize  # noqa: E402


def cpu_env() -> dict[str, str]:
    """A benchmark process on the CPU, one thread, outside any launcher's world."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MLFLOW_TRACKING_URI="")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_smoke(script: str, out: Path, *extra: str, timeout: int = 600) -> dict:
    proc = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--smoke", "--out", str(out), *extra],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
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
    mini, full = r["workloads"]["adapt_mini"], r["workloads"]["adapt_standard"]
    assert mini["model_flops_per_step"] < full["model_flops_per_step"]
    # the peak is measured in the dtype every workload trains in
    for name, w in r["workloads"].items():
        assert {"float32": "fp32", "bfloat16": "bf16"}[r["peak"]["dtype"]] == w["precision"], name
    # issue #19's targets, from the workloads' own numbers
    t = r["targets"]
    assert t["pretrain_mfu"] == r["workloads"]["pretrain"]["mfu_vs_best_peak"]
    assert t["pretrain_mfu_target"] == 0.45 and t["pretrain_mfu_reached"] == (t["pretrain_mfu"] >= 0.45)
    assert 0 < t["adapt_flop_saving"] == pytest.approx(1 - mini["model_flops_per_step"] / full["model_flops_per_step"])
    assert t["adapt_wallclock_saving"] == pytest.approx(
        1 - mini["step_time_s"]["median"] / full["step_time_s"]["median"])
    assert t["wallclock_over_flop_saving"] == pytest.approx(t["adapt_wallclock_saving"] / t["adapt_flop_saving"])
    assert t["target"] == 0.9 and t["reached"] == (t["wallclock_over_flop_saving"] >= 0.9)
    # the raw step times per round (2 x 2 here): the ratio recomputed round by round from them
    import statistics
    assert [len(ts) for ts in full["step_times_s"]] == [2, 2] and [len(ts) for ts in mini["step_times_s"]] == [2, 2]
    rounds = [(1 - statistics.median(m) / statistics.median(f)) / t["adapt_flop_saving"]
              for f, m in zip(full["step_times_s"], mini["step_times_s"])]
    assert t["wallclock_over_flop_saving_per_round"]["min"] == pytest.approx(min(rounds))
    assert t["wallclock_over_flop_saving_per_round"]["max"] == pytest.approx(max(rounds))


def test_mfu_adaptation_runs_leave_no_engine_behind():
    """A DeepSpeed engine left alive keeps GBs on the GPU at base size (its ZeRO gradient hooks keep it from the
    GC): each adaptation run must release its engine before the next workload."""
    code = textwrap.dedent("""
        import gc, weakref
        from benchmarks import common, mfu
        engines, train = [], mfu.train

        def recording_train(*args, **kwargs):
            result = train(*args, **kwargs)
            engines.append(weakref.ref(result.engine))
            return result

        mfu.train = recording_train
        args = common.parse_args(common.arg_parser("", "", model_shape=True), ["--smoke"])
        cfg = common.minijoint_config(args, 1000)
        with common.MiniJointSteps.world(cfg, args.micro_batch):
            adaptation = mfu.Adaptation(cfg, cfg.num_layers, args.micro_batch)
            adaptation.run(1)
            adaptation.run(1)
            gc.collect()
            print("engines alive:", sum(ref() is not None for ref in engines), "of", len(engines))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "engines alive: 0 of 2" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("module", [head_cost, mfu], ids=["head_cost", "mfu"])
def test_base_preset_is_refused_without_cuda(module, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        module.main(["--base", "--out", str(tmp_path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--base is the GPU preset" in err and "no CUDA device" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("module", [head_cost, mfu], ids=["head_cost", "mfu"])
def test_smoke_and_base_are_exclusive(module, capsys):
    with pytest.raises(SystemExit) as exited:
        module.main(["--smoke", "--base"])
    assert exited.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_mfu_refuses_a_mini_model_as_deep_as_the_full_one(capsys):
    with pytest.raises(SystemExit) as exited:
        mfu.main(["--layers", "4", "--mini-layers", "4"])
    assert exited.value.code == 2
    assert "must be below --layers 4" in capsys.readouterr().err


@pytest.mark.slow
def test_adaptation_compute_smoke(tmp_path):
    work = tmp_path / "work"
    # a pipeline of eleven stage processes: most of its time is their start-up, slow on a loaded machine
    r = run_smoke("adaptation_compute", tmp_path / "out", "--work", str(work), timeout=1200)
    fps = r["flops_per_step"]
    assert fps["minijoint"] < fps["standard"] and fps["minipost"] < fps["standard"]
    curves = {(c["method"], c["lang"], c["seed"]): c["points"] for c in r["curves"]}
    assert set(curves) == {(m, "ny", 0) for m in adaptation_compute.METHODS}
    for (method, _, _), points in curves.items():
        steps = [p["step"] for p in points]
        assert steps == list(range(0, r["setup"]["steps"][method] + 1, r["setup"]["snapshot_every"])), method
        assert points[0]["flops"] == 0 and points[0]["quality"] == 0  # the gain is measured from step 0
        assert points[-1]["quality"] > 0, f"{method}: adaptation did not lower the primary's held-out loss"
    # the benchmark is the pipeline: seed 0's stages, seeded with 0, started from the same initial embeddings
    seed0 = work / "seed0"
    assert "seed: 0" in (seed0 / "config.yaml").read_text()
    snapshots = [json.loads((seed0 / "zero_shot/target_mlm" / m / "snapshots.json").read_text())
                 for m in adaptation_compute.METHODS]
    initial = {s["ny"]["0"]["mlm_loss"] for s in snapshots}
    assert len(initial) == 1, initial
    assert not (seed0 / "finetune").exists()  # no fine-tuned task configured: no step 3
    assert {(row["method"], row["threshold"]) for row in r["compute_to_quality"]} == {
        (m, t) for m in adaptation_compute.MINI_METHODS for t in adaptation_compute.THRESHOLDS}


# -- the aggregation over seeds and the schema checker, on known inputs ------------------------------------------------
def _summary(curves):
    """The report's summary (summarize) of target_mlm for ny from {method: [(flops, gain), ...]}."""
    points = {m: [Point(q, f, f / 10, i) for i, (f, q) in enumerate(c)] for m, c in curves.items()}
    data = {"points": {"target_mlm": {"ny": points}}, "source": {}, "metric": {"target_mlm": "mlm_gain"}}
    return summarize(data, "standard", list(adaptation_compute.THRESHOLDS), methods=list(points))


def test_savings_aggregate_the_reports_savings_over_seeds():
    standard = [(0, 0.0), (100, 4.0), (200, 5.0)]
    fast = [(0, 0.0), (50, 5.0)]  # reaches the standard's final gain with a quarter of its compute
    never = [(0, 0.0), (50, 3.0)]
    per_seed = {0: _summary({"standard": standard, "minijoint": fast, "minipost": fast}),
                1: _summary({"standard": standard, "minijoint": fast, "minipost": never})}
    rows, average = adaptation_compute.savings(per_seed, ["ny"])
    by = {(r["method"], r["threshold"]): r for r in rows}
    assert by["minijoint", 1.0]["per_seed_saving"] == pytest.approx([4.0, 4.0])
    # 95% of the standard's final gain (4.75): the standard first reaches it at 200 FLOPs, the fast curve at 50
    assert by["minijoint", 0.95]["saving"]["median"] == pytest.approx(4.0)
    assert by["minipost", 1.0]["per_seed_saving"][1] is None and by["minipost", 1.0]["reached"] == 1
    assert by["minipost", 1.0]["wall_clock_saving"]["n"] == 1
    assert average["minijoint"]["1.0"] == pytest.approx(4.0)
    assert average["minipost"]["1.0"] is None  # not matched in every seed: no average claimed


def test_check_schema_names_the_problem():
    schema = {"a": {"b": [float]}, "c": (int, None)}
    check_schema({"a": {"b": [1, 2.5]}, "c": None}, schema)
    for bad, where in (({"a": {"b": []}, "c": 1}, "$.a.b"), ({"a": {"b": [1.0]}}, "missing key 'c'"),
                       ({"a": {"b": ["x"]}, "c": 1}, "$.a.b[0]"), ({"a": {"b": [True]}, "c": 1}, "$.a.b[0]")):
        with pytest.raises(SchemaError, match=where.replace("$", r"\$").replace("[", r"\[")):
            check_schema(bad, schema)


def test_summary_quartiles_stay_within_the_data():
    # statistics.quantiles' default ("exclusive") put them outside: q25 0.75, q75 2.25 for [1, 2]
    assert summary([2.0, 1.0]) == {"median": 1.5, "min": 1.0, "max": 2.0, "q25": 1.25, "q75": 1.75, "n": 2}
    assert summary([1.0, 2.0, 3.0, 4.0, 5.0])["q25"] == 2.0 and summary([7.0])["q75"] == 7.0


def test_results_are_strict_json(tmp_path):
    header = {"benchmark": "b", "smoke": True, "command": "c", "machine": {"date_utc": "d", "cpu": "x",
                                                                           "torch_threads": 1}}
    with pytest.raises(ValueError, match="Out of range float"):  # no Infinity/NaN that strict parsers reject
        write_result(tmp_path / "b.json", {**header, "saving": float("inf")}, {"saving": float})
    assert not (tmp_path / "b.json").exists()


def test_a_benchmark_runs_from_any_working_directory(tmp_path, monkeypatch):
    """ofa_compute from another directory failed at its pipeline config ("configs/data/smoke.yaml does not
    exist"): only adaptation_compute moved to the repository root. Every benchmark's flags now resolve --out and
    --work where they were given, then run in the root."""
    from benchmarks import common, ofa_compute

    monkeypatch.chdir(tmp_path)
    parser = common.arg_parser("", "")
    parser.add_argument("--work", type=Path, default=None)
    args = common.parse_args(parser, ["--smoke", "--out", "results", "--work", "work"])
    assert (args.out, args.work, Path.cwd()) == (tmp_path / "results", tmp_path / "work", REPO)
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(ofa_compute.pipeline, "run", lambda cfg: ran.append(cfg) or (_ for _ in ()).throw(
        KeyboardInterrupt))  # its config loaded and checked: enough
    with pytest.raises(KeyboardInterrupt):
        ofa_compute.main(["--smoke", "--work", "work", "--out", "results"])
    assert ran and Path(ran[0].output_dir).is_relative_to(tmp_path / "work")
