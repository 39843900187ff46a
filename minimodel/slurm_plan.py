"""A pipeline plan (`python -m minimodel.pipeline --plan`, JSON) as shell-ready lines for slurm/pipeline.sh.

    python -m minimodel.slurm_plan PLAN.json

Fields are separated by the ASCII unit separator (\\x1f; a tab would not keep empty fields apart):
    env  NAME=VALUE                          the jobs' environment, one line each, first
    NAME  AFTER  LANGS  TASK_ARGS  STAMPS  SUBMIT  KEY    one line per job to submit, in dependency order
AFTER: the names of the jobs it waits for (space-separated; jobs already done are left out), LANGS: the languages of
an array job (space-separated; empty for a plain job), TASK_ARGS: each array task's own arguments, shell-quoted,
separated by \\x1e (slurm/common.sh appends task $SLURM_ARRAY_TASK_ID's), STAMPS: the output directory, input
hash and identity hash the job (each array task: separated as TASK_ARGS) stamps when its stage finishes,
shell-quoted (empty: none), SUBMIT: the job's own sbatch options (--nodes: where more than one; --gpus-per-node:
the ranks per node the plan hashed, where its result depends on them), the sbatch template, its leading arguments
and the stage's arguments, shell-quoted, KEY: the job's stages at their inputs (a job of that key still in the queue
is not submitted again; empty: no key). Array tasks already done are not submitted.
"""
from __future__ import annotations

import json
import shlex
import sys

UNIT, RECORD = "\x1f", "\x1e"


def lines(plan: dict) -> list[str]:
    out = [f"env{UNIT}{key}={value}" for key, value in plan.get("env", {}).items()]
    done = {job["name"] for job in plan["jobs"] if job["done"]}
    for job in plan["jobs"]:
        if job["done"]:
            continue
        tasks = [task for task in job["array"] if not task["done"]]
        stamps = [t.get("stamp") for t in tasks] if tasks else [job.get("stamp")]
        out.append(UNIT.join([
            job["name"], " ".join(a for a in job["after"] if a not in done), " ".join(t["lang"] for t in tasks),
            RECORD.join(shlex.join(t["args"]) for t in tasks), RECORD.join(shlex.join(s or []) for s in stamps),
            shlex.join([*([f"--nodes={job['nodes']}"] if job.get("nodes", 1) > 1 else []),
                        *([f"--gpus-per-node={job['gpus_per_node']}"] if job.get("gpus_per_node") else []),
                        *job["slurm"], *job["args"]]), job.get("key", "")]))
    return out


def main(argv: list[str] | None = None) -> None:
    (path,) = argv if argv is not None else sys.argv[1:]
    with open(path) as f:
        print("\n".join(lines(json.load(f))))


if __name__ == "__main__":
    main()
