"""BiStil's vocabulary trimming: which ids stay, the trimmed tokenizer of each family re-tokenises to the old ids
mapped to new ones, and the trimmed model computes the same logits over the kept tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from corpus_helpers import JOHN, english_and_swahili

from minimodel.bistil.trim import install_rows, kept_ids, token_counts, trim_tokenizer
from minimodel.data.indexed import write_indexed
from minimodel.hf import load_tokenizer
from minimodel.tiny_hf import FAMILIES, train_family_tokenizer


def test_kept_ids_are_the_frequent_ones_of_either_corpus_plus_specials_in_order():
    source = np.array([500, 0, 300, 200, 0, 0])  # relative frequencies .5 0 .3 .2 0 0
    target = np.array([0, 0, 0, 1, 9, 0])  # .1 at id 3, .9 at id 4
    assert kept_ids([source, target], special_ids=[5], threshold=0.25).tolist() == [0, 2, 4, 5]
    assert kept_ids([source, target], special_ids=[], threshold=0.1).tolist() == [0, 2, 3, 4]  # >= is kept
    with pytest.raises(ValueError, match="empty corpus"):
        kept_ids([np.zeros(6, dtype=int)], special_ids=[])


def test_token_counts_read_an_indexed_dataset(tmp_path):
    with write_indexed(tmp_path / "train", vocab_size=10) as w:
        w.add(np.array([1, 2, 2]))
        w.add(np.array([9, 2]))
    assert token_counts(tmp_path / "train", 10).tolist() == [0, 1, 3, 0, 0, 0, 0, 0, 0, 1]


@pytest.fixture(scope="module")
def texts():
    return english_and_swahili(JOHN)


@pytest.mark.parametrize("family", ["xlmr", "bert", "roberta"])
def test_the_trimmed_tokenizer_retokenises_to_the_old_ids_mapped(tmp_path, texts, family):
    english, swahili = texts
    tokenizer = train_family_tokenizer(family, english + swahili, 600, tmp_path / "full")
    counts = []
    for corpus in (english[:400], swahili[:400]):  # the trimming corpora
        ids = np.concatenate([tokenizer(t, add_special_tokens=False)["input_ids"] for t in corpus])
        counts.append(np.bincount(ids, minlength=len(tokenizer)))
    kept = kept_ids(counts, tokenizer.all_special_ids, threshold=1e-3)
    assert 50 < len(kept) < len(tokenizer) - 50  # the threshold really drops tokens
    new_to_old = trim_tokenizer(tmp_path / "full", kept, tmp_path / "trimmed")
    trimmed = load_tokenizer(tmp_path / "trimmed")
    assert len(trimmed) == len(new_to_old) and np.all(np.diff(new_to_old) > 0)  # numbered in old order
    if family == "roberta":  # BPE keeps the parts its kept tokens are merged from, nothing else
        assert set(kept) <= set(new_to_old.tolist())
    else:
        assert new_to_old.tolist() == kept.tolist()
    old_to_new = {int(o): n for n, o in enumerate(new_to_old)}
    assert {old_to_new[i] for i in tokenizer.all_special_ids} == set(trimmed.all_special_ids)
    assert trimmed.pad_token_id == old_to_new[tokenizer.pad_token_id]

    # as a block of a larger vocabulary: specials keep their ids, the other pieces from 1000 on
    specials = set(tokenizer.all_special_ids)
    block = {**{old: 1000 + n for n, old in enumerate(o for o in new_to_old.tolist() if o not in specials)},
             **{old: old for old in specials}}
    trim_tokenizer(tmp_path / "full", kept, tmp_path / "block",
                   renumber=lambda rows: {int(o): block[int(o)] for o in rows})
    in_block = load_tokenizer(tmp_path / "block")

    checked = 0
    for text in english[400:] + swahili[400:]:  # held out: every text whose old tokens were all kept
        old = tokenizer(text)["input_ids"]
        if all(i in old_to_new for i in old):
            assert trimmed(text)["input_ids"] == [old_to_new[i] for i in old], text
            assert in_block(text)["input_ids"] == [block[i] for i in old], text
            checked += 1
    assert checked >= 20, checked

    # specials moved too (a two-teacher student's target block takes the source's special ids): text the vocabulary
    # lacks must still read as the unknown token at its new id (transformers 5's XLMRobertaTokenizer class put it at
    # 3 whatever tokenizer.json said: here the old </s>)
    moved = {**block, **{old: new for new, old in enumerate(sorted(specials, reverse=True))}}
    trim_tokenizer(tmp_path / "full", kept, tmp_path / "moved",
                   renumber=lambda rows: {int(o): moved[int(o)] for o in rows})
    in_moved = load_tokenizer(tmp_path / "moved")
    # "God" is kept in every family; byte-level BPE has no unknown token (ζ reads as two bytes the trimming drops)
    text = "God" if family == "roberta" else "ζ God"
    old = tokenizer(text)["input_ids"]
    assert all(i in old_to_new for i in old), tokenizer.convert_ids_to_tokens(old)
    assert (tokenizer.unk_token_id in old) == (family != "roberta")
    assert moved[tokenizer.unk_token_id] != tokenizer.unk_token_id
    assert in_moved(text)["input_ids"] == [moved[i] for i in old]


@pytest.mark.parametrize("family", ["xlmr", "bert"])
def test_the_trimmed_model_gives_the_old_logits_of_the_kept_tokens(family):
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32, pad_token_id=1,
                                                 max_position_embeddings=40)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().bias.normal_()  # a bias that is not all zeros
    kept = np.array([0, 1, 2, 3, 7, 8, 20, 41, 49])
    ids = torch.tensor([[0, 7, 20, 8, 41, 2, 1, 1]])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=(ids != 1).long()).logits[..., kept]
    install_rows(model, [(model, kept)], pad_id=1)
    new = torch.as_tensor(np.searchsorted(kept, ids.numpy()))
    with torch.no_grad():
        after = model(input_ids=new, attention_mask=(new != 1).long()).logits
    assert model.config.vocab_size == len(kept)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_bpe_keeps_the_parts_of_every_merge_that_makes_a_kept_token():
    """"abc" is made by "ab c" or "a bc", whichever the word's merge ranks reach first: both paths stay, or a word
    the teacher read as "abc" via "bc" is cut differently after trimming."""
    from minimodel.bistil.trim import _bpe_closure

    model = {"merges": ["b c", "a b", "ab c", "a bc", "x y"]}
    assert _bpe_closure(model, {"abc"}) == {"abc", "ab", "bc", "a", "b", "c"}
