"""Adapter methods: each module registers its reference math with the registry."""

from .registry import Method, MethodConfig, config_from_dict, get_method, method_for, register_method, registered_methods
from .lora import LoRA
from .gralora import GraLoRA
from .rasa import RaSA

__all__ = [
    "Method",
    "MethodConfig",
    "LoRA",
    "GraLoRA",
    "RaSA",
    "config_from_dict",
    "get_method",
    "method_for",
    "register_method",
    "registered_methods",
]
