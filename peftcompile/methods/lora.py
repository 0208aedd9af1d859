"""LoRA reference math: delta(x) = s * (x @ A.T) @ B.T, dW = s * B @ A, s = alpha / r."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .registry import Method, MethodConfig, Params, kaiming_, register_method

__all__ = ["LoRA", "lora_delta", "lora_delta_weight"]


@dataclass(frozen=True)
class LoRA(MethodConfig):
    """Low-rank adapter: A [r, in] (kaiming), B [out, r] (zeros), scaling alpha / r."""

    r: int = field(default=8, metadata={"help": "rank"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA: r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _shapes(cfg: LoRA, in_f: int, out_f: int, n: int = 1) -> dict[str, tuple[int, ...]]:
    return {"lora_A": (cfg.r, in_f), "lora_B": (out_f, cfg.r)}


def _init(cfg: LoRA, p: Params, n: int = 1) -> None:
    kaiming_(p["lora_A"])
    torch.nn.init.zeros_(p["lora_B"])


def lora_delta(x: torch.Tensor, p: Params, cfg: LoRA) -> torch.Tensor:
    # [..., in] @ [in, r] -> [..., r] @ [r, out] -> [..., out]
    return (x @ p["lora_A"].t()) @ p["lora_B"].t() * cfg.scaling


def lora_delta_weight(p: Params, cfg: LoRA) -> torch.Tensor:
    return (p["lora_B"] @ p["lora_A"]) * cfg.scaling  # [out, in]


def _check(cfg: LoRA, in_f: int, out_f: int) -> str | None:
    return None


register_method(
    Method(
        name="lora",
        config_cls=LoRA,
        shapes=_shapes,
        init=_init,
        delta=lora_delta,
        delta_weight=lora_delta_weight,
        check_site=_check,
    )
)
