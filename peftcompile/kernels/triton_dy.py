"""Backward "dY side" of a (block) low-rank adapter: everything that reads dY except dX.

For output group g (GraLoRA output block j; LoRA: one group), a tile of BLOCK_M tokens
and a tile of BLOCK_R <= 128 rank columns (one tile unless the rank is wider, e.g. RaSA):

    u    = Z_g * D                      (Z_g [M, R] recomputed raw Z; D only for RaSA)
    for each BLOCK_N columns n of the group's dY:
        dU   += dY_g[m, n] @ B_g^T[n, :]            # [BM, BR], kept in registers
        dB_g[n, :] += s * dY_g[m, n]^T @ u          # fp32 atomics across token tiles
        (hybrid) dU_h += dY_g[m, n] @ B_h[n, :];  dB_h[n, :] += s * dY_g^T @ Z_h
    dU *= s;  dD += sum_m dU * Z_g  (atomic);  dZ = dU * D  -> stored, columns remapped
    (hybrid) dZ_h += s * dU_h  (fp32 atomics across groups: dZ_h sums over every output block)

Each dY tile is loaded once (per rank tile) and feeds both products; the unfused path reads
dY once for dZ = s dY B and once more for dB = s dY^T Z. dB, dD, dB_h and dZ_h are fp32
sums updated atomically (their summation order is not deterministic; the op falls back to
the reference math under ``torch.use_deterministic_algorithms``).

Cost to measure on the GPU: fusing dB trades a second read of dY (16 MiB for M = 4096,
out = 2048, bf16) for (M / BLOCK_M) * out * r fp32 reductions into L2 (8.4 M, ~34 MB of
red traffic at BLOCK_M = 64, r = 64; compiled for sm_90 they are 16-byte
``red.global.relaxed.add.v4.f32``, i.e. 2.1 M vector reds). Which is faster is not known without a GPU, so
``FUSE_DB`` (triton_block) switches dB to a split-K GEMM dY^T (Z*D) instead; both paths
are tested.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from . import triton_gemm as tg
from .triton_gemm import dot_meta, dummy, needs_int64

__all__ = ["dy_side", "MAX_RANK_TILE", "MAX_HYBRID"]

MAX_RANK_TILE = 128  # dU [BLOCK_M, BLOCK_R] fp32 stays in registers; wider ranks use more tiles
MAX_HYBRID = 128  # the hybrid accumulator is not tiled


@triton.jit
def _dy_side_kernel(
    # pointers
    dy_ptr, z_ptr, bt_ptr, d_ptr, dz_ptr, db_ptr, dd_ptr,
    zh_ptr, bht_ptr, dzh_ptr, dbh_ptr,
    # dims: tokens, dY columns per group, rank per group, hybrid rank; M's power-of-2
    # bucket (autotune key only: a new token count does not re-tune)
    M, N, R, H, M_KEY,
    # strides (elements); bt / bht are B_g^T [N, R] and B_h rows [N, H]
    s_dym, s_dyn, s_zm, s_zr, s_btn, s_btr, s_dzm, s_dzr, s_dbn, s_dbr,
    s_zhm, s_zhr, s_bhn, s_bhr, s_dzhm, s_dzhr, s_dbhn, s_dbhr,
    # per-group base offsets (elements)
    g_dy, g_z, g_bt, g_dz, g_db, g_bh, g_dbh,
    # dZ column remap ((c // CHUNK) * CHUNK_STRIDE + c % CHUNK) and the adapter scaling
    CHUNK, CHUNK_STRIDE, scale,
    # meta-parameters
    HAS_D: tl.constexpr, HAS_H: tl.constexpr, FUSE_DB: tl.constexpr, INT64: tl.constexpr,
    DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    pid_r = tl.program_id(2)  # rank tile (RaSA's e can exceed one 128-wide tile)
    if INT64:
        pid_m = pid_m.to(tl.int64)
        g = g.to(tl.int64)
    dy_ptr += g * g_dy
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M  # rows are masked, not wrapped: they are summed over in dB
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    mask_mr = mask_m[:, None] & mask_r[None, :]

    # ---- this tile's Z (and u = Z * D), loaded once
    z = tl.load(z_ptr + g * g_z + offs_m[:, None] * s_zm + offs_r[None, :] * s_zr,
                mask=mask_mr, other=0.0).to(tl.float32)
    if HAS_D:
        dvec = tl.load(d_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        u = (z * dvec[None, :]).to(DOT)
    else:
        u = z.to(DOT)
    if UPCAST:
        u = u.to(tl.float32)
    du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_H:
        offs_h = tl.arange(0, BLOCK_H)
        mask_h = offs_h < tl.where(pid_r == 0, H, 0)  # the first rank tile owns the hybrid pair
        zh = tl.load(zh_ptr + offs_m[:, None] * s_zhm + offs_h[None, :] * s_zhr,
                     mask=mask_m[:, None] & mask_h[None, :], other=0.0).to(DOT)
        if UPCAST:
            zh = zh.to(tl.float32)
        duh = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)

    # ---- one pass over the group's dY columns
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * s_dym + offs_n[None, :] * s_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(DOT)
        bt = tl.load(bt_ptr + g * g_bt + offs_n[:, None] * s_btn + offs_r[None, :] * s_btr,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(DOT)
        if UPCAST:  # interpreter only (numpy has no bf16 matmul)
            dy = dy.to(tl.float32)
            bt = bt.to(tl.float32)
        # dU += dY B ; dB^T tile = dY^T u   (same dY tile)
        du = tl.dot(dy, bt, du, input_precision=PRECISION)
        if FUSE_DB:
            dbt = tl.dot(tl.trans(dy), u, input_precision=PRECISION)
            # (all atomics here are plain sums: relaxed, no acq_rel fences)
            tl.atomic_add(db_ptr + g * g_db + offs_n[:, None] * s_dbn + offs_r[None, :] * s_dbr,
                          dbt * scale, mask=mask_n[:, None] & mask_r[None, :], sem="relaxed")
        if HAS_H:
            bh = tl.load(bht_ptr + g * g_bh + offs_n[:, None] * s_bhn + offs_h[None, :] * s_bhr,
                         mask=mask_n[:, None] & mask_h[None, :], other=0.0).to(DOT)
            if UPCAST:
                bh = bh.to(tl.float32)
            duh = tl.dot(dy, bh, duh, input_precision=PRECISION)
            if FUSE_DB:
                dbh = tl.dot(tl.trans(dy), zh, input_precision=PRECISION)
                tl.atomic_add(dbh_ptr + g * g_dbh + offs_n[:, None] * s_dbhn + offs_h[None, :] * s_dbhr,
                              dbh * scale, mask=mask_n[:, None] & mask_h[None, :], sem="relaxed")

    # ---- epilogue: dD, dZ (remapped to the layout dX / dA read), hybrid dZ_h
    du = du * scale
    if HAS_D:
        tl.atomic_add(dd_ptr + offs_r, tl.sum(du * z, axis=0), mask=mask_r, sem="relaxed")
        du = du * dvec[None, :]
    col = (offs_r // CHUNK) * CHUNK_STRIDE + offs_r % CHUNK
    tl.store(dz_ptr + g * g_dz + offs_m[:, None] * s_dzm + col[None, :] * s_dzr,
             du.to(dz_ptr.dtype.element_ty), mask=mask_mr)
    if HAS_H:
        tl.atomic_add(dzh_ptr + offs_m[:, None] * s_dzhm + offs_h[None, :] * s_dzhr,
                      duh * scale, mask=mask_m[:, None] & mask_h[None, :], sem="relaxed")


# One program per (token tile, group) streams all of the group's dY columns, so BLOCK_M
# sets the parallelism: M = 4096 gives 64 (BLOCK_M 64) or 32 programs per group, times k
# groups. BLOCK_M stays >= 64 so both dots use wgmma (32 rows fall back to mma.sync).
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
    for bm, bn, w, st in [(64, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2)]
]
_TUNED = triton.autotune(_CONFIGS, key=["M_KEY", "N", "R", "H"],
                         reset_to_zero=["db_ptr", "dd_ptr", "dzh_ptr", "dbh_ptr"])(_dy_side_kernel)
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=32)


def _s2(t: Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def dy_side(dy: Tensor, z: Tensor, bt: Tensor, bt_goff: int, dz: Tensor, dz_goff: int,
            db: Tensor, db_strides: tuple[int, int], db_goff: int, *, G: int, N: int, R: int,
            chunk: int, chunk_stride: int, scale: float, z_goff: int, D: Optional[Tensor] = None,
            dd: Optional[Tensor] = None, zh: Optional[Tensor] = None, bh: Optional[Tensor] = None,
            dzh: Optional[Tensor] = None, dbh: Optional[Tensor] = None, fuse_db: bool = True,
            config: Optional[dict] = None) -> None:
    """Launch the dY-side kernel over (token tiles, G groups, rank tiles).

    dy [M, G*N]; z [M, *] with group g's R columns at ``g * z_goff``; bt: B_g^T as an
    [N, R] view of group 0 (``bt_goff`` elements to the next group); dz [M, *] output
    (input dtype) written through the remap; db / dd / zh-side buffers fp32, zeroed.
    Hybrid: zh [M, H], bh [G*N, H] (B_h), dzh [M, H] and dbh [G*N, H] fp32 buffers.
    ``fuse_db=False`` leaves db / dbh untouched (the caller computes them as a GEMM).
    """
    M = dy.shape[0]
    if M == 0 or G == 0:
        return
    H = zh.shape[1] if zh is not None else 0
    if H > MAX_HYBRID:
        raise ValueError(f"peftcompile triton dY pass: hybrid rank {H} > {MAX_HYBRID} is not supported")
    dev = dy.device
    d0 = dummy(dev)
    has_h = H > 0
    args = (dy, z, bt, D if D is not None else d0, dz, db, dd if dd is not None else d0,
            zh if has_h else d0, bh if has_h else d0, dzh if has_h else d0, dbh if has_h else d0,
            M, N, R, H, triton.next_power_of_2(M),
            *_s2(dy), *_s2(z), *_s2(bt), *_s2(dz), *db_strides,
            *(_s2(zh) if has_h else (0, 0)), *(_s2(bh) if has_h else (0, 0)),
            *(_s2(dzh) if has_h else (0, 0)), *(_s2(dbh) if has_h else (0, 0)),
            N * dy.stride(1), z_goff, bt_goff, dz_goff, db_goff,
            N * bh.stride(0) if has_h else 0, N * dbh.stride(0) if has_h else 0,
            chunk, chunk_stride, float(scale))
    meta = dict(HAS_D=D is not None, HAS_H=has_h, FUSE_DB=fuse_db, INT64=needs_int64(dy, z, dz, bt, zh, bh, dzh, dbh),
                **dot_meta(dy.dtype), BLOCK_R=min(MAX_RANK_TILE, max(16, triton.next_power_of_2(R))),
                BLOCK_H=max(16, triton.next_power_of_2(max(H, 1))))
    fixed = dict(INTERPRET_CONFIG)
    for key, val in (config or {}).items():  # tests may shrink the rank tile too
        (meta if key in meta else fixed)[key] = val

    def grid(META):
        return (triton.cdiv(M, META["BLOCK_M"]), G, triton.cdiv(R, META["BLOCK_R"]))

    tg.launch(_dy_side_kernel, _TUNED, grid, args, meta, fixed, dev)
