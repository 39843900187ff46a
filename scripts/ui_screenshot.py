"""Picture of a pipeline in the MLflow UI for the README: its parent run unfolded into the stage runs, beside their
loss charts.

    python scripts/ui_screenshot.py [--store runs] [--experiment minimodel] [--run-id PARENT] [--charts REGEX]
                                    [--out docs/mlflow-ui.png]

Starts an MLflow server on the store (a free loopback port), opens the experiment's runs in Chromium (headless,
through Playwright), unfolds the pipeline's parent run (default: the newest run that has child runs) and saves the
screenshot. Needs `apt-get install -y chromium` and `pip install playwright` (never `playwright install`).
"""
from __future__ import annotations

import argparse
import sys
from urllib.parse import quote
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minimodel.ui import DEFAULT_STORE, MlflowServer, browser_page  # noqa: E402

UI_TIMEOUT_MS = 60_000
STAGE_RUNS = "tags.stage != 'evaluate'"  # the stages without the evaluation runs (one per checkpoint)
LOSS_CHARTS = "^(train|eval)/loss$"  # the UI's chart search takes a regular expression over metric names


def newest_pipeline_run(client, experiment_id: str) -> str:
    """The newest run of the experiment that is some run's parent."""
    runs = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=5000)
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs}
    for run in runs:
        if run.info.run_id in parents:
            return run.info.run_id
    raise SystemExit(f"experiment {experiment_id} has no run with child runs: run a pipeline first "
                     "(or pass --run-id)")


def capture(page, server: MlflowServer, experiment_id: str, parent_run_id: str, out: Path,
            charts: str = LOSS_CHARTS, runs_filter: str = "") -> Path:
    """Runs view with the parent unfolded beside its children's charts whose metric name matches the regular
    expression `charts` (all if empty), the runs narrowed by the MLflow search `runs_filter` (e.g.
    "tags.stage != 'evaluate'"); waits for the charts to be drawn."""
    from mlflow import MlflowClient
    from playwright.sync_api import expect

    client = MlflowClient(server.url)
    parent_name = client.get_run(parent_run_id).info.run_name
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}'" + (f" and {runs_filter}" if runs_filter else "")
    children = client.search_runs([experiment_id], query)
    first_child = page.get_by_role("link", name=children[0].info.run_name, exact=True)
    page.goto(server.run_page(experiment_id) + (f"?searchFilter={quote(runs_filter)}" if runs_filter else ""))
    parent_cell = page.locator('[col-id="attributes.`Run Name`"]').filter(has_text=parent_name).first
    expect(parent_cell).to_be_visible(timeout=UI_TIMEOUT_MS)
    if first_child.count() == 0:  # the UI remembers unfolded runs; the button toggles
        parent_cell.get_by_role("button").click()
    expect(first_child).to_be_visible(timeout=UI_TIMEOUT_MS)
    page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
    # Charts show only the runs marked visible, by default the first 10 rows: for a pipeline those are its last
    # stages (evaluation, report), which log no training curves.
    page.get_by_role("button", name="Toggle visibility of runs").click()
    page.get_by_role("menuitemradio", name="Show all runs").click()
    page.keyboard.press("Escape")
    if charts:
        page.get_by_placeholder("Search metric charts").fill(charts)
    expect(page.locator(".js-plotly-plot path.js-line").first).to_be_attached(timeout=UI_TIMEOUT_MS)
    page.wait_for_timeout(3000)  # let the remaining charts finish drawing
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default=DEFAULT_STORE, help="the runs' store directory (tracking.store_dir)")
    parser.add_argument("--experiment", default="minimodel")
    parser.add_argument("--run-id", help="the pipeline's parent run (default: the newest run with child runs)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow-ui.png")
    parser.add_argument("--filter", default=STAGE_RUNS,
                        help=f"MLflow search narrowing the runs shown ('' for all; default: {STAGE_RUNS!r})")
    parser.add_argument("--charts", default=LOSS_CHARTS,
                        help=f"show the charts whose metric name matches this regular expression ('' for all; "
                             f"default: {LOSS_CHARTS})")
    args = parser.parse_args(argv)
    if not (Path(args.store) / "mlflow.db").is_file():
        parser.error(f"{args.store}/mlflow.db does not exist: pass --store <tracking.store_dir of the pipeline>")
    from mlflow import MlflowClient

    # The server's log goes to the temporary directory: taking a picture leaves nothing in the store.
    with MlflowServer(args.store, log_file=Path(tempfile.gettempdir()) / "minimodel-ui-screenshot.log") as server:
        client = MlflowClient(server.url)
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            parser.error(f"no experiment {args.experiment!r} in {args.store}")
        run_id = args.run_id or newest_pipeline_run(client, experiment.experiment_id)
        with browser_page(height=1200) as page:
            print(capture(page, server, experiment.experiment_id, run_id, args.out, args.charts, args.filter))


if __name__ == "__main__":
    main()
