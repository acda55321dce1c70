"""Causal language modelling data: the user's texts, or prompt/completion pairs, as token ids and labels.

A file holds either a text column (``text``, or the one ``--text-column`` names: every token is
learnt), ``prompt`` and ``completion`` columns, or a ``messages`` column of conversations (``chat.py``;
the loss is then on the completion, or the last assistant turn, alone). Without files, the built-in
data is WordNet supersense as chat. Labels are the input ids with ``IGNORE_INDEX`` where nothing is
learnt (the prompt, and the padding the collator adds): the models' own loss skips them. Missing
validation and test files are carved from the training file, as for classification (``complete_splits``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from datasets import DatasetDict
from torch.nn.utils.rnn import pad_sequence

from .chat import MESSAGES, render_conversations, wordnet_chat_splits
from .errors import DataError
from .schema import check_columns, check_not_empty
from .sources import load_file
from .splits import complete_splits, subsample
from .tasks import CAUSAL_LM_TASK, TaskSpec

IGNORE_INDEX = -100  # the label the models' cross-entropy skips
TEXT, PROMPT, COMPLETION = "text", "prompt", "completion"


def causal_lm_task(train_file: str | None = None, validation_file: str | None = None, test_file: str | None = None,
                   text_column: str | None = None) -> TaskSpec:
    """Causal-LM data from files; ``text_column`` picks a text column even where prompt/completion columns exist.
    Without a ``train_file``: the built-in WordNet supersense conversations (offline)."""
    if train_file is None:
        return TaskSpec(name=CAUSAL_LM_TASK, modality=CAUSAL_LM_TASK, load=wordnet_chat_splits, metrics=())
    files = {split: (path, option) for split, path, option in (("train", train_file, "--train-file"),
                                                                ("validation", validation_file, "--validation-file"),
                                                                ("test", test_file, "--test-file")) if path}
    return TaskSpec(name=CAUSAL_LM_TASK, modality=CAUSAL_LM_TASK, load=partial(_load_files, files, text_column),
                    text_column=text_column, metrics=())


def load_causal_lm_task(spec: TaskSpec, max_train: int | None = None, max_validation: int | None = None,
                        max_test: int | None = None, seed: int = 0) -> DatasetDict:
    """Train/validation/test splits with a ``text`` column, ``prompt`` and ``completion`` columns, or a
    ``messages`` column (conversations), cut to the ``max_*`` sizes as ``subsample`` does."""
    data = complete_splits(spec.load())
    check_not_empty(data)
    return subsample(data, {"train": max_train, "validation": max_validation, "test": max_test}, seed)


def _load_files(files: dict[str, tuple[str, str]], text_column: str | None) -> DatasetDict:
    data = DatasetDict({split: load_file(path, option) for split, (path, option) in files.items()})
    columns = _columns(data["train"].column_names, text_column, files["train"][0])
    check_columns(data, columns, "every file needs the columns of the training file",
                  sources={split: path for split, (path, _) in files.items()})
    data = DatasetDict({split: dataset.select_columns(columns) for split, dataset in data.items()})
    if columns == [text_column] and text_column != TEXT:
        data = data.rename_column(text_column, TEXT)
    return data


def _columns(available: Sequence[str], text_column: str | None, source: str) -> list[str]:
    """The columns the model learns from: the chosen text column, else prompt and completion, else ``text``."""
    if text_column:
        if text_column not in available:
            raise DataError(f"the train split ({source}) has no column {text_column!r} (it has: "
                            f"{', '.join(available)}); check --text-column")
        return [text_column]
    if PROMPT in available and COMPLETION in available:
        return [PROMPT, COMPLETION]
    if MESSAGES in available:
        return [MESSAGES]
    if TEXT in available:
        return [TEXT]
    raise DataError(f"the train split ({source}) has no 'text' column, no 'prompt' and 'completion' columns and no "
                    f"'messages' column (it has: {', '.join(available)}); rename your columns or name the text one "
                    "with --text-column")


def is_paired(dataset: Any) -> bool:
    """Whether rows hold a prompt and its completion (or a conversation), which generation can be scored on."""
    return PROMPT in dataset.column_names or MESSAGES in dataset.column_names


def prompts_and_completions(batch: dict[str, list], tokenizer: Any, split: str) -> tuple[list[str], list[str], bool]:
    """The prompt and completion texts of a batch of paired rows, and whether a prompt still needs the tokenizer's
    special tokens (a plain prompt does; a chat prompt already holds what its template puts there)."""
    if MESSAGES in batch:
        return (*render_conversations(batch[MESSAGES], tokenizer, split), False)
    return batch[PROMPT], batch[COMPLETION], True


def tokenize_causal_lm(data: DatasetDict, tokenizer: Any, max_length: int) -> DatasetDict:
    """``input_ids`` and ``labels`` of each row, truncated to ``max_length`` tokens, the tokenizer's end-of-text
    token appended (so that the model learns where a text or a completion ends).

    A prompt is tokenized with the tokenizer's special tokens (a LLaMA tokenizer's ``<s>``; a conversation's, by
    its chat template), its completion without, and the prompt's labels are ``IGNORE_INDEX``: the loss is on the
    completion only. A row left with nothing to learn (a prompt that fills ``max_length``) is an error, not a
    silent skip.
    """
    paired = is_paired(data["train"])
    columns = [column for column in (PROMPT, COMPLETION, TEXT) if column in data["train"].column_names]
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list], split: str) -> dict[str, list]:
        for column in columns:
            if any(not isinstance(text, str) or not text for text in batch[column]):
                raise DataError(f"the {split} split has rows with an empty or non-text {column!r} column; fill in "
                                "or drop them")
        if paired:
            prompt_texts, completion_texts, special_tokens = prompts_and_completions(batch, tokenizer, split)
            prompts = tokenizer(prompt_texts, add_special_tokens=special_tokens)["input_ids"]
            completions = tokenizer(completion_texts, add_special_tokens=False)["input_ids"]
        else:
            prompts = [[] for _ in batch[TEXT]]
            completions = tokenizer(batch[TEXT])["input_ids"]
        rows: dict[str, list] = {"input_ids": [], "labels": []}
        for prompt, completion in zip(prompts, completions, strict=True):
            if eos is not None and completion[-1:] != [eos]:
                completion = [*completion, eos]
            rows["input_ids"].append([*prompt, *completion][:max_length])
            rows["labels"].append(([IGNORE_INDEX] * len(prompt) + completion)[:max_length])
        empty = sum(all(label == IGNORE_INDEX for label in labels[1:]) for labels in rows["labels"])
        if empty:
            raise DataError(f"{empty} row(s) of the {split} split have no token to learn within --max-length "
                            f"{max_length} (their prompt fills it); raise --max-length or shorten those prompts")
        return rows

    return DatasetDict({split: dataset.map(tokenize, batched=True, fn_kwargs={"split": split},
                                           remove_columns=dataset.column_names)
                        for split, dataset in data.items()})


@dataclass(frozen=True)
class CausalLmCollator:
    """Pads a batch on the right, whatever the tokenizer's padding side (a GPT-2's absolute positions must see
    their tokens from 0): ``pad_token_id`` in the inputs, 0 in the attention mask, ``IGNORE_INDEX`` in the labels."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [torch.tensor(feature["input_ids"], dtype=torch.long) for feature in features]
        labels = [torch.tensor(feature["labels"], dtype=torch.long) for feature in features]
        return {"input_ids": pad_sequence(ids, batch_first=True, padding_value=self.pad_token_id),
                "attention_mask": pad_sequence([torch.ones_like(row) for row in ids], batch_first=True),
                "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)}
