"""``merge_run``: a trained run as one plain transformers model folder, adapter merged into the weights."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from .modeling import load_trained_model
from .runs import read_run


def merge_run(run_dir: str, out_dir: str) -> Path:
    """Merge the run's adapter into its base model; save the model and its tokenizer / image processor.

    Stock heads load with ``AutoModelFor...Classification.from_pretrained(out_dir)``. The mean-pooling
    head has no stock transformers class: its folder carries ``pooling.py`` and an ``auto_map``, so
    ``AutoModelForSequenceClassification.from_pretrained(out_dir, trust_remote_code=True)`` rebuilds
    it (and ``AutoModel.from_pretrained(out_dir)`` gives the encoder alone). See docs/cli.md.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"'{out}' exists and is not empty; choose a new OUT_DIR for the merged model.")
    run = read_run(run_dir)
    model, preprocessor = load_trained_model(run_dir, run)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    model.save_pretrained(out)
    preprocessor.save_pretrained(out)
    return out
