"""A trained run as something that serves without tenslora: ``merge_run`` (one plain transformers model
folder, adapter merged into the weights) and ``export_run`` (a standard PEFT LoRA adapter folder)."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from ..files import new_folder, output_folder
from ..transfer.lora_export import lora_adapter, write_lora
from .modeling import load_trained_model
from .runs import disk_errors, reading_run


def merge_run(run_dir: str, out_dir: str, trust_remote_code: bool = False) -> Path:
    """Merge the run's adapter into its base model; save the model and its tokenizer / image processor.

    Stock heads load with ``AutoModelFor...Classification.from_pretrained(out_dir)``. The mean-pooling
    head has no stock transformers class: its folder carries ``pooling.py`` and an ``auto_map``, so
    ``AutoModelForSequenceClassification.from_pretrained(out_dir, trust_remote_code=True)`` rebuilds
    it (and ``AutoModel.from_pretrained(out_dir)`` gives the encoder alone). See docs/cli.md.

    A run trained on a quantized base is merged into that base's weights dequantized (fp32, as the
    run computed with them): the merged model is a plain one that needs no bitsandbytes. A model with code of its
    own loads only with ``trust_remote_code`` (the caller's permission; a run folder cannot grant it itself).
    """
    output_folder(out_dir)
    with reading_run(run_dir) as run:
        model, preprocessor = load_trained_model(run_dir, run, dequantize=True, trust_remote_code=trust_remote_code)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    with disk_errors(out_dir, resume=False), new_folder(out_dir) as staging:
        model.save_pretrained(staging)
        preprocessor.save_pretrained(staging)
    return Path(out_dir)


def export_run(run_dir: str, out_dir: str, trust_remote_code: bool = False) -> Path:
    """Write the run's adapter as a standard PEFT LoRA adapter (exact: see ``lora_export``), with its
    tokenizer / image processor, so that ``PeftModel.from_pretrained`` serves it without tenslora
    (``trust_remote_code`` as in ``merge_run``)."""
    with reading_run(run_dir) as run:
        if "adapter" not in run:
            raise ValueError(f"The run in '{run_dir}' trained the classification head only: it has no adapter to "
                             "export. `tenslora merge` saves its model as a plain transformers folder.")
        output_folder(out_dir)
        # the base as merge_run loads it; what is written is the adapter's factors alone, whatever the base
        model, preprocessor = load_trained_model(run_dir, run, dequantize=True, trust_remote_code=trust_remote_code)
    lora = lora_adapter(model)
    with disk_errors(out_dir, resume=False), new_folder(out_dir) as staging:
        write_lora(*lora, staging)
        preprocessor.save_pretrained(staging)
    return Path(out_dir)
