"""The task registry: what each task reads and scores, and the one path from a task to checked splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

from datasets import DatasetDict

from .errors import DataError
from .glue import LABEL_NAMES, load_glue
from .images import load_fashion_mnist, load_image_task
from .schema import check_columns, check_not_empty, encode_labels
from .splits import complete_splits, subsample
from .wordnet import wordnet_splits

DEFAULT_TASK = "wordnet-supersense"
CAUSAL_LM_TASK = "causal-lm"


@dataclass(frozen=True)
class TaskSpec:
    """A task: how to read its data, which columns feed the model, and how it is scored.

    For classification (``text``, ``image``), ``load`` returns a ``DatasetDict`` with a ``train`` split, maybe
    ``validation`` and ``test`` splits, and a ``label`` column; ``load_task`` checks it and completes the splits.
    Causal-LM data (``causal_lm.py``) has no label: its model learns the text itself.
    """

    name: str
    modality: Literal["text", "image", "causal-lm"]
    load: Callable[[], DatasetDict]
    text_column: str | None = None
    text_pair_column: str | None = None
    image_column: str | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    label_names: tuple[str, ...] | None = None  # of bare label ids 0..n-1, when the data does not name them

    @property
    def columns(self) -> list[str]:
        """The columns the task reads."""
        inputs = (self.text_column, self.text_pair_column, self.image_column)
        return [column for column in inputs if column] + ["label"]


Loader = Callable[[str | None], DatasetDict]
"""Reads a built-in task's data from a local source (file or folder), or from its default source given ``None``."""

BUILTIN_TASKS: dict[str, tuple[Loader, dict[str, Any]]] = {
    "wordnet-supersense": (wordnet_splits, {"modality": "text", "text_column": "text"}),
    "glue-cola": (partial(load_glue, "cola"), {"modality": "text", "text_column": "sentence",
                                               "metrics": ("accuracy", "matthews_correlation"),
                                               "label_names": LABEL_NAMES["cola"]}),
    "glue-mrpc": (partial(load_glue, "mrpc"), {"modality": "text", "text_column": "sentence1",
                                               "text_pair_column": "sentence2", "metrics": ("accuracy", "f1"),
                                               "label_names": LABEL_NAMES["mrpc"]}),
    "glue-sst2": (partial(load_glue, "sst2"), {"modality": "text", "text_column": "sentence",
                                               "label_names": LABEL_NAMES["sst2"]}),
    "glue-rte": (partial(load_glue, "rte"), {"modality": "text", "text_column": "sentence1",
                                             "text_pair_column": "sentence2", "label_names": LABEL_NAMES["rte"]}),
    "eurosat": (partial(load_image_task, "timm/eurosat-rgb"), {"modality": "image", "image_column": "image"}),
    "dtd": (partial(load_image_task, "tanganke/dtd"), {"modality": "image", "image_column": "image"}),
    "fashion-mnist": (load_fashion_mnist, {"modality": "image", "image_column": "image"}),
}
"""Each task's loader and ``TaskSpec`` fields. Sources: wordnet-supersense, the shipped file (or another built by
``scripts/build_wordnet_dataset.py``); GLUE, a folder of files (``--data-dir``); eurosat and dtd, an image folder
(``--image-root``); fashion-mnist, a folder of IDX files (``--data-dir``)."""

FILE_TASKS: dict[str, str] = {
    CAUSAL_LM_TASK: "causal language modelling of your --train-file (a text column, or prompt and completion)",
}
"""Tasks with no data of their own: a training objective for the user's files (``--task causal-lm --train-file``)."""


def get_task(name: str, source: str | None = None) -> TaskSpec:
    """The built-in task ``name``, reading from ``source`` (a local file or folder) instead of its default."""
    if name not in BUILTIN_TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(BUILTIN_TASKS)}")
    loader, fields = BUILTIN_TASKS[name]
    return TaskSpec(name=name, load=partial(loader, source), **fields)


def load_task(spec: TaskSpec, max_train: int | None = None, max_validation: int | None = None,
              max_test: int | None = None, seed: int = 0) -> DatasetDict:
    """Checked train/validation/test splits of ``spec`` with a ``ClassLabel`` ``label``, cut to the ``max_*`` sizes.

    Missing evaluation splits are carved from train, and subsets drawn, as ``complete_splits`` and ``subsample``
    describe: the same rows on every run.
    """
    data = spec.load()
    check_columns(data, spec.columns, f"the {spec.name} task reads the columns {', '.join(spec.columns)}")
    data = complete_splits(encode_labels(data, spec.label_names))
    check_not_empty(data)
    return subsample(data, {"train": max_train, "validation": max_validation, "test": max_test}, seed)
