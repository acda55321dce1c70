"""Turning examples into model inputs with any Hugging Face tokenizer or image processor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import DatasetDict

from .errors import DataError
from .tasks import TaskSpec


def tokenize_text_task(data: DatasetDict, tokenizer: Any, spec: TaskSpec, max_length: int) -> DatasetDict:
    """Token ids of each split's text (and text pair), truncated to ``max_length``; only ``label`` is kept.

    Nothing is padded: a ``DataCollatorWithPadding`` pads each batch to its longest example.
    """
    columns = [column for column in (spec.text_column, spec.text_pair_column) if column]
    if spec.modality != "text" or not columns:
        raise DataError(f"task {spec.name} has no text to tokenize; use image_transform for image tasks")

    def tokenize(batch: dict[str, list], split: str) -> dict[str, list]:
        for column in columns:
            if any(text is None for text in batch[column]):
                raise DataError(f"the {split} split has rows with an empty {column!r} column; fill in or drop them")
        return tokenizer(*(batch[column] for column in columns), truncation=True, max_length=max_length)

    return DatasetDict({
        split: dataset.map(tokenize, batched=True, fn_kwargs={"split": split},
                           remove_columns=[column for column in dataset.column_names if column != "label"])
        for split, dataset in data.items()
    })


def image_transform(image_processor: Any, image_column: str = "image") -> Callable[[dict[str, list]], dict[str, Any]]:
    """A ``Dataset.with_transform`` function giving ``pixel_values`` (RGB, processed on the fly) and ``label``.

    The Trainer must keep the image column for it: ``TrainingArguments(remove_unused_columns=False)``.
    """

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = [image.convert("RGB") for image in batch[image_column]]
        return {"pixel_values": image_processor(images=images, return_tensors="pt")["pixel_values"],
                "label": batch["label"]}

    return transform
