"""`deepspeed --num_gpus 2 evaluate/finetune.py sparse=true language_sft=...`: a task SFT (extractive QA) trained with
a source-language SFT applied, ZeRO-2; the task model it writes is primary + language SFT + task SFT, and nothing
outside the two SFTs' entries moved."""
import json
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from adapt_helpers import deepspeed_command
from process_helpers import tail
from eval_helpers import REPO, mlqa_world, stage_env
from minimodel.evaluation.models import load_task_model
from minimodel.evaluation.scoring import score
from minimodel.evaluation.tasks import TaskConfig
from minimodel.hf import load_tokenizer
from minimodel.manifest import model_hash
from minimodel.sft.file import SparseDiff, SparseFineTuning

pytestmark = pytest.mark.slow

K = 400
EMB, QUERY = "bert.embeddings.word_embeddings.weight", "bert.encoder.layer.1.attention.self.query.weight"


def test_task_sft_with_the_source_language_sft_applied(tmp_path):
    primary, train = mlqa_world(tmp_path)
    base = load_file(primary / "model.safetensors")
    # a language SFT of the primary (as adapt/sft.py writes one): a few embedding and query entries
    lang = SparseFineTuning(model_hash(primary), {
        EMB: SparseDiff(tuple(base[EMB].shape), torch.tensor([3, 40, 41, 100]), torch.tensor([0.5, -0.25, 0.125, 1.0])),
        QUERY: SparseDiff(tuple(base[QUERY].shape), torch.tensor([0, 7]), torch.tensor([0.03, -0.02]))},
        info={"kind": "language", "method": "lt_sft", "target_lang": "en"})
    lang.save(tmp_path / "lang_sft")

    out = tmp_path / "finetune"
    overrides = ["--config", str(REPO / "configs/evaluate/finetune/mlqa.yaml"), f"model_dir={primary}",
                 f"task.data_dir={tmp_path / 'MLQA_V1'}", f"task.train_file={train}", "task.max_length=24",
                 "task.doc_stride=4", "sparse=true", f"language_sft={tmp_path / 'lang_sft'}", f"sft.k={K}",
                 "sft.full_steps=4", "sft.sparse_steps=4", "train.steps=4", "train.schedule.warmup_steps=2",
                 "train.micro_batch_size=4", "train.optim.lr=0.001", "train.optim.weight_decay=0",
                 "train.zero_config=configs/deepspeed/zero2.json",
                 "train.torch_adam=true", "train.checkpoint.save_every=0", "train.eval.batches=2",
                 f"output_dir={out}", "tracking.enabled=false"]
    cmd = deepspeed_command("evaluate/finetune.py", overrides)
    with open(tmp_path / "launch.log", "w") as log:
        proc = subprocess.run(cmd, cwd=tmp_path, env=stage_env(), stdout=log,
                              stderr=subprocess.STDOUT, timeout=1500)
    assert proc.returncode == 0, tail(tmp_path / "launch.log")

    task = SparseFineTuning.load(out / "train" / "sft")
    assert task.base_sha256 == model_hash(primary) and task.info["kind"] == "task"
    assert {"qa_outputs.weight", "qa_outputs.bias"} <= set(task.abs) and not any("qa_outputs" in n for n in task.diffs)
    assert K <= task.numel < K + 20 and task.diffs[EMB].indices.numel() > 0  # embeddings are sparse, not frozen
    metrics = json.loads((out / "metrics.json").read_text())
    # the scores are the composed task model's: re-scored here on the same MLQA test file
    qa = TaskConfig(name="mlqa", data_dir=str(tmp_path / "MLQA_V1"), max_length=24, doc_stride=4)
    assert score(qa, load_task_model(out / "model", "qa").eval(), load_tokenizer(out / "model"), "en", "test", 64) == {
        k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/")}

    # the task model = primary + language SFT + task SFT; outside both SFTs' entries, the primary bit for bit
    model = load_file(out / "model" / "model.safetensors")
    for name, value in base.items():
        if name not in model or name.startswith("cls."):
            continue
        expected = value.clone().flatten()
        touched = torch.zeros(expected.numel(), dtype=torch.bool)
        for sft in (lang, task):
            if name in sft.diffs:
                expected[sft.diffs[name].indices] += sft.diffs[name].values
                touched[sft.diffs[name].indices] = True
        got = model[name].flatten()
        assert torch.equal(got[~touched], value.flatten()[~touched]), name
        np.testing.assert_array_max_ulp(got[touched].numpy(), expected[touched].numpy(), maxulp=1)
