"""Forward and backward of a block low-rank adapter on a frozen linear, as Triton launches.

One core serves every method: GraLoRA (k x k blocks, optional hybrid LoRA pair), LoRA
(k = 1) and RaSA (k = 1 with a diagonal D). Shapes (the ``*_3`` tensors are 3-D views,
any strides): x [M, in], W [out, in], A3 [k, in_b, r], B3 [k, r, out_b], s = scaling,
c = r / k, A_h [h, in], B_h [out, h].

    Z[:, j*r + i*c + t] = (X_i @ A3[i])[:, j*c + t] * D      (launch 1, grouped over i;
                                                             columns regrouped so that
    Zh = X @ A_h^T                                            Z_j = Z[:, j*r:(j+1)*r])
    Y_j = X @ W_j^T + s * Z_j @ B3[j] + s * Zh @ B_h[j]^T + b_j   (launch 2, grouped over j:
                                                             one GEMM, K = in + r + h)
Backward (W frozen; Z recomputed because the op saves only its inputs):
    dU_j = s dY_j B3[j]^T;  dB3[j] = s Z_j^T dY_j;  dD = sum_M dU*Z;  dZ_j = dU_j * D
    dZh = s sum_j dY_j B_h[j];  dB_h = s dY^T Zh                  (launch 2: dY side, fused)
    dX_i = dY W[:, i] + dZ_(i) A3[i]^T + dZh A_h[:, i]            (launch 3: K = out + r + h)
    dA3[i] = X_i^T dZ_(i);  dA_h = dZh^T X                        (launch 4(+5): split-K)
dZ is written by launch 2 already regrouped by input block (dZ_(i) = dZ[:, i*r:(i+1)*r]).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .triton_dy import dy_side
from .triton_gemm import Seg, gemm

__all__ = ["block_fwd", "block_bwd", "check_inputs"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(op: str, x: Tensor, weight: Tensor, tensors: dict[str, Optional[Tensor]]) -> None:
    """Same device and one supported float dtype for all operands (as the reference math needs)."""
    if x.dtype not in _FLOATS:
        raise TypeError(f"peftcompile {op} (triton): x dtype {x.dtype} is not supported; "
                        f"use float32, float16 or bfloat16")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"peftcompile {op} (triton): x has {x.shape[-1]} features but weight is "
                         f"{tuple(weight.shape)} ([out, in])")
    for name, t in {"weight": weight, **tensors}.items():
        if t is None:
            continue
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"peftcompile {op} (triton): {name} is {t.dtype} on {t.device} but x is "
                            f"{x.dtype} on {x.device}; cast the adapter to the input dtype/device")


def _cfg(config: Optional[dict], kind: str) -> Optional[dict]:
    return (config or {}).get(kind)


def block_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], A3: Tensor, B3: Tensor, *,
              scaling: float, D: Optional[Tensor] = None, A_h: Optional[Tensor] = None,
              B_h: Optional[Tensor] = None, config: Optional[dict] = None) -> Tensor:
    """y [M, out] = x W^T + b + s * (block adapter + hybrid pair); x is 2-D [M, in]."""
    M, IN = x.shape
    OUT = weight.shape[0]
    k, in_b, r = A3.shape
    out_b = B3.shape[2]
    c = r // k
    h = A_h.shape[0] if A_h is not None else 0
    dt = x.dtype
    # Z (+ Zh in the trailing h columns), already scaled by s (and D): [M, k*r + h]
    zbuf = torch.empty(M, k * r + h, dtype=dt, device=x.device)
    gemm(zbuf, (zbuf.stride(0), 1), c, M, r, k,
         [Seg(x, (x.stride(0), x.stride(1)), in_b * x.stride(1), A3, (A3.stride(1), A3.stride(2)), A3.stride(0), in_b)],
         dot_dtype=dt, kind="narrow", colscale=D, alpha=scaling, chunk=c, chunk_stride=r,
         config=_cfg(config, "narrow"))
    zh = zbuf[:, k * r:]
    if h:
        gemm(zh, (zh.stride(0), 1), 0, M, h, 1,
             [Seg(x, (x.stride(0), x.stride(1)), 0, A_h, (A_h.stride(1), A_h.stride(0)), 0, IN)],
             dot_dtype=dt, kind="narrow", alpha=scaling, config=_cfg(config, "narrow"))
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
              dB_h: Optional[Tensor] = None, config: Optional[dict] = None) -> Tensor:
    """dx [M, in]; accumulates dA3, dB3 (, dD, dA_h, dB_h) into the given zeroed fp32 buffers."""
    M, IN = x.shape
    OUT = weight.shape[0]
    k, in_b, r = A3.shape
    out_b = B3.shape[2]
    c = r // k
    h = A_h.shape[0] if A_h is not None else 0
    dt = x.dtype
    dev = x.device
    # 1. raw Z (no s, no D) and Zh: the op saves only its inputs, so recompute (M x (k r + h))
    zbuf = torch.empty(M, k * r + h, dtype=dt, device=dev)
    gemm(zbuf, (zbuf.stride(0), 1), c, M, r, k,
         [Seg(x, (x.stride(0), x.stride(1)), in_b * x.stride(1), A3, (A3.stride(1), A3.stride(2)), A3.stride(0), in_b)],
         dot_dtype=dt, kind="narrow", chunk=c, chunk_stride=r, config=_cfg(config, "narrow"))
    zh = zbuf[:, k * r:]
    if h:
        gemm(zh, (zh.stride(0), 1), 0, M, h, 1,
             [Seg(x, (x.stride(0), x.stride(1)), 0, A_h, (A_h.stride(1), A_h.stride(0)), 0, IN)],
             dot_dtype=dt, kind="narrow", config=_cfg(config, "narrow"))
    # 2. dY side: dZ (regrouped by input block), dB, dD, dZh, dB_h from one read of dY
    dz = torch.empty(M, k * r, dtype=dt, device=dev)
    dzh = torch.zeros(M, h, dtype=torch.float32, device=dev) if h else None
    dy_side(dy, zbuf, B3.transpose(1, 2)[0], B3.stride(0), dz, c,
            dB3, (dB3.stride(2), dB3.stride(1)), dB3.stride(0), G=k, N=out_b, R=r,
            chunk=c, chunk_stride=r, scale=scaling, z_goff=r, D=D, dd=dD,
            zh=zh if h else None, bh=B_h, dzh=dzh, dbh=dB_h, config=_cfg(config, "dy"))
    # 3. dX_i = [dY, dZ_(i), dZh] @ [W[:, i]; A3[i]^T; A_h[:, i]]  (one GEMM, K = out + r + h)
    dx = torch.empty(M, IN, dtype=dt, device=dev)
    segs = [Seg(dy, (dy.stride(0), dy.stride(1)), 0, weight, (weight.stride(0), weight.stride(1)),
                in_b * weight.stride(1), OUT),
            Seg(dz, (dz.stride(0), 1), r, A3, (A3.stride(2), A3.stride(1)), A3.stride(0), r)]
    if h:
        segs.append(Seg(dzh, (dzh.stride(0), 1), 0, A_h, (A_h.stride(0), A_h.stride(1)),
                        in_b * A_h.stride(1), h))
    gemm(dx, (dx.stride(0), 1), in_b, M, in_b, k, segs, dot_dtype=dt, kind="main",
         config=_cfg(config, "main"))
    # 4. dA3[i] = X_i^T dZ_(i)  (K = tokens: split-K into fp32)
    gemm(dA3, (dA3.stride(1), dA3.stride(2)), dA3.stride(0), in_b, r, k,
         [Seg(x, (x.stride(1), x.stride(0)), in_b * x.stride(1), dz, (dz.stride(0), 1), r, M)],
         dot_dtype=dt, kind="splitk", config=_cfg(config, "splitk"))
    if h:
        # dA_h = dZh^T X
        gemm(dA_h, (dA_h.stride(0), dA_h.stride(1)), 0, h, IN, 1,
             [Seg(dzh, (1, dzh.stride(0)), 0, x, (x.stride(0), x.stride(1)), 0, M)],
             dot_dtype=dt, kind="splitk", config=_cfg(config, "splitk"))
    return dx
