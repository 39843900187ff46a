"""MaskedLMDataset: packing, BERT masking, determinism across instances and processes."""
import numpy as np
import pytest
import torch
from corpus_helpers import MARK, book

from minimodel.data.indexed import open_indexed, write_indexed
from minimodel.data.mlm import IGNORE_INDEX, MaskedLMDataset
from minimodel.data.tokenizer import FastEncoder, load_tokenizer, train_tokenizer
from minimodel.training.sampler import MicroBatches, epochs_of

SEQ = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A real tokenizer and indexed dataset: the Gospel of Mark (KJV), one document per verse."""
    root = tmp_path_factory.mktemp("mlm")
    texts = book(MARK)
    tok_dir = train_tokenizer(texts, root / "tokenizer", 500)
    with write_indexed(root / "mark", 500) as writer:
        for ids in FastEncoder(tok_dir).encode(texts):
            writer.add(ids)
    return root / "mark", load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def items(corpus):
    prefix, tokenizer = corpus
    dataset = MaskedLMDataset(prefix, tokenizer, SEQ, seed=1)
    return dataset, [dataset[i] for i in range(len(dataset))]


def test_packing_keeps_every_token_in_order(corpus, items):
    prefix, _ = corpus
    dataset, batch = items
    docs = open_indexed(prefix)
    stream = np.concatenate(docs[0:len(docs)])
    assert dataset.num_tokens == len(stream) and len(dataset) == -(-len(stream) // (SEQ - 2))
    assert np.array_equal(np.concatenate([dataset.tokens(i) for i in range(len(dataset))]), stream)
    for item in batch:
        assert all(item[k].shape == (SEQ,) and item[k].dtype == np.int64 for k in item)
    # only the last sequence is padded
    assert all(item["attention_mask"].all() for item in batch[:-1]) and not batch[-1]["attention_mask"].all()


def test_masking_rate_and_labels(corpus, items):
    _, tokenizer = corpus
    dataset, batch = items
    selected = replaced_by_mask = replaced_randomly = kept = real = 0
    for i, item in enumerate(batch):
        ids, labels, attention = item["input_ids"], item["labels"], item["attention_mask"]
        n = int(attention.sum()) - 2
        original = np.full(SEQ, tokenizer.pad_token_id)
        original[0], original[1:n + 1], original[n + 1] = tokenizer.bos_token_id, dataset.tokens(i), \
            tokenizer.eos_token_id
        chosen = labels != IGNORE_INDEX
        # labels only at masked positions, and they are the original tokens
        assert np.array_equal(labels[chosen], original[chosen])
        assert np.array_equal(ids[~chosen], original[~chosen])
        # <s>, </s> and padding are never masked
        assert ids[0] == tokenizer.bos_token_id and ids[n + 1] == tokenizer.eos_token_id
        assert not chosen[0] and not chosen[n + 1:].any()
        assert (ids[n + 2:] == tokenizer.pad_token_id).all() and not attention[n + 2:].any()
        real += n
        selected += chosen.sum()
        replaced_by_mask += (ids[chosen] == tokenizer.mask_token_id).sum()
        kept += (ids[chosen] == original[chosen]).sum()
        replaced_randomly += ((ids[chosen] != original[chosen]) & (ids[chosen] != tokenizer.mask_token_id)).sum()
        assert not np.isin(ids[chosen & (ids != tokenizer.mask_token_id) & (ids != original)],
                           tokenizer.all_special_ids).any()
    assert 0.13 < selected / real < 0.17
    assert 0.75 < replaced_by_mask / selected < 0.85
    assert 0.07 < replaced_randomly / selected < 0.13 and 0.07 < kept / selected < 0.13


def test_random_replacements_come_from_the_given_ids(corpus, items):
    """BiStil's phase 1 reads one masked stream with the teacher and (mapped) the trimmed student: a replacement the
    student lacks was <unk> to it while the teacher read a real token. The same positions and masks otherwise."""
    prefix, tokenizer = corpus
    dataset, batch = items
    allowed = np.arange(100, 200)
    limited = MaskedLMDataset(prefix, tokenizer, SEQ, seed=1, replacement_ids=allowed)
    replaced = 0
    for i, item in enumerate(batch):
        other = limited[i]
        assert np.array_equal(other["labels"], item["labels"])  # the same positions chosen
        chosen = item["labels"] != IGNORE_INDEX
        random = chosen & (item["input_ids"] != item["labels"]) & (item["input_ids"] != tokenizer.mask_token_id)
        assert np.isin(other["input_ids"][random], allowed).all()
        replaced += random.sum()
    assert replaced > 100


def test_special_tokens_in_the_text_are_never_targets(corpus, tmp_path):
    """Text that spells "<mask>" or "</s>" encodes to those ids with a Hugging Face tokenizer: they stay in the input
    and are never selected (they were, as ordinary tokens); <unk> is a target as in BERT."""
    _, tokenizer = corpus
    specials = [tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id]
    rng = np.random.default_rng(0)
    with write_indexed(tmp_path / "specials", len(tokenizer)) as writer:
        for _ in range(40):
            kind = rng.random(50)
            writer.add(np.where(kind < 0.3, rng.choice(specials, 50),
                                np.where(kind < 0.4, tokenizer.unk_token_id, rng.integers(5, 400, 50))))
        writer.add(np.array(specials))  # a document of specials alone: nothing to select
    dataset = MaskedLMDataset(tmp_path / "specials", tokenizer, SEQ, mask_prob=0.5)
    targets = np.concatenate([item["labels"][item["labels"] != IGNORE_INDEX] for item in map(dataset.__getitem__,
                                                                                                range(len(dataset)))])
    assert targets.size > 500 and not np.isin(targets, specials).any()
    assert (targets == tokenizer.unk_token_id).any()


def test_same_items_in_every_instance_and_process(corpus, items):
    prefix, tokenizer = corpus
    _, batch = items
    again = MaskedLMDataset(prefix, tokenizer, SEQ, seed=1)
    for i in (0, 7, len(again) - 1):
        assert all(np.array_equal(again[i][k], batch[i][k]) for k in batch[i])
    # DataLoader worker processes (and a dataset that was pickled to them) give the same items
    loader = torch.utils.data.DataLoader(again, batch_size=8, num_workers=2, collate_fn=lambda x: x)
    from_workers = [item for chunk in loader for item in chunk]
    assert len(from_workers) == len(batch)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["labels"], b["labels"])
               for a, b in zip(from_workers, batch))
    other_seed = MaskedLMDataset(prefix, str(prefix.parent / "tokenizer"), SEQ, seed=2)
    assert not np.array_equal(other_seed[0]["labels"], batch[0]["labels"])
    assert np.array_equal(other_seed.tokens(0), again.tokens(0))


def test_each_epoch_masks_afresh_and_the_training_sampler_reads_each_epochs_masks(corpus, items):
    """Dynamic masking: epoch e's item i is the same sequence masked anew, a pure function of (seed, epoch, index);
    epoch 0 is the dataset as it was. The one sampler of both training loops reads epoch e from for_epoch(e)."""
    dataset, first = items
    again = dataset.for_epoch(1)
    masked_again = 0
    for i, item in enumerate(first):
        second = again[i]
        assert np.array_equal(dataset.for_epoch(0)[i]["labels"], item["labels"])
        assert np.array_equal(second["labels"], dataset.for_epoch(1)[i]["labels"])  # deterministic
        targets = second["labels"] != IGNORE_INDEX
        assert np.array_equal(second["labels"][targets], dataset.tokens(i)[targets[1:len(dataset.tokens(i)) + 1]])
        masked_again += np.array_equal(second["labels"], item["labels"])
    assert masked_again == 0  # every sequence gets other targets (64 tokens at 15%: a repeat is ~impossible)

    samples = MicroBatches(epochs_of(dataset), seed=3, global_batch=len(dataset), micro_batch=len(dataset),
                           dp_size=1, dp_rank=0, shuffle=False)
    for step, epoch in ((0, 0), (1, 1), (2, 2)):
        [batch] = samples.step(step)
        assert np.array_equal(batch["labels"], np.stack([dataset.for_epoch(epoch)[i]["labels"]
                                                          for i in range(len(dataset))]))
    assert epochs_of(first)(5) is first  # a dataset without epochs is read as it is
