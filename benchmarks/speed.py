"""Training-step time and memory of TensLoRA vs PEFT LoRA at the same parameter budget.

Every variant runs in its own fresh process (so peak memory is its own), and the variants are
interleaved over several rounds (so a noisy machine slows them alike); the tables report the
median step time and the peak resident memory above the floor's, each as a ratio to PEFT LoRA r=8
trained the same way (eager, compiled or on a 4-bit base), within one run.

Models (random weights, built from configs, nothing downloaded):

- ``bert-base`` (768 hidden, 12 layers, 128 tokens) and ``vit-b16`` (224 px, 197 tokens): adapters
  on q, k, v; LoRA r=8 there has 442,368 parameters.
- ``llama``: LLaMA-shaped, hidden 1024, 8 layers, 16 query / 4 key-value heads (head size 64),
  gated MLP of width 2816, 256 tokens, a 10-class sequence-classification head (a clean loss whose
  head costs nothing next to the blocks, where a 32k-word LM head would dilute the adapters' cost).
  Adapters on every block linear: ``roles="all-linear"``, PEFT LoRA ``target_modules="all-linear"``
  (1,163,264 parameters at r=8). ``--llama-hidden`` (a multiple of 256; heads of 64, d_ffn 2.75x)
  and ``--llama-layers`` resize it for a quicker look.

Variants (``--variants`` takes names and groups; a training variant X also runs as X+compile or X+4bit):

- group ``eager`` (the default): ``floor`` (frozen base, only the head trained), ``lora`` (PEFT),
  every tensor construction with Tucker ranks matched to LoRA's budget by ``tenslora.match_budget``,
  ``lorta`` (att_qkv_depth with CP at the same budget), and ``infer_base`` / ``infer_merged``
  (inference with a merged ``qkv_depth`` adapter against the plain base).
- group ``capped``: floor, lora, and ``qkv_depth`` / ``att_qkv_depth`` at LoRA's budget as ``match_budget``
  chooses, and ``..._capped``: the cost-aware choice, ``max_input_rank=8`` (LoRA's cost per token, the rest of
  the budget in the core). ``smollm2`` is SmolLM2-135M's shape (random weights, 128 tokens):
  ``python benchmarks/speed.py --models smollm2 --variants capped --batch-size 4``.
- group ``compile``: floor, lora, qkv_depth, att_qkv_depth under ``torch.compile(model)`` (inductor;
  each variant its own compiler cache for the run: cold in round 1, warm after). One extra untimed
  step compiles, before the memory window; "cold compile (s)" is round 1's compiling step minus its
  median step. Memory the compiler freed may be reused by the steps, so their memory reads low.
- group ``4bit``: floor, lora, qkv_depth on the same base loaded in bitsandbytes nf4 (saved to a
  temporary folder and loaded with ``BitsAndBytesConfig``), after ``peft.prepare_model_for_kbit_training``
  (gradient checkpointing, as QLoRA recipes do).

    python benchmarks/speed.py                      # BERT-base and ViT-B/16 sized, eager
    python benchmarks/speed.py --models llama --threads 2 --batch-size 4       # all-linear table
    python benchmarks/speed.py --models llama --variants compile 4bit --quick
    python benchmarks/speed.py --models bert-base --batch-size 4 --seq-len 128 --threads 2 \\
        --variants floor lora qkv_depth att_qkv_depth --profile

``--quick`` is one round of 2 timed steps (after one warm-up), instead of 2 rounds of 3: one process
and 3 training steps per variant, e.g. 12 processes (36 steps) for one model's eager group, 4 (12
steps, plus 4 compilations) for ``compile``, 3 (9 steps, each process also quantizing) for ``4bit``.

``--profile`` adds, per training variant, ``--steps`` more steps under torch.profiler after the timed
ones (so profiling does not slow the timed steps), and a table of aten operator calls (nested calls
count: each is a dispatch) and operator self time per step, with the operators whose time differs
most from LoRA's.

Memory is the process's peak RSS during the training steps minus its RSS before them (Linux:
/proc/self/status, peak reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenslora import TENSOR_CONSTRUCTIONS

if TYPE_CHECKING:  # torch is imported in the measuring processes only
    import torch
    from torch import nn

CAPPED = "_capped"  # suffix of a construction at the same budget, its input rank capped at LoRA's (cost-aware)
EAGER_VARIANTS = ("floor", "lora", *TENSOR_CONSTRUCTIONS, "lorta")
TRAINING_VARIANTS = (*EAGER_VARIANTS, *(f"{construction}{CAPPED}" for construction in TENSOR_CONSTRUCTIONS))
INFERENCE_VARIANTS = ("infer_base", "infer_merged")
MODES = ("eager", "compile", "4bit")
GROUPS = {
    "eager": (*EAGER_VARIANTS, *INFERENCE_VARIANTS),
    "capped": ("floor", "lora", "qkv_depth", "qkv_depth_capped", "att_qkv_depth", "att_qkv_depth_capped"),
    "compile": tuple(f"{v}+compile" for v in ("floor", "lora", "qkv_depth", "att_qkv_depth")),
    "4bit": tuple(f"{v}+4bit" for v in ("floor", "lora", "qkv_depth")),
}
LABELS = 10


@dataclass(frozen=True)
class ModelSpec:
    """What a benchmark model adapts and how its batches look."""

    head: str  # the classification head, trained by every variant (PEFT's modules_to_save)
    roles: tuple[str, ...] | str  # TensLoRA roles; LoRA targets the same projections
    lora_targets: list[str] | str
    task_type: str | None  # PEFT task type (SEQ_CLS keeps PEFT's all-linear off the head)
    seq_len: int | None  # default tokens per example; None: images


MODELS = {
    "bert-base": ModelSpec("classifier", ("q", "k", "v"), ["query", "key", "value"], None, 128),
    "vit-b16": ModelSpec("classifier", ("q", "k", "v"), ["q_proj", "k_proj", "v_proj"], None, None),
    "llama": ModelSpec("score", "all-linear", "all-linear", "SEQ_CLS", 256),
    "smollm2": ModelSpec("score", "all-linear", "all-linear", "SEQ_CLS", 128),
}


def split_variant(variant: str) -> tuple[str, str]:
    """``"qkv_depth+compile"`` -> ``("qkv_depth", "compile")``; a plain name is eager."""
    adapter, _, mode = variant.partition("+")
    return adapter, mode or "eager"


def expand_variants(names: list[str]) -> list[str]:
    """Groups expanded, duplicates dropped, order kept; unknown names are a ValueError listing the choices."""
    variants: list[str] = []
    for name in names:
        for variant in GROUPS.get(name, (name,)):
            adapter, mode = split_variant(variant)
            inference = mode == "eager" and adapter in INFERENCE_VARIANTS
            if not (inference or (adapter in TRAINING_VARIANTS and mode in MODES)):
                raise ValueError(f"Unknown variant '{variant}'. Choose groups {list(GROUPS)}, variants "
                                 f"{list(GROUPS['eager'])}, or a training variant with +compile or +4bit "
                                 f"(e.g. qkv_depth+4bit).")
            if variant not in variants:
                variants.append(variant)
    return variants


def build_model(name: str, args: argparse.Namespace) -> tuple[nn.Module, Any]:
    import transformers

    if name == "bert-base":
        config = transformers.BertConfig(num_labels=LABELS)  # defaults are BERT-base: 768 hidden, 12 layers, 12 heads
        return transformers.BertForSequenceClassification(config), config
    if name == "vit-b16":
        config = transformers.ViTConfig(num_labels=LABELS)  # defaults are ViT-B/16 at 224 px
        return transformers.ViTForImageClassification(config), config
    if name == "smollm2":  # SmolLM2-135M's shape: 30 layers, hidden 576, 9 heads over 3 key/value heads, MLP 1536
        config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, num_hidden_layers=30,
                                          num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                                          pad_token_id=0, num_labels=LABELS)
        return transformers.LlamaForSequenceClassification(config), config
    hidden = args.llama_hidden
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, num_hidden_layers=args.llama_layers,
                                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                                      intermediate_size=hidden * 11 // 4, pad_token_id=0, num_labels=LABELS)
    return transformers.LlamaForSequenceClassification(config), config


def quantized_4bit(model: nn.Module) -> nn.Module:
    """``model`` saved and loaded again with its block linears in bitsandbytes nf4, prepared for k-bit training."""
    import transformers
    from peft import prepare_model_for_kbit_training

    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        model = type(model).from_pretrained(folder, quantization_config=quantization, device_map="cpu")
    return prepare_model_for_kbit_training(model)


def make_batch(name: str, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    import torch

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, LABELS, (batch_size,), generator=generator)
    if name == "vit-b16":
        return {"pixel_values": torch.randn(batch_size, 3, 224, 224, generator=generator), "labels": labels}
    return {"input_ids": torch.randint(1000, 30000, (batch_size, seq_len), generator=generator), "labels": labels}


def attach(model: nn.Module, config: Any, spec: ModelSpec, adapter: str) -> tuple[nn.Module, int]:
    """Make ``model`` trainable the way ``adapter`` says; return (model, trainable adapter parameter count)."""
    from peft import LoraConfig, get_peft_model

    import tenslora

    if adapter == "floor":
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith(spec.head)
        return model, 0
    if adapter == "lora":
        peft_config = LoraConfig(r=8, lora_alpha=8, target_modules=spec.lora_targets, modules_to_save=[spec.head],
                                 task_type=spec.task_type)
    else:
        budget = tenslora.lora_parameter_count(8, config, roles=spec.roles)
        construction = adapter.removesuffix(CAPPED)
        resolved = tenslora.TensLoraConfig(construction=construction, roles=spec.roles)  # "lorta" -> att_qkv_depth, CP
        ranks = tenslora.match_budget(resolved.construction, resolved.factorization, budget, config, roles=spec.roles,
                                      max_input_rank=8 if adapter.endswith(CAPPED) else None)
        peft_config = tenslora.TensLoraConfig(construction=construction, ranks=ranks, roles=spec.roles,
                                              modules_to_save=[spec.head], task_type=spec.task_type)
    model = get_peft_model(model, peft_config)
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and spec.head not in n)
    return model, trainable


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def infer(model: nn.Module, batch: dict, steps: int) -> dict:
    """Median time of a no-grad forward pass (after one warm-up)."""
    import torch

    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    times = []
    with torch.no_grad():
        for _ in range(steps + 1):
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[1:]), "extra_mib": 0.0, "adapter_params": 0}


def profile(step: Callable[[], None], steps: int) -> dict:
    """aten operator calls and self time per step, in total and per operator."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    ops = {e.key: [e.count / steps, e.self_cpu_time_total / 1000 / steps]
           for e in profiler.key_averages() if e.key.startswith("aten::")}
    return {"wall_s": wall, "calls": sum(c for c, _ in ops.values()), "op_ms": sum(ms for _, ms in ops.values()),
            "ops": ops}


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = MODELS[args.model]
    adapter, mode = split_variant(args.variant)
    model, config = build_model(args.model, args)
    batch = make_batch(args.model, args.batch_size, args.seq_len or spec.seq_len)
    if adapter in INFERENCE_VARIANTS:
        if adapter == "infer_merged":
            from peft import get_peft_model

            import tenslora

            model = get_peft_model(model, tenslora.TensLoraConfig(construction="qkv_depth", ranks=8, roles=spec.roles,
                                                                  init_weights=False)).merge_and_unload()
        return infer(model, batch, args.steps)

    if mode == "4bit":
        model = quantized_4bit(model)
    model, adapter_params = attach(model, config, spec, adapter)
    model.train()
    forward = torch.compile(model, backend=args.compile_backend) if mode == "compile" else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        forward(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    compile_s = None
    if mode == "compile":  # compile outside the memory window; no optimizer step, so the steps below start alike
        start = time.perf_counter()
        forward(**batch).loss.backward()
        compile_s = time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS watermark
    before = _status_kib("VmRSS")
    times = []
    for _ in range(args.steps + 1):  # the first step warms up and is not timed
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"step_s": statistics.median(times[1:]), "extra_mib": (_status_kib("VmHWM") - before) / 1024,
              "adapter_params": adapter_params}
    if compile_s is not None:
        result["compile_s"] = compile_s - result["step_s"]
    if args.profile:
        result["profile"] = profile(step, args.steps)
    return result


WORKER_OPTIONS = ("batch_size", "seq_len", "steps", "threads", "llama_hidden", "llama_layers", "compile_backend")


def worker_command(args: argparse.Namespace, model: str, variant: str) -> list[str]:
    command = [sys.executable, __file__, "--worker", "--model", model, "--variant", variant]
    for option in WORKER_OPTIONS:
        if getattr(args, option) is not None:
            command += ["--" + option.replace("_", "-"), str(getattr(args, option))]
    return command + (["--profile"] if args.profile else [])


def run_variant(args: argparse.Namespace, model: str, variant: str, cache: Path) -> dict:
    """One worker process; its compiler cache is ``cache`` (this variant's own: cold in round 1, warm after)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    done = subprocess.run(worker_command(args, model, variant), capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"The {model} {variant} worker failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _medians(results: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Medians over rounds; the compile time is round 1's, the only one compiled with a cold cache."""
    median = {v: {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "profile"}
              for v, runs in results.items()}
    for variant, runs in results.items():
        if "compile_s" in runs[0]:
            median[variant]["compile_s"] = runs[0]["compile_s"]
    return median


def report(model: str, results: dict[str, list[dict]]) -> str:
    """One table per mode; ratios to that mode's LoRA, memory over that mode's floor (where they ran)."""
    median = _medians(results)
    sections = []
    for mode in MODES:
        rows = {split_variant(v)[0]: median[v] for v in median
                if split_variant(v)[1] == mode and split_variant(v)[0] not in INFERENCE_VARIANTS}
        if not rows:
            continue
        floor = rows["floor"]["extra_mib"] if "floor" in rows else 0.0
        lora = rows.get("lora")
        compiled = mode == "compile"
        lines = [f"\n### {model}, {mode}\n",
                 f"| variant | adapter params | step (s) | step / LoRA | memory{' over floor' * ('floor' in rows)} "
                 f"(MiB) | memory / LoRA |{' cold compile (s) |' * compiled}",
                 "|---|---:|---:|---:|---:|---:|" + "---:|" * compiled]
        for adapter, row in rows.items():
            extra = row["extra_mib"] - floor
            step_ratio = f"{row['step_s'] / lora['step_s']:.2f}" if lora else "-"
            lora_extra = lora["extra_mib"] - floor if lora else 0.0
            memory_ratio = "-" if adapter == "floor" or lora_extra <= 0 else f"{extra / lora_extra:.2f}"
            lines.append(f"| {adapter} | {row['adapter_params']:,.0f} | {row['step_s']:.2f} | {step_ratio} | "
                         f"{extra:.0f} | {memory_ratio} |" + (f" {row['compile_s']:.1f} |" if compiled else ""))
        sections.append("\n".join(lines))
    if "infer_base" in median and "infer_merged" in median:
        base, merged = median["infer_base"]["step_s"], median["infer_merged"]["step_s"]
        sections.append(f"\nMerged inference (qkv_depth adapter merged) vs base: {merged:.3f} s vs {base:.3f} s per "
                        f"batch = {merged / base:.3f}x")
    return "\n".join(sections)


def profile_report(model: str, results: dict[str, list[dict]], top: int = 8) -> str:
    """Per step, medians over rounds: aten calls and operator time, and the operators furthest from LoRA's."""
    profiles = {v: [r["profile"] for r in runs] for v, runs in results.items() if "profile" in runs[0]}
    ops = {v: {op: [statistics.median(p["ops"].get(op, [0.0, 0.0])[i] for p in runs) for i in (0, 1)]
               for op in set().union(*(p["ops"] for p in runs))} for v, runs in profiles.items()}
    lines = [f"\n### {model}, torch.profiler, per training step\n",
             "| variant | aten calls | operator time (ms) | step under the profiler (s) |", "|---|---:|---:|---:|"]
    for variant, runs in profiles.items():
        lines.append(f"| {variant} | {statistics.median(p['calls'] for p in runs):,.0f} | "
                     f"{statistics.median(p['op_ms'] for p in runs):,.0f} | "
                     f"{statistics.median(p['wall_s'] for p in runs):.2f} |")
    for variant in ops:
        adapter, mode = split_variant(variant)
        reference = "lora" if mode == "eager" else f"lora+{mode}"
        if adapter in ("floor", "lora") or reference not in ops:
            continue
        zero = [0.0, 0.0]
        difference = {op: [a - b for a, b in zip(ops[variant].get(op, zero), ops[reference].get(op, zero),
                                                 strict=True)]
                      for op in set(ops[variant]) | set(ops[reference])}
        largest = sorted(difference.items(), key=lambda item: -abs(item[1][1]))[:top]
        lines.append(f"\n{variant} minus {reference}: " + ", ".join(f"{op} {calls:+,.0f} calls {ms:+,.1f} ms"
                                                                   for op, (calls, ms) in largest))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["bert-base", "vit-b16"], choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=["eager"],
                        help=f"groups {list(GROUPS)} and/or variant names (see above)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, help="text models only (default: BERT 128, LLaMA 256); ViT uses 197")
    parser.add_argument("--steps", type=int, help="timed steps per process, after one warm-up (default 3)")
    parser.add_argument("--rounds", type=int, help="interleaved repetitions of every variant (default 2)")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 timed steps unless given")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--llama-hidden", type=int, default=1024, help="a multiple of 256 (heads of 64, 4 per KV)")
    parser.add_argument("--llama-layers", type=int, default=8)
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the +compile variants (aot_eager: tracing without codegen)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler operator counts and time per step")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.llama_hidden % 256 or args.llama_hidden <= 0 or args.llama_layers <= 0:
        parser.error(f"--llama-hidden must be a positive multiple of 256 (heads of 64, 4 query heads per key-value "
                     f"head) and --llama-layers positive; got {args.llama_hidden} and {args.llama_layers}.")
    args.steps = args.steps or (2 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 2)
    try:
        args.variants = expand_variants(args.variants)
    except ValueError as error:
        parser.error(str(error))
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    print(f"# batch {args.batch_size}, {args.steps} timed steps x {args.rounds} rounds, {args.threads} thread(s)")
    for model in args.models:
        seq_len = args.seq_len or MODELS[model].seq_len or 197
        shape = f", hidden {args.llama_hidden}, {args.llama_layers} layers" if model == "llama" else ""
        print(f"# {model}: {seq_len} tokens{shape}", flush=True)
        results: dict[str, list[dict]] = {v: [] for v in args.variants}
        with tempfile.TemporaryDirectory() as caches:
            for round_ in range(args.rounds):
                for variant in results:
                    results[variant].append(run_variant(args, model, variant, Path(caches) / variant))
                    summary = {k: v for k, v in results[variant][-1].items() if k != "profile"}
                    print(f"  [{model} round {round_ + 1}] {variant}: {summary}", file=sys.stderr, flush=True)
        print(report(model, results), flush=True)
        if args.profile:
            print(profile_report(model, results), flush=True)


if __name__ == "__main__":
    main()
