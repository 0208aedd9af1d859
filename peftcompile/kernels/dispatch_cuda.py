"""CUDA kernels of ``torch.ops.peftcompile.*``: the Triton launchers where they apply.

Registered for the CUDA dispatch key only; every other device keeps the reference math of
:mod:`peftcompile.kernels.ops`. The reference is also used on CUDA when Triton is missing,
when dtypes are unsupported or devices mixed (the reference then raises or computes as torch does),
for empty inputs, for a GraLoRA hybrid rank above 128 in backward (its accumulator is not
tiled), and under ``torch.use_deterministic_algorithms(True)`` (the Triton
backward sums dB, dA and dD with fp32 atomics, whose order is not fixed).
Adapters in another float dtype than the base (fp32 adapters on a bf16 base) run the
Triton path with their operands cast to the base dtype (see ``_adapter_in_base_dtype``).
Triton is imported on the first CUDA call, not when peftcompile is imported.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from . import ops

__all__ = ["lowrank_linear_cuda", "lowrank_linear_backward_cuda", "block_lowrank_linear_cuda",
           "block_lowrank_linear_backward_cuda", "use_triton"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(*tensors: Optional[Tensor]) -> bool:
    """Whether the Triton path applies to these operands (first one is x or dy)."""
    if not _HAS_TRITON or torch.are_deterministic_algorithms_enabled():
        return False
    x = tensors[0]
    if x.dtype not in _FLOATS or x.numel() == 0:
        return False
    from .triton_gemm import interpreting  # triton is importable here

    for t in tensors:
        if t is None:
            continue
        if t.dtype != x.dtype or t.device != x.device:
            return False
        if not (t.is_cuda or (t.device.type == "cpu" and interpreting())):
            return False
    return True


def _hybrid_fits(A_h: Optional[Tensor]) -> bool:
    from .triton_dy import MAX_HYBRID

    return A_h is None or A_h.shape[0] <= MAX_HYBRID


def _adapter_in_base_dtype(x: Tensor, xa: Optional[Tensor], *adapter: Optional[Tensor]) -> tuple:
    """The Triton kernels compute in one dtype: adapter tensors of another dtype (fp32 adapters on
    a bf16 / fp16 base) are cast to the base dtype for the launch (the kernels accumulate in
    fp32 and return the adapter grads in the adapter's dtype). This rounds the adapter's
    operands to the base dtype: close to, not bit-equal with, the reference's fp32 delta
    rounded once to the base dtype."""
    dt = x.dtype
    return tuple(t.to(dt) if t is not None and t.dtype != dt else t for t in (xa, *adapter))


@torch.library.register_kernel("peftcompile::lowrank_linear", "cuda")
def lowrank_linear_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                        D: Optional[Tensor], scaling: float, xa: Optional[Tensor] = None) -> Tensor:
    xa_, A_, B_, D_ = _adapter_in_base_dtype(x, xa, A, B, D)
    if not use_triton(x, weight, bias, A_, B_, D_, xa_):
        return ops.lowrank_linear_ref(x, weight, bias, A, B, D, scaling, xa)
    from .triton_lowrank_linear import lowrank_fwd_triton

    return lowrank_fwd_triton(x, weight, bias, A_, B_, D_, scaling, xa=xa_)


@torch.library.register_kernel("peftcompile::lowrank_linear_backward", "cuda")
def lowrank_linear_backward_cuda(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor,
                                 D: Optional[Tensor], scaling: float, xa: Optional[Tensor] = None
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    xa_, A_, B_, D_ = _adapter_in_base_dtype(x, xa, A, B, D)
    if not use_triton(dy, x, weight, A_, B_, D_, xa_):
        dx, dA, dB, dD, dxa = ops.lowrank_linear_bwd_ref(dy, x, weight, A, B, D, scaling, xa)
    else:
        from .triton_lowrank_linear import lowrank_bwd_triton

        dx, dA, dB, dD, dxa = lowrank_bwd_triton(dy, x, weight, A_, B_, D_, scaling, xa=xa_, grad_dtype=A.dtype)
        dxa = dxa.to(xa.dtype) if xa is not None else None
    return dx, dA, dB, ops.none_to_empty(dD, A), ops.none_to_empty(dxa, A)


@torch.library.register_kernel("peftcompile::block_lowrank_linear", "cuda")
def block_lowrank_linear_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                              A_h: Optional[Tensor], B_h: Optional[Tensor], k: int, scaling: float,
                              xa: Optional[Tensor] = None) -> Tensor:
    xa_, A_, B_, Ah_, Bh_ = _adapter_in_base_dtype(x, xa, A, B, A_h, B_h)
    if not use_triton(x, weight, bias, A_, B_, Ah_, Bh_, xa_):
        return ops.block_lowrank_linear_ref(x, weight, bias, A, B, A_h, B_h, k, scaling, xa)
    from .triton_block_lowrank_linear import block_lowrank_fwd_triton

    return block_lowrank_fwd_triton(x, weight, bias, A_, B_, Ah_, Bh_, k, scaling, xa=xa_)


@torch.library.register_kernel("peftcompile::block_lowrank_linear_backward", "cuda")
def block_lowrank_linear_backward_cuda(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor,
                                       A_h: Optional[Tensor], B_h: Optional[Tensor], k: int, scaling: float,
                                       xa: Optional[Tensor] = None
                                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    xa_, A_, B_, Ah_, Bh_ = _adapter_in_base_dtype(x, xa, A, B, A_h, B_h)
    if not use_triton(dy, x, weight, A_, B_, Ah_, Bh_, xa_) or not _hybrid_fits(A_h):
        dx, dA, dB, dA_h, dB_h, dxa = ops.block_lowrank_linear_bwd_ref(dy, x, weight, A, B, A_h, B_h, k, scaling, xa)
    else:
        from .triton_block_lowrank_linear import block_lowrank_bwd_triton

        dx, dA, dB, dA_h, dB_h, dxa = block_lowrank_bwd_triton(dy, x, weight, A_, B_, Ah_, Bh_, k, scaling,
                                                               xa=xa_, grad_dtype=A.dtype)
        dxa = dxa.to(xa.dtype) if xa is not None else None
    return (dx, dA, dB, ops.none_to_empty(dA_h, A), ops.none_to_empty(dB_h, A), ops.none_to_empty(dxa, A))
