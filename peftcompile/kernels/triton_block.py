"""Forward and backward of a block low-rank adapter on a frozen linear, as Triton launches.

One core serves every method: GraLoRA (k x k blocks, optional hybrid LoRA pair), LoRA
(k = 1) and RaSA (k = 1 with a diagonal D). Shapes (the ``*_3`` tensors are 3-D views,
any strides): x [M, in], W [out, in], A3 [k, in_b, r], B3 [k, r, out_b], s = scaling,
c = r / k, A_h [h, in], B_h [out, h].

    Z[:, j*r + i*c + t] = (X_i @ A3[i])[:, j*c + t] * D      (launch 1, grouped over i;
                                                             columns regrouped so that
    Zh = X @ A_h^T       (launch 1b)                          Z_j = Z[:, j*r:(j+1)*r])
    Y_j = X @ W_j^T + s * Z_j @ B3[j] + s * Zh @ B_h[j]^T + b_j   (launch 2, grouped over j:
                                                             one GEMM, K = in + r + h)
(launch 1 stores s * Z * D, so launch 2 reads it as is.)
Backward (W frozen; Z recomputed (launch 1, 1b) because the op saves only its inputs):
    dU_j = s dY_j B3[j]^T;  dB3[j] = s (Z_j*D)^T dY_j;  dD = sum_M dU*Z;  dZ_j = dU_j * D
    dZh = s sum_j dY_j B_h[j];  dB_h = s dY^T Zh                  (launch 2: dY side, fused)
    dX_i = dY W[:, i] + dZ_(i) A3[i]^T + dZh A_h[:, i]            (launch 3: K = out + r + h)
    dA3[i] = X_i^T dZ_(i);  dA_h = dZh^T X                        (launch 4(+5): split-K)
dZ is written by launch 2 already regrouped by input block (dZ_(i) = dZ[:, i*r:(i+1)*r]).
With FUSE_DB = False, dB3 and dB_h come from split-K GEMMs over dY instead of launch 2.
Sums over tokens (dA, dB, dD, dZh) accumulate in fp32 buffers and are cast once.
With a separate adapter input ``xa`` (the output of the adapter's dropout) Z and dA read xa
instead of X, and launch 3 splits in two: dX = dY W (K = out) and dXa = [dZ, dZh] @ [A; A_h]
(K = r + h); the dropout's own backward (outside the op) applies its mask to dXa.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .triton_dy import dy_side
from .triton_gemm import Seg, gemm

__all__ = ["block_fwd", "block_bwd", "check_inputs", "same_shape", "FUSE_DB"]

# dB (and dB_h) inside the dY pass (True, fp32 atomics) or as a split-K GEMM that reads dY
# again (False). See triton_dy's docstring; flip after timing both on the target GPU.
FUSE_DB = True

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(op: str, x: Tensor, weight: Tensor, tensors: dict[str, Optional[Tensor]]) -> None:
    """Same device and one supported float dtype for all operands (as the reference math needs)."""
    if x.dtype not in _FLOATS:
        raise TypeError(f"peftcompile {op} (triton): x dtype {x.dtype} is not supported; "
                        f"use float32, float16 or bfloat16")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"peftcompile {op} (triton): x has {x.shape[-1]} features but weight is "
                         f"{tuple(weight.shape)} ([out, in])")
    bias = tensors.get("bias")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"peftcompile {op} (triton): bias is {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    dy = tensors.get("dy")
    if dy is not None and dy.shape != (*x.shape[:-1], weight.shape[0]):
        raise ValueError(f"peftcompile {op} (triton): dy is {tuple(dy.shape)}, expected "
                         f"{(*x.shape[:-1], weight.shape[0])} (x's leading dims, out)")
    for name, t in {"weight": weight, **tensors}.items():
        if t is None:
            continue
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"peftcompile {op} (triton): {name} is {t.dtype} on {t.device} but x is "
                            f"{x.dtype} on {x.device}; cast the adapter to the input dtype/device")


def same_shape(name: str, t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """``t`` if it is None or has ``like``'s shape (the adapter input xa must match x)."""
    if t is not None and t.shape != like.shape:
        raise ValueError(f"peftcompile triton: {name} is {tuple(t.shape)}, expected x's shape {tuple(like.shape)}")
    return t


def _cfg(config: Optional[dict], kind: str) -> Optional[dict]:
    return (config or {}).get(kind)


def _z(x: Tensor, A3: Tensor, A_h: Optional[Tensor], *, alpha: float, D: Optional[Tensor],
       config: Optional[dict]) -> Tensor:
    """[M, k*r + h]: alpha * Z * D regrouped by output block, then alpha * Zh (h columns)."""
    M, IN = x.shape
    k, in_b, r = A3.shape
    h = A_h.shape[0] if A_h is not None else 0
    zbuf = torch.empty(M, k * r + h, dtype=x.dtype, device=x.device)
    xs = (x.stride(0), x.stride(1))
    # Z_i = X_i @ A3[i]; column j*c + t of group i lands at j*r + i*c + t
    gemm(zbuf, (zbuf.stride(0), 1), r // k, M, r, k,
         [Seg(x, xs, in_b * x.stride(1), A3, (A3.stride(1), A3.stride(2)), A3.stride(0), in_b)],
         dot_dtype=x.dtype, kind="narrow", colscale=D, alpha=alpha, chunk=r // k, chunk_stride=r,
         config=_cfg(config, "narrow"))
    if h:
        zh = zbuf[:, k * r:]
        gemm(zh, (zh.stride(0), 1), 0, M, h, 1, [Seg(x, xs, 0, A_h, (A_h.stride(1), A_h.stride(0)), 0, IN)],
             dot_dtype=x.dtype, kind="narrow", alpha=alpha, config=_cfg(config, "narrow"))
    return zbuf


def block_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], A3: Tensor, B3: Tensor, *,
              scaling: float, D: Optional[Tensor] = None, A_h: Optional[Tensor] = None,
              B_h: Optional[Tensor] = None, xa: Optional[Tensor] = None,
              config: Optional[dict] = None) -> Tensor:
    """y [M, out] = x W^T + b + s * (block adapter + hybrid pair) of xa (default x); 2-D [M, in]."""
    M, IN = x.shape
    OUT = weight.shape[0]
    k, in_b, r = A3.shape
    out_b = B3.shape[2]
    h = A_h.shape[0] if A_h is not None else 0
    dt = x.dtype
    zbuf = _z(x if xa is None else xa, A3, A_h, alpha=scaling, D=D, config=config)  # s * Z * D, s * Zh
    zh = zbuf[:, k * r:]
    # Y_j = [X, Z_j, Zh] @ [W_j^T; B3[j]; B_h[j]^T] + b_j  (one GEMM, K = in + r + h)
    y = torch.empty(M, OUT, dtype=dt, device=x.device)
    segs = [Seg(x, (x.stride(0), x.stride(1)), 0, weight, (weight.stride(1), weight.stride(0)),
                out_b * weight.stride(0), IN),
            Seg(zbuf, (zbuf.stride(0), 1), r, B3, (B3.stride(1), B3.stride(2)), B3.stride(0), r)]
    if h:
        segs.append(Seg(zh, (zh.stride(0), 1), 0, B_h, (B_h.stride(1), B_h.stride(0)),
                        out_b * B_h.stride(0), h))
    gemm(y, (y.stride(0), 1), out_b, M, out_b, k, segs, dot_dtype=dt, kind="main",
         bias=bias, bias_goff=out_b, config=_cfg(config, "main"))
    return y


def block_bwd(dy: Tensor, x: Tensor, weight: Tensor, A3: Tensor, B3: Tensor, dA3: Tensor, dB3: Tensor, *,
              scaling: float, D: Optional[Tensor] = None, dD: Optional[Tensor] = None,
              A_h: Optional[Tensor] = None, B_h: Optional[Tensor] = None, dA_h: Optional[Tensor] = None,
              dB_h: Optional[Tensor] = None, xa: Optional[Tensor] = None,
              config: Optional[dict] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(dx, dxa) [M, in]; accumulates dA3, dB3 (, dD, dA_h, dB_h) into the given zeroed fp32
    buffers. dxa is None when the adapter reads x itself (its grad is then part of dx).

    ``config`` may hold per-kind interpreter block sizes and ``"fuse_db"`` (default FUSE_DB).
    """
    M, IN = x.shape
    OUT = weight.shape[0]
    k, in_b, r = A3.shape
    out_b = B3.shape[2]
    c = r // k
    h = A_h.shape[0] if A_h is not None else 0
    dt = x.dtype
    dev = x.device
    # 1. raw Z (no s, no D) and Zh: the op saves only its inputs, so recompute (M x (k r + h))
    a = x if xa is None else xa
    zbuf = _z(a, A3, A_h, alpha=1.0, D=None, config=config)
    zh = zbuf[:, k * r:]
    # 2. dY side: dZ (regrouped by input block), dB, dD, dZh, dB_h from one read of dY
    dz = torch.empty(M, k * r, dtype=dt, device=dev)
    dzh = torch.zeros(M, h, dtype=torch.float32, device=dev) if h else None
    fuse_db = (config or {}).get("fuse_db", FUSE_DB)
    dy_side(dy, zbuf, B3.transpose(1, 2)[0], B3.stride(0), dz, c,
            dB3, (dB3.stride(2), dB3.stride(1)), dB3.stride(0), G=k, N=out_b, R=r,
            chunk=c, chunk_stride=r, scale=scaling, z_goff=r, D=D, dd=dD,
            zh=zh if h else None, bh=B_h, dzh=dzh, dbh=dB_h, fuse_db=fuse_db, config=_cfg(config, "dy"))
    if not fuse_db:
        # dB3[j]^T [out_b, r] = s * dY_j^T (Z_j * D);  dB_h [out, h] = s * dY^T Zh  (K = tokens)
        gemm(dB3, (dB3.stride(2), dB3.stride(1)), dB3.stride(0), out_b, r, k,
             [Seg(dy, (dy.stride(1), dy.stride(0)), out_b * dy.stride(1), zbuf, (zbuf.stride(0), 1), r, M)],
             dot_dtype=dt, kind="splitk", colscale=D, alpha=scaling, config=_cfg(config, "splitk"))
        if h:
            gemm(dB_h, (dB_h.stride(0), dB_h.stride(1)), 0, OUT, h, 1,
                 [Seg(dy, (dy.stride(1), dy.stride(0)), 0, zh, (zh.stride(0), 1), 0, M)],
                 dot_dtype=dt, kind="splitk", alpha=scaling, config=_cfg(config, "splitk"))
    # 3. dX_i = [dY, dZ_(i), dZh] @ [W[:, i]; A3[i]^T; A_h[:, i]]  (one GEMM, K = out + r + h);
    #    with a separate xa: dX = dY W and dXa_i = [dZ_(i), dZh] @ [A3[i]^T; A_h[:, i]]
    base = Seg(dy, (dy.stride(0), dy.stride(1)), 0, weight, (weight.stride(0), weight.stride(1)),
               in_b * weight.stride(1), OUT)
    adapter = [Seg(dz, (dz.stride(0), 1), r, A3, (A3.stride(2), A3.stride(1)), A3.stride(0), r)]
    if h:
        adapter.append(Seg(dzh, (dzh.stride(0), 1), 0, A_h, (A_h.stride(0), A_h.stride(1)),
                           in_b * A_h.stride(1), h))
    dx = torch.empty(M, IN, dtype=dt, device=dev)
    dxa = None
    if xa is None:
        gemm(dx, (dx.stride(0), 1), in_b, M, in_b, k, [base, *adapter], dot_dtype=dt, kind="main",
             config=_cfg(config, "main"))
    else:
        gemm(dx, (dx.stride(0), 1), in_b, M, in_b, k, [base], dot_dtype=dt, kind="main",
             config=_cfg(config, "main"))
        dxa = torch.empty(M, IN, dtype=xa.dtype, device=dev)
        gemm(dxa, (dxa.stride(0), 1), in_b, M, in_b, k, adapter, dot_dtype=dt, kind="main",
             config=_cfg(config, "main"))
    # 4. dA3[i] = X_i^T dZ_(i)  (K = tokens: split-K into fp32)
    gemm(dA3, (dA3.stride(1), dA3.stride(2)), dA3.stride(0), in_b, r, k,
         [Seg(a, (a.stride(1), a.stride(0)), in_b * a.stride(1), dz, (dz.stride(0), 1), r, M)],
         dot_dtype=dt, kind="splitk", config=_cfg(config, "splitk"))
    if h:
        # dA_h = dZh^T X
        gemm(dA_h, (dA_h.stride(0), dA_h.stride(1)), 0, h, IN, 1,
             [Seg(dzh, (1, dzh.stride(0)), 0, a, (a.stride(0), a.stride(1)), 0, M)],
             dot_dtype=dt, kind="splitk", config=_cfg(config, "splitk"))
    return dx, dxa
