"""GraLoRA config and reference math (arXiv 2505.20355; PEFT ``tuners/gralora`` conventions).

x is split into k input blocks, each block i has its own A[i] [in_b, r]; the rank-r
output z_i is cut into k chunks of size s = r / k, and output block j sums chunk j of
every z_i through B[j] [r, out_b]. Every (out j, in i) block of dW has rank s, so
rank(dW) <= k * r with LoRA's parameter count. An optional hybrid LoRA pair of rank
``hybrid_r`` adds to the same output. scaling = alpha / (r + hybrid_r).

Other site kinds (the parameters are the linear site's, the math is the same):
* ``nn.Embedding`` (in = num_embeddings): the delta of ids is the linear delta of one_hot(ids),
  gathering A[id // in_b][id % in_b] only (``block_lowrank_embed``). Init there: A = 0 and B ~ N(0, 1)
  (hybrid pair likewise), PEFT's convention for LoRA embeddings: the delta starts at exactly 0,
  and the row of ``padding_idx`` (which F.embedding gives no gradient) keeps a zero delta.
* ``nn.Conv1d/2d/3d`` (in = C_in * prod(kernel)): grouped convs when k divides C_in, else the
  block weight as one dense conv (``block_lowrank_conv``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..lowrank import (block_as_lowrank, block_lowrank, block_lowrank_conv, block_lowrank_embed,
                       block_lowrank_weight)
from ...errors import AdapterError
from ..registry import MethodConfig, Params, check_positive_int, kaiming_

__all__ = ["GraLoRA", "gralora_delta", "gralora_delta_weight", "gralora_as_lora", "gralora_shapes", "gralora_init",
           "gralora_check_site", "gralora_embed", "gralora_embed_init", "gralora_conv"]


@dataclass(frozen=True)
class GraLoRA(MethodConfig):
    """Granular LoRA: k x k blocks of rank r/k each (same parameters as LoRA rank r)."""

    r: int = field(default=16, metadata={"help": "rank (parameter count as LoRA's r)"})
    k: int = field(default=2, metadata={"help": "blocks per dimension; divides in, out and r"})
    alpha: float = field(default=32.0, metadata={"help": "scaling numerator"})
    hybrid_r: int = field(default=0, metadata={"help": "rank of the extra full LoRA pair"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})

    def __post_init__(self) -> None:
        super().__post_init__()  # r, alpha, dropout
        check_positive_int("GraLoRA", "k", self.k)
        if self.r % self.k:
            raise AdapterError(f"GraLoRA: k={self.k} must divide r={self.r}; pick r as a multiple of k")
        check_positive_int("GraLoRA", "hybrid_r", self.hybrid_r, minimum=0)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r + self.hybrid_r)


def gralora_shapes(cfg: GraLoRA, in_f: int, out_f: int, n: int = 1) -> dict[str, tuple[int, ...]]:
    k, r = cfg.k, cfg.r
    shapes = {"gralora_A": (k, in_f // k, r), "gralora_B": (k, r, out_f // k)}
    if cfg.hybrid_r:
        shapes["gralora_A_hybrid"] = (cfg.hybrid_r, in_f)
        shapes["gralora_B_hybrid"] = (out_f, cfg.hybrid_r)
    return shapes


def gralora_init(cfg: GraLoRA, p: Params, n: int = 1) -> None:
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


def gralora_delta(x: torch.Tensor, p: Params, cfg: GraLoRA) -> torch.Tensor:
    return block_lowrank(x, p["gralora_A"], p["gralora_B"], cfg.k, cfg.scaling,
                         p.get("gralora_A_hybrid"), p.get("gralora_B_hybrid"))


def gralora_delta_weight(p: Params, cfg: GraLoRA) -> torch.Tensor:
    return block_lowrank_weight(p["gralora_A"], p["gralora_B"], cfg.k, cfg.scaling,
                                p.get("gralora_A_hybrid"), p.get("gralora_B_hybrid"))


def gralora_as_lora(p: Params, cfg: GraLoRA) -> tuple[torch.Tensor, torch.Tensor]:
    """GraLoRA(r, k) is exactly a LoRA of rank k*r (+ hybrid_r): blocks placed into A_full / B_full."""
    return block_as_lowrank(p["gralora_A"], p["gralora_B"], cfg.k, cfg.scaling,
                            p.get("gralora_A_hybrid"), p.get("gralora_B_hybrid"))


def gralora_check_site(cfg: GraLoRA, in_f: int, out_f: int) -> str | None:
    if in_f % cfg.k or out_f % cfg.k:
        return (
            f"GraLoRA k={cfg.k} must divide in_features={in_f} and out_features={out_f}; "
            f"choose k among the common divisors or exclude this site"
        )
    return None


def gralora_embed_init(cfg: GraLoRA, p: Params) -> None:
    """At an nn.Embedding site: A = 0, B ~ N(0, 1) (and the hybrid pair likewise), PEFT's convention for
    LoRA embeddings. The delta is exactly 0 at start, and a ``padding_idx`` row (no gradient into its
    A rows) stays 0."""
    torch.nn.init.zeros_(p["gralora_A"])
    torch.nn.init.normal_(p["gralora_B"])
    if cfg.hybrid_r:
        torch.nn.init.zeros_(p["gralora_A_hybrid"])
        torch.nn.init.normal_(p["gralora_B_hybrid"])


def gralora_embed(ids: torch.Tensor, p: Params, cfg: GraLoRA, kwargs: dict) -> torch.Tensor:
    """The delta of an nn.Embedding site for integer ``ids``: gralora_delta(one_hot(ids)), gathered."""
    return block_lowrank_embed(ids, p["gralora_A"], p["gralora_B"], cfg.k, cfg.scaling, kwargs,
                               p.get("gralora_A_hybrid"), p.get("gralora_B_hybrid"))


def gralora_conv(x: torch.Tensor, p: Params, cfg: GraLoRA, opts: dict) -> torch.Tensor:
    """The delta of an nn.Conv1d/2d/3d site, F.convNd(x, dW.view(W.shape)): two grouped convs (groups = k)
    when k divides C_in, no dW; otherwise that dense conv (a base conv's cost, dW materialised)."""
    return block_lowrank_conv(x, p["gralora_A"], p["gralora_B"], cfg.k, cfg.scaling, opts,
                              p.get("gralora_A_hybrid"), p.get("gralora_B_hybrid"))

