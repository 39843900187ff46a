"""Factorised embeddings (minimodel/ofa/factorized.py): the SVD's algebra, adaptation's factorised model (what
trains, its FLOPs) and plugging E = C P into a plain Hugging Face model with the same logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ofa_helpers import wordpiece
from transformers import BertConfig, BertForMaskedLM

from minimodel.adaptation.artifact import write_artifact
from minimodel.adaptation.plug import PlugConfig, plug
from minimodel.adaptation.train import AdaptConfig, build_adaptation_model
from minimodel.adaptation.vocab import INITIALISERS, token_map
from minimodel.data.tokenizer import tokenizer_fingerprint
from minimodel.manifest import model_hash
from minimodel.ofa.factorized import factorize
from minimodel.ofa.init import OFAInputs
from minimodel.ofa.vectors import VectorFileConfig, VectorFileError, load_word_vectors
from minimodel.training.hf_mlm import MLMFlops

H, D = 16, 4
SOURCE = wordpiece(["house", "water", "##s", "big", "cat", "dog"])
TARGET = wordpiece(["nyumba", "maji", "##s", "mbwa", "paka", "big", "kubwa"])


def test_svd_factors_orthonormal_exact_at_full_rank_and_optimal_below():
    e = torch.randn(30, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c, p, _ = factorize(e, 8)
    assert torch.allclose(c.T @ c, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(c @ p, e, atol=1e-12)
    singular = np.linalg.svd(e.numpy(), compute_uv=False)
    for d in (1, 3, 6):
        c, p, _ = factorize(e, d)
        assert c.shape == (30, d) and p.shape == (d, 8)
        assert torch.allclose(c.T @ c, torch.eye(d, dtype=torch.float64), atol=1e-12)
        error = torch.linalg.norm(e - c @ p).item()
        assert error == pytest.approx(np.sqrt((singular[d:] ** 2).sum()), rel=1e-10)
    with pytest.raises(ValueError, match="factorized_dim=9 must be in"):
        factorize(e, 9)


@pytest.fixture
def primary(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(SOURCE), hidden_size=H, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=32, max_position_embeddings=40))
    model.save_pretrained(tmp_path / "primary")
    SOURCE.save_pretrained(str(tmp_path / "primary"))
    return tmp_path / "primary"


def _factorised(primary, init="copy_shared"):
    cfg = AdaptConfig(over="full", primary_model=str(primary), seq_length=32)  # the model takes 40 positions
    cfg.init.method, cfg.embedding.factorized_dim = init, D
    return build_adaptation_model(cfg, str(primary), TARGET, "sw")


def test_adaptation_trains_coordinates_over_frozen_primitives_from_the_primarys_svd(primary):
    model, trainable, fixed, _ = _factorised(primary)
    e_src = BertForMaskedLM.from_pretrained(primary).get_input_embeddings().weight.detach()
    c_src, p, _ = factorize(e_src, D)
    assert list(trainable) == ["coordinates"] and trainable["coordinates"].shape == (len(TARGET), D)
    assert [n for n, q in model.named_parameters() if q.requires_grad] == ["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(fixed["primitives"], p.float())
    coords = trainable["coordinates"].detach()
    # shared tokens ([PAD]..[MASK], ##s = source 7, big = source 8) start from the source coordinates
    for t, s in [(0, 0), (4, 4), (7, 7), (10, 8)]:
        assert torch.equal(coords[t], c_src[s].float())
    assert fixed["token_map"].tolist() == [0, 1, 2, 3, 4, -1, -1, 7, -1, -1, 8, -1]
    # the output logits go through the same coordinates (tied)
    assert model.get_output_embeddings().weight is trainable["coordinates"]


def test_a_factorised_random_row_has_init_std_in_the_embedding_space(primary):
    """init.std is an embedding's spread: drawn in coordinate space (rows of U, about 1/sqrt(V) in scale) and
    multiplied by P, a random row came out far smaller or larger than a plain model's; drawn in the embedding space
    and put in coordinates, its rank-d part has std * sqrt(d / h) per entry."""
    model, trainable, fixed, _ = _factorised(primary, "random")
    embeddings = trainable["coordinates"].detach() @ fixed["primitives"]
    drawn = [t for t in (fixed["token_map"] < 0).nonzero().flatten().tolist() if t != TARGET.pad_token_id]
    spread = float(embeddings[drawn].std())
    expected = 0.02 * (D / H) ** 0.5  # 0.01
    assert 0.6 * expected < spread < 1.5 * expected, spread  # measured: 0.0092; the old draw 0.0012


def test_flops_count_the_factorised_projection(primary):
    model, _, _, _ = _factorised(primary)
    b, s, n, v = 3, 10, 5, len(TARGET)
    batch = {"input_ids": torch.randint(5, v, (b, s)), "labels": torch.full((b, s), -100)}
    batch["labels"][0, :n] = 6
    linear, attention = 2 * s * (4 * H * H + 2 * H * 32), 4 * s * s * H
    layer = linear + attention + linear + 2 * attention  # frozen, but the coordinates below it train
    projection = H * D + D * v
    head = 2 * n * (H * H + projection) * 2 + 2 * n * D * v  # forward, activation grads, C's weight grads
    inputs = 2 * b * s * D * H * 2  # C[ids] P forward, and the gradient into C's rows
    assert MLMFlops(model)(batch) == b * 2 * layer + head + inputs


def test_plugged_plain_model_gives_the_factorised_models_logits(primary, tmp_path):
    model, trainable, fixed, _ = _factorised(primary)
    with torch.no_grad():  # stand-in for training: the coordinates moved
        trainable["coordinates"].add_(0.3 * torch.randn(trainable["coordinates"].shape,
                                                        generator=torch.Generator().manual_seed(1)))
    run = tmp_path / "adapt" / "sw"
    TARGET.save_pretrained(str(run / "tokenizer"))
    info = {"over": "full", "method": "standard+copy_shared", "target_lang": "sw", "adapted_model": str(primary),
            "primary_model": {"path": str(primary), "sha256": model_hash(primary)}, "vocab_size": len(TARGET),
            "hidden_size": H, "pad_token_id": TARGET.pad_token_id, "tokenizer_sha256": tokenizer_fingerprint(TARGET),
            "steps": 1}
    write_artifact(run, {"coordinates": trainable["coordinates"].detach().clone(), **fixed}, info)
    plugged = plug(PlugConfig(embeddings=str(run), model=str(primary), output_dir=str(tmp_path / "plugged")))
    plain = BertForMaskedLM.from_pretrained(plugged.outputs["plugged"]).eval()
    assert plain.get_input_embeddings().weight.shape == (len(TARGET), H)
    ids = torch.randint(0, len(TARGET), (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
        theirs = plain(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)


def test_ofa_runs_in_coordinate_space_from_the_configured_vectors(primary, tmp_path):
    vec = tmp_path / "v.vec"
    vec.write_text("en:house 1 0\nen:houses 1 1\nen:water 0 1\nen:dog 0.5 0.5\nsw:nyumba 1 -0.2\nsw:maji 0.1 1\n"
                   "sw:mbwa 0.4 0.6\n")
    cfg = AdaptConfig(over="full", primary_model=str(primary), seq_length=32)  # the model takes 40 positions
    cfg.init.method, cfg.embedding.factorized_dim = "ofa", D
    cfg.init.ofa.vectors = [VectorFileConfig(str(vec))]
    _, trainable, fixed, summary = build_adaptation_model(cfg, str(primary), TARGET, "sw")
    assert summary == {"copied": 7, "copied_normalised": 0, "neighbours": 3, "random": 2}
    e_src = BertForMaskedLM.from_pretrained(primary).get_input_embeddings().weight.detach()
    c_src, _, _ = factorize(e_src, D)
    inputs = OFAInputs(SOURCE, load_word_vectors(cfg.init.ofa.vectors, ["en", "sw"]), ["en"], "sw")
    expected, used = INITIALISERS["ofa"](c_src, token_map(SOURCE, TARGET), TARGET, std=0.02, pad_id=0,
                                         generator=torch.Generator().manual_seed(cfg.init.seed), ofa=inputs)
    assert torch.equal(trainable["coordinates"].detach(), expected.float()) and torch.equal(fixed["token_map"], used)
    cfg.target_langs, cfg.init.ofa.source_langs = ["ny"], ["en"]
    with pytest.raises(VectorFileError, match=r"v.vec: no word vector of language 'ny'"):
        build_adaptation_model(cfg, str(primary), TARGET, "ny")
