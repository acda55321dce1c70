"""The files of a run directory: what the run is, its per-epoch history, its final metrics.

``run.json`` is written when a run starts: the options that define it, the labels and the head.
It lets a second command refuse to mix two different runs in one folder, lets ``--resume``
continue only the same run, and lets ``eval``/``merge`` rebuild the model. ``metrics.json`` is
written last and marks a finished run. Every write is atomic (temporary file + ``os.replace``),
so a run killed at any moment leaves either the old file or the new one. One process at a time
writes a run folder: it holds an exclusive lock on ``.tenslora.lock`` there (see ``run_lock``); the commands that
read a finished run share that lock (see ``reading_run``), so they do not refuse each other.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..files import write_atomic

RUN_FILE = "run.json"
RUN_KEYS = ("options", "model", "modality", "pooling", "labels")  # what eval, merge, export-lora read of it
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
TRAINER_STATE_FILE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint
LOCK_FILE = ".tenslora.lock"  # held by the process writing the run; not a file of the run itself
LOCK_WAIT_S = 2.0  # how long to wait for a lock another process only probes (see ``check_not_busy``)
FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk is full
POSIX = sys.platform != "win32"  # flock's shared locks, the file-size limit; on Windows readers probe the lock
if POSIX:
    import fcntl
    import resource


def read_json(path: str | os.PathLike, required: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON object TensLoRA wrote, with the ``required`` keys; ``ValueError`` naming the file if it is
    something else (truncated, damaged, or another program's file of the same name)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _not_ours(path, f"it does not parse as JSON ({error})") from None
    if not isinstance(data, dict):
        raise _not_ours(path, "it is not a JSON object")
    missing = [key for key in required if key not in data]
    if missing:
        raise _not_ours(path, f"it lacks {', '.join(map(repr, missing))}")
    return data


def _not_ours(path: Path, problem: str) -> ValueError:
    return ValueError(f"'{path}' is not the file TensLoRA writes there: {problem}. It was changed or damaged "
                      "outside TensLoRA; restore it, or use another folder.")


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``run.json`` of a ``tenslora train`` output directory; a finished run's only."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise FileNotFoundError(f"'{run_dir}' holds no {RUN_FILE}: pass the --output-dir of a `tenslora train` run.")
    check_not_busy(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise ValueError(f"The run in '{run_dir}' has not finished (no {METRICS_FILE}); finish it with "
                         f"`tenslora train --output-dir {run_dir} --resume` and the same options.")
    return read_json(run_dir / RUN_FILE, required=RUN_KEYS)


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest *complete* ``checkpoint-N`` folder: the Trainer writes its state file last, so a kill (or a
    full disk) while saving leaves a checkpoint whose state is missing or does not parse."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    complete = [(int(match.group(1)), path) for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if (match := pattern.match(path.name)) and _holds_state(path)]
    return str(max(complete)[1]) if complete else None


def _holds_state(checkpoint: Path) -> bool:
    try:
        read_json(checkpoint / TRAINER_STATE_FILE)
    except (OSError, ValueError):  # missing, unreadable, truncated, not an object
        return False
    return True


def resumable_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """``last_checkpoint``, with its files read as the Trainer will read them to resume: a ``ValueError`` naming the
    one that does not load (damaged outside the Trainer) and the fix, rather than an unpickling traceback."""
    checkpoint = last_checkpoint(output_dir)
    if checkpoint is None:
        return None
    for path in sorted(Path(checkpoint).iterdir()):
        try:
            if path.suffix in (".pt", ".pth"):  # optimizer, scheduler, scaler, random states
                with safe_globals():  # the numpy types the Trainer allows in them
                    torch.load(path, map_location="cpu", weights_only=True)
            elif path.suffix == ".safetensors":
                load_file(path)
        except Exception as error:
            reason = "".join(str(error).strip().split(". ")[0].splitlines()[:1])  # torch's first sentence
            raise ValueError(f"Cannot resume from '{checkpoint}': its file '{path.name}' does not load "
                             f"({type(error).__name__}{': ' * bool(reason)}{reason}). Delete that checkpoint "
                             "folder to resume from the one before it, or train anew in another --output-dir."
                             ) from None
    return checkpoint


def check_run_dir(output_dir: str | os.PathLike, identity: Mapping[str, Any], resume: bool) -> bool:
    """Whether ``output_dir`` already holds this run, finished; raise ``ValueError`` if it may not be used.

    An empty or missing folder starts a new run. A folder holding the same run continues with
    ``resume`` (a finished one is not trained again). Anything else is refused: a different run
    (the message names the options that differ), or files that are not a run's.
    """
    output_dir = Path(output_dir)
    run_file = output_dir / RUN_FILE
    check_writable(output_dir)
    if not output_dir.exists() or not any(path.name != LOCK_FILE for path in output_dir.iterdir()):
        return False
    if not run_file.is_file():
        raise ValueError(f"The output directory '{output_dir}' is not empty and holds no tenslora run; "
                         "choose another --output-dir.")
    run = read_json(run_file, required=["options"])
    if "compressed_from" in run:
        raise ValueError(f"The output directory '{output_dir}' holds an adapter compressed from "
                         f"'{run['compressed_from']}' by `tenslora compress`, not a training run; evaluate it with "
                         "`tenslora eval`, and train into another --output-dir.")
    recorded = run["options"]
    differences = [f"{key}: {recorded.get(key)!r} there, {value!r} now" for key, value in identity.items()
                   if recorded.get(key) != value]
    if differences:
        raise ValueError(f"The output directory '{output_dir}' holds a different run ({'; '.join(differences)}); "
                         "choose another --output-dir, or repeat that run's options to --resume it.")
    finished = (output_dir / METRICS_FILE).is_file()
    if not resume:
        state = "a finished run" if finished else "an interrupted run"
        raise ValueError(f"The output directory '{output_dir}' already holds {state} with these options; pass "
                         "--resume to continue it (or print its results), or choose another --output-dir.")
    return finished


def check_writable(output_dir: str | os.PathLike) -> None:
    """Refuse an output folder that is a file, lies under a file, or cannot be created or written to."""
    output_dir = Path(output_dir)
    dangling = next((path for path in (output_dir, *output_dir.parents) if path.is_symlink() and not path.exists()),
                    None)
    if dangling is not None:
        raise ValueError(f"The output directory '{output_dir}' goes through '{dangling}', a symbolic link to "
                         f"'{os.readlink(dangling)}', which does not exist; create that folder, or choose another "
                         "--output-dir.")
    existing = _nearest_existing(output_dir)
    if not existing.is_dir():
        where = "is a file" if existing == output_dir else f"is under '{existing}', which is a file"
        raise ValueError(f"The output directory '{output_dir}' {where}; give --output-dir a folder path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"Cannot write to '{existing}' (permission denied or read-only disk); choose an "
                         "--output-dir you can write to.")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the folder a new output folder will be created in)."""
    return next(folder for folder in (path, *path.absolute().parents) if folder.exists())


def check_same_labels(output_dir: str | os.PathLike, labels: Sequence[str]) -> None:
    """Refuse to continue a run whose data now has other classes than the run was started with."""
    run_file = Path(output_dir) / RUN_FILE
    if not run_file.is_file():
        return
    recorded = read_json(run_file, required=["labels"])["labels"]
    if list(labels) != recorded:
        changes = [f"{label!r} now" for label in labels if label not in recorded][:3]
        changes += [f"{label!r} gone" for label in recorded if label not in labels][:3]
        raise ValueError(f"The data's classes differ from those of the run in '{output_dir}' "
                         f"({', '.join(changes) or 'same classes in another order'}); resume it with the data it "
                         "was started with, or choose another --output-dir.")


def _busy(run_dir: Path) -> ValueError:
    return ValueError(f"Another process is training in '{run_dir}' (it holds {run_dir / LOCK_FILE}); wait for it "
                      "to finish, or choose another --output-dir.")


def check_not_busy(run_dir: str | os.PathLike) -> None:
    """Refuse a run folder another process is writing (it holds the lock exclusively); creates nothing. A probe
    shares the lock: it never refuses, nor disturbs, another reader."""
    run_dir = Path(run_dir)
    if not (run_dir / LOCK_FILE).is_file():
        return
    if POSIX:
        with _shared_lock(run_dir):
            return
    try:
        with FileLock(run_dir / LOCK_FILE).acquire(timeout=0):
            pass
    except Timeout:
        raise _busy(run_dir) from None
    except OSError:  # a lock file we may not open (a read-only folder): nobody can be writing there as us
        return


@contextmanager
def reading_run(run_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """``read_run``, with the run's lock shared for the block: other readers (eval, export-lora, compress, merge) go
    on, a writer is refused until the block ends."""
    with _shared_lock(Path(run_dir)) if POSIX else contextlib.nullcontext():
        yield read_run(run_dir)


@contextmanager
def _shared_lock(run_dir: Path) -> Iterator[None]:
    """Hold a shared ``flock`` on the run's lock file, where there is one to open (a reader creates nothing);
    raise the busy error at once if a writer holds it. ``filelock``'s writers take the same ``flock``,
    exclusively."""
    try:
        handle = open(run_dir / LOCK_FILE, "rb")  # noqa: SIM115  (closed below; closing releases the lock)
    except OSError:  # none, or one we may not open (a copied run, a read-only folder): nobody writes there as us
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(run_dir) from None
        yield
    finally:
        handle.close()


@contextmanager
def run_lock(run_dir: str | os.PathLike, hold: bool = True) -> Iterator[None]:
    """Create ``run_dir`` and hold its exclusive lock for the block (``hold=False``: do neither, for the
    processes of a multi-process launch other than the main one, which writes for all of them)."""
    if not hold:
        yield
        return
    with folder_lock(Path(run_dir), _busy):
        yield


@contextmanager
def folder_lock(folder: Path, busy: Callable[[Path], ValueError]) -> Iterator[None]:
    """Create ``folder`` and hold the exclusive lock on its ``LOCK_FILE`` for the block; raise ``busy(folder)``
    if another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_FILE)
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        raise busy(folder) from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def disk_errors(output_dir: str | os.PathLike, resume: bool = True) -> Iterator[None]:
    """Turn a write that fails for a reason the user can fix (full disk, file-size limit, permissions) into one
    ``ValueError`` naming the path and the fix: run the command again (``resume``: with --resume) once fixed.

    Native libraries report the system's error in their own exception types: safetensors with its number in the
    message ("(os error 28)"), torch without it. So an error that reads as a failed write (``_WRITE_FAILURE``) is
    taken for a full disk when the disk has (almost) no space left, and for a file too large when this process has
    a file-size limit; any other error (out of memory, a bug) passes through as it is.
    """
    try:
        yield
    except ValueError:  # already says what to fix
        raise
    except Exception as error:
        again = "then run the same command again" + (" with --resume" if resume else "")
        number = _error_number(error)
        if number in _DISK_FIXES:
            # the file written: a copy's or a rename's destination (filename2), else the file (filename)
            path = getattr(error, "filename2", None) or getattr(error, "filename", None) or output_dir
            raise ValueError(f"Cannot write '{path}': {os.strerror(number)}; "
                             f"{_DISK_FIXES[number].format(again=again)}.") from error
        if not (isinstance(error, OSError) or _WRITE_FAILURE.search(str(error))):
            raise
        if _disk_full(output_dir):
            raise ValueError(f"The disk of '{output_dir}' is full ({type(error).__name__} while writing); "
                             f"{_DISK_FIXES[errno.ENOSPC].format(again=again)}.") from error
        limit = _file_size_limit()
        if limit is not None:
            raise ValueError(f"A file in '{output_dir}' could not be written ({type(error).__name__}) and this "
                             f"process may write files of {limit:,} bytes at most; "
                             f"{_DISK_FIXES[errno.EFBIG].format(again=again)}.") from error
        raise


#: How torch's archive writer and the Rust libraries word a failed write, since they raise no ``OSError``.
_WRITE_FAILURE = re.compile(r"unexpected pos|PytorchStreamWriter|file write failed|I/O error|os error \d+")

_DISK_FIXES = {
    errno.ENOSPC: "free some space on that disk (or choose another output folder), {again}",
    errno.EDQUOT: "free some of your disk quota (or choose another output folder), {again}",
    errno.EFBIG: "raise the file-size limit (`ulimit -f`) or choose an output folder on a disk that takes larger "
                 "files, {again}",
    errno.EACCES: "make that folder writable or choose another output folder",
    errno.EPERM: "make that folder writable or choose another output folder",
    errno.EROFS: "the disk is read-only: choose another output folder",
    errno.ENOTDIR: "a part of that path is a file: choose another output folder",
}


def _error_number(error: Exception) -> int | None:
    """The system's error number behind ``error``: an ``OSError``'s, or the one a library written in Rust
    (safetensors, tokenizers) prints in its message as "(os error N)"."""
    if isinstance(error, OSError):
        return error.errno
    match = re.search(r"\(os error (\d+)\)", str(error))
    return int(match.group(1)) if match else None


def _file_size_limit() -> int | None:
    """The largest file this process may write (``ulimit -f``), in bytes; None without limit."""
    if not POSIX:
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def _disk_full(output_dir: str | os.PathLike) -> bool:
    try:
        return shutil.disk_usage(_nearest_existing(Path(output_dir))).free < FULL_DISK_BYTES
    except OSError:
        return False


def history_rows(log_history: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluation on the validation split: epoch, step, last training loss, validation metrics."""
    rows, train_loss = [], None
    for entry in log_history:
        if "loss" in entry:
            train_loss = entry["loss"]
        if any(key.startswith("eval_") for key in entry):
            row = {"epoch": entry.get("epoch"), "step": entry.get("step"), "train_loss": train_loss}
            row.update({key: value for key, value in entry.items() if key.startswith("eval_")})
            rows.append(row)
    return rows


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Atomically write ``rows`` as CSV, one column for every key of any row (blank where a row lacks it)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


class HistoryCallback(TrainerCallback):
    """Rewrites ``history.csv`` after every validation pass, from the Trainer's own log.

    The log is saved in every checkpoint and restored on resume, so the history of a resumed run
    holds every finished epoch without keeping any state here.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if state.is_world_process_zero:
            write_csv(self.path, history_rows(state.log_history))
