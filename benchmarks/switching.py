"""What adapter switching costs: recompiles, and step time with 1 or 2 adapters loaded.

    python benchmarks/switching.py            # CPU, a tiny Llama-shaped stack, LoRA r16 on all 7 projections

Prints (1) the graphs ``torch.compile(backend="peftcompile")`` compiles while a training
loop goes a -> b -> pc.disabled -> disable_adapter_layers -> enable -> a (a, b: one config),
and (2) ms per training step (forward + backward on inputs_embeds, median over round-robin
steps so the drift of a shared machine spreads over all variants), eager and compiled, for:
one adapter loaded; two loaded with one active (what runs: the active one only); two loaded
and both computed (the cost of a design that runs every loaded adapter under a 0/1 mask).
Run it with PYTHONPATH pointing at another checkout to compare implementations. Asserts
nothing about speed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peftcompile as pc  # noqa: E402
import peftcompile.backend  # noqa: E402,F401  (registers backend="peftcompile")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _stack(hidden: int, inter: int, layers: int, heads: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32)
    return LlamaModel(cfg)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _adapted(n_loaded: int, active: list[str], r: int, shape: dict) -> torch.nn.Module:
    m = _stack(**shape)
    for i, name in enumerate(["a", "b"][:n_loaded]):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=r, alpha=2 * r), targets=PROJ), name)
        _randomize(m, i)
    pc.set_active(m, active)
    return m.train()


class Count:
    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from peftcompile.backend import peftcompile_backend

        self.graphs += 1
        return peftcompile_backend(gm, example_inputs)


def recompiles(shape: dict, x: torch.Tensor, r: int) -> list[tuple[str, int]]:
    m = _adapted(2, ["a"], r, shape)
    be = Count()
    step = torch.compile(m, backend=be)
    out = []

    def run(label: str) -> None:
        step(inputs_embeds=x).last_hidden_state.float().square().mean().backward()
        out.append((label, be.graphs))

    run("a")
    pc.set_active(m, "b")
    run("set_active b")
    with pc.disabled(m):
        run("pc.disabled()")
    pc.disable_adapter_layers(m)
    run("disable_adapter_layers")
    pc.enable_adapter_layers(m)
    pc.set_active(m, "a")
    run("enable + set_active a")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-recompiles", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shape = dict(hidden=args.hidden, inter=args.inter, layers=args.layers, heads=4)
    x = torch.randn(args.batch, args.seq, args.hidden, requires_grad=True)
    print(f"peftcompile from {Path(pc.__file__).parent.parent}; torch {torch.__version__}; "
          f"{torch.get_num_threads()} threads; LoRA r{args.rank} on {len(PROJ)} projections x {args.layers} layers, "
          f"hidden {args.hidden}, tokens {args.batch}x{args.seq}")
    if not args.no_recompiles:
        print("graphs compiled so far, after each state:",
              ", ".join(f"{k}: {v}" for k, v in recompiles(shape, x, args.rank)))
    torch._dynamo.reset()
    variants = {"1 loaded": (1, ["a"]), "2 loaded, 1 active": (2, ["a"]), "2 loaded, both run": (2, ["a", "b"])}
    steps = {}
    for label, (n, active) in variants.items():
        m = _adapted(n, active, args.rank, shape)
        steps[f"eager, {label}"] = m
        steps[f"compiled, {label}"] = torch.compile(copy.deepcopy(m), backend="peftcompile")
    times: dict[str, list[float]] = {k: [] for k in steps}
    for k, m in steps.items():  # warm-up (compile)
        t = time.perf_counter()
        m(inputs_embeds=x).last_hidden_state.float().square().mean().backward()
        print(f"  first step {k}: {time.perf_counter() - t:.1f} s")
    for _ in range(args.steps):
        for k, m in steps.items():
            t = time.perf_counter()
            m(inputs_embeds=x).last_hidden_state.float().square().mean().backward()
            times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        print(f"{k:32s} {1000 * statistics.median(v):7.2f} ms/step (median of {len(v)})")


if __name__ == "__main__":
    main()
