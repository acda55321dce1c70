"""A GGUF file (llama.cpp's format, e.g. SmolLM2-135M-Instruct's ``.gguf``) as ``--model``.

transformers reads one as ``from_pretrained(folder, gguf_file=name)``, for configs, tokenizers and models
alike, with the ``gguf`` package. A model is loaded dequantized, in fp32: TensLoRA adapts and merges into
plain ``nn.Linear`` layers, and ``GgufConfig(dequantize=True)`` makes transformers unpack every weight
(rather than keep GGUF blocks in its own layers where its ``kernels`` package can compute with them) and
drop its GGUF quantizer, without which ``save_pretrained`` refuses the model ("quantized with gguf and
is not serializable"): a merged run then saves as any other.
"""

from __future__ import annotations

import os
import re
import warnings
from importlib.util import find_spec
from typing import Any

import torch
import transformers


def is_gguf(model: str) -> bool:
    """Whether ``model`` names a GGUF file (by its extension), rather than a model folder or hub id."""
    return model.lower().endswith(".gguf")


def load_gguf(loader: Any, model: str, loads_weights: bool, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` of the GGUF file ``model``; ``loads_weights``: ``loader`` is a model class (not a
    config or tokenizer), whose model is dequantized in fp32. A file transformers cannot read is a ``ValueError``."""
    if find_spec("gguf") is None:
        raise ValueError(f"'{model}' is a GGUF file, which needs the gguf package: pip install gguf "
                         "(or pip install 'tenslora[llm]').")
    if not os.path.isfile(model):
        raise ValueError(f"The GGUF file '{model}' does not exist: pass the path of a .gguf file with --model.")
    folder, name = os.path.split(os.path.abspath(model))
    arguments: dict[str, Any] = {"gguf_file": name}
    if loads_weights:
        _quiet_vocabulary_check(folder)
        arguments["dtype"] = torch.float32
        if hasattr(transformers, "GgufConfig"):  # before it, transformers always dequantized GGUF weights
            arguments["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        return loader.from_pretrained(folder, **{**arguments, **kwargs})
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"Cannot load the GGUF file '{model}' ({first_line(error)}); pass a GGUF file of an "
                         "architecture transformers reads from GGUF (LLaMA, Mistral, Qwen2, ...) or a model folder."
                         ) from None


def _quiet_vocabulary_check(folder: str) -> None:
    """PEFT, saving an adapter, reads the base's ``config.json`` to see whether its vocabulary was resized (and
    the embeddings must be saved too); beside a GGUF file there is none, so every save, checkpoints included,
    warns that it assumes not. TensLoRA never resizes a model's vocabulary: the warning says nothing here."""
    warnings.filterwarnings("ignore", category=UserWarning, message=re.escape(
        f"Could not find a config file in {folder} - will assume that the vocabulary was not modified"))


def first_line(error: Exception) -> str:
    """The first line of an error's message (or its type's name): what a one-line refusal quotes of it."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def check_not_quantized(model: str, quantization: str | None) -> None:
    """transformers cannot load a GGUF file into bitsandbytes layers: say so before anything is loaded."""
    if quantization and is_gguf(model):
        raise ValueError(f"'{model}' is a GGUF file, which transformers cannot load in {quantization[0]} bits "
                         f"(--load-in-{quantization}): drop that option (a GGUF model is fine-tuned dequantized, "
                         "in fp32).")
