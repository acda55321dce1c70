"""Saving and loading adapters safely: atomic writes, validated loads, safetensors only.

``PeftModel.save_pretrained`` / ``PeftModel.from_pretrained`` work as they do for any PEFT
method; these two functions add what production use needs: a crash while saving never leaves a
half-written adapter where a good one was, and a load checks the files before trusting them
(PEFT would fall back to unpickling ``adapter_model.bin``; TensLoRA never does).

A save replaces only the files ``save_pretrained`` writes, as PEFT does in place (a run folder's
history, metrics and checkpoints, or a user's own files, stay), through a small redo journal:
the files are written and synced in a hidden staging folder inside the target; renaming it to
``*.committed`` commits the save; then each file is renamed over its old version. The staging folder
holds a journal (``.tenslora-journal.json``) that proves it is ours and lists the files to move: recovery
touches nothing else, whatever its name. A kill before the commit leaves the old adapter (the next save
discards the staging folder); a kill after it leaves a committed journal that the next ``save_adapter``
or ``load_adapter`` finishes. Only in a
folder a kill left between those few renames, and until then, would a bare
``PeftModel.from_pretrained`` (which knows nothing of the journal) see old and new files together.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from torch import nn

from ..files import sync_to_disk, write_atomic
from .peft_type import PEFT_TYPE_NAME

CONFIG_NAME = "adapter_config.json"
STAGING_PREFIX = ".tenslora-save-"  # a save being written, inside the target folder
COMMITTED = ".committed"  # suffix of a staging folder whose files are complete and synced
JOURNAL = ".tenslora-journal.json"  # inside a staging folder: proof that this module made it, and what it holds
JOURNAL_FORMAT = "tenslora-save/1"
MODEL_CARD = "README.md"  # PEFT updates an existing card rather than replacing it


def save_adapter(model: PeftModel, directory: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained(directory)`` that a kill at any moment leaves with a whole adapter, old or new."""
    directory = Path(directory)
    if directory.is_file():
        raise ValueError(f"'{directory}' is a file; save the adapter into a folder.")
    directory.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(directory, discard_unfinished=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))  # made by this call: ours to remove
    try:
        _write_journal(staging, files=None)  # from here on the folder is provably ours, even if a kill follows
        if (directory / MODEL_CARD).is_file():
            shutil.copy2(directory / MODEL_CARD, staging / MODEL_CARD)
        model.save_pretrained(staging, safe_serialization=True, **kwargs)
        written = sorted(str(path.relative_to(staging)) for path in staging.rglob("*")
                         if path.is_file() and path.name != JOURNAL)
        _write_journal(staging, files=written)
        _sync_tree(staging)
        committed = staging.with_name(staging.name + COMMITTED)
        os.replace(staging, committed)
        sync_to_disk(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once committed
    _move_into_place(committed, directory, written)
    return directory


def recover_interrupted_save(directory: str | os.PathLike, discard_unfinished: bool = False) -> None:
    """Finish the saves into ``directory`` a kill interrupted after their commit; with ``discard_unfinished``
    (a writer, the only one in this folder) also remove those interrupted before it.

    Only staging folders whose journal this module wrote are touched, and of a committed one only the files its
    journal lists: a folder that merely looks like ours (its name) is left as it is, whatever it holds.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for leftover in sorted(directory.glob(f"{STAGING_PREFIX}*")):
        journal = _journal(leftover)
        if journal is None:
            continue
        if leftover.name.endswith(COMMITTED) and journal["files"] is not None:
            _move_into_place(leftover, directory, journal["files"])
        elif discard_unfinished:
            shutil.rmtree(leftover, ignore_errors=True)


def _write_journal(staging: Path, files: list[str] | None) -> None:
    """Record that ``staging`` is a save of this module and, once complete, which files it holds (replacing the
    first record whole: a kill while writing leaves one journal or the other, never half of one)."""
    write_atomic(staging / JOURNAL, json.dumps({"format": JOURNAL_FORMAT, "files": files}))


def _journal(folder: Path) -> dict | None:
    """The journal of a staging folder this module wrote, or None for any other folder (or no folder)."""
    try:
        journal = json.loads((folder / JOURNAL).read_text())
    except (OSError, ValueError):
        return None
    files = journal.get("files") if isinstance(journal, dict) else None
    if not isinstance(journal, dict) or journal.get("format") != JOURNAL_FORMAT or not (
            files is None or (isinstance(files, list) and all(_is_inside(name) for name in files))):
        return None
    return journal


def _is_inside(name: object) -> bool:
    """Whether a journal entry names a file below its folder (never an absolute path or a way out)."""
    return isinstance(name, str) and bool(name) and not Path(name).is_absolute() and ".." not in Path(name).parts


def _move_into_place(committed: Path, directory: Path, files: list[str]) -> None:
    """Rename every file a committed save's journal lists (``files``) over its counterpart in ``directory``;
    repeatable after a kill, and beside another recovery of the same save (a file moved already is skipped)."""
    folders = {directory}
    for name in files:
        source, target = committed / name, directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # moved already, by a recovery running at the same time
            os.replace(source, target)
        folders.add(target.parent)
    for folder in folders:
        sync_to_disk(folder)
    shutil.rmtree(committed, ignore_errors=True)


def _sync_tree(folder: Path) -> None:
    """Flush the files under ``folder``, and the folders' entries, to disk before they are committed."""
    for path in [*folder.rglob("*"), folder]:
        sync_to_disk(path)


def check_adapter_dir(directory: str | os.PathLike) -> dict:
    """Validate a saved TensLoRA adapter folder; return its config as a dict."""
    directory = Path(directory)
    config_file, weights_file = directory / CONFIG_NAME, directory / SAFETENSORS_WEIGHTS_NAME
    if not config_file.is_file():
        raise ValueError(f"No {CONFIG_NAME} in '{directory}': point to a folder written by save_pretrained.")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"'{config_file}' is corrupt ({error}); re-save the adapter.") from None
    if not isinstance(config, dict) or config.get("peft_type") != PEFT_TYPE_NAME:
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"'{directory}' holds a {found} adapter, not a TensLoRA one; load it with PEFT directly.")
    if not weights_file.is_file():
        hint = (f" It has {WEIGHTS_NAME}, a pickle file, which TensLoRA does not load: re-save it with safetensors."
                if (directory / WEIGHTS_NAME).exists() else "")
        raise ValueError(f"No {SAFETENSORS_WEIGHTS_NAME} in '{directory}'.{hint}")
    try:
        with safe_open(weights_file, framework="pt") as weights:
            keys = list(weights.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(f"'{weights_file}' is corrupt or truncated ({error}); re-save the adapter.") from None
    if not keys:
        raise ValueError(f"'{weights_file}' holds no tensors; re-save the adapter.")
    return config


def load_adapter(base_model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` after checking the folder, and checking every saved tensor was used."""
    recover_interrupted_save(directory)
    check_adapter_dir(directory)
    model = PeftModel.from_pretrained(base_model, str(directory), adapter_name=adapter_name,
                                      is_trainable=is_trainable)
    with safe_open(Path(directory) / SAFETENSORS_WEIGHTS_NAME, framework="pt") as weights:
        saved = set(weights.keys())
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    if saved != expected:
        raise ValueError(
            f"The adapter in '{directory}' does not match the model: missing {sorted(expected - saved)[:5]}, "
            f"unexpected {sorted(saved - expected)[:5]}. It was probably saved from another model or version."
        )
    return model
