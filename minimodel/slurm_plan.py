"""A pipeline plan (`python -m minimodel.pipeline --plan`, JSON) as shell-ready lines for slurm/pipeline.sh.

    python -m minimodel.slurm_plan PLAN.json [SQUEUE.txt]

Fields are separated by the ASCII unit separator (\\x1f; a tab would not keep empty fields apart):
    env  NAME=VALUE                          the jobs' environment, one line each, first
    NAME  AFTER  LANGS  TASK_ARGS  STAMPS  SUBMIT  KEYS  QUEUED    one line per job, in dependency order
AFTER: the names of the jobs it waits for (space-separated; jobs already done are left out), LANGS: the languages of
an array job (space-separated; empty for a plain job), TASK_ARGS: each array task's own arguments, shell-quoted,
separated by \\x1e (slurm/common.sh appends task $SLURM_ARRAY_TASK_ID's), STAMPS: the output directory, input
hash and identity hash the job (each array task: separated as TASK_ARGS) stamps when its stage finishes,
shell-quoted (empty: none), SUBMIT: the job's own sbatch options (--nodes: where more than one; --gpus-per-node:
the ranks per node the plan hashed), the sbatch template, its leading arguments and the stage's arguments,
shell-quoted (empty: nothing left to submit), KEYS: the keys of the job (each array task's, comma-separated) for its
--comment, QUEUED: the Slurm jobs (or array tasks, <job>_<task>) of the same keys still in the queue (SQUEUE.txt:
`squeue -h -r -o "%k %F %K"`), colon-separated: not submitted again, and what needs the job waits for them too.
Jobs and array tasks already done are not submitted.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

UNIT, RECORD = "\x1f", "\x1e"
COMMENT = "minimodel:"  # pipeline.sh's jobs: --comment=minimodel:<key>[,<key> per array task]


def lines(plan: dict, queued: dict[str, str] | None = None) -> list[str]:
    """`queued`: {key: Slurm job (an array task: <job>_<task>)} of the jobs still in the queue (queued_jobs): a job or
    array task of a key there is not submitted again; what needs it waits for that one."""
    queued = queued or {}
    out = [f"env{UNIT}{key}={value}" for key, value in plan.get("env", {}).items()]
    done = {job["name"] for job in plan["jobs"] if job["done"]}
    for job in plan["jobs"]:
        if job["done"]:
            continue
        tasks = [task for task in job["array"] if not task["done"]]
        keys = [t.get("key") for t in tasks] if job["array"] else [job.get("key")]
        waiting = [queued[k] for k in keys if k in queued]
        left = [i for i, k in enumerate(keys) if k not in queued]
        tasks = [tasks[i] for i in left] if job["array"] else tasks
        stamps = [t.get("stamp") for t in tasks] if tasks else [job.get("stamp")]
        submit = [*([f"--nodes={job['nodes']}"] if job.get("nodes", 1) > 1 else []),
                  *([f"--gpus-per-node={job['gpus_per_node']}"] if job.get("gpus_per_node") else []),
                  *job["slurm"], *job["args"]] if left else []  # nothing left: every task queued already
        out.append(UNIT.join([
            job["name"], " ".join(a for a in job["after"] if a not in done), " ".join(t["lang"] for t in tasks),
            RECORD.join(shlex.join(t["args"]) for t in tasks), RECORD.join(shlex.join(s or []) for s in stamps),
            shlex.join(submit), ",".join(keys[i] or "" for i in left), ":".join(waiting)]))
    return out


def queued_jobs(squeue: str) -> dict[str, str]:
    """{key: Slurm job} from `squeue -h -r -o "%k %F %K"` (comment, array job id, task index): the keys pipeline.sh
    gave its jobs (`--comment=minimodel:<key>[,<key> per array task]`); other comments are none of ours."""
    found = {}
    for line in squeue.splitlines():
        parts = line.rsplit(" ", 2)
        if len(parts) != 3 or not parts[0].startswith(COMMENT):
            continue
        keys, job, task = parts[0][len(COMMENT):].split(","), parts[1], parts[2]
        index = int(task) if task.isdigit() else 0
        if index < len(keys) and keys[index]:
            found[keys[index]] = f"{job}_{task}" if task.isdigit() else job
    return found


def main(argv: list[str] | None = None) -> None:
    path, *squeue = argv if argv is not None else sys.argv[1:]
    with open(path) as f:
        plan = json.load(f)
    queued = queued_jobs(Path(squeue[0]).read_text()) if squeue else {}
    print("\n".join(lines(plan, queued)))


if __name__ == "__main__":
    main()
