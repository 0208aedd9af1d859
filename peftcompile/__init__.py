"""peftcompile: parameter-efficient fine-tuning as a compiler problem.

``adapt`` rewrites a model's linear sites with fx into ``base(x) + delta(x)``;
``torch.compile(model, backend="peftcompile")`` lowers the deltas to fused kernels.
"""

from .methods import GraLoRA, LoRA, RaSA
from .spec import AdapterSpec, Placement
from .api import (
    AdapterError,
    adapt,
    adapters_of,
    disabled,
    merge,
    merge_and_unload,
    set_active,
    summary,
    unmerge,
)
from .io import load_adapters, load_peft_adapter, save_adapters
from . import backend  # noqa: E402,F401  registers torch.compile(backend="peftcompile")

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: ``peftcompile.diffora`` (the placement search) loads on first use, so a plain
    # ``import peftcompile`` does not pay for it.
    if name == "diffora":
        import importlib

        return importlib.import_module(".diffora", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LoRA",
    "GraLoRA",
    "RaSA",
    "AdapterSpec",
    "Placement",
    "AdapterError",
    "adapt",
    "adapters_of",
    "disabled",
    "merge",
    "merge_and_unload",
    "set_active",
    "summary",
    "unmerge",
    "save_adapters",
    "load_adapters",
    "load_peft_adapter",
]
