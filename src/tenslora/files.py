"""Writing files so that a kill or a full disk never leaves half of one: temporary name, fsync, rename.

Used by the library (adapter saves, exports) and the application (run folders, sweeps) alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sync_to_disk(path: Path) -> None:
    """Flush a file, or a folder's entries (renames into it), to disk where the system allows it."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


@contextmanager
def atomic_destination(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, for writers that read the format from it) to
    write to; renamed over ``path`` when the block ends without error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        sync_to_disk(temporary)  # on disk before the rename: a power loss leaves the old file, not an empty one
        os.replace(temporary, path)
        sync_to_disk(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def new_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A staging folder beside ``path`` to write into, renamed to ``path`` when the block succeeds.

    ``path`` must not exist or be empty: an export never mixes its files with others'.
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"'{path}' exists and is not an empty folder; choose a new output folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.export-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # with the user's umask, as any folder they create (mkdtemp's would be readable by them alone)
    try:
        yield staging
        os.replace(staging, path)  # an empty folder at `path` is replaced too
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_destination(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
