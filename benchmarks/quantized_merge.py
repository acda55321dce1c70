"""How far a merge into a bitsandbytes 4-bit/8-bit base moves the output: TensLoRA against PEFT LoRA, same update.

Each row loads a tiny random LLaMA (hidden 64, 2 layers) in 4 or 8 bits on the CPU and puts a TensLoRA
adapter with random weights on q, k and v (qkv_depth, Tucker ranks 4). The same update, written as
a plain LoRA adapter (``export_lora``, exact), is loaded by PEFT onto a fresh copy of the quantized
base. Each model runs with its adapter, merges (``merge_and_unload``) and reports

    error = |merged - adapted| / |adapted - base|     (over the logits of a fixed batch)

0 is a perfect merge; 1 is a merge that left the output where the base was (or moved it as far
elsewhere). ``mode`` is how the model ran before merging: ``eval`` (``model.eval()`` under
``torch.no_grad()``, where bitsandbytes repacks 4-bit weights for CPU inference on AVX512-BF16 CPUs)
or ``train``. ``scale`` multiplies the update: at 0.1 it is small against a 4-bit quantization
step, which a merge into 4 bits cannot represent, whoever does it.

    python benchmarks/quantized_merge.py
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import peft
import torch
import transformers

from tenslora import TensLoraConfig, export_lora

QUANTIZATIONS = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                 "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
                 "int8": dict(load_in_8bit=True)}
BATCH = {"input_ids": torch.randint(2, 100, (4, 7), generator=torch.Generator().manual_seed(1))}


def _quantized(folder: Path, quantization: str) -> torch.nn.Module:
    config = transformers.BitsAndBytesConfig(**QUANTIZATIONS[quantization])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=config,
                                                                            device_map="cpu")
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def merge_error(model: peft.PeftModel, mode: str) -> float:
    getattr(model, mode)()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(**BATCH).logits
        adapted = model(**BATCH).logits
        merged = model.merge_and_unload()(**BATCH).logits
    return ((merged - adapted).norm() / (adapted - base).norm()).item()


def errors(folder: Path, quantization: str, scale: float, mode: str) -> tuple[float, float]:
    """(PEFT LoRA, TensLoRA) merge errors for one random update."""
    torch.manual_seed(0)
    config = TensLoraConfig(construction="qkv_depth", ranks=4, scaling=scale, init_weights=False)
    tenslora_model = peft.get_peft_model(_quantized(folder, quantization), config)
    lora_folder = export_lora(tenslora_model, folder / f"lora-{quantization}-{scale}-{mode}")
    lora_model = peft.PeftModel.from_pretrained(_quantized(folder, quantization), lora_folder)
    return merge_error(lora_model, mode), merge_error(tenslora_model, mode)


def main() -> None:
    warnings.simplefilter("ignore")  # each merge into a quantized base warns that it rounds
    logging.disable(logging.WARNING)  # bitsandbytes logs every int8 matmul of fp32 inputs
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, num_labels=3)
        transformers.LlamaForSequenceClassification(config).save_pretrained(folder)
        print("| base | scale | mode  | PEFT LoRA | TensLoRA |")
        print("|------|------:|-------|----------:|---------:|")
        for quantization in QUANTIZATIONS:
            for scale in (1.0, 0.1):
                for mode in ("eval", "train"):
                    lora, tens = errors(folder, quantization, scale, mode)
                    print(f"| {quantization} | {scale} | {mode:5s} | {lora:.3f} | {tens:.3f} |")


if __name__ == "__main__":
    main()
