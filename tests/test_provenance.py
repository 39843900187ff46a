"""minimodel.provenance: a stage's output directory holds a result of *this* config, or the stage says so.

The unit tests drive claim/finish directly; the slow test is the issue's case end to end: an adaptation that ran with
train.steps=4 must not be reported as the result of train.steps=6 (the old code logged "already adapted ...
skipping" and exited 0)."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field

import pytest

from minimodel import provenance
from minimodel.evaluation.tasks import TaskConfig
from minimodel.provenance import (RECORD, ConfigChanged, InputsChanged, NotAnOutputDirectory, claim_output,
                                  finish_output, keep_claim)


@dataclass
class Train:
    steps: int = 4
    lr: float = 0.1


@dataclass
class Cfg:
    output_dir: str = ""
    model: str = ""
    train: Train = field(default_factory=Train)
    tracking: dict = field(default_factory=lambda: {"uri": "a"})
    overwrite: bool = False


def test_same_config_resumes_then_skips_and_neutral_keys_do_not_count(tmp_path):
    out = tmp_path / "run"
    assert claim_output(out, Cfg(str(out)), resumable=True) == "new"
    (out / "checkpoint").write_text("step 2")
    assert claim_output(out, Cfg(str(out)), resumable=True) == "resume"
    finish_output(out, Cfg(str(out)))
    moved = Cfg(str(tmp_path / "elsewhere"), tracking={"uri": "b"}, overwrite=True)
    assert claim_output(out, moved, resumable=True) == "finished"


def test_a_resumed_run_may_checkpoint_and_log_at_other_intervals(tmp_path):
    """After a preemption, checkpointing more often (train.checkpoint.save_every) was refused as another config,
    and the fix the message named (overwrite=true) discarded every checkpoint: how often a run saves, how many
    checkpoints it keeps and how often it prints change nothing it computes."""
    from minimodel.training.config import CheckpointDirConfig, PretrainLoopConfig

    @dataclass
    class Trained:
        output_dir: str = ""
        train: PretrainLoopConfig = field(default_factory=PretrainLoopConfig)

    out = tmp_path / "run"
    assert claim_output(out, Trained(str(out)), resumable=True) == "new"
    loop = PretrainLoopConfig(log_every=1, checkpoint=CheckpointDirConfig(save_every=100, keep_last=5))
    assert claim_output(out, Trained(str(out), loop), resumable=True) == "resume"
    with pytest.raises(ConfigChanged, match="train.steps"):
        claim_output(out, Trained(str(out), PretrainLoopConfig(steps=7)), resumable=True)


def test_another_config_is_refused_naming_the_key_and_the_fix_or_discarded_with_overwrite(tmp_path):
    out = tmp_path / "run"
    claim_output(out, Cfg(), resumable=True)
    (out / "checkpoint").write_text("step 2 of 4")
    finish_output(out, Cfg())
    with pytest.raises(ConfigChanged, match=r"a finished result of another config \(train.steps: 4 -> 6\).*"
                                            r"new output_dir.*overwrite=true"):
        claim_output(out, Cfg(train=Train(steps=6)), resumable=True)
    assert json.loads((out / RECORD).read_text())["config"]["train.steps"] == 4  # refused: nothing changed
    assert claim_output(out, Cfg(train=Train(steps=6)), resumable=True, overwrite=True) == "new"
    assert sorted(p.name for p in out.iterdir()) == [RECORD]  # the old checkpoint is gone


def test_the_number_of_ranks_is_part_of_a_multi_rank_result(tmp_path, monkeypatch):
    """A training stage's global batch is micro-batch x accumulation x ranks: a run finished on one rank is not the
    result of the same config on eight, nor resumed by it. One rank records nothing (records made before stay
    valid)."""
    out = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "1")
    claim_output(out, Cfg(), resumable=True)
    finish_output(out, Cfg())
    assert "world_size" not in json.loads((out / RECORD).read_text())["config"]
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ConfigChanged, match=r"a finished result of another config \(world_size: '\(unset\)' -> 8\)"):
        claim_output(out, Cfg(), resumable=True)
    assert claim_output(out, Cfg(), resumable=True, overwrite=True) == "new"
    finish_output(out, Cfg())
    assert claim_output(out, Cfg(), resumable=True) == "finished"


def test_keys_a_stage_no_longer_counts_leave_its_records_valid(tmp_path, monkeypatch):
    """A stage that makes keys neutral (pretraining: its layout and rank count) takes the runs recorded while they
    counted as its own: the same config runs on at any value of them. The keys it still counts are still refused."""
    out = tmp_path / "run"
    monkeypatch.setenv("WORLD_SIZE", "8")
    claim_output(out, Cfg(), resumable=True)  # recorded when lr and the rank count counted
    assert json.loads((out / RECORD).read_text())["config"]["world_size"] == 8
    neutral = ("train.lr", provenance.RANKS)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert claim_output(out, Cfg(train=Train(lr=0.5)), resumable=True, ignore=neutral) == "resume"
    finish_output(out, Cfg(train=Train(lr=0.5)), neutral)
    assert claim_output(out, Cfg(), resumable=True, ignore=neutral) == "finished"
    with pytest.raises(ConfigChanged, match=r"another config \(train.steps: 4 -> 6\):"):  # nothing else listed
        claim_output(out, Cfg(train=Train(steps=6)), resumable=True, ignore=neutral)


@dataclass
class TrainWithMomentum(Train):
    momentum: float = 0.0  # a setting added later: its default is what the code did before


@dataclass
class CfgWithMethod(Cfg):
    method: str = "bistil"
    train: TrainWithMomentum = field(default_factory=TrainWithMomentum)


@dataclass
class CfgWithEntries(Cfg):
    extra: dict = field(default_factory=lambda: {"a": 1})
    schedule: list = field(default_factory=lambda: ["warmup"])


def test_an_input_a_stage_no_longer_counts_leaves_its_records_valid(tmp_path):
    """A key made neutral (adaptation's init.ofa.* without OFA) drops from an old record's inputs too: a record that
    listed the word vectors' result as an input was refused as another config's, naming "None was made again"."""
    vectors, out = tmp_path / "word_vectors", tmp_path / "adapt"
    claim_output(vectors, Cfg(), resumable=False)
    finish_output(vectors, Cfg())
    cfg = Cfg(model=str(vectors / "vectors.bin"))
    claim_output(out, cfg, resumable=True)
    finish_output(out, cfg)  # written when `model` counted
    assert "model" in provenance.read(out)["inputs"]
    assert claim_output(out, cfg, resumable=True, ignore=("model",)) == "finished"


def test_a_setting_added_since_a_record_was_written_counts_only_away_from_its_default(tmp_path):
    """A config gains a setting (BiStil's `method`): a result recorded before it existed is still of the config that
    leaves the setting at its default (the behaviour it had then), resumed or skipped as before; set to anything
    else, it is another config, named. Entries of a mapping or list absent from the record still count."""
    out = tmp_path / "run"
    claim_output(out, Cfg(), resumable=True)
    (out / "checkpoint").write_text("step 2")
    recorded = json.loads((out / RECORD).read_text())
    assert "method" not in recorded["config"] and "train.momentum" not in recorded["config"]
    assert claim_output(out, CfgWithMethod(), resumable=True) == "resume"
    finish_output(out, CfgWithMethod())
    assert json.loads((out / RECORD).read_text())["digest"] == recorded["digest"]  # what consumers recorded holds
    assert claim_output(out, CfgWithMethod(), resumable=True) == "finished"
    with pytest.raises(ConfigChanged, match=r"another config \(method: 'bistil' -> 'bistil@minijoint'\)"):
        claim_output(out, CfgWithMethod(method="bistil@minijoint"), resumable=True)
    with pytest.raises(ConfigChanged, match=r"another config \(train.momentum: 0.0 -> 0.9\)"):
        claim_output(out, CfgWithMethod(train=TrainWithMomentum(momentum=0.9)), resumable=True)
    before = tmp_path / "before"  # recorded before both
    claim_output(before, Cfg(), resumable=True)
    with pytest.raises(ConfigChanged, match=r"\(extra.a: '\(unset\)' -> 1; schedule\[0\]: '\(unset\)' -> 'warmup'\)"):
        claim_output(before, CfgWithEntries(), resumable=True)


def test_a_partial_run_of_another_config_and_files_without_a_record_are_refused(tmp_path):
    out = tmp_path / "run"
    claim_output(out, Cfg(), resumable=True)
    with pytest.raises(ConfigChanged, match=r"a partial run of another config \(train.lr: 0.1 -> 0.2\)"):
        claim_output(out, Cfg(train=Train(lr=0.2)), resumable=True)


def test_a_directory_no_stage_wrote_is_never_emptied_or_replaced(tmp_path, monkeypatch):
    """overwrite=true discards another config's result, not a user's files: a checkpoint dir pointed at a scratch
    folder lost it whole, and an unset variable (output_dir=$OUT: empty, the working directory) emptied the cwd."""
    scratch = tmp_path / "scratch"
    (scratch / "other_project").mkdir(parents=True)
    (scratch / "other_project" / "results.csv").write_text("data")
    for resumable, overwrite in [(True, False), (True, True), (False, False)]:  # plug/export replace theirs whole
        with pytest.raises(NotAnOutputDirectory, match=r"scratch holds files no minimodel stage wrote.*new or empty"):
            claim_output(scratch, Cfg(), resumable=resumable, overwrite=overwrite)
    assert (scratch / "other_project" / "results.csv").read_text() == "data"
    assert sorted(p.name for p in scratch.iterdir()) == ["other_project"]  # no record written either
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for output_dir, what in [("", "working directory"), (".", "working directory"),
                             ("..", "above the working directory"), (str(tmp_path / "home"), "home directory")]:
        with pytest.raises(NotAnOutputDirectory, match=f"{what}.*name one"):
            claim_output(output_dir, Cfg(), resumable=True, overwrite=True)
    assert list(work.iterdir()) == [] and list((tmp_path / "home").iterdir()) == []
    assert claim_output(work / "run", Cfg(), resumable=True) == "new"  # below it: a directory of its own


def test_a_stage_that_redoes_its_output_honours_a_changed_config(tmp_path):
    out = tmp_path / "export"
    claim_output(out, Cfg(), resumable=False)
    finish_output(out, Cfg())
    assert claim_output(out, Cfg(train=Train(steps=6)), resumable=False) == "new"
    record = provenance.read(out)
    assert record["status"] == "started" and record["config"]["train.steps"] == 6


def test_an_input_made_again_by_another_config_changes_the_result(tmp_path):
    upstream, out = tmp_path / "export", tmp_path / "adapt"
    claim_output(upstream, Cfg(), resumable=False)
    finish_output(upstream, Cfg())
    cfg = Cfg(model=str(upstream / "primary"))  # a path under the upstream's output directory
    claim_output(out, cfg, resumable=True)
    (out / "checkpoint").write_text("x")
    finish_output(out, cfg)
    assert claim_output(out, cfg, resumable=True) == "finished"
    claim_output(upstream, Cfg(train=Train(steps=9)), resumable=False)  # re-exported from another pretraining
    with pytest.raises(ConfigChanged, match="model: .*export/primary was made again"):
        claim_output(out, cfg, resumable=True)
    finish_output(upstream, Cfg(train=Train(steps=9)))
    with pytest.raises(ConfigChanged, match="was made again"):
        claim_output(out, cfg, resumable=True)


def _given_model(directory, weights: bytes) -> str:
    """A model directory no stage made (a user's primary): a config and a weight file."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(weights)
    return str(directory)


def test_a_given_model_replaced_at_the_same_path_is_another_input(tmp_path, monkeypatch):
    """A user's primary has no record: it is named by its weights, so a run made from the old weights is not resumed
    or skipped with the new ones at the same path (the old code recorded the path only, and skipped)."""
    monkeypatch.setattr("minimodel.manifest._SETTLED_NS", 0)  # hashes remembered at once: a rewrite still counts
    out, cfg = tmp_path / "adapt", Cfg(model=_given_model(tmp_path / "xlmr", b"old weights"))
    claim_output(out, cfg, resumable=True)
    (out / "checkpoint").write_text("x")
    finish_output(out, cfg)
    recorded = provenance.read(out)["inputs"]["model"]
    assert recorded.startswith(provenance.GIVEN_MODEL)
    assert claim_output(out, cfg, resumable=True) == "finished"
    _given_model(tmp_path / "xlmr", b"new weights!")  # another size: model_hash's memory does not hold it
    with pytest.raises(ConfigChanged, match=r"model: .*xlmr holds other weights since \([0-9a-f]{12} -> "):
        claim_output(out, cfg, resumable=True)
    assert provenance.read(out)["inputs"]["model"] == recorded  # refused: nothing changed
    assert claim_output(out, cfg, resumable=False) == "new"  # a stage that redoes its output redoes it


def test_a_given_file_replaced_at_the_same_path_is_another_input_and_the_projects_settings_are_none(tmp_path):
    """Word vectors of the user's own (init.ofa.vectors) were recorded by path only: vectors learned again into the
    same file left an OFA adaptation "already adapted"."""
    vectors = tmp_path / "vec.txt"
    vectors.write_text("en:house 0.1 0.2\n")
    out, cfg = tmp_path / "adapt", Cfg(model=str(vectors))
    claim_output(out, cfg, resumable=True)
    finish_output(out, cfg)
    assert provenance.read(out)["inputs"]["model"].startswith(provenance.GIVEN_FILE)
    assert claim_output(out, cfg, resumable=True) == "finished"
    vectors.write_text("en:house 0.3 0.4 0.5\n")
    with pytest.raises(ConfigChanged, match=r"model: .*vec.txt holds other content since \([0-9a-f]{12} -> "):
        claim_output(out, cfg, resumable=True)
    shipped = provenance.SHIPPED / "deepspeed" / "zero2.json"  # versioned with the code
    assert shipped.is_file() and "model" not in provenance.fingerprint(Cfg(model=str(shipped)))["inputs"]


def test_an_input_replaced_while_the_stage_runs_leaves_its_result_unfinished(tmp_path, monkeypatch):
    """finish_output fingerprinted the inputs as they were at the end: a model replaced at its path while the stage
    trained was recorded as the input of a result made from the old one, and a run with the new model skipped it as
    finished."""
    monkeypatch.setattr("minimodel.manifest._SETTLED_NS", 0)
    out, cfg = tmp_path / "adapt", Cfg(model=_given_model(tmp_path / "xlmr", b"old weights"))
    claim_output(out, cfg, resumable=True)
    claimed = provenance.read(out)
    _given_model(tmp_path / "xlmr", b"new weights!")  # replaced while it trains
    with pytest.raises(provenance.InputsChanged, match=r"inputs changed while it ran \(model: .*xlmr holds other "):
        finish_output(out, cfg)
    assert provenance.read(out) == claimed and claimed["status"] == "started"
    with pytest.raises(ConfigChanged, match="a partial run of another config"):  # its checkpoints: the old model's
        claim_output(out, cfg, resumable=True)


def test_a_record_made_before_given_models_had_identities_still_matches(tmp_path):
    out, cfg = tmp_path / "adapt", Cfg(model=_given_model(tmp_path / "xlmr", b"weights"))
    claim_output(out, cfg, resumable=True)
    finish_output(out, cfg)
    record = provenance.read(out)
    (out / RECORD).write_text(json.dumps({**record, "inputs": {}}))  # as the old code wrote it
    assert claim_output(out, cfg, resumable=True) == "finished"
    assert provenance.read(out)["inputs"] == record["inputs"]  # upgraded: the weights named from now on
    (tmp_path / "xlmr" / "config.json").unlink()  # not a model directory any more: not an input
    assert "model" not in provenance.fingerprint(cfg)["inputs"]


@dataclass
class TaskCfg:  # a fine-tuning stage's: its task's data directory is a DATA setting
    task: TaskConfig = field(default_factory=TaskConfig)
    pipeline_dir: str = ""  # a directory but no DATA setting: by path only


def test_a_task_data_directory_replaced_at_the_same_path_is_another_input(tmp_path):
    """A task's release files of the user's own (task.data_dir) were recorded by path only: XNLI files replaced in
    the same directory left a fine-tuned task model "finished", scored on data it was not trained on."""
    data, other = tmp_path / "XNLI-1.0", tmp_path / "runs"
    (data / "sub").mkdir(parents=True)
    (data / "xnli.dev.jsonl").write_text('{"a": 1}\n')
    (data / "sub" / "x.tsv").write_text("b\n")
    other.mkdir()
    out, cfg = tmp_path / "finetune", TaskCfg(TaskConfig(name="xnli", data_dir=str(data)), str(other))
    claim_output(out, cfg, resumable=True)
    finish_output(out, cfg)
    inputs = provenance.read(out)["inputs"]
    assert set(inputs) == {"task.data_dir"} and inputs["task.data_dir"].startswith(provenance.GIVEN_DATA)
    assert claim_output(out, cfg, resumable=True) == "finished"
    (data / "sub" / "x.tsv").write_text("c\n")  # a file under it replaced: the same size, other bytes
    with pytest.raises(ConfigChanged, match=r"task.data_dir: .*XNLI-1.0 holds other files since \([0-9a-f]{12} -> "):
        claim_output(out, cfg, resumable=True)
    (data / "sub" / "x.tsv").write_text("b\n")
    (out / RECORD).write_text(json.dumps({**provenance.read(out), "inputs": {}}))  # as the old code wrote it
    assert claim_output(out, cfg, resumable=True) == "finished"  # the same files: upgraded, named from now on
    assert provenance.read(out)["inputs"] == inputs


@pytest.mark.slow
def test_adapting_again_with_other_steps_is_refused_not_reported_as_the_old_result(tmp_path):
    from adapt_helpers import PYTHON, REPO, launch_env, pretrain_primary_and_mini, prepare_tiny_data

    data_dir = prepare_tiny_data(tmp_path / "data")
    primary, _ = pretrain_primary_and_mini(data_dir, tmp_path / "models", steps=5)
    out = tmp_path / "adapt"

    def adapt(*extra: str) -> subprocess.CompletedProcess:
        args = [f"output_dir={out}", "over=full", f"primary_model={primary}", f"data_dir={data_dir}",
                "target_langs=[sw]", "seq_length=64", "train.micro_batch_size=4", "train.torch_adam=true",
                "train.schedule.warmup_steps=2", "train.eval.every=2", "train.eval.batches=1",
                "train.checkpoint.save_every=2", "tracking.enabled=false", *extra]
        return subprocess.run([str(PYTHON), "adapt/train.py", *args], cwd=REPO, env=launch_env(),
                              capture_output=True, text=True, timeout=600)

    def steps() -> int:
        return json.loads((out / "sw" / "adapt.json").read_text())["steps"]

    first = adapt("train.steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert steps() == 4
    changed = adapt("train.steps=6")
    assert changed.returncode == 2, f"another config's result was accepted:\n{changed.stderr[-3000:]}"
    assert "train.steps: 4 -> 6" in changed.stderr and "overwrite=true" in changed.stderr
    assert steps() == 4
    again = adapt("train.steps=6", "overwrite=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert steps() == 6 and "already adapted" not in again.stderr
    same = adapt("train.steps=6", "overwrite=true")  # overwrite discards another config's result only
    assert same.returncode == 0 and "already adapted with this config" in same.stderr, same.stderr[-3000:]
    assert steps() == 6


@dataclass
class Part:  # one language's settings, as the data stage records them
    vocab_size: int = 100


@dataclass
class Reader:
    output_dir: str = ""
    data: str = ""


def _build_whole(whole, parts: dict[str, int]) -> None:
    """A data-stage-like whole: a record per part (digest: its settings), then the whole's listing them."""
    claim_output(whole, Cfg(), resumable=False)
    digests = {}
    for name, vocab in parts.items():
        (whole / name).mkdir(parents=True, exist_ok=True)
        fp = provenance.part_fingerprint(Part(vocab), f"{name}-{vocab}")
        provenance.write_part(whole / name, fp)
        digests[name] = fp["digest"]
    finish_output(whole, Cfg(), parts=digests)


def test_a_stage_that_read_some_parts_finishes_unless_those_changed_while_it_ran(tmp_path):
    """Adaptation claims its directory reading one part of the data (`uses`) and finishes without naming them: the
    check of the inputs it was claimed with compared the part it read with the whole, and refused a finished run
    (a language the whole's record does not list: copied in by hand)."""
    whole = tmp_path / "data"
    _build_whole(whole, {"en": 100, "sw": 100})
    (whole / "swcopy").mkdir()
    for lang in ("en", "swcopy"):
        reader = Reader(str(tmp_path / f"adapt_{lang}"), str(whole))
        claim_output(reader.output_dir, reader, resumable=True, uses={"data": [lang]})
        finish_output(reader.output_dir, reader)
        assert provenance.read(reader.output_dir)["status"] == "finished"
    reader = Reader(str(tmp_path / "adapt_sw"), str(whole))
    claim_output(reader.output_dir, reader, resumable=True, uses={"data": ["sw"]})
    _build_whole(whole, {"en": 100, "sw": 300})  # the part it reads, made again while it ran
    with pytest.raises(provenance.InputsChanged, match=r"data: .*data/sw was made again since"):
        finish_output(reader.output_dir, reader)


def test_a_whole_made_of_parts_gains_a_part_without_invalidating_what_read_the_others(tmp_path):
    whole = tmp_path / "data"
    _build_whole(whole, {"en": 100})
    of_en = Reader(str(tmp_path / "pretrain"), str(whole / "en" / "train"))  # a path under one part
    of_whole = Reader(str(tmp_path / "finetune"), str(whole))  # the whole directory: the parts it saw
    for cfg in (of_en, of_whole):
        claim_output(cfg.output_dir, cfg, resumable=True)
        finish_output(cfg.output_dir, cfg)
    narrowed = Reader(str(tmp_path / "adapt_en"), str(whole))  # the whole directory, reading en only
    claim_output(narrowed.output_dir, narrowed, resumable=True, uses={"data": ["en"]})
    finish_output(narrowed.output_dir, narrowed)  # keeps what was claimed
    assert provenance.read(narrowed.output_dir)["inputs"]["data"] == {"parts": {"en": "en-100"}}
    digests = {cfg.output_dir: provenance.read(cfg.output_dir)["digest"] for cfg in (of_en, of_whole, narrowed)}

    _build_whole(whole, {"en": 100, "sw": 100})  # a language added
    assert claim_output(of_en.output_dir, of_en, resumable=True) == "finished"
    assert claim_output(of_whole.output_dir, of_whole, resumable=True) == "finished"
    assert claim_output(narrowed.output_dir, narrowed, resumable=True, uses={"data": ["en"]}) == "finished"
    for cfg in (of_en, of_whole, narrowed):  # left alone: what was made from them stays valid too
        finish_output(cfg.output_dir, cfg)
        assert provenance.read(cfg.output_dir)["digest"] == digests[cfg.output_dir]

    _build_whole(whole, {"en": 100, "sw": 200})  # sw's data changed: en's readers are not concerned
    assert claim_output(of_en.output_dir, of_en, resumable=True) == "finished"
    assert claim_output(narrowed.output_dir, narrowed, resumable=True, uses={"data": ["en"]}) == "finished"
    assert claim_output(of_whole.output_dir, of_whole, resumable=True) == "finished"  # it saw en only

    _build_whole(whole, {"en": 300, "sw": 200})  # en's data changed: every reader of en refuses, naming the key
    for cfg, uses in ((of_en, None), (of_whole, None), (narrowed, {"data": ["en"]})):
        with pytest.raises(ConfigChanged, match=r"data: .*data/en(/train)? was made again since "
                                                r"\(vocab_size: 100 -> 300\).*overwrite=true"):
            claim_output(cfg.output_dir, cfg, resumable=True, uses=uses)
    redone = Reader(str(tmp_path / "export"), of_en.data)  # a stage that redoes its output: "new", a new digest
    claim_output(redone.output_dir, redone, resumable=False)
    finish_output(redone.output_dir, redone)
    before = provenance.read(redone.output_dir)["digest"]
    _build_whole(whole, {"en": 400, "sw": 200})
    assert claim_output(redone.output_dir, redone, resumable=False) == "new"
    finish_output(redone.output_dir, redone)
    assert provenance.read(redone.output_dir)["digest"] != before


def test_a_record_made_before_part_records_still_matches_while_the_whole_is_unchanged(tmp_path):
    whole = tmp_path / "data"
    claim_output(whole, Cfg(), resumable=False)
    finish_output(whole, Cfg())  # a whole without parts: its readers record its digest
    readers = [Reader(str(tmp_path / name), str(whole / "en" / "train")) for name in ("pretrain", "minipost")]
    adapt = Reader(str(tmp_path / "adapt"), str(whole))  # reads the whole directory's en
    for reader in (*readers, adapt):
        claim_output(reader.output_dir, reader, resumable=True)
        finish_output(reader.output_dir, reader)
    old = provenance.read(readers[0].output_dir)
    assert old["inputs"]["data"] == provenance.read(whole)["digest"]

    (whole / "en").mkdir()  # the same config built again, now with part records
    provenance.write_part(whole / "en", provenance.part_fingerprint(Part(), "en-100"))
    finish_output(whole, Cfg(), parts={"en": "en-100"})
    assert claim_output(readers[0].output_dir, readers[0], resumable=True) == "finished"
    upgraded = provenance.read(readers[0].output_dir)
    assert upgraded["inputs"]["data"] == "en-100" and upgraded["digest"] == old["digest"]
    assert claim_output(adapt.output_dir, adapt, resumable=True, uses={"data": ["en"]}) == "finished"
    assert provenance.read(adapt.output_dir)["inputs"]["data"] == {"parts": {"en": "en-100"}}

    claim_output(whole, Cfg(train=Train(steps=5)), resumable=False)  # the whole of another config
    provenance.write_part(whole / "en", provenance.part_fingerprint(Part(), "en-other"))
    finish_output(whole, Cfg(train=Train(steps=5)), parts={"en": "en-other"})
    for reader in readers:  # the upgraded record and the one still naming the old whole
        with pytest.raises(ConfigChanged, match="was made again"):
            claim_output(reader.output_dir, reader, resumable=True)


def test_a_directory_replaced_whole_keeps_its_claim_until_it_is_finished(tmp_path):
    """plug replaces its output directory whole, then finishes it: cut short between the two (killed, or its input
    made again meanwhile: InputsChanged, "run it again"), the directory held no record, and every rerun was refused
    as a directory no stage wrote."""
    from minimodel.files import replace_dir

    upstream, out = tmp_path / "adapt", tmp_path / "plugged"
    claim_output(upstream, Cfg(), resumable=False)
    finish_output(upstream, Cfg())
    cfg = Cfg(model=str(upstream))
    assert claim_output(out, cfg, resumable=False) == "new"
    tmp = tmp_path / ".plugged.partial"
    tmp.mkdir()
    (tmp / "model.safetensors").write_text("weights")
    keep_claim(out, tmp)
    replace_dir(tmp, out)
    claim_output(upstream, Cfg(train=Train(steps=6)), resumable=False)  # the adaptation made again meanwhile
    finish_output(upstream, Cfg(train=Train(steps=6)))
    with pytest.raises(InputsChanged):
        finish_output(out, cfg)
    assert provenance.read(out)["status"] == "started"
    assert claim_output(out, cfg, resumable=False) == "new"  # the rerun redoes it


def test_a_result_known_by_its_content_keeps_the_consumers_of_its_earlier_record(tmp_path):
    """Word vectors recorded before content identities, skipped as up to date by the new code, got their content
    hash: every finished consumer (which recorded the config digest) was refused, the vectors byte for byte the
    same. Made again under the same config (a corpus edited in place), the record said finished with the old hash
    while the new file was being written."""
    vectors, out = tmp_path / "word_vectors", tmp_path / "adapt"
    claim_output(vectors, Cfg(), resumable=False)
    (vectors / "vectors.bin").write_text("learned")
    finish_output(vectors, Cfg())  # as an earlier version recorded it: by its config's digest
    cfg = Cfg(model=str(vectors / "vectors.bin"))
    claim_output(out, cfg, resumable=True)
    finish_output(out, cfg)
    provenance._claimed.clear()  # a later process
    assert claim_output(vectors, Cfg(), resumable=False) == "finished"
    finish_output(vectors, Cfg(), content="sha of learned")  # up to date: nothing learned again
    assert claim_output(out, cfg, resumable=True) == "finished"
    assert provenance.read(out)["inputs"]["model"] == "sha of learned"  # the consumer now records the content
    provenance.reopen_output(vectors, "made again from the same config: its corpora changed")
    assert provenance.identity(vectors / "vectors.bin") == "unfinished"  # while the new file is written
    finish_output(vectors, Cfg(), content="sha of relearned")
    with pytest.raises(ConfigChanged, match="was made again since \\(made again from the same config: its corpora"):
        claim_output(out, cfg, resumable=True)
