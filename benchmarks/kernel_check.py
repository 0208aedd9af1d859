"""The Triton kernels of ``torch.ops.peftcompile.*`` against the reference math, and one projection's speed.

    python benchmarks/kernel_check.py --device cuda                  # odd design-scale shapes, fp32/bf16/fp16
    TRITON_INTERPRET=1 python benchmarks/kernel_check.py --tiny      # same checks, tiny shapes, CPU interpreter
    python benchmarks/kernel_check.py --device cuda --bench          # + one projection fwd+bwd: fused vs frozen

Correctness: every case runs the functions registered for CUDA (``peftcompile.kernels.dispatch_cuda``,
asserting they take the Triton path, not the reference fallback) forward and backward, and
compares y, dx, dA, dB (dD, dA_h, dB_h, dxa) with the reference math of
``peftcompile.kernels.ops`` evaluated in float64 from the same (rounded) inputs. Pass when
  error(triton) <= 2 * error(torch reference run in the working dtype) + eps(dtype) * max|ref|
(within the reference's own rounding), and for fp32 also error <= 1e-4 * max|ref|.
fp32 adapters on a 16-bit base are held to the reference run with the adapter in the base
dtype (what the Triton path computes, as autocast would), see dispatch_cuda.
Shapes (full): M = 4133 tokens (not a multiple of any tile), in = out = 4096 + 64,
r in {8, 16, 64, 128}, k in {1, 2, 4, 8} (k = 1: the LoRA op; RaSA's diagonal D on some),
a hybrid pair, a separate adapter input (dropout) and fp32 adapters on 16-bit bases.
On CUDA each kernel runs with the first config of its autotune list (compiling every config
would take minutes; ``--autotune`` runs the autotuners instead).

Speed (``--bench``, CUDA): one projection, design shapes (M = 4096, in = 2048, out = 2048 and 8192,
r = 64, bf16), fwd + bwd (dx and the adapter grads; W frozen): frozen ``F.linear`` vs the
fused GraLoRA k=4 and LoRA ops vs the same reference math unfused (eager), with
``triton.testing.do_bench``. Not a test: it prints the ratios.
Exits 1 if any correctness case fails. Written to run on older torch / triton too (no
torch-2.13-only APIs); prints the versions first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

F64 = torch.float64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Case:
    op: str  # "lowrank" | "block"
    M: int
    IN: int
    OUT: int
    r: int
    k: int = 1
    h: int = 0  # hybrid rank (block)
    use_d: bool = False  # RaSA's diagonal (lowrank)
    xa: bool = False  # separate adapter input (dropout output)
    adapter_fp32: bool = False  # fp32 adapter on a 16-bit base
    bias: bool = True
    transposed: bool = False  # W read as the .t() view of an [in, out] store (Conv1D)

    def name(self, dt: str) -> str:
        extra = [f"h{self.h}" if self.h else "", "D" if self.use_d else "", "xa" if self.xa else "",
                 "A32" if self.adapter_fp32 else "", "Wt" if self.transposed else ""]
        return f"{self.op} {dt} M{self.M} {self.IN}->{self.OUT} r{self.r} k{self.k} " + " ".join(e for e in extra if e)


def cases(tiny: bool) -> list[Case]:
    if tiny:
        M, IN, OUT, ranks, ks = 37, 48, 40, (8, 16), (1, 2, 4)
    else:
        M, IN, OUT, ranks, ks = 4133, 4096 + 64, 4096 + 64, (8, 16, 64, 128), (1, 2, 4, 8)
    out = []
    for r, k in itertools.product(ranks, ks):
        if r % k:
            continue
        if k == 1:
            out.append(Case("lowrank", M, IN, OUT, r, use_d=r == ranks[-1]))
        else:
            out.append(Case("block", M, IN, OUT, r, k, transposed=r == ranks[0]))
    kb = ks[2]
    out += [
        Case("block", M, IN, OUT, ranks[-1], kb, h=16 if not tiny else 4),  # hybrid pair
        Case("lowrank", M, IN, OUT, ranks[0], xa=True, use_d=True),  # dropout input
        Case("block", M, IN, OUT, ranks[-1], kb, h=8 if not tiny else 2, xa=True),
        Case("lowrank", M, IN, OUT, ranks[-1], adapter_fp32=True),  # PEFT's fp32 adapters
        Case("block", M, IN, OUT, ranks[-1], kb, adapter_fp32=True, xa=True),
    ]
    return out


def _tensors(c: Case, dt: torch.dtype, dev: str, seed: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0, dtype=None):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype or dt).to(dev)

    at = torch.float32 if c.adapter_fp32 else dt
    x = rnd(c.M, c.IN)
    W = rnd(c.IN, c.OUT, scale=c.IN ** -0.5).t() if c.transposed else rnd(c.OUT, c.IN, scale=c.IN ** -0.5)
    t = dict(x=x, weight=W, bias=rnd(c.OUT) if c.bias else None)
    if c.op == "lowrank":
        t.update(A=rnd(c.r, c.IN, scale=c.IN ** -0.5, dtype=at), B=rnd(c.OUT, c.r, scale=c.r ** -0.5, dtype=at),
                 D=(torch.rand(c.r, generator=g, dtype=F64) + 0.5).to(at).to(dev) if c.use_d else None)
    else:
        ib, ob = c.IN // c.k, c.OUT // c.k
        t.update(A=rnd(c.k, ib, c.r, scale=ib ** -0.5, dtype=at), B=rnd(c.k, c.r, ob, scale=c.r ** -0.5, dtype=at),
                 A_h=rnd(c.h, c.IN, scale=c.IN ** -0.5, dtype=at) if c.h else None,
                 B_h=rnd(c.OUT, c.h, scale=c.h ** -0.5, dtype=at) if c.h else None)
    if c.xa:  # dropout(x.to(adapter dtype)), p = 0.1
        keep = (torch.rand(c.M, c.IN, generator=g) > 0.1).to(dev)
        t["xa"] = (x.to(at) * keep / 0.9).to(at)
    else:
        t["xa"] = None
    t["dy"] = rnd(c.M, c.OUT)
    return t


def _ref_grads(c: Case, t: dict, dtype: torch.dtype | None) -> dict:
    """y and grads of the reference math in ``dtype`` (None: float64 of the same tensors)."""
    from peftcompile.kernels import ops

    names = ["x", "weight", "bias", "A", "B"] + (["D"] if c.op == "lowrank" else ["A_h", "B_h"]) + ["xa"]
    leaves = {}
    for n in names:
        v = t[n]
        if v is None:
            leaves[n] = None
            continue
        v = v.detach().to(F64) if dtype is None else v.detach()
        leaves[n] = v.requires_grad_(n not in ("weight", "bias"))
    s = 0.75
    if c.op == "lowrank":
        y = ops.lowrank_linear_ref(leaves["x"], leaves["weight"], leaves["bias"], leaves["A"], leaves["B"],
                                   leaves["D"], s, leaves["xa"])
    else:
        y = ops.block_lowrank_linear_ref(leaves["x"], leaves["weight"], leaves["bias"], leaves["A"], leaves["B"],
                                         leaves["A_h"], leaves["B_h"], c.k, s, leaves["xa"])
    req = [n for n in names if leaves[n] is not None and leaves[n].requires_grad]
    dy = t["dy"].to(F64) if dtype is None else t["dy"]
    grads = torch.autograd.grad(y, [leaves[n] for n in req], dy)
    return {"y": y.detach(), **{f"d{n}": gr for n, gr in zip(req, grads)}}


def _triton(c: Case, t: dict) -> dict:
    from peftcompile.kernels import dispatch_cuda as dc

    s = 0.75
    if c.op == "lowrank":
        ad = (t["A"], t["B"], t["D"])
        xa_, *ad_ = dc._adapter_in_base_dtype(t["x"], t["xa"], *ad)
        if not dc.use_triton(t["x"], t["weight"], t["bias"], *ad_, xa_):
            raise AssertionError("the Triton path does not apply (the reference fallback would run)")
        y = dc.lowrank_linear_cuda(t["x"], t["weight"], t["bias"], *ad, s, t["xa"])
        dx, dA, dB, dD, dxa = dc.lowrank_linear_backward_cuda(t["dy"], t["x"], t["weight"], *ad, s, t["xa"])
        out = dict(y=y, dx=dx, dA=dA, dB=dB, dD=dD, dxa=dxa)
    else:
        ad = (t["A"], t["B"], t["A_h"], t["B_h"])
        xa_, *ad_ = dc._adapter_in_base_dtype(t["x"], t["xa"], *ad)
        if not dc.use_triton(t["x"], t["weight"], t["bias"], *ad_, xa_) or not dc._hybrid_fits(t["A_h"]):
            raise AssertionError("the Triton path does not apply (the reference fallback would run)")
        y = dc.block_lowrank_linear_cuda(t["x"], t["weight"], t["bias"], *ad, c.k, s, t["xa"])
        dx, dA, dB, dA_h, dB_h, dxa = dc.block_lowrank_linear_backward_cuda(t["dy"], t["x"], t["weight"], *ad, c.k,
                                                                            s, t["xa"])
        out = dict(y=y, dx=dx, dA=dA, dB=dB, dA_h=dA_h, dB_h=dB_h, dxa=dxa)
    return {k: v for k, v in out.items() if v is not None and v.numel() > 0}


def check(c: Case, dt_name: str, dev: str, seed: int) -> tuple[bool, list[str]]:
    dt = DTYPES[dt_name]
    t = _tensors(c, dt, dev, seed)
    got = _triton(c, t)
    exact = _ref_grads(c, t, None)
    # fp32 adapters on a 16-bit base: the Triton path computes the adapter in the base dtype
    # (dispatch_cuda._adapter_in_base_dtype), as autocast would; its yardstick is the reference
    # run that way, not the fp32 one (whose adapter grads are ~1e-7 accurate).
    cast = {n: (v.to(dt) if n in ("A", "B", "D", "A_h", "B_h", "xa") and v is not None else v) for n, v in t.items()}
    native = _ref_grads(c, cast if c.adapter_fp32 else t, dt)
    lines, ok = [], True
    if set(got) != set(exact):
        return False, [f"outputs {sorted(got)} != reference grads {sorted(exact)}"]
    for k in sorted(exact):
        ref = exact[k]
        scale = max(ref.abs().max().item(), 1e-6)
        e_tr = (got[k].to(F64) - ref).abs().max().item()
        e_nat = (native[k].to(F64) - ref).abs().max().item()
        want_dtype = t[k[1:]].dtype if k[1:] in t and t[k[1:]] is not None else t["x"].dtype
        eps = torch.finfo(dt).eps  # one rounding in the working (base) dtype
        bound = 2 * e_nat + eps * scale
        good = e_tr <= bound and got[k].dtype == want_dtype and got[k].shape == ref.shape
        if dt == torch.float32:
            good = good and e_tr <= 1e-4 * scale
        ok &= good
        lines.append(f"    {k:5s} rel err triton {e_tr / scale:.2e}  torch-{dt_name} {e_nat / scale:.2e}  "
                     f"{'ok' if good else 'FAIL'}")
    return ok, lines


def _first_config_launch(kernel, tuned, grid, args, meta, fixed, device) -> None:
    """Launch with the first config of the autotune list (a real Hopper config) instead of
    benchmarking them all: the checks need correct kernels, not the fastest ones."""
    if device.type == "cpu":
        return kernel[grid](*args, **meta, **fixed)
    cfg = tuned.configs[0]
    kw = {k: v for k, v in cfg.kwargs.items() if k not in meta}
    kernel[grid](*args, **meta, **kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ---------------------------------------------------------------- speed
def bench(log) -> list[dict]:
    import torch.nn.functional as F
    from triton.testing import do_bench

    from peftcompile.kernels import ops

    dev, dt, M, IN, r = "cuda", torch.bfloat16, 4096, 2048, 64
    rows = []
    for OUT in (2048, 8192):
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(dev, dt)

        x = rnd(M, IN).requires_grad_(True)
        W, b = rnd(OUT, IN, scale=IN ** -0.5), None
        dy = rnd(M, OUT)
        lora = [rnd(r, IN, scale=0.02).requires_grad_(True), rnd(OUT, r, scale=0.02).requires_grad_(True)]
        gral = [rnd(4, IN // 4, r, scale=0.02).requires_grad_(True), rnd(4, r, OUT // 4, scale=0.02).requires_grad_(True)]

        def step(fn):
            def run():
                y = fn()
                y.backward(dy)
            return run

        variants = {
            "frozen F.linear": step(lambda: F.linear(x, W, b)),
            "LoRA r64 fused op": step(lambda: torch.ops.peftcompile.lowrank_linear(x, W, b, *lora, None, 2.0)),
            "LoRA r64 unfused (eager)": step(lambda: ops.lowrank_linear_ref(x, W, b, *lora, None, 2.0)),
            "GraLoRA r64 k4 fused op": step(lambda: torch.ops.peftcompile.block_lowrank_linear(
                x, W, b, *gral, None, None, 4, 2.0)),
            "GraLoRA r64 k4 unfused (eager)": step(lambda: ops.block_lowrank_linear_ref(
                x, W, b, *gral, None, None, 4, 2.0)),
        }
        times = {}
        for name, fn in variants.items():
            fn()  # autotune / warm up
            times[name] = do_bench(fn, warmup=25, rep=200)
            x.grad = None
            for p in lora + gral:
                p.grad = None
        base = times["frozen F.linear"]
        for name, ms in times.items():
            row = dict(M=M, IN=IN, OUT=OUT, r=r, variant=name, ms=ms, vs_frozen=ms / base)
            rows.append(row)
            log(f"  {IN}->{OUT}  {name:32s} {ms:7.3f} ms  {ms / base:5.2f}x frozen")
    return rows


def versions(dev: str) -> str:
    import importlib

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for mod in ("triton", "transformers", "peft"):
        try:
            parts.append(f"{mod} {importlib.import_module(mod).__version__}")
        except Exception:  # an optional package may be missing
            parts.append(f"{mod} -")
    if dev == "cuda":
        parts.append(f"device {torch.cuda.get_device_name()} (cc {'.'.join(map(str, torch.cuda.get_device_capability()))})"
                     f", CUDA {torch.version.cuda}")
    else:
        parts.append(f"device CPU, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU interpreter)")
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--max-cases", type=int, default=None, help="only the first N cases per dtype")
    ap.add_argument("--autotune", action="store_true", help="CUDA: run the autotuners instead of the first config")
    ap.add_argument("--bench", action="store_true", help="CUDA: time one projection fused vs frozen")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("kernel_check on CPU needs TRITON_INTERPRET=1 in the environment (set before triton is imported)")
        return 2
    import peftcompile.kernels.dispatch_cuda  # noqa: F401  (registers the CUDA kernels)
    from peftcompile.kernels import triton_gemm

    autotuned_launch = triton_gemm.launch
    if a.device == "cuda" and not a.autotune:
        triton_gemm.launch = _first_config_launch
    try:
        return _run(a, triton_gemm, autotuned_launch)
    finally:
        triton_gemm.launch = autotuned_launch


def _run(a, triton_gemm, autotuned_launch) -> int:

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(versions(a.device))
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference and kernels both exact fp32
    todo = cases(a.tiny)
    failed, results = [], []
    t0 = time.perf_counter()
    for dt_name in a.dtypes.split(","):
        for i, c in enumerate(todo[:a.max_cases]):
            name = c.name(dt_name)
            t1 = time.perf_counter()
            try:
                ok, lines = check(c, dt_name, a.device, seed=i)
            except Exception as e:  # a crash is a failed case; go on with the others
                ok, lines = False, ["    " + ln for ln in traceback.format_exception_only(type(e), e)]
            log(f"{'ok  ' if ok else 'FAIL'} {name}  ({time.perf_counter() - t1:.1f} s)")
            if not ok or a.tiny:
                for ln in lines:
                    log(ln)
            results.append(dict(case=asdict(c), dtype=dt_name, ok=ok, detail=lines))
            if not ok:
                failed.append(name)
    log(f"kernel check: {len(results) - len(failed)}/{len(results)} cases ok in {time.perf_counter() - t0:.0f} s")
    rows = []
    if a.bench:
        if a.device != "cuda":
            log("--bench needs CUDA; skipped")
        else:
            triton_gemm.launch = autotuned_launch
            log("one projection, fwd+bwd (dx + adapter grads, W frozen), bf16, do_bench ms:")
            rows = bench(log)
    if a.json:
        a.json.write_text(json.dumps(dict(versions=versions(a.device), cases=results, bench=rows), indent=1))
    for f in failed:
        log(f"FAILED: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
