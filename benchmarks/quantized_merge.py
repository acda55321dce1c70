"""How far a merge into a bitsandbytes 4-bit/8-bit base moves the output: TensLoRA (by default: into dense fp32
layers; inside ``requantizing_merge``: requantized) against PEFT LoRA (requantizes), same update.

Each row loads a tiny random LLaMA (hidden 64, 2 layers) in 4 or 8 bits on the CPU and puts a TensLoRA
adapter with random weights on q, k and v (qkv_depth, Tucker ranks 4), scaled so that ||delta W|| is
``size`` times ||W|| on average over the adapted layers (a trained update on a real LLM is about 1e-3).
The same update, written as a plain LoRA adapter (``export_lora``, exact), is loaded by PEFT onto a
fresh copy of the quantized base. Each model runs with its adapter, merges (``merge_and_unload``) and
reports

    error = |merged - adapted| / |adapted - base|     (over the logits of a fixed batch)

0 is a perfect merge; 1 is a merge that left the output where the base was (or moved it as far
elsewhere). ``mode`` is how the model ran before merging: ``eval`` (``model.eval()`` under
``torch.no_grad()``, where bitsandbytes repacks 4-bit weights for CPU inference on AVX512-BF16 CPUs)
or ``train``; the outputs are compared in train mode (see ``merge_error``). The script takes about a minute.

    python benchmarks/quantized_merge.py
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path

import peft
import torch
import transformers

from tenslora import TensLoraConfig, TensLoraLayer, export_lora, requantizing_merge
from tenslora.tuner.quantized import dense_weight

QUANTIZATIONS = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                 "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
                 "int8": dict(load_in_8bit=True)}
BATCH = {"input_ids": torch.randint(2, 100, (4, 7), generator=torch.Generator().manual_seed(1))}


def _quantized(folder: Path, quantization: str) -> torch.nn.Module:
    config = transformers.BitsAndBytesConfig(**QUANTIZATIONS[quantization])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=config,
                                                                            device_map="cpu")
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def merge_error(model: peft.PeftModel, mode: str, requantize: bool = False) -> float:
    """After one pass in ``mode``, outputs compared in train mode (LLM.int8()'s eval matmul quantizes its inputs).
    A 4-bit weight repacked by an eval pass stays repacked: bitsandbytes' CPU kernel then computes it in bf16, and
    the adapted outputs (the reference) carry that rounding, as large as a 1e-3 update's effect."""
    getattr(model, mode)()
    with torch.no_grad():
        model(**BATCH)
        model.train()
        with model.disable_adapter():
            base = model(**BATCH).logits
        adapted = model(**BATCH).logits
        with requantizing_merge() if requantize else contextlib.nullcontext():
            merged = model.merge_and_unload().train()(**BATCH).logits
    return ((merged - adapted).norm() / (adapted - base).norm()).item()


def _tenslora(folder: Path, quantization: str, scaling: float) -> peft.PeftModel:
    torch.manual_seed(0)
    config = TensLoraConfig(construction="qkv_depth", ranks=4, scaling=scaling, init_weights=False)
    return peft.get_peft_model(_quantized(folder, quantization), config)


def relative_size(model: peft.PeftModel) -> float:
    """||delta W|| / ||W||, averaged over the adapted layers."""
    ratios = [(layer.get_delta_weight("default").norm() / dense_weight(layer.get_base_layer()).norm()).item()
              for layer in model.modules() if isinstance(layer, TensLoraLayer)]
    return sum(ratios) / len(ratios)


def errors(folder: Path, quantization: str, size: float, mode: str) -> tuple[float, float, float]:
    """(PEFT LoRA, TensLoRA requantizing, TensLoRA default) merge errors for one random update of ``size``."""
    scaling = size / relative_size(_tenslora(folder, quantization, 1.0))
    requantized = _tenslora(folder, quantization, scaling)
    lora_folder = export_lora(requantized, folder / f"lora-{quantization}-{size}-{mode}")
    lora_model = peft.PeftModel.from_pretrained(_quantized(folder, quantization), lora_folder)
    return (merge_error(lora_model, mode), merge_error(requantized, mode, requantize=True),
            merge_error(_tenslora(folder, quantization, scaling), mode))


def main() -> None:
    warnings.simplefilter("ignore")  # PEFT's and requantizing_merge's merges warn that they round
    logging.disable(logging.WARNING)  # bitsandbytes logs every int8 matmul of fp32 inputs
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=3)
        transformers.LlamaForSequenceClassification(config).save_pretrained(folder)
        print("| base | \\|ΔW\\| / \\|W\\| | mode  | PEFT LoRA | TensLoRA, requantizing | TensLoRA (default, dense) |")
        print("|------|----------:|-------|----------:|----------:|----------:|")
        for quantization in QUANTIZATIONS:
            for size in (1e-2, 1e-3):
                for mode in ("eval", "train"):
                    lora, requantized, dense = errors(folder, quantization, size, mode)
                    print(f"| {quantization} | {size:g} | {mode:5s} | {lora:.3f} | {requantized:.3f} | {dense:.3f} |")


if __name__ == "__main__":
    main()
