"""Run a pipeline stage as a real process (python / torchrun / deepspeed), skipping it when already done.

A stage is done when its output directory holds `.stage.json` with the same input hash: the hash covers the
command line, the content of every config file it names and the hashes of the stages it depends on. So re-running
a pipeline skips finished stages whose inputs did not change, and redoes a stage (and everything after it) when a
config or an upstream result changed.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from minimodel.files import write_text_atomic

STAMP = ".stage.json"


class StageFailed(RuntimeError):
    pass


@dataclass
class Stage:
    name: str
    argv: list[str]  # the command, e.g. ["torchrun", "--nproc-per-node", "2", "pretrain/train.py", ...]
    output_dir: Path
    after: list["Stage"] = field(default_factory=list)
    run_args: list[str] = field(default_factory=list)  # appended when run, not hashed (e.g. this pipeline's run id)
    run_ids: list[str] = field(default_factory=list)  # the MLflow runs it logged (recorded in the stamp)
    always_run: bool = False  # e.g. the report: it summarises the current pipeline run, so it is never "done"

    @property
    def command(self) -> list[str]:
        return self.argv + self.run_args

    @property
    def input_hash(self) -> str:
        digest = hashlib.sha256(json.dumps(self.argv).encode())
        for arg in self.argv:
            if arg.endswith((".yaml", ".yml", ".json")) and Path(arg).is_file():
                digest.update(Path(arg).read_bytes())
        for upstream in self.after:
            digest.update(upstream.input_hash.encode())
        return digest.hexdigest()

    def stamp(self) -> dict | None:
        path = self.output_dir / STAMP
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def done(self) -> bool:
        stamp = self.stamp()
        return not self.always_run and stamp is not None and stamp.get("input_hash") == self.input_hash

    def run(self, env: dict[str, str], log_dir: Path, find_runs=None) -> float:
        """Run the command (output teed to a log file); write the stamp on success. Returns seconds taken.

        `find_runs(start_time)` -> the ids of the MLflow runs the stage logged, kept in the stamp so that a later
        pipeline run can link to them instead of running the stage again."""
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{self.name}.log"
        print(f"    {shlex.join(self.command)}", flush=True)
        start = time.time()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(line)
            code = proc.wait()
        if code != 0:
            raise StageFailed(f"stage {self.name} failed with exit code {code}; its log: {log_path}")
        seconds = time.time() - start
        self.run_ids = find_runs(start) if find_runs else []
        write_text_atomic(self.output_dir / STAMP, json.dumps({
            "input_hash": self.input_hash, "seconds": seconds, "argv": self.command, "run_ids": self.run_ids}))
        return seconds
