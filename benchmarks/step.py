"""Training-step benchmark: frozen base vs PEFT vs peftcompile on a Llama-shaped stack.

One step = forward of an HF ``LlamaModel`` on ``inputs_embeds`` (requires grad, as for a
stack inside a larger model), loss = mean(y^2) in fp32, backward (dx and the adapter
grads; no optimizer step). Every provider runs the same base weights and the same input,
adapters on all 7 projections with random (non-zero) weights.

    python benchmarks/step.py --device cuda              # design sizes, bf16
    python benchmarks/step.py --device cpu --tiny        # tiny stack, fp32

Prints ms/step (median; ``triton.testing.do_bench`` on CUDA, one variant at a time; on CPU
perf_counter per step, all variants built first and timed round-robin so that the drift of
a shared machine spreads over all of them),
peak memory (CUDA ``max_memory_allocated``; n/a on CPU), the first step's seconds (compile
warm-up) and the ratios vs the frozen compiled step and vs PEFT compiled.
This is not a test: it asserts nothing about speed; it only checks that the compiled
variants compute the same loss as their eager twin.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peftcompile as pc  # noqa: E402
import peftcompile.backend  # noqa: E402,F401  (registers backend="peftcompile")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Shape:
    hidden: int = 2048
    inter: int = 8192
    layers: int = 8
    heads: int = 16
    batch: int = 4
    seq: int = 1024
    rank: int = 64
    k: int = 4


TINY = Shape(hidden=128, inter=384, layers=2, heads=4, batch=2, seq=128, rank=16, k=4)


# ---------------------------------------------------------------- providers
def _base(shape: Shape, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=shape.hidden, intermediate_size=shape.inter,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.heads, max_position_embeddings=max(shape.seq, 64),
                      attention_dropout=0.0)
    m = LlamaModel(cfg).to(device=device, dtype=dtype)
    m.requires_grad_(False)
    return m


def _randomize_trainable_(m: torch.nn.Module) -> torch.nn.Module:
    # Zero B matrices could flatter the timings (METHOD.md); give every adapter tensor values.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return m


def frozen(shape, device, dtype):
    return _base(shape, device, dtype)


def peft_lora(shape, device, dtype):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=shape.rank, lora_alpha=2 * shape.rank, target_modules=PROJ, lora_dropout=0.0)
    # autocast_adapter_dtype=False keeps adapters in the base dtype, as peftcompile does.
    return _randomize_trainable_(get_peft_model(_base(shape, device, dtype), cfg, autocast_adapter_dtype=False))


def peft_gralora(shape, device, dtype):
    from peft import GraloraConfig, get_peft_model

    cfg = GraloraConfig(r=shape.rank, gralora_k=shape.k, alpha=2 * shape.rank, target_modules=PROJ)
    return _randomize_trainable_(get_peft_model(_base(shape, device, dtype), cfg, autocast_adapter_dtype=False))


def pc_lora(shape, device, dtype):
    m = _base(shape, device, dtype)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=shape.rank, alpha=2.0 * shape.rank), targets=PROJ))
    return _randomize_trainable_(m)


def pc_gralora(shape, device, dtype):
    m = _base(shape, device, dtype)
    pc.adapt(m, pc.AdapterSpec(pc.GraLoRA(r=shape.rank, k=shape.k, alpha=2.0 * shape.rank), targets=PROJ))
    return _randomize_trainable_(m)


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # "frozen" | "lora" | "gralora": which rows a ratio compares
    provider: str  # "frozen" | "peft" | "peftcompile"
    build: Callable
    backend: str | None  # None = eager
    options: dict | None = None


VARIANTS = [
    Variant("frozen eager", "frozen", "frozen", frozen, None),
    Variant("frozen compiled", "frozen", "frozen", frozen, "inductor"),
    Variant("PEFT LoRA eager", "lora", "peft", peft_lora, None),
    Variant("PEFT LoRA compiled", "lora", "peft", peft_lora, "inductor"),
    Variant("peftcompile LoRA eager", "lora", "peftcompile", pc_lora, None),
    Variant("peftcompile LoRA inductor (no lowering)", "lora", "peftcompile", pc_lora, "peftcompile",
            {"peftcompile.fuse": False}),
    Variant("peftcompile LoRA backend", "lora", "peftcompile", pc_lora, "peftcompile"),
    Variant("peftcompile LoRA backend (ops opaque)", "lora", "peftcompile", pc_lora, "peftcompile",
            {"peftcompile.decompose": False}),
    Variant("PEFT GraLoRA eager", "gralora", "peft", peft_gralora, None),
    Variant("PEFT GraLoRA compiled", "gralora", "peft", peft_gralora, "inductor"),
    Variant("peftcompile GraLoRA eager", "gralora", "peftcompile", pc_gralora, None),
    Variant("peftcompile GraLoRA inductor (no lowering)", "gralora", "peftcompile", pc_gralora, "peftcompile",
            {"peftcompile.fuse": False}),
    Variant("peftcompile GraLoRA backend", "gralora", "peftcompile", pc_gralora, "peftcompile"),
    Variant("peftcompile GraLoRA backend (ops opaque)", "gralora", "peftcompile", pc_gralora, "peftcompile",
            {"peftcompile.decompose": False}),
]


# ---------------------------------------------------------------- timing
@dataclass
class Result:
    name: str
    family: str
    provider: str
    compiled: bool
    ms: float
    ms_spread: tuple[float, float]  # (p20, p80)
    peak_mib: float | None
    first_step_s: float
    loss: float
    fused: dict


def _step_fn(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        x.grad = None
        for p in params:
            p.grad = None
        y = model(inputs_embeds=x, use_cache=False).last_hidden_state
        loss = y.float().square().mean()
        loss.backward()
        return loss

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _cuda_time(step: Callable, iters: int) -> tuple[float, tuple[float, float]]:
    from triton.testing import do_bench

    med, p20, p80 = do_bench(step, warmup=100, rep=max(iters * 10, 500), quantiles=[0.5, 0.2, 0.8])
    return med, (p20, p80)


@dataclass
class Prepared:
    variant: Variant
    step: Callable
    first_step_s: float
    loss: float
    fused: dict


def prepare(v: Variant, shape: Shape, device: str, dtype: torch.dtype) -> Prepared:
    """Build the model, compile it if asked, run the first step (its time is the compile warm-up)."""
    torch._dynamo.utils.counters.clear()
    model = v.build(shape, device, dtype)
    if v.backend is not None:
        model = torch.compile(model, backend=v.backend, options=v.options)
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(shape.batch, shape.seq, shape.hidden, generator=g).to(device=device, dtype=dtype)
    x.requires_grad_(True)
    step = _step_fn(model, x)
    _sync(device)
    t0 = time.perf_counter()
    loss = step()
    _sync(device)
    first = time.perf_counter() - t0
    step()  # a recompile on the second step would otherwise land in the timings
    fused = dict(torch._dynamo.utils.counters["peftcompile"])
    return Prepared(v, step, first, float(loss.detach()), fused)


def _result(p: Prepared, ms: float, spread: tuple[float, float], peak: float | None) -> Result:
    v = p.variant
    return Result(v.name, v.family, v.provider, v.backend is not None, ms, spread, peak, p.first_step_s,
                  p.loss, p.fused)


def run_cuda(variants: list[Variant], shape: Shape, dtype: torch.dtype, iters: int, log) -> list[Result]:
    """One variant at a time (the GPU is ours alone): peak memory of one step, then do_bench's median."""
    out = []
    for v in variants:
        try:
            p = prepare(v, shape, "cuda", dtype)
        except Exception as e:  # e.g. peft missing on the GPU machine: report it, go on with the rest
            print(f"  {v.name:45s} FAILED to build/compile: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                  flush=True)
            torch._dynamo.reset()
            continue
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        p.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
        ms, spread = _cuda_time(p.step, iters)
        out.append(_result(p, ms, spread, peak))
        log(out[-1])
        del p
        torch._dynamo.reset()  # compiled code must not keep this variant's tensors alive
        gc.collect()
        torch.cuda.empty_cache()
    return out


def run_cpu(variants: list[Variant], shape: Shape, dtype: torch.dtype, iters: int, rounds: int,
            log) -> list[Result]:
    """Build and warm every variant, then time them round-robin: a shared, loaded CPU drifts, and
    interleaving spreads the drift over all variants instead of whichever ran during it."""
    prepared = []
    for v in variants:
        prepared.append(prepare(v, shape, "cpu", dtype))
        print(f"  prepared {v.name:45s} first step {prepared[-1].first_step_s:6.1f} s", flush=True)
    samples: dict[str, list[float]] = {p.variant.name: [] for p in prepared}
    per_round = max(1, iters // rounds)
    for _ in range(rounds):
        for p in prepared:
            for _ in range(per_round):
                t0 = time.perf_counter()
                p.step()
                samples[p.variant.name].append((time.perf_counter() - t0) * 1e3)
    out = []
    for p in prepared:
        ts = samples[p.variant.name]
        q = statistics.quantiles(ts, n=5)
        out.append(_result(p, statistics.median(ts), (q[0], q[-1]), None))
        log(out[-1])
    return out


# ---------------------------------------------------------------- report
def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table(results: list[Result]) -> str:
    by = {r.name: r for r in results}
    frozen_c = by.get("frozen compiled")
    peft_c = {"lora": by.get("PEFT LoRA compiled"), "gralora": by.get("PEFT GraLoRA compiled")}
    head = ("| variant | ms/step (median) | p20-p80 ms | peak MiB | first step s | vs frozen compiled "
            "| vs PEFT compiled | fused regions |")
    lines = [head, "|" + "---|" * 8]
    for r in results:
        pc_ = peft_c.get(r.family)
        fused = ", ".join(f"{k}={v}" for k, v in sorted(r.fused.items())) or "-"
        lines.append(
            f"| {r.name} | {r.ms:.2f} | {r.ms_spread[0]:.2f}-{r.ms_spread[1]:.2f} | "
            f"{'n/a' if r.peak_mib is None else f'{r.peak_mib:.0f}'} | {r.first_step_s:.1f} | "
            f"{_ratio(r.ms, frozen_c.ms if frozen_c else None)} | "
            f"{_ratio(r.ms, pc_.ms if pc_ else None) if r.family != 'frozen' else '-'} | {fused} |"
        )
    return "\n".join(lines)


def check_losses(results: list[Result], dtype: torch.dtype) -> list[str]:
    """Compiled variants must compute their eager twin's loss (a broken lowering shows here)."""
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    eager = {(r.family, r.provider): r.loss for r in results if not r.compiled}
    bad = []
    for r in results:
        ref = eager.get((r.family, r.provider))
        if r.compiled and ref is not None and abs(r.loss - ref) > tol * max(1.0, abs(ref)):
            bad.append(f"{r.name}: loss {r.loss:.6g} vs eager {ref:.6g}")
    return bad


def versions(device: str) -> str:
    import transformers

    try:
        import peft

        peft_v = peft.__version__
    except ImportError:  # the PEFT rows then fail and are reported, the others still run
        peft_v = "not installed"
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    dev = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    threads = torch.get_num_threads()
    return (f"device {device} ({dev}, torch threads {threads}); python {platform.python_version()}, "
            f"torch {torch.__version__}, triton {triton_v}, transformers {transformers.__version__}, peft {peft_v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help=f"tiny stack ({TINY}); the default on CPU")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    for f in dataclasses.fields(Shape):
        ap.add_argument(f"--{f.name}", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None, help="timed steps per variant (CPU default 30)")
    ap.add_argument("--rounds", type=int, default=5, help="CPU: round-robin rounds the timed steps are split in")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads")
    ap.add_argument("--variants", default=None,
                    help="comma-separated substrings of variant names to run; '=name' matches one name exactly")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--warm-cache", action="store_true",
                    help="let inductor reuse its on-disk caches (default: off, so first-step times are cold compiles)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")
    shape = dataclasses.replace(TINY if (a.tiny or a.device == "cpu") else Shape(),
                                **{f.name: getattr(a, f.name) for f in dataclasses.fields(Shape)
                                   if getattr(a, f.name) is not None})
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    iters = a.iters or (30 if a.device == "cpu" else 50)
    if a.threads:
        torch.set_num_threads(a.threads)
    # every variant keeps its compiled code: more cache entries than dynamo's default 8
    # (the name changed across torch versions; the GPU machine may run an older one)
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not a.warm_cache:
        torch._inductor.config.force_disable_caches = True
    def wanted(name: str) -> bool:
        if a.variants is None:
            return True
        specs = [s.strip().lower() for s in a.variants.split(",")]
        return any(name.lower() == s[1:] if s.startswith("=") else s in name.lower() for s in specs)

    chosen = [v for v in VARIANTS if wanted(v.name)]
    print(versions(a.device))
    print(f"shape {shape}, dtype {dtype}, {iters} timed steps", flush=True)
    def log(r: Result) -> None:
        print(f"  {r.name:45s} {r.ms:9.2f} ms  first step {r.first_step_s:6.1f} s  loss {r.loss:.6g}", flush=True)

    if a.device == "cuda":
        results = run_cuda(chosen, shape, dtype, iters, log)
    else:
        results = run_cpu(chosen, shape, dtype, iters, a.rounds, log)
    print()
    print(table(results))
    bad = check_losses(results, dtype)
    for b in bad:
        print("LOSS MISMATCH:", b)
    if a.json:
        a.json.write_text(json.dumps({"versions": versions(a.device), "shape": dataclasses.asdict(shape),
                                      "dtype": str(dtype), "results": [dataclasses.asdict(r) for r in results]},
                                     indent=2))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
