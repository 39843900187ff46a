"""Methods as entries (minimodel/methods.py): specs, their validation in every config that names a method, and the
pipeline's stages per configured method."""
import pytest
from pipeline_helpers import SMOKE

from minimodel.adaptation.train import AdaptConfig
from minimodel.config import ConfigError, load_config
from minimodel.evaluation.report import ReportConfig
from minimodel.evaluation.zero_shot import ZeroShotConfig
from minimodel.methods import Method, parse_method
from minimodel.pipeline import PipelineConfig, build_stages


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
    for task in ("verse_class", "target_mlm"):
        zero_shot = stages[f"zero_shot-{task}-minipost+copy_shared"]
        assert "method=minipost+copy_shared" in zero_shot.argv
        assert {a.name for a in zero_shot.after} <= {"adapt-minipost+copy_shared-ny", "adapt-minipost+copy_shared-sw",
                                                     "plug-minipost+copy_shared-ny", "plug-minipost+copy_shared-sw"}
    assert "methods=[standard, minipost, minipost+copy_shared]" in stages["report"].argv
