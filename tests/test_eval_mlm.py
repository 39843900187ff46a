"""Zero-shot task target_mlm: the held-out target MLM loss of the primary model with each adaptation checkpoint's
embeddings plugged in memory, and mlm_gain from the run's step-0 snapshot. On the toy cipher Bible the "perfect"
target embeddings (each target word gets its English word's row) must give a much lower loss than random ones."""
import copy
import json
import math
import random

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from eval_helpers import (EMBEDDINGS, REPO, adaptation_artifact, cipher, cipher_token_map,
                          perfect_target_embeddings, plug,
                          source_vocab, tiny_mlm, toy_bible, word_tokenizer, write_indexed_verses, write_verses)
from minimodel.adaptation.plug import plug_model
from minimodel.config import ConfigError, load_config
from minimodel.data.mlm import MaskedLMDataset
from minimodel.data.tokenizer import load_tokenizer
from minimodel.evaluation.models import load_task_model
from minimodel.evaluation.scoring import score_mlm
from minimodel.evaluation.zero_shot import ZeroShotConfig, zero_shot

CONFIG = REPO / "configs" / "evaluate" / "zero_shot" / "target_mlm_tiny.yaml"
SEQ = 32  # tokens per held-out sequence (the toy model has 64 positions)


def _memorize_held_out(model_dir, data_dir, tokenizer, steps=150):
    """Train the primary on exactly the English sequences and masks target_mlm scores (seq 32, mask seed 0): a
    constructed primary that knows the held-out verses, so the loss tells right embeddings from wrong ones."""
    from transformers import AutoModelForMaskedLM

    from minimodel.data.mlm import MaskedLMDataset
    from minimodel.training.hf_mlm import masked_lm_loss

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    data = MaskedLMDataset(data_dir / "en" / "valid", tokenizer, SEQ, seed=0)
    batch = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        loss = masked_lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Toy en + xx (cipher) data with indexed datasets, a pretrained primary, and an adaptation run of xx whose
    snapshots are random at step 0 and 5 (two different draws) and perfect at step 10 and at the end (20)."""
    root = tmp_path_factory.mktemp("target_mlm")
    data = root / "data"
    verses = toy_bible()
    write_verses(data, "en", verses)
    write_verses(data, "xx", verses, cipher)
    source_tok = word_tokenizer(source_vocab(), data / "en" / "tokenizer")
    target_words = [cipher(w) for w in source_vocab()] + [f"extra{i}" for i in range(9)]
    random.Random(1).shuffle(target_words)
    target_tok = word_tokenizer(target_words, data / "xx" / "tokenizer")
    write_indexed_verses(data, "en", source_tok)
    write_indexed_verses(data, "xx", target_tok)
    primary = tiny_mlm(len(source_tok), root / "primary", source_tok)
    _memorize_held_out(primary, data, source_tok)

    rows = load_file(primary / "model.safetensors")[EMBEDDINGS]
    perfect = perfect_target_embeddings(rows, source_tok, target_tok)
    draw = [torch.randn(perfect.shape, generator=torch.Generator().manual_seed(s)) * 0.02 for s in (0, 1)]
    run = adaptation_artifact(root / "adapt" / "xx", perfect, data / "xx" / "tokenizer", primary, "xx", "minipost",
                              steps=20, adapt_run_id="adapt-run-1", snapshots={0: draw[0], 5: draw[1], 10: perfect},
                              token_map=cipher_token_map(source_tok, target_tok))
    return {"root": root, "data": data, "primary": primary, "run": run, "source_tok": source_tok,
            "store": root / "mlflow"}


def _cfg(world, name, **overrides):
    args = [f"output_dir={world['root'] / name}", "method=minipost", f"source_model_dir={world['primary']}",
            f"task.data_dir={world['data']}", f"task.max_length={SEQ}", f"tracking.store_dir={world['store']}",
            f"targets=[{{lang: xx, embeddings: {world['run']}}}]"]
    return load_config(ZeroShotConfig, CONFIG, args + [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def scored(world):
    return zero_shot(_cfg(world, "zs_mlm")).outputs


def _random_draw_losses(world, seeds) -> list[float]:
    """target_mlm's xx loss with random rows drawn as the run's step-0 and step-5 snapshots are (seed s), plugged in
    memory into the primary as zero_shot plugs a snapshot: the spread of the loss over random draws."""
    root, cfg = world["root"], _cfg(world, "unused")
    target_dir = world["data"] / "xx" / "tokenizer"
    shape = load_file(world["run"] / "embeddings.safetensors")["input_embeddings"].shape
    token_map = cipher_token_map(world["source_tok"], load_tokenizer(target_dir))
    primary = load_task_model(world["primary"], "mlm")
    losses = []
    for seed in seeds:
        rows = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
        artifact = adaptation_artifact(root / f"draw_{seed}" / "xx", rows, target_dir, world["primary"], "xx",
                                       "minipost", token_map=token_map)
        model = copy.deepcopy(primary)
        tokenizer, _, _ = plug_model(model, artifact, model_dir=str(world["primary"]),
                                     primary_dir=str(world["primary"]))
        losses.append(score_mlm(cfg.task, model, tokenizer, "xx", "test", 32)["mlm_loss"])
    return losses


def _random_replacement_share(world) -> float:
    """Of the positions target_mlm scores on xx (score_mlm's sequences and masks), the share whose input is a random
    replacement token: the only inputs where perfect rows leave the primary's English (drawn from another
    vocabulary, they are other words)."""
    task = _cfg(world, "unused").task
    tokenizer = load_tokenizer(world["data"] / "xx" / "tokenizer")
    data = MaskedLMDataset(world["data"] / "xx" / "valid", tokenizer, task.max_length, task.mlm_mask_prob,
                           task.mlm_seed)
    n = min(task.max_eval_examples or len(data), len(data))
    scored = replaced = 0
    for i in np.unique(np.linspace(0, len(data) - 1, n).round().astype(int)):
        item = data[int(i)]
        labelled = item["labels"] != -100
        inputs, labels = item["input_ids"][labelled], item["labels"][labelled]
        scored += int(labelled.sum())
        replaced += int(((inputs != tokenizer.mask_token_id) & (inputs != labels)).sum())
    return replaced / scored


def test_perfect_embeddings_give_the_source_loss_and_random_ones_no_gain(world, scored):
    curve = json.loads((world["root"] / "zs_mlm" / "snapshots.json").read_text())["xx"]
    assert set(curve) == {"0", "5", "10"}  # step 20 is the final artifact
    assert "en" not in scored  # no source-language reference for target_mlm
    final = scored["xx"]
    english = score_mlm(_cfg(world, "unused").task, load_task_model(world["primary"], "mlm"), world["source_tok"],
                        "en", "test", 32)
    random_loss = curve["0"]["mlm_loss"]
    # The memorizing primary knows the English held-out masks: far below chance, uniform over its 103 tokens
    # (measured: 0.043 against a bar of 0.46, a tenth of ln 103).
    assert english["mlm_loss"] < 0.1 * math.log(len(world["source_tok"])), english
    # Random rows (x 0.02) give near-uniform predictions over the 112 target tokens: every draw within 5% of ln 112
    # (measured: the run's 4.668 and 4.653 and six more draws 4.63-4.67, against 4.718 +- 0.236).
    draws = _random_draw_losses(world, [0, 2, 3, 4, 5, 6, 7])
    assert draws[0] == pytest.approx(random_loss, rel=1e-6)  # seed 0 re-plugged here is the run's step-0 snapshot
    draws = [random_loss, curve["5"]["mlm_loss"], *draws[1:]]
    assert all(abs(d - math.log(112)) < 0.05 * math.log(112) for d in draws), draws
    # Perfect rows: the primary reads its English in disguise, except at the masking's random replacement tokens
    # (drawn from the other vocabulary, so other words), where it is about as lost as with random rows. So the
    # final loss ~ English + share x (random - English): 0.043 + 0.121 x 4.625 = 0.604 (measured: 0.562; the bar
    # allows a deviation of share x gap = 0.562 either side, measured 0.042).
    share, gap = _random_replacement_share(world), random_loss - english["mlm_loss"]
    assert 0 < share < 0.2  # BERT's recipe: 10% of the scored positions (measured: 17 of 140)
    assert abs(final["mlm_loss"] - (english["mlm_loss"] + share * gap)) < share * gap, (final, english, share)
    assert curve["10"]["mlm_loss"] == final["mlm_loss"]
    assert curve["0"]["mlm_gain"] == 0.0  # the initial embeddings are the zero of the gain
    # Another random draw: no gain beyond the spread of random draws' losses: a difference of two draws stays
    # within 3 x sqrt(2) x their standard deviation (measured: gain 0.015 against a bar of 0.063, sd 0.015).
    noise = 3 * math.sqrt(2) * float(np.std(draws, ddof=1))
    assert abs(curve["5"]["mlm_gain"]) < noise, (curve["5"], draws)
    # The perfect rows' gain is the step-0 loss less the final one, and far beyond that noise (measured: 4.11).
    assert final["mlm_gain"] == pytest.approx(curve["0"]["mlm_loss"] - final["mlm_loss"])
    assert final["mlm_gain"] > noise
    assert final["n_examples"] == curve["0"]["n_examples"] > 10  # the same held-out sequences for every checkpoint


def test_in_memory_plug_scores_what_adapt_plug_writes(world, scored):
    plugged = plug(world["run"], world["primary"], world["primary"], world["root"] / "plugged_primary")
    from minimodel.data.tokenizer import load_tokenizer

    on_disk = score_mlm(_cfg(world, "unused").task, load_task_model(plugged, "mlm"), load_tokenizer(plugged), "xx",
                        "test", 32)
    assert on_disk["mlm_loss"] == pytest.approx(scored["xx"]["mlm_loss"], rel=1e-6)


def test_runs_are_tagged_for_the_report(world, scored):
    client = MlflowClient(f"sqlite:///{world['store'] / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("minimodel").experiment_id], "tags.task = 'target_mlm'")
    by_step = {r.data.tags.get("adapt_step"): r for r in runs}
    assert set(by_step) == {"0", "5", "10", None} and len(runs) == 4
    assert all(r.data.tags["metric"] == "mlm_gain" and r.data.tags["role"] == "target" for r in runs)
    assert {r.data.tags["adapt_run_id"] for r in runs} == {"adapt-run-1"}
    assert by_step[None].data.metrics["mlm_gain"] == scored["xx"]["mlm_gain"]
    # on MLflow's step axis each at its adaptation step: the final embeddings' at the run's 20 (were at 0, beside
    # the initial embeddings)
    steps = {tag: client.get_metric_history(r.info.run_id, "mlm_gain")[0].step for tag, r in by_step.items()}
    assert steps == {"0": 0, "5": 5, "10": 10, None: 20}
    assert {r.data.tags["checkpoint"] for r in runs if r.data.tags.get("adapt_step")} == {"snapshot"}
    assert by_step[None].data.tags["checkpoint"] == "final"


def test_a_run_without_step_0_snapshot_or_run_dir_is_refused(world):
    root = world["root"]
    perfect = load_file(world["run"] / "embeddings.safetensors")["input_embeddings"]
    old = adaptation_artifact(root / "adapt_old" / "xx", perfect, world["data"] / "xx" / "tokenizer",
                              world["primary"], "xx", "minipost", steps=20, snapshots={10: perfect})
    with pytest.raises(ValueError, match="no step-0 snapshot .* adapt again"):
        zero_shot(_cfg(world, "zs_old", targets=f"[{{lang: xx, embeddings: {old}}}]"))
    with pytest.raises(ConfigError, match="targets\\[0\\].embeddings"):
        _cfg(world, "zs_bad", targets=f"[{{lang: xx, model_dir: {world['primary']}, tokenizer: {world['primary']}}}]")
