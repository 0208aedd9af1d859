"""The two low-rank products every method is written with (pure torch on ``[..., in]``).

``lowrank``:        s * ((x A^T) * D) B^T              A [R, in], B [out, R], D [R] or None
``block_lowrank``:  s * (blocks(x; A, B, k) + (x A_h^T) B_h^T)
                    A [k, in/k, r], B [k, r, out/k]; optional pair A_h [h, in], B_h [out, h]

Methods compose their reference math from these (LoRA: ``lowrank`` with D = None; RaSA:
``lowrank`` of the concatenated private/shared factors with its diagonal; GraLoRA:
``block_lowrank``), and the fused ops of :mod:`peftcompile.kernels.ops` use the same
functions as their reference implementation, so there is one definition of the math.

Block product: x is split into k input blocks x_i; z_i = x_i @ A[i] is cut into k chunks
of size c = r / k; output block j sums chunk j of every z_i through B[j]:
``y_j = sum_i z_{i,j} @ B[j][i*c:(i+1)*c]``. Every (out j, in i) block of the equivalent
weight has rank c, so its rank is up to k * r with the parameters of a rank-r LoRA.

The same products at the other site kinds (the parameters are those of the linear site):
``nn.Embedding`` (in = num_embeddings; the delta of integer ids is the linear delta of their
one-hot rows, gathered: ``lowrank_embed``, ``block_lowrank_embed``) and ``nn.Conv1d/2d/3d``
(in = C_in * prod(kernel), the conv as a linear on unfolded patches: ``lowrank_conv``,
``block_lowrank_conv``).
"""

from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lowrank", "lowrank_weight", "block_z", "block_regroup_back", "block_lowrank",
           "block_lowrank_weight", "block_as_lowrank", "lowrank_embed", "block_lowrank_embed", "conv_fn",
           "lowrank_conv", "block_lowrank_conv", "block_conv_grouped", "dense_conv"]


def lowrank(x: Tensor, A: Tensor, B: Tensor, scaling: float, D: Optional[Tensor] = None) -> Tensor:
    """s * ((x A^T) * D) B^T: [..., in] -> [..., out]."""
    z = x @ A.t()  # [..., R]
    if D is not None:
        z = z * D
    return (z @ B.t()) * scaling


def lowrank_weight(A: Tensor, B: Tensor, scaling: float, D: Optional[Tensor] = None) -> Tensor:
    """The [out, in] weight of :func:`lowrank`: s * B diag(D) A."""
    return ((B * D) if D is not None else B) @ A * scaling


def block_z(x: Tensor, A: Tensor, k: int) -> Tensor:
    """The [..., k, r] intermediate, already regrouped by output block.

    z[..., j, i*c:(i+1)*c] = x_i @ A[i][:, j*c:(j+1)*c]  (chunk j of input block i).
    """
    lead = x.shape[:-1]
    in_b, r = A.shape[1], A.shape[2]
    c = r // k
    z = torch.einsum("...ni,nir->...nr", x.reshape(*lead, k, in_b), A)  # [..., k(i), r]
    return z.reshape(*lead, k, k, c).transpose(-3, -2).reshape(*lead, k, r)  # [..., k(j), r]


def block_regroup_back(dz: Tensor, k: int) -> Tensor:
    """Inverse of block_z's regrouping: [M, k(j), r] (by output block) -> [M, k(i), r]."""
    M, _, r = dz.shape
    c = r // k
    return dz.reshape(M, k, k, c).transpose(1, 2).reshape(M, k, r)


def block_lowrank(x: Tensor, A: Tensor, B: Tensor, k: int, scaling: float,
                  A_h: Optional[Tensor] = None, B_h: Optional[Tensor] = None) -> Tensor:
    """s * (block product + (x A_h^T) B_h^T): [..., in] -> [..., out]."""
    z = block_z(x, A, k)
    y = torch.einsum("...jr,jro->...jo", z, B).reshape(*x.shape[:-1], B.shape[0] * B.shape[2])
    if A_h is not None:
        y = y + (x @ A_h.t()) @ B_h.t()
    return y * scaling


def block_lowrank_weight(A: Tensor, B: Tensor, k: int, scaling: float,
                         A_h: Optional[Tensor] = None, B_h: Optional[Tensor] = None) -> Tensor:
    """The [out, in] weight of :func:`block_lowrank`."""
    _, in_b, r = A.shape
    out_b = B.shape[2]
    c = r // k
    A4 = A.reshape(k, in_b, k, c)  # [i, p, j, c]
    B4 = B.reshape(k, k, c, out_b)  # [j, i, c, o]
    dw = torch.einsum("ipjc,jico->ipjo", A4, B4).reshape(k * in_b, k * out_b).t()  # [out, in]
    if A_h is not None:
        dw = dw + B_h @ A_h
    return dw * scaling


def block_as_lowrank(A: Tensor, B: Tensor, k: int, scaling: float, A_h: Optional[Tensor] = None,
                     B_h: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The same map as :func:`block_lowrank`, exactly, as a plain low-rank pair.

    Returns (A_full [k*r (+h), in], B_full [out, k*r (+h)]) with ``s`` folded into B_full:
    row ``i*r + j*c + t`` of A_full holds column ``j*c + t`` of A[i] in input block i's
    columns (zeros elsewhere), and column ``i*r + j*c + t`` of B_full holds row ``i*c + t``
    of B[j] in output block j's rows. Only structural zeros are added, so
    ``lowrank(x, A_full, B_full, 1)`` equals ``block_lowrank`` up to summation order.
    """
    _, in_b, r = A.shape
    out_b = B.shape[2]
    c = r // k
    A_full = A.new_zeros(k, r, k, in_b)  # [i, (j, t), i', p], only i' = i filled
    B_full = B.new_zeros(k, out_b, k, r)  # [j, o, i, (j', t)], only j' = j filled
    for i in range(k):
        A_full[i, :, i, :] = A[i].t()  # [r, in_b]: row j*c+t = A[i][:, j*c+t]
    for j in range(k):
        Bj = B[j].reshape(k, c, out_b)  # [i, t, o]: row i*c+t of B[j]
        for i in range(k):
            B_full[j, :, i, j * c:(j + 1) * c] = Bj[i].t()
    A_full = A_full.reshape(k * r, k * in_b)
    B_full = B_full.reshape(k * out_b, k * r) * scaling
    if A_h is not None:
        A_full = torch.cat([A_full, A_h], 0)
        B_full = torch.cat([B_full, B_h * scaling], 1)
    return A_full, B_full


# ----------------------------------------------------------------------------- nn.Embedding sites
# ids [...] (integers); the site is a linear of in = num_embeddings on one_hot(ids); ``kwargs`` are
# the embedding's F.embedding options (padding_idx, scale_grad_by_freq, sparse), applied to the
# lookup of the A factor as PEFT's lora.Embedding does.


def lowrank_embed(ids: Tensor, A: Tensor, B: Tensor, scaling: float, kwargs: dict, D: Optional[Tensor] = None) -> Tensor:
    """:func:`lowrank` of one_hot(ids): s * (F.embedding(ids, A^T) * D) B^T, [...] -> [..., out]."""
    z = F.embedding(ids, A.t(), **kwargs)  # [..., R]: column id of A
    if D is not None:
        z = z * D
    return (z @ B.t()) * scaling


def block_lowrank_embed(ids: Tensor, A: Tensor, B: Tensor, k: int, scaling: float, kwargs: dict,
                        A_h: Optional[Tensor] = None, B_h: Optional[Tensor] = None) -> Tensor:
    """:func:`block_lowrank` of one_hot(ids), gathering only the rows it needs.

    id lies in input block i = id // in_b at local row id % in_b, so z_i = A[i][id % in_b], which is
    row ``id`` of A viewed as [k * in_b, r] (one F.embedding lookup), and z_i' = 0 for the other
    blocks. Regrouped by output block: z[..., j, i*c:(i+1)*c] = chunk j of that row for the owning
    i, zeros elsewhere ([..., k, r], as :func:`block_z`), then B as in :func:`block_lowrank`.
    """
    lead = ids.shape
    _, in_b, r = A.shape
    c = r // k
    a = F.embedding(ids, A.reshape(k * in_b, r), **kwargs)  # [..., r] = z_i of the owning block i
    own = (torch.div(ids, in_b, rounding_mode="floor").unsqueeze(-1)
           == torch.arange(k, device=ids.device)).to(a.dtype)  # [..., k(i)]: 1 at the owning block
    z = (a.reshape(*lead, k, 1, c) * own.reshape(*lead, 1, k, 1)).reshape(*lead, k, r)  # [..., k(j), r]
    y = torch.einsum("...jr,jro->...jo", z, B).reshape(*lead, B.shape[0] * B.shape[2])
    if A_h is not None:
        y = y + F.embedding(ids, A_h.t(), **kwargs) @ B_h.t()
    return y * scaling


# ----------------------------------------------------------------------------- nn.Conv1d/2d/3d sites
# x [N, C_in, *spatial]; ``opts`` = the base conv's kernel_size, stride, padding (dilation 1,
# groups 1 and zero padding are checked before). The flattened in axis is [C_in, *kernel]
# (the conv weight's own layout), so an [R, in] factor is an [R, C_in, *kernel] filter bank.

_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_fn(kernel_size):
    """F.conv1d / conv2d / conv3d for a kernel of that many dimensions."""
    return _CONVS[len(kernel_size)]


def _filters(W: Tensor, kernel_size) -> Tensor:
    """[R, C * prod(k)] -> [R, C, *k] (explicit sizes: R may be 0 in ONNX zero-rank defaults)."""
    return W.reshape(W.shape[0], W.shape[1] // math.prod(kernel_size), *kernel_size)


def _pointwise(W: Tensor, nd: int) -> Tensor:
    """[out, R] -> a 1x1 filter bank [out, R, 1, ...]."""
    return W.reshape(*W.shape, *(1,) * nd)


def lowrank_conv(x: Tensor, A: Tensor, B: Tensor, scaling: float, opts: dict, D: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None) -> Tensor:
    """:func:`lowrank` at a conv site: s * conv_1x1(conv(x, A; kernel, stride, padding) * D, B, bias).
    Costs R (C_in prod(k) + out) per output position, like PEFT's conv LoRA."""
    ks = tuple(opts["kernel_size"])
    conv = conv_fn(ks)
    z = conv(x, _filters(A, ks), None, opts["stride"], opts["padding"])  # [N, R, *out]
    if D is not None:
        z = z * D.reshape(-1, *(1,) * len(ks))
    return conv(z, _pointwise(B, len(ks)), bias) * scaling  # [N, out, *out]


def dense_conv(x: Tensor, dW: Tensor, opts: dict) -> Tensor:
    """conv(x, dW viewed as the base's weight [out, C_in, *k]): exact for any delta weight, but costs
    a full base conv (out * C_in prod(k) per output position) and materialises dW."""
    ks = tuple(opts["kernel_size"])
    return conv_fn(ks)(x, _filters(dW, ks), None, opts["stride"], opts["padding"])


def block_conv_grouped(k: int, in_channels: int) -> bool:
    """Whether :func:`block_lowrank_conv` runs as grouped convs: k divides C_in, so input block i of
    the flattened [C_in, *kernel] axis is the channel group i (all its kernel taps)."""
    return in_channels % k == 0


def block_lowrank_conv(x: Tensor, A: Tensor, B: Tensor, k: int, scaling: float, opts: dict,
                       A_h: Optional[Tensor] = None, B_h: Optional[Tensor] = None) -> Tensor:
    """:func:`block_lowrank` at a conv site (x [N, C_in, *spatial] -> [N, out, *spatial']).

    When k divides C_in (:func:`block_conv_grouped`): stage A is one grouped conv (groups = k; group i
    holds the r filters A[i]^T as [r, C_in/k, *kernel]) giving every z_i, [N, k*r, *sp]; the
    channels are regrouped by output block (z_{i,j} -> position (j, i), as :func:`block_z`) and
    stage B is a grouped 1x1 conv (group j: B[j]^T). Cost per output position: r C_in prod(k) / k
    + r out / k, no dW. Otherwise input blocks cut through channels: the exact form used is
    :func:`dense_conv` with the block weight (a full conv's cost, dW [out, in] materialised).
    """
    ks = tuple(opts["kernel_size"])
    nd = len(ks)
    _, in_b, r = A.shape
    out_b, c = B.shape[2], r // k
    if not block_conv_grouped(k, in_b * k // math.prod(ks)):
        return dense_conv(x, block_lowrank_weight(A, B, k, scaling, A_h, B_h), opts)
    conv = conv_fn(ks)
    wA = A.transpose(1, 2).reshape(k * r, in_b // math.prod(ks), *ks)  # group i: A[i]^T as filters
    z = conv(x, wA, None, opts["stride"], opts["padding"], 1, k)  # [N, k(i) * r, *sp]: z_i
    n, sp = z.shape[0], z.shape[2:]
    z = z.reshape(n, k, k, c, *sp).transpose(1, 2).reshape(n, k * r, *sp)  # by output block j
    wB = B.transpose(1, 2).reshape(k * out_b, r, *(1,) * nd)  # group j: B[j]^T as 1x1 filters
    y = conv(z, wB, None, 1, 0, 1, k)  # [N, out, *sp]
    if A_h is not None:
        y = y + lowrank_conv(x, A_h, B_h, 1.0, opts)
    return y * scaling
