"""Writing files so that a kill or a full disk never leaves half of one: temporary name, fsync, rename.

Used by the library (adapter saves, exports) and the application (run folders, sweeps) alike.
"""

from __future__ import annotations

import contextlib
import errno
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

    ``path`` must not exist or be an empty folder (a symbolic link to one is written through): an export never
    mixes its files with others'. A file system error in the block names the file as it was to appear in ``path``.
    """
    path = output_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.export-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # with the user's umask, as any folder they create (mkdtemp's would be readable by them alone)
    try:
        try:
            yield staging
        except OSError as error:
            for attribute in ("filename", "filename2"):  # a copy's source and destination
                name = getattr(error, attribute)
                if name and Path(name).is_relative_to(staging):
                    setattr(error, attribute, str(path / Path(name).relative_to(staging)))
            raise
        try:
            os.replace(staging, path)  # an empty folder at `path` is replaced too
        except OSError as error:
            if error.errno not in _TAKEN:
                raise
            raise ValueError(f"'{path}' {_TAKEN[error.errno]}; nothing was written there: choose a new output "
                             "folder.") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


#: Why the final rename of ``new_folder`` fails on a path that was free when it began.
_TAKEN = {errno.ENOTEMPTY: "was filled by another process meanwhile", errno.EEXIST: "was filled by another process "
          "meanwhile", errno.ENOTDIR: "became a file meanwhile", errno.EISDIR: "became a folder meanwhile",
          errno.EBUSY: "is in use (a mount point, or a folder the system will not replace)"}


def output_folder(path: str | os.PathLike) -> Path:
    """The folder ``new_folder`` replaces: ``path``, or the one a symbolic link there points to; ``ValueError`` if
    it may not be replaced (it holds files, it is a dangling link, it is the current folder or holds it). For a
    command to call before its slow part; ``new_folder`` checks again."""
    path = Path(path)
    if path.is_symlink():
        if not path.exists():
            raise ValueError(f"'{path}' is a symbolic link to '{os.readlink(path)}', which does not exist; create "
                             "that folder, or choose a new output folder.")
        path = path.resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"'{path}' exists and is not an empty folder; choose a new output folder.")
    if path.exists() and Path.cwd().resolve().is_relative_to(path.resolve()):
        raise ValueError(f"'{path}' is the current folder (or holds it), which an output folder cannot replace; "
                         f"choose a new folder, e.g. '{path / 'out'}'.")
    return path


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_destination(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
