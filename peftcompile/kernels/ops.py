"""``torch.ops.peftcompile.*``: one op per low-rank product computing ``base(x) + delta(x)``.

These are what the compile backend puts in place of a tagged ``linear + delta`` region.
Each op has a fake (meta) kernel for tracing, an autograd formula that never computes
the frozen base's dW unless W really requires grad, and a reference implementation
(the products of :mod:`peftcompile.methods.lowrank`, which the methods' reference math is
written with) used on every device without a faster kernel.
Faster kernels (Triton on CUDA) register for the same op names.

Shapes: x [..., in]; weight [out, in] (may be a transposed view, e.g. of a Conv1D
weight); bias [out] or None; scaling is a python float.

Adapter input and dtypes (what ``SiteAdapterSet`` computes in eager): the adapter reads
``xa`` when given (the output of the adapter's dropout, a separate graph node whose RNG
is the model's own), else ``x.to(A.dtype)``; its product runs in A's dtype and is cast
to the base output's dtype before the add: ``y = base(x) + delta(xa).to(y.dtype)``. So
fp32 adapters on a bf16 / fp16 base (PEFT's default dtype policy) are the same op; x,
weight and bias share one dtype, xa, A, B, D (and A_h, B_h) another.

lowrank_linear:    y = x W^T + b + s * ((x A^T) * D) B^T      A [r, in], B [out, r], D [r] or None
                (RaSA is this with A = [A_l; A_S], B = [B_l, B_S], s = 1)
block_lowrank_linear: y = x W^T + b + s * (blocks(x; A, B, k) + (x A_h^T) B_h^T)   (GraLoRA)
                A [k, in/k, r], B [k, r, out/k]; A_h [h, in], B_h [out, h] or None
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..methods.lowrank import block_lowrank, block_regroup_back, block_z, lowrank

__all__ = ["lowrank_linear", "block_lowrank_linear", "lowrank_linear_backward", "block_lowrank_linear_backward",
           "lowrank_linear_ref", "block_lowrank_linear_ref", "REFERENCES", "empty_to_none", "none_to_empty"]


def none_to_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom ops cannot return None: an absent tensor travels as an empty one."""
    return like.new_empty(0) if t is None else t


def empty_to_none(t: Optional[Tensor]) -> Optional[Tensor]:
    """Inverse of :func:`none_to_empty` for optional tensor outputs."""
    return None if t is None or t.numel() == 0 else t


# ---------------------------------------------------------------- reference math
def _adapter_input(x: Tensor, xa: Optional[Tensor], A: Tensor) -> Tensor:
    return xa if xa is not None else x.to(A.dtype)


def lowrank_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                       D: Optional[Tensor], scaling: float, xa: Optional[Tensor] = None) -> Tensor:
    y = F.linear(x, weight, bias)
    return y + lowrank(_adapter_input(x, xa, A), A, B, scaling, D).to(y.dtype)


def block_lowrank_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                             A_h: Optional[Tensor], B_h: Optional[Tensor], k: int, scaling: float,
                             xa: Optional[Tensor] = None) -> Tensor:
    y = F.linear(x, weight, bias)
    return y + block_lowrank(_adapter_input(x, xa, A), A, B, k, scaling, A_h, B_h).to(y.dtype)


def _split_dx(dx_base: Tensor, da: Tensor, x: Tensor, xa: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """dx, dxa: the adapter's input grad goes to xa when it is a separate input, else into dx
    (through the cast x.to(A.dtype), as eager autograd does)."""
    if xa is not None:
        return dx_base.reshape(x.shape), da.reshape(xa.shape)
    return (dx_base + da.to(dx_base.dtype)).reshape(x.shape), None


# Backward formulas (base frozen: no dW unless asked). For lora, with a = xa (or x), z = a A^T,
# u = z*D, dya = dy in the adapter's dtype:
#   dB = s * dya^T u;  du = s * dya B;  dD = sum_M du*z;  dz = du*D;  dA = dz^T a;
#   dx = dy W (+ dz A when xa is None);  dxa = dz A
def lowrank_linear_bwd_ref(dy, x, weight, A, B, D, scaling, xa=None):
    a2 = _adapter_input(x, xa, A).reshape(-1, A.shape[1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dya = dy2.to(A.dtype)
    z = a2 @ A.t()
    u = z * D if D is not None else z
    dB = (dya.t() @ u) * scaling
    du = (dya @ B) * scaling
    dD = (du * z).sum(0) if D is not None else None
    dz = du * D if D is not None else du
    dA = dz.t() @ a2
    dx, dxa = _split_dx(dy2 @ weight, dz @ A, x, xa)
    return dx, dA, dB, dD, dxa


def block_lowrank_linear_bwd_ref(dy, x, weight, A, B, A_h, B_h, k, scaling, xa=None):
    a2 = _adapter_input(x, xa, A).reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dya = dy2.to(A.dtype)
    M = a2.shape[0]
    z = block_z(a2, A, k)  # [M, k(j), r]
    dyb = dya.reshape(M, k, -1)  # [M, k(j), out_b]
    dB = torch.einsum("mjr,mjo->jro", z, dyb) * scaling
    dz = torch.einsum("mjo,jro->mjr", dyb, B) * scaling
    dzi = block_regroup_back(dz, k)  # [M, k(i), r]
    ab = a2.reshape(M, k, -1)  # [M, k(i), in_b]
    dA = torch.einsum("mip,mir->ipr", ab, dzi)
    da = torch.einsum("mir,ipr->mip", dzi, A).reshape(M, -1)
    dA_h = dB_h = None
    if A_h is not None:
        zh = a2 @ A_h.t()
        dB_h = (dya.t() @ zh) * scaling
        dzh = (dya @ B_h) * scaling
        dA_h = dzh.t() @ a2
        da = da + dzh @ A_h
    dx, dxa = _split_dx(dy2 @ weight, da, x, xa)
    return dx, dA, dB, dA_h, dB_h, dxa


# ---------------------------------------------------------------- ops
@torch.library.custom_op("peftcompile::lowrank_linear", mutates_args=())
def lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                   D: Optional[Tensor], scaling: float, xa: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b + (s * ((xa A^T) * D) B^T).to(y.dtype) (D optional; xa defaults to x.to(A.dtype))."""
    return lowrank_linear_ref(x, weight, bias, A, B, D, scaling, xa)


@lowrank_linear.register_fake
def _(x, weight, bias, A, B, D, scaling, xa=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("peftcompile::lowrank_linear_backward", mutates_args=())
def lowrank_linear_backward(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor,
                            D: Optional[Tensor], scaling: float, xa: Optional[Tensor] = None
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dD, dxa); dD is empty when D is None, dxa when xa is None."""
    dx, dA, dB, dD, dxa = lowrank_linear_bwd_ref(dy, x, weight, A, B, D, scaling, xa)
    return dx, dA, dB, none_to_empty(dD, A), none_to_empty(dxa, A)


@lowrank_linear_backward.register_fake
def _(dy, x, weight, A, B, D, scaling, xa=None):
    return (torch.empty_like(x), torch.empty_like(A), torch.empty_like(B),
            none_to_empty(None if D is None else torch.empty_like(D), A),
            none_to_empty(None if xa is None else torch.empty_like(xa), A))


def _base_grads(ctx, dy, x, has_bias: bool):
    """dW, db only when the (normally frozen) base really requires them."""
    dW = db = None
    if ctx.needs_input_grad[1]:
        dW = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    if has_bias and ctx.needs_input_grad[2]:
        db = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dW, db


def _lowrank_setup(ctx, inputs, output):
    x, weight, bias, A, B, D, scaling, xa = inputs
    ctx.save_for_backward(x, weight, A, B, D, xa)
    ctx.scaling, ctx.has_bias = scaling, bias is not None


def _lowrank_backward(ctx, dy):
    x, weight, A, B, D, xa = ctx.saved_tensors
    dx, dA, dB, dD, dxa = torch.ops.peftcompile.lowrank_linear_backward(dy, x, weight, A, B, D, ctx.scaling, xa)
    dW, db = _base_grads(ctx, dy, x, ctx.has_bias)
    return (dx, dW, db, dA, dB, (dD if D is not None else None), None,
            (dxa if xa is not None else None))


lowrank_linear.register_autograd(_lowrank_backward, setup_context=_lowrank_setup)


@torch.library.custom_op("peftcompile::block_lowrank_linear", mutates_args=())
def block_lowrank_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                         A_h: Optional[Tensor], B_h: Optional[Tensor], k: int, scaling: float,
                         xa: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b + (s * (blocks(xa; A, B, k) + (xa A_h^T) B_h^T)).to(y.dtype)."""
    return block_lowrank_linear_ref(x, weight, bias, A, B, A_h, B_h, k, scaling, xa)


@block_lowrank_linear.register_fake
def _(x, weight, bias, A, B, A_h, B_h, k, scaling, xa=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("peftcompile::block_lowrank_linear_backward", mutates_args=())
def block_lowrank_linear_backward(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor,
                                  A_h: Optional[Tensor], B_h: Optional[Tensor], k: int, scaling: float,
                                  xa: Optional[Tensor] = None
                                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dA_h, dB_h, dxa); the hybrid grads are empty when A_h is None, dxa when xa is."""
    dx, dA, dB, dA_h, dB_h, dxa = block_lowrank_linear_bwd_ref(dy, x, weight, A, B, A_h, B_h, k, scaling, xa)
    return dx, dA, dB, none_to_empty(dA_h, A), none_to_empty(dB_h, A), none_to_empty(dxa, A)


@block_lowrank_linear_backward.register_fake
def _(dy, x, weight, A, B, A_h, B_h, k, scaling, xa=None):
    hyb = A_h is not None
    return (torch.empty_like(x), torch.empty_like(A), torch.empty_like(B),
            none_to_empty(torch.empty_like(A_h) if hyb else None, A),
            none_to_empty(torch.empty_like(B_h) if hyb else None, A),
            none_to_empty(None if xa is None else torch.empty_like(xa), A))


def _block_setup(ctx, inputs, output):
    x, weight, bias, A, B, A_h, B_h, k, scaling, xa = inputs
    ctx.save_for_backward(x, weight, A, B, A_h, B_h, xa)
    ctx.k, ctx.scaling, ctx.has_bias = k, scaling, bias is not None


def _block_backward(ctx, dy):
    x, weight, A, B, A_h, B_h, xa = ctx.saved_tensors
    dx, dA, dB, dA_h, dB_h, dxa = torch.ops.peftcompile.block_lowrank_linear_backward(
        dy, x, weight, A, B, A_h, B_h, ctx.k, ctx.scaling, xa)
    dW, db = _base_grads(ctx, dy, x, ctx.has_bias)
    hyb = A_h is not None
    return (dx, dW, db, dA, dB, (dA_h if hyb else None), (dB_h if hyb else None), None, None,
            (dxa if xa is not None else None))


block_lowrank_linear.register_autograd(_block_backward, setup_context=_block_setup)


#: Each fused op and its reference math: the decomposition the backend uses where no device
#: kernel is registered. The *_backward ops return empty tensors for absent grads.
REFERENCES = {
    torch.ops.peftcompile.lowrank_linear.default: lowrank_linear_ref,
    torch.ops.peftcompile.block_lowrank_linear.default: block_lowrank_linear_ref,
    torch.ops.peftcompile.lowrank_linear_backward.default:
        lambda dy, x, w, A, B, D, s, xa=None: _bwd_tuple(lowrank_linear_bwd_ref(dy, x, w, A, B, D, s, xa)),
    torch.ops.peftcompile.block_lowrank_linear_backward.default:
        lambda dy, x, w, A, B, A_h, B_h, k, s, xa=None: _bwd_tuple(
            block_lowrank_linear_bwd_ref(dy, x, w, A, B, A_h, B_h, k, s, xa)),
}


def _bwd_tuple(grads: tuple) -> tuple:
    ref = grads[1]
    return tuple(none_to_empty(g, ref) for g in grads)
