"""One grouped GEMM whose K loop runs over up to three operand pairs ("K extended").

    for each group g, each [BLOCK_M, BLOCK_N] tile of C_g:
        acc = 0                                                     # fp32
        for (A_t, B_t, K_t) in segments (1, 2, 3):                  # 2 and 3 optional
            for k in range(0, K_t, BLOCK_K):                        # split-K: every SPLIT_K-th step
                acc += A_t,g[m, k:k+BK] @ B_t,g[k:k+BK, n]
        C_g[m, remap(n)] = alpha * acc * colscale[n] + bias_g[n]    # or atomic_add (split-K)

Every adapter op of :mod:`peftcompile.kernels` is made of this kernel (see triton_lowrank_linear /
triton_block_lowrank_linear): the base GEMM with the adapter's r extra K columns (forward y and
backward dx), the narrow Z = X A GEMM (N = r, output columns regrouped by ``remap``),
and the tall-K dA = X^T dZ GEMM (K = tokens, split-K with fp32 atomics).

Operands are addressed by (tensor, strides, per-group offset), so transposed views (a
Conv1D weight, A^T, X^T) and slices of a grouped tensor are read in place, never copied.
Output column remap: column n of a group lands at ``(n // CHUNK) * CHUNK_STRIDE + n % CHUNK``
(identity when CHUNK >= N); GraLoRA uses it to write z_{i,j} where output block j reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["Seg", "gemm", "launch", "interpreting", "dot_meta", "dummy", "needs_int64"]

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_meta(dtype: torch.dtype) -> dict:
    """Constexprs selecting the dot operand type and precision for an input dtype.

    fp32 inputs use TF32 only where torch's own CUDA matmul would (so results match torch).
    Under the interpreter, bf16 ``tl.dot`` is wrong (numpy has no bf16: measured errors of
    1e10 on Triton 3.9), so operands are rounded to the dot dtype and multiplied in fp32
    (UPCAST): the same products a tensor core forms, with fp32 accumulation.
    """
    m = torch.backends.cuda.matmul
    prec = getattr(m, "fp32_precision", "none")
    tf32 = prec == "tf32" or (prec == "none" and m.allow_tf32)
    exact_fp32 = dtype == torch.float32 and (interpreting() or not tf32)
    # 16-bit dots keep Triton's default attribute ("tf32", ignored for them)
    return dict(DOT=_TORCH_TO_TL[dtype], UPCAST=interpreting(), PRECISION="ieee" if exact_fp32 else "tf32")


_DUMMIES: dict = {}


def dummy(device: torch.device) -> Tensor:
    """A private pointer for absent operands (never a real argument: autotune may zero it)."""
    key = str(device)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(16, dtype=torch.float32, device=device)
    return _DUMMIES[key]


# ------------------------------------------------------------------------------ kernel
@triton.jit
def _segment(acc, a_ptr, b_ptr, K, s_ak, s_bk, a_rows, b_cols, pid_k,
             SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr,
             DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += A[rows, :K] @ B[:K, cols]; rows/cols are in bounds (wrapped), only K is masked."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        kk = k0 + offs_k
        mk = kk < K
        a = tl.load(a_ptr + a_rows + kk[None, :] * s_ak, mask=mk[None, :], other=0.0)
        # (the dot is written out here, not in a helper: nested jit calls cost ~4 ms each
        # under the interpreter, which the tests run on)
        b = tl.load(b_ptr + kk[:, None] * s_bk + b_cols, mask=mk[:, None], other=0.0).to(DOT)
        a = a.to(DOT)
        if UPCAST:  # interpreter only: keep the DOT rounding, multiply in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _gemm_kernel(
    # pointers: three (A, B) operand pairs, epilogue vectors, output
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, a3_ptr, b3_ptr, bias_ptr, colscale_ptr, c_ptr,
    # dims (per group); K2, K3 only read when HAS_2 / HAS_3; M_KEY, K_KEY: power-of-2
    # buckets of M and K1, read by the autotune key only (a new token count does not re-tune)
    M, N, K1, K2, K3, M_KEY, K_KEY,
    # strides (elements)
    s_a1m, s_a1k, s_b1k, s_b1n,
    s_a2m, s_a2k, s_b2k, s_b2n,
    s_a3m, s_a3k, s_b3k, s_b3n,
    s_cm, s_cn,
    # per-group base offsets (elements)
    g_a1, g_b1, g_a2, g_b2, g_a3, g_b3, g_bias, g_c,
    # output column remap and epilogue scale
    CHUNK, CHUNK_STRIDE, alpha,
    # meta-parameters
    HAS_2: tl.constexpr, HAS_3: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_COLSCALE: tl.constexpr,
    ATOMIC: tl.constexpr, INT64: tl.constexpr,
    DOT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # ---- tile of this program: grouped ordering along M for L2 reuse of B tiles
    pid = tl.program_id(0)
    g = tl.program_id(1)
    pid_k = tl.program_id(2)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % group_rows)
    pid_n = (pid % per_group) // group_rows
    if INT64:
        g = g.to(tl.int64)
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # wrap rows/cols so loads need no M/N mask; the store masks them out
    rm = offs_m % M
    rn = offs_n % N

    # ---- main loop over the extended K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _segment(acc, a1_ptr + g * g_a1, b1_ptr + g * g_b1, K1, s_a1k, s_b1k,
                   rm[:, None] * s_a1m, rn[None, :] * s_b1n, pid_k,
                   SPLIT_K, BLOCK_K, DOT, UPCAST, PRECISION)
    if HAS_2:
        acc = _segment(acc, a2_ptr + g * g_a2, b2_ptr + g * g_b2, K2, s_a2k, s_b2k,
                       rm[:, None] * s_a2m, rn[None, :] * s_b2n, pid_k,
                       SPLIT_K, BLOCK_K, DOT, UPCAST, PRECISION)
    if HAS_3:
        acc = _segment(acc, a3_ptr + g * g_a3, b3_ptr + g * g_b3, K3, s_a3k, s_b3k,
                       rm[:, None] * s_a3m, rn[None, :] * s_b3n, pid_k,
                       SPLIT_K, BLOCK_K, DOT, UPCAST, PRECISION)

    # ---- epilogue: scale, per-column scale (RaSA's D), bias, remapped store
    acc = acc * alpha
    mask_n = offs_n < N
    if HAS_COLSCALE:
        cs = tl.load(colscale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc * cs[None, :]
    if HAS_BIAS:
        bv = tl.load(bias_ptr + g * g_bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + tl.where(pid_k == 0, bv, 0.0)[None, :]  # split-K: bias once
    col = (offs_n // CHUNK) * CHUNK_STRIDE + offs_n % CHUNK
    c_ptrs = c_ptr + g * g_c + offs_m[:, None] * s_cm + col[None, :] * s_cn
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    if ATOMIC:
        # plain sums need no ordering: relaxed emits red/atom without acq_rel fences
        tl.atomic_add(c_ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------ configs
def _cfg(bm, bn, bk, warps, stages, split_k=1, group_m=8) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m,
                          "SPLIT_K": split_k}, num_warps=warps, num_stages=stages)


# Hopper: 128x128/128x256 tiles with BLOCK_K 64 keep wgmma fed; 3-4 stages of cp.async
# hide the loads (a 128x256x64 bf16 stage is 48 KB of the 228 KB shared memory).
_MAIN_CONFIGS = [
    _cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4), _cfg(128, 64, 64, 4, 4), _cfg(64, 256, 64, 8, 3),
]
# Narrow N (Z = X A, N = r <= 256 set by the launcher): X is read once per N tile, so
# BLOCK_N covers all of r and only BLOCK_M varies. BLOCK_M >= 64: a 4-warp warpgroup's
# wgmma needs 64 rows (BLOCK_M 32 compiles to mma.sync, checked in test_kernels_sm90).
_NARROW_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=w, num_stages=st)
    for bm, bk, w, st in [(64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3), (128, 64, 4, 4)]
]
# Tall K (dA = X^T dZ, K = tokens, output r x in): split K to fill 132 SMs, fp32 atomics.
_SPLITK_CONFIGS = [
    _cfg(64, 128, 64, 4, 4, split_k=s) for s in (4, 8, 16)
] + [_cfg(128, 128, 64, 8, 3, split_k=s) for s in (4, 8)] + [_cfg(64, 64, 64, 4, 4, split_k=16)]

# Under the interpreter: one small fixed config (autotuning there would take minutes).
INTERPRET_CONFIGS = {
    "main": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, SPLIT_K=1),
    "narrow": dict(BLOCK_M=32, BLOCK_K=32, GROUP_M=2, SPLIT_K=1),
    "splitk": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=1, SPLIT_K=2),
}

_KEY = ["M_KEY", "N", "K_KEY", "K2", "K3"]
_TUNED = {
    "main": triton.autotune(_MAIN_CONFIGS, key=_KEY)(_gemm_kernel),
    "narrow": triton.autotune(_NARROW_CONFIGS, key=_KEY)(_gemm_kernel),
    "splitk": triton.autotune(_SPLITK_CONFIGS, key=_KEY, reset_to_zero=["c_ptr"])(_gemm_kernel),
}


# ------------------------------------------------------------------------------ launcher
@dataclass
class Seg:
    """One K segment: A [M, K] and B [K, N] given by tensor, strides and per-group offset."""

    a: Tensor
    a_strides: tuple[int, int]  # (m, k)
    a_goff: int
    b: Tensor
    b_strides: tuple[int, int]  # (k, n)
    b_goff: int
    K: int


def needs_int64(*tensors: Optional[Tensor]) -> bool:
    """Whether some element offset of these tensors exceeds int32 (then offsets use int64)."""
    lim = 2**31 - 1
    return any(t is not None and t.numel() > 0 and
               sum((d - 1) * abs(s) for d, s in zip(t.shape, t.stride())) + 1 > lim for t in tensors)


def gemm(out: Tensor, out_strides: tuple[int, int], out_goff: int, M: int, N: int, G: int,
         segs: Sequence[Seg], *, dot_dtype: torch.dtype, kind: str = "main",
         bias: Optional[Tensor] = None, bias_goff: int = 0, colscale: Optional[Tensor] = None,
         alpha: float = 1.0, chunk: Optional[int] = None, chunk_stride: int = 0,
         config: Optional[dict] = None) -> None:
    """Launch C_g = alpha * (sum_t A_t,g @ B_t,g) * colscale + bias_g for g < G into ``out``.

    kind "main": general tiles; "narrow": BLOCK_N = next_pow2(N) (Z = X A; "main" if N > 256);
    "splitk": ``out`` must be fp32 and zeroed, partial sums are atomically added.
    ``config`` overrides the interpreter's fixed block sizes (tests use it).
    """
    if M == 0 or N == 0 or G == 0:
        return
    if not 1 <= len(segs) <= 3:
        raise ValueError(f"peftcompile triton gemm: 1 to 3 K segments, got {len(segs)}")
    if kind == "splitk" and out.dtype != torch.float32:
        raise ValueError("peftcompile triton gemm: split-K output must be a zeroed fp32 buffer")
    if kind == "narrow" and N > 256:  # a wide rank (RaSA's e): tile N like any GEMM
        kind = "main"
    dev = out.device
    z = dummy(dev)
    ptrs, strides, goffs, Ks = [], [], [], []
    for t in range(3):
        if t < len(segs):
            s = segs[t]
            ptrs += [s.a, s.b]
            strides += [*s.a_strides, *s.b_strides]
            goffs += [s.a_goff, s.b_goff]
            Ks.append(s.K)
        else:
            ptrs += [z, z]
            strides += [0, 0, 0, 0]
            goffs += [0, 0]
            Ks.append(0)
    meta = dict(HAS_2=len(segs) > 1, HAS_3=len(segs) > 2, HAS_BIAS=bias is not None,
                HAS_COLSCALE=colscale is not None, ATOMIC=kind == "splitk",
                INT64=needs_int64(out, *(s.a for s in segs), *(s.b for s in segs)),
                **dot_meta(dot_dtype))
    if kind == "narrow":
        meta["BLOCK_N"] = max(16, triton.next_power_of_2(N))
    args = (*ptrs, bias if bias is not None else z, colscale if colscale is not None else z, out,
            M, N, *Ks, triton.next_power_of_2(M), triton.next_power_of_2(Ks[0]),
            *strides, *out_strides, *goffs, bias_goff, out_goff,
            chunk if chunk is not None else max(N, 1), chunk_stride, float(alpha))

    def grid(META):
        return (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]), G, META["SPLIT_K"])

    fixed = dict(INTERPRET_CONFIGS[kind])
    fixed.update(config or {})
    if kind == "narrow":
        fixed.pop("BLOCK_N", None)
    launch(_gemm_kernel, _TUNED[kind], grid, args, meta, fixed, dev)


def launch(kernel, tuned, grid, args: tuple, meta: dict, fixed: dict, device: torch.device) -> None:
    """Run a kernel: the fixed config under the interpreter, the autotuned one on CUDA."""
    if device.type == "cpu" or interpreting():
        if not interpreting():
            raise RuntimeError("peftcompile triton kernels got CPU tensors: set TRITON_INTERPRET=1 "
                               "before importing peftcompile.kernels to run them on the interpreter")
        kernel[grid](*args, **meta, **fixed)
    else:
        tuned[grid](*args, **meta)
