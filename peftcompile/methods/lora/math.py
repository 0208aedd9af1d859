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
           "lora_embed_init", "lora_param_shapes", "lora_param_init", "lora_param_delta_weight", "lora_param_check"]


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


# Parameter targets (PEFT's ``ParamWrapper``): one LoRA pair per expert of a stacked
# W [experts, out, in], stored as PEFT stores them: A [r * experts, in] with expert e's rows
# at e*r .. (e+1)*r (expert-major), B [out, r * experts] with expert e's columns at
# e, e + experts, ... (rank-major: B.reshape(out, r, experts)[:, :, e]). A 2-D W is experts = 1.


def lora_param_shapes(cfg: LoRA, in_f: int, out_f: int, experts: int = 1) -> dict[str, tuple[int, ...]]:
    return {"lora_A": (cfg.r * experts, in_f), "lora_B": (out_f, cfg.r * experts)}


def lora_param_init(cfg: LoRA, p: Params, experts: int = 1) -> None:
    kaiming_(p["lora_A"])  # PEFT: nn.Linear(in, r * experts)'s default init
    torch.nn.init.zeros_(p["lora_B"])


def lora_param_delta_weight(p: Params, cfg: LoRA, experts: int = 1) -> torch.Tensor:
    """dW[e] = s * B_e @ A_e: [experts, out, in] (PEFT's einsum "o r e, e r i -> e o i")."""
    a = p["lora_A"].reshape(experts, -1, p["lora_A"].shape[-1])  # [experts, r, in]
    b = p["lora_B"].reshape(p["lora_B"].shape[0], -1, experts)  # [out, r, experts]
    return torch.einsum("ore,eri->eoi", b, a) * cfg.scaling


def lora_param_check(cfg: LoRA) -> str | None:
    if cfg.dropout:
        return (f"dropout={cfg.dropout} cannot apply to a parameter target: the delta is added to the weight, so there "
                f"is no adapter input to drop out (PEFT's ParamWrapper refuses lora_dropout != 0 too). Use dropout=0")
    return None
