"""Chat data for a causal LM: conversations in a ``messages`` column, and the built-in WordNet chat task.

A row's ``messages`` is a list of ``{"role": ..., "content": ...}`` turns (the format of chat datasets on the hub
and of TRL); its last turn is the assistant's answer, the one the model learns and is scored on. The turns before
it are rendered with the tokenizer's own chat template, ending with the assistant's header
(``add_generation_prompt``), so that training, evaluation and generation see exactly what the model sees when it
is served; the answer follows it, then the tokenizer's end-of-text token.
"""

from __future__ import annotations

from typing import Any

from datasets import DatasetDict

from .errors import DataError
from .wordnet import SUPERSENSES, wordnet_splits

MESSAGES = "messages"
ASSISTANT = "assistant"

#: The built-in chat task's question: the answer is one supersense, a short string that exact match scores.
WORDNET_QUESTION = (
    "Give the WordNet supersense (lexicographer file) of this word sense, such as noun.animal or verb.motion. "
    "Answer with the supersense alone.\nWord: {word}\nDefinition: {definition}"
)


def wordnet_chat_splits(path: str | None = None) -> DatasetDict:
    """WordNet supersense as chat: the user gives a word and its definition, the assistant names the supersense.

    The same synsets and splits as the classification task (``wordnet_splits``), as conversations.
    """
    splits = wordnet_splits(path)

    def conversation(row: dict[str, Any]) -> dict[str, Any]:
        word, _, definition = row["text"].partition(": ")
        question = WORDNET_QUESTION.format(word=word, definition=definition)
        return {MESSAGES: [{"role": "user", "content": question},
                           {"role": ASSISTANT, "content": SUPERSENSES[row["label"]]}]}

    return DatasetDict({split: dataset.map(conversation, remove_columns=dataset.column_names)
                        for split, dataset in splits.items()})


def render_conversations(messages: list[list[dict[str, str]]], tokenizer: Any, split: str,
                         ) -> tuple[list[str], list[str]]:
    """Each conversation as (prompt, answer): the turns before the last, rendered by the chat template up to the
    assistant's header, and the last turn's text."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the data has a {MESSAGES!r} column but the model's tokenizer has no chat template; use a "
                        "chat (instruct) model, or give prompt and completion columns instead")
    prompts, answers = [], []
    for turns in messages:
        if (not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(turn, dict) for turn in turns)
                or turns[-1].get("role") != ASSISTANT or not isinstance(turns[-1].get("content"), str)
                or not turns[-1]["content"]):
            raise DataError(f"the {split} split has a {MESSAGES!r} row that is not a conversation ending with a "
                            f"non-empty assistant turn (a list of {{'role', 'content'}} turns): {turns!r:.120}")
        prompts.append(tokenizer.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True))
        answers.append(turns[-1]["content"])
    return prompts, answers
