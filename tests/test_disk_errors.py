"""What the user can fix gets one line naming the path and the fix, with nothing half-written: outputs that cannot be
written (full disk, file-size limit, the current folder, symbolic links, a folder filled meanwhile), base models and
tokenizers that do not load, checkpoints that do not resume, and two readers of one run."""

from __future__ import annotations

import csv
import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

import tenslora.app.runs
from tenslora.app.cli import main, user_error_message
from tenslora.app.compress import compress_run
from tenslora.app.export import export_run
from tenslora.app.modeling import build_causal_lm, load_preprocessor
from tenslora.app.options import TrainOptions
from tenslora.app.runs import LOCK_FILE, disk_errors, read_run, resumable_checkpoint, run_lock
from tenslora.app.train import run_training
from tenslora.files import new_folder
from test_run_safety import _hold_lock_in_another_process
from test_train import FAST, tiny  # noqa: F401  (the session fixture of tiny models and data)
from tiny_llm import save_model_folder, sentences

RUST_FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"  # as safetensors says it


def _listing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _one_line(capsys, code: int) -> str:
    """The error line of a command that exited with 2 (progress bars of the loading may precede it)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("tenslora ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    return errors[0]


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory) -> Path:  # noqa: F811
    """A finished run on data files of its own (a test may move them)."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "data"
    shutil.copytree(tiny / "reviews", data)
    run_training(TrainOptions(train_file=str(data / "train.csv"), validation_file=str(data / "validation.csv"),
                              test_file=str(data / "test.csv"), text_column="review", label_column="stars",
                              model=str(tiny / "bert"), output_dir=str(root / "run"), **{**FAST, "epochs": 1}))
    return root / "run"


# Outputs that cannot be written


COMMANDS = {"export-lora": [], "merge": [], "compress": ["--ranks", "2"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_is_one_line_naming_the_output_and_nothing_is_left(command, run_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """safetensors reports a full disk as its own error, with the system's number in the message."""
    def full_disk(*args, **kwargs):
        raise SafetensorError(RUST_FULL_DISK)

    monkeypatch.setattr(safetensors.torch, "serialize_file", full_disk)
    out = tmp_path / "out"
    line = _one_line(capsys, main([command, str(run_dir), str(out), *COMMANDS[command]]))
    assert f"Cannot write '{out}': No space left on device; free some space" in line
    assert "run the same command again." in line and _listing(tmp_path) == []


def test_a_file_size_limit_is_one_line_and_nothing_is_left(run_dir, tmp_path):
    """A real `ulimit -f` (Python ignores SIGXFSZ: the write fails with EFBIG), one process for the three commands:
    one line each, exit code 2."""
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)); "
              "from tenslora.app.cli import main\n"
              "for command, extra in zip(sys.argv[1::2], sys.argv[2::2]):\n"
              f"    print(main([command, {str(run_dir)!r}, {str(tmp_path / 'out')!r}, *extra.split()]), flush=True)")
    done = subprocess.run([sys.executable, "-c", script, *(word for command, extra in COMMANDS.items()
                                                         for word in (command, " ".join(extra)))],
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.split() == ["2", "2", "2"] and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("tenslora ")]
    for command, error in zip(COMMANDS, errors, strict=True):
        assert re.match(f"tenslora {command}: error: Cannot write '{re.escape(str(tmp_path / 'out'))}(/[^/']+)?': File "
                        r"too large; raise the file-size limit \(`ulimit -f`\)", error), error  # merge copies a file
    assert _listing(tmp_path) == []


def test_outputs_that_may_not_be_replaced_are_refused_before_loading(run_dir, tmp_path, capsys, monkeypatch):
    """The current folder (its rename fails with EBUSY), a dangling link, a folder holding files: one line each, before
    the model is loaded; a link to an empty folder is written through."""
    monkeypatch.setattr("tenslora.app.export.load_trained_model", lambda *args, **kwargs: pytest.fail("loaded"))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    line = _one_line(capsys, main(["export-lora", str(run_dir), "."]))
    assert "'.' is the current folder" in line and _listing(empty) == []
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    line = _one_line(capsys, main(["merge", str(run_dir), str(tmp_path / "dangling")]))
    assert f"'{tmp_path / 'dangling'}' is a symbolic link to '{tmp_path / 'nowhere'}', which does not exist" in line
    (empty / "notes.txt").write_text("mine")
    line = _one_line(capsys, main(["export-lora", str(run_dir), str(empty)]))
    assert "exists and is not an empty folder" in line and _listing(empty) == ["notes.txt"]
    assert _listing(tmp_path) == ["dangling", "empty"]


def test_a_symbolic_link_to_an_empty_folder_is_written_through(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with new_folder(tmp_path / "link") as staging:
        (staging / "adapter_config.json").write_text("{}")
    assert (tmp_path / "link").is_symlink() and _listing(tmp_path / "target") == ["adapter_config.json"]
    assert _listing(tmp_path) == ["link", "target"]


@pytest.mark.parametrize("meanwhile, problem", [("folder", "was filled by another process meanwhile"),
                                                ("file", "became a file meanwhile")])
def test_an_output_taken_meanwhile_is_refused_and_kept(meanwhile, problem, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"'{out}' {problem}; nothing was written there"), new_folder(out) as staging:
        (staging / "adapter_config.json").write_text("{}")
        if meanwhile == "folder":
            out.mkdir()
            (out / "notes.txt").write_text("mine")
        else:
            out.write_text("mine")
    assert _listing(tmp_path) == ["out"]
    assert (out / "notes.txt" if meanwhile == "folder" else out).read_text() == "mine"


def test_a_write_error_names_the_file_where_it_was_to_appear(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OSError) as failed, new_folder(out) as staging:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(staging / "adapter_model.safetensors"))
    assert failed.value.filename == str(out / "adapter_model.safetensors") and _listing(tmp_path) == []


def test_native_and_size_limited_write_errors(tmp_path, monkeypatch):
    """The system's number in a Rust library's message is read; torch's RuntimeError is read as a file too large
    only when the process has a file-size limit and the error is a failed write."""
    with pytest.raises(ValueError, match=f"Cannot write '{tmp_path}': File too large; raise the file-size limit"), \
            disk_errors(tmp_path, resume=False):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    with pytest.raises(RuntimeError), disk_errors(tmp_path):
        raise RuntimeError("unexpected pos 7936 vs 7824")
    monkeypatch.setattr(tenslora.app.runs.resource, "getrlimit", lambda which: (8192, 8192))
    with pytest.raises(ValueError, match=r"this process may write files of 8,192 bytes at most; .*with --resume"), \
            disk_errors(tmp_path):
        raise RuntimeError("unexpected pos 7936 vs 7824")
    with pytest.raises(RuntimeError, match="out of memory"), disk_errors(tmp_path):  # not a write: left as it is
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("number, words", [(errno.EFBIG, "ulimit -f"), (errno.EBUSY, "in use")])
def test_more_file_system_errors_are_named(number, words):
    line = user_error_message(OSError(number, os.strerror(number), "/runs/x"))
    assert "'/runs/x'" in line and words in line


def test_the_output_dir_of_a_run_through_a_dangling_link(tiny, tmp_path):  # noqa: F811
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    options = TrainOptions(task="glue-mrpc", data_dir=str(tiny / "mrpc"), model=str(tiny / "bert"),
                           output_dir=str(tmp_path / "link" / "run"), **FAST)
    with pytest.raises(ValueError, match=f"goes through '{tmp_path / 'link'}', a symbolic link to "
                                         f"'{tmp_path / 'nowhere'}', which does not exist"):
        run_training(options)
    assert _listing(tmp_path) == ["link"]


# compress --eval


def test_compress_eval_checks_its_data_before_writing(run_dir, tmp_path):
    """The run's test data is gone: refused before the output folder exists (it used to be written, then fail)."""
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    run = json.loads((moved / "run.json").read_text())
    run["options"]["test_file"] = str(tmp_path / "gone.csv")
    (moved / "run.json").write_text(json.dumps(run))
    with pytest.raises(ValueError, match="gone.csv"):
        compress_run(moved, tmp_path / "out", ranks=2, evaluate=True)
    assert _listing(tmp_path) == ["run"]


def test_compress_eval_scores_both_runs(run_dir, tmp_path):
    summary = compress_run(run_dir, tmp_path / "out", ranks=2, evaluate=True)
    assert set(summary["evaluation"]) == {"split", "before", "after"} and "accuracy" in summary["evaluation"]["after"]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["evaluation"] == summary["evaluation"]
    assert _listing(tmp_path / "out") == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                          "metrics.json", "run.json", "tokenizer.json", "tokenizer_config.json"]
    assert _listing(tmp_path) == ["out"]  # no staging folder left


# Base models and tokenizers, refused before run.json


@pytest.fixture
def causal_lm(tmp_path) -> tuple[Path, Path]:
    """A tiny causal LM folder and a text file to fine-tune it on."""
    model = save_model_folder(tmp_path / "llm")
    texts = tmp_path / "texts.csv"
    with open(texts, "w", newline="") as handle:
        csv.writer(handle).writerows([["text"], *([text] for text in sentences(24))])
    return model, texts


def _breaks(model: Path, damage: str) -> str:
    """Damage the model folder as ``damage`` says; the file the error must name."""
    if damage == "cut weights":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
        return str(weights)
    if damage == "garbage tokenizer":
        (model / "tokenizer.json").write_bytes(b"\x00garbage")
        return str(model / "tokenizer.json")
    config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    removed = {"no end-of-text token": ["eos_token"], "no pad token nor end-of-text": ["eos_token", "pad_token"]}
    for key in removed[damage]:
        name = config.pop(key)
        tokenizer["added_tokens"] = [token for token in tokenizer["added_tokens"] if token["content"] != name]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    return str(model / "tokenizer_config.json")


@pytest.mark.parametrize("damage", ["cut weights", "garbage tokenizer", "no end-of-text token"])
def test_a_damaged_base_is_refused_before_run_json(damage, causal_lm, tmp_path):
    model, texts = causal_lm
    named = _breaks(model, damage)
    options = TrainOptions(task="causal-lm", train_file=str(texts), model=str(model),
                           output_dir=str(tmp_path / "run"), **FAST)
    with pytest.raises(ValueError, match=f"'{named}'"):
        run_training(options)
    assert not (tmp_path / "run").exists()


def test_a_decoder_tokenizer_without_pad_nor_end_of_text_is_refused(causal_lm):
    model, _ = causal_lm
    named = _breaks(model, "no pad token nor end-of-text")
    with pytest.raises(ValueError, match=f"no pad token, nor an end-of-text token to pad with: set \"pad_token\" in "
                                         f"'{named}'"):
        load_preprocessor(str(model), "text")


def test_4bit_layers_the_cpu_kernels_cannot_evaluate_are_refused(tmp_path):
    """bitsandbytes packs 4-bit weights for evaluation on AVX512-BF16 CPUs; widths of 32 fail there (at the first
    evaluation, after run.json and the training)."""
    bitsandbytes = pytest.importorskip("bitsandbytes")
    if not bitsandbytes.functional.has_avx512bf16():
        pytest.skip("bitsandbytes packs 4-bit weights only on CPUs with AVX512-BF16")
    model = save_model_folder(tmp_path / "llm32")  # hidden size 32
    with pytest.raises(ValueError, match=r"cannot evaluate .* in 4 bits on this CPU: its layer "
                                         r"'model.layers.0.self_attn.q_proj' maps 32 to 32 features"):
        build_causal_lm(str(model), "4bit", device="cpu")
    build_causal_lm(str(save_model_folder(tmp_path / "llm64", hidden_size=64, intermediate_size=128)), "4bit",
                    device="cpu")


# Checkpoints that do not load


def _checkpoint(folder: Path) -> Path:
    """A checkpoint as the Trainer writes it (its random states hold numpy arrays)."""
    checkpoint = folder / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4}')
    torch.save({"state": {0: {"step": torch.tensor(4.0)}}, "param_groups": []}, checkpoint / "optimizer.pt")
    torch.save({"last_epoch": 4}, checkpoint / "scheduler.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()},
               checkpoint / "rng_state.pth")
    safetensors.torch.save_file({"core": torch.zeros(2)}, checkpoint / "adapter_model.safetensors")
    (checkpoint / "training_args.bin").write_bytes(b"pickled arguments, not read on resume")
    return checkpoint


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors"])
@pytest.mark.parametrize("content", [b"\x80\x04garbage" * 8, b""])
def test_a_checkpoint_that_does_not_load_is_named_with_the_fix(name, content, tmp_path):
    checkpoint = _checkpoint(tmp_path)
    assert resumable_checkpoint(tmp_path) == str(checkpoint)
    (checkpoint / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"Cannot resume from '{checkpoint}': its file '{name}' does not load .*"
                                         "Delete that checkpoint folder .* or train anew"):
        resumable_checkpoint(tmp_path)


def test_resume_from_a_damaged_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    checkpoint = _checkpoint(tmp_path / "run")
    (checkpoint / "optimizer.pt").write_bytes(b"garbage")
    monkeypatch.setattr("tenslora.app.cli.run_training", lambda options: resumable_checkpoint(options.output_dir))
    line = _one_line(capsys, main(["train", "--output-dir", str(tmp_path / "run"), "--resume"]))
    assert f"'{checkpoint}'" in line and "'optimizer.pt' does not load (UnpicklingError" in line


# Readers share the run's lock


@pytest.mark.skipif(sys.platform == "win32", reason="shared locks are flock's")
def test_two_readers_of_a_run_do_not_refuse_each_other(run_dir, tmp_path):
    """While another process reads the run (it shares the lock), this one reads it too; a writer waits for both."""
    holder = _hold_lock_in_another_process(run_dir / LOCK_FILE, shared=True)
    try:
        assert read_run(run_dir)["modality"] == "text"
        export_run(str(run_dir), str(tmp_path / "lora"))
        assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
        with pytest.raises(ValueError, match="Another process"), run_lock(run_dir):
            pass
    finally:
        holder.kill()
        holder.wait()
