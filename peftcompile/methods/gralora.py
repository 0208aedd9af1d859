"""GraLoRA reference math (arXiv 2505.20355; PEFT ``tuners/gralora`` conventions).

x is split into k input blocks, each block i has its own A[i] [in_b, r]; the rank-r
output z_i is cut into k chunks of size s = r / k, and output block j sums chunk j of
every z_i through B[j] [r, out_b]. Every (out j, in i) block of dW has rank s, so
rank(dW) <= k * r with LoRA's parameter count. An optional hybrid LoRA pair of rank
``hybrid_r`` adds to the same output. scaling = alpha / (r + hybrid_r).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .registry import Method, MethodConfig, Params, kaiming_, register_method

__all__ = ["GraLoRA", "gralora_delta", "gralora_delta_weight", "gralora_z"]


@dataclass(frozen=True)
class GraLoRA(MethodConfig):
    """Granular LoRA: k x k blocks of rank r/k each (same parameters as LoRA rank r)."""

    r: int = field(default=16, metadata={"help": "rank (parameter count as LoRA's r)"})
    k: int = field(default=2, metadata={"help": "blocks per dimension; divides in, out and r"})
    alpha: float = field(default=32.0, metadata={"help": "scaling numerator"})
    hybrid_r: int = field(default=0, metadata={"help": "rank of the extra full LoRA pair"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"GraLoRA: r must be a positive int, got {self.r!r}")
        if not isinstance(self.k, int) or self.k <= 0:
            raise ValueError(f"GraLoRA: k must be a positive int, got {self.k!r}")
        if self.r % self.k:
            raise ValueError(f"GraLoRA: k={self.k} must divide r={self.r}; pick r as a multiple of k")
        if not isinstance(self.hybrid_r, int) or self.hybrid_r < 0:
            raise ValueError(f"GraLoRA: hybrid_r must be an int >= 0, got {self.hybrid_r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GraLoRA: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r + self.hybrid_r)


def _shapes(cfg: GraLoRA, in_f: int, out_f: int, n: int = 1) -> dict[str, tuple[int, ...]]:
    k, r = cfg.k, cfg.r
    shapes = {"gralora_A": (k, in_f // k, r), "gralora_B": (k, r, out_f // k)}
    if cfg.hybrid_r:
        shapes["gralora_A_hybrid"] = (cfg.hybrid_r, in_f)
        shapes["gralora_B_hybrid"] = (out_f, cfg.hybrid_r)
    return shapes


def _init(cfg: GraLoRA, p: Params, n: int = 1) -> None:
    # PEFT draws each block's A as an [r, in_b] Linear weight, then transposes.
    A = p["gralora_A"]
    with torch.no_grad():
        for i in range(cfg.k):
            blk = torch.empty(A.shape[2], A.shape[1], dtype=A.dtype, device=A.device)
            kaiming_(blk)
            A[i].copy_(blk.t())
    torch.nn.init.zeros_(p["gralora_B"])
    if cfg.hybrid_r:
        kaiming_(p["gralora_A_hybrid"])
        torch.nn.init.zeros_(p["gralora_B_hybrid"])


def gralora_z(x: torch.Tensor, A: torch.Tensor, k: int) -> torch.Tensor:
    """The [..., k, r] intermediate, already regrouped by output block.

    z[..., j, i*s:(i+1)*s] = x_i @ A[i][:, j*s:(j+1)*s]  (chunk j of input block i).
    """
    lead = x.shape[:-1]
    in_b, r = A.shape[1], A.shape[2]
    s = r // k
    z = torch.einsum("...ni,nir->...nr", x.reshape(*lead, k, in_b), A)  # [..., k(i), r]
    return z.reshape(*lead, k, k, s).transpose(-3, -2).reshape(*lead, k, r)  # [..., k(j), r]


def gralora_delta(x: torch.Tensor, p: Params, cfg: GraLoRA) -> torch.Tensor:
    A, B = p["gralora_A"], p["gralora_B"]
    z = gralora_z(x, A, cfg.k)
    y = torch.einsum("...jr,jro->...jo", z, B).reshape(*x.shape[:-1], B.shape[0] * B.shape[2])
    if cfg.hybrid_r:
        y = y + (x @ p["gralora_A_hybrid"].t()) @ p["gralora_B_hybrid"].t()
    return y * cfg.scaling


def gralora_delta_weight(p: Params, cfg: GraLoRA) -> torch.Tensor:
    A, B = p["gralora_A"], p["gralora_B"]
    k, in_b, r = A.shape
    out_b = B.shape[2]
    s = r // k
    A4 = A.reshape(k, in_b, k, s)  # [i, p, j, s]
    B4 = B.reshape(k, k, s, out_b)  # [j, i, s, o]
    dwt = torch.einsum("ipjs,jiso->ipjo", A4, B4).reshape(k * in_b, k * out_b)  # [in, out]
    dw = dwt.t()
    if cfg.hybrid_r:
        dw = dw + p["gralora_B_hybrid"] @ p["gralora_A_hybrid"]
    return dw * cfg.scaling


def _check(cfg: GraLoRA, in_f: int, out_f: int) -> str | None:
    if in_f % cfg.k or out_f % cfg.k:
        return (
            f"GraLoRA k={cfg.k} must divide in_features={in_f} and out_features={out_f}; "
            f"choose k among the common divisors or exclude this site"
        )
    return None


register_method(
    Method(
        name="gralora",
        config_cls=GraLoRA,
        shapes=_shapes,
        init=_init,
        delta=gralora_delta,
        delta_weight=gralora_delta_weight,
        check_site=_check,
    )
)
