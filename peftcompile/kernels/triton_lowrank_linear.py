"""Triton LoRA / RaSA linear: ``torch.ops.peftcompile.lowrank_linear`` and its backward on CUDA.

Math (x [M, in] flattened from [..., in], W [out, in] any strides, A [r, in], B [out, r],
D [r] optional (RaSA: A = [A_l; A_S], B = [B_l, B_S], s = 1), s = scaling):

    forward   Zs = s * (X A^T) * D                               (narrow GEMM, N = r)
              Y  = [X, Zs] @ [W^T; B^T] + b                      (one GEMM, K = in + r)
    backward  Z  = X A^T (recomputed);  dU = s dY B;  dB = s dY^T (Z*D)
              dD = sum_M dU * Z;  dZ = dU * D                    (one pass over dY)
              dX = [dY, dZ] @ [W; A]                             (one GEMM, K = out + r)
              dA = dZ^T X                                        (split-K GEMM)

LoRA is the k = 1 case of :mod:`peftcompile.kernels.triton_block` (A, B are passed as
the 3-D views A^T[None], B^T[None]; nothing is copied, a Conv1D weight is read transposed).

Memory traffic, design shapes (bf16, M = 4096 tokens, in = 2048, r = 64; MiB moved to
and from DRAM, each tensor counted once, tile re-reads assumed to hit the 50 MB L2;
"unfused" = compiled PEFT: separate GEMMs for base, X A^T, Z B^T, one fused pointwise add):

    out    pass      frozen base   unfused   fused   what the fusion removes
    2048   forward       40.0       122.0     57.5   the [M, out] delta write + re-read,
                                                     the add's read of Y and second write
    8192   forward      112.0       386.8    130.2
    2048   backward      40.0       187.0     91.5   s*dY copy, one dY read (dB and dZ share
    8192   backward     112.0       452.5    212.2   tiles), the dX add (dX written once)

The base GEMMs are compute bound at these sizes (2*M*in*out = 34 / 137 GFLOP); the
adapter adds r/in = 3 % to their K. What is left above the frozen base: the Z pass
(X read again, 16 MiB), a second dY read in backward (the dY side must finish dZ before
dX = dY W + dZ A can run) and dA's read of X. 16.8 MiB of the backward is the Z
recompute, which would go if the op saved Z.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .triton_block import block_bwd, block_fwd, check_inputs, same_shape as _same_shape

__all__ = ["lowrank_fwd_triton", "lowrank_bwd_triton"]


def _check(op: str, x: Tensor, weight: Tensor, A: Tensor, B: Tensor, D: Optional[Tensor], **more) -> None:
    check_inputs(op, x, weight, {"A": A, "B": B, "D": D, **more})
    r = A.shape[0]
    if A.dim() != 2 or A.shape[1] != weight.shape[1] or B.dim() != 2 or B.shape != (weight.shape[0], r):
        raise ValueError(f"peftcompile {op} (triton): expected A [r, in] and B [out, r] for weight "
                         f"{tuple(weight.shape)}, got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if D is not None and D.shape != (r,):
        raise ValueError(f"peftcompile {op} (triton): D must be [r] = [{r}], got {tuple(D.shape)}")


def lowrank_fwd_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                       D: Optional[Tensor], scaling: float, *, xa: Optional[Tensor] = None,
                       config: Optional[dict] = None) -> Tensor:
    """y = x W^T + b + s * ((xa A^T) * D) B^T for x [..., in] (xa: the adapter's input, default x);
    CUDA, or CPU under TRITON_INTERPRET=1."""
    _check("lowrank_linear", x, weight, A, B, D, bias=bias, xa=_same_shape("xa", xa, x))
    x2 = x.reshape(-1, x.shape[-1])
    xa2 = xa.reshape(x2.shape) if xa is not None else None
    y = block_fwd(x2, weight, bias, A.t().unsqueeze(0), B.t().unsqueeze(0), scaling=scaling, D=D, xa=xa2,
                  config=config)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lowrank_bwd_triton(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor, D: Optional[Tensor],
                       scaling: float, *, xa: Optional[Tensor] = None, grad_dtype: Optional[torch.dtype] = None,
                       config: Optional[dict] = None
                       ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(dx, dA, dB, dD, dxa) of lowrank_linear with W frozen; dD is None when D is None, dxa
    when xa is None. ``grad_dtype``: dtype of dA, dB, dD (default A's; their sums are fp32)."""
    _check("lowrank_linear_backward", x, weight, A, B, D, dy=dy, xa=_same_shape("xa", xa, x))
    gd = grad_dtype or A.dtype
    x2 = x.reshape(-1, x.shape[-1])
    xa2 = xa.reshape(x2.shape) if xa is not None else None
    dy2 = dy.reshape(-1, dy.shape[-1])
    f32 = dict(dtype=torch.float32, device=x.device)
    dA = torch.zeros(A.shape, **f32)  # fp32 sums (atomics), cast once at the end
    dB = torch.zeros(B.shape, **f32)
    dD = torch.zeros(D.shape, **f32) if D is not None else None
    dx, dxa = block_bwd(dy2, x2, weight, A.t().unsqueeze(0), B.t().unsqueeze(0),
                        dA.t().unsqueeze(0), dB.t().unsqueeze(0), scaling=scaling, D=D, dD=dD, xa=xa2,
                        config=config)
    return (dx.reshape(x.shape), dA.to(gd), dB.to(gd), dD.to(gd) if D is not None else None,
            dxa.reshape(xa.shape) if xa is not None else None)
