"""What a stage is: its kind (one table: entry point, config, stage function, launcher, Slurm template), the result
every stage function returns, and one stage of a pipeline run as a real process (python / torchrun / deepspeed),
skipped when already done.

A stage is done when its output directory holds `.stage.json` with the same input hash: the hash covers the
command line (its launcher by name), the content of every config file it names, the size and mtime of the inputs
its settings name (a task's train file and data directory, in its config file or on its command line) and of those
it reads without naming them (`watched`: the data stage's corpora and given model), and the hashes of the stages it
depends on. So re-running
a pipeline skips finished stages whose inputs did not change, and redoes a stage (and everything after it) when a
config or an upstream result changed. A stage with layout keys (pretraining: TP/PP sizes, its rank count) is also
done when only those changed: its stamp records its identity hash too (the input hash less its launcher and layout
settings), and the stages after it hash the input hash that its stamp records, so they stay done. Only a stage that
exited 0 (finished) and recorded a finished result of its own config (minimodel/provenance.py) is stamped: one
stopped by a signal after checkpointing exits 75 and runs again, resuming, the next time; a changed config that the
stage refuses (exit 2) names the fix.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from minimodel import distributed, provenance, supervisor, tracking
from minimodel.config import ConfigError, load_config, settings
from minimodel.supervisor import descendants, die_with_parent
from minimodel.files import stat_signature, write_bytes_atomic, write_text_atomic
from minimodel.training.preemption import PREEMPTED_EXIT_CODE, PREEMPTION_SIGNALS, PreemptionSignal

STAMP = ".stage.json"
SETTINGS_SUFFIXES = (".yaml", ".yml", ".json")  # a file of these named on a stage's command line is hashed by content

# -- the result contract -------------------------------------------------------------------------------------------
Status = Literal["finished", "interrupted", "failed"]
# interrupted: stopped by a signal after checkpointing; the same command resumes (Slurm requeues on 75)
EXIT_CODES: dict[str, int] = {"finished": 0, "interrupted": PREEMPTED_EXIT_CODE, "failed": 1}


@dataclass
class StageResult:
    status: Status
    outputs: dict[str, Any] = field(default_factory=dict)  # what the stage made, by name (paths, metrics, ...)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


# -- the kinds of stage --------------------------------------------------------------------------------------------
Launcher = Literal["python", "torchrun", "deepspeed"]


@dataclass(frozen=True)
class StageKind:
    script: str  # the entry point, relative to the repo root
    # "module:name" of its config class and of its stage function (config -> StageResult), imported only by the
    # process that runs the stage (they pull in megatron, DeepSpeed, ...)
    config: str
    function: str
    launcher: Launcher  # what starts its ranks on a node (with one rank, plain python will do locally)
    slurm: tuple[str, ...]  # the sbatch template and the arguments before the stage's own

    def config_class(self) -> type:
        return _import(self.config)

    def stage_function(self):
        return _import(self.function)


def _import(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


KINDS: dict[str, StageKind] = {
    "data": StageKind("pretrain/prepare_data.py", "minimodel.data.prepare:DataConfig",
                      "minimodel.data.prepare:prepare_data", "python", ("slurm/python.sh", "pretrain/prepare_data.py")),
    "word_vectors": StageKind("pretrain/word_vectors.py", "minimodel.ofa.learn:WordVectorConfig",
                              "minimodel.ofa.learn:build_word_vectors", "python",
                              ("slurm/python.sh", "pretrain/word_vectors.py")),
    "pretrain": StageKind("pretrain/train.py", "minimodel.training.config:PretrainConfig",
                          "minimodel.training.pretrain:pretrain", "torchrun", ("slurm/pretrain_minijoint.sh",)),
    "export": StageKind("pretrain/export.py", "minimodel.models.minijoint.export:ExportConfig",
                        "minimodel.models.minijoint.export:run", "python", ("slurm/python.sh", "pretrain/export.py")),
    "minipost": StageKind("pretrain/minipost.py", "minimodel.minipost.train:MiniPostConfig",
                          "minimodel.minipost.train:run_minipost", "deepspeed", ("slurm/minipost.sh",)),
    "adapt": StageKind("adapt/train.py", "minimodel.adaptation.train:AdaptConfig",
                       "minimodel.adaptation.train:run_adaptation", "deepspeed", ("slurm/adapt.sh",)),
    "lang_sft": StageKind("adapt/sft.py", "minimodel.sft.language:LanguageSFTConfig",
                          "minimodel.sft.language:run_language_sft", "deepspeed", ("slurm/adapt.sh", "sft")),
    "distill": StageKind("adapt/distill.py", "minimodel.bistil.distill:DistillConfig",
                         "minimodel.bistil.distill:run_distill", "deepspeed", ("slurm/adapt.sh", "distill")),
    "plug": StageKind("adapt/plug.py", "minimodel.adaptation.plug:PlugConfig", "minimodel.adaptation.plug:plug",
                      "python", ("slurm/python.sh", "adapt/plug.py")),
    "finetune": StageKind("evaluate/finetune.py", "minimodel.evaluation.finetune:FinetuneConfig",
                          "minimodel.evaluation.finetune:finetune", "deepspeed", ("slurm/evaluate.sh", "finetune")),
    "distill_task": StageKind("evaluate/distill_task.py", "minimodel.bistil.task:TaskDistillConfig",
                              "minimodel.bistil.task:distill_task", "deepspeed", ("slurm/evaluate.sh", "distill_task")),
    "zero_shot": StageKind("evaluate/zero_shot.py", "minimodel.evaluation.zero_shot:ZeroShotConfig",
                           "minimodel.evaluation.zero_shot:zero_shot", "python", ("slurm/evaluate.sh", "zero_shot")),
    "report": StageKind("evaluate/report.py", "minimodel.evaluation.report:ReportConfig",
                        "minimodel.evaluation.report:report", "python", ("slurm/evaluate.sh", "report")),
}

# The launchers of this interpreter's environment (works without an activated venv).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed") if (Path(sys.executable).parent / "deepspeed").exists() \
    else "deepspeed"


# -- one stage of a pipeline run -----------------------------------------------------------------------------------
class StageFailed(RuntimeError):
    pass


class StageInterrupted(StageFailed):
    """Stopped by a signal after checkpointing (exit 75): not done, the same command resumes it."""


class StopSignals(PreemptionSignal):
    """While a pipeline runs: SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (Slurm's time-limit warning) are passed to the
    running stage's process group as SIGTERM, every stage's preemption signal (checkpoint, exit 75), and no further
    stage starts; a second signal kills the group. Each stage runs in its own process group (a terminal's Ctrl-C
    reaches the pipeline only, which stops the stage as above) and dies with the pipeline: if the pipeline is killed
    outright, its supervisor (minimodel/supervisor.py) learns it from the kernel (Linux: PR_SET_PDEATHSIG) and stops every
    process under it as a signal would, so no launcher or rank outlives it."""

    SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)

    def __init__(self):
        super().__init__()
        self.stage: subprocess.Popen | None = None  # the running stage's process, the leader of its group
        self.passed = False  # the running stage was told to stop

    def attach(self, proc: subprocess.Popen) -> None:
        """`proc` is the running stage: a signal that came while it was being started stops it now."""
        self.stage, self.passed = proc, False
        if self.received is not None:
            self._pass(self.received, again=False)

    def _record(self, signum, frame) -> None:
        again = self.received is not None
        self.received = signum
        self._pass(signum, again)

    def _pass(self, signum: int, again: bool) -> None:
        if self.stage is not None and self.stage.poll() is None and (again or not self.passed):
            self.passed = True
            print(f"pipeline: {signal.Signals(signum).name}: "
                  f"{'killing' if again else 'stopping (press Ctrl-C again to kill)'} the running stage",
                  file=sys.stderr, flush=True)
            if again:  # ranks in groups of their own (torchrun's) too: a killed launcher cannot stop them
                for pid in descendants(self.stage.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.stage.pid, signal.SIGKILL if again else signal.SIGTERM)


def _die_with_parent() -> None:
    """In the stage's process before exec: SIGTERM when the pipeline dies."""
    die_with_parent(signal.SIGTERM)


@dataclass
class Stage:
    name: str
    kind: str  # a key of KINDS
    args: list[str]  # the entry point's arguments (--config FILE key=value ...)
    output_dir: Path
    after: list["Stage"] = field(default_factory=list)
    nproc: int | None = None  # ranks per node for the kind's launcher; None or 1 (on one node): one python process
    nodes: int = 1  # a batch job's (slurm/pipeline.sh); a local run has one
    # One task of an array job (Slurm): the stages of one `job` share kind, args and dependencies and differ in
    # their `lang` and its `lang_args` only.
    job: str | None = None
    lang: str | None = None
    lang_args: list[str] = field(default_factory=list)
    run_args: list[str] = field(default_factory=list)  # appended when run, not hashed (e.g. this pipeline's run id)
    run_ids: list[str] = field(default_factory=list)  # the MLflow runs it logged (recorded in the stamp)
    always_run: bool = False  # e.g. the report: it summarises the current pipeline run, so it is never "done"
    # files and directories it reads that its command line does not name (the data config's corpora, a given model):
    # a change to any of them (size, mtime) redoes it and, through the hash, every stage after it
    watched: list[str] = field(default_factory=list)
    # config keys that only lay the stage out over ranks (pretraining's TP/PP/...; with any, its rank count too): its
    # result does not depend on them, so a change to them alone neither redoes it nor anything after it
    layout_keys: tuple[str, ...] = ()

    @property
    def launched(self) -> bool:
        """Whether its ranks start under the kind's launcher (torchrun, deepspeed): only for more than one."""
        return self.ranks > 1 and KINDS[self.kind].launcher != "python"

    @property
    def ranks(self) -> int:
        return (self.nproc or 1) * self.nodes

    @property
    def argv(self) -> list[str]:
        """The command, e.g. [python, -m, torch.distributed.run, --nproc-per-node, 2, pretrain/train.py, ...]."""
        kind = KINDS[self.kind]
        if not self.launched:  # a world of one (minimodel/distributed.py): a launcher would only add its start-up
            launcher = [sys.executable]
        elif kind.launcher == "torchrun":
            launcher = [*TORCHRUN, "--nproc-per-node", str(self.nproc)]
        else:
            launcher = [DEEPSPEED, "--num_gpus", str(self.nproc)]
        return [*launcher, kind.script, *self.args, *self.lang_args]

    def check_config(self) -> None:
        """Load and validate its whole config (its file, the pipeline's settings, the user's overrides) as the stage
        will, at the pipeline's start: a bad value (train.steps=0) failed only when its stage started, hours in. A
        check of an input a stage before it makes (not there yet) is left to the stage."""
        if not KINDS[self.kind].config:  # a script of no config class
            return
        config, overrides = _config_and_overrides([*self.args, *self.lang_args])
        try:
            load_config(KINDS[self.kind].config_class(), config, overrides)
        except ConfigError as e:
            value = settings(config, overrides).get(e.key) if e.key else None
            if not (isinstance(value, str) and value and _under(Path(value), self._made_before())):
                raise ConfigError(f"stage {self.name}: {e}", e.key) from None

    def command(self) -> list[str]:
        """argv + run_args, with a free rendezvous port for a multi-rank launcher (not hashed: any port will do, and
        two pipelines on one machine must not share the launchers' default)."""
        argv, kind = self.argv, KINDS[self.kind]
        if self.launched:
            at = argv.index(kind.script)
            flag = "--master-port" if kind.launcher == "torchrun" else "--master_port"
            argv = [*argv[:at], flag, str(distributed.free_port()), *argv[at:]]
        return argv + self.run_args

    @property
    def input_hash(self) -> str:
        return self._hash(False, {})

    @property
    def identity_hash(self) -> str:
        """The input hash less what only lays the stage out (with layout keys: its launcher and rank count, those
        keys on its command line and in its config files)."""
        return self._hash(True, {})

    @property
    def effective_hash(self) -> str:
        """What the stages after it hash: the input hash its stamp records (its earlier run at another layout),
        else its input hash."""
        return self._effective({})

    def _hash(self, identity: bool, memo: dict[int, str]) -> str:
        """input_hash, or with `identity` identity_hash. `memo`: upstream stages' effective hashes by id, for one
        computation only (a stage's stamp changes when it runs)."""
        layout = self.layout_keys if identity else ()
        kind = KINDS[self.kind]
        args = self.argv[self.argv.index(kind.script) + 1:]
        if layout:  # not its rank count either
            args = [a for a in args if not _is_layout(a.partition("=")[0], layout)]
            hashed = [kind.script, *args]
        else:  # its launcher by name, not by path (the same environment at another path or name redoes nothing), and
            # its world size, however laid over nodes
            hashed = [kind.launcher if self.launched else "python", self.ranks, kind.script, *args]
        digest = hashlib.sha256(json.dumps(hashed).encode())
        made = self._made_before()
        read = [path for arg in args if (path := _settings_file(arg, made))]
        for path in read:
            digest.update(_config_bytes(path, layout) if layout else path.read_bytes())
        named = [path for path in self._named_inputs(args, made) if path not in read]  # those: read above
        for path in named:  # a settings file a setting names (a DeepSpeed config of the user's own): by content
            if path.suffix in SETTINGS_SUFFIXES:
                digest.update(path.read_bytes())
        other = [path for path in named if path.suffix not in SETTINGS_SUFFIXES]
        digest.update(json.dumps(stat_signature([*self.watched, *other])).encode())
        for upstream in self.after:
            digest.update(upstream._effective(memo).encode())
        return digest.hexdigest()

    def _named_inputs(self, args: list[str], made: set[Path]) -> list[Path]:
        """What its settings (its config file's, its command line's) name that no stage before it makes, and that a
        change to redoes it: every file (a task's train file, word vectors of the user's own), and a directory a DATA
        setting names (a task's data; one per language for a "{lang}" in it). Not the project's own settings files
        (configs/): versioned with the code."""
        try:
            values = settings(*_config_and_overrides(args))
        except ConfigError:  # the stage names it when it runs
            return []
        named = []
        for key, value in values.items():
            if not isinstance(value, str) or not value:
                continue
            value = os.path.expanduser(value)  # as the stage reads it
            paths = [Path(value)] if "{lang}" not in value else [  # task.hf_dataset=xnli_{lang}: every language's
                Path(p) for p in sorted(glob.glob(glob.escape(value).replace("{lang}", "*")))]
            for path in paths:
                if _under(path, made):
                    continue
                if path.is_dir() and re.sub(r"\[\d+\]", "", key) in _data_keys(self.kind):
                    named.append(path)
                elif path.is_file() and not path.resolve().is_relative_to(provenance.SHIPPED):
                    named.append(path)
        return named

    def _made_before(self) -> set[Path]:
        """The output directories of the stages it depends on, directly or not."""
        made, todo = set(), list(self.after)
        while todo:
            stage = todo.pop()
            if stage.output_dir.absolute() not in made:
                made.add(stage.output_dir.absolute())
                todo.extend(stage.after)
        return made

    def _hashes(self, memo: dict[int, str]) -> tuple[str, str]:
        """(input hash, identity hash): one walk of the stages before it; the same twice without layout keys."""
        input_hash = self._hash(False, memo)
        return input_hash, self._hash(True, memo) if self.layout_keys else input_hash

    def _effective(self, memo: dict[int, str]) -> str:
        if id(self) not in memo:
            input_hash, identity_hash = self._hashes(memo)
            memo[id(self)] = (self.layout_keys and self._stamped_hash(input_hash, identity_hash)) or input_hash
        return memo[id(self)]

    def _stamped_hash(self, input_hash: str, identity_hash: str) -> str | None:
        """The input hash its stamp records if it is done: input_hash, or (a stage with layout keys) that of its
        earlier run at another layout, when the stamp records identity_hash; else None."""
        stamp = None if self.always_run else self.stamp()
        if stamp is None:
            return None
        if stamp.get("input_hash") == input_hash:
            return input_hash
        recorded = stamp.get("identity_hash")  # none in a stamp written before identity hashes: exact match only
        return stamp["input_hash"] if self.layout_keys and recorded and recorded == identity_hash else None

    def stamp(self) -> dict | None:
        path = self.output_dir / STAMP
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def done(self) -> bool:
        return self.done_by() is not None

    def done_by(self, memo: dict[int, str] | None = None) -> Literal["inputs", "layout"] | None:
        """Why it is done: its stamp's inputs are these, or (layout) its earlier run's differ only in how it was laid
        out over ranks (see identity_hash); None: not done. `memo`: shared by one pass over a pipeline's stages
        in which nothing runs."""
        input_hash, identity_hash = self._hashes({} if memo is None else memo)
        stamped = self._stamped_hash(input_hash, identity_hash)
        return None if stamped is None else "inputs" if stamped == input_hash else "layout"

    def run(self, env: dict[str, str], log_dir: Path, find_runs=None, stop: StopSignals | None = None) -> float:
        """Run the command (output teed to `<log_dir>/<name>.log`, after the earlier attempts' output) in its own
        process group; write the stamp if it finished (exit 0). Returns seconds taken; raises StageInterrupted on
        exit 75 or when `stop` (the pipeline's StopSignals) stopped it, StageFailed on any other exit code.

        `find_runs(start_time)` -> the ids of the MLflow runs the stage logged, kept in the stamp so that a later
        pipeline run can link to them instead of running the stage again."""
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{self.name}.log"
        command = self.command()
        input_hash, identity_hash = self._hashes({})  # of the inputs it starts from: not of an edit made meanwhile
        print(f"    {shlex.join(command)}", flush=True)
        start = time.time()
        stop = stop or StopSignals()
        if stop.received is not None:
            raise StageInterrupted(f"stage {self.name} not started: the pipeline was told to stop")
        # what the stamp vouched for may be replaced from here on (another config's run takes the directory over):
        # until this run finishes, no config's result is stamped there, so going back to the old one reruns it
        (self.output_dir / STAMP).unlink(missing_ok=True)
        with open(log_path, "a") as log:  # a rerun keeps the log of the attempt that failed or was stopped
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
            log.flush()
            proc = subprocess.Popen([sys.executable, supervisor.__file__, str(os.getpid()), *command], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True, preexec_fn=_die_with_parent)
            stop.attach(proc)
            try:
                for line in proc.stdout:
                    log.write(line)
                    sys.stdout.write(line)
                code = proc.wait()
            finally:
                stop.stage = None
        if code == PREEMPTED_EXIT_CODE or (code != 0 and stop.received):  # torchrun ends 1 whatever its ranks did
            raise StageInterrupted(f"stage {self.name} interrupted: run the same command again to resume; "
                                   f"its log: {log_path}")
        if code != 0:
            raise StageFailed(f"stage {self.name} failed with exit code {code}; its log: {log_path}")
        seconds = time.time() - start
        self.run_ids = find_runs(start) if find_runs else []
        try:
            write_stamp(self.output_dir, input_hash, command, seconds, self.run_ids, identity_hash)
        except StageFailed as e:
            raise StageFailed(f"stage {self.name} exited 0 but {e}; its log: {log_path}") from None
        return seconds


def _settings_file(arg: str, made: set[Path]) -> Path | None:
    """The settings file a command-line argument names (`--config FILE`'s FILE, or key=FILE), hashed by content; but
    one that a stage it depends on writes (`made`: their output directories): it counts through that stage's hash
    (read here, a plan made before it ran (Slurm's) would hash it otherwise than one made after)."""
    path = Path(arg.partition("=")[2] or arg)
    return path if path.suffix in SETTINGS_SUFFIXES and path.is_file() and not _under(path, made) else None


def snapshot_settings(args: list[str], made: set[Path], directory: Path) -> list[str]:
    """`args` with every settings file its stage's hash reads (_settings_file) replaced by a copy of it in
    `directory`, named by its content (written once, atomically): a job submitted from a plan reads the settings the
    plan hashed, even if the file is edited before the job starts."""
    out = []
    for arg in args:
        path = _settings_file(arg, made)
        if path is None:
            out.append(arg)
            continue
        content = path.read_bytes()
        copy = directory / hashlib.sha256(content).hexdigest()[:16] / path.name
        if not copy.is_file():
            write_bytes_atomic(copy, content)
        key, eq, _ = arg.partition("=")
        out.append(f"{key}={copy}" if eq else str(copy))
    return out


@functools.cache
def _data_keys(kind: str) -> set[str]:
    """The dotted keys of the DATA settings of a kind's config (imported only when a setting names a directory)."""
    return provenance.data_keys(KINDS[kind].config_class()) if KINDS[kind].config else set()


def _config_and_overrides(args: list[str]) -> tuple[str | None, list[str]]:
    """A stage's config file (--config FILE) and key=value overrides, from its arguments."""
    config = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    return config, [a for a in args if "=" in a and not a.startswith("-")]


def _under(path: Path, directories: set[Path]) -> bool:
    return any(d == p for p in (path.absolute(), *path.absolute().parents) for d in directories)


def _is_layout(key: str, layout: tuple[str, ...]) -> bool:
    key = key.strip()
    return any(key == k or key.startswith(f"{k}.") for k in layout)


def _config_bytes(path: Path, layout: tuple[str, ...]) -> bytes:
    """A config file's content less the dotted keys `layout` names (one that does not parse: its bytes, the stage
    names the error)."""
    def strip(value: Any, prefix: str) -> Any:
        if not isinstance(value, dict):
            return value
        return {k: strip(v, f"{prefix}{k}.") for k, v in value.items() if not _is_layout(f"{prefix}{k}", layout)}

    try:
        return json.dumps(strip(yaml.safe_load(path.read_text()), ""), sort_keys=True, default=str).encode()
    except (yaml.YAMLError, UnicodeDecodeError, TypeError):  # TypeError: keys json cannot sort (YAML's `on:`)
        return path.read_bytes()


def write_stamp(output_dir: Path, input_hash: str, argv: list[str], seconds: float, run_ids: list[str],
                identity_hash: str | None) -> None:
    """Mark a stage that exited 0 done for `input_hash` (and, for a stage with layout keys, for `identity_hash`),
    only if its output directory holds a finished result of its config (provenance): an exit 0 alone proves
    nothing."""
    record = provenance.read(output_dir)
    if record is None or record["status"] != "finished":
        raise StageFailed(f"{output_dir} holds no finished result of its config ({provenance.RECORD}): not stamped")
    write_text_atomic(output_dir / STAMP, json.dumps({
        "input_hash": input_hash, "identity_hash": identity_hash, "seconds": seconds, "argv": argv,
        "run_ids": run_ids}))


def jobs(stages: list[Stage], memo: dict[int, str] | None = None, settings_dir: Path | None = None) -> list[dict]:
    """The stages as batch jobs, in run order (slurm/pipeline.sh submits them): the stages of one `job` become one
    job with an array task per language. Each job: name, kind, script, args, slurm (template + leading arguments),
    gpus_per_node (the ranks per node its hash counts, for a launched stage whose result depends on them; None: the
    template's), nodes, array ([{lang, args, done, stamp}], empty for a plain job), after (the names of the jobs it
    needs), done, stamp:
    [output directory, input hash, identity hash] that the job stamps when its stage finishes (slurm/common.sh), so
    that the plan made again skips it; None for a stage that always runs (an array job's are its tasks'), key: its
    stage's output directory and input hash, hashed (an array job's: its tasks'; a job or task of a key still
    queued is not submitted again). `memo`: as
    done_by's, to share the hash walk with the caller's. `settings_dir`: the jobs read copies of the settings files
    their hashes read, kept there (snapshot_settings), not the files themselves."""
    grouped: dict[str, dict] = {}
    job_of: dict[str, str] = {}
    memo = {} if memo is None else memo  # nothing runs meanwhile: each stage's effective hash once
    for stage in stages:
        name = stage.job or stage.name
        job_of[stage.name] = name
        after = list(dict.fromkeys(job_of[a.name] for a in stage.after))
        kind = KINDS[stage.kind]
        args, lang_args = stage.args + stage.run_args + ([] if stage.job else stage.lang_args), stage.lang_args
        if settings_dir is not None:
            made = stage._made_before()
            args, lang_args = (snapshot_settings(a, made, settings_dir) for a in (args, lang_args))
        # the ranks it was planned with: a template's own GPU count would run another global batch under this plan's
        # stamp, or (pretraining, the same result at any count) one its config's global batch does not divide
        gpus = None if kind.launcher == "python" else stage.nproc or 1
        job = grouped.setdefault(name, {"name": name, "kind": stage.kind, "script": kind.script, "args": args,
                                        "slurm": list(kind.slurm), "gpus_per_node": gpus, "nodes": stage.nodes,
                                        "array": [],
                                        "after": after, "done": True})
        if (job["kind"], job["args"], job["after"]) != (stage.kind, args, after):
            raise ValueError(f"stage {stage.name} differs from the other tasks of job {name} in more than its "
                             f"language's arguments")
        input_hash, identity_hash = stage._hashes(memo)
        done = stage._stamped_hash(input_hash, identity_hash) is not None
        stamp = None if stage.always_run else [str(stage.output_dir), input_hash, identity_hash]
        # this stage at these inputs: one still in the queue is not submitted again (slurm/pipeline.sh)
        key = hashlib.sha256(f"{stage.output_dir.absolute()} {input_hash}".encode()).hexdigest()[:16]
        if stage.job:
            job["array"].append({"lang": stage.lang, "args": lang_args, "done": done, "stamp": stamp, "key": key})
        job["stamp"], job["key"] = (None, None) if stage.job else (stamp, key)
        job["done"] = job["done"] and done
    return list(grouped.values())


def main(argv: list[str] | None = None) -> None:
    """`python -m minimodel.stages OUTPUT_DIR INPUT_HASH SECONDS [IDENTITY_HASH]`: slurm/common.sh, after the stage
    of a job that slurm/pipeline.sh submitted from a plan exited 0 (write_stamp)."""
    args = argv if argv is not None else sys.argv[1:]
    output_dir, input_hash, seconds, identity_hash = args if len(args) == 4 else (*args, None)
    job_id = os.environ.get("SLURM_JOB_ID", "?")
    try:
        write_stamp(Path(output_dir), input_hash, [f"slurm job {job_id}"], float(seconds),
                    tracking.runs_of_slurm_job(tracking.TrackingConfig(), job_id), identity_hash)
    except StageFailed as e:
        sys.exit(f"minimodel: {e}")


if __name__ == "__main__":
    main()
