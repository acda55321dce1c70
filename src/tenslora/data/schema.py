"""Checks that loaded splits have the columns a task needs and one shared set of class labels."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from datasets import ClassLabel, Dataset, DatasetDict, Features

from .errors import DataError


def check_columns(data: DatasetDict, columns: Sequence[str], hint: str,
                  sources: Mapping[str, str | os.PathLike] | None = None) -> None:
    """The data has a train split, and every split has ``columns``; ``hint`` says how to fix a missing one,
    and ``sources`` (the file of each split, when known) where."""
    if "train" not in data:
        raise DataError(f"the data has no train split (it has: {', '.join(data) or 'none'}); provide training data")
    for split, dataset in data.items():
        missing = [column for column in columns if column not in dataset.column_names]
        if missing:
            where = f" ({sources[split]})" if sources and split in sources else ""
            raise DataError(f"the {split} split{where} has no column {', '.join(map(repr, missing))} "
                            f"(it has: {', '.join(dataset.column_names)}); {hint}")


def check_not_empty(data: DatasetDict) -> None:
    """Every split has rows (a split carved from a small training set can have none)."""
    for split, dataset in data.items():
        if len(dataset) == 0:
            raise DataError(f"the {split} split is empty; provide {split} data or more training data")


def encode_labels(data: DatasetDict, names: Sequence[str] | None = None) -> DatasetDict:
    """Give every split the same ``ClassLabel`` ``label`` feature, and check the labels against it.

    Labels already typed ``ClassLabel`` keep their classes; bare ids ``0..n-1`` get ``names`` when given; other raw
    labels (strings or numbers) become classes named after the training labels, in sorted order. Labels of an
    evaluation split that training never shows are an error: the model could not learn them.
    """
    known = _label_values(data, "train")
    for split in data:
        unknown = _label_values(data, split) - known
        if unknown:
            raise DataError(f"labels {sorted(map(str, unknown))} of the {split} split never occur in the train "
                            "split; add training examples for them or drop those rows")
    feature = data["train"].features["label"]
    if isinstance(feature, ClassLabel) or names is not None:
        classes = feature if isinstance(feature, ClassLabel) else ClassLabel(names=list(names))
        invalid = sorted(map(str, known - set(range(classes.num_classes))))
        if invalid:
            raise DataError(f"labels {invalid} are not ids of the {classes.num_classes} classes {classes.names} "
                            "(-1 marks unlabelled rows); use labelled data with those ids")
        return data if classes is feature else data.cast_column("label", classes)
    ordered = sorted(known)
    index = {value: position for position, value in enumerate(ordered)}
    classes = ClassLabel(names=[str(value) for value in ordered])
    return DatasetDict({split: dataset.map(lambda batch: {"label": [index[value] for value in batch["label"]]},
                                           batched=True, features=_with_label(dataset, classes))
                        for split, dataset in data.items()})


def _label_values(data: DatasetDict, split: str) -> set:
    values = set(data[split].unique("label"))
    if None in values:
        raise DataError(f"the {split} split has rows without a label; fill in or drop those rows")
    return values


def _with_label(dataset: Dataset, feature: ClassLabel) -> Features:
    features = dataset.features.copy()
    features["label"] = feature
    return features
