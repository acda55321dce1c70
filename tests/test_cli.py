"""The `tenslora` command: options and config files, one-line errors with exit code 2, params, eval, merge."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import tenslora
from tenslora.app.cli import format_training_report, main
from tenslora.app.modeling import load_trained_model
from tenslora.app.options import TrainOptions
from tenslora.app.runs import read_run
from test_train import FAST, tiny  # noqa: F401  (the session fixture of tiny models and data)
from test_validation import custom_code_model
from tiny_tasks import write_text_files

FLAGS = ["--epochs", "1", "--batch-size", "8", "--lr", "1e-2", "--max-length", "32", "--no-bf16"]


def _train(tiny, out, *extra) -> int:  # noqa: F811
    return main(["train", "--task", "glue-mrpc", "--data-dir", str(tiny / "mrpc"), "--output-dir", str(out),
                 *FLAGS, *extra])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def mean_run(tiny, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("mean") / "run"
    assert _train(tiny, out, "--model", str(tiny / "bert"), "--epochs", "2") == 0
    return out


def test_help_lists_the_options(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no line wrapping
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--model", "--construction", "--factorization", "--ranks", "--budget", "--scaling", "--dropout",
                 "--lr", "--epochs", "--max-steps", "--batch-size", "--max-length", "--seed", "--output-dir",
                 "--resume", "--config", "--task", "--train-file", "--validation-file", "--test-file",
                 "--text-column", "--text-pair-column", "--label-column", "--image-root", "--head-only", "--pooling"):
        assert flag in help_text
    assert "glue-mrpc" in help_text and "(default: qkv_depth)" in help_text


def test_train_prints_the_report(tiny, mean_run, capsys):  # noqa: F811
    """The run's own command again, with --resume: the finished run's report, read back, not trained again."""
    metrics = json.loads((mean_run / "metrics.json").read_text())
    assert read_run(mean_run)["pooling"] == "mean"
    assert metrics["options"]["epochs"] == 2.0 and metrics["options"]["bf16"] is False
    capsys.readouterr()
    assert _train(tiny, mean_run, "--model", str(tiny / "bert"), "--epochs", "2", "--resume") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-5:] == format_training_report(metrics).splitlines()
    assert printed[-5].startswith(f"glue-mrpc / {metrics['method']}: test accuracy {metrics['test']['accuracy']:.4f}")
    assert f"trainable parameters: {metrics['trainable_parameters']:,} (adapter " in printed[-4]
    assert json.loads((mean_run / "metrics.json").read_text()) == metrics


def test_config_file_with_flags_overriding_it(tiny, tmp_path, capsys):  # noqa: F811
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""
        task: glue-mrpc
        data-dir: {tiny / 'mrpc'}
        model: {tiny / 'roberta'}
        ranks: in=4,out=4,qkv=3,depth=2
        lr: 0.5
        epochs: 1
        max_length: 32
        bf16: false
    """))
    assert main(["train", "--config", str(config), "--lr", "0.01", "--output-dir", str(tmp_path / "run")]) == 0
    report = capsys.readouterr().out
    assert "glue-mrpc / qkv_depth: test accuracy" in report and "trainable parameters:" in report
    assert str(tmp_path / "run") in report
    options = read_run(tmp_path / "run")["options"]
    assert options["lr"] == 0.01 and options["ranks"] == {"in": 4, "out": 4, "qkv": 3, "depth": 2}
    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"task": "glue-mrpc", "data_dir": str(tiny / "mrpc"), "epochs": 1,
                                       "model": str(tiny / "roberta"), "bogus": 1}))
    assert main(["train", "--config", str(json_config)]) == 2
    assert "Unknown option(s) ['bogus']" in _error_line(capsys)


@pytest.mark.parametrize("case", ["missing file", "unknown task", "missing label column", "missing text column",
                                  "unseen label", "no attention projections", "impossible budget", "bad ranks",
                                  "missing config", "missing model", "both sources", "columns of a task"])
def test_bad_input_is_one_line_and_exit_code_2(case, tiny, tmp_path, capsys):  # noqa: F811
    files = write_text_files(tmp_path / "data", labels=("a", "b"))
    unseen = write_text_files(tmp_path / "unseen", sizes={"validation": 6}, labels=("a", "c"))["validation"]
    own = ["train", "--train-file", str(files["train"]), "--text-column", "review", "--label-column", "stars",
           "--model", str(tiny / "bert"), "--output-dir", str(tmp_path / "out"), *FLAGS]
    argv, expected = {
        "missing file": (["train", "--train-file", str(tmp_path / "nope.csv")], "not found; check --train-file"),
        "unknown task": (["train", "--task", "glue-nope"], "invalid choice: 'glue-nope'"),
        "missing label column": ([*own, "--label-column", "label"], "no column 'label'"),
        "missing text column": ([*own, "--text-column", "text"], "no column 'text'"),
        "unseen label": ([*own, "--validation-file", str(unseen)], "never occur in the train split"),
        "no attention projections": ([*own, "--model", str(tiny / "electra")], "model type 'electra'"),
        "impossible budget": ([*own, "--budget", "10"], "come near a budget of 10"),
        "bad ranks": ([*own, "--ranks", "in=x"], "Cannot read ranks 'in=x'"),
        "missing config": (["train", "--config", str(tmp_path / "none.yaml")], "Config file"),
        "missing model": ([*own, "--model", str(tmp_path / "no-model")], "Cannot load"),
        "both sources": ([*own, "--task", "glue-mrpc"], "Give one source of data"),
        "columns of a task": (["train", "--task", "glue-mrpc", "--text-column", "x"], "give --train-file too"),
    }[case]
    if case == "unknown task":  # argparse's own usage error, also exit code 2
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    else:
        assert main(argv) == 2
    assert expected in _error_line(capsys)


def test_several_gpus_in_one_process_are_refused_before_anything_is_written(tiny, tmp_path, capsys,  # noqa: F811
                                                                             monkeypatch):
    """The Trainer would use nn.DataParallel, whose replicas read device 0's shared tensors: one process per GPU."""
    monkeypatch.setattr(transformers.TrainingArguments, "n_gpu", property(lambda self: 2))
    assert _train(tiny, tmp_path / "run", "--model", str(tiny / "bert")) == 2
    line = _error_line(capsys)
    assert "sees 2 GPUs" in line and "--nproc-per-node 2" in line and "CUDA_VISIBLE_DEVICES=0" in line
    assert not (tmp_path / "run").exists()


def test_output_dir_holding_another_run(mean_run, tiny, capsys):  # noqa: F811
    assert _train(tiny, mean_run, "--model", str(tiny / "bert"), "--lr", "0.02") == 2
    line = _error_line(capsys)
    assert "holds a different run" in line and "lr: 0.01 there, 0.02 now" in line and "--output-dir" in line
    assert _train(tiny, mean_run, "--model", str(tiny / "bert"), "--epochs", "2") == 2
    assert "--resume" in _error_line(capsys)
    not_a_run = mean_run.parent / "other"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("mine")
    assert _train(tiny, not_a_run) == 2
    assert "holds no tenslora run" in _error_line(capsys)


def test_eval_reproduces_the_test_metrics(mean_run, capsys):
    recorded = json.loads((mean_run / "metrics.json").read_text())["test"]
    assert main(["eval", str(mean_run)]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert float(printed["test_accuracy"]) == pytest.approx(recorded["accuracy"])
    assert float(printed["test_f1"]) == pytest.approx(recorded["f1"])
    assert main(["eval", str(mean_run.parent)]) == 2
    assert "holds no run.json" in _error_line(capsys)


def test_a_run_whose_base_model_moved_names_its_run_json(mean_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(mean_run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    recorded = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**recorded, "model": str(tmp_path / "moved-away")}))
    for command in (["eval", str(run)], ["merge", str(run), str(tmp_path / "merged")]):
        assert main(command) == 2
        assert (f"The base model of the run in '{run}' is no longer at '{tmp_path / 'moved-away'}' (the \"model\" of "
                "its run.json)") in _error_line(capsys)


def test_params_table_matches_the_library(tiny, capsys):  # noqa: F811
    assert main(["params", "--model", str(tiny / "bert"), "--lora-rank", "4"]) == 0
    table = capsys.readouterr().out
    model_config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
    assert f"LoRA rank 4: {tenslora.lora_parameter_count(4, model_config):,}" in table
    for construction in tenslora.TENSOR_CONSTRUCTIONS:
        count = tenslora.count_parameters(tenslora.TensLoraConfig(construction=construction, ranks=4), model_config)
        line = next(line for line in table.splitlines() if line.startswith(construction + " "))
        assert line.split()[1] == f"{count:,}"


def _logits_without_tenslora(folder: Path, tmp_path: Path, texts: list[str], remote_code: bool) -> torch.Tensor:
    """Load a merged folder in a fresh interpreter where `import tenslora` fails, and return its logits."""
    script = f"""
        import sys, torch
        sys.modules["tenslora"] = None  # any import of tenslora now raises
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r},
                                                                   trust_remote_code={remote_code}).eval()
        batch = AutoTokenizer.from_pretrained({str(folder)!r})({texts!r}, padding=True, return_tensors="pt")
        torch.save(model(**batch).logits, {str(tmp_path / 'logits.pt')!r})
    """
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, cwd=tmp_path, env=env)
    return torch.load(tmp_path / "logits.pt")


@pytest.mark.parametrize("head", ["mean", "cls", "roberta"])
def test_merge_saves_a_model_that_loads_without_tenslora(head, mean_run, tiny, tmp_path):  # noqa: F811
    """Mean pooling (remote code saved in the folder), the stock BERT head, RoBERTa's two-layer head."""
    run = mean_run
    if head != "mean":
        run = tmp_path / "run"
        model = ["--model", str(tiny / "bert"), "--pooling", "cls"] if head == "cls" else ["--model", str(tiny / head)]
        assert _train(tiny, run, *model) == 0
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 0
    texts = ["cat runs", "big red dog jumps"]
    model, tokenizer = load_trained_model(str(run), read_run(run))
    with torch.no_grad():
        expected = model.eval()(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    got = _logits_without_tenslora(tmp_path / "merged", tmp_path, texts, remote_code=head == "mean")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    merged_weights = load_file(tmp_path / "merged" / "model.safetensors")
    adapted = {name: layer for name, layer in model.named_modules() if isinstance(layer, tenslora.TensLoraLayer)}
    with torch.no_grad():  # each weight is W + delta W: a check that does not depend on how far the logits moved
        for name, layer in adapted.items():
            delta = layer.get_delta_weight("default")
            assert delta.abs().max() > 1e-5, f"{name}: the run's training did not move its update"
            torch.testing.assert_close(merged_weights[name.removeprefix("base_model.model.") + ".weight"],
                                       layer.get_base_layer().weight + delta, atol=1e-6, rtol=0)
    assert main(["merge", str(run), str(tmp_path / "merged")]) == 2  # never overwrites


def test_python_dash_m_exit_code(tmp_path):
    # ~7 s: a fresh interpreter, because `python -m tenslora` must print one line even with its imports' noise.
    result = subprocess.run([sys.executable, "-m", "tenslora", "train", "--train-file", str(tmp_path / "x.csv")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["eval"], ["merge", "OUT"], ["export-lora", "OUT"],
                                     ["compress", "OUT", "--energy", "0.5"]])
def test_a_run_folder_cannot_grant_itself_trust_remote_code(tmp_path, capsys, monkeypatch, command):
    """A run whose run.json records --trust-remote-code, around a model with code of its own: the commands that
    load it refuse without the flag (nothing runs), and pass the permission on with it."""
    run = custom_code_model(tmp_path / "run")  # the run folder's tokenizer files ask for code of their own
    adapter = {"construction": "qkv", "factorization": "tucker", "ranks": {"in": 1, "out": 1, "qkv": 1}}
    (run / "run.json").write_text(json.dumps({"options": TrainOptions(trust_remote_code=True).identity(),
                                              "model": str(run), "modality": "text", "pooling": "cls",
                                              "labels": ["a", "b"], "adapter": adapter}))
    (run / "metrics.json").write_text("{}")
    arguments = [command[0], str(run), *[str(tmp_path / "out") if item == "OUT" else item for item in command[1:]]]
    assert main(arguments) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--trust-remote-code" in line and "auto_map" in line and not (run / "RAN").exists()
    calls = []

    def tokenizer(name, **kwargs):  # stands in for the model's own code, which this test does not run
        calls.append(kwargs.get("trust_remote_code"))
        raise ValueError("stopped after the tokenizer")

    monkeypatch.setattr(tenslora.app.modeling.AutoTokenizer, "from_pretrained", tokenizer)
    assert main([*arguments, "--trust-remote-code"]) == 2
    assert calls == [True] and "stopped after the tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
