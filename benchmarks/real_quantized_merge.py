"""Merging a trained adapter into a 4-bit base, on real weights: how much of the fine-tune each merge keeps.

A trained causal-LM run (the default: SmolLM2-135M-Instruct on WordNet chat) is put on its base loaded in
bitsandbytes nf4 and merged twice: the default (a dense fp32 layer holding dequantized W + delta W) and inside
``tenslora.requantizing_merge()`` (W + delta W rounded to nf4 again). Printed: the requantizing merge's report
(||Q(W+dW) - Q(W) - dW|| / ||dW|| and the cosine of what was kept with dW, over every adapted layer), and for each
merge ||merged logits - adapted logits|| / ||adapted logits - base logits|| on WordNet chat prompts (0: the merge
computes what the adapted model computes; 1: it is as far from it as the base is).

    tenslora train --task causal-lm --output-dir runs/llm
    python benchmarks/real_quantized_merge.py runs/llm

The model runs in train mode (no dropout here): in eval, bitsandbytes' CPU kernel repacks 4-bit weights and
computes in bf16, which would add its own rounding to both sides.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from peft import PeftModel

import tenslora
from tenslora.app.modeling import build_causal_lm, from_pretrained
from tenslora.app.runs import read_run
from tenslora.data.chat import render_conversations, wordnet_chat_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    run = read_run(args.run_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, run["model"])
    with tempfile.TemporaryDirectory() as folder:  # a GGUF base is saved dense first: bitsandbytes loads folders
        from_pretrained(AutoModelForCausalLM, run["model"], dtype=torch.float32).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model = PeftModel.from_pretrained(build_causal_lm(folder, "4bit", device="cpu"), args.run_dir)
    model.train()
    conversations = wordnet_chat_splits()["test"].select(range(args.prompts))["messages"]
    prompts, _ = render_conversations(conversations, tokenizer, "test")
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        adapted = model(**batch).logits
        with model.disable_adapter():
            effect = (adapted - model(**batch).logits).norm()
        requantizing = copy.deepcopy(model)
        with tenslora.requantizing_merge() as report:
            requantized = requantizing.merge_and_unload()
        dense = model.merge_and_unload()
        errors = {name: ((merged(**batch).logits - adapted).norm() / effect).item()
                  for name, merged in (("requantizing", requantized), ("dense (default)", dense))}
    print(f"requantizing_merge report: relative error {report.relative_error:.3f}, cosine {report.cosine:.3f} "
          f"({report.layers} layers)")
    for name, error in errors.items():
        print(f"{name} merge: ||merged - adapted|| / ||adapted - base|| = {error:.3f}")


if __name__ == "__main__":
    main()
