"""Step 3 (fine-tuning through the DeepSpeed loop, embeddings frozen) and step 4 (zero-shot with swapped embeddings)
on a toy verse-parallel Bible: the target language is a cipher of English, so perfectly learned target embeddings
must reproduce the English scores exactly."""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eval_helpers import (cipher, perfect_target_embeddings, source_vocab, swap_embeddings, tiny_mlm, toy_bible,
                          word_tokenizer, write_verses)
from minimodel.config import load_config
from minimodel.evaluation.models import TokenizerMismatchError
from minimodel.evaluation.zero_shot import ZeroShotConfig, zero_shot

REPO = Path(__file__).resolve().parents[1]
EMBEDDINGS = "bert.embeddings.word_embeddings.weight"


def stage_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "torch_extensions"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    verses = toy_bible()
    write_verses(root / "data", "en", verses)
    write_verses(root / "data", "xx", verses, cipher)
    source_tok = word_tokenizer(source_vocab(), root / "data" / "en" / "tokenizer")
    target_words = [cipher(w) for w in source_vocab()] + [f"extra{i}" for i in range(9)]
    random.Random(1).shuffle(target_words)  # target ids differ from the source ids of the same words
    target_tok = word_tokenizer(target_words, root / "data" / "xx" / "tokenizer")
    primary = tiny_mlm(len(source_tok), root / "primary", source_tok)
    store = root / "mlflow"
    cmd = [sys.executable, str(REPO / "evaluate" / "finetune.py"), "--config",
           str(REPO / "configs" / "evaluate" / "verse_class_tiny.yaml"), f"model_dir={primary}",
           f"task.data_dir={root / 'data'}", f"output_dir={root / 'finetune'}", f"tracking.store_dir={store}"]
    proc = subprocess.run(cmd, cwd=root, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"root": root, "primary": primary, "task_model": root / "finetune" / "model", "store": store,
            "source_tok": source_tok, "target_tok": target_tok, "finetune_stdout": proc.stdout}


def test_finetune_freezes_embeddings_bit_identical(world):
    primary = load_file(world["primary"] / "model.safetensors")
    task = load_file(world["task_model"] / "model.safetensors")
    assert torch.equal(task[EMBEDDINGS], primary[EMBEDDINGS])  # bit-identical after training
    # ... while the body did train
    changed = [k for k in task if k in primary and k != EMBEDDINGS and not torch.equal(task[k], primary[k])]
    assert any("encoder.layer.0" in k for k in changed) and "bert.embeddings.position_embeddings.weight" in changed
    import json

    info = json.loads((world["task_model"] / "task.json").read_text())
    assert info["task"] == "verse_class" and info["frozen"] == [EMBEDDINGS]
    metrics = json.loads((world["root"] / "finetune" / "metrics.json").read_text())
    assert metrics["test/accuracy"] > 0.5  # 7 classes: it learned the task (chance ~0.2)
    lines = (world["root"] / "finetune" / "train" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 300 and "compute/flops" in lines[-1]


def _zero_shot_cfg(world, name, **overrides):
    root = world["root"]
    args = [f"output_dir={root / name}", f"task.data_dir={root / 'data'}", f"tracking.store_dir={world['store']}"]
    args += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(ZeroShotConfig, REPO / "configs" / "evaluate" / "zero_shot_tiny.yaml", args)


def test_zero_shot_with_perfect_target_embeddings_matches_source(world):
    from mlflow import MlflowClient
    from transformers import AutoTokenizer

    root = world["root"]
    task_embeddings = load_file(world["task_model"] / "model.safetensors")[EMBEDDINGS]
    target_tok = AutoTokenizer.from_pretrained(root / "data" / "xx" / "tokenizer")
    plugged = swap_embeddings(world["task_model"], perfect_target_embeddings(task_embeddings, world["source_tok"],
                                                                              target_tok), target_tok,
                              root / "plugged_xx")
    cfg = _zero_shot_cfg(world, "zs", method="minijoint", source_model_dir=world["task_model"],
                         targets=f"[{{lang: xx, model_dir: {plugged}, tokenizer: {root / 'data/xx/tokenizer'}, "
                                 f"adapt_step: 7}}]")
    results = zero_shot(cfg)
    assert results["en"]["accuracy"] > 0.5
    assert results["xx"]["accuracy"] == results["en"]["accuracy"]
    assert results["xx"]["n_examples"] == results["en"]["n_examples"] > 50
    assert (root / "zs" / "metrics.json").is_file()

    client = MlflowClient(f"sqlite:///{world['store'] / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("minimodel").experiment_id],
                              "tags.stage = 'evaluate' and tags.method = 'minijoint'")
    by_lang = {r.data.tags["target_lang"]: r for r in runs}
    assert by_lang["xx"].data.tags["role"] == "target" and by_lang["en"].data.tags["role"] == "source"
    assert by_lang["xx"].data.tags["adapt_step"] == "7"
    assert by_lang["xx"].data.metrics["accuracy"] == results["xx"]["accuracy"]


def test_zero_shot_retrieval(world):
    from transformers import AutoTokenizer

    root = world["root"]
    target_tok = AutoTokenizer.from_pretrained(root / "data" / "xx" / "tokenizer")
    embeddings = load_file(world["primary"] / "model.safetensors")[EMBEDDINGS]
    perfect = swap_embeddings(world["primary"], perfect_target_embeddings(embeddings, world["source_tok"], target_tok),
                              target_tok, root / "primary_xx")
    random_rows = torch.randn(len(target_tok), embeddings.shape[1], generator=torch.Generator().manual_seed(0)) * 0.2
    untrained = swap_embeddings(world["primary"], random_rows, target_tok, root / "primary_xx_random")
    targets = (f"[{{lang: xx, model_dir: {perfect}, tokenizer: {root / 'data/xx/tokenizer'}}}, "
               f"{{lang: yy, model_dir: {untrained}, tokenizer: {root / 'data/xx/tokenizer'}}}]")
    (root / "data" / "yy").symlink_to(root / "data" / "xx")
    cfg = _zero_shot_cfg(world, "zs_retrieval", method="standard", source_model_dir=world["primary"],
                         targets=targets, **{"task.name": "verse_retrieval", "retrieval_layer": 1})
    results = zero_shot(cfg)
    assert "en" not in results  # retrieving English from English is no reference
    assert results["xx"] == {"top1": 1.0, "top10": 1.0, "n_examples": results["xx"]["n_examples"], "layer": 1.0}
    assert results["yy"]["top1"] < 0.5  # random target embeddings: near chance (1/n)


def test_mismatched_tokenizer_is_refused(world):
    root = world["root"]
    # the fine-tuned task model (source embeddings) with the target tokenizer: sizes differ
    cfg = _zero_shot_cfg(world, "zs_bad", source_model_dir=world["task_model"], evaluate_source=False,
                         targets=f"[{{lang: xx, model_dir: {world['task_model']}, "
                                 f"tokenizer: {root / 'data/xx/tokenizer'}}}]")
    with pytest.raises(TokenizerMismatchError, match=r"has 112 tokens but .* has 103 token embeddings"):
        zero_shot(cfg)
    # same size, different vocabulary: the model directory carries the tokenizer its embeddings belong to
    other = word_tokenizer([w.upper() for w in source_vocab()], root / "other_tok")
    assert len(other) == len(world["source_tok"])
    cfg = _zero_shot_cfg(world, "zs_bad2", source_model_dir=world["task_model"], evaluate_source=False,
                         targets=f"[{{lang: xx, model_dir: {world['task_model']}, tokenizer: {root / 'other_tok'}}}]")
    with pytest.raises(TokenizerMismatchError, match="carries a different tokenizer"):
        zero_shot(cfg)
