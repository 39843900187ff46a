"""The MLflow UI on the project's run store: `python -m minimodel.ui [--store runs] [--port 5000]`.

Stages log to the SQLite store `<tracking.store_dir>/mlflow.db` (default `runs/`) unless a server is configured;
this serves that store at http://127.0.0.1:PORT (loopback only; from a laptop use `ssh -L PORT:127.0.0.1:PORT`).
The server can also be the tracking server of a pipeline: `tracking.uri=http://127.0.0.1:PORT`.

`MlflowServer` (start/stop a server as a context manager) and `browser_page` (Chromium through Playwright with the
UI's classic "machine learning" view) are shared by the tests and scripts/ui_screenshot.py.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DEFAULT_STORE = "runs"  # = TrackingConfig.store_dir
DEFAULT_PORT = 5000
HOST = "127.0.0.1"
# One worker and no job-execution processes: 2 processes, ~0.5 GB instead of 10 processes, ~2.3 GB.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}

CHROMIUM = "/usr/bin/chromium"  # Debian's package (apt-get install -y chromium); never `playwright install`
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# MLflow 3 opens in its GenAI view with an assistant panel; reviewers of training runs want the classic view.
UI_SETTINGS_SCRIPT = """
localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a store directory (SQLite database + artifacts), bound to 127.0.0.1."""

    def __init__(self, store_dir: str | os.PathLike = DEFAULT_STORE, port: int | None = None,
                 log_file: str | os.PathLike | None = None):
        self.store = Path(store_dir).resolve()
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_file = Path(log_file) if log_file else self.store / "server.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{self.store / 'mlflow.db'}",
                "--artifacts-destination", str(self.store / "artifacts"),
                "--host", HOST, "--port", str(self.port), "--workers", "1"]

    def start(self, timeout: float = 180) -> "MlflowServer":
        self.store.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            # Own session: stop() signals the whole group (the server runs uvicorn/gunicorn children).
            self.process = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **SERVER_ENV}, start_new_session=True)
        try:  # whatever ends the wait (an exit, the timeout, Ctrl-C), the server does not outlive it
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mlflow server exited with status {self.process.returncode}; "
                                       f"its log: {self.log_file}")
                if self.healthy():
                    return self
                time.sleep(0.5)
            raise TimeoutError(f"mlflow server did not answer {self.url}/health within {timeout:.0f} s; "
                               f"its log: {self.log_file}")
        except BaseException:
            self.stop()
            raise

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server's whole process group (its workers too, even when the leader has exited)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return  # no process of the group is left
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # any that ignored SIGTERM
        self.process.wait()

    def run_page(self, experiment_id: str, run_id: str | None = None, tab: str = "") -> str:
        """UI address of an experiment's runs table, a run, or a run's tab ("model-metrics", "artifacts/PATH")."""
        path = f"/#/experiments/{experiment_id}/runs"
        if run_id:
            path += f"/{run_id}" + (f"/{tab}" if tab else "")
        return self.url + path

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def browser_page(width: int = 1600, height: int = 1000):
    """A Playwright page in headless Debian Chromium, with the MLflow UI set to its classic view."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: install it with `apt-get install -y chromium`")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.add_init_script(UI_SETTINGS_SCRIPT)
            yield context.new_page()
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the MLflow UI on a minimodel run store at 127.0.0.1.")
    parser.add_argument("--store", default=DEFAULT_STORE,
                        help=f"the runs' store directory, i.e. tracking.store_dir (default: {DEFAULT_STORE})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}")
    args = parser.parse_args(argv)
    if not (Path(args.store) / "mlflow.db").exists():
        print(f"note: {args.store}/mlflow.db does not exist yet; runs logged there will appear in the UI",
              file=sys.stderr)
    with socket.socket() as s:
        if s.connect_ex((HOST, args.port)) == 0:
            parser.error(f"port {args.port} is already in use on {HOST}: pick another with --port")
    server = MlflowServer(args.store, args.port)
    print(f"starting the MLflow UI on {Path(args.store).resolve()} (log: {server.log_file}) ...", flush=True)
    server.start()
    print(f"MLflow UI: {server.url}/#/experiments  (Ctrl-C stops it)", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
