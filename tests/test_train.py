"""`run_training` on tiny local models and data: every input path, the run directory, resuming after kill -9."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from safetensors import safe_open

import tenslora
from tenslora.app.modeling import checkpoint_pooling
from tenslora.app.options import TrainOptions, adapter_config
from tenslora.app.pooling import MeanPoolingForSequenceClassification
from tenslora.app.train import evaluate_run, prepare, run_training, training_arguments
from tiny_tasks import save_image_model, save_text_model, write_image_folder, write_pair_task, write_text_files

FAST = dict(epochs=2, batch_size=8, lr=1e-2, max_length=32, bf16=False)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """Tiny models (BERT with sentence-transformers pooling files, RoBERTa, ELECTRA, ViT) and data files."""
    root = tmp_path_factory.mktemp("tiny")
    save_text_model(root / "bert", sentence_transformers=True)
    save_text_model(root / "roberta", "roberta")
    save_text_model(root / "electra", "electra")
    save_image_model(root / "vit")
    write_pair_task(root / "mrpc")
    write_text_files(root / "reviews")
    write_image_folder(root / "images")
    return root


def _history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as handle:
        return list(csv.DictReader(handle))


def test_text_pair_task_writes_adapter_metrics_and_history(tiny, tmp_path):
    """GLUE MRPC's schema from local files, RoBERTa with its stock head: the paper's text benchmark path."""
    out = tmp_path / "run"
    metrics = run_training(TrainOptions(task="glue-mrpc", data_dir=str(tiny / "mrpc"), model=str(tiny / "roberta"),
                                        output_dir=str(out), **FAST))
    assert {"accuracy", "f1"} <= set(metrics["test"]) and {"accuracy", "f1"} <= set(metrics["validation"])
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert [float(row["epoch"]) for row in _history(out)] == [1.0, 2.0]
    assert {"eval_accuracy", "eval_f1", "train_loss"} <= set(_history(out)[0])
    assert (out / "adapter_config.json").is_file() and (out / "tokenizer.json").is_file()
    with safe_open(out / "adapter_model.safetensors", framework="pt") as weights:
        keys = list(weights.keys())
    assert any("tenslora_tensors" in key for key in keys) and any("classifier" in key for key in keys)
    config = tenslora.TensLoraConfig(construction="qkv_depth", ranks=8)
    head = metrics["trainable_parameters"] - metrics["adapter_parameters"]
    assert metrics["adapter_parameters"] == tenslora.count_parameters(config, {"hidden_size": 32,
                                                                               "num_hidden_layers": 2,
                                                                               "num_attention_heads": 4})
    assert head == 32 * 32 + 32 + 32 * 2 + 2  # RoBERTa's head: dense + out_proj
    run = json.loads((out / "run.json").read_text())
    assert run["labels"] == ["not_equivalent", "equivalent"] and run["pooling"] == "cls"
    assert run["options"]["data_dir"] == str(tiny / "mrpc")  # recorded absolute


def test_image_folder_task(tiny, tmp_path):
    out = tmp_path / "run"
    metrics = run_training(TrainOptions(image_root=str(tiny / "images"), model=str(tiny / "vit"),
                                        output_dir=str(out), construction="att_qkv_depth", **FAST))
    assert len(_history(out)) == 2
    assert evaluate_run(str(out))["test_accuracy"] == metrics["test"]["accuracy"]  # reloads with its processor
    assert json.loads((out / "run.json").read_text())["labels"] == ["blue", "red"]
    assert (out / "preprocessor_config.json").is_file()


@pytest.mark.parametrize(("modules", "problem"), [("[{", "does not parse as JSON"),
                                                  ('{"path": "1_Pooling"}', "holds a JSON dict, not a list")])
def test_a_damaged_sentence_transformers_file_is_named(tiny, tmp_path, modules, problem):
    checkpoint = tmp_path / "bert"
    shutil.copytree(tiny / "bert", checkpoint)
    (checkpoint / "modules.json").write_text(modules)
    with pytest.raises(ValueError, match=problem) as error:
        checkpoint_pooling(str(checkpoint))
    assert "modules.json" in str(error.value) and "--pooling mean|cls" in str(error.value)


def test_custom_files_mean_pooling_and_budget(tiny, tmp_path):
    """Own CSV files with other column names; sentence-transformers checkpoint -> mean pooling; isoparameter ranks."""
    files = write_text_files(tmp_path / "data")
    options = TrainOptions(train_file=str(files["train"]), validation_file=str(files["validation"]),
                           test_file=str(files["test"]), text_column="review", label_column="stars",
                           model=str(tiny / "bert"), budget="lora:4", output_dir=str(tmp_path / "run"), **FAST)
    assert checkpoint_pooling(str(tiny / "bert")) == "mean"
    prepared = prepare(options)
    assert isinstance(prepared.model.get_base_model(), MeanPoolingForSequenceClassification)
    lora = tenslora.lora_parameter_count(4, prepared.model.config)
    assert prepared.run["adapter"]["ranks"] == tenslora.match_budget("qkv_depth", "tucker", lora,
                                                                      prepared.model.config)
    assert lora / 2 <= prepared.run["adapter_parameters"] <= 2 * lora
    trainable = {name for name, p in prepared.model.named_parameters() if p.requires_grad}
    assert any("classifier" in name for name in trainable)  # the head is trained (and saved) with the adapter
    assert all("tenslora" in name or "classifier" in name for name in trainable)
    metrics = run_training(options)
    assert metrics["task"] == "custom" and metrics["adapter"]["ranks"] == prepared.run["adapter"]["ranks"]


def test_builtin_default_task_on_a_subset(tiny, tmp_path):
    """No task given: WordNet supersenses (shipped in the package), here on a few examples."""
    metrics = run_training(TrainOptions(model=str(tiny / "bert"), max_train_samples=24, max_eval_samples=8,
                                        output_dir=str(tmp_path / "run"), **{**FAST, "epochs": 1}))
    assert metrics["task"] == "wordnet-supersense" and metrics["train_samples"] == 24
    assert len(json.loads((tmp_path / "run" / "run.json").read_text())["labels"]) == 41


def test_head_only_trains_only_the_head(tiny, tmp_path):
    options = TrainOptions(task="glue-mrpc", data_dir=str(tiny / "mrpc"), model=str(tiny / "bert"), head_only=True,
                           output_dir=str(tmp_path / "run"), **FAST)
    prepared = prepare(options)
    trainable = [name for name, p in prepared.model.named_parameters() if p.requires_grad]
    assert trainable == ["classifier.weight", "classifier.bias"]
    metrics = run_training(options)
    assert metrics["adapter_parameters"] == 0 and metrics["trainable_parameters"] == 32 * 2 + 2
    assert metrics["method"] == "head-only"


def test_presets_and_ranks_reach_the_adapter_config(tiny):
    config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    lotr = adapter_config(TrainOptions(construction="lotr", budget="lora:8"), config, "SEQ_CLS")
    assert lotr.construction == "depth" and lotr.ranks["depth"] == "full"  # LoTR keeps its full depth mode
    ranks = adapter_config(TrainOptions(ranks="in=4,out=4,qkv=full,depth=2"), config, "SEQ_CLS").ranks
    assert ranks == {"in": 4, "out": 4, "qkv": "full", "depth": 2}
    assert adapter_config(TrainOptions(ranks="4,4,3,2"), config, None).ranks == [4, 4, 3, 2]


def test_resume_returns_a_finished_run_and_refuses_other_runs(tiny, tmp_path):
    options = dict(task="glue-mrpc", data_dir=str(tiny / "mrpc"), model=str(tiny / "bert"),
                   output_dir=str(tmp_path / "run"), **{**FAST, "epochs": 1})
    first = run_training(TrainOptions(**options))
    assert run_training(TrainOptions(**options, resume=True)) == json.loads(json.dumps(first))
    with pytest.raises(ValueError, match="already holds a finished run"):
        run_training(TrainOptions(**options))
    with pytest.raises(ValueError, match="different run.*lr: 0.01 there, 0.02 now"):
        run_training(TrainOptions(**{**options, "lr": 0.02}, resume=True))


def test_kill_9_then_resume_loses_no_epoch(tiny, tmp_path):
    """A run killed (SIGKILL) after its first checkpoint continues from it, and its history has every epoch.

    The slowest test (~17 s on 2 cores): two real `tenslora train` processes, since only a real kill shows what
    survives one."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "tenslora", "train", "--task", "glue-mrpc", "--data-dir", str(tiny / "mrpc"),
               "--model", str(tiny / "roberta"), "--epochs", "12", "--batch-size", "2", "--max-length", "32",
               "--output-dir", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("checkpoint-*/trainer_state.json")) and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert list(out.glob("checkpoint-*/trainer_state.json")), "no checkpoint within 120 s: the run was too slow"
    assert not (out / "metrics.json").exists(), "the run finished before it could be killed"
    checkpoints_before = sorted(out.glob("checkpoint-*"))
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] is not None and Path(metrics["resumed_from"]) in checkpoints_before
    assert [float(row["epoch"]) for row in _history(out)] == [float(epoch) for epoch in range(1, 13)]


def test_bf16_autocast_runs(tiny, tmp_path):
    """bfloat16 autocast (the default where the hardware has it): the adapted projections compute in bfloat16,
    the adapter's factors stay float32 in training and in the saved file."""
    out = tmp_path / "run"
    options = TrainOptions(task="glue-mrpc", data_dir=str(tiny / "mrpc"), model=str(tiny / "bert"),
                           output_dir=str(out), **{**FAST, "epochs": 1, "bf16": True})
    assert all(p.dtype == torch.float32 for p in prepare(options).model.parameters())
    output_dtypes = set()

    def record(module, args, output):
        if isinstance(module, tenslora.TensLoraLayer):
            output_dtypes.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        metrics = run_training(options)
    finally:
        hook.remove()
    assert metrics["bf16"] is True
    assert output_dtypes == {torch.bfloat16}
    with safe_open(out / "adapter_model.safetensors", framework="pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float32}


def test_warmup_ratio_is_a_share_of_the_steps_on_every_transformers_the_project_allows(tmp_path):
    """``--warmup-ratio 0.1`` reaches the Trainer as ``warmup_steps=0.1``, which transformers 5 reads as a ratio and
    4.x as 0.1 steps (no warmup): the floor in pyproject.toml must exclude 4.x."""
    arguments = training_arguments(TrainOptions(warmup_ratio=0.1, **FAST), str(tmp_path / "run"))
    assert arguments.get_warmup_steps(200) == 20
    project = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    floor = Requirement(re.search(r'"(transformers[^"]*)"', project).group(1))
    assert not floor.specifier.contains("4.57.6") and floor.specifier.contains("5.0.0")
