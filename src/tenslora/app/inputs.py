"""From a run's options to the encoded splits a Trainer reads, through the data layer (``tenslora.data``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from datasets import DatasetDict
from transformers import EvalPrediction

from .. import data
from .options import TrainOptions


@dataclass(frozen=True)
class TaskData:
    """The splits of a task (raw or encoded), its class names and how it is scored."""

    spec: data.TaskSpec
    splits: DatasetDict
    labels: list[str]
    texts: DatasetDict | None = None  # a causal LM's splits before tokenization, for scoring what it generates

    @property
    def modality(self) -> str:
        return self.spec.modality

    def compute_metrics(self, prediction: EvalPrediction) -> dict[str, float]:
        """The Trainer's ``compute_metrics`` of a classification: the task's scores (accuracy; MCC for CoLA; F1 for
        MRPC). A causal LM is scored by its loss alone (and perplexity, ``exp(loss)``)."""
        return data.compute_metrics(self.spec, prediction.predictions, prediction.label_ids)


def task_spec(options: TrainOptions) -> data.TaskSpec:
    """The task the options name: a built-in one (maybe read from local files), or the user's files."""
    if options.task == data.CAUSAL_LM_TASK:
        return data.causal_lm_task(options.train_file, options.validation_file, options.test_file,
                                   text_column=options.text_column)
    if options.task:
        return data.get_task(options.task, options.data_dir or options.image_root)
    if options.train_file:
        return data.custom_text_task(options.train_file, options.validation_file, options.test_file,
                                     text_column=options.text_column or "text",
                                     text_pair_column=options.text_pair_column,
                                     label_column=options.label_column or "label")
    return data.custom_image_task(options.image_root)


def load(options: TrainOptions) -> TaskData:
    """Checked train/validation/test splits, cut to the options' sizes: with a ``ClassLabel`` label for a
    classification, with the text (or prompt and completion) of a causal LM, which has no classes."""
    spec = task_spec(options)
    sizes = dict(max_train=options.max_train_samples, max_validation=options.max_eval_samples,
                 max_test=options.max_eval_samples, seed=options.seed)
    if spec.modality == data.CAUSAL_LM_TASK:
        return TaskData(spec, data.load_causal_lm_task(spec, **sizes), [])
    splits = data.load_task(spec, **sizes)
    return TaskData(spec, splits, list(splits["train"].features["label"].names))


def encode(task: TaskData, preprocessor: Any, options: TrainOptions) -> TaskData:
    """Token ids (padded per batch by the collator; with labels for a causal LM), or pixel values computed on
    the fly for images."""
    if task.modality == "text":
        splits = data.tokenize_text_task(task.splits, preprocessor, task.spec, options.max_length)
    elif task.modality == data.CAUSAL_LM_TASK:
        return replace(task, splits=data.tokenize_causal_lm(task.splits, preprocessor, options.max_length),
                       texts=task.splits)
    else:
        splits = task.splits.with_transform(data.image_transform(preprocessor, task.spec.image_column))
    return replace(task, splits=splits)
