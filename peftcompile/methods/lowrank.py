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
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["lowrank", "lowrank_weight", "block_z", "block_regroup_back", "block_lowrank",
           "block_lowrank_weight", "block_as_lowrank"]


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
