"""Step 3 (fine-tuning through the DeepSpeed loop, embeddings frozen) and step 4 (zero-shot with swapped embeddings)
on a toy verse-parallel Bible: the target language is a cipher of English, so perfectly learned target embeddings
must reproduce the English scores exactly."""
import dataclasses
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from adapt_helpers import run_and_signal
from eval_helpers import (EMBEDDINGS, REPO, adaptation_artifact, cipher, perfect_target_embeddings, plug,
                          source_vocab, stage_env, tiny_mlm, toy_bible, word_tokenizer, write_verses)
from minimodel.config import ConfigError, load_config
from minimodel.evaluation import EvaluationError
from minimodel.evaluation.models import TokenizerMismatchError, load_task_model
from minimodel.evaluation.scoring import score
from minimodel.evaluation.tasks import TASKS
from minimodel.evaluation.zero_shot import ZeroShotConfig, zero_shot
from minimodel.hf import load_tokenizer
from minimodel.manifest import model_hash
from minimodel.sft.file import SFTError, SparseDiff, SparseFineTuning
from minimodel.training.hf_mlm import max_sequence_length
from minimodel.training.preemption import PREEMPTED_EXIT_CODE
from minipost_helpers import make_model, save_model


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
           str(REPO / "configs" / "evaluate" / "finetune" / "verse_class_tiny.yaml"), f"model_dir={primary}",
           f"task.data_dir={root / 'data'}", f"output_dir={root / 'finetune'}", f"tracking.store_dir={store}",
           "train.steps=200", "train.optim.lr=3e-3", "train.schedule.warmup_steps=20", "train.eval.every=100"]
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
    # It learned the task: at least halfway from the majority class (the chance level of this test set) to perfect
    # (measured: 0.92 against a bar of 0.63, majority 0.26, on this toy world).
    assert metrics["test/accuracy"] > (1 + metrics["test/baseline/majority"]) / 2
    lines = (world["root"] / "finetune" / "train" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 200 and "compute/flops" in lines[-1]


@pytest.mark.slow
def test_finetune_stopped_by_sigterm_checkpoints_exits_75_and_its_rerun_continues_its_run(world, tmp_path):
    """SIGTERM mid-run (Slurm preemption): a checkpoint, exit code 75 and no task model yet (the stage is not done:
    rerunning the same command resumes). The MLflow run ends KILLED and the resumed launch continues it (the old
    code ended it FINISHED and started a second run); a third launch, finished, is skipped (it trained no step,
    saved and scored again, and logged a third run)."""
    from mlflow.tracking import MlflowClient

    out, store = tmp_path / "finetune", tmp_path / "store"
    cmd = [sys.executable, str(REPO / "evaluate" / "finetune.py"), "--config",
           str(REPO / "configs" / "evaluate" / "finetune" / "verse_class_tiny.yaml"), f"model_dir={world['primary']}",
           f"task.data_dir={world['root'] / 'data'}", f"output_dir={out}", f"tracking.store_dir={store}",
           "train.steps=40", "train.checkpoint.save_every=0"]
    sent, code = run_and_signal(cmd, tmp_path / "signal.log", out / "train" / "metrics.jsonl", after_lines=3,
                                env=stage_env(), cwd=tmp_path)
    log = (tmp_path / "signal.log").read_text(errors="replace")
    assert sent and code == PREEMPTED_EXIT_CODE, log[-4000:]
    assert "stop signal received: checkpointed step" in log and "interrupted: run the same command again" in log
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")

    def runs():
        return client.search_runs([client.get_experiment_by_name("minimodel").experiment_id])

    (killed,) = runs()
    assert killed.info.status == "KILLED" and "interrupted_at_step" in killed.data.tags
    for launch in ("resumed", "again"):
        done = subprocess.run(cmd, cwd=tmp_path, env=stage_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        (run,) = runs()
        assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED" and \
            run.data.tags["resumes"] == "1"
        if launch == "resumed":
            metrics = (out / "metrics.json").read_text()
    assert "already fine-tuned with this config: skipping" in done.stderr
    assert (out / "metrics.json").read_text() == metrics


def _zero_shot_cfg(world, name, **overrides):
    root = world["root"]
    args = [f"output_dir={root / name}", f"task.data_dir={root / 'data'}", f"tracking.store_dir={world['store']}"]
    args += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(ZeroShotConfig, REPO / "configs" / "evaluate" / "zero_shot" / "verse_class_tiny.yaml", args)


def _plugged(world, model_dir, name, embeddings, method="minijoint"):
    """`embeddings` for language xx plugged into `model_dir` by adapt/plug.py."""
    root = world["root"]
    artifact = adaptation_artifact(root / f"adapt_{name}", embeddings, root / "data" / "xx" / "tokenizer",
                                   world["primary"], "xx", method)
    return plug(artifact, model_dir, world["primary"], root / name)


@pytest.fixture(scope="module")
def plugged_task_model(world):
    """The task model with perfect xx embeddings: each cipher word gets its English word's row."""
    embeddings = load_file(world["task_model"] / "model.safetensors")[EMBEDDINGS]
    perfect = perfect_target_embeddings(embeddings, world["source_tok"], world["target_tok"])
    return _plugged(world, world["task_model"], "plugged_task_xx", perfect), perfect


def test_plug_changes_only_the_embeddings(world, plugged_task_model):
    plugged_dir, perfect = plugged_task_model
    before = load_file(world["task_model"] / "model.safetensors")
    after = load_file(plugged_dir / "model.safetensors")
    assert set(before) == set(after)
    assert torch.equal(after[EMBEDDINGS], perfect) and not torch.equal(after[EMBEDDINGS][:103], before[EMBEDDINGS])
    assert [k for k in before if k != EMBEDDINGS and not torch.equal(before[k], after[k])] == []
    # its tokenizer (the target's, trained with no length limit) cuts where the model's positions end
    model = AutoModelForSequenceClassification.from_pretrained(plugged_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(plugged_dir, local_files_only=True)
    ids = tokenizer(" ".join(["ambuye"] * 2000), truncation=True, return_tensors="pt")
    assert ids["input_ids"].shape[1] == max_sequence_length(model) < 2000
    assert torch.isfinite(model(**ids).logits).all()


def test_zero_shot_with_perfect_target_embeddings_matches_source(world, plugged_task_model):
    from mlflow import MlflowClient

    root = world["root"]
    cfg = _zero_shot_cfg(world, "zs", method="minijoint", source_model_dir=world["task_model"],
                         targets=f"[{{lang: xx, model_dir: {plugged_task_model[0]}, "
                                 f"tokenizer: {root / 'data/xx/tokenizer'}, adapt_step: 7}}]")
    results = zero_shot(cfg).outputs
    assert results["en"]["accuracy"] > (1 + results["en"]["baseline/majority"]) / 2  # as after fine-tuning above
    assert 1 / 7 < results["en"]["baseline/majority"] < 0.5  # the majority class's share: the chance level
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


def test_a_zero_shot_rerun_under_another_config_leaves_no_earlier_scores(world, monkeypatch):
    """Its scores are replaced whole at its end: a rerun under a changed config that fails before that left the
    earlier config's metrics.json beside the new config.yaml, for the report to read as this config's."""
    from minimodel.evaluation import zero_shot as stage

    cfg = _zero_shot_cfg(world, "zs_rerun", method="none", source_model_dir=world["primary"],
                         targets="[{lang: xx}]", **{"task.name": "verse_retrieval", "retrieval_layer": 1})
    zero_shot(cfg)
    out = Path(cfg.output_dir)
    assert (out / "metrics.json").is_file()

    def fails(*args):
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(stage, "_evaluate_target", fails)
    with pytest.raises(RuntimeError, match="scoring failed"):
        zero_shot(dataclasses.replace(cfg, retrieval_layer=2))
    assert not (out / "metrics.json").exists()
    with pytest.raises(RuntimeError, match="scoring failed"):  # the same config: its finished scores stay
        monkeypatch.undo()
        zero_shot(cfg)
        monkeypatch.setattr(stage, "_evaluate_target", fails)
        zero_shot(cfg)
    assert (out / "metrics.json").is_file()


def test_a_student_task_model_is_scored_only_as_its_method_and_language(tmp_path):
    """A BiStil student task model records its method and target language (vocabulary.json): Swahili's
    bistil@minijoint student was scored and filed as Chichewa's bistil."""
    from minimodel.evaluation.zero_shot import TargetConfig, _check_target
    from minimodel.layout import STUDENT_VOCABULARY

    model = make_model("xlmr")
    (tmp_path / STUDENT_VOCABULARY).write_text(json.dumps({"method": "bistil@minijoint", "target_lang": "sw"}))
    cfg = ZeroShotConfig(method="bistil@minijoint")
    _check_target(cfg, TargetConfig(lang="sw", model_dir=str(tmp_path)), model, model)
    for method, lang, wrong in (("bistil", "sw", "method='bistil@minijoint'"), ("bistil@minijoint", "ny",
                                                                               "target_lang='sw'")):
        with pytest.raises(EvaluationError, match=f"holds {wrong} .* but is evaluated as"):
            _check_target(dataclasses.replace(cfg, method=method), TargetConfig(lang=lang, model_dir=str(tmp_path)),
                          model, model)


def test_zero_shot_retrieval(world):
    root = world["root"]
    embeddings = load_file(world["primary"] / "model.safetensors")[EMBEDDINGS]
    perfect = _plugged(world, world["primary"], "primary_xx",
                       perfect_target_embeddings(embeddings, world["source_tok"], world["target_tok"]), "standard")
    random_rows = torch.randn(len(world["target_tok"]), embeddings.shape[1],
                              generator=torch.Generator().manual_seed(0)) * 0.2
    untrained = _plugged(world, world["primary"], "primary_xx_random", random_rows, "standard")
    tokenizer = root / "data" / "xx" / "tokenizer"
    cfg = _zero_shot_cfg(world, "zs_retrieval", method="standard", source_model_dir=world["primary"],
                         targets=f"[{{lang: xx, model_dir: {perfect}, tokenizer: {tokenizer}}}]",
                         **{"task.name": "verse_retrieval", "retrieval_layer": 1})
    results = zero_shot(cfg).outputs
    assert "en" not in results  # retrieving English from English is no reference
    assert results["xx"] == {"top1": 1.0, "top10": 1.0, "n_examples": results["xx"]["n_examples"], "layer": 1.0}
    [hits] = json.loads((root / "zs_retrieval" / "per_example.json").read_text())["xx"].values()
    assert hits["scores"] == [1.0] * int(results["xx"]["n_examples"])  # each query's top-1 hit
    cfg.targets[0].model_dir = str(untrained)
    random_targets = zero_shot(cfg).outputs["xx"]
    n = random_targets["n_examples"]
    # random target embeddings: chance, 1/n for top1 and 10/n for top10 (1 and 10 expected hits of n). The bars are
    # 5 and 20 hits (P(Binomial(n, 1/n) >= 5) ~ 0.004, 20 = 10 + 3.3 sd). Measured: 1 and 10 hits of 99.
    assert random_targets["top1"] < 5 / n and random_targets["top10"] < 20 / n, random_targets


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


def test_plugged_model_filed_under_wrong_method_is_refused(world, plugged_task_model):
    cfg = _zero_shot_cfg(world, "zs_bad3", method="standard", source_model_dir=world["task_model"],
                         evaluate_source=False, targets=f"[{{lang: xx, model_dir: {plugged_task_model[0]}, "
                                                        f"tokenizer: {world['root'] / 'data/xx/tokenizer'}}}]")
    with pytest.raises(ValueError, match="method='minijoint' embeddings .* fix method"):
        zero_shot(cfg)


def test_a_target_that_is_not_the_plugged_task_model_is_refused(world, plugged_task_model):
    """The primary masked LM plugged for xx, even with the task's labels written into its config (a QA head has no
    labels to tell apart): loaded as a task model its head would be drawn at random."""
    root = world["root"]
    mlm = _plugged(world, world["primary"], "primary_xx_labelled", plugged_task_model[1])
    config = json.loads((mlm / "config.json").read_text())
    task_config = json.loads((world["task_model"] / "config.json").read_text())
    config.update(id2label=task_config["id2label"], label2id=task_config["label2id"])
    (mlm / "config.json").write_text(json.dumps(config))
    cfg = _zero_shot_cfg(world, "zs_mlm_target", method="minijoint", source_model_dir=world["task_model"],
                         evaluate_source=False,
                         targets=f"[{{lang: xx, model_dir: {mlm}, tokenizer: {root / 'data/xx/tokenizer'}}}]")
    with pytest.raises(ValueError, match=r"was saved as \w+ForMaskedLM, the task model .* as \w+ForSequence"
                                         r"Classification \(its head would be drawn at random\)"):
        zero_shot(cfg)


def test_unadapted_baseline_reads_each_target_with_the_source_tokenizer(world):
    """Method none: the task model as fine-tuned, reading the target text with its own (source) tokenizer. yy is
    English under another code: read in full, it scores exactly the source accuracy; xx (a cipher) is all <unk> to
    the source tokenizer: not scored, recorded as unreadable."""
    root = world["root"]
    write_verses(root / "data", "yy", toy_bible())
    cfg = _zero_shot_cfg(world, "zs_none", method="none", source_model_dir=world["task_model"],
                         targets="[{lang: yy}, {lang: xx}]")
    results = zero_shot(cfg).outputs
    assert results["yy"]["accuracy"] == results["en"]["accuracy"] > 0.5 and results["yy"]["unk_fraction"] == 0.0
    assert results["xx"] == {"unk_fraction": 1.0, "unreadable": 1.0}
    assert json.loads((root / "zs_none" / "metrics.json").read_text()) == results
    retrieval = _zero_shot_cfg(world, "zs_none_retrieval", method="none", source_model_dir=world["primary"],
                               targets="[{lang: yy}]", **{"task.name": "verse_retrieval", "retrieval_layer": 1})
    assert zero_shot(retrieval).outputs["yy"]["top1"] == 1.0  # the primary finds each English verse from itself
    with pytest.raises(ConfigError, match=r"targets\[0\]: method none reads each target with the source model"):
        _zero_shot_cfg(world, "zs_none2", method="none", source_model_dir=world["task_model"],
                       targets=f"[{{lang: xx, model_dir: {world['task_model']}, tokenizer: {root / 'data/xx/tokenizer'}}}]")
    with pytest.raises(ConfigError, match="method: none .* cannot be scored on target_mlm: its mlm_gain does not "
                                          "compare tokenizers"):
        _zero_shot_cfg(world, "zs_none3", method="none", source_model_dir=world["primary"],
                       targets="[{lang: xx}]", **{"task.name": "target_mlm"})


@pytest.fixture(scope="module")
def adaptation_run(world):
    """An adaptation run of xx (method minipost) whose snapshots are random (step 10) then perfect (20, 30 = the
    final step), and its final embeddings plugged into the task model."""
    root = world["root"]
    task_embeddings = load_file(world["task_model"] / "model.safetensors")[EMBEDDINGS]
    perfect = perfect_target_embeddings(task_embeddings, world["source_tok"], world["target_tok"])
    random_rows = torch.randn(perfect.shape, generator=torch.Generator().manual_seed(0)) * 0.2
    run = adaptation_artifact(root / "adapt_curve" / "xx", perfect, root / "data" / "xx" / "tokenizer",
                              world["primary"], "xx", "minipost", steps=30, adapt_run_id="adapt-run-1",
                              snapshots={10: random_rows, 20: perfect, 30: perfect})
    return run, plug(run, world["task_model"], world["primary"], root / "plugged_curve")


def test_zero_shot_scores_each_snapshot_of_the_adaptation_run(world, adaptation_run):
    """A target naming its adaptation run (`embeddings`) gets one evaluation run per intermediate snapshot, each
    plugged into the task model in memory: a random snapshot scores low, a perfect one exactly the source score."""
    from mlflow import MlflowClient

    root = world["root"]
    run, plugged = adaptation_run
    cfg = _zero_shot_cfg(world, "zs_curve", method="minipost", source_model_dir=world["task_model"],
                         targets=f"[{{lang: xx, model_dir: {plugged}, tokenizer: {root / 'data/xx/tokenizer'}, "
                                 f"embeddings: {run}}}]")
    results = zero_shot(cfg).outputs
    curve = json.loads((root / "zs_curve" / "snapshots.json").read_text())["xx"]
    assert set(curve) == {"10", "20"}  # step 30 is the final artifact, scored through the plugged model
    assert curve["20"]["accuracy"] == results["xx"]["accuracy"] == results["en"]["accuracy"]
    # a random snapshot scores at chance: at most the majority class's share plus two binomial standard errors
    # (measured: 0.081 against a bar of 0.35; majority 0.26, source 0.91, 99 examples)
    majority, n = curve["10"]["baseline/majority"], curve["10"]["n_examples"]
    assert curve["10"]["accuracy"] < majority + 2 * (majority * (1 - majority) / n) ** 0.5, curve["10"]

    client = MlflowClient(f"sqlite:///{world['store'] / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("minimodel").experiment_id],
                              "tags.method = 'minipost' and tags.role = 'target'")
    by_step = {r.data.tags.get("adapt_step"): r for r in runs}
    assert len(runs) == 3 and set(by_step) == {"10", "20", None}  # None: the final embeddings
    assert all(r.data.tags["adapt_run_id"] == "adapt-run-1" for r in runs)  # the final's from plug.json
    assert by_step["10"].data.metrics["accuracy"] == curve["10"]["accuracy"]
    # each checkpoint's per-example scores, of one set of examples: their means are its accuracy (the report's
    # paired comparisons)
    per_example = json.loads((root / "zs_curve" / "per_example.json").read_text())["xx"]
    assert set(per_example) == {"final", "10", "20"} and len({e["examples"] for e in per_example.values()}) == 1
    for key, metrics in (("final", results["xx"]), ("10", curve["10"]), ("20", curve["20"])):
        scores = per_example[key]["scores"]
        assert len(scores) == metrics["n_examples"] and set(scores) <= {0.0, 1.0}
        assert sum(scores) / len(scores) == pytest.approx(metrics["accuracy"], abs=1e-12)
    # the same directory redone for targets without an adaptation run: the earlier curve is not this config's
    cfg.targets[0].embeddings = None
    zero_shot(cfg)
    assert not (root / "zs_curve" / "snapshots.json").exists()
    assert set(json.loads((root / "zs_curve" / "per_example.json").read_text())["xx"]) == {"final"}


def test_a_snapshot_plugs_in_memory_exactly_as_adapt_plug_writes_it(world, adaptation_run):
    from minimodel.adaptation.artifact import snapshot_dir
    from minimodel.adaptation.plug import plug_model
    from minimodel.evaluation.models import load_task_model

    snapshot = snapshot_dir(adaptation_run[0], 10)
    on_disk = load_file(plug(snapshot, world["task_model"], world["primary"], world["root"] / "plugged_step10")
                        / "model.safetensors")
    model = load_task_model(world["task_model"], "classification")
    plug_model(model, snapshot, model_dir=str(world["task_model"]), primary_dir=str(world["primary"]))
    in_memory = model.state_dict()
    assert set(on_disk) <= set(in_memory)
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)
    assert torch.equal(in_memory[EMBEDDINGS], load_file(snapshot / "embeddings.safetensors")["input_embeddings"])


def test_a_task_model_of_another_primary_is_refused_and_a_plugged_one_keeps_its_task_file(world, adaptation_run,
                                                                                        tmp_path):
    """Plugging read the primary it was given, never the task model's own record of its primary: a task model
    fine-tuned from another primary of the same width was plugged silently; the plugged directory lost task.json."""
    import shutil

    from minimodel.adaptation.plug import plug_model
    from minimodel.manifest import ManifestError

    from minimodel.adaptation.artifact import snapshot_dir

    snapshot = snapshot_dir(adaptation_run[0], 10)
    plugged = plug(snapshot, world["task_model"], world["primary"], tmp_path / "plugged")
    assert (plugged / "task.json").read_text() == (world["task_model"] / "task.json").read_text()
    other = shutil.copytree(world["task_model"], tmp_path / "other_task_model")
    task = json.loads((other / "task.json").read_text())
    task["primary_model"] = {"path": "/models/another-primary", "sha256": "0" * 64}
    (other / "task.json").write_text(json.dumps(task))
    with pytest.raises(ManifestError, match="fine-tuned from /models/another-primary .*plug them into a task model"):
        plug_model(load_task_model(other, "classification"), snapshot, model_dir=str(other),
                   primary_dir=str(world["primary"]))


def _language_sft(world, lang: str, seed: int, out: Path) -> SparseFineTuning:
    """A language SFT of the primary as adapt/sft.py files one: random differences on a few body entries."""
    base = load_file(world["primary"] / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    diffs = {name: SparseDiff(tuple(base[name].shape), torch.randperm(base[name].numel(), generator=g)[:6].sort()[0],
                              torch.randn(6, generator=g) * 0.5)
             for name in (EMBEDDINGS, "bert.encoder.layer.0.attention.self.query.weight")}
    sft = SparseFineTuning(model_hash(world["primary"]), diffs,
                           info={"kind": "language", "method": "lt_sft", "target_lang": lang})
    sft.save(out)
    return sft


@pytest.mark.slow
def test_lt_sft_reads_each_target_through_its_language_sft_composed_with_the_task_sft(world):
    """LT-SFT's step 3 for real (evaluate/finetune.py sparse=true, a classification head whose pooler the
    masked-LM primary lacks) and step 4: zero_shot swaps the source language's SFT for each target's. ya is English
    under another code with the English SFT filed under ya: it must score exactly the source task model; yb, with
    an SFT of its own, exactly the primary + its differences + the task SFT composed by hand."""
    root = world["root"]
    for lang in ("ya", "yb"):
        write_verses(root / "data", lang, toy_bible())
    en = _language_sft(world, "en", 0, root / "sft_en")
    same = SparseFineTuning(en.base_sha256, en.diffs, info={**en.info, "target_lang": "ya"})
    same.save(root / "sft_ya")
    yb = _language_sft(world, "yb", 1, root / "sft_yb")
    out = root / "task_sft"
    cmd = [sys.executable, str(REPO / "evaluate" / "finetune.py"), "--config",
           str(REPO / "configs" / "evaluate" / "finetune" / "verse_class_sft_tiny.yaml"), f"model_dir={world['primary']}",
           f"task.data_dir={root / 'data'}", f"output_dir={out}", "tracking.enabled=false", "method=lt_sft",
           f"language_sft={root / 'sft_en'}", "sft.full_steps=4", "sft.sparse_steps=4", "train.steps=4",
           "train.schedule.warmup_steps=2", "train.eval.every=0", "sft.k=300"]
    proc = subprocess.run(cmd, cwd=root, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    cfg = _zero_shot_cfg(world, "zs_lt_sft", method="lt_sft", source_model_dir=out / "model",
                         targets=f"[{{lang: ya, language_sft: {root / 'sft_ya'}}}, "
                                 f"{{lang: yb, language_sft: {root / 'sft_yb'}}}]")
    results = zero_shot(cfg).outputs
    assert results["ya"] == results["en"]  # the same SFT composed again: the source task model, bit for bit

    task = SparseFineTuning.load(out / "train" / "sft")
    assert {"bert.pooler.dense.weight", "classifier.weight"} <= set(task.abs)  # drawn at load: stored whole
    by_hand = load_task_model(world["primary"], "classification", TASKS["verse_class"].labels)
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for sft in (yb, task):
            for name, d in sft.diffs.items():
                params[name].add_(d.dense())
        for name, value in task.abs.items():
            params[name].copy_(value)
    expected = score(cfg.task, by_hand.eval(), load_tokenizer(world["primary"]), "yb", "test", 64)
    assert results["yb"] == expected

    dense = _zero_shot_cfg(world, "zs_lt_sft_dense", method="lt_sft", source_model_dir=world["task_model"],
                           targets=f"[{{lang: yb, language_sft: {root / 'sft_yb'}}}]")
    with pytest.raises(EvaluationError, match="was not fine-tuned sparsely .* evaluate/finetune.py sparse=true"):
        zero_shot(dense)
    bare = root / "task_sft_bare"  # a task SFT learned with no source-language SFT applied: not LT-SFT's setup
    shutil.copytree(out / "model", bare)
    info = json.loads((bare / "task.json").read_text())
    (bare / "task.json").write_text(json.dumps({**info, "sft": {**info["sft"], "language": None}}))
    with pytest.raises(EvaluationError, match="task SFT was learned over the bare primary"):
        zero_shot(_zero_shot_cfg(world, "zs_lt_sft_bare", method="lt_sft", source_model_dir=bare,
                                 targets=f"[{{lang: yb, language_sft: {root / 'sft_yb'}}}]"))
    wrong = _zero_shot_cfg(world, "zs_lt_sft_wrong", method="lt_sft", source_model_dir=out / "model",
                           targets=f"[{{lang: ya, language_sft: {root / 'sft_yb'}}}]")
    with pytest.raises(SFTError, match="is the language SFT of yb, not of ya"):
        zero_shot(wrong)
    with pytest.raises(ConfigError, match=r"targets\[0\]: method lt_sft reads each target with the primary's"):
        _zero_shot_cfg(world, "zs_lt_sft_bad", method="lt_sft", source_model_dir=out / "model",
                       targets=f"[{{lang: yb, embeddings: {root / 'sft_yb'}}}]")


def test_a_new_task_head_is_drawn_from_its_seed(tmp_path):
    directory = save_model(make_model("xlmr"), tmp_path / "mlm")
    before = torch.get_rng_state()
    heads = [load_task_model(directory, "classification", ("a", "b", "c"), seed=s).classifier.out_proj.weight
             for s in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is left as it was
