"""RaSA config and reference math (arXiv 2503.12576; zwhe99/RaSA conventions).

Sites of one module type across L repeated blocks share A_S [L*k, in] and B_S [out, L*k].
Each site keeps private A_l [r-k, in], B_l [out, r-k] and a trainable diagonal D_l of
length e = (r-k) + L*k:  delta_l(x) = ((x @ [A_l; A_S].T) * D_l) @ [B_l, B_S].T, scaling 1.

Other site kinds, with the linear site's parameters and init (the delta starts at 0 through
B_l = B_S = 0): ``nn.Embedding`` (in = num_embeddings) looks the ids up in [A_l; A_S] with the
embedding's F.embedding options (as LoRA's lookup of A); ``nn.Conv1d/2d/3d`` (in = C_in *
prod(kernel)) is a conv with [A_l; A_S] as [e, C_in, *kernel] filters, times D, then a 1x1 conv
with [B_l, B_S]. A group shares its pool across sites of one kind and weight shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..lowrank import lowrank, lowrank_conv, lowrank_embed, lowrank_weight
from ...errors import AdapterError
from ..registry import MethodConfig, Params, kaiming_

__all__ = ["RaSA", "rasa_delta", "rasa_delta_weight", "rasa_group_key", "rasa_as_lora", "rasa_full", "rasa_shapes",
           "rasa_init", "rasa_shared_shapes", "rasa_shared_init", "rasa_shrink_group", "rasa_embed", "rasa_conv"]


@dataclass(frozen=True)
class RaSA(MethodConfig):
    """Rank-sharing LoRA: rank r per site, k of it pooled across the L layers of a group."""

    r: int = field(default=8, metadata={"help": "rank per site (private r-k plus shared k)"})
    k: int = field(default=1, metadata={"help": "rank each site contributes to the shared pool"})
    alpha: float = field(default=16.0, metadata={"help": "sets D's init: 0.5*alpha/(r-k), 0.5*alpha/(L*k)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})

    def __post_init__(self) -> None:
        super().__post_init__()  # r, alpha, dropout
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise AdapterError(f"RaSA: k must be an int >= 1, got {self.k!r}")
        if self.k >= self.r:
            raise AdapterError(f"RaSA: k={self.k} must be smaller than r={self.r} (typically r/8)")

    def effective_rank(self, n_layers: int) -> int:
        return self.r - self.k + n_layers * self.k


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)")


def rasa_group_key(site: str) -> str:
    """Site name with every ModuleList index replaced by ``*``: ``layers.3.q`` -> ``layers.*.q``."""
    return _INDEX.sub("*", site)


def rasa_shapes(cfg: RaSA, in_f: int, out_f: int, n: int = 1) -> dict[str, tuple[int, ...]]:
    p = cfg.r - cfg.k
    return {"rasa_A": (p, in_f), "rasa_B": (out_f, p), "rasa_D": (p + n * cfg.k,)}


def rasa_init(cfg: RaSA, p: Params, n: int = 1) -> None:
    kaiming_(p["rasa_A"])
    torch.nn.init.zeros_(p["rasa_B"])
    priv = cfg.r - cfg.k
    with torch.no_grad():
        p["rasa_D"][:priv].fill_(0.5 * cfg.alpha / priv)
        p["rasa_D"][priv:].fill_(0.5 * cfg.alpha / (n * cfg.k))


def rasa_shared_shapes(cfg: RaSA, in_f: int, out_f: int, n: int) -> dict[str, tuple[int, ...]]:
    return {"rasa_A_shared": (n * cfg.k, in_f), "rasa_B_shared": (out_f, n * cfg.k)}


def rasa_shared_init(cfg: RaSA, p: Params, n: int) -> None:
    kaiming_(p["rasa_A_shared"])
    torch.nn.init.zeros_(p["rasa_B_shared"])


def rasa_full(p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    A = torch.cat([p["rasa_A"], p["rasa_A_shared"]], 0)  # [e, in]
    B = torch.cat([p["rasa_B"], p["rasa_B_shared"]], 1)  # [out, e]
    return A, B


def rasa_delta(x: torch.Tensor, p: Params, cfg: RaSA) -> torch.Tensor:
    A, B = rasa_full(p)
    return lowrank(x, A, B, 1.0, p["rasa_D"])


def rasa_embed(ids: torch.Tensor, p: Params, cfg: RaSA, kwargs: dict) -> torch.Tensor:
    """The delta of an nn.Embedding site: (F.embedding(ids, [A_l; A_S].T, **options) * D) @ [B_l, B_S].T."""
    A, B = rasa_full(p)
    return lowrank_embed(ids, A, B, 1.0, kwargs, p["rasa_D"])


def rasa_conv(x: torch.Tensor, p: Params, cfg: RaSA, opts: dict) -> torch.Tensor:
    """The delta of an nn.Conv1d/2d/3d site, F.convNd(x, dW.view(W.shape)), as LoRA's two convs of rank e."""
    A, B = rasa_full(p)
    return lowrank_conv(x, A, B, 1.0, opts, p["rasa_D"])


def rasa_delta_weight(p: Params, cfg: RaSA) -> torch.Tensor:
    A, B = rasa_full(p)
    return lowrank_weight(A, B, 1.0, p["rasa_D"])  # [out, e] diag(D) [e, in]


def rasa_as_lora(p: Params, cfg: RaSA) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA of rank (r-k) + L*k: D folded into B (the pool is no longer stored once)."""
    A, B = rasa_full(p)
    return A, B * p["rasa_D"]


def rasa_shrink_group(cfg: RaSA, members: list[str], kept: list[str], sites: dict, shared: dict) -> tuple[dict, dict]:
    """Cut a group's tensors down to its kept members (DiffoRA warm start).

    Member i owns rows [i*k, (i+1)*k) of the pool and the matching entries of every
    member's D; the kept members' rows are kept, in member order.
    """
    k, priv = cfg.k, cfg.r - cfg.k
    rows = [i * k + j for i, m in enumerate(members) if m in kept for j in range(k)]
    idx = torch.tensor(rows, dtype=torch.long, device=shared["rasa_A_shared"].device)
    new_shared = {"rasa_A_shared": shared["rasa_A_shared"][idx], "rasa_B_shared": shared["rasa_B_shared"][:, idx]}
    new_sites = {}
    for s, t in sites.items():
        d = t["rasa_D"]
        new_sites[s] = {**t, "rasa_D": torch.cat([d[:priv], d[priv:][idx.to(d.device)]])}
    return new_sites, new_shared
