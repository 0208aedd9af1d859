"""``torch.ops.peftcompile.*``: one op per method family computing ``base(x) + delta(x)``.

These are what the compile backend puts in place of a tagged ``linear + delta`` region.
Each op has a fake (meta) kernel for tracing, an autograd formula that never computes
the frozen base's dW unless W really requires grad, and a reference implementation
(the math of :mod:`peftcompile.methods`) used on every device without a faster kernel.
Faster kernels (Triton on CUDA) register for the same op names.

Shapes: x [..., in]; weight [out, in] (may be a transposed view, e.g. of a Conv1D
weight); bias [out] or None; scaling is a python float.

lora_linear:    y = x W^T + b + s * ((x A^T) * D) B^T      A [r, in], B [out, r], D [r] or None
                (RaSA is this with A = [A_l; A_S], B = [B_l, B_S], s = 1)
gralora_linear: y = x W^T + b + s * (gralora(x; A, B, k) + (x A_h^T) B_h^T)
                A [k, in/k, r], B [k, r, out/k]; A_h [h, in], B_h [out, h] or None
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..methods.gralora import gralora_z

__all__ = ["lora_linear", "gralora_linear", "lora_linear_backward", "gralora_linear_backward",
           "lora_linear_ref", "gralora_linear_ref", "gralora_regroup_back"]


# ---------------------------------------------------------------- reference math
def lora_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                    D: Optional[Tensor], scaling: float) -> Tensor:
    z = x @ A.t()  # [..., r]
    if D is not None:
        z = z * D
    return F.linear(x, weight, bias) + (z @ B.t()) * scaling


def gralora_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                       A_h: Optional[Tensor], B_h: Optional[Tensor], k: int, scaling: float) -> Tensor:
    z = gralora_z(x, A, k)  # [..., k(j), r]
    d = torch.einsum("...jr,jro->...jo", z, B).reshape(*x.shape[:-1], -1)
    if A_h is not None:
        d = d + (x @ A_h.t()) @ B_h.t()
    return F.linear(x, weight, bias) + d * scaling


def gralora_regroup_back(dz: Tensor, k: int) -> Tensor:
    """Inverse of gralora_z's regrouping: [M, k(j), r] (chunks by input block) -> [M, k(i), r]."""
    M, _, r = dz.shape
    s = r // k
    return dz.reshape(M, k, k, s).transpose(1, 2).reshape(M, k, r)


# Backward formulas (base frozen: no dW unless asked). For lora, with z = x A^T, u = z*D:
#   dB = s * dy^T u;  du = s * dy B;  dD = sum_M du*z;  dz = du*D;  dA = dz^T x;  dx = dy W + dz A
def _lora_bwd_ref(dy, x, weight, A, B, D, scaling):
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    z = x2 @ A.t()
    u = z * D if D is not None else z
    dB = (dy2.t() @ u) * scaling
    du = (dy2 @ B) * scaling
    dD = (du * z).sum(0) if D is not None else None
    dz = du * D if D is not None else du
    dA = dz.t() @ x2
    dx = dy2 @ weight + dz @ A
    return dx.reshape(x.shape), dA, dB, dD


def _gralora_bwd_ref(dy, x, weight, A, B, A_h, B_h, k, scaling):
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    M = x2.shape[0]
    z = gralora_z(x2, A, k)  # [M, k(j), r]
    dyb = dy2.reshape(M, k, -1)  # [M, k(j), out_b]
    dB = torch.einsum("mjr,mjo->jro", z, dyb) * scaling
    dz = torch.einsum("mjo,jro->mjr", dyb, B) * scaling
    dzi = gralora_regroup_back(dz, k)  # [M, k(i), r]
    xb = x2.reshape(M, k, -1)  # [M, k(i), in_b]
    dA = torch.einsum("mip,mir->ipr", xb, dzi)
    dx = dy2 @ weight + torch.einsum("mir,ipr->mip", dzi, A).reshape(M, -1)
    dA_h = dB_h = None
    if A_h is not None:
        zh = x2 @ A_h.t()
        dB_h = (dy2.t() @ zh) * scaling
        dzh = (dy2 @ B_h) * scaling
        dA_h = dzh.t() @ x2
        dx = dx + dzh @ A_h
    return dx.reshape(x.shape), dA, dB, dA_h, dB_h


# ---------------------------------------------------------------- ops
@torch.library.custom_op("peftcompile::lora_linear", mutates_args=())
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                D: Optional[Tensor], scaling: float) -> Tensor:
    """y = x W^T + b + s * ((x A^T) * D) B^T (D optional)."""
    return lora_linear_ref(x, weight, bias, A, B, D, scaling)


@lora_linear.register_fake
def _(x, weight, bias, A, B, D, scaling):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("peftcompile::lora_linear_backward", mutates_args=())
def lora_linear_backward(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor,
                         D: Optional[Tensor], scaling: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dD); dD is empty when D is None."""
    dx, dA, dB, dD = _lora_bwd_ref(dy, x, weight, A, B, D, scaling)
    return dx, dA, dB, (dD if dD is not None else A.new_empty(0))


@lora_linear_backward.register_fake
def _(dy, x, weight, A, B, D, scaling):
    return (torch.empty_like(x), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(D) if D is not None else A.new_empty(0))


def _base_grads(ctx, dy, x, has_bias: bool):
    """dW, db only when the (normally frozen) base really requires them."""
    dW = db = None
    if ctx.needs_input_grad[1]:
        dW = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    if has_bias and ctx.needs_input_grad[2]:
        db = dy.reshape(-1, dy.shape[-1]).sum(0)
    return dW, db


def _lora_setup(ctx, inputs, output):
    x, weight, bias, A, B, D, scaling = inputs
    ctx.save_for_backward(x, weight, A, B, D)
    ctx.scaling, ctx.has_bias = scaling, bias is not None


def _lora_backward(ctx, dy):
    x, weight, A, B, D = ctx.saved_tensors
    dx, dA, dB, dD = torch.ops.peftcompile.lora_linear_backward(dy, x, weight, A, B, D, ctx.scaling)
    dW, db = _base_grads(ctx, dy, x, ctx.has_bias)
    return dx, dW, db, dA, dB, (dD if D is not None else None), None


lora_linear.register_autograd(_lora_backward, setup_context=_lora_setup)


@torch.library.custom_op("peftcompile::gralora_linear", mutates_args=())
def gralora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
                   A_h: Optional[Tensor], B_h: Optional[Tensor], k: int, scaling: float) -> Tensor:
    """y = x W^T + b + s * (GraLoRA(x; A, B, k) + (x A_h^T) B_h^T)."""
    return gralora_linear_ref(x, weight, bias, A, B, A_h, B_h, k, scaling)


@gralora_linear.register_fake
def _(x, weight, bias, A, B, A_h, B_h, k, scaling):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("peftcompile::gralora_linear_backward", mutates_args=())
def gralora_linear_backward(dy: Tensor, x: Tensor, weight: Tensor, A: Tensor, B: Tensor,
                            A_h: Optional[Tensor], B_h: Optional[Tensor], k: int,
                            scaling: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dA_h, dB_h); the hybrid grads are empty when A_h is None."""
    dx, dA, dB, dA_h, dB_h = _gralora_bwd_ref(dy, x, weight, A, B, A_h, B_h, k, scaling)
    hyb = dA_h is not None
    return dx, dA, dB, (dA_h if hyb else A.new_empty(0)), (dB_h if hyb else A.new_empty(0))


@gralora_linear_backward.register_fake
def _(dy, x, weight, A, B, A_h, B_h, k, scaling):
    hyb = A_h is not None
    return (torch.empty_like(x), torch.empty_like(A), torch.empty_like(B),
            torch.empty_like(A_h) if hyb else A.new_empty(0), torch.empty_like(B_h) if hyb else A.new_empty(0))


def _gralora_setup(ctx, inputs, output):
    x, weight, bias, A, B, A_h, B_h, k, scaling = inputs
    ctx.save_for_backward(x, weight, A, B, A_h, B_h)
    ctx.k, ctx.scaling, ctx.has_bias = k, scaling, bias is not None


def _gralora_backward(ctx, dy):
    x, weight, A, B, A_h, B_h = ctx.saved_tensors
    dx, dA, dB, dA_h, dB_h = torch.ops.peftcompile.gralora_linear_backward(
        dy, x, weight, A, B, A_h, B_h, ctx.k, ctx.scaling)
    dW, db = _base_grads(ctx, dy, x, ctx.has_bias)
    hyb = A_h is not None
    return dx, dW, db, dA, dB, (dA_h if hyb else None), (dB_h if hyb else None), None, None


gralora_linear.register_autograd(_gralora_backward, setup_context=_gralora_setup)
