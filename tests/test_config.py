"""Typed configs: YAML + overrides, validated with errors that name the key."""
import re
from dataclasses import dataclass, field
from typing import Literal

import pytest

from minimodel.adaptation.train import AdaptConfig
from minimodel.config import ConfigError, flatten, load_config, parse_cli, require, save_config, setting
from minimodel.training.config import DeepSpeedLoopConfig, PretrainConfig


@dataclass
class Optim:
    lr: float = 1e-3
    warmup_steps: int = 10


@dataclass
class Layout:
    layers: int = 4
    mini_layers: int = 2
    norm: Literal["pre", "post"] = "pre"
    langs: list[str] = field(default_factory=lambda: ["sw"])
    tokenizer: str | None = None

    def validate(self):
        require(self.mini_layers <= self.layers, "model.mini_layers",
                f"{self.mini_layers} is more than model.layers={self.layers}")


@dataclass
class Root:
    name: str = "run"
    model: Layout = field(default_factory=Layout)
    optim: Optim = field(default_factory=Optim)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_merge(tmp_path):
    path = write(tmp_path, "model:\n  layers: 8\noptim:\n  lr: 2\n")
    cfg = load_config(Root, path, ["optim.lr=3e-3"])
    assert cfg.optim.lr == 3e-3  # YAML reads 3e-3 (no dot) as a string
    cfg = load_config(Root, path, ["model.mini_layers=3", "model.langs=[ny, sw]", "name=x", "model.tokenizer=null"])
    assert cfg.model.layers == 8 and cfg.model.mini_layers == 3
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)  # int -> float is lossless
    assert cfg.model.langs == ["ny", "sw"] and cfg.name == "x" and cfg.model.tokenizer is None
    # a str field takes the text as written: YAML would read 0123 as the octal int 83
    cfg = load_config(Root, path, ["name=0123", "model.tokenizer=1e3", "model.layers=0x10"])
    assert cfg.name == "0123" and cfg.model.tokenizer == "1e3" and cfg.model.layers == 16


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key model\.layer\b.*valid keys"):
        load_config(Root, write(tmp_path, "model:\n  layer: 8\n"))
    with pytest.raises(ConfigError, match=r"unknown key optim\.betas"):
        load_config(Root, None, ["optim.betas=[0.9, 0.99]"])


@pytest.mark.parametrize("override, key", [
    ("model.layers=four", "model.layers"),
    ("model.layers=2.5", "model.layers"),
    ("optim.lr=fast", "optim.lr"),
    ("model.norm=middle", "model.norm"),
    ("model.langs=sw", "model.langs"),
    ("model=3", "model"),
])
def test_bad_type_is_named(override, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + r"\b"):
        load_config(Root, None, [override])


@pytest.mark.parametrize("override", ["model.layers", "=3", "model.layers=[1,"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="bad override"):
        load_config(Root, None, [override])


def test_impossible_combination_is_named():
    with pytest.raises(ConfigError, match=r"model\.mini_layers: 6 is more than model\.layers=4"):
        load_config(Root, None, ["model.mini_layers=6"])


def test_missing_file_and_cli_exit(tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Root, tmp_path / "nope.yaml")
    with pytest.raises(SystemExit) as exc:
        parse_cli(Root, ["model.layers=x"])
    assert exc.value.code == 2 and "model.layers" in capsys.readouterr().err


@dataclass
class Vectors:
    path: str = ""

    def validate(self):
        require(bool(self.path), "path", "name a file")


@dataclass
class Languages:
    langs: dict[str, Optim] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    vectors: list[Vectors] = field(default_factory=list)


def test_a_string_override_is_its_text():
    # YAML would cut "ablation #3" at its comment, read a date, and refuse "*.txt" (an alias); quotes are YAML's
    cfg = load_config(Root, None, ["name=ablation #3", "model.tokenizer=2024-05-01"])
    assert (cfg.name, cfg.model.tokenizer) == ("ablation #3", "2024-05-01")
    assert load_config(Root, None, ["name=*.txt"]).name == "*.txt"
    assert load_config(Root, None, ["name='no'"]).name == "no"
    with pytest.raises(ConfigError, match=r"bad override model\.layers=\*x: value is not valid YAML"):
        load_config(Root, None, ["model.layers=*x"])


def test_a_path_under_the_home_directory_is_read_there(tmp_path, monkeypatch):
    """`train.checkpoint.dir=~/scratch` (a shell expands ~ at a word's start only) and `~/...` in a YAML file wrote to
    a directory named `~` under the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "c.yaml"
    config.write_text("model: {tokenizer: ~/tok}\nname: '~'\n")
    cfg = load_config(Root, config, ["model.langs=[~/a, b~]"])
    assert (cfg.name, cfg.model.tokenizer) == (str(tmp_path), f"{tmp_path}/tok")
    assert cfg.model.langs == [f"{tmp_path}/a", "b~"]
    assert load_config(Root, None, ["model.tokenizer=~"]).model.tokenizer is None  # YAML's null, as before


def test_yaml_booleans_where_strings_are_meant_are_named_with_the_fix(tmp_path):
    """Norwegian's code `no` is a boolean to YAML: a traceback (a language key) or a message without the fix."""
    quote = "quote it, e.g. 'no'"
    with pytest.raises(ConfigError, match=rf"langs: key False is not a string .*{quote}"):
        load_config(Languages, write(tmp_path, "langs:\n  no: {lr: 1}\n"))
    with pytest.raises(ConfigError, match=rf"targets\[0\]: expected a string, got False .*{quote}"):
        load_config(Languages, None, ["targets=[no, sw]"])
    with pytest.raises(ConfigError, match="unknown key False"):  # a section's keys without the section: no crash
        load_config(Languages, write(tmp_path, "no: {}\nsw: {}\n"))


def test_a_key_given_twice_in_a_file_is_refused(tmp_path):
    # the later section replaced the earlier one whole: optim.lr silently back to its default
    with pytest.raises(ConfigError, match=r"key 'optim' is given twice"):
        load_config(Root, write(tmp_path, "optim:\n  lr: 0.5\nmodel:\n  layers: 6\noptim:\n  warmup_steps: 3\n"))


def test_sections_in_lists_are_validated_and_named():
    with pytest.raises(ConfigError, match=r"^vectors\[1\]\.path: name a file"):
        load_config(Languages, None, ["vectors=[{path: a.vec}, {}]"])


@dataclass
class Init:
    method: str = "copy"
    ofa: Languages = field(default_factory=Languages)  # a section two levels down, with a list of sections


@dataclass
class Nested:
    init: Init = field(default_factory=Init)
    model: Layout = field(default_factory=Layout)  # its messages name their full key (model.mini_layers)


def test_a_nested_sections_messages_name_the_key_from_the_top():
    """A section names its keys relative to itself (path) or in full (model.mini_layers): both reach the user as
    the key they would type; the relative ones lacked the sections above them."""
    with pytest.raises(ConfigError, match=r"^init\.ofa\.vectors\[0\]\.path: name a file"):
        load_config(Nested, None, ["init.ofa.vectors=[{}]"])
    with pytest.raises(ConfigError, match=r"^model\.mini_layers: 6 is more than"):
        load_config(Nested, None, ["model.mini_layers=6"])
    with pytest.raises(ConfigError, match=r"^parallel\.sequence_parallel: .* set parallel\.sequence_parallel=false"):
        load_config(PretrainConfig, None, ["parallel.sequence_parallel=true"])


def test_overrides_may_come_before_and_after_the_config_file(tmp_path):
    cfg = parse_cli(Root, ["name=x", "--config", str(write(tmp_path, "model:\n  layers: 8\n")), "optim.lr=0.5"])
    assert (cfg.name, cfg.model.layers, cfg.optim.lr) == ("x", 8, 0.5)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Root, None, ["model.layers=6", "optim.lr=0.5"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(Root, path) == cfg
    assert not list(path.parent.glob("*.tmp"))


@dataclass
class Stage:
    optim: Optim = field(default_factory=lambda: Optim(lr=0.5, warmup_steps=3))  # the stage's own defaults


def test_a_section_given_in_part_keeps_the_stage_defaults(tmp_path):
    assert load_config(Stage, None, ["optim.lr=0.1"]).optim == Optim(lr=0.1, warmup_steps=3)
    assert load_config(Stage, write(tmp_path, "optim:\n  warmup_steps: 7\n")).optim == Optim(lr=0.5, warmup_steps=7)


# The training settings' names before both loops shared them (minimodel/training/config.py): refused by name.
@pytest.mark.parametrize("stage, override, message", [
    ("adapt", "train.grad_clip=0.5", r"unknown key train\.grad_clip \(valid keys of train: checkpoint, eval, "),
    ("adapt", "train.keep_checkpoints=3", r"unknown key train\.keep_checkpoints \(valid keys of train: "),
    ("adapt", "train.eval_batches=2", r"unknown key train\.eval_batches \(valid keys of train: "),
    ("adapt", "train.lr=0.1", r"unknown key train\.lr \(valid keys of train: .*optim"),
    ("pretrain", "optim.clip_grad=1.0", r"unknown key optim \(valid keys: .*train"),
    ("pretrain", "checkpoint.keep_last=2", r"unknown key checkpoint \(valid keys: "),
    ("pretrain", "train.eval_steps=2", r"unknown key train\.eval_steps \(valid keys of train: "),
])
def test_old_training_names_are_refused_by_name(stage, override, message):
    cls, required = {"adapt": (AdaptConfig, ["primary_model=p", "over=full"]), "pretrain": (PretrainConfig, [])}[stage]
    with pytest.raises(ConfigError, match=message):
        load_config(cls, None, [*required, override])


def test_both_loops_share_the_training_names():
    overrides = ["train.optim.lr=0.002", "train.optim.grad_clip=0.5", "train.schedule.warmup_steps=5",
                 "train.eval.every=10", "train.eval.batches=3", "train.checkpoint.save_every=20",
                 "train.checkpoint.keep_last=4"]
    loops = [load_config(PretrainConfig, None, overrides).train,
             load_config(AdaptConfig, None, ["primary_model=p", "over=full", *overrides]).train]
    for loop in loops:
        assert (loop.optim.lr, loop.optim.grad_clip, loop.schedule.warmup_steps, loop.eval.every, loop.eval.batches,
                loop.checkpoint.save_every, loop.checkpoint.keep_last) == (0.002, 0.5, 5, 10, 3, 20, 4)
    assert loops[0].optim.weight_decay == 0.01 and loops[1].optim.weight_decay == 0.0  # each loop's own default


def test_flatten_names_every_leaf_and_list_items_only_when_asked():
    nested = {"a": {"b": 1, "c": {}}, "d": [2, {"e": (3, 4)}], "f": None}
    assert flatten(nested) == {"a.b": 1, "d": [2, {"e": (3, 4)}], "f": None}  # MLflow params: a list is one value
    assert flatten(nested, lists=True) == {"a.b": 1, "d[0]": 2, "d[1].e[0]": 3, "d[1].e[1]": 4, "f": None}
    assert flatten({}) == {} and flatten({"x": []}, lists=True) == {}


def test_a_section_given_after_some_of_its_keys_keeps_them():
    """`train.seed=7 train={steps: 50}` trained with the file's seed: the section replaced the key given before it
    (the pipeline puts its seed=N first, so a replicate with overrides.adapt=['train={steps: 400}'] was none)."""
    from minimodel.config import parse_overrides

    for order in (["train.seed=7", "train={steps: 50}"], ["train={steps: 50}", "train.seed=7"]):
        tree = parse_overrides(order)
        assert {k: getattr(v, "value", v) for k, v in tree["train"].items()} == {"seed": 7, "steps": 50}, order


def test_none_is_no_null_and_a_tracking_uri_must_name_a_store():
    """`tracking.uri=None` became the text "None" and failed inside MLflow with a traceback ("filesystem tracking
    backend"); so did any other value that is no store."""
    from minimodel.evaluation.report import ReportConfig

    with pytest.raises(ConfigError, match=r"tracking.run_name=None: write tracking.run_name=null for no value"):
        load_config(ReportConfig, overrides=["tracking.run_name=None"])
    assert load_config(ReportConfig, overrides=["tracking.run_name=null"]).tracking.run_name is None
    assert load_config(ReportConfig, overrides=["tracking.run_name='None'"]).tracking.run_name == "None"
    with pytest.raises(ConfigError, match=r"tracking.uri: 'runs/mlflow' is no MLflow store"):
        load_config(ReportConfig, overrides=["tracking.uri=runs/mlflow"])
    for uri in ("http://127.0.0.1:5000", "sqlite:////tmp/x/mlflow.db", "postgresql://u@h/db"):
        assert load_config(ReportConfig, overrides=[f"tracking.uri={uri}"]).tracking.uri == uri


def test_yaml_merge_keys_load_and_non_finite_numbers_are_refused(tmp_path):
    """`<<: *defaults` (plain YAML) failed with "could not determine a constructor"; lr=.inf passed `lr > 0`."""
    from minimodel.evaluation.report import ReportConfig

    path = tmp_path / "report.yaml"
    path.write_text("defaults: &defaults {chance_margin: 0.05}\n")
    with pytest.raises(ConfigError, match="unknown key defaults"):  # the anchor's own key stays a key
        load_config(ReportConfig, path)
    path.write_text("tracking: &off {enabled: false}\nfractions: [0.9]\n<<: {chance_margin: 0.05}\n")
    cfg = load_config(ReportConfig, path)
    assert cfg.chance_margin == 0.05 and cfg.fractions == [0.9] and not cfg.tracking.enabled
    for bad in (".inf", ".nan", "-.inf"):
        with pytest.raises(ConfigError, match="chance_margin: expected a finite number"):
            load_config(ReportConfig, overrides=[f"chance_margin={bad}"])


def test_the_pipeline_takes_overrides_before_and_after_its_config(tmp_path, capsys):
    from minimodel import pipeline

    with pytest.raises(SystemExit) as e:  # stops at the first stage-independent check: not an argparse error
        pipeline.main([f"output_dir={tmp_path}", "--config", "configs/pipeline/smoke.yaml", "target_langs=[xx]"])
    assert e.value.code == 2 and "xx is not a language of the data config" in capsys.readouterr().err


def test_a_config_file_read_again_is_read_as_it_is_now(tmp_path):
    """A file's parse is kept for the process (a pipeline reads each config dozens of times): an edited file is
    read anew, and a change made to one loaded config does not reach the next load."""
    path = write(tmp_path, "model:\n  langs: [sw]\n")
    setting(path, [], "model.langs").append("yo")  # the value as the file holds it
    assert load_config(Root, path).model.langs == ["sw"]
    path.write_text("model:\n  langs: [ny]\n")  # same size, in place: the same inode and maybe the same mtime
    assert load_config(Root, path).model.langs == ["ny"]


def test_a_one_step_warmup_is_refused_where_deepspeed_would_run_two():
    """DeepSpeed's WarmupDecayLR takes max(2, warmup): warmup_steps=1 silently ran the first update at half the lr
    and decayed over one step fewer (what 2 gives)."""
    with pytest.raises(ConfigError, match=r"train.schedule.warmup_steps: 1: .* at least 2 updates .*set 2 or more"):
        load_config(DeepSpeedLoopConfig, None, ["steps=10", "schedule.warmup_steps=1"])
    assert load_config(DeepSpeedLoopConfig, None, ["steps=10", "schedule.warmup_steps=2"]).schedule.warmup_steps == 2
