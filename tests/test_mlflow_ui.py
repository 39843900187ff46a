"""What a reviewer sees in the MLflow UI after a real pipeline run, checked in a real browser (Debian Chromium
through Playwright).

The run is the session's `smoke_pipeline` (tests/conftest.py): configs/pipeline/smoke.yaml as real processes, logged
to a real `mlflow server` on a free loopback port. Its first parent run, its stage runs, their params, tags and
metric charts, and the report plot are opened in Chromium.
"""
from __future__ import annotations

import importlib.util
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from minimodel.ui import CHROMIUM, browser_page

REPO = Path(__file__).resolve().parents[1]
UI_TIMEOUT_MS = 30_000  # the UI renders slowly on 2 busy cores
REPORT_PLOT = "compute_vs_quality.png"

# browser_required first: without a browser the pipeline (session fixture, minutes) is not run for nothing.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("browser_required")]


@pytest.fixture(scope="session")
def browser_required() -> None:
    missing = []
    if importlib.util.find_spec("playwright") is None:
        missing.append("pip install playwright==1.65.2")
    if not Path(CHROMIUM).exists():
        missing.append("apt-get install -y chromium")
    if missing:
        message = "browser tests need: " + "; ".join(missing) + " (never `playwright install`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    with browser_page(height=1400) as page:  # tall: every stage run of the unfolded pipeline is rendered
        page.set_default_timeout(UI_TIMEOUT_MS)
        yield page


@pytest.fixture(scope="module")
def pipeline(smoke_pipeline):
    """The first pipeline run: its parent run, child runs by name, and the runs worth a close look."""
    parent = smoke_pipeline.client().get_run(smoke_pipeline.first_parent_run_id)
    children = {r.info.run_name: r for r in smoke_pipeline.children(parent.info.run_id)}

    def child(**tags):
        return next(r for r in children.values() if all(r.data.tags.get(k) == v for k, v in tags.items()))

    return {"parent": parent, "experiment_id": parent.info.experiment_id, "children": children,
            "adapt": child(stage="adapt", method="standard"), "pretrain": child(stage="pretrain")}


def png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_parent_run_expands_to_its_stage_runs(page, smoke_pipeline, pipeline):
    from playwright.sync_api import expect

    server, adapt_name = smoke_pipeline.server, pipeline["adapt"].info.run_name
    page.goto(server.run_page(pipeline["experiment_id"]))
    name_cells = page.locator('[col-id="attributes.`Run Name`"]')
    parent_cell = name_cells.filter(has_text=pipeline["parent"].info.run_name).last  # the first pipeline run
    expect(parent_cell).to_be_visible()
    adapt_link = page.get_by_role("link", name=adapt_name, exact=True)
    expect(adapt_link).to_have_count(0)  # children are folded under their parent
    parent_cell.get_by_role("button").click()
    for name in pipeline["children"]:
        expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
    adapt_link.click()
    expect(page.get_by_role("heading", name=adapt_name)).to_be_visible()
    assert pipeline["adapt"].info.run_id in page.url


def test_run_pages_show_params_and_tags(page, smoke_pipeline, pipeline):
    from playwright.sync_api import expect

    # The adaptation run: its flattened config as params, the method's tags; the pretraining run: its layout.
    checks = [(pipeline["adapt"], "train.optim.lr", ("stage", "method", "over", "source_lang", "target_lang")),
              (pipeline["pretrain"], "model.hidden_size", ("stage", "method", "tp", "pp", "dp", "layout"))]
    for run, param, tags in checks:
        page.goto(smoke_pipeline.server.run_page(pipeline["experiment_id"], run.info.run_id))
        expect(page.get_by_role("heading", name=run.info.run_name)).to_be_visible()
        expect(page.get_by_role("link", name=pipeline["parent"].info.run_name)).to_be_visible()  # "Parent run"
        param_row = page.get_by_role("row").filter(has=page.get_by_text(param, exact=True))
        expect(param_row).to_contain_text(run.data.params[param])
        for tag in tags:
            expect(page.get_by_text(f"{tag}: {run.data.tags[tag]}", exact=True)).to_be_visible()


def test_loss_chart_is_drawn(page, smoke_pipeline, pipeline):
    from playwright.sync_api import expect

    run = pipeline["adapt"]
    history = sorted(smoke_pipeline.client().get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert len(history) >= 2
    page.goto(smoke_pipeline.server.run_page(pipeline["experiment_id"], run.info.run_id, "model-metrics"))
    page.get_by_placeholder("Search metric charts").fill("^train/loss$")  # charts render only when scrolled to
    legend = page.get_by_text(f"{run.info.run_name} (train/loss)", exact=True)
    expect(legend).to_be_visible()
    # The innermost element holding both the legend and a plot is the train/loss chart.
    chart = page.locator("div").filter(has=legend).filter(has=page.locator(".js-plotly-plot")).last
    lines = chart.locator("path.js-line")  # the line as shown, and faint behind it the unsmoothed one
    expect(lines.first).to_be_attached()
    steps, values = np.array([m.step for m in history], float), np.array([m.value for m in history])
    for d in lines.evaluate_all("ps => ps.map(p => p.getAttribute('d'))"):
        xs, ys = np.array(re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", d), float).T
        # Plotly leaves out vertices that lie on a straight line between their neighbours, so: the line runs from
        # the first to the last logged step, left to right, and passes through every logged (step, loss) point.
        assert len(xs) >= 2 and np.all(np.diff(xs) > 0), f"not a line over the steps: {d}"
        x_of_step = xs[0] + (steps - steps[0]) * (xs[-1] - xs[0]) / (steps[-1] - steps[0])
        at_vertex = [int(np.argmin(abs(x_of_step - x))) for x in xs]
        assert np.allclose(x_of_step[at_vertex], xs, atol=0.5), f"vertices off the logged steps: {d}"
        slope, offset = np.polyfit(values[at_vertex], ys, 1)
        assert slope < 0, "a higher loss must be drawn higher up (smaller screen y)"
        drawn = np.interp(x_of_step, xs, ys)
        assert np.allclose(drawn, slope * values + offset, atol=1.0), f"loss {values.tolist()} drawn as {d}"


def find_artifact(client, run_id: str, name: str, path: str | None = None) -> str | None:
    """The artifact path of the file called `name` anywhere in a run's artifacts."""
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            found = find_artifact(client, run_id, name, item.path)
            if found:
                return found
        elif Path(item.path).name == name:
            return item.path
    return None


def test_report_plot_is_an_artifact_of_the_pipeline_run(page, smoke_pipeline, pipeline):
    from playwright.sync_api import expect

    parent_id = pipeline["parent"].info.run_id
    name = find_artifact(smoke_pipeline.client(), parent_id, REPORT_PLOT)
    assert name, f"the pipeline run has no {REPORT_PLOT} artifact"
    stored = next(smoke_pipeline.server.store.glob(f"artifacts/**/{parent_id}/artifacts/{name}"))
    assert stored.read_bytes() == (smoke_pipeline.output_dir / "report" / REPORT_PLOT).read_bytes()
    page.goto(smoke_pipeline.server.run_page(pipeline["experiment_id"], parent_id, f"artifacts/{name}"))
    image = page.locator(f'img[alt="{name}"]')
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    assert image.evaluate("img => img.naturalWidth") == png_width(stored)


def test_screenshot_script_captures_the_unfolded_pipeline(page, smoke_pipeline, pipeline, tmp_path):
    from playwright.sync_api import expect

    spec = importlib.util.spec_from_file_location("ui_screenshot", REPO / "scripts" / "ui_screenshot.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    client, server = smoke_pipeline.client(), smoke_pipeline.server
    newest = smoke_pipeline.parent_runs()[0].info.run_id  # the re-run's, if tests/test_pipeline.py ran first
    assert script.newest_pipeline_run(client, pipeline["experiment_id"]) == newest
    out = script.capture(page, server, pipeline["experiment_id"], pipeline["parent"].info.run_id, tmp_path / "ui.png",
                         runs_filter=script.STAGE_RUNS)
    for name, run in pipeline["children"].items():  # the stage runs, without the evaluation runs
        link = page.get_by_role("link", name=name, exact=True)
        if run.data.tags.get("stage") == "evaluate":
            expect(link).to_have_count(0)
        else:
            expect(link).to_be_visible()
    expect(page.get_by_role("heading", name="train/loss", exact=True)).to_be_visible()
    expect(page.locator(".js-plotly-plot path.js-line").first).to_be_attached()
    assert png_width(out) == page.viewport_size["width"]
