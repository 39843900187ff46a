"""Tracker: what a run records, inert ranks, background logging, fallback when the server is down, re-run links,
files attached to a finished run."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_helpers import ToyStageConfig, log_synthetic_pipeline, new_store

from minimodel.config import ConfigError, load_config
from minimodel.tracking import (REUSED_RUN_TAG, RUN_FILE, TRACKING_ENV, Tracker, TrackingConfig, attach_to_run,
                                link_run, local_store_uri, runs_of_slurm_job)
from minimodel.ui import MlflowServer, free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory (e.g. a stray ./mlruns)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MINIMODEL_PARENT_RUN_ID", raising=False)
    return new_store(tmp_path / "store")


def client_for(store: Path) -> MlflowClient:
    return MlflowClient(local_store_uri(store))


def all_runs(store: Path, experiment: str = "minimodel") -> list:
    client = client_for(store)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def log_toy_stage(tracking: TrackingConfig, tmp: Path, steps: int = 25) -> Tracker:
    cfg = ToyStageConfig(output_dir=str(tmp / "out"), tracking=tracking)
    report = tmp / "report.md"
    report.write_text("# report\n")
    plot = tmp / "plots" / "loss_curves.png"
    plot.parent.mkdir(exist_ok=True)
    plot.write_bytes(b"\x89PNG")
    with Tracker(tracking, cfg, tags={"stage": "adapt", "method": "minipost", "source_lang": "en",
                                      "target_lang": "sw", "tp": 1}) as t:
        for step in range(steps):
            t.log_metrics({"train/loss": 10.0 - step, "lr": 0.1}, step)
        t.log_metrics({"eval/loss": 3.0}, steps)
        t.log_artifact(plot, "plots")
        t.log_artifact(report, "report")
    return t


def test_run_records_config_tags_metrics_and_artifacts(store, tmp_path):
    t = log_toy_stage(TrackingConfig(store_dir=str(store), flush_every=4), tmp_path)
    [run] = all_runs(store)
    client = client_for(store)
    assert run.info.run_id == t.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "adapt-sw"
    assert run.data.params["model.hidden_size"] == "64" and run.data.params["lr"] == "0.001"
    assert run.data.params["tracking.flush_every"] == "4"
    tags = run.data.tags
    assert {k: tags[k] for k in ("stage", "method", "source_lang", "target_lang", "tp", "world_size")} == {
        "stage": "adapt", "method": "minipost", "source_lang": "en", "target_lang": "sw", "tp": "1",
        "world_size": "1"}
    assert tags["git_commit"] and tags["host"] and "slurm_job_id" not in tags
    assert steps_of(client, t.run_id, "train/loss") == [(s, 10.0 - s) for s in range(25)]
    assert steps_of(client, t.run_id, "eval/loss") == [(25, 3.0)]
    assert artifact_paths(client, t.run_id) == {"config.yaml", "plots/loss_curves.png", "report/report.md"}
    config_yaml = Path(client.download_artifacts(t.run_id, "config.yaml", str(tmp_path / "dl")))
    assert load_config(ToyStageConfig, config_yaml) == ToyStageConfig(output_dir=str(tmp_path / "out"),
                                                                      tracking=t.cfg)
    assert (store / "artifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_slurm_job_is_tagged(store, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with Tracker(TrackingConfig(store_dir=str(store))) as plain:
        pass
    for var, value in (("SLURM_ARRAY_JOB_ID", "4240"), ("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_RESTART_COUNT", "1")):
        monkeypatch.setenv(var, value)
    with Tracker(TrackingConfig(store_dir=str(store))) as requeued_array_task:
        pass
    client = client_for(store)
    tags = client.get_run(plain.run_id).data.tags
    assert tags["slurm_job_id"] == "4242" and not {"slurm_array_job_id", "slurm_restart_count"} & set(tags)
    tags = client.get_run(requeued_array_task.run_id).data.tags
    assert {k: tags[k] for k in ("slurm_job_id", "slurm_array_job_id", "slurm_array_task_id",
                                 "slurm_restart_count")} == {"slurm_job_id": "4242", "slurm_array_job_id": "4240",
                                                             "slurm_array_task_id": "2", "slurm_restart_count": "1"}


def test_failed_stage_is_marked_failed_and_keeps_its_metrics(store):
    with pytest.raises(RuntimeError):
        with Tracker(TrackingConfig(store_dir=str(store), flush_every=100)) as t:
            t.log_metrics({"train/loss": 1.5}, 0)
            raise RuntimeError("diverged")
    run = client_for(store).get_run(t.run_id)
    assert run.info.status == "FAILED" and run.data.metrics["train/loss"] == 1.5


def test_a_stage_stopped_outside_training_is_marked_killed_not_failed(store):
    """A stop signal outside a training loop (Interrupted: the stage exits 75 and its next launch resumes) ended the
    run FAILED, as a crash would."""
    from minimodel.training.preemption import Interrupted

    with pytest.raises(Interrupted):
        with Tracker(TrackingConfig(store_dir=str(store))) as t:
            raise Interrupted("SIGUSR1")
    assert client_for(store).get_run(t.run_id).info.status == "KILLED"


def test_stage_exiting_without_finish_keeps_its_metrics(store):
    script = ("import sys\nfrom minimodel.tracking import Tracker, TrackingConfig\n"
              f"t = Tracker(TrackingConfig(store_dir={str(store)!r}, flush_every=1000))\n"
              "for step in range(50):\n    t.log_metrics({'train/loss': float(step)}, step)\n"
              "print(t.run_id)\nsys.exit(3)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 3, result.stderr[-3000:]
    run = client_for(store).get_run(result.stdout.split()[-1])
    assert run.info.status == "KILLED"
    assert steps_of(client_for(store), run.info.run_id, "train/loss") == [(s, float(s)) for s in range(50)]


def test_inert_on_other_ranks_and_when_disabled(store, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    t = Tracker(TrackingConfig(store_dir=str(store)), ToyStageConfig(), tags={"stage": "x"})
    t.log_metrics({"loss": 1.0}, 0)
    t.finish()
    monkeypatch.setenv("RANK", "0")
    with Tracker(TrackingConfig(store_dir=str(store), enabled=False)) as off:
        off.log_metrics({"loss": 1.0}, 0)
        assert off.child_env() == {TRACKING_ENV: "off"}  # a pipeline without tracking: its stages neither
    monkeypatch.setenv(TRACKING_ENV, "off")
    with Tracker(TrackingConfig(store_dir=str(store)), tags={"stage": "adapt"}) as stage:
        stage.log_metrics({"loss": 1.0}, 0)
    assert t.run_id is None and off.run_id is None and stage.run_id is None
    assert [p.name for p in store.iterdir()] == ["mlflow.db"] and all_runs(store) == []


def test_logging_does_not_wait_for_a_slow_store(store, monkeypatch):
    """While the store hangs, log_metrics and flush still return; finish() then delivers everything."""
    release = threading.Event()
    with Tracker(TrackingConfig(store_dir=str(store), flush_every=1)) as t:
        real_log_batch = t.client.log_batch

        def hanging_log_batch(*args, **kwargs):
            release.wait()
            return real_log_batch(*args, **kwargs)

        monkeypatch.setattr(t.client, "log_batch", hanging_log_batch)

        def train():
            for step in range(20):
                t.log_metrics({"train/loss": float(step)}, step)
            t.flush()

        training = threading.Thread(target=train)
        training.start()
        training.join(timeout=60)
        try:
            assert not training.is_alive(), "log_metrics/flush waited for the store"
            assert steps_of(client_for(store), t.run_id, "train/loss") == []
        finally:
            release.set()
    assert steps_of(client_for(store), t.run_id, "train/loss") == [(s, float(s)) for s in range(20)]


def test_rejected_call_is_reported_and_the_rest_is_kept(store, caplog):
    with Tracker(TrackingConfig(store_dir=str(store)), {"lr": 0.1}) as t:
        t.set_tags({"bad key!": 1})  # not a valid tag name: the store says no
        t.log_metrics({"train/loss": 1.0}, 0)
    run = client_for(store).get_run(t.run_id)
    assert len(t.errors) == 1 and "rejected" in caplog.text
    assert run.data.params["lr"] == "0.1" and run.data.metrics["train/loss"] == 1.0
    assert run.info.status == "FINISHED"


def test_server_down_at_start_warns_and_keeps_everything_locally(store, tmp_path, caplog):
    down = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="minimodel.tracking"):
        t = log_toy_stage(TrackingConfig(uri=down, store_dir=str(store)), tmp_path)
    assert "unreachable" in caplog.text and down in caplog.text
    [run] = all_runs(store)
    client = client_for(store)
    assert run.info.run_id == t.run_id and run.info.status == "FINISHED"
    assert run.data.tags["tracking_fallback_from"] == down and run.data.params["model.num_layers"] == "4"
    assert steps_of(client, t.run_id, "train/loss") == [(s, 10.0 - s) for s in range(25)]
    assert artifact_paths(client, t.run_id) == {"config.yaml", "plots/loss_curves.png", "report/report.md"}


def test_bad_tracking_config_names_the_key():
    with pytest.raises(ConfigError, match="tracking.flush_every"):
        load_config(ToyStageConfig, overrides=["tracking.flush_every=0"])


def test_finished_stage_is_linked_into_a_new_pipeline_not_rerun(store):
    tracking = TrackingConfig(store_dir=str(store))
    with Tracker(tracking, tags={"stage": "pipeline"}) as first_pipeline:
        with Tracker(dataclasses.replace(tracking, parent_run_id=first_pipeline.run_id), ToyStageConfig(),
                     tags={"stage": "adapt", "target_lang": "sw"}) as stage:
            stage.log_metrics({"train/loss": 1.0}, 0)
    # Re-running the same pipeline: the stage is already one of its children.
    assert link_run(tracking, stage.run_id, first_pipeline.run_id) == stage.run_id

    with Tracker(tracking, tags={"stage": "pipeline"}) as second_pipeline:
        link_id = link_run(tracking, stage.run_id, second_pipeline.run_id)
    link = client_for(store).get_run(link_id)
    assert link.data.tags["mlflow.parentRunId"] == second_pipeline.run_id
    assert link.data.tags[REUSED_RUN_TAG] == stage.run_id and link.data.tags["target_lang"] == "sw"
    assert stage.run_id in link.data.tags["mlflow.note.content"] and link.info.status == "FINISHED"
    assert link.data.metrics == {}  # a link, not a copy
    assert len(all_runs(store)) == 4
    # a stamp naming a run this store no longer holds (deleted in the UI, or another store): nothing to link
    client_for(store).delete_run(stage.run_id)
    with Tracker(tracking, tags={"stage": "pipeline"}) as third_pipeline:
        assert link_run(tracking, stage.run_id, third_pipeline.run_id) is None
        assert link_run(tracking, "0" * 32, third_pipeline.run_id) is None


def test_files_are_attached_to_a_run_without_changing_it(store, tmp_path, monkeypatch, caplog):
    """How the report reaches the pipeline's run: files and metrics added, status untouched; a run the store does
    not hold, disabled tracking or another rank: nothing, and no error."""
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    tracking = TrackingConfig(store_dir=str(store))
    parent = Tracker(tracking, tags={"stage": "pipeline"})
    attach_to_run(tracking, parent.run_id, [report], "report", {"task/sw/minipost/accuracy": 0.5})
    client = client_for(store)
    run = client.get_run(parent.run_id)
    assert run.info.status == "RUNNING" and run.data.metrics == {"task/sw/minipost/accuracy": 0.5}
    assert artifact_paths(client, parent.run_id, "report") == {"report/report.md"}
    parent.finish()
    with caplog.at_level(logging.WARNING, logger="minimodel.tracking"):
        attach_to_run(tracking, "0" * 32, [report], "report", {"x": 1.0})
    assert "not in the MLflow store" in caplog.text
    attach_to_run(dataclasses.replace(tracking, enabled=False), parent.run_id, [report], "off", {"x": 1.0})
    monkeypatch.setenv("RANK", "1")
    attach_to_run(tracking, parent.run_id, [report], "rank1", {"x": 1.0})
    assert client.get_run(parent.run_id).data.metrics == {"task/sw/minipost/accuracy": 0.5}
    monkeypatch.delenv("RANK")
    # a store that fails while attaching: a warning, not a failed report stage (its files are on disk)
    from mlflow import MlflowClient

    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(MlflowClient, "log_artifact", refuse)
    with caplog.at_level(logging.WARNING, logger="minimodel.tracking"):
        attach_to_run(tracking, parent.run_id, [report], "report", {"x": 1.0})
    assert "could not attach report.md to MLflow run" in caplog.text and "disk full" in caplog.text


def test_a_run_is_not_tagged_with_a_parent_its_store_lacks(store, caplog):
    """The store warned that the parent is not there, and the run pointed at it all the same (a parent the UI
    cannot show)."""
    tracking = TrackingConfig(store_dir=str(store), parent_run_id="0" * 32)
    with caplog.at_level(logging.WARNING, logger="minimodel.tracking"):
        with Tracker(tracking, tags={"stage": "adapt"}) as orphan:
            pass
    assert "not in the MLflow store" in caplog.text
    assert "mlflow.parentRunId" not in client_for(store).get_run(orphan.run_id).data.tags
    assert len(all_runs(store)) == 1


def test_resumed_stage_continues_its_run(store, tmp_path, monkeypatch, caplog):
    """A stage resumed from its checkpoints (a requeued Slurm job, the same command again) continues its run."""
    tracking = TrackingConfig(store_dir=str(store), flush_every=1)
    out = tmp_path / "stage"
    with Tracker(tracking, tags={"stage": "pipeline"}) as first_pipeline, \
            Tracker(tracking, tags={"stage": "pipeline"}) as second_pipeline:
        pass
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    first = Tracker.resumable(dataclasses.replace(tracking, parent_run_id=first_pipeline.run_id), out,
                              ToyStageConfig(steps=10), tags={"stage": "pretrain"}, resume=False)
    for step in range(3):
        first.log_metrics({"train/loss": float(step)}, step)
    first.finish("KILLED")  # preempted after a checkpoint
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == first.run_id

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued, and run again under a new pipeline run
    with caplog.at_level(logging.WARNING, logger="minimodel.tracking"):
        again = Tracker.resumable(dataclasses.replace(tracking, parent_run_id=second_pipeline.run_id), out,
                                  ToyStageConfig(steps=20), tags={"stage": "pretrain", "resumed_from_step": 3})
    for step in range(3, 6):
        again.log_metrics({"train/loss": float(step)}, step)
    again.finish()
    assert again.run_id == first.run_id and again.errors == [] and "changed settings" in caplog.text
    client = client_for(store)
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and len(all_runs(store)) == 3
    assert steps_of(client, run.info.run_id, "train/loss") == [(s, float(s)) for s in range(6)]
    assert run.data.params["steps"] == "10" and run.data.tags["resumed_with.steps"] == "20"
    assert {k: run.data.tags[k] for k in ("slurm_job_id", "slurm_restart_count", "resumes", "resumed_from_step",
                                          "mlflow.parentRunId")} == {
        "slurm_job_id": "77", "slurm_restart_count": "1", "resumes": "1", "resumed_from_step": "3",
        "mlflow.parentRunId": second_pipeline.run_id}

    # Not resuming (no checkpoint was loaded: a fresh start in the same output_dir): a new run, remembered.
    fresh = Tracker.resumable(tracking, out, tags={"stage": "pretrain"}, resume=False)
    fresh.finish()
    assert fresh.run_id != first.run_id and json.loads((out / RUN_FILE).read_text())["run_id"] == fresh.run_id
    # A run file naming a run this store does not hold (another store): a new run, with a warning.
    (out / RUN_FILE).write_text(json.dumps({"run_id": "0" * 32}))
    with caplog.at_level(logging.WARNING, logger="minimodel.tracking"):
        elsewhere = Tracker.resumable(tracking, out, tags={"stage": "pretrain"})
    elsewhere.finish()
    assert "not in the MLflow store" in caplog.text and elsewhere.run_id not in (None, "0" * 32, fresh.run_id)
    # Its run deleted in the UI (MLflow refuses to log to it): a new run, with a warning.
    client.delete_run(elsewhere.run_id)
    with caplog.at_level(logging.WARNING, logger="minimodel.tracking"):
        after_delete = Tracker.resumable(tracking, out, tags={"stage": "pretrain"})
    after_delete.finish()
    assert "was deleted" in caplog.text and after_delete.run_id not in (None, elsewhere.run_id)
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == after_delete.run_id
    # Inert ranks and disabled tracking leave the file alone.
    monkeypatch.setenv("RANK", "1")
    assert Tracker.resumable(tracking, out, resume=False).run_id is None
    assert json.loads((out / RUN_FILE).read_text())["run_id"] == after_delete.run_id


def test_pipeline_children_are_nested_under_the_parent(store):
    runs = log_synthetic_pipeline(TrackingConfig(store_dir=str(store)), steps=3)
    by_id = {r.info.run_id: r for r in all_runs(store)}
    assert len(by_id) == 4
    for child in runs["children"].values():
        assert by_id[child].data.tags["mlflow.parentRunId"] == runs["parent"]
    assert "mlflow.parentRunId" not in by_id[runs["parent"]].data.tags
    # A stage whose own config names another experiment still lands next to its parent (the UI nests only there).
    with Tracker(TrackingConfig(store_dir=str(store), experiment="minimodel-adapt", parent_run_id=runs["parent"]),
                 tags={"stage": "adapt"}) as stage:
        pass
    client = client_for(store)
    assert client.get_run(stage.run_id).info.experiment_id == runs["experiment_id"]
    assert client.get_experiment_by_name("minimodel-adapt") is None


TORCHRUN_WORKER = """
import os, torch.distributed as dist
from minimodel.tracking import Tracker, TrackingConfig
dist.init_process_group("gloo")
with Tracker(TrackingConfig(store_dir=os.environ["STORE"]), {"lr": 0.1}, tags={"stage": "pretrain"}) as t:
    for step in range(5):
        t.log_metrics({"train/loss": float(dist.get_rank() * 100 + step)}, step)
print(f"rank {dist.get_rank()} run {t.run_id}", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_of_one_torchrun_job_make_one_run(tmp_path):
    store = tmp_path / "fresh-store"  # created by the job: only rank 0 may create (migrate) it
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    env = {**os.environ, "STORE": str(store), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = all_runs(store)
    assert f"rank 0 run {run.info.run_id}" in result.stdout and "rank 1 run None" in result.stdout
    assert run.data.tags["world_size"] == "2" and run.info.status == "FINISHED"
    assert steps_of(client_for(store), run.info.run_id, "train/loss") == [(s, float(s)) for s in range(5)]


@pytest.mark.slow
def test_server_going_away_mid_run_does_not_stop_the_stage(store, tmp_path, caplog, monkeypatch):
    """The stage's results are on disk: when the server goes away, the writer warns once and the stage goes on."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # give up on the dead server at once
    tracking = TrackingConfig(store_dir=str(store), flush_every=5)
    with MlflowServer(new_store(tmp_path / "server-store")) as server:
        t = Tracker(dataclasses.replace(tracking, uri=server.url), ToyStageConfig(), tags={"stage": "adapt"})
        for step in range(10):
            t.log_metrics({"train/loss": float(step)}, step)
        t.flush(wait=True)
        assert [v for _, v in steps_of(MlflowClient(server.url), t.run_id, "train/loss")] == list(range(10))
    with caplog.at_level(logging.WARNING, logger="minimodel.tracking"):
        for step in range(10, 20):
            t.log_metrics({"train/loss": float(step)}, step)
        t.finish()
    assert caplog.text.count("went away") == 1 and server.url in caplog.text and t.errors == []
    assert all_runs(store) == []  # nothing replayed elsewhere


def test_metric_names_with_a_method_spec_are_made_acceptable_to_mlflow():
    # MLflow rejects '+' in metric names (the whole batch of a report run failed on minijoint+ofa)
    from minimodel.tracking import metric_name

    assert metric_name("target_mlm/ny/minijoint+ofa/mlm_gain") == "target_mlm/ny/minijoint_ofa/mlm_gain"
    assert metric_name("seconds.adapt-standard-ny") == "seconds.adapt-standard-ny"



@pytest.mark.parametrize("leader, error", [
    ("sleep 300 & echo $! > worker.pid; sleep 300", KeyboardInterrupt),  # Ctrl-C while it starts
    ("sleep 300 & echo $! > worker.pid", RuntimeError),  # the leader exits, its worker lives on
])
def test_a_server_that_does_not_start_leaves_no_process_behind(tmp_path, monkeypatch, leader, error):
    """`python -m minimodel.ui` interrupted while the server starts left it running (its own session: the
    terminal's SIGINT does not reach it), holding the port; a leader that exited left its workers running."""
    import psutil

    server = MlflowServer(tmp_path / "store", port=1)
    monkeypatch.setattr(server, "command", lambda: ["bash", "-c", leader])
    monkeypatch.chdir(tmp_path)

    def healthy():  # Ctrl-C arrives once the worker runs
        if (tmp_path / "worker.pid").is_file() and (tmp_path / "worker.pid").read_text().strip():
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(server, "healthy", healthy if error is KeyboardInterrupt else lambda: False)
    with pytest.raises(error):
        server.start(timeout=30)
    worker = int((tmp_path / "worker.pid").read_text())
    assert server.process.poll() is not None

    def dead() -> bool:  # a signalled process dies once scheduled: allow it a moment
        return not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE

    deadline = time.monotonic() + 10
    while not dead() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dead()


def test_a_slurm_jobs_runs_are_not_looked_for_in_a_fallback_store(tmp_path, monkeypatch):
    """The stamp of a Slurm job asks the pipeline's server for the job's runs; with the server down it links none
    (and leaves no local store behind in the submit directory, which a connection would have created)."""
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{free_port()}", parent_run_id="0" * 32)
    assert runs_of_slurm_job(cfg, "42") == []
    assert os.listdir(tmp_path) == []


def test_a_proxy_with_nothing_behind_it_is_a_server_that_is_down(store, tmp_path, caplog):
    """A reverse proxy answering 502 counted as a server that is up: MLflow retried for minutes, then the stage
    failed with a traceback and wrote nothing. Now it is unreachable: the local store, with one warning."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class BadGateway(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_error(502)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), BadGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    proxy = f"http://127.0.0.1:{server.server_port}"
    try:
        with caplog.at_level(logging.WARNING, logger="minimodel.tracking"):
            t = log_toy_stage(TrackingConfig(uri=proxy, store_dir=str(store)), tmp_path)
    finally:
        server.shutdown()
    assert "unreachable" in caplog.text and [r.info.run_id for r in all_runs(store)] == [t.run_id]


def test_a_requeued_jobs_stamp_links_only_its_finished_run(store, monkeypatch):
    """A Slurm job keeps its id when requeued: the killed attempt's run was stamped and linked too, as "the
    finished run"."""
    from minimodel.tracking import runs_of_slurm_job

    plan = Tracker(TrackingConfig(store_dir=str(store)), tags={"stage": "pipeline"})
    plan.finish()
    monkeypatch.setenv("MINIMODEL_PARENT_RUN_ID", plan.run_id)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    killed = Tracker(TrackingConfig(store_dir=str(store)), tags={"stage": "data"})
    killed.interrupted(1)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with Tracker(TrackingConfig(store_dir=str(store)), tags={"stage": "data"}) as finished:
        pass
    assert runs_of_slurm_job(TrackingConfig(store_dir=str(store)), "4242") == [finished.run_id]


def test_a_stopped_pipeline_closes_the_runs_its_stage_left_open(store):
    """A stage killed before it could end its run (SIGKILL, a signal it does not handle) left it RUNNING for ever."""
    from minimodel.pipeline import _close_open_runs

    pipeline = Tracker(TrackingConfig(store_dir=str(store)), tags={"stage": "pipeline"})
    client = client_for(store)
    orphan = client.create_run(pipeline.experiment_id, tags={"mlflow.parentRunId": pipeline.run_id})
    _close_open_runs(pipeline, "KILLED")
    pipeline.finish("KILLED")
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
