"""The pipeline with an OFA method: a word-vector stage feeds the +ofa adaptations only."""
from minimodel.config import load_config
from minimodel.pipeline import PipelineConfig, build_stages


def test_tiny_pipeline_learns_word_vectors_for_its_ofa_method_only():
    cfg = load_config(PipelineConfig, "configs/pipeline/tiny.yaml", ["output_dir=/tmp/p"])
    assert "minijoint+ofa" in cfg.methods
    stages = {s.name: s for s in build_stages(cfg)}
    vectors = stages["word_vectors"]
    assert vectors.kind == "word_vectors" and "languages=[en, ny, sw]" in vectors.args
    for lang in cfg.target_langs:
        ofa = stages[f"adapt-minijoint+ofa-{lang}"]
        assert vectors in ofa.after and "init.method=ofa" in ofa.args
        assert "init.ofa.vectors=[{path: /tmp/p/word_vectors/vectors.bin}]" in ofa.args
        assert vectors not in stages[f"adapt-minijoint-{lang}"].after
    without = load_config(PipelineConfig, "configs/pipeline/tiny.yaml", ["methods=[standard, minipost]"])
    assert "word_vectors" not in {s.name for s in build_stages(without)}
