"""Scoring a causal LM by what it generates: greedy decoding of each prompt, exact match with its completion.

Loss and perplexity say how likely the reference is; an LLM user asks whether the model *answers* it. Each
prompt is rendered and tokenized as in training (``data.prompts_and_completions``), decoded greedily up to a few
tokens past the longest reference, cut at the end-of-text token, and compared with its completion, both stripped
of surrounding white space.
"""

from __future__ import annotations

from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import GenerationConfig

from ..data.causal_lm import prompts_and_completions

EXTRA_NEW_TOKENS = 4  # past the longest reference: room for a wrong answer to show it is wrong


@torch.no_grad()
def exact_match(model: nn.Module, tokenizer: Any, dataset: Dataset, split: str, batch_size: int = 16,
                max_new_tokens: int | None = None, bf16: bool = False) -> float:
    """The share of rows of ``dataset`` (prompt/completion or conversations) whose greedy answer is the
    completion exactly; answers are cut at ``max_new_tokens`` (default: a few past the longest completion).
    ``bf16`` decodes under bfloat16 autocast, as a run that trained in it evaluates (0.65x the time of float32
    on a CPU with bfloat16 instructions; docs/performance.md)."""
    prompts, completions, special_tokens = prompts_and_completions(dataset[:], tokenizer, split)
    prompt_ids = tokenizer(prompts, add_special_tokens=special_tokens)["input_ids"]
    if max_new_tokens is None:
        longest = max(len(ids) for ids in tokenizer(completions, add_special_tokens=False)["input_ids"])
        max_new_tokens = longest + EXTRA_NEW_TOKENS
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        hits = 0
        for start in range(0, len(prompt_ids), batch_size):
            batch = prompt_ids[start:start + batch_size]
            input_ids, attention_mask = _left_padded(batch, tokenizer.pad_token_id, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                generated = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                           generation_config=settings)
            answers = tokenizer.batch_decode(generated[:, input_ids.shape[1]:], skip_special_tokens=True)
            hits += sum(answer.strip() == reference.strip()
                        for answer, reference in zip(answers, completions[start:start + batch_size], strict=True))
    finally:
        model.train(was_training)
    return hits / len(prompt_ids)


def _left_padded(rows: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left, so that every row's answer starts at the same position."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)
