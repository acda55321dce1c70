"""Training-step time and memory of TensLoRA vs PEFT LoRA at the same parameter budget.

Every variant runs in its own fresh process (so peak memory is its own), and the variants are
interleaved over several rounds (so a noisy machine slows them alike); the table reports the
median step time and the peak resident memory above the model's own, each as a ratio to LoRA.

    python benchmarks/speed.py                      # BERT-base and ViT-B/16 sized, random weights
    python benchmarks/speed.py --models bert-base --rounds 1 --steps 2   # quicker look

Memory is the process's peak RSS during the training steps minus its RSS before them (Linux:
/proc/self/status, peak reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tenslora import TENSOR_CONSTRUCTIONS

TRAINING_VARIANTS = ("floor", "lora", *TENSOR_CONSTRUCTIONS, "lorta")
INFERENCE_VARIANTS = ("infer_base", "infer_merged")


def build_model(name: str):
    import transformers

    if name == "bert-base":
        config = transformers.BertConfig(num_labels=10)  # defaults are BERT-base: 768 hidden, 12 layers, 12 heads
        return transformers.BertForSequenceClassification(config), config
    config = transformers.ViTConfig(num_labels=10)  # defaults are ViT-B/16 at 224 px
    return transformers.ViTForImageClassification(config), config


def make_batch(name: str, batch_size: int, seq_len: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (batch_size,), generator=generator)
    if name == "bert-base":
        return {"input_ids": torch.randint(1000, 30000, (batch_size, seq_len), generator=generator), "labels": labels}
    return {"pixel_values": torch.randn(batch_size, 3, 224, 224, generator=generator), "labels": labels}


def attach(model, config, variant: str):
    """Make ``model`` trainable the way ``variant`` says; return (model, trainable adapter parameter count)."""
    import torch
    from peft import LoraConfig, get_peft_model

    import tenslora

    head = ["classifier"]
    if variant == "floor":
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith("classifier")
        return model, 0
    if variant == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["query", "key", "value",
                                                                                      "q_proj", "k_proj", "v_proj"],
                                                 modules_to_save=head))
    else:
        construction, factorization = ("lorta", "cp") if variant == "lorta" else (variant, "tucker")
        budget = tenslora.lora_parameter_count(8, config)
        spec = tenslora.TensLoraConfig(construction=construction)
        ranks = tenslora.match_budget(spec.construction, spec.factorization, budget, config)
        model = get_peft_model(model, tenslora.TensLoraConfig(construction=construction, ranks=ranks,
                                                              modules_to_save=head))
    adapter = sum(p.numel() for n, p in model.named_parameters()
                  if p.requires_grad and "classifier" not in n)
    del torch
    return model, adapter


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, config = build_model(args.model)
    batch = make_batch(args.model, args.batch_size, args.seq_len)
    if args.variant in INFERENCE_VARIANTS:
        if args.variant == "infer_merged":
            from peft import get_peft_model

            import tenslora

            model = get_peft_model(model, tenslora.TensLoraConfig(construction="qkv_depth", ranks=8,
                                                                  init_weights=False)).merge_and_unload()
        model.eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        times = []
        with torch.no_grad():
            for _ in range(args.steps + 1):
                start = time.perf_counter()
                model(**inputs)
                times.append(time.perf_counter() - start)
        return {"step_s": statistics.median(times[1:]), "extra_mib": 0.0, "adapter_params": 0}

    model, adapter_params = attach(model, config, args.variant)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark
    before = _status_kib("VmRSS")
    times = []
    for _ in range(args.steps + 1):  # the first step warms up and is not timed
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[1:]), "extra_mib": (_status_kib("VmHWM") - before) / 1024,
            "adapter_params": adapter_params}


def run_variant(args: argparse.Namespace, model: str, variant: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--model", model, "--variant", variant,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def report(model: str, results: dict[str, list[dict]]) -> str:
    median = {v: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for v, runs in results.items()}
    lora, floor = median["lora"], median["floor"]
    lora_extra = lora["extra_mib"] - floor["extra_mib"]
    lines = [f"\n### {model}\n",
             "| variant | adapter params | step (s) | step / LoRA | memory over floor (MiB) | memory / LoRA |",
             "|---|---:|---:|---:|---:|---:|"]
    for variant in TRAINING_VARIANTS:
        row = median[variant]
        extra = row["extra_mib"] - floor["extra_mib"]
        memory_ratio = "-" if variant == "floor" else f"{extra / lora_extra:.2f}"
        lines.append(f"| {variant} | {row['adapter_params']:,.0f} | {row['step_s']:.2f} | "
                     f"{row['step_s'] / lora['step_s']:.2f} | {extra:.0f} | {memory_ratio} |")
    base, merged = median["infer_base"]["step_s"], median["infer_merged"]["step_s"]
    lines.append(f"\nMerged inference (qkv_depth adapter merged) vs base: {merged:.3f} s vs {base:.3f} s per batch "
                 f"= {merged / base:.3f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bert-base", "vit-b16"], choices=["bert-base", "vit-b16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128, help="text models only; ViT uses 197 tokens")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(f"# batch {args.batch_size}, seq len {args.seq_len}, {args.steps} timed steps x {args.rounds} rounds, "
          f"{args.threads} thread(s)")
    for model in args.models:
        results: dict[str, list[dict]] = {v: [] for v in (*TRAINING_VARIANTS, *INFERENCE_VARIANTS)}
        for round_ in range(args.rounds):
            for variant in results:
                results[variant].append(run_variant(args, model, variant))
                print(f"  [{model} round {round_ + 1}] {variant}: {results[variant][-1]}", file=sys.stderr, flush=True)
        print(report(model, results), flush=True)


if __name__ == "__main__":
    main()
