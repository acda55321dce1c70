"""TensLoRA: tensor low-rank adapters (Tucker / CP over heads, projections and depth) as a PEFT method."""

from . import third_party_logs  # noqa: F401  (first: before PEFT imports bitsandbytes)
from .api import count_parameters, lora_parameter_count, match_budget, model_geometry, resolved_ranks
from .config import TensLoraConfig
from .construction import CONSTRUCTIONS, PRESETS, TENSOR_CONSTRUCTIONS
from .layer import TensLoraLayer
from .lora_export import export_lora
from .model import TensLoraModel
from .persistence import load_adapter, save_adapter
from .refit import RefitReport, compress_adapter, from_lora
from .registration import register

register()

__all__ = [
    "CONSTRUCTIONS",
    "PRESETS",
    "RefitReport",
    "TENSOR_CONSTRUCTIONS",
    "TensLoraConfig",
    "TensLoraLayer",
    "TensLoraModel",
    "compress_adapter",
    "count_parameters",
    "export_lora",
    "from_lora",
    "load_adapter",
    "lora_parameter_count",
    "match_budget",
    "model_geometry",
    "resolved_ranks",
    "save_adapter",
]
