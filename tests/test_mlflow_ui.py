"""What a reviewer sees in the MLflow UI, checked in a real browser (Debian Chromium through Playwright).

A real `mlflow server` on a free loopback port; a tracked pipeline (parent run + child runs) logged to it through
Tracker; then the runs table, a run's page, its metric charts and the report plot are opened in Chromium.
"""
from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import pytest
from mlflow_helpers import log_synthetic_pipeline, new_store

from minimodel.tracking import TrackingConfig
from minimodel.ui import CHROMIUM, MlflowServer, browser_page

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

UI_TIMEOUT_MS = 30_000  # the UI renders slowly on 2 busy cores
STEPS = 30


def require_browser() -> None:
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
    require_browser()
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_TIMEOUT_MS)
    with browser_page() as page:
        page.set_default_timeout(UI_TIMEOUT_MS)
        yield page


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(new_store(tmp_path_factory.mktemp("server-store"))) as server:
        yield server


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory):
    fallback = tmp_path_factory.mktemp("fallback-store")  # stays empty
    runs = log_synthetic_pipeline(TrackingConfig(uri=server.url, store_dir=str(fallback), experiment="ui-test"),
                                  steps=STEPS)
    assert not (fallback / "mlflow.db").exists(), "the runs should have gone to the server, not the fallback"
    return runs


def png_width(path: Path) -> int:
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def test_parent_run_expands_to_its_child_runs(page, server, pipeline):
    from playwright.sync_api import expect

    page.goto(server.run_page(pipeline["experiment_id"]))
    name_cells = page.locator('[col-id="attributes.`Run Name`"]')
    parent_cell = name_cells.filter(has_text="pipeline-demo")
    expect(parent_cell).to_be_visible()
    child_link = page.get_by_role("link", name="adapt-sw", exact=True)
    expect(child_link).to_have_count(0)  # children are folded under their parent
    parent_cell.get_by_role("button").click()
    for child in pipeline["children"]:
        expect(page.get_by_role("link", name=child, exact=True)).to_be_visible()
    child_link.click()
    expect(page.get_by_role("heading", name="adapt-sw")).to_be_visible()
    assert pipeline["children"]["adapt-sw"] in page.url


def test_run_page_shows_params_and_tags(page, server, pipeline):
    from playwright.sync_api import expect

    page.goto(server.run_page(pipeline["experiment_id"], pipeline["children"]["adapt-sw"]))
    expect(page.get_by_role("heading", name="adapt-sw")).to_be_visible()
    expect(page.get_by_role("link", name="pipeline-demo")).to_be_visible()  # "Parent run"
    param_row = page.get_by_role("row").filter(has=page.get_by_text("model.hidden_size", exact=True))
    expect(param_row).to_contain_text("64")
    for tag in ("stage: adapt", "method: minijoint", "source_lang: en", "target_lang: sw", "layout: tp1-pp1-dp1"):
        expect(page.get_by_text(tag, exact=True)).to_be_visible()


def test_loss_chart_is_drawn(page, server, pipeline):
    from playwright.sync_api import expect

    page.goto(server.run_page(pipeline["experiment_id"], pipeline["children"]["adapt-sw"], "model-metrics"))
    expect(page.get_by_text("adapt-sw (train/loss)")).to_be_visible()
    traces = page.locator(".js-plotly-plot g.trace")
    expect(traces.first.locator("path.js-line")).to_be_attached()
    # Each trace: the screen y of its markers. The train loss trace has one marker per logged step, and since the
    # loss falls at every step its markers go down the screen (y grows) from left to right.
    marker_ys = traces.evaluate_all("""ts => ts.map(t => Array.from(t.querySelectorAll('path.point'),
        p => parseFloat(p.getAttribute('transform').split(',')[1])))""")
    train = [ys for ys in marker_ys if len(ys) == STEPS]
    assert train, f"no trace with {STEPS} markers; marker counts per trace: {[len(ys) for ys in marker_ys]}"
    assert all(a < b for a, b in zip(train[0], train[0][1:])), f"the loss curve is not drawn falling: {train[0]}"


def test_report_plot_is_an_artifact(page, server, pipeline):
    from playwright.sync_api import expect

    name = "plots/compute_vs_quality.png"
    page.goto(server.run_page(pipeline["experiment_id"], pipeline["parent"], f"artifacts/{name}"))
    image = page.locator(f'img[alt="{name}"]')
    expect(image).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    stored = next(server.store.glob(f"artifacts/**/{pipeline['parent']}/artifacts/{name}"))
    assert image.evaluate("img => img.naturalWidth") == png_width(stored)


def test_screenshot_script_captures_the_unfolded_pipeline(page, server, pipeline, tmp_path):
    from mlflow import MlflowClient
    from playwright.sync_api import expect

    spec = importlib.util.spec_from_file_location("ui_screenshot", REPO / "scripts" / "ui_screenshot.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.newest_pipeline_run(MlflowClient(server.url), pipeline["experiment_id"]) == pipeline["parent"]
    out = script.capture(page, server, pipeline["experiment_id"], pipeline["parent"], tmp_path / "ui.png")
    for child in pipeline["children"]:
        expect(page.get_by_role("link", name=child, exact=True)).to_be_visible()
    expect(page.get_by_text("adapt-sw (train/loss)")).to_be_visible()
    assert png_width(out) == page.viewport_size["width"]
