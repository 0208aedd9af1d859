"""The method registry: one entry per adapter method, looked up by name.

A method is a frozen config dataclass plus a :class:`Method` object holding its
reference math (pure torch on ``[..., in]`` inputs). Everything else -- rewrite,
merge, kernels, export, checkpoints -- goes through this registry, so no other
module branches on the method name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping

import torch
from torch import nn

__all__ = [
    "MethodConfig",
    "Method",
    "register_method",
    "get_method",
    "method_for",
    "registered_methods",
    "kaiming_",
]

Params = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's hyper-parameters (frozen once built)."""

    name: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return {"method": self.name, **dataclasses.asdict(self)}

    @property
    def dropout_p(self) -> float:
        return float(getattr(self, "dropout", 0.0))


@dataclass(frozen=True)
class Method:
    """Reference math of one method.

    shapes(cfg, in_f, out_f, n) -> {param name: shape}  (per-site parameters;
                                                       n = sites sharing with it, 1 if none)
    init(cfg, params, n) -> None                       (in place, PEFT conventions)
    delta(x, params, cfg) -> [..., out]                (x already dropped out)
    delta_weight(params, cfg) -> [out, in]             (so that delta(x) == x @ dW.T)
    check_site(cfg, in_f, out_f) -> str | None        (why the site cannot take it)
    Optional, for methods that share tensors across a group of sites (RaSA):
    group_key(site_name, in_f, out_f) -> hashable | None
    shared_shapes(cfg, in_f, out_f, n) -> {name: shape}  (stored once per group)
    shared_init(cfg, shared, n) -> None
    ``delta``/``delta_weight`` then receive the site's and the group's tensors in one mapping.
    shrink_group(cfg, members, kept, {site: tensors}, shared) -> ({site: tensors}, shared)
        the tensors of a group cut down to its ``kept`` members (DiffoRA's warm start).
    """

    name: str
    config_cls: type
    shapes: Callable[..., dict[str, tuple[int, ...]]]
    init: Callable[..., None]
    delta: Callable[..., torch.Tensor]
    delta_weight: Callable[..., torch.Tensor]
    check_site: Callable[..., str | None]
    group_key: Callable[..., object] | None = None
    shared_shapes: Callable[..., dict[str, tuple[int, ...]]] | None = None
    shared_init: Callable[..., None] | None = None
    shrink_group: Callable[..., tuple[dict, dict]] | None = None

    @property
    def shares(self) -> bool:
        return self.group_key is not None


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add a method; names are lower-case and unique."""
    if method.name != method.name.lower() or not method.name:
        raise ValueError(f"method names are lower-case and non-empty, got {method.name!r}")
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is already registered")
    method.config_cls.name = method.name
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(_REGISTRY)}") from None


def method_for(cfg: MethodConfig) -> Method:
    return get_method(cfg.name)


def registered_methods() -> dict[str, Method]:
    return dict(_REGISTRY)


def kaiming_(t: torch.Tensor) -> None:
    """nn.Linear's default init (what PEFT uses for A)."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def config_from_dict(d: Mapping) -> MethodConfig:
    d = dict(d)
    method = get_method(d.pop("method"))
    return method.config_cls(**d)
