"""Adapter methods: one package per method, each registering itself with the registry."""

from .registry import (Lowering, Method, MethodConfig, ParamForm, PeftFormat, config_from_dict, get_method, method_for,
                       register_method, registered_methods, unregister_method)
from .lora import LoRA
from .gralora import GraLoRA
from .rasa import RaSA

#: The method a command uses when none is named (PEFT users' default).
DEFAULT_METHOD = "lora"

__all__ = [
    "Method",
    "MethodConfig",
    "Lowering",
    "PeftFormat",
    "ParamForm",
    "LoRA",
    "GraLoRA",
    "RaSA",
    "config_from_dict",
    "get_method",
    "method_for",
    "register_method",
    "registered_methods",
    "unregister_method",
    "DEFAULT_METHOD",
]
