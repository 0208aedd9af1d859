"""LoRA config and reference math: delta(x) = s * (x @ A.T) @ B.T, dW = s * B @ A, s = alpha / r
(rank-stabilised LoRA, ``use_rslora``: s = alpha / sqrt(r))."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...errors import AdapterTypeError
from ..lowrank import lowrank, lowrank_weight
from ..registry import MethodConfig, Params, kaiming_

__all__ = ["LoRA", "lora_delta", "lora_delta_weight", "lora_shapes", "lora_init", "lora_as_lora", "lora_embed",
           "lora_embed_init", "lora_conv", "lora_conv_shape"]


@dataclass(frozen=True)
class LoRA(MethodConfig):
    """Low-rank adapter: A [r, in] (kaiming), B [out, r] (zeros), scaling alpha / r, or
    alpha / sqrt(r) with ``use_rslora`` (Kalajdzievski 2023; PEFT's ``use_rslora``)."""

    r: int = field(default=8, metadata={"help": "rank"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    use_rslora: bool = field(default=False, metadata={"help": "scaling alpha / sqrt(r) instead of alpha / r"})

    def __post_init__(self) -> None:
        super().__post_init__()  # r, alpha, dropout
        if not isinstance(self.use_rslora, bool):
            raise AdapterTypeError(f"LoRA: use_rslora must be True or False, got {self.use_rslora!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def lora_shapes(cfg: LoRA, in_f: int, out_f: int, n: int = 1) -> dict[str, tuple[int, ...]]:
    return {"lora_A": (cfg.r, in_f), "lora_B": (out_f, cfg.r)}


def lora_init(cfg: LoRA, p: Params, n: int = 1) -> None:
    kaiming_(p["lora_A"])
    torch.nn.init.zeros_(p["lora_B"])


def lora_delta(x: torch.Tensor, p: Params, cfg: LoRA) -> torch.Tensor:
    # [..., in] @ [in, r] -> [..., r] @ [r, out] -> [..., out]
    return lowrank(x, p["lora_A"], p["lora_B"], cfg.scaling)


def lora_delta_weight(p: Params, cfg: LoRA) -> torch.Tensor:
    return lowrank_weight(p["lora_A"], p["lora_B"], cfg.scaling)  # [out, in]


def lora_as_lora(p: Params, cfg: LoRA) -> tuple[torch.Tensor, torch.Tensor]:
    return p["lora_A"], p["lora_B"] * cfg.scaling


def lora_embed_init(cfg: LoRA, p: Params) -> None:
    """PEFT's embedding init: A zeros, B normal (the delta starts at zero through A)."""
    torch.nn.init.zeros_(p["lora_A"])
    torch.nn.init.normal_(p["lora_B"])


def lora_embed(ids: torch.Tensor, p: Params, cfg: LoRA, kwargs: dict) -> torch.Tensor:
    """PEFT's ``lora.Embedding``: s * F.embedding(ids, A.T, **embedding options) @ B.T (no dropout)."""
    after_a = torch.nn.functional.embedding(ids, p["lora_A"].T, **kwargs)  # [..., r]
    return (after_a @ p["lora_B"].T) * cfg.scaling


_CONVS = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}


def lora_conv_shape(param: str, shape: tuple, kernel_size: tuple) -> tuple:
    """PEFT's layout at a conv site: lora_A is a conv [r, C_in, *k], lora_B a 1x1 conv [out, r, 1, ...]."""
    if param == "lora_A":
        r, in_f = shape
        return (r, in_f // math.prod(kernel_size), *kernel_size)
    return (*shape, *(1,) * len(kernel_size))


def lora_conv(x: torch.Tensor, p: Params, cfg: LoRA, opts: dict) -> torch.Tensor:
    """PEFT's ``lora.Conv1d/2d/3d``: s * conv_1x1(conv(x, A; the base's kernel, stride, padding), B).

    x: [N, C_in, *spatial]; A [r, C_in * prod(k)] viewed as [r, C_in, *k]; B [out, r] as [out, r, 1, ...]."""
    k = tuple(opts["kernel_size"])
    conv = _CONVS[len(k)]
    A, B = p["lora_A"], p["lora_B"]
    z = conv(x, A.view(lora_conv_shape("lora_A", A.shape, k)), None, opts["stride"], opts["padding"])  # [N, r, *out]
    return conv(z, B.view(lora_conv_shape("lora_B", B.shape, k))) * cfg.scaling  # [N, out, *out]
