"""Methods as entries (minimodel/methods.py): specs, their validation in every config that names a method, and the
pipeline's stages per configured method."""
import json
import re

import pytest
from pipeline_helpers import SMOKE

from minimodel.adaptation.train import AdaptConfig
from minimodel.config import ConfigError, load_config
from minimodel.evaluation.report import ReportConfig
from minimodel.evaluation.zero_shot import ZeroShotConfig
from minimodel.methods import MODELS, Method, parse_method
from minimodel.pipeline import PipelineConfig, build_stages
from minimodel.sft.language import LanguageSFTConfig
from minimodel.stages import jobs


def test_a_spec_names_the_model_and_the_initialisation():
    assert parse_method("minipost") == Method("minipost") and parse_method("minipost").name == "minipost"
    spec = parse_method("minijoint+copy_shared")
    assert spec == Method("minijoint", "copy_shared") and spec.name == "minijoint+copy_shared"
    assert spec.adapt_overrides() == ["method=minijoint+copy_shared", "over=mini", "init.method=copy_shared"]
    assert parse_method("standard").adapt_overrides() == ["method=standard", "over=full"]
    assert parse_method("minipost+ofa").adapt_overrides() == ["method=minipost+ofa", "over=mini", "init.method=ofa"]
    for bad in ("minipst", "minipost+", "minipost+aligned_vectors", "standard+copy_shared+random", ""):
        with pytest.raises(ConfigError, match=r"methods\[2\]: unknown method .*standard, minijoint, minipost"):
            parse_method(bad, "methods[2]")


def test_every_config_naming_a_method_refuses_an_unknown_one():
    with pytest.raises(ConfigError, match=r"methods\[1\]: unknown method 'minipst'"):
        load_config(PipelineConfig, SMOKE, ["methods=[standard, minipst]"])
    with pytest.raises(ConfigError, match="keep 'standard'"):
        load_config(PipelineConfig, SMOKE, ["methods=[minipost, minipost+copy_shared]"])
    with pytest.raises(ConfigError, match="each method once"):
        load_config(PipelineConfig, SMOKE, ["methods=[standard, minipost, minipost]"])
    with pytest.raises(ConfigError, match="method: unknown method 'mini'"):
        load_config(ZeroShotConfig, overrides=["method=mini", "source_model_dir=m", "task.data_dir=d"])
    with pytest.raises(ConfigError, match=r"methods\[0\]: unknown method"):
        load_config(ReportConfig, overrides=["methods=[full]"])
    with pytest.raises(ConfigError, match="reference_method: 'standard' is not one of methods"):
        load_config(ReportConfig, overrides=["methods=[minipost]"])


def test_adaptation_checks_its_method_against_its_settings():
    base = ["primary_model=p", "mini_model=m"]
    cfg = load_config(AdaptConfig, overrides=[*base, "method=minipost+copy_shared", "init.method=copy_shared"])
    assert cfg.method == "minipost+copy_shared"
    with pytest.raises(ConfigError, match="over: method standard adapts over=full, not over=mini"):
        load_config(AdaptConfig, overrides=[*base, "method=standard", "over=mini"])
    with pytest.raises(ConfigError, match="init.method: method minipost\\+copy_shared initialises with copy_shared"):
        load_config(AdaptConfig, overrides=[*base, "method=minipost+copy_shared", "init.method=random"])


def test_pipeline_runs_a_method_and_its_variant_side_by_side():
    cfg = load_config(PipelineConfig, SMOKE, ["methods=[standard, minipost, minipost+copy_shared]",
                                              "target_langs=[ny, sw]"])
    stages = {s.name: s for s in build_stages(cfg)}
    assert "minijoint" not in " ".join(stages)  # no method of it configured
    variant = stages["adapt-minipost+copy_shared-sw"]
    assert {"method=minipost+copy_shared", "over=mini", "init.method=copy_shared"} <= set(variant.argv)
    assert f"mini_model={cfg.output_dir}/minipost/mini" in variant.argv
    assert f"output_dir={cfg.output_dir}/adapt/minipost+copy_shared" in variant.argv
    assert [a.name for a in variant.after] == ["minipost", "data"]
    assert "init.method=copy_shared" not in stages["adapt-minipost-sw"].argv
    assert "over=full" in stages["adapt-standard-ny"].argv and not any(
        a.startswith("mini_model=") for a in stages["adapt-standard-ny"].argv)
    # verse_class reads each target through the task model with its embeddings plugged in; target_mlm scores the
    # adapted masked LM itself
    for task, waits_for in (("verse_class", "plug"), ("target_mlm", "adapt")):
        zero_shot = stages[f"zero_shot-{task}-minipost+copy_shared"]
        assert "method=minipost+copy_shared" in zero_shot.argv
        after = [a.name for a in zero_shot.after]
        assert after == [f"{waits_for}-minipost+copy_shared-ny", f"{waits_for}-minipost+copy_shared-sw"]
    assert "methods=[standard, minipost, minipost+copy_shared]" in stages["report"].argv


def test_none_is_the_unadapted_baseline_and_no_setting_adapts_it():
    none = parse_method("none")
    assert none == Method("none") and not none.adapted and parse_method("minipost+ofa").adapted
    with pytest.raises(ConfigError, match="method none learns no new embeddings, so it has no embedding initialisation"):
        parse_method("none+ofa")
    with pytest.raises(ConfigError, match="methods: none .* is evaluated on every pipeline without being listed"):
        load_config(PipelineConfig, SMOKE, ["methods=[standard, none]"])
    with pytest.raises(ConfigError, match=r"methods\[1\]: 'none' is the unadapted baseline, not an adaptation"):
        load_config(ReportConfig, overrides=["methods=[standard, none]"])
    with pytest.raises(ConfigError, match="reference_method: 'none' is the unadapted baseline"):
        load_config(ReportConfig, overrides=["reference_method=none"])


def test_pipeline_evaluates_the_unadapted_primary_on_each_task_that_compares_tokenizers():
    """Method none on every zero-shot task whose metric compares tokenizers: verse_class with the task model as
    fine-tuned, verse_retrieval with the primary, each target only a language (read with the model's own
    tokenizer); not target_mlm; no adaptation or plugging for it; the report waits for it."""
    retrieval = "configs/evaluate/zero_shot/verse_retrieval_tiny.yaml"
    cfg = load_config(PipelineConfig, SMOKE, ["target_langs=[ny, sw]", f"configs.zero_shot=[{retrieval}, "
                      "configs/evaluate/zero_shot/verse_class_tiny.yaml, configs/evaluate/zero_shot/target_mlm_tiny.yaml]"])
    stages = {s.name: s for s in build_stages(cfg)}
    unadapted = {name for name in stages if "none" in name}
    assert unadapted == {"zero_shot-verse_class-none", "zero_shot-verse_retrieval-none"}
    out = cfg.output_dir
    classes, retrieval = stages["zero_shot-verse_class-none"], stages["zero_shot-verse_retrieval-none"]
    assert {"method=none", f"source_model_dir={out}/finetune/model", "targets=[{lang: ny}, {lang: sw}]",
            f"output_dir={out}/zero_shot/verse_class/none"} <= set(classes.argv)
    assert [a.name for a in classes.after] == ["finetune"]
    assert {"method=none", f"source_model_dir={out}/export/primary", "targets=[{lang: ny}, {lang: sw}]"} <= set(
        retrieval.argv)
    assert [a.name for a in retrieval.after] == ["export"]
    assert unadapted <= {a.name for a in stages["report"].after}
    assert classes.args[0] == "--config"  # the stage's arguments make a valid zero-shot config of method none
    parsed = load_config(ZeroShotConfig, classes.args[1], classes.args[2:])
    assert parsed.method == "none" and [(t.lang, t.model_dir, t.embeddings) for t in parsed.targets] == [
        ("ny", "", None), ("sw", "", None)]


def test_lt_sft_is_an_entry_language_sfts_a_task_sft_and_zero_shot_swapping_them():
    """Method lt_sft: one array job of language SFTs (the source language's and each target's) over the primary,
    the task SFT trained with the source's applied, zero-shot with each target's SFT on every task whose metric
    compares tokenizers (not target_mlm); no plugging; the report waits for it. adapt/train.py refuses it."""
    retrieval = "configs/evaluate/zero_shot/verse_retrieval_tiny.yaml"
    cfg = load_config(PipelineConfig, SMOKE, ["target_langs=[ny, sw]", "methods=[standard, lt_sft]",
                                              f"configs.zero_shot=[{retrieval}, configs/evaluate/zero_shot/"
                                              "verse_class_tiny.yaml, configs/evaluate/zero_shot/target_mlm_tiny.yaml]",
                                              "seed=3"])
    stages = {s.name: s for s in build_stages(cfg)}
    out, sfts = cfg.output_dir, f"{cfg.output_dir}/adapt/lt_sft"
    lang_sfts = [s for s in stages.values() if s.kind == "lang_sft"]
    assert [(s.name, s.lang, s.job) for s in lang_sfts] == [
        ("lang_sft-en", "en", "lang_sft"), ("lang_sft-ny", "ny", "lang_sft"), ("lang_sft-sw", "sw", "lang_sft")]
    assert {"--config", "configs/sft/tiny.yaml", f"primary_model={out}/export/primary", f"output_dir={sfts}",
            "data_seed=3", "train.seed=3", "target_langs=[ny]"} <= set(stages["lang_sft-ny"].argv)
    task_sft = stages["task_sft"]
    assert task_sft.kind == "finetune" and [a.name for a in task_sft.after] == ["export", "lang_sft-en"]
    assert {"configs/evaluate/finetune/verse_class_sft_tiny.yaml", "sparse=true", "method=lt_sft",
            f"language_sft={sfts}/en/sft", f"output_dir={out}/task_sft", "train.seed=3"} <= set(task_sft.argv)
    targets = f"targets=[{{lang: ny, language_sft: {sfts}/ny/sft}}, {{lang: sw, language_sft: {sfts}/sw/sft}}]"
    classes, found = stages["zero_shot-verse_class-lt_sft"], stages["zero_shot-verse_retrieval-lt_sft"]
    assert {f"source_model_dir={out}/task_sft/model", targets} <= set(classes.argv)
    assert [a.name for a in classes.after] == ["task_sft", "lang_sft-ny", "lang_sft-sw"]
    assert {f"source_model_dir={out}/export/primary", targets} <= set(found.argv)
    assert "zero_shot-target_mlm-lt_sft" not in stages and not any(n.startswith("plug-lt_sft") for n in stages)
    assert {"zero_shot-verse_class-lt_sft", "zero_shot-verse_retrieval-lt_sft"} <= {a.name for a in stages["report"].after}
    parsed = load_config(ZeroShotConfig, classes.args[1], classes.args[2:])  # a valid zero-shot config of lt_sft
    assert [(t.lang, t.language_sft) for t in parsed.targets] == [("ny", f"{sfts}/ny/sft"), ("sw", f"{sfts}/sw/sft")]
    # Slurm: one array job of language SFTs, a task per language
    job = next(j for j in jobs(list(stages.values())) if j["name"] == "lang_sft")
    assert job["slurm"] == ["slurm/adapt.sh", "sft"] and [t["lang"] for t in job["array"]] == ["en", "ny", "sw"]
    with pytest.raises(ConfigError, match="method: lt_sft learns no embeddings: its language fine-tunings are "
                                          "trained by adapt/sft.py"):
        load_config(AdaptConfig, overrides=["method=lt_sft", "primary_model=p", "over=full"])
    with pytest.raises(ConfigError, match="lt_sft learns no new embeddings, so it has no embedding initialisation"):
        parse_method("lt_sft+ofa")


def test_lt_sft_vocab_is_an_entry_a_language_sft_of_the_plugged_model_composed_with_lt_sfts_task_sft(tmp_path):
    """Method lt_sft_vocab without lt_sft: standard adaptation's embeddings plugged into the primary masked LM
    (BiStil's plug_mlm stage, made once even with both methods), a language SFT of that plugged model per target
    language (one array job), the source language's SFT of the primary and the task SFT as for lt_sft, zero-shot of
    each target through its plugged model + its SFT on every task whose metric compares tokenizers."""
    retrieval = "configs/evaluate/zero_shot/verse_retrieval_tiny.yaml"
    tasks = [retrieval, *(f"configs/evaluate/zero_shot/{t}_tiny.yaml" for t in ("verse_class", "target_mlm"))]
    cfg = load_config(PipelineConfig, SMOKE, ["target_langs=[ny, sw]", "methods=[standard, lt_sft_vocab]", "seed=4",
                                              f"configs.zero_shot=[{', '.join(tasks)}]"])
    stages = {s.name: s for s in build_stages(cfg)}
    out, sfts = cfg.output_dir, f"{cfg.output_dir}/adapt/lt_sft_vocab"
    assert [a.name for a in stages["plug_mlm-sw"].after] == ["adapt-standard-sw"]
    lang_sft = stages["lang_sft-lt_sft_vocab-sw"]
    assert lang_sft.kind == "lang_sft" and [a.name for a in lang_sft.after] == ["plug_mlm-sw", "data"]
    assert {"configs/sft/tiny.yaml", "method=lt_sft_vocab", f"output_dir={sfts}", f"primary_model={out}/plugged_mlm/sw",
            "target_langs=[sw]", "data_seed=4", "train.seed=4"} <= set(lang_sft.argv)
    source = stages["lang_sft-en"]  # the source language's SFT of the primary, filed under lt_sft: the task SFT's
    assert {"method=lt_sft", f"primary_model={out}/export/primary", "target_langs=[en]"} <= set(source.argv)
    assert not {"lang_sft-ny", "lang_sft-sw", "zero_shot-verse_class-lt_sft"} & set(stages)  # lt_sft is not listed
    assert [a.name for a in stages["task_sft"].after] == ["export", "lang_sft-en"]
    targets = (f"targets=[{{lang: ny, language_sft: {sfts}/ny/sft, model_dir: {out}/plugged_mlm/ny}}, "
               f"{{lang: sw, language_sft: {sfts}/sw/sft, model_dir: {out}/plugged_mlm/sw}}]")
    classes, found = stages["zero_shot-verse_class-lt_sft_vocab"], stages["zero_shot-verse_retrieval-lt_sft_vocab"]
    assert {f"source_model_dir={out}/task_sft/model", targets} <= set(classes.argv)
    assert [a.name for a in classes.after] == ["task_sft", "lang_sft-lt_sft_vocab-ny", "lang_sft-lt_sft_vocab-sw"]
    assert {f"source_model_dir={out}/export/primary", targets} <= set(found.argv)
    assert "zero_shot-target_mlm-lt_sft_vocab" not in stages
    parsed = load_config(ZeroShotConfig, classes.args[1], classes.args[2:])  # a valid zero-shot config of the method
    assert [(t.lang, t.language_sft, t.model_dir) for t in parsed.targets] == [
        (lang, f"{sfts}/{lang}/sft", f"{out}/plugged_mlm/{lang}") for lang in ("ny", "sw")]
    planned = {j["name"]: j for j in jobs(list(stages.values()))}
    assert planned["lang_sft-lt_sft_vocab"]["after"] == ["plug_mlm", "data"]
    assert [t["lang"] for t in planned["lang_sft-lt_sft_vocab"]["array"]] == ["ny", "sw"]
    assert planned["lang_sft-lt_sft_vocab"]["slurm"] == ["slurm/adapt.sh", "sft"]
    both = build_stages(load_config(PipelineConfig, SMOKE, ["methods=[standard, lt_sft, lt_sft_vocab, bistil]"]))
    assert [s.name for s in both].count("plug_mlm-ny") == 1 and [s.name for s in both].count("lang_sft-en") == 1
    with pytest.raises(ConfigError, match="lt_sft_vocab learns no new embeddings, so it has no embedding init"):
        parse_method("lt_sft_vocab+ofa")
    with pytest.raises(ConfigError, match=r"targets\[0\]: method lt_sft_vocab reads each target with the plugged"):
        load_config(ZeroShotConfig, overrides=["method=lt_sft_vocab", "source_model_dir=m", "task.name=verse_class",
                                               "task.data_dir=d", "targets=[{lang: sw, language_sft: s}]"])
    with pytest.raises(ConfigError, match="method: standard learns no language SFT"):
        load_config(LanguageSFTConfig, overrides=["primary_model=p", "method=standard"])
    with pytest.raises(ConfigError, match="primary_model: p has no plug.json: method lt_sft_vocab learns its SFT over"):
        load_config(LanguageSFTConfig, overrides=["primary_model=p", "method=lt_sft_vocab"])
    plugged = tmp_path / "plugged_mlm_ny"  # Chichewa's plugged model: refused for Swahili, before any compute
    plugged.mkdir()
    (plugged / "plug.json").write_text(json.dumps({"target_lang": "ny", "method": "standard"}))
    load_config(LanguageSFTConfig, overrides=[f"primary_model={plugged}", "method=lt_sft_vocab", "target_langs=[ny]"])
    with pytest.raises(ConfigError, match=r"primary_model: .* holds the embeddings of ny, not of sw: run each"):
        load_config(LanguageSFTConfig, overrides=[f"primary_model={plugged}", "method=lt_sft_vocab",
                                                  "target_langs=[ny, sw]"])
    load_config(LanguageSFTConfig, overrides=[f"primary_model={plugged}", "method=lt_sft_vocab",  # an array task
                                              "target_langs=[ny, sw]", "target_lang=ny"])
    # by default every method that builds on another's embeddings builds on standard adaptation's (plugged_mlm/<lang>)
    assert {m.builds_on for m in MODELS.values()} - {None} == {"standard"}


def test_bistil_is_an_entry_plugged_teachers_two_distillation_phases_and_zero_shot_of_each_student():
    """Method bistil: standard adaptation's embeddings plugged into the primary masked LM (phase 1's target teacher),
    phase 1 and phase 2 per target language, each an array job like the adaptations; zero-shot of each language's
    student task model with its target tokenizer, on fine-tuned tasks only (not target_mlm, not retrieval); the
    report waits for it. No +<init>, no adapt/train.py run."""
    retrieval = "configs/evaluate/zero_shot/verse_retrieval_tiny.yaml"
    tasks = [retrieval, *(f"configs/evaluate/zero_shot/{t}_tiny.yaml" for t in ("verse_class", "target_mlm"))]
    cfg = load_config(PipelineConfig, SMOKE, ["target_langs=[ny, sw]", "methods=[standard, bistil]", "seed=5",
                                              f"configs.zero_shot=[{', '.join(tasks)}]"])
    stages = {s.name: s for s in build_stages(cfg)}
    out = cfg.output_dir
    plug = stages["plug_mlm-sw"]
    assert plug.kind == "plug" and [a.name for a in plug.after] == ["adapt-standard-sw"]
    assert {f"model={out}/export/primary", f"primary_model={out}/export/primary",
            f"embeddings={out}/adapt/standard/sw", f"output_dir={out}/plugged_mlm/sw"} <= set(plug.argv)
    distill = stages["distill-sw"]
    assert [a.name for a in distill.after] == ["plug_mlm-sw", "export", "data"]
    assert str(distill.output_dir) == f"{out}/adapt/bistil/sw"
    assert {"configs/distill/tiny.yaml", f"teacher_model={out}/export/primary", f"output_dir={out}/adapt/bistil",
            "target_langs=[sw]", f"target_teacher_model={out}/plugged_mlm/sw", "data_seed=5", "student.seed=5",
            "train.seed=5"} <= set(distill.argv)
    task = stages["distill_task-sw"]
    assert [a.name for a in task.after] == ["distill-sw", "finetune"]
    assert {"configs/distill/task_tiny.yaml", f"teacher={out}/finetune/model", f"student={out}/adapt/bistil/sw/student",
            f"output_dir={out}/distill_task/sw", "train.seed=5"} <= set(task.argv)
    classes = stages["zero_shot-verse_class-bistil"]
    assert [a.name for a in classes.after] == ["distill_task-ny", "distill_task-sw"]
    assert {"method=bistil", "evaluate_source=false", f"source_model_dir={out}/distill_task/ny/model"} <= set(
        classes.argv)
    assert not {"zero_shot-target_mlm-bistil", "zero_shot-verse_retrieval-bistil"} & set(stages)
    assert "zero_shot-verse_class-bistil" in {a.name for a in stages["report"].after}
    parsed = load_config(ZeroShotConfig, classes.args[1], classes.args[2:])  # a valid zero-shot config of bistil
    assert [(t.lang, t.model_dir, t.tokenizer) for t in parsed.targets] == [
        (lang, f"{out}/distill_task/{lang}/model", f"{out}/distill_task/{lang}/model/target_tokenizer")
        for lang in ("ny", "sw")]
    # Slurm: the plugging and both phases one array job each, a task per target language
    planned = {j["name"]: j for j in jobs(list(stages.values()))}
    for name, slurm, after in (("plug_mlm", ["slurm/python.sh", "adapt/plug.py"], ["adapt-standard"]),
                               ("distill", ["slurm/adapt.sh", "distill"], ["plug_mlm", "export", "data"]),
                               ("distill_task", ["slurm/evaluate.sh", "distill_task"], ["distill", "finetune"])):
        assert planned[name]["slurm"] == slurm and planned[name]["after"] == after, planned[name]
        assert [t["lang"] for t in planned[name]["array"]] == ["ny", "sw"]
    assert planned["zero_shot-verse_class-bistil"]["after"] == ["distill_task"]
    assert not [name for name in planned if name.startswith(("distill-", "distill_task-", "plug_mlm-"))]
    with pytest.raises(ConfigError, match="bistil learns no new embeddings, so it has no embedding initialisation"):
        parse_method("bistil+ofa")
    with pytest.raises(ConfigError, match="bistil is scored on fine-tuned tasks only"):
        load_config(PipelineConfig, SMOKE, ["methods=[standard, bistil]",
                                            "configs.zero_shot=[configs/evaluate/zero_shot/target_mlm_tiny.yaml]"])
    with pytest.raises(ConfigError, match="configs.distill: nowhere.yaml does not exist"):
        load_config(PipelineConfig, SMOKE, ["methods=[standard, bistil]", "configs.distill=nowhere.yaml"])
    load_config(PipelineConfig, SMOKE, ["methods=[standard]", "configs.distill=nowhere.yaml"])  # unused: not checked
    with pytest.raises(ConfigError, match="method: bistil .* cannot be scored on target_mlm"):
        load_config(ZeroShotConfig, overrides=["method=bistil", "source_model_dir=m", "task.name=target_mlm",
                                               "task.data_dir=d"])
    with pytest.raises(ConfigError, match=r"targets\[0\]: method bistil reads each target with its student task"):
        load_config(ZeroShotConfig, overrides=["method=bistil", "source_model_dir=m", "task.name=verse_class",
                                               "task.data_dir=d", "targets=[{lang: sw, embeddings: e}]"])


def test_bistil_and_lt_sft_vocab_build_on_a_mini_models_embeddings_side_by_side_with_standards(tmp_path):
    """`<model>@<method>`: BiStil and lt_sft_vocab over the target embeddings another listed method learned (here
    MiniJoint adaptation's): their own plugged model per language (plugged_mlm/minijoint/<lang>), their own stages,
    directories, jobs and MLflow names beside the default's, whose command lines stay as they were."""
    from minimodel.bistil.distill import DistillConfig
    from minimodel.bistil.task import TaskDistillConfig

    tasks = [f"configs/evaluate/zero_shot/{t}_tiny.yaml" for t in ("verse_class", "target_mlm")]
    base = ["target_langs=[ny, sw]", "seed=5", f"configs.zero_shot=[{', '.join(tasks)}]"]
    both = ["methods=[standard, minijoint, bistil, bistil@minijoint, lt_sft_vocab, lt_sft_vocab@minijoint]"]
    cfg = load_config(PipelineConfig, SMOKE, [*base, *both])
    stages = {s.name: s for s in build_stages(cfg)}
    alone = {s.name: s for s in build_stages(load_config(PipelineConfig, SMOKE, [
        *base, "methods=[standard, minijoint, bistil, lt_sft_vocab]"]))}
    for name in ("plug_mlm-sw", "distill-sw", "distill_task-sw", "lang_sft-lt_sft_vocab-sw",
                 "zero_shot-verse_class-bistil", "zero_shot-verse_class-lt_sft_vocab"):
        assert stages[name].argv == alone[name].argv, name  # the default variants: unchanged
    out = cfg.output_dir
    plug = stages["plug_mlm-minijoint-sw"]
    assert [a.name for a in plug.after] == ["adapt-minijoint-sw"]
    assert {f"embeddings={out}/adapt/minijoint/sw", f"output_dir={out}/plugged_mlm/minijoint/sw"} <= set(plug.argv)
    distill = stages["distill-bistil@minijoint-sw"]
    assert [a.name for a in distill.after] == ["plug_mlm-minijoint-sw", "export", "data"]
    assert str(distill.output_dir) == f"{out}/adapt/bistil@minijoint/sw"
    assert {"method=bistil@minijoint", f"output_dir={out}/adapt/bistil@minijoint",
            f"target_teacher_model={out}/plugged_mlm/minijoint/sw", "student.seed=5"} <= set(distill.argv)
    task = stages["distill_task-bistil@minijoint-sw"]
    assert [a.name for a in task.after] == ["distill-bistil@minijoint-sw", "finetune"]
    assert {"method=bistil@minijoint", f"student={out}/adapt/bistil@minijoint/sw/student",
            f"output_dir={out}/distill_task/bistil@minijoint/sw"} <= set(task.argv)
    # a stage files its results under its method: the plugged teacher, the language SFT's plugged model and the
    # student must hold the embeddings that method builds on, or they are refused before any compute
    plugged = tmp_path / "plugged"
    plugged.mkdir()
    for made_by in ("standard", "minijoint"):
        (plugged / "plug.json").write_text(json.dumps({"target_lang": "sw", "method": made_by}))
        for method in ("bistil", "bistil@minijoint"):
            settings = [f"method={method}", "teacher_model=t", f"target_teacher_model={plugged}"]
            if parse_method(method).builds_on == made_by:
                assert load_config(DistillConfig, overrides=settings).method == method
            else:
                with pytest.raises(ConfigError, match=f"target_teacher_model: {plugged} holds {made_by} embeddings "
                                                      rf"\(its plug.json\), but method {method} builds on"):
                    load_config(DistillConfig, overrides=settings)
        for method in ("lt_sft_vocab", "lt_sft_vocab@minijoint"):
            settings = [f"method={method}", f"primary_model={plugged}", "target_langs=[sw]"]
            if parse_method(method).builds_on == made_by:
                load_config(LanguageSFTConfig, overrides=settings)
            else:
                with pytest.raises(ConfigError, match=f"primary_model: {plugged} holds {made_by} embeddings"):
                    load_config(LanguageSFTConfig, overrides=settings)
    student = tmp_path / "student"  # phase 1's output names its method; phase 2 files results under the same
    student.mkdir()
    (student / "vocabulary.json").write_text(json.dumps({"method": "bistil@minijoint"}))
    task_settings = [f"student={student}", "teacher=t", "task.data_dir=d"]
    assert load_config(TaskDistillConfig, overrides=["method=bistil@minijoint", *task_settings])
    with pytest.raises(ConfigError, match=f"method: {student} was distilled by method bistil@minijoint, not bistil"):
        load_config(TaskDistillConfig, overrides=task_settings)
    (student / "vocabulary.json").write_text(json.dumps({}))  # a student from before the key: bistil's
    with pytest.raises(ConfigError, match="distilled by method bistil, not bistil@minijoint"):
        load_config(TaskDistillConfig, overrides=["method=bistil@minijoint", *task_settings])
    with pytest.raises(ConfigError, match="target_teacher_model: method bistil@minijoint distils from the primary "
                                          "with minijoint adaptation's target embeddings plugged in"):
        load_config(DistillConfig, overrides=["method=bistil@minijoint", "teacher_model=t"])
    classes = stages["zero_shot-verse_class-bistil@minijoint"]
    assert [a.name for a in classes.after] == ["distill_task-bistil@minijoint-ny", "distill_task-bistil@minijoint-sw"]
    parsed = load_config(ZeroShotConfig, classes.args[1], classes.args[2:])
    assert [t.model_dir for t in parsed.targets] == [f"{out}/distill_task/bistil@minijoint/{lang}/model"
                                                     for lang in ("ny", "sw")]
    lang_sft = stages["lang_sft-lt_sft_vocab@minijoint-sw"]
    assert [a.name for a in lang_sft.after] == ["plug_mlm-minijoint-sw", "data"]
    assert {"method=lt_sft_vocab@minijoint", f"primary_model={out}/plugged_mlm/minijoint/sw"} <= set(lang_sft.argv)
    parsed = load_config(ZeroShotConfig, *stages["zero_shot-verse_class-lt_sft_vocab@minijoint"].args[1:2],
                         stages["zero_shot-verse_class-lt_sft_vocab@minijoint"].args[2:])
    assert [t.model_dir for t in parsed.targets] == [f"{out}/plugged_mlm/minijoint/{lang}" for lang in ("ny", "sw")]
    assert len([s for s in stages.values() if s.kind == "plug" and s.name.startswith("plug_mlm")]) == 4
    planned = {j["name"]: j for j in jobs(list(stages.values()))}
    assert planned["plug_mlm-minijoint"]["after"] == ["adapt-minijoint"]
    assert planned["distill-bistil@minijoint"]["after"] == ["plug_mlm-minijoint", "export", "data"]
    assert planned["distill_task-bistil@minijoint"]["after"] == ["distill-bistil@minijoint", "finetune"]
    assert [t["lang"] for t in planned["distill_task-bistil@minijoint"]["array"]] == ["ny", "sw"]

    assert parse_method("bistil@minijoint").builds_on == "minijoint"
    assert parse_method("bistil").builds_on == "standard"
    assert parse_method("lt_sft_vocab@minipost+ofa").name == "lt_sft_vocab@minipost+ofa"
    for config, key in ((PipelineConfig, "methods[2]"), (ZeroShotConfig, "method"), (ReportConfig, "methods[2]")):
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}: 'bistil@standard' is written 'bistil' \(bistil "
                                              "builds on standard by default\)"):
            spec = "method=bistil@standard" if key == "method" else "methods=[standard, minijoint, bistil@standard]"
            load_config(config, SMOKE if config is PipelineConfig else None, [spec, "task.data_dir=d"]
                        if config is ZeroShotConfig else [spec])
    with pytest.raises(ConfigError, match="bistil@minijoint builds on the target embeddings minijoint adaptation "
                                          "learns: add 'minijoint' to methods"):
        load_config(PipelineConfig, SMOKE, ["methods=[standard, bistil@minijoint]"])
    with pytest.raises(ConfigError, match="only lt_sft_vocab, bistil build on another method's embeddings"):
        parse_method("minipost@minijoint")
    for below in ("lt_sft_vocab", "none", "bistil"):  # bistil@lt_sft: lt_sft's language SFTs (the next test)
        with pytest.raises(ConfigError, match="bistil builds on the target embeddings of a method that learns them"):
            parse_method(f"bistil@{below}")
    task_given = ["student=s", "teacher=t", "task.data_dir=d"]
    for config, given in ((DistillConfig, ["teacher_model=t"]), (TaskDistillConfig, task_given)):
        with pytest.raises(ConfigError, match="method: lt_sft_vocab is not a bistil method: write bistil or "
                                              "bistil@<method it builds on>"):
            load_config(config, overrides=["method=lt_sft_vocab", *given])


def test_bistil_builds_on_lt_sfts_language_sfts_as_the_references_teachers():
    """`bistil@lt_sft`: phase 1's teachers are the primary with lt_sft's source SFT (English text) and each target's
    SFT (the target's text), read with the primary's vocabulary (no plugged model); phase 2's teacher is lt_sft's task
    model (the primary + the source SFT + the task SFT). Only bistil builds on SFTs, only on lt_sft's, and only with
    lt_sft listed."""
    tasks = [f"configs/evaluate/zero_shot/{t}_tiny.yaml" for t in ("verse_class", "target_mlm")]
    zero_shot = f"configs.zero_shot=[{', '.join(tasks)}]"
    cfg = load_config(PipelineConfig, SMOKE, ["target_langs=[ny, sw]", "seed=5", zero_shot,
                                              "methods=[standard, lt_sft, bistil@lt_sft]"])
    stages = {s.name: s for s in build_stages(cfg)}
    out = cfg.output_dir
    assert not [name for name in stages if name.startswith("plug_mlm-lt_sft")]
    distill = stages["distill-bistil@lt_sft-sw"]
    assert [a.name for a in distill.after] == ["lang_sft-en", "lang_sft-sw", "export", "data"]
    assert str(distill.output_dir) == f"{out}/adapt/bistil@lt_sft/sw"
    assert {"method=bistil@lt_sft", f"teacher_model={out}/export/primary", f"teacher_sft={out}/adapt/lt_sft/en/sft",
            f"target_teacher_sft={out}/adapt/lt_sft/sw/sft", "target_langs=[sw]"} <= set(distill.argv)
    assert not [a for a in distill.argv if a.startswith("target_teacher_model=")]
    task = stages["distill_task-bistil@lt_sft-sw"]
    assert [a.name for a in task.after] == ["distill-bistil@lt_sft-sw", "task_sft"]
    assert {"method=bistil@lt_sft", f"teacher={out}/task_sft/model", f"student={out}/adapt/bistil@lt_sft/sw/student",
            f"output_dir={out}/distill_task/bistil@lt_sft/sw"} <= set(task.argv)
    classes = stages["zero_shot-verse_class-bistil@lt_sft"]
    parsed = load_config(ZeroShotConfig, classes.args[1], classes.args[2:])  # read with the primary's pieces, trimmed
    assert [(t.lang, t.model_dir, t.tokenizer) for t in parsed.targets] == [
        (lang, f"{out}/distill_task/bistil@lt_sft/{lang}/model", f"{out}/distill_task/bistil@lt_sft/{lang}/model")
        for lang in ("ny", "sw")]
    planned = {j["name"]: j for j in jobs(list(stages.values()))}
    assert planned["distill-bistil@lt_sft"]["after"] == ["lang_sft", "export", "data"]
    assert planned["distill_task-bistil@lt_sft"]["after"] == ["distill-bistil@lt_sft", "task_sft"]
    assert parse_method("bistil@lt_sft") == Method("bistil", base="lt_sft")
    for spec, refusal in (("lt_sft_vocab@lt_sft", "lt_sft_vocab builds on the target embeddings of a method"),
                          ("bistil@lt_sft_vocab", r"or on lt_sft's language SFTs \(bistil@lt_sft\), not on")):
        with pytest.raises(ConfigError, match=refusal):
            parse_method(spec)
    with pytest.raises(ConfigError, match="bistil@lt_sft builds on the language SFTs lt_sft adaptation learns: add "
                                          "'lt_sft' to methods"):
        load_config(PipelineConfig, SMOKE, ["methods=[standard, bistil@lt_sft]"])


def test_bistil_phase_2_refuses_a_teacher_fine_tuned_with_another_source_sft_than_phase_1s(tmp_path):
    """Phase 2's teacher must be phase 1's source teacher fine-tuned: bistil@lt_sft's student (its source teacher the
    primary + en's SFT) takes lt_sft's task model (task.json: that SFT), not the dense one, and the other way round."""
    from minimodel.bistil.task import TaskDistillConfig

    sft = tmp_path / "adapt/lt_sft/en/sft"
    students = {"bistil@lt_sft": str(sft.resolve()), "bistil": None}
    teachers = {"task_sft": {"sft": {"language": str(sft), "task": "t"}}, "finetune": {"frozen": []}}
    for method, teacher_sft in students.items():
        student = tmp_path / method / "student"
        student.mkdir(parents=True)
        (student / "vocabulary.json").write_text(json.dumps({"method": method, "teacher_sft": teacher_sft}))
        for name, info in teachers.items():
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "task.json").write_text(json.dumps({"task": "verse_class", **info}))
            settings = [f"method={method}", f"student={student}", f"teacher={tmp_path / name}", "task.data_dir=d"]
            if (name == "task_sft") == (method == "bistil@lt_sft"):
                load_config(TaskDistillConfig, overrides=settings)
            else:
                with pytest.raises(ConfigError, match=f"teacher: {tmp_path / name} was fine-tuned with source-language"
                                                      f" SFT {'none' if name == 'finetune' else sft}, but phase 1"):
                    load_config(TaskDistillConfig, overrides=settings)
