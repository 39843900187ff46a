"""The Slurm templates (slurm/*.sh) on a real Slurm: a private two-node cluster on this machine (slurm_cluster.py)
with two fake GPUs per node, so the templates see SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES like on a GPU cluster.

Jobs are submitted from the repo (as a user would: SLURM_SUBMIT_DIR is the checkout) with their logs and outputs
redirected to pytest's temporary folders.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster, ensure_packages

from minimodel.methods import parse_method
from minimodel.tracking import REUSED_RUN_TAG

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "slurm").glob("*.sh"))
SUBMITTED = [t for t in TEMPLATES if re.search(r"^#SBATCH ", t.read_text(), re.M)]
TRAINING = ["pretrain_minijoint.sh", "minipost.sh", "adapt.sh", "evaluate.sh"]  # these checkpoint + requeue
JOB_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"], "MLFLOW_TRACKING_URI": ""}  # minimodel's


# -- static checks (fast) --------------------------------------------------------------------------------------------
def test_templates_pass_bash_n_and_shellcheck():
    ensure_packages(["shellcheck"], ["shellcheck"])
    for template in TEMPLATES:
        r = subprocess.run(["bash", "-n", str(template)], capture_output=True, text=True)
        assert r.returncode == 0, f"{template.name}: {r.stderr}"
    # -x follows `source slurm/common.sh`, so each template is checked together with what it sources.
    r = subprocess.run(["shellcheck", "-x", *[str(t.relative_to(ROOT)) for t in TEMPLATES]], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_templates_hold_no_machine_path():
    for template in TEMPLATES:
        text = template.read_text()
        for path in (str(ROOT), "/work/", "/home/", "/root", "/Users/", "/scratch/"):
            assert path not in text, f"{template.name} mentions {path}"


@pytest.mark.parametrize("visible, refused", [("3,5", True), ("0,1", False), ("0,1,2,3", False), ("0,10", True)])
def test_deepspeed_ranks_refuse_gpus_its_launcher_would_renumber(visible, refused):
    """DeepSpeed's launcher sets CUDA_VISIBLE_DEVICES=0..n-1 on each node of a hostfile: where Slurm gave other GPUs
    (a shared node without device cgroups) the ranks would run on another job's. (Accepted ones go on to the
    launch, here failing at scontrol outside an allocation.)"""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible, "NPROC_PER_NODE": "2", "MINIMODEL_PYTHON": "true",
           "MASTER_ADDR": "x", "MASTER_PORT": "1", "SLURM_JOB_NODELIST": "not-a-host"}
    env.pop("DS_ACCELERATOR", None)
    r = subprocess.run(["bash", "slurm/on_node.sh", "deepspeed", "x.py"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert (f"Slurm gave this node GPUs {visible}, but DeepSpeed's launcher would use 0,1" in r.stderr) == refused
    assert (r.returncode == 2) == refused


@pytest.mark.parametrize("template", [t.name for t in SUBMITTED])
def test_templates_log_per_job_id(template):
    directives = re.findall(r"^#SBATCH (\S+)", (ROOT / "slurm" / template).read_text(), re.M)
    (output,) = [d for d in directives if d.startswith("--output=")]
    assert "%j" in output or "%A_%a" in output
    assert "--open-mode=append" in directives  # a requeued job appends to its log instead of truncating it
    if template in TRAINING:
        assert "--requeue" in directives and any(d.startswith("--signal=B:USR1@") for d in directives)


# -- a real cluster --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus_per_node=2, gpus_per_node=2) as c:
        yield c


def submit(cluster: SlurmCluster, template: str | Path, *args: str, out: Path, nodes: int = 1, gpus: int = 1,
           options: list[str] = (), env: dict | None = None) -> str:
    return cluster.sbatch(ROOT / "slurm" / template if isinstance(template, str) else template, *args, cwd=ROOT,
                          env={**JOB_ENV, **(env or {})}, options=[f"--nodes={nodes}", f"--gpus-per-node={gpus}",
                                                f"--output={out}/%x-%j.out", *options])


def stand_in(path: Path, body: str) -> Path:
    """An executable bash script at `path` (a program the test replaces: python, srun, sbatch)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)
    return path


def job_log(out: Path, job: str) -> str:
    (log,) = out.glob(f"*-{job}.out")
    return log.read_text(errors="replace")


@pytest.mark.slow
def test_one_node_cluster_starts_runs_a_job_and_stops(tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo hello from $SLURMD_NODENAME'\n")
    with SlurmCluster(tmp_path / "cluster", nodes=1) as one:
        daemons = list(one.daemons.values())
        assert sorted(one.daemons) == ["munged", "slurmctld", "slurmd-node1"]
        job = one.sbatch(script, options=[f"--output={tmp_path}/%j.out"])
        result = one.wait(job, timeout=60)
        assert result.ok, result
        assert (tmp_path / f"{job}.out").read_text().strip() == "hello from node1"
        assert f"JobId={job} " in one.jobcomp() and "JobState=COMPLETED" in one.jobcomp()
    assert all(p.poll() is not None for p in daemons)  # stop() ended exactly the daemons it started


WORLD_JOB = """#!/bin/bash
# What every template does: find the repo, source common.sh, launch one srun task per node.
set -euo pipefail
MINIMODEL_HOME=${MINIMODEL_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
source "$MINIMODEL_HOME/slurm/common.sh"
mm_launch "$@"
"""

WORLD_SCRIPT = """
import argparse, json, os
import torch.distributed as dist
parser = argparse.ArgumentParser()
parser.add_argument("launcher")
parser.add_argument("out")
args, _ = parser.parse_known_args()  # the DeepSpeed launcher adds --local_rank
if args.launcher == "deepspeed":
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
else:
    dist.init_process_group("gloo")
me = {"rank": dist.get_rank(), "world": dist.get_world_size(), "node": os.environ["SLURMD_NODENAME"],
      "job": os.environ["SLURM_JOB_ID"]}
everyone = [None] * dist.get_world_size()
dist.all_gather_object(everyone, me)
if dist.get_rank() == 0:
    with open(args.out, "w") as f:
        json.dump(everyone, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["deepspeed"])  # torchrun: test_pretrain_on_two_nodes_...
def test_both_nodes_join_one_world(cluster, tmp_path, launcher):
    """common.sh + on_node.sh: one launcher per node, rendezvous at the first node: one world over both nodes."""
    (tmp_path / "job.sh").write_text(WORLD_JOB)
    (tmp_path / "world.py").write_text(WORLD_SCRIPT)
    out = tmp_path / "world.json"
    job = submit(cluster, tmp_path / "job.sh", launcher, str(tmp_path / "world.py"), launcher, str(out),
                 out=tmp_path, nodes=2, gpus=1)
    result = cluster.wait(job, timeout=300)
    log = job_log(tmp_path, job)
    assert result.ok, f"{result}\n{log[-3000:]}"
    world = json.loads(out.read_text())
    assert [w["rank"] for w in world] == [0, 1] and {w["world"] for w in world} == {2}
    assert sorted(w["node"] for w in world) == ["node1", "node2"]
    assert {w["job"] for w in world} == {job}
    for node in (0, 1):  # each node printed the launch command it resolved
        assert re.search(rf"\[minimodel node {node}/2 \S+\] \+ .*{launcher_module(launcher)}", log), log[-3000:]


def launcher_module(launcher: str) -> str:
    return {"torchrun": "torch.distributed.run", "deepspeed": "deepspeed.launcher.runner"}[launcher]


# -- step 1 as a Slurm job -------------------------------------------------------------------------------------------
PRETRAIN_STEPS = 60
FIRST_SAVE = 10  # train.checkpoint.save_every


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pretrain_helpers import build_tiny_corpus

    return build_tiny_corpus(tmp_path_factory.mktemp("corpus"), vocab_size=50)


def pretrain_args(corpus: Path, out: Path) -> list[str]:
    # the config as a bare file name, the way README.md shows it; overrides as key=value
    return ["configs/pretrain/minijoint_tiny.yaml", f"data.train_prefix={corpus / 'train'}",
            f"data.valid_prefix={corpus / 'valid'}", f"data.tokenizer_dir={corpus / 'tokenizer'}",
            "model.vocab_size=50", f"output_dir={out / 'run'}", f"train.steps={PRETRAIN_STEPS}", "train.eval.every=15",
            "train.eval.batches=1", "train.log_every=10", "train.schedule.warmup_steps=5",
            f"train.checkpoint.save_every={FIRST_SAVE}",
            f"tracking.store_dir={out / 'mlflow'}"]


def pretrain_losses(out: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    return {row["step"]: (row["train/loss"], row["train/secondary_loss"]) for row in rows if "train/loss" in row}


def mlflow_runs(out: Path, job: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.slurm_job_id = '{job}'")


@pytest.fixture(scope="module")
def one_node_pretrain(cluster, corpus, tmp_path_factory):
    """sbatch slurm/pretrain_minijoint.sh on one node with two ranks (its two GPUs), uninterrupted."""
    out = tmp_path_factory.mktemp("pretrain_1node")
    job = submit(cluster, "pretrain_minijoint.sh", *pretrain_args(corpus, out), out=out, nodes=1, gpus=2)
    return job, cluster.wait(job, timeout=400), out


@pytest.mark.slow
def test_pretrain_template_on_one_node(one_node_pretrain):
    job, result, out = one_node_pretrain
    log = job_log(out, job)
    assert result.ok, f"{result}\n{log[-4000:]}"
    assert sorted(pretrain_losses(out)) == list(range(1, PRETRAIN_STEPS + 1))
    assert "--nproc-per-node=2" in log and "pretrain/train.py" in log  # the resolved launch command is printed
    (run,) = mlflow_runs(out, job)
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["world_size"] == "2"


@pytest.mark.slow
def test_pretrain_on_two_nodes_requeues_on_its_signal_and_resumes(cluster, corpus, one_node_pretrain, tmp_path):
    """Two nodes x one rank = the one-node run's layout spread over both nodes. USR1 to the batch shell (what
    `--signal=B:USR1@300` sends near the time limit) makes the trainer checkpoint and the job requeue itself;
    the requeued job resumes from that checkpoint and ends with the uninterrupted run's losses at every step. The
    signal comes after the job's first checkpoint: Slurm signals every process of the step, and the helper process
    megatron's checkpoint writer spawned at that save must live through it (it died, and the second save failed)."""
    # --exclusive gives the job both GPUs of each node: NPROC_PER_NODE=1 chooses one rank per node
    job = submit(cluster, "pretrain_minijoint.sh", *pretrain_args(corpus, tmp_path), out=tmp_path, nodes=2,
                 env={"NPROC_PER_NODE": "1"})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and max(pretrain_losses(tmp_path), default=0) >= FIRST_SAVE + 1):
        assert cluster.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), job_log(tmp_path, job)[-4000:]
        assert time.monotonic() < deadline, f"training did not reach step {FIRST_SAVE + 1}"
        time.sleep(0.3)
    cluster.run(["scancel", "--signal=USR1", "--batch", job])
    result = cluster.wait(job, timeout=400)
    log = job_log(tmp_path, job)
    assert result.ok and result.restarts == 1, f"{result}\n{log[-4000:]}"

    stopped = int(re.search(r"PREEMPTED by signal SIGUSR1: checkpoint \S+ saved at step (\d+)", log).group(1))
    assert FIRST_SAVE < stopped < PRETRAIN_STEPS
    assert f"requeueing job {job}" in log
    assert re.search(rf"resumed from \S+iter_{stopped:07d} at step {stopped}\b", log), log[-4000:]
    for node in (0, 1):  # both nodes started their ranks, in both runs of the job
        assert len(re.findall(rf"\[minimodel node {node}/2 ", log)) == 2
    # no lost step: every step once, each with the loss of the uninterrupted run
    losses, reference = pretrain_losses(tmp_path), pretrain_losses(one_node_pretrain[2])
    assert sorted(losses) == list(range(1, PRETRAIN_STEPS + 1))
    for step in range(1, PRETRAIN_STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], abs=1e-5), f"step {step}"
    # the requeued job continued the MLflow run of its first launch: one run, marked as resumed after a restart
    (run,) = mlflow_runs(tmp_path, job)
    assert run.data.tags["world_size"] == "2" and run.data.tags["resumes"] == "1"
    assert run.data.tags["slurm_restart_count"] == "1" and run.info.status == "FINISHED"


@pytest.mark.slow
def test_an_exclusive_template_runs_as_many_ranks_as_gpus_asked_for(cluster, tmp_path):
    """pipeline.sh asks minipost.sh (--exclusive: whole nodes) for --gpus-per-node=<minipost_nproc>; the batch shell
    is given all of the node's GPUs (2 here), the step only those asked for: the ranks are the GPUs asked for (the
    count the plan hashed), not the node's (a DeepSpeed stage refused to start, torchrun started ranks without
    GPUs). The stage fails at once on a config error: only its launch matters here."""
    job = submit(cluster, "minipost.sh", "configs/minipost/tiny.yaml", "no_such_key=1", out=tmp_path, gpus=1)
    result = cluster.wait(job, timeout=300)
    log = job_log(tmp_path, job)
    assert result.state == "FAILED" and "config error: " in log, log[-3000:]
    assert "(1 x 1 ranks)" in log, log[-3000:]


@pytest.mark.slow
def test_a_stage_that_checkpointed_on_a_signal_to_its_steps_only_is_requeued(cluster, tmp_path):
    """`scancel --signal=USR1 JOB` (or --signal=USR1@N without B:) reaches the steps only: the stage checkpointed and
    exited 75, and the job FAILED (its dependants cancelled) because the batch shell had not seen the signal."""
    # the DeepSpeed stage (a launcher that inherits USR1 ignored, slurm/on_node.sh, and a rank that handles it)
    python = tmp_path / "python"
    python.write_text(f"""#!{sys.executable}
import os, signal, sys, time
if int(os.environ.get("SLURM_RESTART_COUNT", "0")) >= 1:
    sys.exit(print("resumed", flush=True))
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(print("checkpointed", flush=True) or 75))
print("training", flush=True)
while True:
    time.sleep(0.2)
""")
    python.chmod(0o755)
    job = submit(cluster, "evaluate.sh", "finetune", out=tmp_path, env={"MINIMODEL_PYTHON": str(python)})
    log_file, deadline = tmp_path / f"evaluate-{job}.out", time.monotonic() + 120
    while "training" not in (log_file.read_text() if log_file.is_file() else ""):
        assert time.monotonic() < deadline and cluster.state(job) in ("PENDING", "CONFIGURING", "RUNNING")
        time.sleep(0.3)
    cluster.run(["scancel", "--signal=USR1", job])  # the steps, not the batch shell
    result = cluster.wait(job, timeout=180)
    log = job_log(tmp_path, job)
    assert result.ok and result.restarts == 1, f"{result}\n{log[-3000:]}"
    assert "checkpointed" in log and f"requeueing job {job}" in log and "resumed" in log


@pytest.mark.slow
def test_a_single_process_stage_at_its_time_limit_fails_instead_of_requeueing_forever(cluster, tmp_path):
    """zero_shot and report have no checkpoint: the time-limit signal kills them, and a requeued job would start
    over and be killed at the same point again, forever. They fail (a training stage that checkpointed, exit 75,
    is requeued: test_pretrain_on_two_nodes_requeues_on_its_signal_and_resumes)."""
    python = stand_in(tmp_path / "python", "echo scoring; exec sleep 600")  # a run that outlasts its time limit
    job = submit(cluster, "evaluate.sh", "zero_shot", out=tmp_path, env={"MINIMODEL_PYTHON": str(python)})
    log_file, deadline = tmp_path / f"evaluate-{job}.out", time.monotonic() + 120
    while "scoring" not in (log_file.read_text() if log_file.is_file() else ""):  # the stage is running
        assert time.monotonic() < deadline and cluster.state(job) in ("PENDING", "CONFIGURING", "RUNNING")
        time.sleep(0.3)
    cluster.run(["scancel", "--signal=USR1", "--batch", job])  # what --signal=B:USR1@300 sends near the limit
    result = cluster.wait(job, timeout=120)
    log = job_log(tmp_path, job)
    assert result.state == "FAILED" and result.restarts == 0, f"{result}\n{log[-3000:]}"
    assert "requeueing" not in log and "stage exited with code" in log


@pytest.mark.slow
def test_a_pipeline_slurm_would_refuse_in_part_submits_nothing(cluster, tmp_path):
    """A stage asking more GPUs per node than a node has (adapt_nproc=4 here, 2 GPUs a node) is refused at its
    submission, when the jobs before it were submitted already and would run with nothing after them. Every job is
    checked first (sbatch --test-only): the refusal names the job, and no job is submitted."""
    r = cluster.run(["bash", "slurm/pipeline.sh", *pipeline_args(tmp_path, "adapt_nproc=4")], cwd=ROOT, check=False,
                    env={**JOB_ENV, "SBATCH_ARGS": f"--output={tmp_path}/%x-%j.out --gpus-per-node=2"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Slurm would refuse job adapt-" in r.stderr and "nothing was submitted" in r.stderr, r.stderr
    assert "submitted" not in r.stdout and not list(tmp_path.glob("*.out"))


@pytest.mark.slow
def test_pipeline_sh_run_again_leaves_the_jobs_still_queued_alone(cluster, tmp_path):
    """Running pipeline.sh again while its jobs wait or run (the recovery after one branch failed) submitted a second
    copy of each, writing the same checkpoints. A job, or an array task, of the same stage at the same inputs still
    in the queue is not submitted again, and what needs it waits for it: a language added to the pipeline submits
    that language's tasks alone. (Held: nothing runs.)"""
    env = {**JOB_ENV, "SBATCH_ARGS": f"--output={tmp_path}/%x-%j.out --hold"}

    def pipeline(*overrides: str) -> str:
        args = pipeline_args(tmp_path, *overrides)
        return cluster.run(["bash", "slurm/pipeline.sh", *args], cwd=ROOT, env=env).stdout

    first = pipeline("target_langs=[ny]")
    submitted = dict(re.findall(r"^submitted (\S+) (\d+)", first, re.M))
    ids = list(submitted.values())
    try:
        again = pipeline("target_langs=[ny]")
        assert "submitted" not in again, again
        assert dict(re.findall(r"^queued already: (\S+) (\d+)", again, re.M)) == submitted
        more = pipeline("target_langs=[ny, sw]")
        ids += re.findall(r"^submitted \S+ (\d+)", more, re.M)
        adapt = re.search(r"^submitted (adapt-\S+) (\d+) after(\S+) array over: (.*?):", more, re.M)
        assert adapt and adapt.group(4) == "sw", more  # ny's task is the first pipeline's, still queued
        assert re.search(rf"^queued already: {adapt.group(1)} {submitted[adapt.group(1)]}_0$", more, re.M), more
        assert {"data", "pretrain"} <= set(re.findall(r"^queued already: (\S+)", more, re.M))
        # what needs the adaptation waits for both arrays: sw's new one and ny's queued task
        needs = [line for line in more.splitlines() if re.search(rf"after\S*:{adapt.group(2)}\b", line)]
        assert needs and all(f":{submitted[adapt.group(1)]}_0" in line for line in needs), more
    finally:
        cluster.run(["scancel", *ids], check=False)


def test_a_job_voids_its_stages_old_stamp_before_the_stage_starts(tmp_path):
    """As a local pipeline run does (test_stages): a job of another config that takes the stage's directory over and
    fails leaves no stamp there for a plan of the old config to skip the stage by. (A stand-in srun: the stage
    fails.)"""
    import shlex

    from minimodel.stages import STAMP

    out = tmp_path / "stage"
    out.mkdir()
    (out / STAMP).write_text("{}")
    srun = stand_in(tmp_path / "bin" / "srun", "exit 1")
    env = {**os.environ, "PATH": f"{srun.parent}:{os.environ['PATH']}", "MINIMODEL_HOME": str(ROOT),
           "MM_STAMPS": shlex.join([str(out), "input-hash", "identity-hash"])}
    r = subprocess.run(["bash", "-c", "source slurm/common.sh && mm_launch python x.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "stage exited with code 1" in r.stdout, r.stdout + r.stderr
    assert not (out / STAMP).exists()


def test_the_pipeline_jobs_run_what_the_plan_hashed_not_the_submitting_shells_settings(tmp_path):
    """sbatch passes its shell's environment on: OVERRIDES, NPROC_PER_NODE or MASTER_PORT exported for a template
    run by hand reached every job of pipeline.sh, which ran other settings under the plan's stamp. And under a site
    default of SBATCH_EXPORT=NONE the plan's own (MM_TASK_ARGS) did not reach an array task, which adapted the
    config's first language instead; its tasks logged by their own job ids. (A stand-in sbatch records what each job
    would see.)"""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"env": {}, "jobs": [{
        "name": "adapt-standard", "kind": "adapt", "script": "adapt/train.py", "args": ["--config", "x.yaml"],
        "slurm": ["slurm/adapt.sh"], "gpus_per_node": 1, "after": [], "done": False, "stamp": None,
        "array": [{"lang": lang, "args": [f"target_langs=[{lang}]"], "done": False, "stamp": None}
                  for lang in ("ny", "sw")]}, {
        "name": "report", "kind": "report", "script": "evaluate/report.py", "args": ["--config", "x.yaml"],
        "slurm": ["slurm/evaluate.sh", "report"], "gpus_per_node": None, "array": [], "after": [], "done": False,
        "stamp": None}]}))
    sbatch = stand_in(tmp_path / "bin" / "sbatch", f"env > {tmp_path}/env-$$.txt\n"
                                                   f'printf "%s\\n" "$@" > {tmp_path}/args-$$.txt\necho 1')
    env = {**os.environ, "PATH": f"{sbatch.parent}:{os.environ['PATH']}", "PLAN": str(plan), "SBATCH_EXPORT": "NONE",
           "OVERRIDES": "train.steps=5", "NPROC_PER_NODE": "3", "MASTER_PORT": "1234", "CONFIG": "other.yaml"}
    r = subprocess.run(["bash", "slurm/pipeline.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "submitted report 1" in r.stdout, r.stdout + r.stderr
    seen = [f.read_text() for f in tmp_path.glob("env-*.txt")]
    assert len(seen) == 4  # the check, then the submission, of each job
    for job_env in seen:
        assert not re.search(r"^(OVERRIDES|NPROC_PER_NODE|MASTER_PORT|CONFIG)=", job_env, re.M), job_env
    calls = [f.read_text().splitlines() for f in tmp_path.glob("args-*.txt")]
    assert len(calls) == 4 and all("--export=ALL" in args for args in calls), calls
    arrays = [args for args in calls if "--array=0-1" in args]
    assert len(arrays) == 2 and all("--output=slurm/logs/%x-%A_%a.out" in args for args in arrays), calls
    assert any(re.search(r"^MM_TASK_ARGS=.*target_langs=\[ny\].*\x1e.*target_langs=\[sw\]", job_env, re.M)
               for job_env in seen)


# -- the pipeline as a dependency chain ------------------------------------------------------------------------------
def run_pipeline(cluster: SlurmCluster, out: Path, *args: str, env: dict | None = None) -> dict[str, str]:
    """bash slurm/pipeline.sh ...; returns stage name -> job id (from its `submitted NAME ID` lines)."""
    # every training job asks the GPUs of its plan (pretrain_nproc: 2, the nodes' 2); the others none
    r = cluster.run(["bash", "slurm/pipeline.sh", *args], cwd=ROOT, env={
        **JOB_ENV, "SBATCH_ARGS": f"--output={out}/%x-%j.out", **(env or {})})
    return dict(re.findall(r"^submitted (\S+) (\d+)", r.stdout, re.M))


def pipeline_args(out: Path, *overrides: str) -> list[str]:
    """The smoke pipeline with two target languages, its outputs and runs under `out`."""
    return ["configs/pipeline/smoke.yaml", f"output_dir={out / 'run'}", f"data_dir={out / 'data'}",
            f"tracking.store_dir={out / 'store'}", "target_langs=[ny, sw]", *overrides]


@pytest.mark.slow
def test_real_plan_has_one_array_job_per_method_and_a_failure_cancels_its_dependants(cluster, tmp_path):
    """The plan of a pipeline config with two target languages: each method's adaptation is one array job with a
    task per language (LT-SFT's: one per language, the source's too; lt_sft_vocab's language SFTs, BiStil's
    plugging, phase 1 and phase 2: one each, a task per target language). The data stage fails (a corpus whose
    records lack the text field, found only when it is read): everything after it is cancelled, nothing pends."""
    corpus = tmp_path / "sw.jsonl"
    corpus.write_text('{"body": "habari ya asubuhi"}\n')
    jobs = run_pipeline(cluster, tmp_path, *pipeline_args(
        tmp_path, f"overrides.data=['languages.sw.sources=[{{type: jsonl, path: {corpus}}}]']"))
    smoke = yaml.safe_load((ROOT / "configs/pipeline/smoke.yaml").read_text())
    methods = [parse_method(spec) for spec in smoke["methods"]]
    embedding_methods = [m.name for m in methods if m.learns_embeddings]
    others = {"lt_sft", "lt_sft_vocab", "bistil", "lt_sft_vocab@minijoint", "bistil@minijoint", "bistil@lt_sft"}
    assert {m.name for m in methods} - set(embedding_methods) == others
    adapt_jobs = [name for name in jobs if name.startswith("adapt-")]
    assert adapt_jobs == [f"adapt-{method}" for method in embedding_methods], jobs  # no adapt-<method>-<lang> jobs
    assert sum(name.startswith("plug-") for name in jobs) == 2 * len(embedding_methods)
    assert not [name for name in jobs if name.endswith(("-en", "-ny", "-sw")) and not name.startswith("plug-")], jobs

    data = cluster.wait(jobs["data"], timeout=180)
    assert (data.state, data.exit_code) == ("FAILED", "2:0"), data
    assert f"{corpus}:1: no field 'text'" in job_log(tmp_path, jobs["data"])  # the stage's own message
    for name in adapt_jobs:
        (info,) = cluster.job_info(jobs[name])
        assert info["ArrayTaskId"] == "0-1" and info["JobName"] == name, info
        upstream = "minipost" if name == "adapt-minipost" else "export"  # the stage that made its model
        assert re.findall(r"afterok:(\d+)", info["Dependency"]) == [jobs[upstream], jobs["data"]], info
    (info,) = cluster.job_info(jobs["lang_sft"])
    assert info["ArrayTaskId"] == "0-2" and info["JobName"] == "lang_sft", info  # en, ny, sw
    assert re.findall(r"afterok:(\d+)", info["Dependency"]) == [jobs["export"], jobs["data"]], info
    (info,) = cluster.job_info(jobs["task_sft"])
    assert re.findall(r"afterok:(\d+)", info["Dependency"]) == [jobs["export"], jobs["lang_sft"]], info
    for name, upstream in (("plug_mlm", ["adapt-standard"]), ("lang_sft-lt_sft_vocab", ["plug_mlm", "data"]),
                           ("distill", ["plug_mlm", "export", "data"]),
                           ("distill_task", ["distill", "finetune"]),  # lt_sft_vocab, BiStil
                           # over MiniJoint adaptation's embeddings (a job name with '@')
                           ("plug_mlm-minijoint", ["adapt-minijoint"]),
                           ("lang_sft-lt_sft_vocab@minijoint", ["plug_mlm-minijoint", "data"]),
                           ("distill-bistil@minijoint", ["plug_mlm-minijoint", "export", "data"]),
                           ("distill_task-bistil@minijoint", ["distill-bistil@minijoint", "finetune"]),
                           # over lt_sft's language SFTs: the source language's is a task of the lang_sft job
                           ("distill-bistil@lt_sft", ["lang_sft", "export", "data"]),
                           ("distill_task-bistil@lt_sft", ["distill-bistil@lt_sft", "task_sft"])):
        (info,) = cluster.job_info(jobs[name])
        assert info["ArrayTaskId"] == "0-1" and info["JobName"] == name, info  # ny, sw
        assert re.findall(r"afterok:(\d+)", info["Dependency"]) == [jobs[u] for u in upstream], info
    (info,) = cluster.job_info(jobs["zero_shot-verse_class-bistil"])
    assert re.findall(r"afterok:(\d+)", info["Dependency"]) == [jobs["distill_task"]], info
    for name in jobs:
        if name != "data":
            result = cluster.wait(jobs[name], timeout=60)
            assert result.state == "CANCELLED", (name, result)


@pytest.mark.slow
def test_array_tasks_get_their_languages_arguments_from_the_plan(cluster, tmp_path):
    """The same real plan re-submitted as if the stages before adaptation had finished earlier (PLAN, done): only
    what is left is submitted, and array task i runs the stage with the plan's arguments of language i."""
    plan = subprocess.run([sys.executable, "-m", "minimodel.pipeline", "--plan", "--config",
                           *pipeline_args(tmp_path, "methods=[standard]")], cwd=ROOT, env={**os.environ, **JOB_ENV},
                          capture_output=True, text=True, check=True)
    planned = json.loads(plan.stdout)
    for job in planned["jobs"]:
        job["done"] = job["name"] in ("data", "pretrain", "export")
    (tmp_path / "plan.json").write_text(json.dumps(planned))
    jobs = run_pipeline(cluster, tmp_path, env={"PLAN": str(tmp_path / "plan.json"),  # logs per array task:
                                                "SBATCH_ARGS": f"--output={tmp_path}/%x-%A_%a.out --gpus-per-node=1"})
    assert list(jobs)[0] == "adapt-standard" and not {"data", "pretrain", "export"} & set(jobs), jobs
    result = cluster.wait(jobs["adapt-standard"], timeout=600)
    assert result.state == "FAILED"  # no primary model: the stage's own error, in each task's log
    for task, lang in ((0, "ny"), (1, "sw")):
        log = (tmp_path / f"adapt-standard-{jobs['adapt-standard']}_{task}.out").read_text()
        assert f"array task {task}: target_langs=[{lang}]" in log, log[-3000:]
        assert re.search(rf"deepspeed\.launcher\.runner.* 'adapt/train\.py' .*'target_langs=\[{lang}\]'", log), \
            log[-3000:]


@pytest.mark.slow
def test_pipeline_runs_the_chain_to_the_report(cluster, tmp_path):
    """Then submitted again: every job stamped its finished stage, so only the report (it always runs) goes, and the
    new pipeline run links every run the first one's jobs logged (as the local pipeline does)."""
    args = ["configs/pipeline/smoke.yaml", f"output_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}",
            f"tracking.store_dir={tmp_path / 'store'}", "methods=[standard]"]  # every kind of job; tests/
    jobs = run_pipeline(cluster, tmp_path, *args)  # test_pipeline.py runs all methods
    assert len(jobs) >= 5 and list(jobs)[-1].startswith("report"), jobs
    for name, job in jobs.items():  # in submission order, i.e. the order of the chain
        result = cluster.wait(job, timeout=900)
        assert result.ok, f"{name}: {result}\n{job_log(tmp_path, job)[-4000:]}"
    report_log = job_log(tmp_path, jobs[list(jobs)[-1]])
    written = dict(re.findall(r"^(\w+): (\S+)$", report_log, re.M))  # evaluate/report.py prints kind: path
    assert written and all(Path(path).is_file() for path in written.values()), report_log[-4000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    (first,) = client.search_runs(client.search_experiments()[0].experiment_id, "tags.stage = 'pipeline'")
    children = client.search_runs(first.info.experiment_id, f"tags.`mlflow.parentRunId` = '{first.info.run_id}'")
    first_runs = {r.info.run_id for r in children if r.data.tags["stage"] != "report"}
    assert {r.data.tags["stage"] for r in children} >= {"pretrain", "adapt", "finetune", "evaluate"}, children
    again = run_pipeline(cluster, tmp_path, *args)
    assert list(again) == ["report"], again
    assert cluster.wait(again["report"], timeout=300).ok
    (second,) = [r for r in client.search_runs(first.info.experiment_id, "tags.stage = 'pipeline'")
                 if r.info.run_id != first.info.run_id]
    relinked = client.search_runs(first.info.experiment_id, f"tags.`mlflow.parentRunId` = '{second.info.run_id}'")
    assert {r.data.tags.get(REUSED_RUN_TAG) for r in relinked} - {None} == first_runs  # every job's runs, once


@pytest.mark.slow
def test_adapt_array_task_per_language(cluster, tmp_path):
    """Array task i adapts the i-th language of the config's target_langs (overrides applied); a bad config fails
    the task with the stage's own exit code and message."""
    job = submit(cluster, "adapt.sh", "configs/adapt/default.yaml", "target_langs=[xx, yy]", "over=bogus",
                 out=tmp_path, options=["--array=0-1", f"--output={tmp_path}/%x-%A_%a.out"])
    result = cluster.wait(job, timeout=300)
    assert result.state == "FAILED"
    for task, lang in ((0, "xx"), (1, "yy")):
        log = (tmp_path / f"adapt-{job}_{task}.out").read_text()
        assert f"array task {task}: target_lang={lang}" in log
        assert re.search(rf"deepspeed\.launcher\.runner.* 'adapt/train\.py' .*'target_lang={lang}'", log), log
        assert "config error: over:" in log and "stage exited with code 2" in log
