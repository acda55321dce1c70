"""Saving and loading adapters safely: atomic writes, validated loads, safetensors only.

``PeftModel.save_pretrained`` / ``PeftModel.from_pretrained`` work as they do for any PEFT
method; these two functions add what production use needs: a crash while saving never leaves a
half-written adapter where a good one was, and a load checks the files before trusting them
(PEFT would fall back to unpickling ``adapter_model.bin``; TensLoRA never does).

A save replaces only the files ``save_pretrained`` writes, as PEFT does in place (a run folder's
history, metrics and checkpoints, or a user's own files, stay), through a small redo journal:
the files are written and synced in a hidden staging folder inside the target; renaming it to
``*.committed`` commits the save; then each file is renamed over its old version. A kill before
the commit leaves the old adapter (the next save discards the staging folder); a kill after it
leaves a committed journal that the next ``save_adapter`` or ``load_adapter`` finishes. Only in a
folder a kill left between those few renames, and until then, would a bare
``PeftModel.from_pretrained`` (which knows nothing of the journal) see old and new files together.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from torch import nn

from .registration import PEFT_TYPE_NAME

CONFIG_NAME = "adapter_config.json"
STAGING_PREFIX = ".tenslora-save-"  # a save being written, inside the target folder
COMMITTED = ".committed"  # suffix of a staging folder whose files are complete and synced
MODEL_CARD = "README.md"  # PEFT updates an existing card rather than replacing it


def save_adapter(model: PeftModel, directory: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained(directory)`` that a kill at any moment leaves with a whole adapter, old or new."""
    directory = Path(directory)
    if directory.is_file():
        raise ValueError(f"'{directory}' is a file; save the adapter into a folder.")
    directory.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(directory, discard_unfinished=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
    try:
        if (directory / MODEL_CARD).is_file():
            shutil.copy2(directory / MODEL_CARD, staging / MODEL_CARD)
        model.save_pretrained(staging, safe_serialization=True, **kwargs)
        _sync_tree(staging)
        committed = staging.with_name(staging.name + COMMITTED)
        os.replace(staging, committed)
        sync_to_disk(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _move_into_place(committed, directory)
    return directory


def recover_interrupted_save(directory: str | os.PathLike, discard_unfinished: bool = False) -> None:
    """Finish the saves into ``directory`` a kill interrupted after their commit; with ``discard_unfinished``
    (a writer, the only one in this folder) also remove those interrupted before it.

    Also repairs what the earlier scheme of this module (a sibling staging folder ``.NAME.XXXXXXXX`` moved
    over the target, the old target retired as ``.NAME.old.XXXXXXXX/NAME``) left after a kill: the files
    of the retired copy the target lacks are moved back (the whole old adapter when the kill left no target,
    and the other files, history or checkpoints, that scheme deleted), then both leftovers are removed.
    """
    directory = Path(directory)
    if directory.is_dir():
        for leftover in sorted(directory.glob(f"{STAGING_PREFIX}*")):
            if leftover.name.endswith(COMMITTED):
                _move_into_place(leftover, directory)
            elif discard_unfinished:
                shutil.rmtree(leftover, ignore_errors=True)
    try:
        siblings = list(directory.parent.iterdir())
    except OSError:  # a parent we may not list holds no leftovers of ours
        return
    name = re.escape(directory.name)
    retired_copies = [path for path in siblings
                      if re.fullmatch(rf"\.{name}\.old\.[a-z0-9_]{{8}}", path.name) and path.is_dir()]
    for retired in sorted(retired_copies, key=lambda path: path.stat().st_mtime, reverse=True):
        if (retired / directory.name).is_dir():
            directory.mkdir(exist_ok=True)
            for entry in sorted((retired / directory.name).iterdir()):
                if not (directory / entry.name).exists():
                    os.replace(entry, directory / entry.name)
            sync_to_disk(directory)
        shutil.rmtree(retired, ignore_errors=True)
    if discard_unfinished:
        for staging in siblings:
            if re.fullmatch(rf"\.{name}\.[a-z0-9_]{{8}}", staging.name) and _holds_only_adapter_files(staging):
                shutil.rmtree(staging, ignore_errors=True)


def _holds_only_adapter_files(folder: Path) -> bool:
    """Whether ``folder`` could be that scheme's unfinished save: a folder with nothing but what
    ``save_pretrained`` writes (a user's own folder of the same shape of name holds other things)."""
    written_by_save = {CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, MODEL_CARD}
    return folder.is_dir() and all(entry.name in written_by_save and entry.is_file() for entry in folder.iterdir())


def _move_into_place(committed: Path, directory: Path) -> None:
    """Rename every file of a committed save over its counterpart in ``directory``; repeatable after a kill."""
    folders = {directory}
    for source in sorted(path for path in committed.rglob("*") if path.is_file()):
        target = directory / source.relative_to(committed)
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


def sync_to_disk(path: Path) -> None:
    """Flush a file, or a folder's entries (renames into it), to disk where the system allows it."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


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
