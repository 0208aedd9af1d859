"""The Triton adapter kernels compile for Hopper (sm_90) and use its tensor-core path.

No GPU is needed: the launchers run on ``meta`` tensors with the design's Llama shapes
(M = 4096, in = 2048, out = 2048 / 8192, r = 64, k = 4, bf16) and a stub records every
launch; each recorded launch is then compiled ahead of time for sm_90 with Triton's own
ptxas, specialised the way Triton specialises a real launch (ints equal to 1 become
constants, multiples of 16 are marked divisible, pointers 16-byte aligned). Checked per
kernel and autotune config: it compiles, its PTX issues ``wgmma`` (Hopper's warpgroup
MMA; a plain ``mma.sync`` would be the slower path), loads are pipelined through shared
memory in 16-byte ``cp.async`` copies (strided views included; rank-16 hybrid tiles are
exempt, too small to give each thread 16 B), fp32 sums are relaxed
``red`` reductions (no acq_rel fences), shared memory fits an H100 block (227 KB) and
nothing spills to local memory. Runs in a subprocess because the other tests import Triton in interpreter
mode. What this does not show: numerics or speed on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")

H100_SMEM = 232448  # bytes of dynamic shared memory a block may use on H100 / H200


def _worker(all_configs: bool) -> None:
    """Record the launches of every launcher on meta tensors, compile them for sm_90, print JSON.

    Each distinct launch variant (kernel, constexpr flags, argument types) is compiled with
    its autotune list's first config, or with every config when ``all_configs``.
    """
    import re
    import shutil

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from peftcompile.kernels import triton_gemm as tg
    from peftcompile.kernels.triton_block_lowrank_linear import block_lowrank_bwd_triton, block_lowrank_fwd_triton
    from peftcompile.kernels.triton_lowrank_linear import lowrank_bwd_triton, lowrank_fwd_triton

    launches = []

    def record(kernel, tuned, grid, args, meta, fixed, device):
        launches.append((tag, kernel, tuned, args, meta))

    tg.launch = record
    dev, dt = "meta", torch.bfloat16
    M, IN, r, k, h = 4096, 2048, 64, 4, 16

    def t(*shape):
        return torch.empty(*shape, dtype=dt, device=dev)

    x = t(M, IN)
    for out in (2048, 8192):
        W, b, dy = t(out, IN), t(out), t(M, out)
        tag = f"lora out={out}"
        lowrank_fwd_triton(x, W, b, t(r, IN), t(out, r), t(r), 1.0)
        lowrank_bwd_triton(dy, x, W, t(r, IN), t(out, r), t(r), 1.0)
        lowrank_bwd_triton(dy, x, W, t(r, IN), t(out, r), t(r), 1.0, config={"fuse_db": False})
        tag = f"gralora+hybrid out={out} (Conv1D weight view)"
        Wt = t(IN, out).t()
        A, B, Ah, Bh = t(k, IN // k, r), t(k, r, out // k), t(h, IN), t(out, h)
        block_lowrank_fwd_triton(x, Wt, b, A, B, Ah, Bh, k, 0.5)
        block_lowrank_bwd_triton(dy, x, Wt, A, B, Ah, Bh, k, 0.5)
        block_lowrank_bwd_triton(dy, x, Wt, A, B, Ah, Bh, k, 0.5, config={"fuse_db": False})
        tag = f"gralora+hybrid out={out}, separate adapter input (dropout)"
        block_lowrank_bwd_triton(dy, x, Wt, A, B, Ah, Bh, k, 0.5, xa=t(M, IN))

    tl_names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = shutil.which("cuobjdump", path=bin_dir)
    seen, results = set(), []
    for tag, kernel, tuned, args, meta in launches:
        names = kernel.arg_names
        sig, consts, attrs = {}, dict(meta), {}
        for name, val in zip(names, args):
            if isinstance(val, torch.Tensor):
                sig[name] = "*" + tl_names[val.dtype]
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
            elif isinstance(val, bool) or val is None:
                consts[name] = val
            elif isinstance(val, int):
                if val == 1:
                    consts[name] = 1
                else:
                    sig[name] = "i32" if -2**31 <= val < 2**31 else "i64"
                    if val % 16 == 0:
                        attrs[(names.index(name),)] = [["tt.divisibility", 16]]
            else:
                sig[name] = "fp32"
        named = dict(zip(names, args))
        for cfg in (tuned.configs if all_configs else tuned.configs[:1]):
            c = {**consts, **cfg.kwargs}
            key = (kernel.fn.__name__, json.dumps({n: str(v) for n, v in sorted(c.items())}),
                   json.dumps(sorted(sig.items())), cfg.num_warps, cfg.num_stages)
            if key in seen:
                continue
            seen.add(key)
            full_sig = {n: ("constexpr" if n in c else sig[n]) for n in names}
            src = ASTSource(kernel, full_sig, constexprs={(names.index(n),): v for n, v in c.items()},
                            attrs=attrs)
            ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
            ptx = ck.asm["ptx"]
            local = None
            if cuobjdump:
                path = f"/tmp/peftcompile_sm90_{os.getpid()}.cubin"
                with open(path, "wb") as f:
                    f.write(ck.asm["cubin"])
                usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
                os.remove(path)
                m = re.search(r"LOCAL:(\d+)", usage)
                local = int(m.group(1)) if m else None
            cp_sizes = re.findall(r"cp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(\w+)", ptx)
            results.append(dict(tag=tag, kernel=kernel.fn.__name__, config=str(cfg),
                                wgmma=ptx.count("wgmma.mma_async"), cp_async=len(cp_sizes),
                                cp_async_narrow=sum(int(v, 0) < 16 for v in cp_sizes),
                                fenced_atomics=len(re.findall(r"atom\.global\S*acq_rel", ptx)),
                                # a rank-16 operand tile (hybrid pair) is too small to hand
                                # every thread 16 B: narrow copies are expected there
                                tiny_operand=bool(0 < named.get("H", 64) < 64
                                                  or (named.get("N", 64) < 64 and "R" not in named)),
                                mma_sync=ptx.count("mma.sync"), shared=ck.metadata.shared, local=local))
    print(json.dumps(results))


def _compile(all_configs: bool) -> list[dict]:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        pytest.skip("Triton's bundled ptxas is missing: cannot compile for sm_90")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + (["--all"] if all_configs else []),
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"sm_90 compile worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(compiled: list[dict], at_least: int) -> None:
    assert {r["kernel"] for r in compiled} == {"_gemm_kernel", "_dy_side_kernel"}
    assert len(compiled) >= at_least, f"only {len(compiled)} kernel variants recorded"
    for r in compiled:
        where = f"{r['kernel']} [{r['tag']}] {r['config']}"
        assert r["wgmma"] > 0, f"{where}: no wgmma (mma.sync count {r['mma_sync']})"
        assert r["cp_async"] > 0, f"{where}: loads not pipelined through shared memory"
        if not r["tiny_operand"]:
            assert r["cp_async_narrow"] == 0, f"{where}: {r['cp_async_narrow']} cp.async copies under 16 B"
        assert r["fenced_atomics"] == 0, f"{where}: acq_rel atomics (sums should be relaxed reds)"
        assert r["shared"] <= H100_SMEM, f"{where}: {r['shared']} B shared memory > {H100_SMEM}"
        if r["local"] is not None:
            assert r["local"] == 0, f"{where}: {r['local']} B of local memory (register spills)"


def test_every_launch_variant_compiles_for_hopper():
    """Each distinct launch (fwd/bwd, LoRA/RaSA/GraLoRA+hybrid) with its first autotune config."""
    _check(_compile(all_configs=False), at_least=14)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PEFTCOMPILE_SM90_ALL") != "1",
                    reason="every autotune config (~2.5 min cold): set PEFTCOMPILE_SM90_ALL=1")
def test_every_autotune_config_compiles_for_hopper():
    _check(_compile(all_configs=True), at_least=40)


if __name__ == "__main__":
    _worker(all_configs="--all" in sys.argv)
