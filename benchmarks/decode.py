"""Inference benchmark: prefill and cached decode through the backend, unmerged vs merged adapter.

An HF ``LlamaForCausalLM`` (random weights) with an adapter on all 7 projections generates
greedily with its KV cache; ``model.forward`` is compiled with ``backend="peftcompile"``.

    python benchmarks/decode.py --device cpu --threads 1        # small Llama, fp32
    python benchmarks/decode.py --device cuda                   # 2048 hidden, 8 layers, bf16

Rows (one process, same base weights, same prompt):
  base compiled                 no adapter (the floor)
  <method> unmerged eager       the adapter as reference math, no compile
  <method> unmerged compiled    the backend fuses base + delta per site (fused_* counters)
  <method> merged compiled      ``pc.merge``: the adapter folded into W, plain linears

Columns: prefill ms (a ``max_new_tokens=1`` call: one forward of the prompt), decode ms/token
(``(t(N new) - t(1 new)) / (N - 1)``, the cached single-token steps), medians over
``--iters`` rounds in which every variant is timed in turn (round-robin, so that the drift of
a shared machine spreads over all rows), after two warm-up calls each (which compile
prefill and the decode graphs: "first call s");
ratios vs merged compiled; whether the tokens equal the eager unmerged ones.
Not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peftcompile as pc  # noqa: E402
import peftcompile.backend  # noqa: E402,F401  (registers backend="peftcompile")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "cpu": dict(hidden=256, inter=768, layers=4, heads=8, vocab=1024, prompt=32, new=32, rank=16),
    "cuda": dict(hidden=2048, inter=8192, layers=8, heads=16, vocab=32000, prompt=512, new=64, rank=64),
}


def _model(s: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["inter"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["heads"], max_position_embeddings=s["prompt"] + s["new"] + 8,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
    m = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    m.requires_grad_(False)
    return m


def _adapted(base: torch.nn.Module, cfg) -> torch.nn.Module:
    m = copy.deepcopy(base)
    pc.adapt(m, pc.AdapterSpec(cfg, targets=PROJ))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B: a zero adapter could flatter nothing here, but be honest
        for p in m.parameters():
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return m.eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _generate(m, ids, n: int) -> torch.Tensor:
    with torch.no_grad():
        return m.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def _time(m, ids, n: int, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    _generate(m, ids, n)
    _sync(device)
    return time.perf_counter() - t0


def warm(name: str, m, ids, s: dict) -> dict:
    """Two warm-up calls (they compile prefill and the decode graphs); the tokens and counters."""
    from torch._dynamo.utils import counters

    counters.clear()
    t0 = time.perf_counter()
    tokens = _generate(m, ids, s["new"])
    first = time.perf_counter() - t0
    _generate(m, ids, 1)
    return dict(name=name, model=m, first_s=first, tokens=tokens.cpu(), prefill=[], full=[],
                counters={k: v for k, v in counters["peftcompile"].items()})


def time_round_robin(rows: list[dict], ids, s: dict, device: str, iters: int) -> None:
    """Time every variant in turn, ``iters`` rounds: the drift of a shared machine spreads over all."""
    for _ in range(iters):
        for row in rows:
            row["prefill"].append(_time(row["model"], ids, 1, device))
            row["full"].append(_time(row["model"], ids, s["new"], device))
    for row in rows:
        p, f = statistics.median(row["prefill"]), statistics.median(row["full"])
        row["prefill_ms"], row["decode_ms"] = 1e3 * p, 1e3 * (f - p) / (s["new"] - 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--method", choices=["lora", "gralora"], default="lora")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="a few layers of width 64 (smoke test)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = dict(SIZES[a.device])
    if a.tiny:
        s.update(hidden=64, inter=128, layers=2, heads=4, vocab=256, prompt=8, new=6, rank=8)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    r = s["rank"]
    cfg = pc.LoRA(r=r, alpha=2 * r) if a.method == "lora" else pc.GraLoRA(r=r, k=4, alpha=2 * r)
    base = _model(s, a.device, dtype)
    ids = torch.randint(3, s["vocab"], (1, s["prompt"]), generator=torch.Generator().manual_seed(0)).to(a.device)

    def compiled(m):
        m.forward = torch.compile(m.forward, backend="peftcompile")
        return m

    unmerged = _adapted(base, cfg)
    merged = copy.deepcopy(unmerged)
    pc.merge(merged)
    for knob in ("recompile_limit", "cache_size_limit"):  # four models' graphs stay cached
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    rows = []
    for name, m in [("base compiled", compiled(copy.deepcopy(base))),
                    (f"{cfg.name} unmerged eager", unmerged),
                    (f"{cfg.name} unmerged compiled", compiled(copy.deepcopy(unmerged))),
                    (f"{cfg.name} merged compiled", compiled(merged))]:
        rows.append(warm(name, m, ids, s))
        print(f"# {name}: warm", file=sys.stderr, flush=True)
    time_round_robin(rows, ids, s, a.device, a.iters)
    want = rows[1]["tokens"]
    ref = rows[3]
    dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({platform.processor() or platform.machine()}), " \
                                                                   f"{torch.get_num_threads()} threads"
    import transformers

    print(f"device: {dev}; torch {torch.__version__}, transformers {transformers.__version__}, python "
          f"{platform.python_version()}")
    print(f"shape: LlamaForCausalLM hidden {s['hidden']}, inter {s['inter']}, {s['layers']} layers, vocab "
          f"{s['vocab']}, {dtype}; prompt {s['prompt']}, {s['new']} new tokens, batch 1, greedy, KV cache; "
          f"{cfg!r} on {len(PROJ)} projections")
    print()
    print("| variant | prefill ms | decode ms/token | vs merged compiled (decode) | first call s | tokens = eager | fused |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        same = "yes" if torch.equal(row["tokens"], want) else "no"
        fused = ", ".join(f"{k}={v}" for k, v in sorted(row["counters"].items())) or "-"
        print(f"| {row['name']} | {row['prefill_ms']:.2f} | {row['decode_ms']:.2f} | "
              f"{row['decode_ms'] / ref['decode_ms']:.2f}x | {row['first_s']:.1f} | {same} | {fused} |")
    if a.json:
        a.json.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("tokens", "model")} for r in rows],
                                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
