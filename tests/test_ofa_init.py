"""OFA initialisation (minimodel/ofa/init.py) against hand computations on real (WordPiece) tokenizers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ofa_helpers import byte_level_bpe, wordpiece

from minimodel.adaptation.vocab import INITIALISERS, token_map
from minimodel.ofa.init import OFAInputs, normalised_pieces, subword_vectors, top_k
from minimodel.ofa.vectors import VectorFileError, WordVectors

SOURCE = wordpiece(["house", "water", "##s", "big"])  # ids 5 6 7 8
TARGET = wordpiece(["nyumba", "maji", "##s", "HOUSE", "mbwa"])  # ids 5 6 7 8 9
VECTORS = WordVectors(
    [("en", "house"), ("en", "houses"), ("en", "water"), ("sw", "nyumba"), ("sw", "maji"), ("sw", "mbwazz")],
    np.array([[1, 0], [1, 1], [0, 1], [1, -0.2], [0.1, 1], [5, 5]], np.float32))


def test_subword_vectors_are_exact_means_over_the_words_containing_them():
    vecs, covered = subword_vectors(SOURCE, VECTORS, ["en"], len(SOURCE))
    # "house" is in house and houses (house + ##s); "##s" only in houses; "big" in no word; specials get none
    np.testing.assert_array_equal(vecs[5], [1.0, 0.5])
    np.testing.assert_array_equal(vecs[6], [0.0, 1.0])
    np.testing.assert_array_equal(vecs[7], [1.0, 1.0])
    assert covered.tolist() == [False] * 5 + [True, True, True, False]
    target, covered = subword_vectors(TARGET, VECTORS, ["sw"], len(TARGET))
    # "mbwazz" tokenises to [UNK] (no "##zz" piece): a special token, so mbwa stays uncovered
    assert covered.tolist() == [False] * 5 + [True, True, False, False, False]
    np.testing.assert_allclose(target[5], [1.0, -0.2], rtol=0, atol=1e-7)


def test_words_are_spelled_as_ofas_reference_tokenises_them():
    """cisnlp/ofa utils.py: the word, after a space, and capitalised after a space (not capitalised alone, which gave
    a byte-level BPE's pieces without the word-start mark vectors the reference never gives them); ColexNet+'s `$` is
    a space, and a word starting with one is capitalised without it."""
    from minimodel.ofa.init import _spellings

    assert _spellings("house") == ("house", " house", " House")
    assert _spellings("$nyumba") == (" nyumba", "  nyumba", "Nyumba")
    assert _spellings("big$dog") == ("big dog", " big dog", " Big dog")


def test_normalised_pieces_mark_word_starts_whatever_the_family():
    assert normalised_pieces(TARGET)[8] == " HOUSE" and normalised_pieces(SOURCE)[7] == "s"
    bpe = byte_level_bpe(["ĠThe", "Ã©", "Ã"])  # "Ã©" is the two bytes of "é"; "Ã" alone is half a character
    assert [normalised_pieces(bpe)[i] for i in (2, 3, 4)] == [" The", "é", "Ã"]
    # one piece that happens to start with "▁" does not make a WordPiece vocabulary SentencePiece
    stray = wordpiece(["house", "##s", "##ing", "▁x"])
    assert [normalised_pieces(stray)[i] for i in (5, 6, 7)] == [" house", "s", "ing"]


def test_a_piece_takes_the_source_row_of_its_own_case_first_then_of_any_case():
    """As OFA's reference: exact (marker-normalised) matches before lower-cased ones, so "House" copies "House", not
    the lower id "house"; "HOUSE" has no same-case match and takes the lowest id of "house" in any case. A byte-level
    source's "Ã©" is the text "é", so a WordPiece continuation "##é" copies it."""
    source = byte_level_bpe(["Ġhouse", "ĠHouse", "Ã©"])  # ids 2 3 4
    target = wordpiece(["House", "HOUSE", "##é", "nyumba"])  # ids 5 6 7 8
    inputs = OFAInputs(source, VECTORS, ["en"], "xx")  # no target vectors: copying alone (no merges: no source vectors)
    e_src = torch.randn(len(source), 3, generator=torch.Generator().manual_seed(0))
    _, used = INITIALISERS["ofa"](e_src, token_map(source, target), target, std=0.02, pad_id=0,
                                  generator=torch.Generator().manual_seed(0), ofa=inputs)
    assert used[5:].tolist() == [3, 2, 4, -1]


def _expected_row(target_vec, source_vecs, e_src, k, temperature):
    """softmax(cos / T) over the top-k, by hand: cos with a zero vector is 0, ties go to the lower id."""
    sims = []
    for j, s in enumerate(source_vecs):
        norm = np.linalg.norm(s) * np.linalg.norm(target_vec)
        sims.append((-(float(np.dot(s, target_vec)) / norm if norm else 0.0), j))
    top = sorted(sims)[:k]
    logits = np.array([-c for c, _ in top]) / temperature
    weights = np.exp(logits) / np.exp(logits).sum()
    return sum(w * e_src[j] for w, (_, j) in zip(weights, top)), [j for _, j in top]


def test_ofa_rows_copied_neighbour_weighted_and_random():
    g = torch.Generator().manual_seed(1)
    e_src = torch.randn(len(SOURCE), 3, generator=g, dtype=torch.float64).float()
    mapping = token_map(SOURCE, TARGET)
    inputs = OFAInputs(SOURCE, VECTORS, ["en"], "sw", neighbors=3, temperature=0.1)
    weight, used = INITIALISERS["ofa"](e_src, mapping, TARGET, std=0.02, pad_id=0,
                                       generator=torch.Generator().manual_seed(7), ofa=inputs)
    # specials by role and "##s" exactly, "HOUSE" after normalising to "house"; the rest have no source row
    assert used.tolist() == [0, 1, 2, 3, 4, -1, -1, 7, 5, -1]
    for t, s in [(0, 0), (1, 1), (4, 4), (7, 7), (8, 5)]:
        assert torch.equal(weight[t], e_src[s])
    source_vecs = np.array([[0, 0]] * 5 + [[1, 0.5], [0, 1], [1, 1], [0, 0]])
    e = e_src.double().numpy()
    # nyumba (1, -0.2): water's cosine is negative, so the third neighbour is a zero-vector token at cosine 0
    # ([PAD], the lowest id of the zero vectors)
    row, top = _expected_row(np.array([1, -0.2]), source_vecs, e, 3, 0.1)
    assert top == [5, 7, 0]
    np.testing.assert_allclose(weight[5].double().numpy(), row, rtol=0, atol=1e-6)
    row, top = _expected_row(np.array([0.1, 1]), source_vecs, e, 3, 0.1)
    assert sorted(top) == [5, 6, 7]
    np.testing.assert_allclose(weight[6].double().numpy(), row, rtol=0, atol=1e-6)
    # mbwa: no vector -> N(mean, std) of the source matrix per dimension, from the generator
    draw = torch.randn(1, 3, generator=torch.Generator().manual_seed(7))[0]
    expected = e_src.mean(0) + e_src.std(0, unbiased=False) * draw
    assert torch.allclose(weight[9], expected, atol=1e-6)
    assert inputs.summary == {"copied": 6, "copied_normalised": 1, "neighbours": 2, "random": 1}
    # a padding row no source row fills (a target whose padding token is mbwa's id here, which nothing covers) is
    # zero, as `random` leaves it, not a random draw
    weight, _ = INITIALISERS["ofa"](e_src, mapping, TARGET, std=0.02, pad_id=9,
                                    generator=torch.Generator().manual_seed(7), ofa=inputs)
    assert torch.equal(weight[9], torch.zeros(3))
    # source_langs naming a language the primary's tokens are not words of: every cosine 0, every neighbour row
    # the same mean of the lowest source ids; refused
    with pytest.raises(VectorFileError, match="set init.ofa.source_langs"):
        INITIALISERS["ofa"](e_src, mapping, TARGET, std=0.02, pad_id=0, generator=torch.Generator().manual_seed(7),
                            ofa=OFAInputs(SOURCE, VECTORS, ["xx"], "sw", neighbors=3, temperature=0.1))


@pytest.mark.parametrize("temperature", [0.1, 10.0])
def test_temperature_and_k_change_the_weights(temperature):
    e_src = torch.arange(len(SOURCE) * 2, dtype=torch.float32).reshape(-1, 2)
    inputs = OFAInputs(SOURCE, VECTORS, ["en"], "sw", neighbors=2, temperature=temperature)
    weight, _ = INITIALISERS["ofa"](e_src, token_map(SOURCE, TARGET), TARGET, std=0.02, pad_id=0,
                                    generator=torch.Generator().manual_seed(0), ofa=inputs)
    source_vecs = np.array([[0, 0]] * 5 + [[1, 0.5], [0, 1], [1, 1], [0, 0]])
    row, _ = _expected_row(np.array([0.1, 1]), source_vecs, e_src.double().numpy(), 2, temperature)
    np.testing.assert_allclose(weight[6].double().numpy(), row, rtol=0, atol=1e-5)


def test_top_k_orders_by_value_then_lower_id_like_a_full_stable_sort():
    rng = np.random.default_rng(0)
    sims = rng.integers(-3, 4, size=(50, 40)).astype(float) / 3  # many ties
    for k in (1, 5, 40):
        expected = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(top_k(sims, k), expected)
