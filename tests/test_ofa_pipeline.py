"""The pipeline with an OFA method: a word-vector stage feeds the +ofa adaptations only; the OFA benchmark's
arithmetic (benchmarks/ofa_compute.py) on hand-made curves."""
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ofa_compute  # noqa: E402
from benchmarks.adaptation_compute import SMOKE  # noqa: E402
from minimodel.config import load_config  # noqa: E402
from minimodel.pipeline import PipelineConfig, build_stages  # noqa: E402


def test_tiny_pipeline_learns_word_vectors_for_its_ofa_method_only():
    cfg = load_config(PipelineConfig, "configs/pipeline/tiny.yaml", ["output_dir=/tmp/p"])
    assert "minijoint+ofa" in cfg.methods
    stages = {s.name: s for s in build_stages(cfg)}
    for lang in cfg.target_langs:
        # one per language pair: vectors learned for every language at once changed with each language added, and
        # every finished +ofa adaptation was then refused as made from other vectors
        vectors = stages[f"word_vectors-{lang}"]
        assert vectors.kind == "word_vectors" and vectors.job == "word_vectors"
        assert f"languages=[en, {lang}]" in vectors.lang_args
        assert f"output_dir=/tmp/p/word_vectors/{lang}" in vectors.lang_args
        # the corpora and held-out split the data stage used, overrides.data included: its resolved config
        assert f"data={cfg.data_dir}/config.yaml" in vectors.args and vectors.after == [stages["data"]]
        ofa = stages[f"adapt-minijoint+ofa-{lang}"]
        assert ofa.after[-1] is vectors and "init.method=ofa" in ofa.args
        assert f"init.ofa.vectors=[{{path: /tmp/p/word_vectors/{lang}/vectors.bin}}]" in ofa.lang_args
        assert vectors not in stages[f"adapt-minijoint-{lang}"].after
    more = {s.name: s for s in build_stages(load_config(PipelineConfig, "configs/pipeline/tiny.yaml", [
        "output_dir=/tmp/p", f"target_langs=[{', '.join(cfg.target_langs)}, tl]"]))}
    for name in ("word_vectors-ny", "adapt-minijoint+ofa-ny"):  # a language added changes no other's stages
        assert (more[name].args, more[name].lang_args) == (stages[name].args, stages[name].lang_args)
    without = load_config(PipelineConfig, "configs/pipeline/tiny.yaml", ["methods=[standard, minipost]"])
    assert not [s for s in build_stages(without) if s.kind == "word_vectors"]
    # the user's own vectors win over the pipeline's (the last setting of a key is the one applied), and then
    # no vectors are learned for it
    own = load_config(PipelineConfig, "configs/pipeline/tiny.yaml", [
        "method_overrides={minijoint+ofa: ['init.ofa.vectors=[{path: /v/colexnet.vec}]']}"])
    stages = {s.name: s for s in build_stages(own)}
    assert not [s for s in stages.values() if s.kind == "word_vectors"]
    settings = [a for a in stages["adapt-minijoint+ofa-ny"].args if a.startswith("init.ofa.vectors=")]
    assert settings == ["init.ofa.vectors=[{path: /v/colexnet.vec}]"]


def test_word_vectors_named_in_the_adaptation_config_file_are_not_replaced(tmp_path):
    """Vectors given in configs.adapt's file (not its overrides) were replaced by the pipeline's learned ones,
    appended on the command line, which win."""
    settings = yaml.safe_load(Path("configs/adapt/tiny.yaml").read_text())
    settings["init"].setdefault("ofa", {})["vectors"] = [{"path": "/v/colexnet.vec"}]  # the user's own
    adapt = tmp_path / "adapt.yaml"
    adapt.write_text(yaml.safe_dump(settings))
    cfg = load_config(PipelineConfig, "configs/pipeline/tiny.yaml", [f"configs.adapt={adapt}"])
    stages = {s.name: s for s in build_stages(cfg)}
    assert not [s for s in stages.values() if s.kind == "word_vectors"]
    assert not [a for a in stages["adapt-minijoint+ofa-ny"].args if a.startswith("init.ofa.vectors=")]


def _curve(method, seed, points, numel=100):
    return {"method": method, "lang": "ny", "seed": seed, "trainable_numel": numel,
            "points": [{"step": i, "flops": f, "quality": q} for i, (f, q) in enumerate(points)]}


def test_ofa_benchmark_savings_are_against_standard_randoms_final_quality():
    standard = [(0, 0.0), (10, 0.5), (20, 0.9), (30, 1.0)]  # final quality 1.0: 95% at 30, 99% at 30, 100% at 30
    ofa_mini = [(0, 0.8), (2, 0.96), (4, 0.99), (6, 1.2)]  # 95% at 2 FLOPs, 99% at 4, 100% at 6
    slow = [(0, 0.0), (10, 0.2), (20, 0.3)]  # never reaches 95%
    curves = [_curve("standard", 0, standard)] + [_curve(m, 0, ofa_mini if m == "minijoint+ofa" else slow, 7)
                                                   for m in ofa_compute.METHODS if m != "standard"]
    rows = {r["method"]: r for r in ofa_compute.summarise(curves, ["ny"])}
    mini = rows["minijoint+ofa"]
    assert mini["initial_quality"] == 0.8 and mini["final_quality"] == 1.2 and mini["trainable_numel"] == 7
    assert [(r["threshold"], r["reached"], r["saving"]) for r in mini["reach"]] == \
        [(0.95, 1, 15.0), (0.99, 1, 7.5), (1.0, 1, 5.0)]
    assert [r["saving"] for r in rows["minipost"]["reach"]] == [None, None, None]
    assert [r["saving"] for r in rows["standard"]["reach"]] == [1.0, 1.0, 1.0]


def test_ofa_benchmark_reaches_a_threshold_where_the_curve_stays_above_it():
    """The report's rule: a curve that crosses a threshold and falls back below it had not reached it (the benchmark
    took the first crossing: 99% of standard's gain at 2 FLOPs here, 3.23x in RESULTS.md where the rule gives 1.94x)."""
    standard = [(0, 0.0), (10, 0.5), (20, 1.0)]
    dipping = [(0, 0.0), (2, 0.995), (4, 0.9), (8, 1.0)]  # 99% at 2, below it at 4, for good from 8
    curves = [_curve(m, 0, dipping if m == "minijoint+ofa" else standard) for m in ofa_compute.METHODS]
    (row,) = [r for r in ofa_compute.summarise(curves, ["ny"]) if r["method"] == "minijoint+ofa"]
    assert [r["saving"] for r in row["reach"]] == [20 / 8, 20 / 8, 20 / 8]


def test_ofa_benchmark_counts_an_initialisation_that_reaches_the_target_apart():
    """No finite saving when the method's step 0 already reaches the target (its initialisation's own cost is not
    counted): counted as reached at start and kept out of the median (it was an infinite saving: not JSON)."""
    standard = [(0, 0.0), (10, 0.5), (20, 1.0)]
    curves = [_curve(m, s, standard) for m in ofa_compute.METHODS if m != "minijoint+ofa" for s in (0, 1)]
    curves += [_curve("minijoint+ofa", 0, [(0, 0.97), (2, 1.0)]), _curve("minijoint+ofa", 1, [(0, 0.5), (4, 1.0)])]
    (row,) = [r for r in ofa_compute.summarise(curves, ["ny"]) if r["method"] == "minijoint+ofa"]
    # standard first reaches every threshold at 20 FLOPs; seed 0 reaches 95% at step 0 and the rest at 2, seed 1 at 4
    assert [(r["reached"], r["reached_at_start"], r["saving"]) for r in row["reach"]] == \
        [(2, 1, 5.0), (2, 0, 7.5), (2, 0, 7.5)]


def test_ofa_benchmark_flags_reach_the_ofa_methods_only(tmp_path):
    # --factorized-dim and --ofa-lr change the +ofa adaptations; random init keeps the Setup's (tuned) settings
    setup = SMOKE
    cfg = ofa_compute.pipeline_config(setup, tmp_path, 0, factorized_dim=16, ofa_lr=5e-4)
    for method, overrides in cfg.method_overrides.items():
        ofa = method.endswith("+ofa")
        assert ("train.optim.lr=0.0005" in overrides) == ofa
        assert ("embedding.factorized_dim=16" in overrides) == ofa
    assert f"train.optim.lr={setup.adapt_lr}" in cfg.overrides["adapt"]  # what the method overrides replace
    plain = ofa_compute.pipeline_config(setup, tmp_path, 0, factorized_dim=None, ofa_lr=None)
    assert not any(o.startswith(("train.optim.lr", "embedding.")) for v in plain.method_overrides.values() for o in v)
