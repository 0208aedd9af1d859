"""Triton adapter kernels (peftcompile.kernels.{lora,gralora}_triton) on the CPU interpreter.

Every launcher output (y, dx, dA, dB, dD, dA_h, dB_h) is compared with the reference math
of peftcompile.kernels.ops: forward values with ``*_linear_ref`` and gradients with
autograd through that reference, both in float64. Tolerances:
  float32 kernels:        atol = rtol = 1e-4 against the float64 reference
  float16 / bfloat16:     |err| <= tol * max|ref| + tol * |ref|, tol fp16 2e-3, bf16 1.6e-2
                          (inputs rounded to the dtype first; the reference is exact)
Under the interpreter bf16 dots run as bf16-rounded operands multiplied in fp32 (numpy
has no bf16 matmul); the bf16 tensor-core instruction itself runs only on CUDA.
Shapes stay tiny (the interpreter runs every program in Python).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to test")
if os.environ.get("TRITON_INTERPRET") != "1":  # conftest sets it before triton is imported
    pytest.skip("needs TRITON_INTERPRET=1 (set before importing triton) to run on CPU",
                allow_module_level=True)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from peftcompile.kernels import ops, dispatch_cuda  # noqa: E402
from peftcompile.kernels.triton_block_lowrank_linear import (  # noqa: E402
    block_lowrank_bwd_triton,
    block_lowrank_fwd_triton,
)
from peftcompile.kernels.triton_lowrank_linear import lowrank_bwd_triton, lowrank_fwd_triton  # noqa: E402

F64 = torch.float64
LOW_TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HYP = settings(max_examples=10, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------- helpers
def _x(lead: tuple[int, ...], d_in: int, strided: bool, dtype) -> torch.Tensor:
    """x (or dy) [*lead, d]; ``strided`` gives a view with a non-unit feature stride."""
    if strided:
        return torch.randn(*lead, 2 * d_in, dtype=F64)[..., ::2].to(dtype)
    return torch.randn(*lead, d_in, dtype=F64).to(dtype)


def _weight(d_out: int, d_in: int, transposed: bool, dtype) -> torch.Tensor:
    """W [out, in]; ``transposed`` reads it as the .t() view of a Conv1D-style [in, out] store."""
    if transposed:
        return (torch.randn(d_in, d_out, dtype=F64) / d_in**0.5).to(dtype).t()
    return (torch.randn(d_out, d_in, dtype=F64) / d_in**0.5).to(dtype)


def _check(name: str, got: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype} != {dtype}"
    if dtype == torch.float32:
        torch.testing.assert_close(got.to(F64), ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    else:
        tol = LOW_TOL[dtype]
        torch.testing.assert_close(got.to(F64), ref, atol=tol * max(ref.abs().max().item(), 1e-3), rtol=tol,
                                   msg=lambda m: f"{name} ({dtype}): {m}")


def _autograd(fn, tensors: dict[str, torch.Tensor], dy: torch.Tensor, args: tuple):
    """y and d(y . dy)/d(tensor) of the float64 reference, for every tensor in ``tensors``."""
    leaves = {n: (t.detach().to(F64).requires_grad_(n not in ("weight", "bias")) if t is not None else None)
              for n, t in tensors.items()}
    y = fn(*leaves.values(), *args)
    grads = torch.autograd.grad(y, [t for n, t in leaves.items() if t is not None and t.requires_grad],
                                dy.to(F64))
    names = [n for n, t in leaves.items() if t is not None and t.requires_grad]
    return y.detach(), dict(zip(names, grads))


def run_lora(lead, d_in, d_out, r, *, use_d, bias, transposed, strided=False, dtype=torch.float32,
             scaling=0.75, config=None, with_xa=False):
    x = _x(lead, d_in, strided, dtype)
    xa = _x(lead, d_in, strided, dtype) if with_xa else None  # e.g. dropout(x): its own tensor
    W = _weight(d_out, d_in, transposed, dtype)
    b = torch.randn(d_out, dtype=F64).to(dtype) if bias else None
    A = (torch.randn(r, d_in, dtype=F64) / d_in**0.5).to(dtype)
    B = (torch.randn(d_out, r, dtype=F64) / r**0.5).to(dtype)
    D = (torch.rand(r, dtype=F64) + 0.5).to(dtype) if use_d else None
    dy = _x(lead, d_out, strided, dtype)

    y = lowrank_fwd_triton(x, W, b, A, B, D, scaling, xa=xa, config=config)
    dx, dA, dB, dD, dxa = lowrank_bwd_triton(dy, x, W, A, B, D, scaling, xa=xa, config=config)
    y_ref, g = _autograd(lambda x, W, b, A, B, D, xa, s: ops.lowrank_linear_ref(x, W, b, A, B, D, s, xa),
                         dict(x=x, weight=W, bias=b, A=A, B=B, D=D, xa=xa), dy, (scaling,))
    _check("y", y, y_ref, dtype)
    _check("dx", dx, g["x"], dtype)
    if with_xa:
        _check("dxa", dxa, g["xa"], dtype)
    else:
        assert dxa is None
    _check("dA", dA, g["A"], dtype)
    _check("dB", dB, g["B"], dtype)
    if use_d:
        _check("dD", dD, g["D"], dtype)
    else:
        assert dD is None


def run_gralora(lead, d_in, d_out, r, k, h, *, bias, transposed, strided=False, dtype=torch.float32,
                scaling=0.6, config=None, with_xa=False):
    x = _x(lead, d_in, strided, dtype)
    xa = _x(lead, d_in, strided, dtype) if with_xa else None
    W = _weight(d_out, d_in, transposed, dtype)
    b = torch.randn(d_out, dtype=F64).to(dtype) if bias else None
    A = (torch.randn(k, d_in // k, r, dtype=F64) / (d_in // k) ** 0.5).to(dtype)
    B = (torch.randn(k, r, d_out // k, dtype=F64) / r**0.5).to(dtype)
    A_h = (torch.randn(h, d_in, dtype=F64) / d_in**0.5).to(dtype) if h else None
    B_h = (torch.randn(d_out, h, dtype=F64) / h**0.5).to(dtype) if h else None
    dy = _x(lead, d_out, strided, dtype)

    y = block_lowrank_fwd_triton(x, W, b, A, B, A_h, B_h, k, scaling, xa=xa, config=config)
    dx, dA, dB, dA_h, dB_h, dxa = block_lowrank_bwd_triton(dy, x, W, A, B, A_h, B_h, k, scaling, xa=xa,
                                                           config=config)
    y_ref, g = _autograd(
        lambda x, W, b, A, B, A_h, B_h, xa, k, s: ops.block_lowrank_linear_ref(x, W, b, A, B, A_h, B_h, k, s, xa),
        dict(x=x, weight=W, bias=b, A=A, B=B, A_h=A_h, B_h=B_h, xa=xa), dy, (k, scaling))
    _check("y", y, y_ref, dtype)
    _check("dx", dx, g["x"], dtype)
    if with_xa:
        _check("dxa", dxa, g["xa"], dtype)
    else:
        assert dxa is None
    _check("dA", dA, g["A"], dtype)
    _check("dB", dB, g["B"], dtype)
    if h:
        _check("dA_h", dA_h, g["A_h"], dtype)
        _check("dB_h", dB_h, g["B_h"], dtype)
    else:
        assert dA_h is None and dB_h is None


# ---------------------------------------------------------------------------- fixed cases
# (lead, in, out, r, D, bias, transposed weight, strided x and dy): M = 37 and 2*19 are not
# multiples of the interpreter's BLOCK_M = 32; in/out not multiples of BLOCK_K/N = 32.
LORA_CASES = [
    ((37,), 48, 40, 8, False, True, False, False),
    ((2, 19), 40, 56, 16, True, False, True, False),  # RaSA-style D, Conv1D weight view
    ((3,), 24, 64, 4, True, True, False, True),  # fewer tokens than one tile, strided x
]


@pytest.mark.parametrize("lead,d_in,d_out,r,use_d,bias,transposed,strided", LORA_CASES)
def test_lora_fp32(lead, d_in, d_out, r, use_d, bias, transposed, strided):
    run_lora(lead, d_in, d_out, r, use_d=use_d, bias=bias, transposed=transposed, strided=strided)


# (lead, in, out, r, k, hybrid_r, bias, transposed, strided)
GRALORA_CASES = [
    ((37,), 48, 40, 8, 2, 0, True, False, False),
    ((2, 17), 64, 32, 16, 4, 4, False, True, False),  # hybrid pair, Conv1D weight view
    ((33,), 36, 60, 4, 1, 3, True, False, True),  # k = 1 (LoRA layout) + hybrid, strided x
    ((5,), 64, 64, 16, 4, 0, True, True, True),
]


@pytest.mark.parametrize("lead,d_in,d_out,r,k,h,bias,transposed,strided", GRALORA_CASES)
def test_gralora_fp32(lead, d_in, d_out, r, k, h, bias, transposed, strided):
    run_gralora(lead, d_in, d_out, r, k, h, bias=bias, transposed=transposed, strided=strided)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_low_precision(dtype):
    run_lora((2, 19), 48, 40, 8, use_d=True, bias=True, transposed=True, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gralora_low_precision(dtype):
    run_gralora((37,), 64, 48, 8, 4, 4, bias=True, transposed=False, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_separate_adapter_input(dtype):
    """xa (the adapter's dropout output) feeds Z and dA; dx = dY W only and dxa = dZ A."""
    run_lora((2, 19), 40, 24, 8, use_d=True, bias=True, transposed=True, dtype=dtype, with_xa=True)
    run_gralora((37,), 48, 40, 8, 2, 3, bias=False, transposed=False, dtype=dtype, with_xa=True)


@pytest.mark.parametrize("base", [torch.bfloat16, torch.float16])
def test_fp32_adapter_on_low_precision_base(base):
    """The CUDA entry points with fp32 adapters on a 16-bit base (PEFT's default dtype policy):
    the Triton path (operands cast to the base dtype) against the reference math, which
    computes the delta in fp32, in float64; every grad in its parameter's dtype."""
    tol = LOW_TOL[base]
    x, W, b = _x((2, 9), 32, False, base), _weight(24, 32, False, base), torch.randn(24).to(base)
    dy = _x((2, 9), 24, False, base)
    xa = x.float() * (torch.rand(2, 9, 32) > 0.3) / 0.7  # a dropped-out fp32 input
    cases = {
        "lowrank": (dispatch_cuda.lowrank_linear_cuda, dispatch_cuda.lowrank_linear_backward_cuda,
                    ops.lowrank_linear_ref, dict(A=torch.randn(4, 32) / 6, B=torch.randn(24, 4) / 2, D=torch.rand(4)),
                    (0.5,)),
        "block": (dispatch_cuda.block_lowrank_linear_cuda, dispatch_cuda.block_lowrank_linear_backward_cuda,
                  ops.block_lowrank_linear_ref,
                  dict(A=torch.randn(2, 16, 4) / 4, B=torch.randn(2, 4, 12) / 2, A_h=torch.randn(2, 32) / 6,
                       B_h=torch.randn(24, 2) / 2), (2, 0.5)),
    }
    for name, (fwd, bwd, ref, ad, args) in cases.items():
        for a in (None, xa):
            assert dispatch_cuda.use_triton(*_adapter_cast(x, a, ad))
            y = fwd(x, W, b, *ad.values(), *args, a)
            grads = bwd(dy, x, W, *ad.values(), *args, a)
            y_ref, g = _autograd(lambda x, W, b, *rest: ref(x, W, b, *rest[:len(ad)], *args, rest[len(ad)]),
                                 dict(x=x, weight=W, bias=b, **ad, xa=a), dy, ())
            _check(f"{name} y", y, y_ref, base)
            names = ["x", *ad] if name == "lowrank" else ["x", "A", "B", "A_h", "B_h"]
            for n, got in zip(names + ["xa"], grads[:1] + grads[1:len(ad) + 1] + grads[-1:]):
                if n == "xa" and a is None:
                    assert got.numel() == 0
                    continue
                want = g[n]
                assert got.dtype == (base if n == "x" else torch.float32), (name, n, got.dtype)
                torch.testing.assert_close(got.double(), want, atol=tol * max(want.abs().max().item(), 1e-3),
                                           rtol=tol, msg=lambda m: f"{name} d{n}: {m}")


def _adapter_cast(x, xa, ad):
    return (x, *dispatch_cuda._adapter_in_base_dtype(x, xa, *ad.values()))


def test_block_sizes_and_split_k():
    """Other tilings: 16-wide tiles (many tiles, K loops), split-K 3 and 1, dY pass BLOCK_N 16."""
    small = {"main": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16), "narrow": dict(BLOCK_M=16, BLOCK_K=16),
             "splitk": dict(SPLIT_K=3), "dy": dict(BLOCK_M=16, BLOCK_N=16)}
    run_gralora((21,), 48, 32, 8, 2, 2, bias=True, transposed=True, config=small)
    run_lora((21,), 40, 24, 4, use_d=True, bias=False, transposed=False,
             config={"splitk": dict(SPLIT_K=1, BLOCK_M=16, BLOCK_N=16)})


def test_db_as_gemm():
    """FUSE_DB off: dB and dB_h from split-K GEMMs instead of the dY pass's atomics."""
    run_gralora((19,), 32, 48, 8, 2, 3, bias=True, transposed=True, config={"fuse_db": False})
    run_lora((2, 9), 24, 40, 8, use_d=True, bias=False, transposed=False, config={"fuse_db": False})


def test_rank_tiles():
    """Ranks wider than one dY-pass tile (RaSA's e = (r-k) + L*k grows with the layer count)."""
    # 16-wide rank tiles: 2 of them, the second must leave the hybrid pair alone
    run_gralora((13,), 32, 16, 24, 2, 3, bias=False, transposed=False, config={"dy": dict(BLOCK_R=16)})
    run_lora((9,), 16, 24, 40, use_d=True, bias=True, transposed=True, config={"dy": dict(BLOCK_R=16)})
    # e = 260 > 256: Z = X A is tiled over N like the main GEMM, dY pass uses 3 tiles of 128
    run_lora((5,), 16, 16, 260, use_d=True, bias=False, transposed=False)


@pytest.fixture
def autotuned_path(monkeypatch):
    """Launch through the CUDA path's autotuners (every config benchmarked, twice each) with
    a wall-clock timer standing in for the GPU benchmarker, which needs a driver."""
    from peftcompile.kernels import triton_dy, triton_gemm

    tuners = [*triton_gemm._TUNED.values(), triton_dy._TUNED]
    calls = {"n": 0}

    def bench(kernel_call, quantiles=None, **_):
        import time

        t0 = time.perf_counter()
        kernel_call()
        kernel_call()  # a second run: atomics would double without reset_to_zero
        calls["n"] += 2
        return [time.perf_counter() - t0] * (len(quantiles) if quantiles else 1)

    for t in tuners:
        t.__dict__["do_bench"] = bench  # shadows the cached_property (no driver on CPU)
        t.cache.clear()
    monkeypatch.setattr(triton_gemm, "launch",
                        lambda kernel, tuned, grid, args, meta, fixed, device: tuned[grid](*args, **meta))
    yield calls
    for t in tuners:
        t.__dict__.pop("do_bench", None)
        t.cache.clear()


def test_autotuned_configs(autotuned_path):
    """Every CUDA autotune config (64/128-wide tiles, split-K 4..16) of every launch of a
    GraLoRA + hybrid forward and backward gives the reference results; another token count
    in the same power-of-2 bucket reuses the tuned configs instead of benchmarking again."""
    run_gralora((20,), 32, 48, 8, 2, 3, bias=True, transposed=True)
    benched = autotuned_path["n"]
    assert benched >= 2 * 30, benched  # 2 calls x (4 narrow x 2 + 6 main x 2 + 5 dy + 6 split-K x 2)
    run_gralora((29,), 32, 48, 8, 2, 3, bias=False, transposed=True)  # M 20 -> 29: bucket 32
    assert autotuned_path["n"] == benched


# ---------------------------------------------------------------------------- properties
@st.composite
def _shapes(draw, ks=(1, 2, 4)):
    k = draw(st.sampled_from(ks))
    m = draw(st.integers(1, 40))
    lead = (m,) if draw(st.booleans()) or m < 2 else (2, m // 2)
    d_in = k * draw(st.integers(1, 64 // k))
    d_out = k * draw(st.integers(1, 64 // k))
    r = k * draw(st.integers(1, 16 // k))
    return lead, d_in, d_out, r, k


@HYP
@given(shape=_shapes(ks=(1,)), use_d=st.booleans(), bias=st.booleans(), transposed=st.booleans(),
       strided=st.booleans())
def test_lora_property(shape, use_d, bias, transposed, strided):
    lead, d_in, d_out, r, _ = shape
    run_lora(lead, d_in, d_out, r, use_d=use_d, bias=bias, transposed=transposed, strided=strided)


@HYP
@given(shape=_shapes(), h=st.sampled_from([0, 0, 2, 5]), bias=st.booleans(), transposed=st.booleans(),
       strided=st.booleans())
def test_gralora_property(shape, h, bias, transposed, strided):
    lead, d_in, d_out, r, k = shape
    run_gralora(lead, d_in, d_out, r, k, h, bias=bias, transposed=transposed, strided=strided)


# ---------------------------------------------------------------------------- edges, errors
def test_no_tokens():
    x, W = torch.randn(0, 8), torch.randn(12, 8)
    A, B = torch.randn(2, 4, 4), torch.randn(2, 4, 6)
    y = block_lowrank_fwd_triton(x, W, None, A, B, None, None, 2, 1.0)
    dx, dA, dB, _, _, _ = block_lowrank_bwd_triton(torch.randn(0, 12), x, W, A, B, None, None, 2, 1.0)
    assert y.shape == (0, 12) and dx.shape == (0, 8)
    assert torch.equal(dA, torch.zeros_like(A)) and torch.equal(dB, torch.zeros_like(B))


def test_bad_inputs_are_named():
    x, W = torch.randn(4, 8), torch.randn(12, 8)
    with pytest.raises(TypeError, match="A is torch.float64"):
        lowrank_fwd_triton(x, W, None, torch.randn(2, 8, dtype=F64), torch.randn(12, 2), None, 1.0)
    with pytest.raises(ValueError, match="k=3 must divide"):
        block_lowrank_fwd_triton(x, W, None, torch.randn(3, 2, 3), torch.randn(3, 3, 4), None, None, 3, 1.0)
    with pytest.raises(ValueError, match=r"A \[r, in\] and B \[out, r\]"):
        lowrank_fwd_triton(x, W, None, torch.randn(2, 8), torch.randn(2, 12), None, 1.0)
    with pytest.raises(ValueError, match=r"dy is \(4, 5\), expected \(4, 12\)"):
        lowrank_bwd_triton(torch.randn(4, 5), x, W, torch.randn(2, 8), torch.randn(12, 2), None, 1.0)
    with pytest.raises(TypeError, match="float64 is not supported"):
        lowrank_fwd_triton(x.double(), W.double(), None, torch.randn(2, 8).double(),
                               torch.randn(12, 2).double(), None, 1.0)


# ---------------------------------------------------------------------------- CUDA registration
def test_cuda_kernels_registered():
    for op in ("lowrank_linear", "lowrank_linear_backward", "block_lowrank_linear", "block_lowrank_linear_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"peftcompile::{op}", "CUDA"), op


def test_cuda_entry_points_match_reference():
    """The functions registered for CUDA, run on CPU tensors through the interpreter."""
    x, W, b = torch.randn(2, 9, 16), torch.randn(16, 24).t(), torch.randn(24)  # W: Conv1D-style view
    A, B, D = torch.randn(4, 16), torch.randn(24, 4), torch.rand(4)
    dy = torch.randn(2, 9, 24)
    assert dispatch_cuda.use_triton(x, W, b, A, B, D)
    torch.testing.assert_close(dispatch_cuda.lowrank_linear_cuda(x, W, b, A, B, D, 0.5),
                               ops.lowrank_linear_ref(x, W, b, A, B, D, 0.5), atol=1e-4, rtol=1e-4)
    for got, ref in zip(dispatch_cuda.lowrank_linear_backward_cuda(dy, x, W, A, B, None, 0.5),
                        ops.lowrank_linear_backward(dy, x, W, A, B, None, 0.5)):
        assert got.shape == ref.shape  # dD: empty tensor when D is None
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    Ag, Bg, Ah, Bh = torch.randn(2, 8, 4), torch.randn(2, 4, 12), torch.randn(3, 16), torch.randn(24, 3)
    torch.testing.assert_close(dispatch_cuda.block_lowrank_linear_cuda(x, W, b, Ag, Bg, Ah, Bh, 2, 0.5),
                               ops.block_lowrank_linear_ref(x, W, b, Ag, Bg, Ah, Bh, 2, 0.5), atol=1e-4, rtol=1e-4)
    for got, ref in zip(dispatch_cuda.block_lowrank_linear_backward_cuda(dy, x, W, Ag, Bg, None, None, 2, 0.5),
                        ops.block_lowrank_linear_backward(dy, x, W, Ag, Bg, None, None, 2, 0.5)):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_reference_fallbacks():
    x, W = torch.randn(4, 8), torch.randn(6, 8)
    A, B = torch.randn(2, 8), torch.randn(6, 2)
    assert not dispatch_cuda.use_triton(x, W, None, A.double(), B, None)  # mixed dtypes
    assert not dispatch_cuda.use_triton(x[:0], W, None, A, B, None)  # no tokens
    assert not dispatch_cuda.use_triton(x.double(), W.double(), None, A.double(), B.double(), None)
    # a hybrid rank beyond the dY pass's accumulator: reference math, same results
    Ag, Bg, Ah, Bh = torch.randn(2, 4, 2), torch.randn(2, 2, 3), torch.randn(130, 8), torch.randn(6, 130)
    dy = torch.randn(4, 6)
    for got, ref in zip(dispatch_cuda.block_lowrank_linear_backward_cuda(dy, x, W, Ag, Bg, Ah, Bh, 2, 0.1),
                        ops.block_lowrank_linear_bwd_ref(dy, x, W, Ag, Bg, Ah, Bh, 2, 0.1)):
        if ref is None:  # dxa: no separate adapter input
            assert got.numel() == 0
            continue
        torch.testing.assert_close(got, ref)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not dispatch_cuda.use_triton(x, W, None, A, B, None)  # atomics are not deterministic
        torch.testing.assert_close(dispatch_cuda.lowrank_linear_cuda(x, W, None, A, B, None, 2.0),
                                   ops.lowrank_linear_ref(x, W, None, A, B, None, 2.0))
    finally:
        torch.use_deterministic_algorithms(prev)


# ---------------------------------------------------------------------------- the GPU check script
def test_kernel_check_script_tiny():
    """benchmarks/kernel_check.py (what benchmarks/gpu_check.sh runs on CUDA) in its --tiny CPU
    mode: a few of its cases pass, and a wrong kernel makes it fail (exit status 1)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_check.py"
    spec = importlib.util.spec_from_file_location("kernel_check", path)
    kc = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("kernel_check", kc)  # dataclasses resolve annotations through it
    spec.loader.exec_module(kc)
    tiny = kc.cases(tiny=True)
    assert {c.op for c in tiny} == {"lowrank", "block"} and any(c.xa for c in tiny) and any(c.adapter_fp32 for c in tiny)
    for c in [tiny[0], next(c for c in tiny if c.adapter_fp32 and c.xa)]:
        ok, lines = kc.check(c, "bf16", "cpu", seed=0)
        assert ok, lines
    assert kc.main(["--tiny", "--device", "cpu", "--dtypes", "fp32", "--max-cases", "2"]) == 0

    real = dispatch_cuda.lowrank_linear_cuda
    try:  # a kernel off by a little must be caught
        dispatch_cuda.lowrank_linear_cuda = lambda *a: real(*a) * (1 + 1e-3)
        ok, lines = kc.check(tiny[0], "fp32", "cpu", seed=0)
        assert not ok and any("FAIL" in ln for ln in lines)
    finally:
        dispatch_cuda.lowrank_linear_cuda = real
