"""LoRA config and reference math: delta(x) = s * (x @ A.T) @ B.T, dW = s * B @ A, s = alpha / r
(rank-stabilised LoRA, ``use_rslora``: s = alpha / sqrt(r))."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...errors import AdapterError, AdapterTypeError
from ..lowrank import lowrank, lowrank_weight
from ..registry import MethodConfig, Params, kaiming_

__all__ = ["LoRA", "lora_delta", "lora_delta_weight", "lora_shapes", "lora_init", "lora_as_lora", "lora_delta_bias",
           "lora_embed", "lora_embed_init", "lora_conv", "lora_conv_shape", "lora_param_shapes", "lora_param_init",
           "lora_param_delta_weight", "lora_param_check"]


@dataclass(frozen=True)
class LoRA(MethodConfig):
    """Low-rank adapter: A [r, in] (kaiming), B [out, r] (zeros), scaling alpha / r, or
    alpha / sqrt(r) with ``use_rslora`` (Kalajdzievski 2023; PEFT's ``use_rslora``).

    ``init_lora_weights`` is PEFT's option of that name, for the inits that do not read the
    base weight: True (the above), ``"gaussian"`` (A ~ N(0, 1/r), B = 0), ``"orthogonal"``
    (A, B from one random orthogonal matrix's odd / even rows, so B A = 0; even r), False
    (B random too: the adapter starts as a non-zero change, for tests). Embedding sites: True,
    "gaussian" and "orthogonal" give PEFT's A = 0, B ~ N(0, 1); False both ~ N(0, 1)."""

    r: int = field(default=8, metadata={"help": "rank"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input"})
    use_rslora: bool = field(default=False, metadata={"help": "scaling alpha / sqrt(r) instead of alpha / r"})
    lora_bias: bool = field(default=False, metadata={"help": "B gets a bias (PEFT's lora_bias): delta += s * b_B"})
    # compare=False: how an adapter started does not change its math (a checkpoint loads into an
    # adapter created with another init)
    init_lora_weights: bool | str = field(default=True, compare=False, metadata={
        "help": "PEFT's init: True, False, 'gaussian' or 'orthogonal'"})

    def __post_init__(self) -> None:
        super().__post_init__()  # r, alpha, dropout
        for f in ("use_rslora", "lora_bias"):
            if not isinstance(getattr(self, f), bool):
                raise AdapterTypeError(f"LoRA: {f} must be True or False, got {getattr(self, f)!r}")
        init = self.init_lora_weights
        if not any(init is v or (isinstance(init, str) and init == v) for v in INITS):
            raise AdapterError(f"LoRA: init_lora_weights={init!r} is not one of {list(INITS)}; PEFT's inits that "
                               f"read or change the base weight (pissa, olora, loftq, eva, corda, ...) are not offered")
        if init == "orthogonal" and self.r % 2:
            raise AdapterError(f"LoRA: init_lora_weights='orthogonal' needs an even r (A and B take half the rows "
                               f"of one orthogonal matrix each), got r={self.r}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


def lora_shapes(cfg: LoRA, in_f: int, out_f: int, n: int = 1) -> dict[str, tuple[int, ...]]:
    shapes = {"lora_A": (cfg.r, in_f), "lora_B": (out_f, cfg.r)}
    if cfg.lora_bias:
        shapes["lora_B_bias"] = (out_f,)
    return shapes


#: LoRA.init_lora_weights values (PEFT's, those that do not read the base weight)
INITS = (True, False, "gaussian", "orthogonal")


def lora_init(cfg: LoRA, p: Params, n: int = 1) -> None:
    """PEFT's init for ``cfg.init_lora_weights`` (``LoraLayer.reset_lora_parameters`` /
    ``orthogonal_init``; False: nn.Linear's own init of both factors, as PEFT leaves them)."""
    A, B, init = p["lora_A"], p["lora_B"], cfg.init_lora_weights
    if init == "orthogonal":
        r, (in_f, out_f) = cfg.r, (A.shape[-1], B.shape[0])
        q, _ = torch.linalg.qr(torch.randn(r, r))
        A.copy_((torch.randn(in_f, r // 2) @ q[0::2, :]).T / 10.0)
        B.copy_(torch.randn(r // 2, out_f).T @ q[1::2, :] / 10.0)
    else:
        if init == "gaussian":
            torch.nn.init.normal_(A, std=1 / cfg.r)
        else:
            kaiming_(A)
        if init is False:
            kaiming_(B)
        else:
            torch.nn.init.zeros_(B)
    if "lora_B_bias" in p:
        if init is False:  # nn.Linear's bias init, fan_in = r
            torch.nn.init.uniform_(p["lora_B_bias"], -1 / math.sqrt(cfg.r), 1 / math.sqrt(cfg.r))
        else:
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
    if cfg.init_lora_weights is False:  # PEFT leaves its randn draws
        torch.nn.init.normal_(p["lora_A"])
    else:
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
    if param == "lora_B":
        return (*shape, *(1,) * len(kernel_size))
    return tuple(shape)  # lora_B_bias: the 1x1 conv's bias, [out] in both layouts


def lora_conv(x: torch.Tensor, p: Params, cfg: LoRA, opts: dict) -> torch.Tensor:
    """PEFT's ``lora.Conv1d/2d/3d``: s * conv_1x1(conv(x, A; the base's kernel, stride, padding), B, b_B).

    x: [N, C_in, *spatial]; A [r, C_in * prod(k)] viewed as [r, C_in, *k]; B [out, r] as [out, r, 1, ...]."""
    k = tuple(opts["kernel_size"])
    conv = _CONVS[len(k)]
    A, B = p["lora_A"], p["lora_B"]
    z = conv(x, A.view(lora_conv_shape("lora_A", A.shape, k)), None, opts["stride"], opts["padding"])  # [N, r, *out]
    # lora_bias: PEFT's 1x1 conv B carries the bias, inside the scaling
    return conv(z, B.view(lora_conv_shape("lora_B", B.shape, k)), p.get("lora_B_bias")) * cfg.scaling  # [N, out, *out]


# Parameter targets (PEFT's ``ParamWrapper``): one LoRA pair per expert of a stacked
# W [experts, out, in], stored as PEFT stores them: A [r * experts, in] with expert e's rows
# at e*r .. (e+1)*r (expert-major), B [out, r * experts] with expert e's columns at
# e, e + experts, ... (rank-major: B.reshape(out, r, experts)[:, :, e]). A 2-D W is experts = 1.


def lora_param_shapes(cfg: LoRA, in_f: int, out_f: int, experts: int = 1) -> dict[str, tuple[int, ...]]:
    return {"lora_A": (cfg.r * experts, in_f), "lora_B": (out_f, cfg.r * experts)}


def lora_param_init(cfg: LoRA, p: Params, experts: int = 1) -> None:
    # PEFT: nn.Linear(in, r * experts)'s default init, or reset_lora_parameters' gaussian
    if cfg.init_lora_weights == "gaussian":
        torch.nn.init.normal_(p["lora_A"], std=1 / cfg.r)
    else:
        kaiming_(p["lora_A"])
    if cfg.init_lora_weights is False:
        kaiming_(p["lora_B"])
    else:
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
    if cfg.lora_bias:
        return ("lora_bias=True cannot apply to a parameter target: its delta is a weight, with no output to add a bias "
                "to (PEFT's ParamWrapper refuses it too). Use lora_bias=False")
    if cfg.init_lora_weights == "orthogonal":
        return ("init_lora_weights='orthogonal' is not offered at parameter targets (one orthogonal draw per stacked "
                "expert pair is not PEFT's). Use True, False or 'gaussian'")
    return None
