"""The report, built from result files written here the way the stages write them (zero-shot metrics.json /
snapshots.json, adaptation adapt.json of the final embeddings and of each snapshot) in a pipeline's layout."""
import json

import pytest
import yaml

from minimodel.adaptation.artifact import snapshot_dir
from minimodel.config import load_config
from minimodel.evaluation.report import ReportConfig, report
from minimodel.layout import PipelineLayout
from minimodel.tracking import Tracker, TrackingConfig

# method -> (FLOPs per adaptation step, seconds per step, steps, {evaluated snapshot step (None = final): accuracy})
PLAN = {
    "standard": (100.0, 10.0, 4, {0: 0.20, 2: 0.60, None: 0.80}),
    "minijoint": (40.0, 5.0, 6, {2: 0.70, 4: 0.795, None: 0.81}),
    "minipost": (50.0, 4.0, 6, {None: 0.75}),  # no snapshots: its final embeddings only
}


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_pipeline_results(layout: PipelineLayout, plan=PLAN, lang="sw", n_examples=None) -> None:
    baseline = layout.zero_shot("verse_class", "none")  # the unadapted primary, below every method
    write_json(baseline / "metrics.json", {"en": {"accuracy": 0.9}, lang: {"accuracy": 0.5}})
    (baseline / "config.yaml").write_text(yaml.safe_dump({"method": "none", "source_lang": "en"}))
    for method, (flops, secs, steps, evals) in plan.items():
        run_dir = layout.adapt(method, lang)
        for step in [s for s in evals if s is not None] + [None]:
            at = steps if step is None else step
            write_json((run_dir if step is None else snapshot_dir(run_dir, step)) / "adapt.json",
                       {"method": method, "steps": at, "flops": flops * at, "wall_clock_s": secs * at})
        out = layout.zero_shot("verse_class", method)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump({"method": method, "source_lang": "en"}))
        write_json(out / "metrics.json", {"en": {"accuracy": 0.9, "baseline/majority": 0.3, "n_examples": 100.0},
                                          lang: {"accuracy": evals[None], "baseline/majority": 0.3,
                                                 **({"n_examples": n_examples} if n_examples else {})}})
        snapshots = {str(step): {"accuracy": acc} for step, acc in evals.items() if step is not None}
        if snapshots:
            write_json(out / "snapshots.json", {lang: snapshots})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_pipeline_results(PipelineLayout(root / "run"))
    tracking = TrackingConfig(store_dir=str(root / "mlflow"))
    with Tracker(tracking, tags={"stage": "pipeline"}) as parent:
        cfg = load_config(ReportConfig, overrides=[
            f"output_dir={root / 'report'}", f"pipeline_dir={root / 'run'}", f"parent_run_id={parent.run_id}",
            f"tracking.store_dir={root / 'mlflow'}", "methods=[standard, minijoint, minipost]"])
        paths = report(cfg).outputs
    return {"paths": paths, "parent": parent.run_id, "uri": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
            "root": root}


def test_report_compute_to_reach_reference_quality(pipeline):
    summary = json.loads(pipeline["paths"]["json"].read_text())
    sw = summary["tasks"]["verse_class"]["languages"]["sw"]
    assert summary["tasks"]["verse_class"]["source"] == {"en": 0.9}
    assert summary["tasks"]["verse_class"]["majority"] == {"en": 0.3} and not summary["tasks"]["verse_class"]["at_chance"]
    assert sw["reference_final"] == 0.80
    std, mj, mp = (sw["methods"][m] for m in ("standard", "minijoint", "minipost"))
    assert [(p["adapt_step"], p["flops"], p["wall_clock_s"]) for p in mj["points"]] == [
        (2, 80.0, 10.0), (4, 160.0, 20.0), (None, 240.0, 30.0)]
    assert std["final"] == {"quality": 0.80, "flops": 400.0, "wall_clock_s": 40.0}
    assert std["points"][0]["adapt_step"] == 0 and std["points"][0]["flops"] == 0.0  # the initial embeddings
    # 95% of 0.80 = 0.76 and 99% = 0.792: minijoint's step 4 (160 FLOPs) vs standard's step 4 (400)
    for frac in ("0.95", "0.99"):
        assert mj["reach"][frac]["flops"] == 160.0 and mj["reach"][frac]["wall_clock_s"] == 20.0
        assert mj["reach"][frac]["flops_saving"] == pytest.approx(2.5)
        assert mj["reach"][frac]["wall_clock_saving"] == pytest.approx(2.0)
    assert mj["reach"]["1"]["flops"] == 240.0 and mj["reach"]["1"]["flops_saving"] == pytest.approx(400 / 240)
    assert std["reach"]["1"]["flops_saving"] == 1.0
    # minipost: evaluated once, on its final embeddings: 6 steps x 50 FLOPs
    assert mp["final"] == {"quality": 0.75, "flops": 300.0, "wall_clock_s": 24.0}
    assert mp["reach"]["0.95"]["flops"] is None  # 0.75 < 0.76: not reached


def test_report_files_and_parent_artifacts(pipeline):
    from mlflow import MlflowClient
    from PIL import Image

    md = pipeline["paths"]["markdown"].read_text()
    assert "| sw | minijoint | 3 | 0.81 | 240 | 30 | 160 (2.50x) | 160 (2.50x) | 240 (1.67x) |" in md
    assert "| sw | standard | 3 | 0.8 | 400 | 40 | 400 (1.00x) |" in md
    assert "at chance" not in md
    assert "| sw | minipost | 1 | 0.75 | 300 | 24 | not reached |" in md
    assert "en 0.9" in md
    with Image.open(pipeline["paths"]["png"]) as img:
        assert img.width > 500 and img.height > 300
    client = MlflowClient(pipeline["uri"])
    logged = {a.path for a in client.list_artifacts(pipeline["parent"], "report")}
    assert logged == {"report/report.json", "report/report.md", "report/compute_vs_quality.png"}
    metrics = client.get_run(pipeline["parent"]).data.metrics
    assert metrics["verse_class/sw/minijoint/accuracy"] == 0.81
    assert metrics["verse_class/sw/minijoint/flops_saving"] == pytest.approx(400 / 240)


def test_report_needs_no_tracking_and_no_run(pipeline, tmp_path, monkeypatch):
    """Tracking off (as a pipeline with tracking.enabled=false runs its stages), or a parent run the store does not
    hold: the same report, nothing logged."""
    monkeypatch.setenv("MINIMODEL_TRACKING", "off")
    off = report(load_config(ReportConfig, overrides=[
        f"output_dir={tmp_path / 'off'}", f"pipeline_dir={pipeline['root'] / 'run'}", "parent_run_id=0123abc",
        f"tracking.store_dir={tmp_path / 'store'}"])).outputs
    assert json.loads(off["json"].read_text()) == json.loads(pipeline["paths"]["json"].read_text())
    assert not (tmp_path / "store").exists()
    monkeypatch.delenv("MINIMODEL_TRACKING")
    unknown = report(load_config(ReportConfig, overrides=[
        f"output_dir={tmp_path / 'unknown'}", f"pipeline_dir={pipeline['root'] / 'run'}", "parent_run_id=0123abc",
        f"tracking.store_dir={pipeline['root'] / 'mlflow'}"])).outputs
    assert unknown["json"].read_text() == off["json"].read_text()


def test_report_of_a_directory_without_results_says_what_to_set(tmp_path):
    cfg = load_config(ReportConfig, overrides=[f"output_dir={tmp_path / 'r'}", f"pipeline_dir={tmp_path}",
                                               "tracking.enabled=false"])
    with pytest.raises(ValueError, match="holds no zero-shot results .* set pipeline_dir"):
        report(cfg)


def _points(*quality_flops_step):
    from minimodel.evaluation.report import Point

    return [Point(q, f, f, step) for q, f, step in quality_flops_step]


def test_target_mlm_fractions_are_fractions_of_the_standard_gain():
    from minimodel.evaluation.report import markdown, summarize

    data = {"metric": {"target_mlm": "mlm_gain"}, "source": {}, "majority": {}, "points": {"target_mlm": {"ny": {
        "standard": _points((0.0, 0.0, 0), (0.5, 100.0, 5), (1.0, 200.0, None)),
        "minipost": _points((0.0, 0.0, 0), (0.96, 60.0, 5), (0.99, 120.0, None))}}}}
    summary = summarize(data, "standard", [0.95, 1.0])
    minipost = summary["tasks"]["target_mlm"]["languages"]["ny"]["methods"]["minipost"]
    assert minipost["reach"]["0.95"]["target_quality"] == pytest.approx(0.95)
    assert minipost["reach"]["0.95"]["flops"] == 60.0 and minipost["reach"]["0.95"]["flops_saving"] == pytest.approx(200 / 60)
    assert minipost["reach"]["1"]["flops"] is None
    md = markdown(summary)
    assert "mlm_gain: held-out target-language masked-LM loss of the primary" in md and "at chance" not in md


def test_classification_at_chance_gets_a_warning():
    from minimodel.evaluation.report import markdown, summarize

    data = {"metric": {"verse_class": "accuracy"}, "source": {"verse_class": {"en": 0.36}},
            "majority": {"verse_class": {"en": 0.35}},
            "points": {"verse_class": {"ny": {"standard": _points((0.33, 0.0, 0), (0.32, 10.0, None))}}}}
    summary = summarize(data, "standard", [0.95], chance_margin=0.02)
    assert summary["tasks"]["verse_class"]["at_chance"]
    assert "**Warning: at chance.**" in markdown(summary) and "(en 0.35)" in markdown(summary)
    data["source"]["verse_class"]["en"] = 0.38  # 3 points above the majority class: no warning
    assert "at chance" not in markdown(summarize(data, "standard", [0.95], chance_margin=0.02))


def test_a_reference_that_did_not_improve_gets_a_warning():
    from minimodel.evaluation.report import Point, markdown, summarize

    data = {"metric": {"verse_class": "accuracy"}, "source": {"verse_class": {"en": 0.6}}, "majority": {},
            "points": {"verse_class": {
                "ny": {"standard": _points((0.21, 0.0, 0), (0.22, 5.0, 30), (0.20, 10.0, None))},  # noise
                "sw": {"standard": _points((0.21, 0.0, 0), (0.40, 10.0, None))}}}}  # learned
    summary = summarize(data, "standard", [0.95], chance_margin=0.02)
    assert summary["tasks"]["verse_class"]["no_gain"] == ["ny"]
    assert summary["tasks"]["verse_class"]["languages"]["sw"]["reference_gain"] == pytest.approx(0.19)
    assert "**Warning: no gain.**" in markdown(summary) and "else the chance margin: ny 0.02)" in markdown(summary)
    # with example counts, noise is two standard errors of the difference: sw's 0.19 gain is real on 500 examples
    # (2 * sqrt(0.40 * 0.60 / 500 + 0.21 * 0.79 / 500) = 0.057) and on 50 (0.180), noise on 40 (0.201)
    for n, no_gain in ((500, ["ny"]), (50, ["ny"]), (40, ["ny", "sw"])):
        data["points"]["verse_class"]["sw"]["standard"] = [
            Point(0.21, 0.0, 0.0, 0, n), Point(0.40, 10.0, 10.0, None, n)]
        counted = summarize(data, "standard", [0.95], chance_margin=0.02)
        assert counted["tasks"]["verse_class"]["no_gain"] == no_gain, n
    assert counted["tasks"]["verse_class"]["languages"]["sw"]["reference_gain_noise"] == pytest.approx(
        2 * (0.40 * 0.60 / 40 + 0.21 * 0.79 / 40) ** 0.5)


def test_methods_are_reported_in_the_configured_order_and_only_those():
    from minimodel.evaluation.report import markdown, summarize

    per_method = {m: _points((0.0, 0.0, 0), (q, 10.0, None)) for m, q in
                  (("minipost+copy_shared", 0.9), ("standard", 1.0), ("minipost", 0.8), ("bistil", 0.1))}
    data = {"metric": {"target_mlm": "mlm_gain"}, "source": {}, "majority": {},
            "points": {"target_mlm": {"ny": per_method}}}
    found = summarize(data, "standard", [1.0])
    assert found["methods"] == ["standard", "minipost", "minipost+copy_shared", "bistil"]  # the reference first
    chosen = summarize(data, "standard", [1.0], methods=["standard", "minipost+copy_shared", "minipost"])
    assert list(chosen["tasks"]["target_mlm"]["languages"]["ny"]["methods"]) == chosen["methods"] == [
        "standard", "minipost+copy_shared", "minipost"]
    assert "| ny | minipost+copy_shared | 2 | 0.9 |" in markdown(chosen) and "bistil" not in markdown(chosen)


def test_a_threshold_is_reached_where_the_curve_stays_above_it():
    """A noisy curve that touches 99% and falls back below had not reached it (RESULTS.md section 5: MiniPost's
    'saving' at 99% came out above its saving at 95%)."""
    from minimodel.evaluation.report import compute_to_reach

    curve = _points((0.5, 0.0, 0), (0.99, 10.0, 1), (0.97, 20.0, 2), (0.995, 30.0, 3), (1.0, 40.0, None))
    assert compute_to_reach(curve, 0.99).flops == 30.0 and compute_to_reach(curve, 0.95).flops == 10.0
    assert compute_to_reach(curve[:3], 0.98) is None  # ends below it


def test_what_the_report_cannot_report_is_left_out_and_said(tmp_path, caplog):
    """Never a result of another config reported as this one's, never a silent gap: a zero-shot directory whose
    stage was rerun under a changed config and did not finish keeps the older run's metrics.json (left out); a
    method or task directory of a name this version does not know, a requested task without results, and a snapshot
    whose compute record is gone are left out, and the report says so; the final embeddings stay the final point."""
    import logging

    from minimodel.provenance import RECORD

    layout = PipelineLayout(tmp_path / "run")
    write_pipeline_results(layout)
    write_json(layout.zero_shot("verse_class", "minipost") / RECORD, {"status": "started", "digest": "new"})
    (layout.zero_shot("verse_class", "minipost+old")).mkdir()
    (layout.root / "zero_shot" / "old_task" / "standard").mkdir(parents=True)
    (snapshot_dir(layout.adapt("minijoint", "sw"), 4) / "adapt.json").unlink()
    cfg = load_config(ReportConfig, overrides=[f"output_dir={tmp_path / 'report'}", f"pipeline_dir={layout.root}",
                                               "tracking.enabled=false"])
    with caplog.at_level(logging.WARNING, logger="minimodel.evaluation.report"):
        paths = report(cfg).outputs
    summary = json.loads(paths["json"].read_text())
    sw = summary["tasks"]["verse_class"]["languages"]["sw"]
    assert list(sw["methods"]) == ["standard", "minijoint"]
    assert [p["adapt_step"] for p in sw["methods"]["minijoint"]["points"]] == [2, None]
    left_out = summary["left_out"]
    assert len(left_out) == 4
    assert any("verse_class/minipost:" in x and "older run's" in x for x in left_out)
    assert any("minipost+old:" in x and "unknown method" in x for x in left_out)
    assert any("old_task:" in x and "not a task" in x for x in left_out)
    assert any("step_4" in x and "compute is unknown" in x for x in left_out)
    md = paths["markdown"].read_text()
    assert all(f"- {x}" in md for x in left_out) and all(f"left out: {x}" in summary["warnings"] for x in left_out)
    assert sum(r.getMessage().startswith("left out: ") for r in caplog.records) == 4
    asked = load_config(ReportConfig, overrides=[f"output_dir={tmp_path / 'asked'}", f"pipeline_dir={layout.root}",
                                                 "tracking.enabled=false", "tasks=[verse_class, verse_retrieval]",
                                                 "methods=[standard, minijoint]"])
    assert [x for x in json.loads(report(asked).outputs["json"].read_text())["left_out"] if "step_4" not in x] == [
        f"{layout.root / 'zero_shot' / 'verse_retrieval'}: no zero-shot result of this task"]


@pytest.mark.parametrize("through_plug", [False, True], ids=["direct", "through_a_plugged_model"])
def test_a_zero_shot_result_of_an_adaptation_made_again_since_is_left_out(tmp_path, through_plug):
    """The report paired a zero-shot score with the compute in the adaptation directory it names: after that
    adaptation was made again (another config) and before its zero-shot stage ran again (a pipeline stopped between
    them, evaluate/report.py run alone), the old run's quality sat on the new run's compute axis. Also where the
    scores read a model plugged with those embeddings (lt_sft_vocab, BiStil: their compute includes the adaptation's)
    and the plugging has not run again either: the chain of inputs is followed."""
    from dataclasses import dataclass

    from minimodel.provenance import claim_output, finish_output

    @dataclass
    class Adapt:
        steps: int = 6

    @dataclass
    class Plug:
        embeddings: str = ""

    @dataclass
    class ZeroShot:
        embeddings: str = ""
        model_dir: str = ""

    layout = PipelineLayout(tmp_path / "run")
    adapted, scored = layout.adapt("minijoint", "sw"), layout.zero_shot("verse_class", "minijoint")
    plugged = layout.root / "plugged_mlm" / "sw"
    chain = [(adapted, Adapt()), *([(plugged, Plug(str(adapted)))] if through_plug else []),
             (scored, ZeroShot(model_dir=str(plugged)) if through_plug else ZeroShot(embeddings=str(adapted)))]
    for out, cfg in chain:  # records first: a directory of files without one is no stage's
        claim_output(out, cfg, resumable=False)
        finish_output(out, cfg)
    write_pipeline_results(layout)
    cfg = load_config(ReportConfig, overrides=[f"output_dir={tmp_path / 'report'}", f"pipeline_dir={layout.root}",
                                               "tracking.enabled=false"])

    def reported() -> tuple[list[str], list[str]]:
        summary = json.loads(report(cfg).outputs["json"].read_text())
        return list(summary["tasks"]["verse_class"]["languages"]["sw"]["methods"]), summary["left_out"]

    assert reported() == (["standard", "minijoint", "minipost"], [])
    claim_output(adapted, Adapt(steps=8), resumable=False)  # adapted again: its scores are not yet this run's
    methods, [left_out] = reported()
    assert methods == ["standard", "minipost"]
    changed = f"embeddings: {adapted} was made again since"
    if through_plug:
        changed = f"model_dir: {plugged} was made from results that changed since ({changed}"
    assert f"{scored}: scored results that changed since ({changed}" in left_out
    finish_output(adapted, Adapt(steps=8))
    assert "steps: 6 -> 8" in reported()[1][0]  # finished under the new config: what changed is named


def _report_with_baseline(root, baseline: dict, caplog, n_examples=None):
    """The PLAN's results plus the unadapted baseline's (zero_shot/verse_class/none/metrics.json, as zero_shot
    writes it for method none), reported with tracking off; (summary, markdown, warnings logged)."""
    import logging

    layout = PipelineLayout(root / "run")
    write_pipeline_results(layout, n_examples=n_examples)
    out = layout.zero_shot("verse_class", "none")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"method": "none", "source_lang": "en"}))
    write_json(out / "metrics.json", {"en": {"accuracy": 0.9, "baseline/majority": 0.3}, "sw": baseline})
    cfg = load_config(ReportConfig, overrides=[f"output_dir={root / 'report'}", f"pipeline_dir={root / 'run'}",
                                               "tracking.enabled=false", "methods=[standard, minijoint, minipost]"])
    with caplog.at_level(logging.WARNING, logger="minimodel.evaluation.report"):
        paths = report(cfg).outputs
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "unadapted" in r.getMessage()]
    assert paths["png"].stat().st_size > 0
    return json.loads(paths["json"].read_text()), paths["markdown"].read_text(), logged


def _baseline_lines(summary) -> list[list[float]]:
    """The y values of the unadapted baseline's lines on each plot of the report's figure."""
    import matplotlib.pyplot as plt

    from minimodel.evaluation.report import figure

    fig = figure(summary)
    lines = [list(line.get_ydata()) for ax in fig.axes for line in ax.lines
             if line.get_label() == "unadapted (none) sw"]
    plt.close(fig)
    return lines


def test_a_method_below_the_unadapted_baseline_is_warned_about_and_the_baseline_drawn(tmp_path, caplog):
    """The unadapted primary scored 0.78 on sw: minipost ends at 0.75, below it (standard 0.80 and minijoint 0.81
    are above): a warning naming method, language, task and both scores, logged and written to report.json and
    report.md; the baseline is a horizontal line at 0.78 on both plots, not a method with compute."""
    summary, md, logged = _report_with_baseline(tmp_path, {"accuracy": 0.78, "unk_fraction": 0.01}, caplog)
    task = summary["tasks"]["verse_class"]
    assert task["languages"]["sw"]["baseline"] == {"quality": 0.78, "unk_fraction": 0.01, "n_examples": None}
    assert "none" not in summary["methods"] and "none" not in task["languages"]["sw"]["methods"]
    # no n_examples logged: the noise is unknown, so the gap is reported as it is
    assert task["below_baseline"] == [{"lang": "sw", "method": "minipost", "quality": 0.75, "baseline": 0.78,
                                       "noise": None, "within_noise": False}]
    assert task["within_baseline_noise"] == []
    assert len(summary["warnings"]) == 1 and logged == summary["warnings"]
    warning = summary["warnings"][0]
    for part in ("verse_class sw", "minipost ends at accuracy 0.75", "below the unadapted primary (none",
                 "at 0.78"):
        assert part in warning
    assert f"**Warning: below the unadapted baseline.** {warning}" in md
    assert "Unadapted baseline (`none`" in md and "sw 0.78" in md
    assert "standard ends" not in md and "minijoint ends" not in md
    assert _baseline_lines(summary) == [[0.78, 0.78], [0.78, 0.78]]  # FLOPs and wall-clock plots


def test_a_gap_within_noise_is_no_measurable_gain_and_one_beyond_it_is_harm(tmp_path, caplog):
    """Against the unadapted primary's 0.76, minipost ends at 0.75, standard at 0.80, minijoint at 0.81. On 500
    examples each, every gap is noise: two standard errors of the difference are 2 * sqrt(0.75 * 0.25 / 500 + 0.76 *
    0.24 / 500) = 0.0544 for minipost (by hand), 0.0523 and 0.0519 for the others, each more than its gap (0.01,
    0.04, 0.05): one warning, "no measurable gain", names all three. On 50,000 examples each they are ten times
    smaller: minipost is measurably worse, the others measurably better (no warning)."""
    from minimodel.evaluation.report import two_standard_errors

    assert two_standard_errors(0.75, 500, 0.76, 500) == pytest.approx(0.05440, abs=1e-5)
    assert two_standard_errors(0.75, None, 0.76, 500) is None and two_standard_errors(1.5, 9, 0.2, 9) is None
    small, _, logged = _report_with_baseline(tmp_path / "500", {"accuracy": 0.76, "n_examples": 500}, caplog, 500)
    task = small["tasks"]["verse_class"]
    assert task["below_baseline"] == []
    assert [(c["method"], round(c["noise"], 4)) for c in task["within_baseline_noise"]] == [
        ("standard", 0.0523), ("minijoint", 0.0519), ("minipost", 0.0544)]
    assert small["warnings"] == logged == [
        "verse_class sw: standard, minijoint, minipost end at accuracy 0.8, 0.81, 0.75, within two standard errors "
        "(0.054) of the unadapted primary (none: its own tokenizer and embeddings) at 0.76: no measurable gain over "
        "not adapting; evaluate on more examples to tell them apart, or adapt better"]
    caplog.clear()
    large, md, logged = _report_with_baseline(tmp_path / "5e4", {"accuracy": 0.76, "n_examples": 50000}, caplog, 50000)
    [case] = large["tasks"]["verse_class"]["below_baseline"]
    assert case["method"] == "minipost" and not case["within_noise"] and case["noise"] == pytest.approx(0.00544, 1e-3)
    assert large["tasks"]["verse_class"]["within_baseline_noise"] == []
    assert large["warnings"] == logged and "minipost ends at accuracy 0.75, below the unadapted" in logged[0]
    assert "more than two standard errors: adapting made the model worse" in logged[0]
    assert f"**Warning: below the unadapted baseline.** {logged[0]}" in md


def test_two_results_on_the_same_examples_are_compared_paired(tmp_path, caplog):
    """Every method and the unadapted baseline are scored on one test set, so their per-example scores are
    correlated: the independent-samples bound called real harm noise. By hand: on 500 examples a method at 0.55 and
    the baseline at 0.60 disagree on 49 (the method loses 37, wins 12): d_i in {-1 x 37, +1 x 12, 0 x 451}, mean
    -0.05, var (49 - 500 * 0.05^2) / 499 = 0.095691, two standard errors 2 * sqrt(0.095691 / 500) = 0.027668 (the
    independent bound: 0.0624). In the report: minipost at 0.75 against the baseline's 0.76 on 500 examples, losing
    5 and winning none: paired 2 * sqrt((5 - 500 * 0.01^2) / 499 / 500) = 0.008908 < 0.01, so "made the model worse",
    where the independent bound (0.0544) said "no measurable gain"; scores of other examples are not paired."""
    from minimodel.evaluation.report import two_standard_errors

    baseline = {"examples": "xnli-sw-test", "scores": [1.0] * 300 + [0.0] * 200}
    method = {"examples": "xnli-sw-test", "scores": [1.0] * 263 + [0.0] * 37 + [1.0] * 12 + [0.0] * 188}
    assert sum(method["scores"]) / 500 == 0.55
    assert two_standard_errors(0.55, 500, 0.60, 500, 1.0, (method, baseline)) == pytest.approx(0.027668, abs=1e-6)
    assert two_standard_errors(0.55, 500, 0.60, 500) == pytest.approx(0.06245, abs=1e-5)
    other = {**method, "examples": "xnli-sw-dev"}
    assert two_standard_errors(0.55, 500, 0.60, 500, 1.0, (other, baseline)) == pytest.approx(0.06245, abs=1e-5)

    layout = PipelineLayout(tmp_path / "run")
    unadapted = [1.0] * 380 + [0.0] * 120  # 0.76
    write_json(layout.zero_shot("verse_class", "minipost") / "per_example.json",
               {"sw": {"final": {"examples": "e", "scores": [1.0] * 375 + [0.0] * 125}}})  # 0.75: 5 lost
    write_json(layout.zero_shot("verse_class", "none") / "per_example.json",
               {"sw": {"final": {"examples": "e", "scores": unadapted}}})
    summary, _, logged = _report_with_baseline(tmp_path, {"accuracy": 0.76, "n_examples": 500}, caplog, 500)
    task = summary["tasks"]["verse_class"]
    [case] = task["below_baseline"]
    assert case["method"] == "minipost" and case["noise"] == pytest.approx(0.008908, abs=1e-6)
    assert [c["method"] for c in task["within_baseline_noise"]] == ["standard", "minijoint"]  # not paired: 0.05
    assert any("minipost ends at accuracy 0.75, below the unadapted" in w for w in logged)
    points = task["languages"]["sw"]["methods"]["minipost"]["points"]
    assert "per_example" not in points[0]  # report.json stays small


def test_the_noise_bound_is_in_the_metrics_own_units_and_only_for_means_of_bounded_scores():
    """MLQA's F1 is in percent (as the official script reports it): 60.0 against the unadapted 60.5 on 1000 questions
    each is within two standard errors, 100 * 2 * sqrt(0.6 * 0.4 / 1000 + 0.605 * 0.395 / 1000) = 4.377 F1 points
    (by hand), not "made the model worse". target_mlm's gain is in nats, no mean of per-example scores in [0, 1]:
    its "no gain" noise is chance_margin whatever the gain and the sequence count (a 0.5-nat gain on 64 sequences
    used to get a binomial 0.125)."""
    from minimodel.evaluation.report import Point, summarize

    data = {"metric": {"mlqa": "f1"}, "source": {}, "majority": {},
            "points": {"mlqa": {"sw": {"standard": [
                Point(10.0, 0.0, 0.0, 0, 1000), Point(60.0, 9.0, 1.0, None, 1000)]}}},
            "baseline": {"mlqa": {"sw": {"quality": 60.5, "unk_fraction": 0.0, "n_examples": 1000}}}}
    mlqa = summarize(data, "standard", [0.95], chance_margin=0.02)["tasks"]["mlqa"]
    assert mlqa["below_baseline"] == []
    [case] = mlqa["within_baseline_noise"]
    assert case["noise"] == pytest.approx(4.377, abs=1e-3)
    assert mlqa["languages"]["sw"]["reference_gain_noise"] == pytest.approx(
        100 * 2 * (0.6 * 0.4 / 1000 + 0.1 * 0.9 / 1000) ** 0.5)
    for gain in (0.04, 0.5, 1.2):
        data = {"metric": {"target_mlm": "mlm_gain"}, "source": {}, "majority": {}, "points": {"target_mlm": {
            "ny": {"standard": [Point(0.0, 0.0, 0.0, 0, 64), Point(gain, 9.0, 1.0, None, 64)]}}}}
        mlm = summarize(data, "standard", [0.95], chance_margin=0.02)["tasks"]["target_mlm"]
        assert mlm["languages"]["ny"]["reference_gain_noise"] == 0.02 and mlm["no_gain"] == [], gain


def test_no_warning_when_every_method_ends_above_the_unadapted_baseline(tmp_path, caplog):
    summary, md, logged = _report_with_baseline(tmp_path, {"accuracy": 0.70, "unk_fraction": 0.0}, caplog)
    assert summary["warnings"] == [] and logged == []
    assert summary["tasks"]["verse_class"]["below_baseline"] == []
    assert "below the unadapted" not in md and "sw 0.7" in md
    assert _baseline_lines(summary) == [[0.70, 0.70], [0.70, 0.70]]


def test_a_language_the_primary_cannot_read_has_no_baseline_line(tmp_path, caplog):
    """zero_shot records a language the source tokenizer mostly maps to <unk> as unreadable, unscored: no line, no
    warning, and the report says why."""
    summary, md, logged = _report_with_baseline(tmp_path, {"unk_fraction": 0.6, "unreadable": 1.0}, caplog)
    baseline = summary["tasks"]["verse_class"]["languages"]["sw"]["baseline"]
    assert baseline == {"quality": None, "unk_fraction": 0.6, "n_examples": None}
    assert summary["warnings"] == [] and logged == []
    assert "sw not scored (its tokenizer maps 60% of the text to <unk>)" in md
    assert _baseline_lines(summary) == []


def _report_of(layout: PipelineLayout, tmp_path) -> dict:
    cfg = load_config(ReportConfig, overrides=[f"output_dir={tmp_path / 'report'}", f"pipeline_dir={layout.root}",
                                               "tracking.enabled=false"])
    return json.loads(report(cfg).outputs["json"].read_text())


def test_a_missing_unadapted_baseline_is_left_out_and_said(tmp_path):
    """The baseline's result was reported only where a stale one was there: with its zero-shot stage not run or not
    finished, the line to beat was gone from the report without a word (a method's gap is left out and said)."""
    layout = PipelineLayout(tmp_path / "run")
    write_pipeline_results(layout)
    (layout.zero_shot("verse_class", "none") / "metrics.json").unlink()
    summary = _report_of(layout, tmp_path)
    assert summary["tasks"]["verse_class"]["languages"]["sw"]["baseline"] is None
    assert summary["left_out"] == [f"{layout.zero_shot('verse_class', 'none')}: the unadapted baseline, the line to "
                                   "beat: no metrics.json (its zero-shot stage did not run or did not finish)"]


def test_a_score_that_is_not_a_number_is_left_out_and_report_json_stays_json(tmp_path):
    """A diverged run's NaN made every method 'not reached' without a warning (every threshold a NaN) and report.json
    held a bare NaN, which strict JSON readers refuse."""
    layout = PipelineLayout(tmp_path / "run")
    write_pipeline_results(layout)
    metrics = layout.zero_shot("verse_class", "minijoint") / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"accuracy": 0.81', '"accuracy": NaN'))
    snapshots = layout.zero_shot("verse_class", "standard") / "snapshots.json"
    snapshots.write_text(snapshots.read_text().replace('"accuracy": 0.6', '"accuracy": NaN'))
    baseline = layout.zero_shot("verse_class", "none") / "metrics.json"
    baseline.write_text(baseline.read_text().replace('"accuracy": 0.5', '"accuracy": NaN'))
    text = (tmp_path / "report" / "report.json")
    summary = _report_of(layout, tmp_path)
    json.loads(text.read_text(), parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    sw = summary["tasks"]["verse_class"]["languages"]["sw"]
    assert list(sw["methods"]) == ["standard", "minipost"]
    assert [p["adapt_step"] for p in sw["methods"]["standard"]["points"]] == [0, None]  # step 2's NaN left out
    assert sw["methods"]["minipost"]["reach"]["0.95"]["target_quality"] == pytest.approx(0.95 * 0.80)
    assert sw["baseline"] is None
    assert [x.split(": ", 1)[1] for x in summary["left_out"]] == [
        "the unadapted baseline's sw accuracy is nan", "minijoint's sw accuracy is nan",
        "the verse_class score of standard's sw snapshot is nan"]


def test_savings_where_the_reference_is_at_chance_or_did_not_gain_are_warned_of_and_not_headlines():
    """at_chance and no_gain were said in report.md only: the pipeline's closing warnings left them out, and the
    parent MLflow run got a FLOPs saving that said nothing as its headline."""
    from minimodel.evaluation.report import headline_metrics, summarize

    data = {"metric": {"verse_class": "accuracy"}, "source": {"verse_class": {"en": 0.6}}, "majority": {},
            "points": {"verse_class": {
                "ny": {"standard": _points((0.21, 0.0, 0), (0.22, 10.0, None)),  # noise
                       "minijoint": _points((0.22, 4.0, None))},
                "sw": {"standard": _points((0.21, 0.0, 0), (0.40, 10.0, None)),  # learned
                       "minijoint": _points((0.41, 4.0, None))}}}}
    summary = summarize(data, "standard", [1.0], chance_margin=0.02)
    assert summary["warnings"] == ["verse_class: standard adaptation did not improve on its first checkpoint beyond "
                                   "noise in ny: the savings there are reached by noise"]
    savings = {k: v for k, v in headline_metrics(summary).items() if k.endswith("flops_saving")}
    assert savings == {"verse_class/sw/standard/flops_saving": 1.0, "verse_class/sw/minijoint/flops_saving": 2.5}
    data["majority"] = {"verse_class": {"en": 0.59}}  # the task model did not learn the task
    summary = summarize(data, "standard", [1.0], chance_margin=0.02)
    assert summary["warnings"][0].startswith("verse_class: the source-language reference scores at chance")
    assert not [k for k in headline_metrics(summary) if k.endswith("flops_saving")]


def _language_sfts(layout: PipelineLayout) -> None:
    """lt_sft's language SFTs: sw's (300 FLOPs, 12 s) and the source language's, en (50 FLOPs, 3 s)."""
    for lang, flops, seconds in (("sw", 300.0, 12.0), ("en", 50.0, 3.0)):
        write_json(layout.language_sft(lang) / "sft.json", {"format": "minimodel-sft", "info": {
            "kind": "language", "method": "lt_sft", "target_lang": lang, "flops": flops, "wall_clock_s": seconds}})


def test_lt_sft_is_placed_at_its_language_sfts_compute_and_left_out_where_it_is_not_scored(tmp_path, caplog):
    """LT-SFT's point: its zero-shot quality at the FLOPs and wall clock its language SFTs' manifests record (both
    phases, minimodel/sft/train.py): the target's + on a fine-tuned task the source language's, which its task SFT was
    trained with (one for every target, counted whole: one target alone needs it); retrieval reads the primary + the
    target's SFT only; target_mlm does not score it, which is no missing result to warn about."""
    import logging

    layout = PipelineLayout(tmp_path / "run")
    write_pipeline_results(layout)
    _language_sfts(layout)
    for task, metrics in (("verse_class", {"en": {"accuracy": 0.88}, "sw": {"accuracy": 0.83}}),
                          ("verse_retrieval", {"sw": {"top1": 0.2}})):
        out = layout.zero_shot(task, "lt_sft")
        out.mkdir(parents=True)
        (out / "config.yaml").write_text(yaml.safe_dump({"method": "lt_sft", "source_lang": "en"}))
        write_json(out / "metrics.json", metrics)
    (layout.root / "zero_shot" / "target_mlm").mkdir(parents=True)
    cfg = load_config(ReportConfig, overrides=[f"output_dir={tmp_path / 'report'}", f"pipeline_dir={layout.root}",
                                               "tracking.enabled=false", "methods=[standard, lt_sft]"])
    with caplog.at_level(logging.WARNING, logger="minimodel.evaluation.report"):
        summary = json.loads(report(cfg).outputs["json"].read_text())
    warned = [r.getMessage() for r in caplog.records]
    assert any("target_mlm/standard: no metrics.json" in w for w in warned)  # missing: warned about
    assert not any("of lt_sft" in w for w in warned)  # not scored there: nothing to warn about
    found = summary["tasks"]["verse_class"]["languages"]["sw"]["methods"]["lt_sft"]
    assert found["final"] == {"quality": 0.83, "flops": 350.0, "wall_clock_s": 15.0}
    # the source line is the reference's task model (0.9), not LT-SFT's task SFT read after it (0.88)
    assert summary["tasks"]["verse_class"]["source"] == {"en": 0.9}
    # 0.83 beats standard's final 0.80 at 350 FLOPs against standard's 400: a 1.14x saving at 100%
    assert found["reach"]["1"]["flops_saving"] == pytest.approx(400 / 350)
    # retrieval reads the primary + sw's SFT alone: no source-language SFT in its compute
    retrieval = summary["tasks"]["verse_retrieval"]["languages"]["sw"]["methods"]["lt_sft"]
    assert retrieval["final"] == {"quality": 0.2, "flops": 300.0, "wall_clock_s": 12.0}
    assert summary["tasks"]["verse_class"]["methods_at_chance"] == []  # its task SFT: 0.88 on English

    # a task SFT that learned nothing (0.31 on English, the majority class 0.3): its rows are at chance, and said so;
    # a dense method's source score is the reference's task model read again (here one at chance): not its own
    write_json(layout.zero_shot("verse_class", "lt_sft") / "metrics.json", {"en": {"accuracy": 0.31},
                                                                            "sw": {"accuracy": 0.3}})
    write_json(layout.zero_shot("verse_class", "minipost") / "metrics.json", {"en": {"accuracy": 0.31},
                                                                              "sw": {"accuracy": 0.75}})
    cfg = load_config(ReportConfig, overrides=[f"output_dir={tmp_path / 'chance'}", f"pipeline_dir={layout.root}",
                                               "tracking.enabled=false", "methods=[standard, minipost, lt_sft]"])
    paths = report(cfg).outputs
    chance = json.loads(paths["json"].read_text())
    assert chance["tasks"]["verse_class"]["methods_at_chance"] == ["lt_sft"]
    assert any(w.startswith("verse_class: the task models of lt_sft score at chance") for w in chance["warnings"])
    assert "The task models of lt_sft (their own" in paths["markdown"].read_text()
    # without the reference's result, another dense method's (the same task model) stands in, never LT-SFT's own
    for method in ("standard", "minipost", "minijoint"):
        (layout.zero_shot("verse_class", method) / "metrics.json").unlink()
    alone = load_config(ReportConfig, overrides=[f"output_dir={tmp_path / 'alone'}", f"pipeline_dir={layout.root}",
                                                 "tracking.enabled=false", "methods=[standard, lt_sft]"])
    assert json.loads(report(alone).outputs["json"].read_text())["tasks"]["verse_class"]["source"] == {}


@pytest.mark.parametrize("bistil, base", [("bistil", (400.0, 40.0)), ("bistil@minijoint", (240.0, 30.0)),
                                          ("bistil@lt_sft", (350.0, 15.0))])
def test_bistil_is_placed_at_standard_adaptations_compute_plus_phase_1s(tmp_path, caplog, bistil, base):
    """BiStil's point: its zero-shot quality at standard adaptation's final compute (the embeddings its target
    teacher read with; bistil@minijoint: MiniJoint adaptation's; bistil@lt_sft: lt_sft's target and source language
    SFTs, its teachers') + phase 1's, the cumulative totals of its loop's last metrics.jsonl row, + phase 2's (its
    task SFT's manifest: each language's student learns the task itself, unlike the other methods' one step-3 model);
    it is scored on fine-tuned tasks only: nothing to warn about elsewhere."""
    import logging

    layout = PipelineLayout(tmp_path / "run")
    write_pipeline_results(layout)  # standard: 4 steps of 100 FLOPs, 10 s; minijoint: 6 steps of 40 FLOPs, 5 s
    _language_sfts(layout)
    metrics = layout.adapt(bistil, "sw") / "train" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("".join(json.dumps({"step": s, "train/loss": 1.0, "compute/flops": 30.0 * s,
                                           "compute/wall_clock_s": 1.5 * s}) + "\n" for s in (1, 2, 3)))
    write_json(layout.distill_task("sw", bistil) / "train" / "sft" / "sft.json",
               {"format": "minimodel-sft", "info": {"kind": "task", "flops": 1000.0, "wall_clock_s": 20.0}})
    out = layout.zero_shot("verse_class", bistil)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"method": bistil, "source_lang": "en"}))
    write_json(out / "metrics.json", {"sw": {"accuracy": 0.79}})  # evaluate_source=false: a student per language
    for task in ("target_mlm", "verse_retrieval"):
        (layout.root / "zero_shot" / task).mkdir(parents=True)
    cfg = load_config(ReportConfig, overrides=[f"output_dir={tmp_path / 'report'}", f"pipeline_dir={layout.root}",
                                               "tracking.enabled=false", f"methods=[standard, minijoint, {bistil}]"])
    with caplog.at_level(logging.WARNING, logger="minimodel.evaluation.report"):
        summary = json.loads(report(cfg).outputs["json"].read_text())
    assert not any(f"of {bistil}" in r.getMessage() for r in caplog.records)
    found = summary["tasks"]["verse_class"]["languages"]["sw"]["methods"][bistil]
    assert found["final"] == {"quality": 0.79, "flops": base[0] + 90.0 + 1000.0,
                              "wall_clock_s": pytest.approx(base[1] + 4.5 + 20.0)}
    assert summary["tasks"]["verse_class"]["source"] == {"en": 0.9}  # the fine-tuned primary's, not a student's
    assert summary["methods"] == ["standard", "minijoint", bistil]


def test_target_mlm_gains_share_the_reference_start_so_a_head_start_counts(tmp_path, caplog):
    """zero_shot measures each run's mlm_gain from its own step 0: an OFA-initialised run that starts 0.5 nats lower
    and ends at the same loss as standard adaptation would show 0.5 less gain. The report puts every method on
    standard's step-0 loss (9.0): +ofa's points are its own gains + 0.5, a random-init run with the same start
    (minijoint) is unchanged, and a run with another tokenizer keeps its own zero, with a warning."""
    import logging

    layout = PipelineLayout(tmp_path / "run")
    runs = {  # method: (tokenizer fingerprint, {adaptation step (None = final): held-out MLM loss})
        "standard": ("tok", {0: 9.0, 5: 8.0, None: 7.0}),
        "minijoint": ("tok", {0: 9.0, 5: 7.5, None: 7.2}),
        "minijoint+ofa": ("tok", {0: 8.5, 5: 7.4, None: 7.0}),
        "minipost": ("other", {0: 9.5, None: 8.0}),
    }
    for method, (tokenizer, losses) in runs.items():
        run_dir = layout.adapt(method, "ny")
        for step, loss in losses.items():
            write_json((run_dir if step is None else snapshot_dir(run_dir, step)) / "adapt.json",
                       {"steps": 10 if step is None else step, "flops": 10.0 * (10 if step is None else step),
                        "wall_clock_s": 1.0, "tokenizer_sha256": tokenizer})
        out = layout.zero_shot("target_mlm", method)
        out.mkdir(parents=True)
        (out / "config.yaml").write_text(yaml.safe_dump({"method": method, "source_lang": "en"}))
        gain = {step: {"mlm_loss": loss, "mlm_gain": losses[0] - loss} for step, loss in losses.items()}
        write_json(out / "metrics.json", {"ny": gain[None]})
        write_json(out / "snapshots.json", {"ny": {str(s): m for s, m in gain.items() if s is not None}})
    cfg = load_config(ReportConfig, overrides=[f"output_dir={tmp_path / 'report'}", f"pipeline_dir={tmp_path / 'run'}",
                                               "tracking.enabled=false"])
    with caplog.at_level(logging.WARNING, logger="minimodel.evaluation.report"):
        summary = json.loads(report(cfg).outputs["json"].read_text())
    ny = summary["tasks"]["target_mlm"]["languages"]["ny"]["methods"]
    curve = {m: [(p["adapt_step"], p["quality"]) for p in e["points"]] for m, e in ny.items()}
    assert curve["standard"] == [(0, 0.0), (5, 1.0), (None, 2.0)]
    assert curve["minijoint"] == [(0, 0.0), (5, 1.5), (None, pytest.approx(1.8))]
    assert curve["minijoint+ofa"] == [(0, 0.5), (5, pytest.approx(1.6)), (None, 2.0)]  # own gains 0, 1.1, 1.5
    assert curve["minipost"] == [(0, 0.0), (None, 1.5)]  # another tokenizer: its own zero
    assert ny["minijoint+ofa"]["reach"]["1"]["flops"] == 100.0  # standard's final 2.0: reached at the end
    assert any("minipost reads the target through another tokenizer" in r.getMessage() for r in caplog.records)


def test_every_method_has_a_colour_of_its_own_on_the_plot():
    """Eleven methods (the methods benchmark): the default ten colours gave the eleventh the first one's."""
    import matplotlib.pyplot as plt

    from minimodel.evaluation.report import figure, summarize

    methods = ["standard", "minijoint", "minijoint+random", "minipost", "minipost+copy_shared", "lt_sft", "lt_sft_vocab",
               "lt_sft_vocab@minijoint", "bistil", "bistil@minijoint", "bistil@lt_sft"]
    data = {"metric": {"verse_class": "accuracy"}, "source": {}, "majority": {},
            "points": {"verse_class": {"ny": {m: _points((0.1 + i / 100, 10.0 * i, None))
                                              for i, m in enumerate(methods)}}}}
    fig = figure(summarize(data, "standard", [1.0]))
    colours = {line.get_label(): line.get_color() for line in fig.axes[0].lines}
    plt.close(fig)
    assert len({colours[f"{m} ny"] for m in methods}) == len(methods)


def test_one_off_costs_are_shown_beside_the_per_language_compute(tmp_path):
    """MiniPost's step 1b (its mini-model) and OFA's word vectors are spent once for every target language: they
    were in no number of the report, so minipost's saving read as free of them. Only a result finished for its
    current config counts (word vectors being learned again under another config are not the ones used), for the
    methods that read them."""
    from dataclasses import dataclass, field

    from minimodel.provenance import claim_output, finish_output

    @dataclass
    class Stage:
        seed: int = 0

    @dataclass
    class Adapt:  # what the report reads of an adaptation's record: the word vectors it read
        init: dict = field(default_factory=dict)

    plan = {**PLAN, "minipost+ofa": (20.0, 1.0, 10, {None: 0.5})}
    layout = PipelineLayout(tmp_path / "run")

    def learn_vectors(lang: str, seconds: float, seed: int = 0):
        claim_output(layout.word_vectors(lang), Stage(seed), resumable=False)
        write_json(layout.word_vectors(lang) / "summary.json", {"seconds": seconds})
        (layout.word_vectors(lang) / "vectors.bin").write_text(f"vectors {seed}")
        finish_output(layout.word_vectors(lang), Stage(seed))
        return layout.word_vectors(lang) / "vectors.bin"

    def adapted(method: str, lang: str, vectors) -> None:
        claim_output(layout.adapt(method, lang), Adapt({"ofa": {"vectors": [{"path": str(vectors)}]}}),
                     resumable=False)

    adapted("minipost+ofa", "sw", learn_vectors("sw", 12.5))  # one vectors file per language pair, its time summed
    adapted("minipost+ofa", "ny", learn_vectors("ny", 2.5))
    learn_vectors("tl", 100.0)  # a language no +ofa adaptation read
    write_pipeline_results(layout, plan)
    rows = [{"step": s, "compute/flops": 1e9 * s, "compute/wall_clock_s": 3.0 * s} for s in (1, 2)]
    claim_output(layout.minipost, Stage(), resumable=True)
    (layout.minipost / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    finish_output(layout.minipost, Stage())
    cfg = load_config(ReportConfig, overrides=[f"output_dir={tmp_path / 'report'}", f"pipeline_dir={layout.root}",
                                               "tracking.enabled=false"])
    paths = report(cfg).outputs
    one_off = json.loads(paths["json"].read_text())["one_off"]
    assert one_off == {"minipost": {"flops": 2e9, "wall_clock_s": 6.0, "methods": ["minipost", "minipost+ofa"]},
                       "word_vectors": {"flops": None, "wall_clock_s": 15.0, "methods": ["minipost+ofa"]}}
    text = paths["markdown"].read_text()
    assert "| minipost | 2e+09 | 6 | minipost, minipost+ofa |" in text and "| word_vectors | — | 15 |" in text
    from minimodel.evaluation.report import one_off_costs  # a method building on minipost's embeddings uses it too
    assert one_off_costs(layout, ["bistil@minipost+ofa"]) == {
        "minipost": {**one_off["minipost"], "methods": ["bistil@minipost+ofa"]},
        "word_vectors": {**one_off["word_vectors"], "methods": ["bistil@minipost+ofa"]}}
    claim_output(layout.word_vectors("ny"), Stage(seed=1), resumable=False)  # learning again: not yet this one
    assert json.loads(report(cfg).outputs["json"].read_text())["one_off"]["word_vectors"]["wall_clock_s"] == 12.5
    # a method given vectors of its own read none of the pipeline's, which may still lie there from an earlier config
    for lang in ("sw", "ny"):
        adapted("minipost+ofa", lang, tmp_path / "own.vec")
    assert "word_vectors" not in json.loads(report(cfg).outputs["json"].read_text())["one_off"]


def test_minijoints_secondary_head_is_a_one_off_cost_of_pretraining(tmp_path):
    """MiniJoint's mini-model costs its secondary MLM head during pretraining (+10.7% FLOPs at base size, measured in
    benchmarks/head_cost.py): it was in no number of the report, so MiniJoint's saving read as free of it. By hand
    for the tiny config: one head is 3 x 0.15 x 2 x (h^2 + h v) FLOPs per token of flops_per_token's total."""
    from dataclasses import dataclass

    from minimodel.config import save_config
    from minimodel.evaluation.report import one_off_costs
    from minimodel.provenance import claim_output, finish_output
    from minimodel.training.config import PretrainConfig

    @dataclass
    class Stage:
        seed: int = 0

    layout = PipelineLayout(tmp_path / "run")
    pretraining = load_config(PretrainConfig, "configs/pretrain/minijoint_tiny.yaml")
    claim_output(layout.pretrain, Stage(), resumable=True)
    save_config(pretraining, layout.pretrain / "config.yaml")
    (layout.pretrain / "metrics.jsonl").write_text(json.dumps({"step": 4, "compute/flops": 1e12,
                                                               "compute/wall_clock_s": 9.0}) + "\n")
    assert one_off_costs(layout, ["standard", "minijoint", "bistil@minijoint"]) == {}  # not finished
    finish_output(layout.pretrain, Stage())
    m, p = pretraining.model, pretraining.data.mask_prob
    h, v, s, f = m.hidden_size, m.padded_vocab_size, m.seq_length, m.ffn_size
    head = 3 * p * 2 * (h * h + h * v)
    total = 3 * (m.num_layers * (2 * (4 * h * h + 2 * h * f) + 4 * s * h) + 2 * p * 2 * (h * h + h * v))
    costs = one_off_costs(layout, ["standard", "minijoint", "bistil@minijoint"])
    assert costs == {"minijoint_head": {"flops": pytest.approx(1e12 * head / total), "wall_clock_s": None,
                                        "methods": ["minijoint", "bistil@minijoint"]}}
    assert one_off_costs(layout, ["standard", "minipost"]) == {}
