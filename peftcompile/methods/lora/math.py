"""LoRA config and reference math: delta(x) = s * (x @ A.T) @ B.T, dW = s * B @ A, s = alpha / r
(rank-stabilised LoRA, ``use_rslora``: s = alpha / sqrt(r))."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...errors import AdapterError, AdapterTypeError
from ..lowrank import lowrank, lowrank_weight
from ..registry import MethodConfig, Params, kaiming_

__all__ = ["LoRA", "lora_delta", "lora_delta_weight", "lora_shapes", "lora_init", "lora_as_lora", "lora_delta_bias", "lora_embed",
           "lora_embed_init"]


@dataclass(frozen=True)
class LoRA(MethodConfig):
    """Low-rank adapter: A [r, in] (kaiming), B [out, r] (zeros), scaling alpha / r, or
    alpha / sqrt(r) with ``use_rslora`` (Kalajdzievski 2023; PEFT's ``use_rslora``)."""

    r: int = field(default=8, metadata={"help": "rank"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    use_rslora: bool = field(default=False, metadata={"help": "scaling alpha / sqrt(r) instead of alpha / r"})
    lora_bias: bool = field(default=False, metadata={"help": "B gets a bias (PEFT's lora_bias): delta += s * b_B"})

    def __post_init__(self) -> None:
        super().__post_init__()  # r, alpha, dropout
        for f in ("use_rslora", "lora_bias"):
            if not isinstance(getattr(self, f), bool):
                raise AdapterTypeError(f"LoRA: {f} must be True or False, got {getattr(self, f)!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def lora_shapes(cfg: LoRA, in_f: int, out_f: int, n: int = 1) -> dict[str, tuple[int, ...]]:
    shapes = {"lora_A": (cfg.r, in_f), "lora_B": (out_f, cfg.r)}
    if cfg.lora_bias:
        shapes["lora_B_bias"] = (out_f,)
    return shapes


def lora_init(cfg: LoRA, p: Params, n: int = 1) -> None:
    kaiming_(p["lora_A"])
    torch.nn.init.zeros_(p["lora_B"])
    if "lora_B_bias" in p:
        torch.nn.init.zeros_(p["lora_B_bias"])


def lora_delta(x: torch.Tensor, p: Params, cfg: LoRA) -> torch.Tensor:
    # [..., in] @ [in, r] -> [..., r] @ [r, out] -> [..., out]
    d = lowrank(x, p["lora_A"], p["lora_B"], cfg.scaling)
    if "lora_B_bias" in p:  # PEFT: lora_B(lora_A(x)) * s with lora_B's own bias inside the product
        d = d + p["lora_B_bias"] * cfg.scaling
    return d


def lora_delta_bias(p: Params, cfg: LoRA) -> torch.Tensor | None:
    """What merging adds to the base bias: s * b_B (None without ``lora_bias``)."""
    return p["lora_B_bias"] * cfg.scaling if "lora_B_bias" in p else None


def lora_delta_weight(p: Params, cfg: LoRA) -> torch.Tensor:
    return lowrank_weight(p["lora_A"], p["lora_B"], cfg.scaling)  # [out, in]


def lora_as_lora(p: Params, cfg: LoRA) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.lora_bias:
        raise AdapterError("LoRA(lora_bias=True) adds a bias term s * b_B that a plain LoRA pair (A, B) cannot "
                           "express; merge the adapter (merge_and_unload) first, or train it with lora_bias=False")
    return p["lora_A"], p["lora_B"] * cfg.scaling


def lora_embed_init(cfg: LoRA, p: Params) -> None:
    """PEFT's embedding init: A zeros, B normal (the delta starts at zero through A)."""
    if "lora_B_bias" in p:
        raise AdapterError("LoRA(lora_bias=True) has no nn.Embedding form (PEFT refuses it too). Fix: remove the "
                           "embedding from targets, or use lora_bias=False")
    torch.nn.init.zeros_(p["lora_A"])
    torch.nn.init.normal_(p["lora_B"])


def lora_embed(ids: torch.Tensor, p: Params, cfg: LoRA, kwargs: dict) -> torch.Tensor:
    """PEFT's ``lora.Embedding``: s * F.embedding(ids, A.T, **embedding options) @ B.T (no dropout)."""
    after_a = torch.nn.functional.embedding(ids, p["lora_A"].T, **kwargs)  # [..., r]
    return (after_a @ p["lora_B"].T) * cfg.scaling
