"""Vocabulary extension (tokenizer.mode=extend): the primary's ids kept, target pieces added, source text read as
before."""
from __future__ import annotations

import pytest
import torch
from adapt_helpers import World, extend_args, prepare_tiny_data, pretrain_primary_and_mini, run_deepspeed
from corpus_helpers import JOHN, english_and_swahili
from process_helpers import tail
from safetensors.torch import load_file
from transformers import MegatronBertForMaskedLM

from minimodel.adaptation.extend import extend_tokenizer
from minimodel.adaptation.plug import PlugConfig, plug
from minimodel.data.tokenizer import TokenizerError
from minimodel.hf import load_tokenizer
from minimodel.tiny_hf import train_family_tokenizer


@pytest.fixture(scope="module")
def texts():
    return english_and_swahili(JOHN)


def _ids(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("family", ["xlmr", "bert"])
def test_extension_keeps_the_primary_ids_adds_target_pieces_and_reads_source_text_as_before(tmp_path, texts, family):
    english, swahili = texts
    source_train, source_held_out = english[:700], english[700:]
    base = train_family_tokenizer(family, english, 800, tmp_path / "base")
    summary = extend_tokenizer(tmp_path / "base", swahili[:700], source_train, 300, tmp_path / "extended")
    extended = load_tokenizer(tmp_path / "extended")

    assert summary.base_size == len(base) and len(extended) == len(base) + summary.added
    assert summary.added > 100, summary
    vocab = extended.get_vocab()
    assert all(vocab[piece] == i for piece, i in base.get_vocab().items())  # every primary id kept
    assert extended.all_special_ids == base.all_special_ids
    assert _ids(extended, source_train) == _ids(base, source_train)  # guaranteed on the texts it was checked on
    same = sum(a == b for a, b in zip(_ids(extended, source_held_out), _ids(base, source_held_out)))
    assert same / len(source_held_out) > 0.9, same  # held out: measured 0.955 (xlmr), 0.961 (bert)
    # the point: held-out target text in fewer, longer pieces, the new ones among them
    held_out = swahili[700:]
    before, after = _ids(base, held_out), _ids(extended, held_out)
    assert sum(map(len, after)) < 0.85 * sum(map(len, before))  # measured 0.58 (xlmr), 0.67 (bert)
    assert any(i >= len(base) for ids in after for i in ids)


@pytest.mark.parametrize("family", ["xlmr", "bert"])
def test_tokens_added_to_the_primarys_tokenizer_keep_their_ids(tmp_path, texts, family):
    """Tokens added with add_tokens sit past the tokenizer model's vocabulary: new pieces were placed at their ids,
    and a reload moved them after the new pieces (Unigram: their old ids became placeholders; WordPiece: two tokens
    per id), so text with them read otherwise, and freezing the primary's rows froze the wrong ones."""
    english, swahili = texts
    base = train_family_tokenizer(family, english, 800, tmp_path / "trained")
    base.add_tokens(["<dom>", "zzqq"])
    base.save_pretrained(tmp_path / "base")
    base = load_tokenizer(tmp_path / "base")
    extend_tokenizer(tmp_path / "base", swahili[:700], english[:700], 100, tmp_path / "extended")
    extended = load_tokenizer(tmp_path / "extended")
    vocab = extended.get_vocab()
    assert all(vocab[piece] == i for piece, i in base.get_vocab().items())
    assert len(set(vocab.values())) == len(vocab) == len(extended)  # one token per id
    text = "in the beginning zzqq <dom> was"
    assert _ids(extended, [text]) == _ids(base, [text])


def test_a_bpe_vocabulary_is_refused_naming_the_alternative(tmp_path, texts):
    english, swahili = texts
    train_family_tokenizer("roberta", english, 600, tmp_path / "base")
    with pytest.raises(TokenizerError, match="tokenizer.mode=train"):
        extend_tokenizer(tmp_path / "base", swahili[:100], english[:100], 50, tmp_path / "extended")


def test_a_small_target_text_gives_the_candidates_it_holds(tmp_path, texts):
    """Candidates were learned at a fixed size of 2 x new_pieces + 100: 200 verses of Swahili hold fewer, and the
    error named the data stage's vocabulary settings, which do nothing here. The size is only a buffer: the text's
    own limit will do."""
    english, swahili = texts
    train_family_tokenizer("xlmr", english, 800, tmp_path / "base")
    summary = extend_tokenizer(tmp_path / "base", swahili[:200], english[:200], 2000, tmp_path / "extended")
    assert 0 < summary.added < 2000, summary  # all the text had, not an error


@pytest.mark.slow
def test_extended_adaptation_over_the_mini_model_keeps_the_primary_rows_bit_identical(tmp_path):
    """tokenizer.mode=extend end to end: DeepSpeed adaptation (ZeRO-2) over the mini-model of a briefly pretrained
    world, then plugging into the primary: the primary's rows stay exactly, the new rows train."""
    data_dir = prepare_tiny_data(tmp_path / "data")
    world = World(tmp_path, data_dir, *pretrain_primary_and_mini(data_dir, tmp_path / "models", steps=30))
    out, log = tmp_path / "adapt", tmp_path / "adapt.log"
    rc = run_deepspeed("adapt/train.py", [*extend_args(world, out, "sw", steps=10, micro_batch_size=8),
                                          "train.torch_adam=true"], log)
    assert rc == 0, tail(log)
    primary = MegatronBertForMaskedLM.from_pretrained(world.primary)
    source_rows = primary.get_input_embeddings().weight.detach()
    base = len(load_tokenizer(world.primary))
    extended = load_tokenizer(out / "sw" / "tokenizer")
    assert len(extended) > base + 50
    learned = load_file(str(out / "sw" / "embeddings.safetensors"))["input_embeddings"]
    start = load_file(str(out / "sw" / "snapshots" / "step_0" / "embeddings.safetensors"))["input_embeddings"]
    assert torch.equal(learned[:base], source_rows)  # frozen: the primary's tokens keep their embeddings
    assert not torch.equal(learned[base:], start[base:])  # the new pieces trained
    plugged = plug(PlugConfig(embeddings=str(out / "sw"), model=str(world.primary),
                              output_dir=str(tmp_path / "plugged"))).outputs["plugged"]
    weight = MegatronBertForMaskedLM.from_pretrained(plugged).get_input_embeddings().weight.detach()
    assert torch.equal(weight[:base], source_rows) and torch.equal(weight, learned)
