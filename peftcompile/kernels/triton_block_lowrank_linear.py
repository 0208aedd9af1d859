"""Triton GraLoRA linear: ``torch.ops.peftcompile.block_lowrank_linear`` and its backward on CUDA.

Math (x [M, in], W [out, in] any strides, A [k, in_b, r], B [k, r, out_b], c = r / k,
hybrid A_h [h, in], B_h [out, h], s = scaling; X_i = input block i, Y_j = output block j):

    forward   Z[:, j*r + i*c : j*r + (i+1)*c] = s * (X_i A[i])[:, j*c : (j+1)*c]
                  (grouped GEMM over i; written so that Z_j = Z[:, j*r:(j+1)*r] is the
                  [M, r] slice that output block j needs: z_{0,j}, ..., z_{k-1,j})
              Zh = s * X A_h^T
              Y_j = [X, Z_j, Zh] @ [W_j^T; B[j]; B_h[j]^T] + b_j   (one GEMM per block j,
                  K = in + r + h; the [M, k, out_b] einsum output is never materialised)
    backward  dZ_j = s dY_j B[j]^T, dB[j] = s Z_j^T dY_j          (same dY_j tiles)
              dZh = s dY B_h, dB_h = s dY^T Zh                     (same tiles again)
              dX_i = [dY, dZ_(i), dZh] @ [W[:, i]; A[i]^T; A_h[:, i]]  (K = out + r + h)
              dA[i] = X_i^T dZ_(i),  dA_h = dZh^T X                (split-K GEMMs)
    dZ is stored regrouped by input block, dZ_(i) = dZ[:, i*r:(i+1)*r].

Hybrid pair: extra K columns of the same GEMMs (a third K segment in forward and dX, an
extra accumulator in the dY pass), not a separate LoRA launch, so dY, X and Y are not read
or written again for it. Its dZh sums over all k output blocks (fp32 atomics).

Memory traffic, design shapes (bf16, M = 4096, in = 2048, r = 64, k = 4, no hybrid; MiB
to and from DRAM, each tensor counted once, tile re-reads assumed to hit the 50 MB L2;
"unfused" = compiled PEFT GraLoRA: base GEMM, x-block bmm, regroup copy of Z, block bmm
writing [M, out], one fused pointwise add; backward likewise plus the regroup of dZ):

    out    pass      frozen base   unfused   fused
    2048   forward       40.0       128.5     60.5
    8192   forward      112.0       393.2    133.2
    2048   backward      40.0       197.0     99.0
    8192   backward     112.0       462.5    219.8

Z is [M, k r] = 2 MiB (k times LoRA's) and is written once and read once per pass; the
regroup is an address computation in the Z epilogue (columns land in chunks of c), so no
copy of Z or dZ exists. The backward recomputes Z (18 MiB of the figures above) because
the op saves only its inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .triton_block import block_bwd, block_fwd, check_inputs, same_shape as _same_shape

__all__ = ["block_lowrank_fwd_triton", "block_lowrank_bwd_triton"]


def _check(op: str, x: Tensor, weight: Tensor, A: Tensor, B: Tensor, A_h: Optional[Tensor],
           B_h: Optional[Tensor], k: int, **more) -> None:
    check_inputs(op, x, weight, {"A": A, "B": B, "A_h": A_h, "B_h": B_h, **more})
    out, IN = weight.shape
    if k <= 0 or IN % k or out % k:
        raise ValueError(f"peftcompile {op} (triton): k={k} must divide in={IN} and out={out}")
    if A.dim() != 3 or B.dim() != 3 or A.shape[:2] != (k, IN // k) or B.shape[0] != k \
            or B.shape[1] != A.shape[2] or B.shape[2] != out // k or A.shape[2] % k:
        raise ValueError(f"peftcompile {op} (triton): expected A [k, in/k, r], B [k, r, out/k] with "
                         f"k | r for weight {tuple(weight.shape)}, k={k}; got A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}")
    if (A_h is None) != (B_h is None):
        raise ValueError(f"peftcompile {op} (triton): pass both hybrid tensors A_h and B_h, or neither")
    if A_h is not None and (A_h.dim() != 2 or A_h.shape[1] != IN or B_h.shape != (out, A_h.shape[0])):
        raise ValueError(f"peftcompile {op} (triton): expected A_h [h, in], B_h [out, h]; got "
                         f"{tuple(A_h.shape)}, {tuple(B_h.shape)}")


def _hybrid(A_h: Optional[Tensor], B_h: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    # a rank-0 hybrid pair is no pair
    if A_h is None or A_h.shape[0] == 0:
        return None, None
    return A_h, B_h


def block_lowrank_fwd_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                              A_h: Optional[Tensor], B_h: Optional[Tensor], k: int, scaling: float, *,
                              xa: Optional[Tensor] = None, config: Optional[dict] = None) -> Tensor:
    """y = x W^T + b + s * (GraLoRA(xa; A, B, k) + (xa A_h^T) B_h^T) for x [..., in] (xa default x)."""
    _check("block_lowrank_linear", x, weight, A, B, A_h, B_h, k, bias=bias, xa=_same_shape("xa", xa, x))
    A_h, B_h = _hybrid(A_h, B_h)
    x2 = x.reshape(-1, x.shape[-1])
    xa2 = xa.reshape(x2.shape) if xa is not None else None
    y = block_fwd(x2, weight, bias, A, B, scaling=scaling, A_h=A_h, B_h=B_h, xa=xa2, config=config)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def block_lowrank_bwd_triton(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor,
                              A_h: Optional[Tensor], B_h: Optional[Tensor], k: int, scaling: float, *,
                              xa: Optional[Tensor] = None, grad_dtype: Optional[torch.dtype] = None,
                              config: Optional[dict] = None
                              ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dA, dB, dA_h, dB_h, dxa) of block_lowrank_linear with W frozen; hybrid grads None
    without a pair, dxa None without xa. ``grad_dtype``: dtype of the adapter grads (default A's)."""
    _check("block_lowrank_linear_backward", x, weight, A, B, A_h, B_h, k, dy=dy, xa=_same_shape("xa", xa, x))
    gd = grad_dtype or A.dtype
    given_h = A_h is not None
    A_h, B_h = _hybrid(A_h, B_h)
    x2 = x.reshape(-1, x.shape[-1])
    xa2 = xa.reshape(x2.shape) if xa is not None else None
    dy2 = dy.reshape(-1, dy.shape[-1])
    f32 = dict(dtype=torch.float32, device=x.device)
    dA, dB = torch.zeros(A.shape, **f32), torch.zeros(B.shape, **f32)
    dA_h = torch.zeros(A_h.shape, **f32) if A_h is not None else None
    dB_h = torch.zeros(B_h.shape, **f32) if B_h is not None else None
    dx, dxa = block_bwd(dy2, x2, weight, A, B, dA, dB, scaling=scaling, A_h=A_h, B_h=B_h,
                        dA_h=dA_h, dB_h=dB_h, xa=xa2, config=config)
    if A_h is not None:
        dA_h, dB_h = dA_h.to(gd), dB_h.to(gd)
    elif given_h:  # rank-0 pair: zero-size grads of the right shapes
        dA_h = torch.zeros(0, x.shape[-1], dtype=gd, device=x.device)
        dB_h = torch.zeros(weight.shape[0], 0, dtype=gd, device=x.device)
    return (dx.reshape(x.shape), dA.to(gd), dB.to(gd), dA_h, dB_h,
            dxa.reshape(xa.shape) if xa is not None else None)
