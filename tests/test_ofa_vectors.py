"""Aligned word vectors: reading .vec / .vec.gz / word2vec .bin files with OFA's keys and their errors; learning
vectors from verse-parallel text (PPMI + SVD) and measuring their alignment on held-out verses."""
from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
import scipy.sparse as sp
import yaml

from minimodel.ofa.learn import WordVectorConfig, build_word_vectors, gold_pairs, ppmi
from minimodel.ofa.vectors import (VectorFileConfig, VectorFileError, WordVectors, load_word_vectors,
                                   write_word2vec_binary)

VEC = "4 3\nen:house 1 0 0.5\neng:water 0 1 -2\nsw:nyumba 1 0.1 0.5\nde:haus 9 9 9\n"


def test_text_vectors_plain_and_gzipped_with_lang_prefixes(tmp_path):
    plain = tmp_path / "v.vec"
    plain.write_text(VEC)
    zipped = tmp_path / "v.vec.gz"
    zipped.write_bytes(gzip.compress(VEC.encode()))
    for path in (plain, zipped):
        vectors = load_word_vectors([VectorFileConfig(str(path))], ["en", "sw"])
        # eng: is ISO 639-3 for en (OFA's keys); de is not configured and dropped
        assert vectors.keys == [("en", "house"), ("en", "water"), ("sw", "nyumba")]
        np.testing.assert_array_equal(vectors.matrix, np.array([[1, 0, 0.5], [0, 1, -2], [1, 0.1, 0.5]], np.float32))


def test_a_language_named_by_its_iso3_code_keeps_its_vectors(tmp_path):
    """OFA's files key languages by ISO 639-3 (eng:water -> en); a project language coded nya or swh was mapped to
    ny / sw and dropped."""
    path = tmp_path / "v.vec"
    path.write_text("2 2\nnya:nyumba 1 0\neng:water 0 1\n")
    assert load_word_vectors([VectorFileConfig(str(path))], ["en", "nya"]).keys == [("nya", "nyumba"), ("en", "water")]


def test_a_key_without_a_language_is_an_english_word(tmp_path):
    """OFA reads an unprefixed key as eng:<key>; it was dropped (a file of such keys lost every English vector)."""
    path = tmp_path / "v.vec"
    path.write_text("5 2\nhouse 1 0\nswh:nyumba 0 1\n$big$dog 1 1\n12:30 1 2\ndeu:haus 2 2\n")
    assert load_word_vectors([VectorFileConfig(str(path))], ["en", "sw"]).keys == [
        ("en", "house"), ("sw", "nyumba"), ("en", "$big$dog"), ("en", "12:30")]


def test_per_file_language_and_binary_round_trip(tmp_path):
    words = tmp_path / "ny.txt"
    words.write_text("nyumba 0.25 -1\nmadzi 3 4\n")  # no header line: fastText's .txt without it
    vectors = load_word_vectors([VectorFileConfig(str(words), lang="ny")], ["ny"])
    assert vectors.keys == [("ny", "nyumba"), ("ny", "madzi")]
    binary = write_word2vec_binary(vectors, tmp_path / "out" / "v.bin")
    assert not list((tmp_path / "out").glob(".*"))  # nothing left beside it
    header, rest = binary.read_bytes().split(b"\n", 1)
    assert header == b"2 2" and rest.startswith("ny:nyumba ".encode())
    assert np.frombuffer(rest[len("ny:nyumba "):len("ny:nyumba ") + 8], "<f4").tolist() == [0.25, -1.0]
    again = load_word_vectors([VectorFileConfig(str(binary))], ["ny"])
    assert again.keys == vectors.keys
    np.testing.assert_array_equal(again.matrix, vectors.matrix)


def test_per_language_files_serve_each_target_with_its_own(tmp_path):
    """fastText's aligned vectors come one file per language: an adaptation to sw was refused because ny.vec (the
    other target's) holds no vector of en or sw; files of another language are not even read."""
    files = []
    for lang, text in (("en", "house 1 0\n"), ("sw", "nyumba 1 0.1\n"), ("ny", "nyumba 0 1\n")):
        (tmp_path / f"{lang}.vec").write_text(text)
        files.append(VectorFileConfig(str(tmp_path / f"{lang}.vec"), lang=lang))
    assert load_word_vectors(files, ["en", "sw"]).keys == [("en", "house"), ("sw", "nyumba")]
    (tmp_path / "ny.vec").write_text("broken\n")
    assert load_word_vectors(files, ["en", "sw"]).keys == [("en", "house"), ("sw", "nyumba")]
    with pytest.raises(VectorFileError, match=r"en.vec, .*sw.vec, .*ny.vec: no file holds a vector of the "
                                              r"configured languages \['fr'\]"):
        load_word_vectors(files, ["fr"])


@pytest.mark.parametrize("text, message", [
    ("2 3\nen:a 1 2 3\nen:b 1 x 3\n", "v.vec, line 3: malformed line"),
    ("en:a 1 2 3\nen:b 1 2\n", "v.vec, line 2: dimension mismatch: 2 values, expected 3"),
    ("2 4\nen:a 1 2 3\n", "v.vec, line 2: dimension mismatch: 3 values, expected 4"),
    ("en:a\n", "v.vec, line 1: malformed line"),
    ("fr:maison 1 2\nxx:y 3 4\n", "v.vec: no file holds a vector of the configured languages ['en', 'sw']"),
])
def test_bad_text_files_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "v.vec"
    path.write_text(text)
    with pytest.raises(VectorFileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_word_vectors([VectorFileConfig(str(path))], ["en", "sw"])


def test_files_of_different_dimensions_and_a_missing_file(tmp_path):
    (tmp_path / "a.vec").write_text("en:a 1 2 3\n")
    write_word2vec_binary(WordVectors([("sw", "b")], np.ones((1, 2), np.float32)), tmp_path / "b.bin")
    with pytest.raises(VectorFileError, match=r"b.bin, line 1: dimension mismatch: .* dimension 2, the other files' 3"):
        load_word_vectors([VectorFileConfig(str(tmp_path / "a.vec")), VectorFileConfig(str(tmp_path / "b.bin"))],
                          ["en", "sw"])
    with pytest.raises(VectorFileError, match="no such word-vector file"):
        load_word_vectors([VectorFileConfig(str(tmp_path / "missing.vec"))], ["en"])


def test_ppmi_against_hand_computation():
    counts = sp.csr_matrix(np.array([[2.0, 0.0], [1.0, 1.0]]))
    got = ppmi(counts, smoothing=1.0).toarray()
    # total 4; p(w) = [1/2, 1/2]; p(v) = [3/4, 1/4]
    expected = np.maximum(0, np.log(np.array([[0.5 / (0.5 * 0.75), 1], [0.25 / (0.5 * 0.75), 0.25 / (0.5 * 0.25)]])))
    expected[0, 1] = 0.0  # zero count: no entry
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_gold_pairs_are_mutual_best_dice_matches():
    source = [(1, ["a", "b"]), (2, ["a"]), (3, ["b", "c"])]
    target = [(1, ["x", "y"]), (2, ["x"]), (3, ["y"]), (4, ["z"])]  # verse 4 has no source side: ignored
    pairs = gold_pairs(source, target, {"a", "b", "c"}, {"x", "y", "z"}, min_verses=1, min_dice=0.5)
    # Dice(a, x) = 2*2/(2+2) = 1, Dice(b, y) = 1; c's best is y (2*1/(1+2)) but y's best is b
    assert pairs == [("a", "x", 1.0), ("b", "y", 1.0)]


def _corpus(tmp_path, shuffle_target: bool) -> str:
    """Two languages, verse-parallel: the target text is the source text under a word cipher (or, as a control,
    the same text attached to the wrong verse ids)."""
    rng = random.Random(0)
    vocab = [c + v for c in "bcdfghjk" for v in "aeiou"]  # 40 words of letters
    verses = [rng.sample(vocab, 6) for _ in range(400)]
    ids = list(range(1, 401))
    target_ids = rng.sample(ids, len(ids)) if shuffle_target else ids
    for lang, rows in (("en", [(i, " ".join(v)) for i, v in zip(ids, verses)]),
                       ("xx", [(i, " ".join("q" + w[::-1] for w in v)) for i, v in zip(target_ids, verses)])):
        (tmp_path / f"{lang}.jsonl").write_text("".join(json.dumps({"text": t.upper(), "verse_id": 1_000_000 + i})
                                                        + "\n" for i, t in rows))
    data = {"output_dir": str(tmp_path / "data"), "valid_fraction": 0.3,
            "languages": {lang: {"sources": [{"type": "jsonl", "path": str(tmp_path / f"{lang}.jsonl")}]}
                          for lang in ("en", "xx")}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    return str(tmp_path / "data.yaml")


@pytest.mark.parametrize("shuffled", [False, True])
def test_learned_vectors_align_translations_and_are_deterministic(tmp_path, shuffled):
    data = _corpus(tmp_path, shuffled)
    cfg = WordVectorConfig(data=data, output_dir=str(tmp_path / "wv"), dim=12, min_count=1)
    cfg.eval.min_verses = 3
    result = build_word_vectors(cfg)
    summary = json.loads((tmp_path / "wv" / "summary.json").read_text())
    assert summary["words"] == {"en": 40, "xx": 40}  # lower-cased: "BA" is the word "ba"
    vectors = load_word_vectors([VectorFileConfig(str(result.outputs["vectors"]))], ["en", "xx"])
    assert np.allclose(np.linalg.norm(vectors.matrix, axis=1), 1, atol=1e-5)
    alignment = summary["alignment"]["en-xx"]
    if not shuffled:
        assert alignment["pairs"] >= 35 and alignment["p@1"] == 1.0
    else:  # no verse-level correspondence: no gold pair passes Dice 0.5
        assert alignment == {"pairs": 0}
    first = (tmp_path / "wv" / "vectors.bin").read_bytes()
    cfg2 = WordVectorConfig(data=data, output_dir=str(tmp_path / "wv2"), dim=12, min_count=1)
    cfg2.eval.min_verses = 3
    build_word_vectors(cfg2)
    assert (tmp_path / "wv2" / "vectors.bin").read_bytes() == first


def test_vectors_are_made_again_when_a_corpus_changes_in_place(tmp_path):
    """The stage skipped on a hash of its config and the data config's text: a corpus file edited in place kept
    the old vectors, recorded as made from the new data."""
    data = _corpus(tmp_path, False)
    cfg = WordVectorConfig(data=data, output_dir=str(tmp_path / "wv"), dim=12, min_count=1)
    build_word_vectors(cfg)
    first = (tmp_path / "wv" / "vectors.bin").read_bytes()
    build_word_vectors(cfg)  # nothing changed: kept
    assert (tmp_path / "wv" / "vectors.bin").read_bytes() == first
    corpus = tmp_path / "xx.jsonl"
    corpus.write_text(corpus.read_text().replace("QAB", "QZZ"))  # a word of xx renamed
    build_word_vectors(cfg)
    assert (tmp_path / "wv" / "vectors.bin").read_bytes() != first


def test_a_consumer_of_the_vectors_depends_on_their_bytes(tmp_path):
    """Adaptation recorded the vectors by their stage's config digest: learned again from a corpus edited in place
    (the same config) they kept it, and a finished +ofa adaptation was skipped with the old vectors; learned again
    the same (only eval.ks changed) they got a new one, and every finished +ofa adaptation was refused as another
    config's."""
    from minimodel.adaptation.train import AdaptConfig
    from minimodel.provenance import ConfigChanged, claim_output, finish_output

    cfg = WordVectorConfig(data=_corpus(tmp_path, False), output_dir=str(tmp_path / "wv"), dim=12, min_count=1)
    build_word_vectors(cfg)
    adapt = AdaptConfig(primary_model=str(tmp_path / "primary"), output_dir=str(tmp_path / "adapt"),
                        target_langs=["xx"])
    adapt.init.method = "ofa"
    adapt.init.ofa.vectors = [VectorFileConfig(str(tmp_path / "wv" / "vectors.bin"))]
    claim_output(tmp_path / "adapt", adapt, resumable=True)
    finish_output(tmp_path / "adapt", adapt)
    cfg.eval.ks = [1, 5]  # another evaluation of the same vectors
    build_word_vectors(cfg)
    assert claim_output(tmp_path / "adapt", adapt, resumable=True) == "finished"
    corpus = tmp_path / "xx.jsonl"
    corpus.write_text(corpus.read_text().replace("QAB", "QZZ"))
    build_word_vectors(cfg)
    with pytest.raises(ConfigChanged, match=r"vectors.bin was made again since \(made again from the same config: its corpora"):
        claim_output(tmp_path / "adapt", adapt, resumable=True)


def test_vectors_are_made_again_when_the_data_stages_cleaning_or_splitting_changes(tmp_path, monkeypatch):
    """The vectors read the corpora through the data stage's cleaning and split: a new cleaning rule rebuilt the
    data but left the vectors "up to date", learned from the old text."""
    from minimodel.ofa import learn

    cfg = WordVectorConfig(data=_corpus(tmp_path, False), output_dir=str(tmp_path / "wv"), dim=12, min_count=1)
    before = learn._input_hash(cfg)
    assert learn._input_hash(cfg) == before
    for name in ("CLEANING_VERSION", "FORMAT_VERSION"):
        with monkeypatch.context() as patched:
            patched.setattr(learn, name, getattr(learn, name) + 1)
            assert learn._input_hash(cfg) != before, name
