"""The Slurm templates (slurm/*.sh) on a real Slurm: a private two-node cluster on this machine (slurm_cluster.py)
with two fake GPUs per node, so the templates see SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES like on a GPU cluster.

Jobs are submitted from the repo (as a user would: SLURM_SUBMIT_DIR is the checkout) with their logs and outputs
redirected to pytest's temporary folders.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, ensure_packages

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "slurm").glob("*.sh"))
SUBMITTED = [t for t in TEMPLATES if re.search(r"^#SBATCH ", t.read_text(), re.M)]
TRAINING = ["pretrain_minijoint.sh", "minipost.sh", "adapt.sh", "evaluate.sh"]  # these checkpoint + requeue
JOB_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "torch_extensions"), "MLFLOW_TRACKING_URI": ""}


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
           options: list[str] = ()) -> str:
    return cluster.sbatch(ROOT / "slurm" / template if isinstance(template, str) else template, *args, cwd=ROOT,
                          env=JOB_ENV, options=[f"--nodes={nodes}", f"--gpus-per-node={gpus}",
                                                f"--output={out}/%x-%j.out", *options])


def job_log(out: Path, job: str) -> str:
    (log,) = out.glob(f"*-{job}.out")
    return log.read_text(errors="replace")


@pytest.mark.slow
def test_one_node_cluster_starts_runs_a_job_and_stops(tmp_path):
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo hello from $SLURMD_NODENAME'\n")
    with SlurmCluster(tmp_path / "cluster", nodes=1) as one:
        daemons = [p for p in one._procs.values()]
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
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
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
