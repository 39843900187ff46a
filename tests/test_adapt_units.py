"""Adaptation pieces that need no launcher: vocabulary initialisation, what trains, FLOPs accounting, DeepSpeed
config assembly, config validation."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, MegatronBertConfig, MegatronBertForMaskedLM

from minimodel.adaptation.train import AdaptConfig, TrainableConfig, select_trainable
from minimodel.adaptation.vocab import INITIALISERS, install_vocabulary, remap_rows, token_map
from minimodel.config import ConfigError, load_config
from minimodel.training.config import REPO_ROOT, DeepSpeedLoopConfig, OptimizerConfig, ScheduleConfig
from minimodel.training.deepspeed_loop import build_deepspeed_config
from minimodel.training.hf_mlm import MLMFlops, UnsupportedModelError, check_architecture, masked_lm_loss

H, F, V = 32, 64, 50


def _bert(cls=BertForMaskedLM, config_cls=BertConfig, layers=3):
    torch.manual_seed(0)
    return cls(config_cls(vocab_size=V, hidden_size=H, num_hidden_layers=layers, num_attention_heads=2,
                          intermediate_size=F, max_position_embeddings=40))


class _Tok:
    """The slice of a Hugging Face tokenizer that token_map uses."""

    def __init__(self, pieces: list[str], pad=0, unk=1, mask=2):
        self.vocab = {p: i for i, p in enumerate(pieces)}
        self.pad_token_id, self.unk_token_id, self.mask_token_id = pad, unk, mask

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def test_random_init_is_normal_with_zero_padding_row_and_copy_shared_copies_shared_rows():
    source = _Tok(["[PAD]", "[UNK]", "[MASK]", "the", "cat", "dog"])
    target = _Tok(["<pad>", "<unk>", "<mask>", "dog", "mbwa", "the"] + [f"x{i}" for i in range(2000)])
    mapping = token_map(source, target)
    assert mapping[:6].tolist() == [0, 1, 2, 5, -1, 3]  # specials by role, pieces by string
    src_weight = torch.randn(6, H)
    g = torch.Generator().manual_seed(0)
    weight, used = INITIALISERS["random"](src_weight, mapping, target, std=0.02, pad_id=0, generator=g)
    assert torch.all(weight[0] == 0) and (used == -1).all()
    assert abs(weight[1:].std().item() - 0.02) < 0.002 and abs(weight[1:].mean().item()) < 0.002
    weight, used = INITIALISERS["copy_shared"](src_weight, mapping, target, std=0.02, pad_id=0,
                                               generator=torch.Generator().manual_seed(0))
    assert torch.equal(weight[3], src_weight[5]) and torch.equal(weight[5], src_weight[3])
    assert torch.equal(used, mapping)
    assert remap_rows(torch.tensor([10.0, 11, 12, 13, 14, 15]), used[:6]).tolist() == [10, 11, 12, 15, 0, 13]


@pytest.mark.parametrize("model_cls,config_cls", [(BertForMaskedLM, BertConfig),
                                                  (MegatronBertForMaskedLM, MegatronBertConfig)])
def test_only_token_embeddings_and_tied_output_train_by_default_and_each_choice_adds_its_part(model_cls, config_cls):
    model = _bert(model_cls, config_cls)
    install_vocabulary(model, torch.randn(70, H), torch.full((70,), -1), pad_id=1)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.get_output_embeddings().bias.shape == (70,) and model.config.vocab_size == 70
    chosen = select_trainable(model, TrainableConfig())
    assert list(chosen) == ["input_embeddings"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["bert.embeddings.word_embeddings.weight"]
    everything = select_trainable(model, TrainableConfig(position_embeddings=True, embedding_layer_norm=True,
                                                         head_transform=True, head_bias=True))
    assert {"embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight", "output_bias",
            "head.predictions.transform.dense.weight", "head.predictions.transform.LayerNorm.weight"} <= set(everything)
    has_embedding_ln = model_cls is BertForMaskedLM  # MegatronBert is pre-LN: no LayerNorm in its embeddings
    assert ("embeddings.LayerNorm.weight" in everything) == has_embedding_ln
    assert not any(p.requires_grad for p in model.base_model.encoder.parameters())


@pytest.mark.parametrize("family", ["xlmr", "bert"])
def test_an_untied_model_with_a_new_vocabulary_saves_and_loads_back_the_same(family, tmp_path):
    """Untied output embeddings: the head's own bias beside the decoder's must follow the resize as a tensor of its
    own (XLM-R: the save did not load, a size mismatch; BERT: the reload drew the decoder's bias at random)."""
    from transformers import AutoModelForMaskedLM, XLMRobertaConfig, XLMRobertaForMaskedLM

    config_cls, model_cls, pad, ids = {
        "xlmr": (XLMRobertaConfig, XLMRobertaForMaskedLM, 1, {"bos_token_id": 0, "eos_token_id": 2,
                                                              "max_position_embeddings": 40}),
        "bert": (BertConfig, BertForMaskedLM, 0, {})}[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(vocab_size=90, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=F, pad_token_id=pad, tie_word_embeddings=False, **ids)).eval()
    with torch.no_grad():
        model.get_output_embeddings().bias.normal_()
    install_vocabulary(model, torch.randn(60, H), torch.arange(60) - 10, pad_id=pad)  # 10 new rows, 50 kept
    batch = torch.tensor([[0, 5, 17, 42, 2]])
    expected = model(input_ids=batch).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(again(input_ids=batch).logits, expected, rtol=0, atol=1e-6)


def test_copied_rows_of_an_untied_model_keep_their_own_output_rows():
    """copy_shared (or OFA's copies) over a model with untied output embeddings: a token the target vocabulary
    shares predicts as it did (its output row was its input row before). With the source vocabulary itself as the
    target, the model is unchanged."""
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=F, tie_word_embeddings=False)).eval()
    batch = torch.tensor([[2, 5, 7, 9, 3]])
    before = model(input_ids=batch).logits
    source = model.get_input_embeddings().weight.detach().clone()
    weight, used = INITIALISERS["copy_shared"](source, torch.arange(V), None, std=0.02, pad_id=0,
                                               generator=torch.Generator().manual_seed(0))
    install_vocabulary(model, weight, used, pad_id=0)
    torch.testing.assert_close(model(input_ids=batch).logits, before, rtol=0, atol=1e-6)


def test_flops_follow_the_shapes_and_what_requires_grad():
    model = _bert(MegatronBertForMaskedLM, MegatronBertConfig, layers=3)
    select_trainable(model, TrainableConfig())
    batch = {"input_ids": torch.randint(5, V, (4, 16)), "labels": torch.full((4, 16), -100),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    batch["labels"][:, :3] = 7  # 12 masked positions
    s, n = 16, 12
    linear, attention = 2 * s * (4 * H * H + 2 * H * F), 4 * s * s * H
    frozen_layer = linear + attention + linear + 2 * attention  # forward + activation gradients
    head = 2 * n * (H * H + H * V) * 2 + 2 * n * H * V  # forward + activation grads + decoder weight grads
    assert MLMFlops(model)(batch) == 4 * 3 * frozen_layer + head
    # MiniPost's shape: frozen layers 1-2 below the only trainable layer 3 need no backward at all.
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.bert.encoder.layer[2].parameters():
        p.requires_grad_(True)
    trainable_layer = linear + attention + 2 * linear + 2 * attention
    head_no_weights = 2 * n * (H * H + H * V) * 2
    assert MLMFlops(model)(batch) == 4 * (2 * (linear + attention) + trainable_layer) + head_no_weights
    # A head of its own on a frozen body (MiniPost's head_only): the dense layer's weight gradient needs the
    # gradient through the frozen projection, not through the dense layer to the body.
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.cls.predictions.transform.parameters():
        p.requires_grad_(True)
    head_only = 2 * n * (H * H + H * V) + 2 * n * H * V + 2 * n * H * H  # forward + projection grad + dense weights
    assert MLMFlops(model)(batch) == 4 * 3 * (linear + attention) + head_only
    loss = masked_lm_loss(model, batch)
    assert loss.ndim == 0 and loss.item() > 0


@pytest.mark.parametrize("buckets", [8, -1])
def test_flops_count_debertas_relative_attention_as_torch_counts_it(buckets):
    """DeBERTa scores every position against 2k relative positions twice (c2p, p2c) and projects the relative
    embeddings in every layer: about as much again as BERT's attention at k = 256, s = 512, which was left out.
    The forward part is checked against torch's own FLOP counter (the body frozen: forward only)."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    torch.manual_seed(0)
    model = DebertaV2ForMaskedLM(DebertaV2Config(
        vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=F,
        max_position_embeddings=40, relative_attention=True, position_buckets=buckets, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, norm_rel_ebd="layer_norm", legacy=True)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    batch = {"input_ids": torch.randint(5, V, (3, 20)), "labels": torch.full((3, 20), -100),
             "attention_mask": torch.ones(3, 20, dtype=torch.long)}
    batch["labels"][:, 4:9] = 7
    with torch.no_grad(), FlopCounterMode(display=False) as counted:
        masked_lm_loss(model, batch)
    assert MLMFlops(model)(batch) == counted.get_total_flops()
    flops = MLMFlops(model)
    assert flops.relative_span == (8 if buckets > 0 else 40) and flops.relative_terms == 2
    headless = DebertaV2ForMaskedLM(DebertaV2Config(vocab_size=V, hidden_size=H, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=F, legacy=False))
    with pytest.raises(UnsupportedModelError, match="not a projection onto its vocabulary"):
        check_architecture(headless, "model")  # the non-legacy head: was a TypeError traceback


def _counted_with_backward(model, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counted:
        masked_lm_loss(model, batch).backward()
    return counted.get_total_flops()


def test_training_flops_equal_torchs_count_of_forward_and_backward():
    """Two over-counts against torch's counter of the real forward + backward: DeBERTa's relative attention in a
    frozen layer (its relative keys need no gradient there: once, not twice) and, in a post-LN model (BERT, XLM-R),
    the lowest trainable layer's Q, K, V (their input needs no gradient when nothing below trains: MiniPost's new
    layers over its frozen ones)."""
    from transformers import DebertaV2Config, DebertaV2ForMaskedLM

    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(5, V, (3, 20)), "labels": torch.full((3, 20), -100),
             "attention_mask": torch.ones(3, 20, dtype=torch.long)}
    batch["labels"][:, 4:9] = 7
    deberta = DebertaV2ForMaskedLM(DebertaV2Config(
        vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=F,
        max_position_embeddings=40, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"],
        position_biased_input=False, norm_rel_ebd="layer_norm", legacy=True))
    select_trainable(deberta, TrainableConfig())  # adaptation: the embeddings train, the body is frozen
    assert MLMFlops(deberta)(batch) == _counted_with_backward(deberta, batch)
    bert = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=F, attn_implementation="eager"))  # torch counts no SDPA
    for p in bert.parameters():
        p.requires_grad_(False)
    for p in bert.bert.encoder.layer[2].parameters():
        p.requires_grad_(True)
    assert MLMFlops(bert)(batch) == _counted_with_backward(bert, batch)
    for p in bert.bert.encoder.layer[1].parameters():  # the layer above the lowest trainable one: counted whole
        p.requires_grad_(True)
    assert MLMFlops(bert)(batch) == _counted_with_backward(bert, batch)


def test_masked_lm_loss_equals_the_models_own_loss():
    model = _bert(BertForMaskedLM, BertConfig).eval()
    ids = torch.randint(5, V, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[:, 2:5] = ids[:, 2:5]
    ours = masked_lm_loss(model, {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)})
    theirs = model(input_ids=ids, labels=labels).loss
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_deepspeed_config_is_assembled_at_runtime_and_refuses_clashes(tmp_path):
    for stage in (0, 1, 2, 3):
        cfg = DeepSpeedLoopConfig(zero_config=f"configs/deepspeed/zero{stage}.json", steps=10,
                                  schedule=ScheduleConfig(warmup_steps=2), micro_batch_size=4, grad_accumulation=3,
                                  optim=OptimizerConfig(grad_clip=0.5))
        ds = build_deepspeed_config(cfg, "fp32")
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
        assert ds["scheduler"]["params"]["total_num_steps"] == 11 and ds["bf16"] == {"enabled": False}
    offload = json.loads((REPO_ROOT / "configs/deepspeed/zero2_offload.json").read_text())
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert build_deepspeed_config(DeepSpeedLoopConfig(), "bf16")["bf16"] == {"enabled": True}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 1}, "optimizer": {"type": "SGD"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        build_deepspeed_config(DeepSpeedLoopConfig(zero_config=str(bad)), "fp32")
    with pytest.raises(ConfigError, match="zero_config.*shipped"):
        load_config(AdaptConfig, overrides=["primary_model=p", "over=full", "train.zero_config=nope.json"])
    # bf16 at stage 0 would save bf16 roundings (its optimizer's fp32 masters cannot be read back): refused at load
    # when set, where "auto" resolves to it at run time; a json without a zero_optimization section is stage 0
    stage0 = ["primary_model=p", "over=full", "train.zero_config=configs/deepspeed/zero0.json"]
    with pytest.raises(ConfigError, match="zero0.json is ZeRO stage 0, whose bf16 optimizer keeps no fp32 copy"):
        load_config(AdaptConfig, overrides=[*stage0, "train.precision=bf16"])
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    for zero_config in ("configs/deepspeed/zero0.json", str(plain)):
        cfg = DeepSpeedLoopConfig(zero_config=zero_config)
        assert cfg.zero_stage() == 0 and build_deepspeed_config(cfg, "fp32")["bf16"] == {"enabled": False}
        with pytest.raises(ConfigError, match="stage 0, whose bf16 optimizer"):
            build_deepspeed_config(cfg, "bf16")


def test_adapt_config_names_the_problem():
    with pytest.raises(ConfigError, match="mini_model"):
        load_config(AdaptConfig, overrides=["primary_model=p", "over=mini"])
    with pytest.raises(ConfigError, match="target_lang"):
        load_config(AdaptConfig, overrides=["primary_model=p", "over=full", "target_langs=[sw,ny]",
                                            "target_lang=fr"])
    with pytest.raises(ConfigError, match="init.method"):
        load_config(AdaptConfig, overrides=["primary_model=p", "over=full", "init.method=glove"])
    with pytest.raises(ConfigError, match="method: 'none' is the unadapted baseline"):
        load_config(AdaptConfig, overrides=["primary_model=p", "over=full", "method=none"])
    cfg = load_config(AdaptConfig, REPO_ROOT / "configs/adapt/default.yaml", ["over=full", "target_lang=ny"])
    assert cfg.languages() == ["ny"] and cfg.train.precision == "auto"
    assert cfg.snapshot_interval == 5000
    tiny = load_config(AdaptConfig, REPO_ROOT / "configs/adapt/tiny.yaml", ["primary_model=p", "over=full"])
    assert tiny.snapshot_every is None and tiny.snapshot_interval == tiny.train.eval.every  # unset: at every eval
    with pytest.raises(ConfigError, match="snapshot_every"):
        load_config(AdaptConfig, overrides=["primary_model=p", "over=full", "snapshot_every=-1"])
    # tokenizer.mode=extend keeps the primary's rows: nothing may train or approximate them
    extend = ["primary_model=p", "over=full", "tokenizer.mode=extend", "init.method=copy_shared"]
    load_config(AdaptConfig, overrides=extend)
    for setting, key in (("embedding.factorized_dim=8", "embedding.factorized_dim: with tokenizer.freeze_source_rows"),
                         ("trainable.head_bias=true", "trainable.head_bias: would train the output bias")):
        with pytest.raises(ConfigError, match=key):
            load_config(AdaptConfig, overrides=[*extend, setting])
        load_config(AdaptConfig, overrides=[*extend, setting, "tokenizer.freeze_source_rows=false"])


def _record_many(output_dir: str, worker: int) -> None:
    from pathlib import Path

    from minimodel.adaptation.train import record_statuses

    for i in range(25):
        record_statuses(Path(output_dir), {f"l{worker}_{i}": "done"})


def test_a_run_does_not_depend_on_what_it_does_not_read(tmp_path):
    """Word vectors learned again (a mini-model built again) leave a random-init adaptation of the full model
    finished (the old code recorded init.ofa.vectors and mini_model as inputs of every run and refused it as another
    config's); an OFA run reading the vectors is refused."""
    from minimodel.adaptation.train import claim_language
    from minimodel.provenance import ConfigChanged, claim_output, finish_output

    vectors, mini = tmp_path / "word_vectors", tmp_path / "mini"  # stages' results, as they record them
    for made in (vectors, mini):
        claim_output(made, AdaptConfig(), resumable=False)
        finish_output(made, AdaptConfig())
    (tmp_path / "data" / "sw").mkdir(parents=True)
    runs = {}
    for method in ("random", "ofa"):
        cfg = load_config(AdaptConfig, overrides=[f"output_dir={tmp_path / method}", "primary_model=p", "over=full",
                                                  f"data_dir={tmp_path / 'data'}",
                                                  f"mini_model={tmp_path / 'mini'}", f"init.method={method}",
                                                  f"init.ofa.vectors=[{{path: {vectors / 'vectors.bin'}}}]"])
        run_dir, lang_cfg, _ = claim_language(cfg, "sw", {})
        finish_output(run_dir, lang_cfg, lang_cfg.neutral_keys())
        runs[method] = cfg
    for made in (vectors, mini):  # made again, under another config
        claim_output(made, AdaptConfig(seq_length=64), resumable=False)
        finish_output(made, AdaptConfig(seq_length=64))
    assert claim_language(runs["random"], "sw", {})[2] == "finished"
    with pytest.raises(ConfigChanged, match=r"init.ofa.vectors\[0\].path: .*vectors.bin was made again"):
        claim_language(runs["ofa"], "sw", {})


def test_concurrent_array_tasks_keep_every_status_in_summary_json(tmp_path):
    """Slurm array tasks (one language each) of one output_dir update summary.json at the same time."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(_record_many, [(str(tmp_path), w) for w in range(4)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {f"l{w}_{i}": "done" for w in range(4) for i in range(25)}
    assert not list(tmp_path.glob("*.tmp"))


def test_extend_saves_the_primarys_rows_exactly_even_after_a_bf16_cast():
    """bf16 training casts the module before DeepSpeed makes its fp32 masters: the frozen rows never move, but what
    is read back of them is rounded. The saved embeddings take them from before the cast."""
    from minimodel.adaptation.train import FrozenRows
    from minimodel.sft.train import GradientHooks

    weight = torch.nn.Parameter(torch.randn(10, 4, generator=torch.Generator().manual_seed(0)))
    rows = FrozenRows(GradientHooks({}, {}, {}), {"input_embeddings": weight.detach()[:6].clone()})
    gathered = weight.detach().bfloat16().float()  # the masters after a bf16 cast
    gathered[6:] += 1.0  # the new rows trained
    saved = rows.restore({"input_embeddings": gathered, "other": torch.ones(2)})["input_embeddings"]
    assert torch.equal(saved[:6], weight.detach()[:6]) and torch.equal(saved[6:], gathered[6:])
