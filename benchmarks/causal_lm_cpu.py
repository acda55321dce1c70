"""A causal-LM run on a CPU: what torch threads and bfloat16 autocast do to its two costs, training and decoding.

The default LLM run (SmolLM2-135M-Instruct, ``qkv_depth`` rank 8 on every linear layer, WordNet chat) is
built as ``tenslora train --task causal-lm`` builds it. Timed on 1 and on 2 threads: a training step (batch 8
of its training conversations, forward and backward under bfloat16 autocast, as the run trains) and greedy
decoding of its test prompts by ``exact_match`` in float32 and under bfloat16 autocast. Each time is printed with
its ratio to the same work on one thread (float32 for decoding), all within one run.

    python benchmarks/causal_lm_cpu.py

Time it on an otherwise idle machine: a sweep running beside it shares the cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tenslora.app.generation import exact_match
from tenslora.app.options import options_from_mapping
from tenslora.app.train import prepare
from tenslora.data import CausalLmCollator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per setting (median)")
    parser.add_argument("--prompts", type=int, default=48, help="test prompts decoded per setting")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts decoded at a time")
    args = parser.parse_args()
    prepared = prepare(options_from_mapping({"task": "causal-lm"}))
    model, tokenizer = prepared.model, prepared.preprocessor
    train = prepared.data.splits["train"]
    batch = CausalLmCollator(tokenizer.pad_token_id)([train[index] for index in range(8)])
    prompts = prepared.data.texts["test"].select(range(args.prompts))

    def step_seconds() -> float:
        times = []
        for _ in range(args.steps + 1):  # the first step warms up
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(**batch).loss.backward()
            model.zero_grad()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    def decoding_seconds(bf16: bool) -> float:
        start = time.perf_counter()
        exact_match(model, tokenizer, prompts, "test", args.batch_size, bf16=bf16)
        return time.perf_counter() - start

    timings = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        timings[threads, "training step, bf16 autocast"] = step_seconds()
        for bf16 in (False, True):
            timings[threads, f"decoding {args.prompts} prompts, {'bf16 autocast' if bf16 else 'float32'}"] = (
                decoding_seconds(bf16))
    for (threads, work), seconds in timings.items():
        reference = timings[1, work.replace("bf16 autocast", "float32") if "decoding" in work else work]
        print(f"{work:40s} threads {threads}: {seconds:6.2f} s ({seconds / reference:.2f}x)")


if __name__ == "__main__":
    main()
