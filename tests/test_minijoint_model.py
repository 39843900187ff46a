"""MiniJoint model under megatron-core parallelism: equivalence with a single-process reference, checkpoints
across layouts, Hugging Face export parity, start-up validation.

The multi-process work runs in two real launches of tests/minijoint_helpers.py (one process, then torchrun with
4 gloo processes); the assertions below compare their outputs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minijoint_helpers import TIMEOUT_MINUTES
from minimodel.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "minijoint_helpers.py"
LAYOUTS = ["tp2_sp_dp2", "pp2_dp2", "tp2_pp2", "pp4_middle", "pp2_vpp2_dp2_distopt"]
# secondary_head=shared_transform: the main head's copy on stage 0 (TP2), a middle stage, another chunk (VPP)
SHARED_LAYOUTS = ["shared_tp2_pp2", "shared_pp4_middle", "shared_pp2_vpp2_dp2_distopt"]
RTOL = 1e-5
# Per tied set (word embeddings; under shared_transform also the main head), the most gradient tensors one rank
# compares (its own copies + one gathered from each other stage of the set's group), counted by hand from
# model.py's word_embedding_weights/head_weights. Word embeddings: stage 0's input embedding, the last stage's
# output layer, and the secondary head's output layer where it sits on a middle stage (pp4: stage 1; vpp: chunk 0
# of the last rank, which holds the output layer too: 2 local + 1 gathered). Main head (shared_transform): the last
# stage's, and its copy in the secondary head on another stage (or chunk: 2 local, no group).
TIED_TENSORS = {"pp2_dp2": [2], "tp2_pp2": [2], "pp4_middle": [3], "pp2_vpp2_dp2_distopt": [3],
                "shared_tp2_pp2": [2, 2], "shared_pp4_middle": [3, 2], "shared_pp2_vpp2_dp2_distopt": [3, 2]}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], timeout: int = 900) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minijoint")
    _run([sys.executable, str(HELPER), "reference", str(out)])
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    _run([torchrun, "--standalone", "--nproc-per-node", "4", str(HELPER), "layouts", str(out)])
    return out


@pytest.fixture(scope="module")
def references(runs) -> dict[str, dict]:
    """secondary-head variant ("" separate, "_shared", "_none") -> its single-process reference step."""
    return {v: torch.load(runs / f"reference{v}.pt") for v in ("", "_shared", "_none")}


@pytest.fixture(scope="module")
def reference(references) -> dict:
    return references[""]


@pytest.fixture(scope="module")
def results(runs) -> dict:
    return json.loads((runs / "results.json").read_text())


def _layout_grads(runs: Path, name: str, reference: dict, results: dict) -> dict[str, torch.Tensor]:
    saved = torch.load(runs / f"{name}.pt")
    scale = results[name]["step_scale"]
    if scale is None:  # the layout wrote its gradients in place of its weights
        return saved
    # distributed optimizer: one step moved each weight by -scale x gradient
    return {k: (reference["params"][k] - saved[k]) / scale for k in saved}


def _worst_relative_diff(grads: dict, ref_grads: dict) -> tuple[float, str]:
    assert grads.keys() == ref_grads.keys()
    worst = max(((grads[k] - g).abs().max().item() / g.abs().max().clamp_min(1e-12).item(), k)
                for k, g in ref_grads.items())
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS + SHARED_LAYOUTS)
def test_layout_matches_single_process_reference(layout, runs, references, results):
    reference = references[results[layout]["variant"]]
    ref_losses, losses = reference["losses"], results[layout]["losses"]
    for key in ("loss", "lm_loss", "aux_loss"):
        assert losses[key] == pytest.approx(ref_losses[key], rel=RTOL), key
    assert losses["aux_loss"] > 1.0  # the secondary head is active
    grads = _layout_grads(runs, layout, reference, results)
    # shared_transform: no parameters of its own; the main head's gradients hold both heads' terms
    assert any(k.startswith("aux_head.") for k in grads) == (layout not in SHARED_LAYOUTS)
    worst, name = _worst_relative_diff(grads, reference["grads"])
    assert worst < RTOL, f"{layout}: gradient of {name} differs by {worst:.2e} (relative) from the reference"


@pytest.mark.slow
def test_negative_control_without_secondary_gradient_fails_the_check(runs, reference, results):
    """Same run as pp4_middle, but the secondary loss's gradient is not injected: the check must catch it."""
    losses = results["pp4_middle_not_injected"]["losses"]
    assert losses["loss"] == pytest.approx(reference["losses"]["loss"], rel=RTOL)  # forward unchanged
    grads = _layout_grads(runs, "pp4_middle_not_injected", reference, results)
    worst, _ = _worst_relative_diff(grads, reference["grads"])
    assert worst > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS + SHARED_LAYOUTS)
def test_tied_weight_copies_get_one_gradient(layout, results):
    """Input embedding, last-stage and secondary-head copies (and, shared_transform, the main head and its copy)
    all end the step with the same gradient."""
    result = results[layout]
    compared = result["tied_grads_compared"]  # per rank, per tied set: gradient tensors that rank compared
    assert len(compared) == 4 and len({len(c) for c in compared}) == 1
    if result["pipeline_stages"] == 1:
        # one stage: both heads use the input embedding itself, so there are no copies and nothing to compare
        # (the spread would be max(g - g) = 0 whatever the gradients): say so instead of checking it
        assert all(c == [1] for c in compared), compared
        return
    # each set is compared across >= 2 tensors on every rank that holds it, as many as the hand count below
    for tied_set in zip(*compared):
        assert all(n == 0 or n >= 2 for n in tied_set), compared
    assert [max(tied_set) for tied_set in zip(*compared)] == TIED_TENSORS[layout], compared
    assert result["tied_grad_spread"] == 0.0  # the copies' gradients are summed and copied back: exactly equal


@pytest.mark.slow
def test_the_output_head_group_gets_the_configured_timeout(results):
    """The group that keeps the shared head's copies in sync was made with the backend's default timeout (NCCL: 10
    minutes) instead of parallel.timeout_minutes."""
    assert results["shared_tp2_pp2"]["head_group_timeout_s"] == 60 * TIMEOUT_MINUTES


@pytest.mark.slow
def test_shared_transform_secondary_head_is_the_main_head(references):
    """The secondary loss is the main head applied to layer m: the main head's gradient carries both losses."""
    shared, separate = references["_shared"], references[""]
    assert not any(k.startswith("aux_head.") for k in shared["params"])
    assert shared["losses"]["aux_loss"] > 1.0
    # the same weights apart from the head: the main loss is unchanged, the secondary one is not
    assert shared["losses"]["lm_loss"] == pytest.approx(separate["losses"]["lm_loss"], rel=RTOL)
    assert shared["losses"]["aux_loss"] != pytest.approx(separate["losses"]["aux_loss"], rel=1e-3)


@pytest.mark.slow
def test_secondary_head_none_is_plain_mlm(references):
    none = references["_none"]
    assert set(none["losses"]) == {"loss", "lm_loss", "lm_loss_per_microbatch"}
    assert none["losses"]["loss"] == none["losses"]["lm_loss"]
    assert not any(k.startswith("aux_head.") for k in none["grads"])
    assert none["logits"]["secondary"] is None


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["", "_shared", "_none"])
def test_the_training_losses_are_the_exported_models_cross_entropy(references, variant):
    """The heads' losses ran over the padded vocabulary (250 ids padded to 256 for the TP split): the padding rows'
    logits took probability, so every logged loss over-stated the exported model's (which has no such rows) by
    0.02 nats here, 0.2 on a 50-id vocabulary padded to 128."""
    reference = references[variant]
    by_hand, losses = reference["losses_by_hand"], reference["losses"]
    assert by_hand["main"] == pytest.approx(losses["lm_loss_per_microbatch"], rel=1e-5)
    assert by_hand["secondary"] == (pytest.approx(losses["aux_loss_per_microbatch"], rel=1e-5) if variant != "_none"
                                    else [])


@pytest.mark.slow
def test_per_microbatch_losses_reach_every_rank(reference, results):
    # pp4_middle: the secondary loss is computed on stage 1 and the main loss on stage 3 (DP=1).
    got = results["pp4_middle"]["losses"]
    assert got["aux_loss_per_microbatch"] == pytest.approx(reference["losses"]["aux_loss_per_microbatch"], rel=RTOL)
    assert got["lm_loss_per_microbatch"] == pytest.approx(reference["losses"]["lm_loss_per_microbatch"], rel=RTOL)


@pytest.mark.slow
def test_checkpoint_saved_at_tp2_pp2_loads_exactly_at_tp1_pp1(results):
    # fresh weights at TP2xPP2 -> saved -> loaded at TP1xPP1 -> saved -> loaded at TP2xPP2: bit-identical
    assert results["round_trip_max_diff"] == 0.0
    at_tp2pp2, at_tp1 = results["tp2pp2_fresh_forward"], results["tp2pp2_fresh_at_tp1_forward"]
    assert at_tp1["lm_loss"] == pytest.approx(at_tp2pp2["lm_loss"], rel=RTOL)
    assert at_tp1["aux_loss"] == pytest.approx(at_tp2pp2["aux_loss"], rel=RTOL)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    import sentencepiece as spm
    from transformers import XLMRobertaTokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    words = ["alpha", "beta", "gamma", "delta", "kernel", "tensor", "pipeline", "stage", "model", "token"]
    lines = [" ".join(words[(i * j) % len(words)] for j in range(8)) for i in range(200)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(d / "sp"), vocab_size=40,
                                   hard_vocab_limit=False, minloglevel=2)
    XLMRobertaTokenizer(vocab_file=str(d / "sp.model")).save_pretrained(d)
    return d


@pytest.mark.slow
def test_export_cli_matches_megatron_logits(runs, tokenizer_dir):
    """pretrain/export.py on the TP2xPP2 checkpoint: primary and mini-model logits match the megatron model's."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from minimodel.manifest import check_aligned

    out = runs / "export"
    _run([sys.executable, "pretrain/export.py", f"checkpoint={runs / 'ckpt_tp2pp2_fresh'}",
          f"tokenizer={tokenizer_dir}", f"output_dir={out}", "tracking.enabled=false"])
    expected = torch.load(runs / "tp2pp2_fresh_logits.pt")
    batch = expected["batch"]
    keep = batch["attention_mask"].bool()
    for name, key, layers in (("primary", "main", 4), ("mini", "secondary", 2)):
        model = AutoModelForMaskedLM.from_pretrained(out / name).eval()
        assert type(model).__name__ == "MegatronBertForMaskedLM"
        assert model.config.num_hidden_layers == layers
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        diff = (logits[keep] - expected[key][keep]).abs().max().item()
        assert diff < 1e-4, f"{name}: max |logit diff| {diff}"
        assert len(AutoTokenizer.from_pretrained(out / name)) == len(AutoTokenizer.from_pretrained(tokenizer_dir))
    manifest = check_aligned(out / "mini", out / "primary")
    assert manifest["kind"] == "minijoint" and manifest["layers"] == 2
    check = json.loads((out / "export.json").read_text())  # the export's own logit check, on disk (no tracking)
    assert set(check["max_logit_diff"]) == {"primary", "mini"} and max(check["max_logit_diff"].values()) < 1e-4
    # shared output embedding: the mini-model's embeddings are the primary model's
    primary = AutoModelForMaskedLM.from_pretrained(out / "primary")
    mini = AutoModelForMaskedLM.from_pretrained(out / "mini")
    assert torch.equal(primary.get_input_embeddings().weight, mini.get_input_embeddings().weight)
    assert torch.equal(mini.get_output_embeddings().weight, mini.get_input_embeddings().weight)


@pytest.mark.slow
def test_export_shared_transform_mini_model_has_the_primary_head(runs, references, tokenizer_dir):
    from transformers import AutoModelForMaskedLM

    out = runs / "export_shared"
    _run([sys.executable, "pretrain/export.py", f"checkpoint={runs / 'ckpt_ref_shared'}",
          f"tokenizer={tokenizer_dir}", f"output_dir={out}", "tracking.enabled=false"])
    expected = references["_shared"]["logits"]
    batch = expected["batch"]
    keep = batch["attention_mask"].bool()
    models = {name: AutoModelForMaskedLM.from_pretrained(out / name).eval() for name in ("primary", "mini")}
    for name, key in (("primary", "main"), ("mini", "secondary")):
        with torch.no_grad():
            logits = models[name](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        diff = (logits[keep] - expected[key][keep]).abs().max().item()
        assert diff < 1e-4, f"{name}: max |logit diff| {diff}"
    primary, mini = (m.state_dict() for m in models.values())
    head = [k for k in mini if k.startswith("cls.") or k.startswith("bert.encoder.ln.")]
    assert len(head) >= 7 and all(torch.equal(mini[k], primary[k]) for k in head)


@pytest.mark.slow
def test_export_without_secondary_head_writes_no_mini_model(runs, tokenizer_dir):
    out = runs / "export_none"
    args = [sys.executable, "pretrain/export.py", f"checkpoint={runs / 'ckpt_ref_none'}", f"tokenizer={tokenizer_dir}",
            f"output_dir={out}", "tracking.enabled=false"]
    asked = subprocess.run(args + ["mini=true"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert asked.returncode == 2 and "secondary_head=none" in asked.stderr and "minipost" in asked.stderr
    (out / "mini").mkdir(parents=True)  # an earlier export's mini-model: not aligned with the new primary
    _run(args)
    assert (out / "primary" / "config.json").is_file() and not (out / "mini").exists()


# -- start-up validation (no processes) ----------------------------------------------------------------------
def _model(**overrides):
    from minimodel.models.minijoint.config import ModelConfig

    base = dict(vocab_size=250, hidden_size=64, num_layers=4, num_attention_heads=4, seq_length=16, mini_layers=2)
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("overrides, key", [
    (["num_layers=4", "mini_layers=5"], "mini_layers"),
    (["mini_layers=0"], "mini_layers"),
    (["num_attention_heads=5"], "hidden_size"),
    (["hidden_dropout=1.0"], "hidden_dropout"),
    (["secondary_head=shared_transform", "share_aux_output_embedding=false"], "share_aux_output_embedding"),
    (["secondary_head=both"], "secondary_head"),
])
def test_model_config_rejects_impossible_values(overrides, key):
    from minimodel.models.minijoint.config import ModelConfig

    load_config(ModelConfig)  # the defaults are valid
    with pytest.raises(ConfigError, match=key):
        load_config(ModelConfig, None, overrides)


@pytest.mark.parametrize("overrides, key", [
    (["virtual_pipeline_model_parallel_size=2"], "virtual_pipeline_model_parallel_size"),
    (["sequence_parallel=true"], "sequence_parallel"),
    (["micro_batch_size=3", "global_batch_size=8"], "global_batch_size"),
    (["tensor_model_parallel_size=0"], "tensor_model_parallel_size"),
])
def test_parallel_config_rejects_impossible_values(overrides, key):
    from minimodel.distributed import ParallelConfig

    with pytest.raises(ConfigError, match=key):
        load_config(ParallelConfig, None, overrides)


@pytest.mark.parametrize("model_overrides, parallel, key", [
    ({}, dict(tensor_model_parallel_size=3), "tensor_model_parallel_size"),  # 4 heads over 3 ranks
    ({}, dict(pipeline_model_parallel_size=3), "pipeline_model_parallel_size"),  # 4 layers over 3 stages
    ({}, dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4),
     "virtual_pipeline_model_parallel_size"),
    ({"make_vocab_size_divisible_by": 1, "vocab_size": 251}, dict(tensor_model_parallel_size=2),
     "tensor_model_parallel_size"),
    ({"seq_length": 15}, dict(tensor_model_parallel_size=2, sequence_parallel=True), "sequence_parallel"),
])
def test_layout_rejected_at_start_up(model_overrides, parallel, key):
    from minimodel.distributed import ParallelConfig
    from minimodel.models.minijoint.parallelize import check_layout

    with pytest.raises(ConfigError, match=key):
        check_layout(_model(**model_overrides), ParallelConfig(**parallel))


def test_layout_rejects_world_size_that_does_not_fit():
    from minimodel.distributed import ParallelConfig

    pc = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, micro_batch_size=2,
                        global_batch_size=8)
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        pc.num_microbatches(6)
    with pytest.raises(ConfigError, match="global_batch_size"):
        pc.num_microbatches(12)  # DP 3: 8 sequences do not split into 3 x 2


def test_secondary_head_stage_follows_megatron_layer_assignment():
    from minimodel.distributed import ParallelConfig
    from minimodel.models.minijoint.parallelize import secondary_head_stage

    m = _model(num_layers=8, mini_layers=3)
    assert secondary_head_stage(m, ParallelConfig(pipeline_model_parallel_size=4)) == 1
    # 2 ranks x 2 chunks of 2 layers: layers 1-2 r0, 3-4 r1, 5-6 r0, 7-8 r1
    assert secondary_head_stage(m, ParallelConfig(pipeline_model_parallel_size=2,
                                                  virtual_pipeline_model_parallel_size=2)) == 1


def test_flops_per_token_counts_layers_and_heads():
    from minimodel.models.minijoint.config import flops_per_token

    m = _model()
    base = flops_per_token(m)
    deeper = flops_per_token(_model(num_layers=8, mini_layers=2))
    h, s, f = 64, 16, 256
    assert deeper - base == pytest.approx(3 * 4 * (2 * (4 * h * h + 2 * h * f) + 4 * s * h))
    assert flops_per_token(m, mask_fraction=0.3) > base
    v = m.padded_vocab_size
    assert base - flops_per_token(_model(secondary_head="none")) == pytest.approx(3 * 0.15 * 2 * (h * h + h * v))
