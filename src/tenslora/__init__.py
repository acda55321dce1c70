"""TensLoRA: tensor low-rank adapters (Tucker / CP over heads, projections and depth) as a PEFT method."""

from . import third_party_logs  # noqa: F401  (first: before PEFT imports bitsandbytes)
from ._moved import install as _keep_old_module_paths
from ._moved import old_module as __getattr__  # noqa: F401  (tenslora.train... of 0.1)
from .core.construction import CONSTRUCTIONS, PRESETS, TENSOR_CONSTRUCTIONS
from .transfer.lora_export import export_lora
from .transfer.refit import RefitReport, compress_adapter, from_lora
from .tuner.budgets import count_parameters, lora_parameter_count, match_budget, model_geometry, resolved_ranks
from .tuner.config import TensLoraConfig
from .tuner.layer import TensLoraLayer
from .tuner.model import TensLoraModel
from .tuner.persistence import load_adapter, save_adapter
from .tuner.quantized import RequantizationReport, requantizing_merge
from .tuner.registration import register

register()
_keep_old_module_paths()

__all__ = [
    "CONSTRUCTIONS",
    "PRESETS",
    "RefitReport",
    "RequantizationReport",
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
    "requantizing_merge",
    "resolved_ranks",
    "save_adapter",
]
