"""Saving and loading adapters safely: atomic writes, validated loads, safetensors only.

``PeftModel.save_pretrained`` / ``PeftModel.from_pretrained`` work as they do for any PEFT
method; these two functions add what production use needs: a crash while saving never leaves a
half-written adapter where a good one was, and a load checks the files before trusting them
(PEFT would fall back to unpickling ``adapter_model.bin``; TensLoRA never does).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, get_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from torch import nn

from .registration import PEFT_TYPE_NAME

CONFIG_NAME = "adapter_config.json"


def save_adapter(model: PeftModel, directory: str | os.PathLike, **kwargs) -> Path:
    """``model.save_pretrained(directory)``, written to a sibling temporary folder and then moved in place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True, **kwargs)
        if directory.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, retired / directory.name)
            os.replace(staging, directory)
            shutil.rmtree(retired)
        else:
            os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def check_adapter_dir(directory: str | os.PathLike) -> dict:
    """Validate a saved TensLoRA adapter folder; return its config as a dict."""
    directory = Path(directory)
    config_file, weights_file = directory / CONFIG_NAME, directory / SAFETENSORS_WEIGHTS_NAME
    if not config_file.is_file():
        raise ValueError(f"No {CONFIG_NAME} in '{directory}': point to a folder written by save_pretrained.")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"'{config_file}' is corrupt ({error}); re-save the adapter.") from None
    if not isinstance(config, dict) or config.get("peft_type") != PEFT_TYPE_NAME:
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"'{directory}' holds a {found} adapter, not a TensLoRA one; load it with PEFT directly.")
    if not weights_file.is_file():
        hint = (f" It has {WEIGHTS_NAME}, a pickle file, which TensLoRA does not load: re-save it with safetensors."
                if (directory / WEIGHTS_NAME).exists() else "")
        raise ValueError(f"No {SAFETENSORS_WEIGHTS_NAME} in '{directory}'.{hint}")
    try:
        with safe_open(weights_file, framework="pt") as weights:
            keys = list(weights.keys())
    except (SafetensorError, OSError) as error:
        raise ValueError(f"'{weights_file}' is corrupt or truncated ({error}); re-save the adapter.") from None
    if not keys:
        raise ValueError(f"'{weights_file}' holds no tensors; re-save the adapter.")
    return config


def load_adapter(base_model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` after checking the folder, and checking every saved tensor was used."""
    check_adapter_dir(directory)
    model = PeftModel.from_pretrained(base_model, str(directory), adapter_name=adapter_name,
                                      is_trainable=is_trainable)
    with safe_open(Path(directory) / SAFETENSORS_WEIGHTS_NAME, framework="pt") as weights:
        saved = set(weights.keys())
    expected = set(get_peft_model_state_dict(model, adapter_name=adapter_name))
    if saved != expected:
        raise ValueError(
            f"The adapter in '{directory}' does not match the model: missing {sorted(expected - saved)[:5]}, "
            f"unexpected {sorted(saved - expected)[:5]}. It was probably saved from another model or version."
        )
    return model
