"""No data loss, no silent corruption: adapter saves a kill cannot break, one writer per run folder, a
diverging run stopped before it saves anything, nothing written before the options and data are valid."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback

import tenslora
from tenslora import TensLoraConfig
from tenslora.app import train
from tenslora.app.cli import main
from tenslora.app.options import TrainOptions
from tenslora.app.runs import LOCK_FILE, check_run_dir, disk_errors, last_checkpoint, run_lock
from tenslora.app.train import TrainingDiverged, evaluate_run, run_training
from tenslora.files import new_folder, write_json
from tenslora.tuner import persistence
from test_train import FAST, tiny  # noqa: F401  (the session fixture of tiny models and data)
from tiny import bert
from tiny_tasks import write_text_files


class Killed(BaseException):
    """A kill: not an ``Exception``, so no ``except Exception`` on the way can handle it."""


def _adapter(ranks: int, seed: int) -> PeftModel:
    torch.manual_seed(seed)
    return get_peft_model(bert(), TensLoraConfig(construction="qkv", ranks=ranks, init_weights=False))


def _state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in get_peft_model_state_dict(model).items()}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _same(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


# Saving an adapter


def test_save_replaces_only_what_save_pretrained_writes(tmp_path):
    """A run's or a user's files stay; the files written are PEFT's own, a second adapter in its subfolder;
    an existing model card is updated as PEFT updates it."""
    model = _adapter(2, seed=0)
    model.add_adapter("other", TensLoraConfig(construction="qkv", ranks=3))
    model.save_pretrained(tmp_path / "peft")
    folder = tmp_path / "run"
    (folder / "checkpoint-4").mkdir(parents=True)
    own = {"history.csv": b"epoch,loss\n1,0.5\n", "metrics.json": b"{}", "checkpoint-4/trainer_state.json": b"{}",
           "notes.txt": b"mine", "other/notes.txt": b"mine too"}
    for name, content in own.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n\nMy own words.\n")

    assert tenslora.save_adapter(model, folder) == folder
    saved = _files(folder)
    assert set(saved) == set(_files(tmp_path / "peft")) | set(own)
    assert {name: saved[name] for name in own} == own
    card = saved["README.md"].decode()
    assert "My own words." in card and "license: mit" in card and "library_name: peft" in card
    loaded = tenslora.load_adapter(bert(), folder)
    assert _same(_state(loaded), _state(model))
    assert not [path for path in folder.iterdir() if path.name.startswith(".")]  # no leftover of the save


def test_a_kill_at_any_rename_leaves_a_whole_adapter(tmp_path, monkeypatch):
    """The save of an adapter of other ranks (a mix of old and new files would not load) killed at each of
    its renames in turn: the folder always loads the old adapter or the new one, and keeps its other files."""
    old, new = _adapter(2, seed=0), _adapter(3, seed=1)
    real_replace = os.replace
    calls = []
    monkeypatch.setattr(os, "replace", lambda *args: calls.append(args) or real_replace(*args))
    tenslora.save_adapter(new, tmp_path / "count")
    renames = len(calls)
    commit = next(index for index, (_, target) in enumerate(calls, 1) if str(target).endswith(".committed"))
    assert renames - commit >= 2  # the commit, then the config and the weights

    outcomes = []
    for kill_at in range(1, renames + 1):
        folder = tmp_path / f"kill-{kill_at}"
        monkeypatch.setattr(os, "replace", real_replace)
        tenslora.save_adapter(old, folder)
        (folder / "history.csv").write_text("kept")
        count = iter(range(1, renames + 1))

        def replace(*args, kill_at=kill_at, count=count):
            if next(count) == kill_at:
                raise Killed
            real_replace(*args)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Killed):
            tenslora.save_adapter(new, folder)
        monkeypatch.setattr(os, "replace", real_replace)
        state = _state(tenslora.load_adapter(bert(), folder))
        assert _same(state, _state(old)) or _same(state, _state(new)), f"kill at rename {kill_at}"
        outcomes.append("new" if _same(state, _state(new)) else "old")
        assert (folder / "history.csv").read_text() == "kept"
        tenslora.save_adapter(old, folder)  # and the next save in that folder works
        assert _same(_state(tenslora.load_adapter(bert(), folder)), _state(old))
    assert outcomes == ["old"] * commit + ["new"] * (renames - commit)  # killed before the commit: old; after: new


def _save_killed_after_its_commit(model: PeftModel, folder: Path, monkeypatch) -> None:
    """``save_adapter(model, folder)`` killed at the first file it moves out of its committed staging folder."""
    real_replace = os.replace

    def killed_at_the_first_file(source, target):
        if Path(source).parent.name.endswith(".committed"):
            raise Killed
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", killed_at_the_first_file)
    with pytest.raises(Killed):
        tenslora.save_adapter(model, folder)
    monkeypatch.setattr(os, "replace", real_replace)


def test_leftovers_of_an_interrupted_save_are_recovered(tmp_path, monkeypatch):
    """A save killed before its commit is discarded by the next save; one killed after it is finished by the
    next load, which moves the files its journal lists and nothing else."""
    old, new = _adapter(2, seed=0), _adapter(3, seed=1)
    folder = tmp_path / "adapter"
    tenslora.save_adapter(old, folder)
    (folder / "history.csv").write_text("kept")
    _save_killed_after_its_commit(new, folder, monkeypatch)
    (committed,) = folder.glob(".tenslora-save-*.committed")
    (committed / "notes.txt").write_text("not in the journal")  # put there by someone else: not ours to move
    assert _same(_state(tenslora.load_adapter(bert(), folder)), _state(new))
    assert not (folder / "notes.txt").exists() and not committed.exists()

    unfinished = folder / ".tenslora-save-x1y2z3"
    unfinished.mkdir()
    (unfinished / ".tenslora-journal.json").write_text('{"format": "tenslora-save/1", "files": null}')
    (unfinished / "adapter_config.json").write_text("{partial")
    assert _same(_state(tenslora.load_adapter(bert(), folder)), _state(new))  # a reader discards nothing
    tenslora.save_adapter(old, folder)
    assert not unfinished.exists() and (folder / "history.csv").read_text() == "kept"
    assert _same(_state(tenslora.load_adapter(bert(), folder)), _state(old))


def test_two_readers_finishing_the_same_interrupted_save_both_load_it(tmp_path, monkeypatch):
    """Readers share a run's lock: two may find the same committed save, and the second may move its files after
    the first has moved them and removed the folder (here, one recovery runs inside the other)."""
    new = _adapter(3, seed=1)
    folder = tmp_path / "adapter"
    tenslora.save_adapter(_adapter(2, seed=0), folder)
    _save_killed_after_its_commit(new, folder, monkeypatch)
    real_move = persistence._move_into_place

    def moved_by_another_reader_meanwhile(committed, directory, files):
        real_move(committed, directory, files)
        real_move(committed, directory, files)

    monkeypatch.setattr(persistence, "_move_into_place", moved_by_another_reader_meanwhile)
    assert _same(_state(tenslora.load_adapter(bert(), folder)), _state(new))
    assert not list(folder.glob(".tenslora-save-*"))


def test_a_save_that_cannot_write_its_journal_leaves_no_staging_folder(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    folder.mkdir()

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(persistence, "write_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        tenslora.save_adapter(_adapter(2, seed=0), folder)
    assert list(folder.iterdir()) == []


def test_nothing_the_save_did_not_write_is_moved_or_deleted(tmp_path):
    """Folders that only look like leftovers of a save (by their names, beside or inside the adapter folder,
    even holding adapter files) are the user's: saves and loads leave them and their files as they are."""
    folder = tmp_path / "adapter"
    tenslora.save_adapter(_adapter(2, seed=0), folder)
    lookalikes = [tmp_path / ".adapter.20241202", tmp_path / ".adapter.backup01", tmp_path / ".adapter.old.abcdefgh",
                  folder / ".tenslora-save-mine", folder / ".tenslora-save-mine.committed"]
    for lookalike in lookalikes:
        (lookalike / "adapter").mkdir(parents=True)
        tenslora.save_adapter(_adapter(3, seed=1), lookalike / "adapter")
        (lookalike / "notes.txt").write_text("mine")
    (folder / ".tenslora-save-forged.committed").mkdir()
    (folder / ".tenslora-save-forged.committed" / ".tenslora-journal.json").write_text(
        '{"format": "tenslora-save/1", "files": ["../../escaped.txt"]}')  # a journal naming a way out is not ours
    before = {lookalike: _files(lookalike) for lookalike in lookalikes}

    tenslora.save_adapter(_adapter(2, seed=2), folder)
    tenslora.load_adapter(bert(), folder)
    assert {lookalike: _files(lookalike) for lookalike in lookalikes} == before
    assert (folder / ".tenslora-save-forged.committed").is_dir()


def test_adapter_names_that_leave_the_folder_are_refused(tmp_path):
    """PEFT saves a non-default adapter in a subfolder named after it: an absolute name or one with a path in it
    would write elsewhere."""
    model = _adapter(2, seed=0)
    for name in ("/elsewhere/x", "../up", "a/b", "..", ""):
        with pytest.raises(ValueError, match="adapter name"):
            model.add_adapter(name, TensLoraConfig(construction="qkv", ranks=2))
    tenslora.save_adapter(model, tmp_path / "adapter")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


def test_a_save_leaves_sibling_folders_that_are_not_its_leftovers(tmp_path):
    """A user's folder of a save-like name, and an export being written beside it, stay."""
    users = tmp_path / ".adapter.notes_v2"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="filled by another process meanwhile"), \
            new_folder(tmp_path / "adapter") as exporting:
        (exporting / "adapter_config.json").write_text("{}")
        tenslora.save_adapter(_adapter(2, seed=0), tmp_path / "adapter")
        assert exporting.is_dir()
    assert not exporting.exists()  # the export's own staging folder, which found the folder taken
    assert (users / "notes.txt").read_text() == "mine"


# One writer per run folder


def _text_options(tiny, tmp_path: Path, **changes) -> TrainOptions:  # noqa: F811
    return TrainOptions(task="glue-mrpc", data_dir=str(tiny / "mrpc"), model=str(tiny / "bert"),
                        **{"output_dir": str(tmp_path / "run"), **FAST, "epochs": 1, **changes})


def _hold_lock_in_another_process(lock_file: Path, shared: bool = False) -> subprocess.Popen:
    """Another process holding ``lock_file``: as a writer does (exclusive), or as a reader does (``shared``)."""
    take = ("import fcntl; handle = open({path!r}, 'rb'); fcntl.flock(handle, fcntl.LOCK_SH)" if shared
            else "from filelock import FileLock; lock = FileLock({path!r}); lock.acquire()")
    script = f"import time; {take.format(path=str(lock_file))}; print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused(tiny, tmp_path):  # noqa: F811
    """While another process trains in the folder (holds its lock): train and eval are refused, nothing is
    written; the lock file alone does not make the folder foreign."""
    options = _text_options(tiny, tmp_path)
    folder = Path(options.output_dir)
    folder.mkdir()
    holder = _hold_lock_in_another_process(folder / LOCK_FILE)
    try:
        (folder / "run.json").write_text(json.dumps({"options": options.identity(), "labels": []}))  # the other's
        for resume in (False, True):
            with pytest.raises(ValueError, match=f"Another process is training in '{folder}'"):
                run_training(_text_options(tiny, tmp_path, resume=resume))
        with pytest.raises(ValueError, match="Another process is training in"), run_lock(folder):
            pass
        (folder / "metrics.json").write_text("{}")
        with pytest.raises(ValueError, match="Another process is training in"):
            evaluate_run(str(folder))
        for name in ("run.json", "metrics.json"):
            (folder / name).unlink()
        assert [path.name for path in folder.iterdir()] == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    assert check_run_dir(folder, options.identity(), resume=False) is False  # the lock file alone: an empty folder
    metrics = run_training(options)
    assert metrics["steps"] > 0 and (folder / "metrics.json").is_file()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no tenslora run"):
        check_run_dir(tmp_path / "foreign", options.identity(), resume=False)


def test_a_run_file_is_on_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    """The new content is flushed before the rename, the folder's entry after it: a power loss leaves the old file
    or the new one, never an empty one."""
    synced = []
    monkeypatch.setattr(tenslora.files, "sync_to_disk",
                        lambda path: synced.append((path.name, path.read_text() if path.is_file() else None,
                                                    (tmp_path / "run.json").exists())))
    write_json(tmp_path / "run.json", {"options": {}})
    assert synced == [(f".run.{os.getpid()}.tmp.json", '{\n  "options": {}\n}\n', False), (tmp_path.name, None, True)]


@pytest.mark.parametrize("content, problem", [(b"{}", "it lacks 'options'"), (b"[]", "it is not a JSON object"),
                                              (b'{"options": {', "it does not parse as JSON"),
                                              (b"\xff\xfe", "it does not parse as JSON")])
def test_a_run_file_tenslora_did_not_write_is_refused_by_name(tmp_path, capsys, content, problem):
    """An empty, truncated, binary or other program's run.json: train, eval, merge refuse it in one line naming
    the file (not a KeyError from deep inside), and leave the folder as it was."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.json").write_bytes(content)
    (folder / "metrics.json").write_text("{}")
    before = _files(folder)
    for command in (["train", "--output-dir", str(folder), "--resume"], ["eval", str(folder)],
                    ["merge", str(folder), str(tmp_path / "merged")]):
        assert main(command) == 2
        error = capsys.readouterr().err
        assert f"'{folder / 'run.json'}' is not the file TensLoRA writes there: {problem}" in error
        assert len(error.splitlines()) == 1
    assert _files(folder) == before and not (tmp_path / "merged").exists()


# A diverging run


class _Poison(TrainerCallback):
    """Makes the weights non-finite right after the first epoch's checkpoint, as a diverging step would."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == state.max_steps // 2 + 1:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):  # noqa: F811
    make_trainer = train.make_trainer
    monkeypatch.setattr(train, "make_trainer", lambda prepared, arguments, callbacks: make_trainer(
        prepared, arguments, [*callbacks, _Poison()]))
    options = _text_options(tiny, tmp_path, epochs=2)
    folder = Path(options.output_dir)
    with pytest.raises(ValueError, match=r"diverged at step \d+.*Lower --lr .*checkpoint-\d+', is kept") as error:
        run_training(options)
    checkpoints = sorted(folder.glob("checkpoint-*"))
    assert [str(path) for path in checkpoints] == [last_checkpoint(folder)]
    assert f"'{checkpoints[0]}'" in str(error.value)
    assert all(torch.isfinite(tensor).all() for tensor in load_file(checkpoints[0] / "adapter_model.safetensors")
               .values())
    assert not (folder / "metrics.json").exists() and not (folder / "adapter_model.safetensors").exists()


def test_a_huge_learning_rate_is_stopped_before_anything_is_saved(tiny, tmp_path):  # noqa: F811
    options = _text_options(tiny, tmp_path, lr=1e30)
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+: the loss is no longer finite.*Lower --lr "
                                         r"\(it is 1e\+30\).*nothing of this run was saved"):
        run_training(options)
    folder = Path(options.output_dir)
    assert sorted(path.name for path in folder.iterdir()) == sorted([LOCK_FILE, "run.json"])


# Nothing written before the options and the data are valid


def test_invalid_data_writes_nothing(tiny, tmp_path):  # noqa: F811
    files = write_text_files(tmp_path / "data")
    options = TrainOptions(train_file=str(files["train"]), text_column="review", label_column="missing",
                           model=str(tiny / "bert"), output_dir=str(tmp_path / "run"), **FAST)
    with pytest.raises(ValueError, match="missing"):
        run_training(options)
    assert not (tmp_path / "run").exists()


def test_changed_classes_under_resume_are_refused_before_anything_is_rewritten(tiny, tmp_path):  # noqa: F811
    files = write_text_files(tmp_path / "data")
    options = TrainOptions(train_file=str(files["train"]), validation_file=str(files["validation"]),
                           test_file=str(files["test"]), text_column="review", label_column="stars",
                           model=str(tiny / "bert"), output_dir=str(tmp_path / "run"), resume=True, **FAST)
    folder = tmp_path / "run"
    (folder / "checkpoint-3").mkdir(parents=True)  # an interrupted run on the classes animal, other
    (folder / "run.json").write_text(json.dumps({"options": options.identity(), "labels": ["animal", "other"]}))
    (folder / "checkpoint-3" / "trainer_state.json").write_text("{}")
    before = _files(folder)
    write_text_files(tmp_path / "data", labels=("animal", "plant", "other"))  # the same files, another class
    with pytest.raises(ValueError, match=r"classes differ from those of the run in .*'plant' now"):
        run_training(options)
    assert _files(folder) == before and sorted(path.name for path in folder.iterdir()) == ["checkpoint-3", "run.json"]


def test_last_checkpoint_skips_a_truncated_trainer_state(tmp_path):
    for step, state in ((2, "{}"), (4, '{"global_step": 4, "log_hi'), (6, None)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / "trainer_state.json").write_bytes(b"\xff\xfe")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_resume_falls_back_to_the_previous_intact_checkpoint(tiny, tmp_path):  # noqa: F811
    options = _text_options(tiny, tmp_path, epochs=2)
    finished = run_training(options)
    folder = Path(options.output_dir)
    first, newest = sorted(folder.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    (folder / "metrics.json").unlink()  # as if killed after the last checkpoint, its state half written
    state = newest / "trainer_state.json"
    state.write_text(state.read_text()[:50])
    resumed = run_training(_text_options(tiny, tmp_path, epochs=2, resume=True))
    assert resumed["resumed_from"] == str(first) and resumed["steps"] == finished["steps"]
    scores = ("loss", "accuracy", "f1")
    assert [resumed["test"][name] for name in scores] == pytest.approx([finished["test"][name] for name in scores])


@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_unusable_output_dir_is_one_clear_error(where, tiny, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "file").write_text("mine")
    output_dir = {"file": tmp_path / "file", "under_file": tmp_path / "file" / "run",
                  "unwritable": tmp_path / "locked" / "run"}[where]
    if where == "unwritable":
        (tmp_path / "locked").mkdir()
        real_access = os.access  # chmod does not stop root: the check is what is tested
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "locked"
                            and real_access(path, mode))
    message = {"file": "is a file; give --output-dir a folder", "under_file": "which is a file",
               "unwritable": f"Cannot write to '{tmp_path / 'locked'}'"}[where]
    with pytest.raises(ValueError, match=message):
        run_training(_text_options(tiny, tmp_path, output_dir=str(output_dir)))
    assert (tmp_path / "file").read_text() == "mine" and not (tmp_path / "locked" / "run").exists()


def test_a_full_disk_is_one_clear_error_and_the_command_can_be_rerun(tiny, tmp_path, monkeypatch):  # noqa: F811
    """ENOSPC while the Trainer saves a checkpoint: one error naming the path; once space is freed, --resume."""
    options = _text_options(tiny, tmp_path, epochs=2)
    folder = Path(options.output_dir)
    save_checkpoint = Trainer._save_checkpoint

    def full_disk(trainer, *args, **kwargs):
        if not list(folder.glob("checkpoint-*")):
            return save_checkpoint(trainer, *args, **kwargs)
        partial = folder / f"checkpoint-{trainer.state.global_step}" / "optimizer.pt"
        partial.parent.mkdir()
        partial.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial))

    monkeypatch.setattr(Trainer, "_save_checkpoint", full_disk)
    with pytest.raises(ValueError, match=r"Cannot write '.*checkpoint-\d+/optimizer.pt': No space left on device; "
                                         "free some space.*again with --resume"):
        run_training(options)
    assert not (folder / "metrics.json").exists()
    first = last_checkpoint(folder)
    assert len(list(folder.glob("checkpoint-*"))) == 2 and first
    monkeypatch.setattr(Trainer, "_save_checkpoint", save_checkpoint)
    metrics = run_training(_text_options(tiny, tmp_path, epochs=2, resume=True))
    assert metrics["resumed_from"] == first and (folder / "metrics.json").is_file()


def test_a_full_disk_seen_through_another_exception(tmp_path, monkeypatch):
    """torch reports a failed write as a RuntimeError: it is read as a full disk only when the disk is full."""
    with pytest.raises(RuntimeError), disk_errors(tmp_path):
        raise RuntimeError("file write failed")
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(total=1 << 30, used=1 << 30, free=0))
    with pytest.raises(ValueError, match=f"The disk of '{tmp_path}' is full \\(RuntimeError while writing\\)"), \
            disk_errors(tmp_path):
        raise RuntimeError("file write failed")
    with pytest.raises(RuntimeError, match="mat1 and mat2"), disk_errors(tmp_path):  # not a write: left as it is
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)")
