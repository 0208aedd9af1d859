"""peftcompile: parameter-efficient fine-tuning as a compiler problem.

``adapt`` rewrites a model's linear sites with fx into ``base(x) + delta(x)``;
``torch.compile(model, backend="peftcompile")`` lowers the deltas to fused kernels.
"""

from .methods import GraLoRA, LoRA, RaSA
from .spec import AdapterSpec, Placement
from .errors import AdapterError, AdapterTypeError, AdapterWarning
from .api import (
    adapt,
    adapters_of,
    delete_adapter,
    disable_adapter_layers,
    disabled,
    enable_adapter_layers,
    get_base_model_state_dict,
    merge,
    merge_and_unload,
    set_active,
    set_base_model_state_dict,
    summary,
    unload,
    unmerge,
)
from .io import load_adapters, load_peft_adapter, save_adapters
from .weighted import add_weighted_adapter
from . import backend  # noqa: E402,F401  registers torch.compile(backend="peftcompile")

__version__ = "0.1.0"

#: Subpackages reachable as attributes (``pc.export.to_onnx``) without importing their heavy
#: dependencies (onnxruntime, matplotlib) with ``import peftcompile``.
_LAZY = ("export", "diffora", "state", "methods", "kernels")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'peftcompile' has no attribute {name!r}")

__all__ = [
    "LoRA",
    "GraLoRA",
    "RaSA",
    "AdapterSpec",
    "Placement",
    "AdapterError",
    "AdapterTypeError",
    "AdapterWarning",
    "adapt",
    "adapters_of",
    "disabled",
    "merge",
    "merge_and_unload",
    "set_active",
    "summary",
    "unmerge",
    "unload",
    "delete_adapter",
    "add_weighted_adapter",
    "disable_adapter_layers",
    "enable_adapter_layers",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
    "save_adapters",
    "load_adapters",
    "load_peft_adapter",
]
