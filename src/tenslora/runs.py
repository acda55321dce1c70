"""The files of a run directory: what the run is, its per-epoch history, its final metrics.

``run.json`` is written when a run starts: the options that define it, the labels and the head.
It lets a second command refuse to mix two different runs in one folder, lets ``--resume``
continue only the same run, and lets ``eval``/``merge`` rebuild the model. ``metrics.json`` is
written last and marks a finished run. Every write is atomic (temporary file + ``os.replace``),
so a run killed at any moment leaves either the old file or the new one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
TRAINER_STATE_FILE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint


@contextmanager
def atomic_destination(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, for writers that read the format from it) to
    write to; renamed over ``path`` when the block ends without error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with atomic_destination(path) as temporary:
        temporary.write_text(text)


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``run.json`` of a ``tenslora train`` output directory; a finished run's only."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise FileNotFoundError(f"'{run_dir}' holds no {RUN_FILE}: pass the --output-dir of a `tenslora train` run.")
    if not (run_dir / METRICS_FILE).is_file():
        raise ValueError(f"The run in '{run_dir}' has not finished (no {METRICS_FILE}); finish it with "
                         f"`tenslora train --output-dir {run_dir} --resume` and the same options.")
    return read_json(run_dir / RUN_FILE)


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest *complete* ``checkpoint-N`` folder (a kill while saving leaves one without trainer state)."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    complete = [(int(match.group(1)), path) for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                if (match := pattern.match(path.name)) and (path / TRAINER_STATE_FILE).is_file()]
    return str(max(complete)[1]) if complete else None


def check_run_dir(output_dir: str | os.PathLike, identity: Mapping[str, Any], resume: bool) -> bool:
    """Whether ``output_dir`` already holds this run, finished; raise ``ValueError`` if it may not be used.

    An empty or missing folder starts a new run. A folder holding the same run continues with
    ``resume`` (a finished one is not trained again). Anything else is refused: a different run
    (the message names the options that differ), or files that are not a run's.
    """
    output_dir = Path(output_dir)
    run_file = output_dir / RUN_FILE
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return False
    if not run_file.is_file():
        raise ValueError(f"The output directory '{output_dir}' is not empty and holds no tenslora run; "
                         "choose another --output-dir.")
    recorded = read_json(run_file)["options"]
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
