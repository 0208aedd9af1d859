"""Fidelity benchmark: does each method earn its place? (issue #16; a benchmark, not a test)

    python benchmarks/fidelity.py --part A            # expressivity at equal parameters (~1 min)
    python benchmarks/fidelity.py --part B --seeds 5  # retrieval quality, LoRA / GraLoRA / RaSA (~10 min)
    python benchmarks/fidelity.py --part C --seeds 5  # placement on planted problems (~3 CPU-min per problem)
    python benchmarks/fidelity.py --part Ctask --seeds 5  # placement on the retrieval task (~5 CPU-min per seed)
    python benchmarks/fidelity.py --part all

(A) Fit a target weight change dW with each method's own parameterisation (its reference
    ``delta_weight``) at equal parameter count, by Adam on ||dW(params) - T||_F^2:
    full-rank, block-local, globally low-rank, block-low-rank and shared-subspace targets.
    Reports relative Frobenius error and the rank the fit reaches.
(B) Retrieval on stdlib documentation (the demo's task): zero-shot MiniLM vs LoRA / GraLoRA /
    RaSA at equal parameters on all 36 encoder sites, >= 5 seeds, recall@1 and MRR on the
    test split, mean +- std and a paired t-test against LoRA.
(C) Placement at the same budget on planted-site problems (a residual tanh MLP and a tiny
    Llama whose teacher differs from the base at known projections): fresh adapters on the
    DiffoRA sites vs on random placements vs on every site vs the planted (oracle) sites;
    warm start vs fresh; gate spread; recovery of the planted sites; cross-seed overlap.
    ``--part Ctask``: the same comparison on the real task of (B) with the demo's search
    (GraLoRA r8 k2, budget 0.5 of the 36 encoder sites, 20 search steps): DiffoRA fresh and
    warm-started vs random placements of the same size vs all sites, recall@1 / MRR, paired
    t-tests over seeds, gate spread, cross-seed Jaccard of the kept sites.

Everything runs on one CPU thread under the caller's ``nice``; results go to
``benchmarks/fidelity_results.json`` (merged per part) and plots to ``benchmarks/fidelity_*.png``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peftcompile as pc
from peftcompile.methods import method_for

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "fidelity_results.json"


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _savefig(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def mean_std(xs) -> tuple[float, float]:
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


# ---------------------------------------------------------------- (A) expressivity
D, L_LAYERS = 64, 4


def _targets(kind: str, g: torch.Generator) -> list[torch.Tensor]:
    """L_LAYERS target changes [D, D], each of Frobenius norm 1."""
    def rnd(*s):
        return torch.randn(*s, generator=g)

    out = []
    if kind == "shared-subspace":  # W_l = U diag(d_l) V^T (shared rank 8) + private rank 4
        U, V = rnd(D, 8), rnd(D, 8)
        for _ in range(L_LAYERS):
            out.append(U @ torch.diag(rnd(8)) @ V.T + rnd(D, 4) @ rnd(4, D))
    else:
        for _ in range(L_LAYERS):
            if kind == "full-rank":
                t = rnd(D, D)
            elif kind == "globally low-rank":
                t = rnd(D, 8) @ rnd(8, D)
            elif kind == "block-local":  # full-rank 2x2-block diagonal: zero off-diagonal blocks
                t = torch.zeros(D, D)
                h = D // 2
                t[:h, :h], t[h:, h:] = rnd(h, h), rnd(h, h)
            elif kind == "block-low-rank":  # every block of a 2x2 grid independently of rank 4
                t = torch.zeros(D, D)
                h = D // 2
                for i, j in itertools.product(range(2), range(2)):
                    t[i * h:(i + 1) * h, j * h:(j + 1) * h] = rnd(h, 4) @ rnd(4, h)
            else:
                raise ValueError(kind)
            out.append(t)
    return [t / t.norm() for t in out]


A_METHODS = {
    "LoRA r8": pc.LoRA(r=8, alpha=8),
    "GraLoRA r8 k2": pc.GraLoRA(r=8, k=2, alpha=8),
    "GraLoRA r8 k4": pc.GraLoRA(r=8, k=4, alpha=8),
    "GraLoRA r6 k2 +hybrid 2": pc.GraLoRA(r=6, k=2, alpha=8, hybrid_r=2),
    "RaSA r8 k2 (4 layers)": pc.RaSA(r=8, k=2, alpha=8),
}
A_TARGETS = ["full-rank", "block-local", "globally low-rank", "block-low-rank", "shared-subspace"]


def _fit(cfg, targets: list[torch.Tensor], seed: int, steps: int) -> dict:
    """Adam on sum_l ||dW_l - T_l||^2 from the method's own init; returns error, rank, params."""
    m = method_for(cfg)
    torch.manual_seed(seed)
    n = len(targets)
    sites = []
    for _ in range(n):
        p = {k: nn.Parameter(torch.empty(s)) for k, s in m.shapes(cfg, D, D, n).items()}
        with torch.no_grad():
            m.init(cfg, p, n)
        sites.append(p)
    shared = {}
    if m.shares:
        shared = {k: nn.Parameter(torch.empty(s)) for k, s in m.shared_shapes(cfg, D, D, n).items()}
        with torch.no_grad():
            m.shared_init(cfg, shared, n)
        # B-type tensors start at zero (no gradient through a product of zeros for the
        # shared pool's B and A together is fine: A is random); nothing else to do
    params = [t for p in sites for t in p.values()] + list(shared.values())
    n_params = sum(t.numel() for t in params) / n
    opt = torch.optim.Adam(params, lr=2e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def dws():
        return [m.delta_weight({**p, **shared}, cfg) for p in sites]

    for _ in range(steps):
        opt.zero_grad()
        loss = sum(((dw - t) ** 2).sum() for dw, t in zip(dws(), targets))
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        fits = dws()
        err = statistics.fmean(((dw - t).norm() / t.norm()).item() for dw, t in zip(fits, targets))
        rank = statistics.fmean(torch.linalg.matrix_rank(dw, rtol=1e-4).item() for dw in fits)
    return {"rel_err": err, "rank": rank, "params_per_layer": n_params}


def part_a(seeds: int, steps: int = 600) -> dict:
    out: dict = {"d": D, "layers": L_LAYERS, "steps": steps, "seeds": seeds, "rows": {}}
    for tk in A_TARGETS:
        for name, cfg in A_METHODS.items():
            runs = [_fit(cfg, _targets(tk, torch.Generator().manual_seed(100 + s)), s, steps) for s in range(seeds)]
            e, es = mean_std(r["rel_err"] for r in runs)
            out["rows"].setdefault(tk, {})[name] = {"rel_err": e, "rel_err_std": es, "rank": runs[0]["rank"],
                                                    "params_per_layer": runs[0]["params_per_layer"]}
            print(f"A  {tk:18s} {name:24s} rel err {e:.4f} +- {es:.4f}  rank {runs[0]['rank']:.0f}  "
                  f"params/layer {runs[0]['params_per_layer']:.0f}", flush=True)
        # the best any rank-8 matrix can do (Eckart-Young), for reference
        ts = _targets(tk, torch.Generator().manual_seed(100))
        svd = statistics.fmean(_svd_err(t, 8) for t in ts)
        out["rows"][tk]["best rank-8 (SVD)"] = {"rel_err": svd, "rel_err_std": 0.0, "rank": 8, "params_per_layer": 8 * 2 * D}
    fig = _figure(8, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    names = list(A_METHODS)
    w = 0.8 / len(names)
    for i, nm in enumerate(names):
        ax.bar([j + i * w for j in range(len(A_TARGETS))], [out["rows"][t][nm]["rel_err"] for t in A_TARGETS],
               width=w, label=nm)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(A_TARGETS))], labels=A_TARGETS, fontsize=8)
    ax.set_ylabel("relative fit error ||dW - T|| / ||T||")
    ax.set_title(f"(A) expressivity at equal parameters ({D}x{D}, {L_LAYERS} layers)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, HERE / "fidelity_A.png")
    return out


def _svd_err(t: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(t)
    return (s[r:].pow(2).sum().sqrt() / s.pow(2).sum().sqrt()).item()


# ---------------------------------------------------------------- (B) task quality
B_METHODS = {
    "LoRA r8": pc.LoRA(r=8, alpha=16),
    "GraLoRA r8 k2": pc.GraLoRA(r=8, k=2, alpha=16),
    "RaSA r8 k1": pc.RaSA(r=8, k=1, alpha=16),
}


def _retrieval_setup(bs: int):
    from peftcompile.data import docstring_pairs
    from peftcompile.demo import Embedder, retrieval_data
    from peftcompile.models import load_model

    enc, tok = load_model("minilm")
    base = Embedder(enc).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    task = docstring_pairs(seed=0)
    data = retrieval_data(base, tok, task, bs, 24, 32)
    return base, data


def _finetune_retrieval(base, data, spec, steps, lr, seed, placement=None) -> dict:
    from peftcompile.demo import retrieval_metrics, train_steps

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = copy.deepcopy(base)
        pc.adapt(m, spec, placement=placement)
        n_params = pc.summary(m).adapter_params
        log: list[float] = []
        train_steps(m, m, data.train, steps, lr, log, False, "B", seed=seed)
    r = retrieval_metrics(m, data.test)
    r["adapter_params"] = n_params
    return r


def _paired_t(a, b) -> tuple[float, float]:
    from scipy import stats

    t = stats.ttest_rel(a, b)
    return float(t.statistic), float(t.pvalue)


def part_b(seeds: int, steps: int, bs: int, lr: float, methods: str = "") -> dict:
    """Runs the methods whose name starts with one of the comma-separated ``methods`` (all if empty)."""
    from peftcompile.demo import retrieval_metrics

    t0 = time.perf_counter()
    base, data = _retrieval_setup(bs)
    out: dict = {"steps": steps, "batch": bs, "lr": lr, "seeds": seeds, "sizes": data.sizes,
                 "zero_shot": retrieval_metrics(base, data.test), "runs": {}}
    print(f"B  zero-shot: {out['zero_shot']}", flush=True)
    targets = r"encoder\.encoder\..*"
    want = [m.strip() for m in methods.split(",") if m.strip()]
    for name, cfg in B_METHODS.items():
        if want and not any(name.startswith(w) for w in want):
            continue
        runs = []
        for s in range(seeds):
            r = _finetune_retrieval(base, data, pc.AdapterSpec(cfg, targets=targets), steps, lr, s)
            runs.append(r)
            print(f"B  {name:16s} seed {s}: R@1 {r['recall@1']:.3f} MRR {r['mrr']:.3f} "
                  f"({r['adapter_params']:,} params) [{time.perf_counter() - t0:.0f}s]", flush=True)
        out["runs"][name] = runs
    return out


def summarize_b(out: dict) -> dict:
    """Mean +- std per method, paired t-test against LoRA (same seeds = same data order), plot."""
    summary = {}
    lora = out["runs"].get("LoRA r8")
    for name, runs in out["runs"].items():
        row = {k: mean_std(r[k] for r in runs) for k in ("recall@1", "mrr", "loss")}
        row["adapter_params"] = runs[0]["adapter_params"]
        if lora and name != "LoRA r8" and len(runs) == len(lora) > 1:
            for k in ("recall@1", "mrr"):
                row[f"t_vs_lora_{k}"] = _paired_t([r[k] for r in runs], [r[k] for r in lora])
        summary[name] = row
    out["summary"] = summary
    fig = _figure(6, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    names = [n for n in B_METHODS if n in out["runs"]]
    for i, nm in enumerate(names):
        ys = [r["mrr"] for r in out["runs"][nm]]
        ax.scatter([i] * len(ys), ys, s=18)
        ax.errorbar([i + 0.15], [statistics.fmean(ys)], yerr=[statistics.stdev(ys) if len(ys) > 1 else 0],
                    fmt="o", color="black", capsize=3)
    ax.axhline(out["zero_shot"]["mrr"], color="grey", ls="--", label="zero-shot MiniLM")
    ax.set_xticks(range(len(names)), labels=names, fontsize=8)
    ax.set_ylabel("test MRR")
    ax.set_title(f"(B) stdlib doc retrieval, {out['seeds']} seeds, {out['steps']} steps", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, HERE / "fidelity_B.png")
    return out


# ---------------------------------------------------------------- (C) placement
class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h):
        return h + torch.tanh(self.fc(h))


class _Stack(nn.Module):
    def __init__(self, d: int = 32, n: int = 12) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _stack_problem(seed: int, n_planted: int = 3):
    """12 residual tanh blocks; the teacher adds a rank-2 change to 3 random blocks' fc."""
    torch.manual_seed(seed)
    base = _Stack()
    sites = [f"blocks.{i}.fc" for i in range(12)]
    planted = sorted(random.Random(seed).sample(sites, n_planted))
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for s in planted:
            w = teacher.get_submodule(s).weight
            w += torch.randn(32, 2, generator=g) @ torch.randn(2, 32, generator=g) / 32 ** 0.5

    def batches(off, n=8):
        out = []
        for j in range(n):
            x = torch.randn(32, 32, generator=torch.Generator().manual_seed(off + j))
            with torch.no_grad():
                out.append({"x": x, "y": teacher(x)})
        return out

    return base, sites, planted, batches(0), batches(1000), batches(2000), \
        (lambda m, b: F.mse_loss(m(b["x"]), b["y"]))


LLAMA_KINDS = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama_problem(seed: int, n_planted: int = 3, kinds=LLAMA_KINDS, rel: float | None = 1.0):
    """Tiny Llama (4 layers, 28 sites); the teacher adds a rank-2 change at 3 random projections
    among ``kinds`` (q/k changes in a random tiny model move the logits ~100x less: planted
    there, they are invisible to any method).

    ``rel``: the change's Frobenius norm relative to the weight's own, ||dW|| = rel * ||W||.
    ``rel=None`` is the first version of this problem, dW = 2 u v^T / sqrt(d_in) with u, v ~ N(0, 1):
    entries ~0.35-0.5 against Llama's init std of 0.02, a change ~25x the weight itself, which
    even fresh adapters on the planted sites cannot learn in some seeds (kept for comparison)."""
    from peftcompile.models import tiny_llama

    torch.manual_seed(seed)
    base = tiny_llama(num_hidden_layers=4).eval()
    sites = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    pool = [n for n in sites if kinds is None or n.endswith(kinds)]
    planted = sorted(random.Random(seed).sample(pool, n_planted))
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for s in planted:
            w = teacher.get_submodule(s).weight
            d = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
            w += 2.0 * d / w.shape[1] ** 0.5 if rel is None else rel * w.norm() / d.norm() * d

    def batches(off, n=8):
        out = []
        for j in range(n):
            ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(off + j))
            with torch.no_grad():
                out.append({"input_ids": ids, "t": teacher(input_ids=ids).logits})
        return out

    return base, sites, planted, batches(0), batches(1000), batches(2000), \
        (lambda m, b: F.mse_loss(m(input_ids=b["input_ids"]).logits, b["t"]))


def _finetune(base, spec, placement, loss, train, test, steps: int, lr: float, seed: int) -> float:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = copy.deepcopy(base)
        pc.adapt(m, spec, placement=placement)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        for t in range(steps):
            opt.zero_grad()
            loss(m, train[t % len(train)]).backward()
            opt.step()
    with torch.no_grad():
        return statistics.fmean(loss(m, b).item() for b in test)


def _jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


C_PROBLEMS = {
    "residual MLP (12 blocks, 3 planted)": ("mlp", _stack_problem),
    "tiny Llama (28 sites, 3 planted, ||dW|| = ||W||)": ("llama", _llama_problem),
    # weak changes: where the search failed before its gate step annealed with the temperature
    "tiny Llama (28 sites, 3 planted, ||dW|| = 0.3 ||W||)": ("llama_weak", lambda s: _llama_problem(s, rel=0.3)),
    # the first version of the problem (dW ~25x the weight), kept to show where the search fails
    "tiny Llama (28 sites, 3 planted, dW ~25x W: first version)": ("llama_v1",
                                                                   lambda s: _llama_problem(s, rel=None)),
}


def part_c(seeds: int, n_random: int = 5, only: str = "") -> dict:
    """Planted problems; ``only``: comma-separated short names (mlp, llama, llama_v1) to run."""
    from peftcompile.diffora import DiffoRASearch, plot_placement

    t0 = time.perf_counter()
    spec = pc.AdapterSpec(pc.LoRA(r=2, alpha=4), targets="all-linear")  # candidates and the all-sites arm
    out: dict = {"seeds": seeds, "n_random": n_random, "problems": {}}
    want = {w.strip() for w in only.split(",") if w.strip()}
    problems = {name: (short, make, dict(steps=100, lr=3e-2), 150) for name, (short, make) in C_PROBLEMS.items()
                if not want or short in want}
    for pname, (short, make, skw, ft_steps) in problems.items():
        rows = []
        for s in range(seeds):
            base, sites, planted, train, val, test, loss = make(s)
            k = len(planted)
            budget = k / len(sites)
            with torch.random.fork_rng():
                torch.manual_seed(s)
                srch = DiffoRASearch(base, spec, budget, loss_fn=loss, lr=skw["lr"])
                srch.run(train, val, skw["steps"], warmup=skw["steps"] // 2, seed=s, progress=False)
            warm = srch.placement()
            srch.close()
            fresh = pc.Placement(list(warm.sites), warm.gates)
            gates = sorted(warm.gates.values())
            rng = random.Random(1000 + s)
            rand = [_finetune(base, spec, pc.Placement(sorted(rng.sample(sites, k))), loss, train, test, ft_steps,
                              3e-2, s) for _ in range(n_random)]
            row = {
                "planted": planted, "kept": warm.sites, "recovered": len(set(planted) & set(warm.sites)),
                "gate_top_k_min": gates[-k], "gate_rest_max": gates[-k - 1],
                "gates_near_0_or_1": sum(g < 0.05 or g > 0.95 for g in gates) / len(gates),
                "loss_diffora_fresh": _finetune(base, spec, fresh, loss, train, test, ft_steps, 3e-2, s),
                "loss_diffora_warm": _finetune(base, spec, warm, loss, train, test, ft_steps, 3e-2, s),
                "loss_planted": _finetune(base, spec, pc.Placement(planted), loss, train, test, ft_steps, 3e-2, s),
                "loss_all_sites": _finetune(base, spec, None, loss, train, test, ft_steps, 3e-2, s),
                "loss_random": rand,
                "loss_base": statistics.fmean(loss(base, b).item() for b in test),
                "gates": warm.gates,
            }
            row["diffora_beats_every_random"] = row["loss_diffora_fresh"] < min(rand)
            row["diffora_rank_among_random"] = 1 + sum(r < row["loss_diffora_fresh"] for r in rand)
            rows.append(row)
            if s == 0:
                plot_placement(warm, HERE / f"fidelity_C_gates_{short}.png",
                               title=f"DiffoRA gates, {pname.split(' (')[0]}, seed 0 (kept framed)")
            print(f"C  {pname} seed {s}: recovered {row['recovered']}/{k}, fresh {row['loss_diffora_fresh']:.5f} "
                  f"warm {row['loss_diffora_warm']:.5f} planted {row['loss_planted']:.5f} all {row['loss_all_sites']:.5f} "
                  f"random {sorted(round(r, 5) for r in rand)} [{time.perf_counter() - t0:.0f}s]", flush=True)
        # cross-seed overlap: one problem (seed 0), five search seeds
        base, sites, planted, train, val, test, loss = make(0)
        kept = []
        for s in range(seeds):
            p = pc.diffora.search(base, spec, train, val, budget=len(planted) / len(sites), loss_fn=loss,
                                  seed=s, progress=False, **skw)
            kept.append(p.sites)
        overlap = statistics.fmean(_jaccard(a, b) for a, b in itertools.combinations(kept, 2))
        out["problems"][pname] = {"rows": rows, "cross_seed_jaccard": overlap, "cross_seed_kept": kept,
                                  "planted_seed0": planted}
        print(f"C  {pname}: cross-seed Jaccard {overlap:.2f} {kept}", flush=True)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def part_c_sensitivity(seeds: int, r: int = 2) -> dict:
    """One-shot baseline for C's planted problems: rank each site by the rank-r nuclear norm of
    dL/dW summed over the training batches (how much a rank-r change there lowers the loss to first
    order, at the base model) and keep the top K. No adapters, no training: what a search has to beat."""
    t0 = time.perf_counter()
    problems = C_PROBLEMS
    out: dict = {"seeds": seeds, "r": r, "problems": {}}
    for pname, (short, make) in problems.items():
        rec = []
        for s in range(seeds):
            base, sites, planted, train, _, _, loss = make(s)
            m = copy.deepcopy(base)
            m.requires_grad_(False)
            ws = {n: m.get_submodule(n).weight for n in sites}
            for w in ws.values():
                w.requires_grad_(True)
            for b in train:
                loss(m, b).backward()
            score = {n: torch.linalg.svdvals(w.grad)[:r].sum().item() for n, w in ws.items()}
            kept = sorted(sites, key=lambda n: -score[n])[:len(planted)]
            rec.append(len(set(kept) & set(planted)))
        out["problems"][pname] = {"recovered": rec, "of": len(planted) * seeds}
        print(f"C sensitivity  {pname}: recovered {sum(rec)}/{len(planted) * seeds} {rec}", flush=True)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# (C, task) placement on the real task: the demo's retrieval task and search, several seeds
C_TASK_METHOD = pc.GraLoRA(r=8, k=2, alpha=16)  # the demo's method
C_TASK_TARGETS = r"encoder\.encoder\..*"  # the 36 encoder linear sites (the pooler is unused)


def part_c_task(seeds: int, n_random: int, steps: int, bs: int, lr: float, budget: float,
                search_steps: int) -> dict:
    """DiffoRA (the demo's search) vs random placements of the same size vs all sites, on the
    MiniLM docstring-retrieval task. Per seed: one search (seed = search seed; the task split is
    fixed), then fresh adapters fine-tuned for ``steps`` on the DiffoRA sites, the same sites
    warm-started, ``n_random`` random placements of the same size and every site; same data
    order for every arm of a seed (paired)."""
    from peftcompile.demo import retrieval_loss, retrieval_metrics
    from peftcompile.diffora import n_kept, plot_placement, search

    t0 = time.perf_counter()
    base, data = _retrieval_setup(bs)
    spec = pc.AdapterSpec(C_TASK_METHOD, targets=C_TASK_TARGETS)
    out: dict = {"steps": steps, "batch": bs, "lr": lr, "budget": budget, "search_steps": search_steps,
                 "n_random": n_random, "seeds": seeds, "method": repr(C_TASK_METHOD), "sizes": data.sizes,
                 "zero_shot": retrieval_metrics(base, data.test), "rows": []}
    for s in range(seeds):
        ts = time.perf_counter()
        p = search(base, spec, data.train, data.val, budget=budget, steps=search_steps, seed=s, lr=lr,
                   loss_fn=retrieval_loss, progress=False)
        t_search = time.perf_counter() - ts
        sites = list(p.gates)
        k = n_kept(budget, len(sites))
        g = sorted(p.gates.values())
        row = {"seed": s, "kept": p.sites, "gates": p.gates, "search_s": round(t_search, 1),
               "gate_top_k_min": g[-k], "gate_rest_max": g[-k - 1] if k < len(g) else float("nan"),
               "gates_near_0_or_1": sum(v < 0.05 or v > 0.95 for v in g) / len(g)}
        row["diffora_fresh"] = _finetune_retrieval(base, data, spec, steps, lr, s, pc.Placement(list(p.sites)))
        row["diffora_warm"] = _finetune_retrieval(base, data, spec, steps, lr, s, p)
        row["all_sites"] = _finetune_retrieval(base, data, spec, steps, lr, s)
        rng = random.Random(2000 + s)
        row["random"] = []
        for _ in range(n_random):
            rs = sorted(rng.sample(sites, k), key=sites.index)
            r = _finetune_retrieval(base, data, spec, steps, lr, s, pc.Placement(rs))
            r["sites"] = rs
            row["random"].append(r)
        out["rows"].append(row)
        if s == 0:
            plot_placement(p, HERE / "fidelity_C_gates_task.png",
                           title="DiffoRA gates, MiniLM retrieval, seed 0 (kept framed)")
        rnd = [r["mrr"] for r in row["random"]]
        print(f"C task seed {s}: MRR DiffoRA fresh {row['diffora_fresh']['mrr']:.3f} warm {row['diffora_warm']['mrr']:.3f} "
              f"all {row['all_sites']['mrr']:.3f} random {sorted(round(x, 3) for x in rnd)}; gates top-K min "
              f"{row['gate_top_k_min']:.2f} rest max {row['gate_rest_max']:.2f} [{time.perf_counter() - t0:.0f}s]", flush=True)
    summarize_c_task(out)
    return out


def summarize_c_task(out: dict) -> dict:
    """Mean +- std per arm, paired t-tests of DiffoRA (fresh) against the per-seed random mean and
    against all sites, cross-seed overlap of the kept sites, plot."""
    rows = out["rows"]
    arms = {"DiffoRA (fresh)": [r["diffora_fresh"] for r in rows],
            "DiffoRA (warm start)": [r["diffora_warm"] for r in rows],
            "random (mean of the seed's placements)": [
                {m: statistics.fmean(x[m] for x in r["random"]) for m in ("recall@1", "mrr")} for r in rows],
            "all sites": [r["all_sites"] for r in rows]}
    summ = {a: {m: mean_std(x[m] for x in v) for m in ("recall@1", "mrr")} for a, v in arms.items()}
    if len(rows) > 1:
        for a in ("DiffoRA (warm start)", "random (mean of the seed's placements)", "all sites"):
            for m in ("recall@1", "mrr"):
                summ[a][f"t_fresh_vs_this_{m}"] = _paired_t([x[m] for x in arms["DiffoRA (fresh)"]],
                                                            [x[m] for x in arms[a]])
    kept = [r["kept"] for r in rows]
    n, k = len(rows[0]["gates"]), len(kept[0])
    out["summary"] = summ
    out["beats_every_random_mrr"] = sum(r["diffora_fresh"]["mrr"] > max(x["mrr"] for x in r["random"]) for r in rows)
    out["above_random_mean_mrr"] = sum(r["diffora_fresh"]["mrr"] > statistics.fmean(x["mrr"] for x in r["random"])
                                       for r in rows)
    out["warm_ge_fresh_mrr"] = sum(r["diffora_warm"]["mrr"] >= r["diffora_fresh"]["mrr"] for r in rows)
    out["cross_seed_jaccard"] = statistics.fmean(_jaccard(a, b) for a, b in itertools.combinations(kept, 2)) \
        if len(kept) > 1 else float("nan")
    # what two independent random K-of-N placements share on average: E|A&B| = k^2/n
    inter = k * k / n
    out["random_jaccard_expected"] = inter / (2 * k - inter)
    out["kept_in_every_seed"] = sorted(set.intersection(*map(set, kept)))
    fig = _figure(6.5, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for s, r in enumerate(rows):
        ax.scatter([s] * len(r["random"]), [x["mrr"] for x in r["random"]], color="grey", s=12,
                   label="random placement" if s == 0 else None)
        ax.scatter([s], [r["diffora_fresh"]["mrr"]], color="red", marker="*", s=70, label="DiffoRA (fresh)" if s == 0 else None)
        ax.scatter([s], [r["diffora_warm"]["mrr"]], color="orange", marker="^", s=30,
                   label="DiffoRA (warm start)" if s == 0 else None)
        ax.scatter([s], [r["all_sites"]["mrr"]], color="blue", marker="_", s=80,
                   label=f"all {n} sites" if s == 0 else None)
    ax.axhline(out["zero_shot"]["mrr"], color="grey", ls="--", lw=0.8, label="zero-shot")
    ax.set_xlabel("seed (search + fine-tune)")
    ax.set_ylabel("test MRR")
    ax.set_title(f"(C) placement on MiniLM retrieval: {k} of {n} sites, {out['steps']} steps", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, HERE / "fidelity_C_task.png")
    return out


def _plot_c(out: dict) -> None:
    fig = _figure(4.4 * len(out["problems"]), 3.4)
    for i, (pname, d) in enumerate(out["problems"].items()):
        ax = fig.add_subplot(1, len(out["problems"]), i + 1)
        rows = d["rows"]
        for s, r in enumerate(rows):
            ax.scatter([s] * len(r["loss_random"]), r["loss_random"], color="grey", s=12,
                       label="random placement" if s == 0 else None)
            ax.scatter([s], [r["loss_diffora_fresh"]], color="red", marker="*", s=70,
                       label="DiffoRA (fresh)" if s == 0 else None)
            ax.scatter([s], [r["loss_planted"]], color="green", marker="x", s=30, label="planted (oracle)" if s == 0 else None)
            ax.scatter([s], [r["loss_all_sites"]], color="blue", marker="_", s=80, label="all sites" if s == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("seed (problem + search)")
        ax.set_ylabel("test MSE after fine-tuning")
        ax.set_title(pname, fontsize=9)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, HERE / "fidelity_C.png")


def _t_cell(row: dict, key: str) -> str:
    """The 't = ..., p = ... / t = ..., p = ...' cell (recall@1 / MRR) of a summary row, or ''."""
    if f"{key}_mrr" not in row:
        return ""
    return " / ".join(f"t = {row[f'{key}_{m}'][0]:.2f}, p = {row[f'{key}_{m}'][1]:.3f}" for m in ("recall@1", "mrr"))


def tables(res: dict) -> str:
    """Markdown tables of whatever parts ``res`` holds (what FIDELITY.md quotes)."""
    out = []
    if "A" in res:
        a = res["A"]
        names = list(next(iter(a["rows"].values())))
        out += ["| target | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for tk, row in a["rows"].items():
            out.append(f"| {tk} | " + " | ".join(
                f"{row[n]['rel_err']:.3f} (rank {row[n]['rank']:.0f})" for n in names) + " |")
        out.append("")
        out.append("params/layer: " + ", ".join(
            f"{n} {next(iter(a['rows'].values()))[n]['params_per_layer']:.0f}" for n in names))
        out.append("")
    if "B" in res and "summary" in res["B"]:
        b = res["B"]
        z = b["zero_shot"]
        n = {len(r) for r in b["runs"].values()}
        out += ["| arm | adapter params | test recall@1 | test MRR | paired t vs LoRA (R@1 / MRR) |",
                "|---|---|---|---|---|",
                f"| zero-shot MiniLM | 0 | {z['recall@1']:.3f} | {z['mrr']:.3f} | |"]
        for name, row in b["summary"].items():
            t = _t_cell(row, "t_vs_lora")
            out.append(f"| {name} | {row['adapter_params']:,} | {row['recall@1'][0]:.3f} ± {row['recall@1'][1]:.3f} | "
                       f"{row['mrr'][0]:.3f} ± {row['mrr'][1]:.3f} | {t} |")
        out.append(f"\n(seeds per arm: {sorted(n)}; mean ± std over seeds)\n")
    if "C" in res:
        for pname, d in res["C"]["problems"].items():
            rows = d["rows"]
            out += [f"**{pname}**", "",
                    "| seed | planted recovered | top-K gate min / rest max | DiffoRA fresh | warm | planted | all sites | "
                    "random (best .. worst of 5) | DiffoRA rank among 5 random |",
                    "|---|---|---|---|---|---|---|---|---|"]
            for s, r in enumerate(rows):
                rnd = sorted(r["loss_random"])
                out.append(f"| {s} | {r['recovered']}/{len(r['planted'])} | {r['gate_top_k_min']:.2f} / "
                           f"{r['gate_rest_max']:.2f} | {r['loss_diffora_fresh']:.4g} | {r['loss_diffora_warm']:.4g} | "
                           f"{r['loss_planted']:.4g} | {r['loss_all_sites']:.4g} | {rnd[0]:.4g} .. {rnd[-1]:.4g} | "
                           f"{r['diffora_rank_among_random']} of 6 |")
            beat = sum(r["diffora_beats_every_random"] for r in rows)
            warm = sum(r["loss_diffora_warm"] <= r["loss_diffora_fresh"] for r in rows)
            out += ["", f"DiffoRA (fresh) beats every random placement in {beat}/{len(rows)} seeds; "
                        f"warm start <= fresh in {warm}/{len(rows)}; planted sites recovered "
                        f"{sum(r['recovered'] for r in rows)}/{sum(len(r['planted']) for r in rows)}; "
                        f"cross-seed Jaccard of the kept sites (one problem, {len(d['cross_seed_kept'])} search seeds): "
                        f"{d['cross_seed_jaccard']:.2f}", ""]
    if "C_task" in res and "summary" in res["C_task"]:
        c = res["C_task"]
        z = c["zero_shot"]
        rows = c["rows"]
        k, n = len(rows[0]["kept"]), len(rows[0]["gates"])
        out += [f"**MiniLM retrieval, {k} of {n} sites, {len(rows)} seeds** (test recall@1 / MRR, mean ± std over seeds)", "",
                "| arm | test recall@1 | test MRR | paired t, DiffoRA fresh vs this arm (R@1 / MRR) |", "|---|---|---|---|",
                f"| zero-shot MiniLM | {z['recall@1']:.3f} | {z['mrr']:.3f} | |"]
        for arm, row in c["summary"].items():
            t = _t_cell(row, "t_fresh_vs_this")
            out.append(f"| {arm} | {row['recall@1'][0]:.3f} ± {row['recall@1'][1]:.3f} | "
                       f"{row['mrr'][0]:.3f} ± {row['mrr'][1]:.3f} | {t} |")
        out += ["", "| seed | DiffoRA fresh MRR | warm | all sites | random MRR (each placement) | "
                    "top-K gate min / rest max | gates < 0.05 or > 0.95 |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['seed']} | {r['diffora_fresh']['mrr']:.3f} | {r['diffora_warm']['mrr']:.3f} | "
                       f"{r['all_sites']['mrr']:.3f} | {' '.join(format(x['mrr'], '.3f') for x in r['random'])} | "
                       f"{r['gate_top_k_min']:.2f} / {r['gate_rest_max']:.2f} | {r['gates_near_0_or_1']:.0%} |")
        out += ["", f"DiffoRA (fresh) above every random placement (MRR) in {c['beats_every_random_mrr']}/{len(rows)} seeds, "
                    f"above the seed's random mean in {c['above_random_mean_mrr']}/{len(rows)}; warm start >= fresh in "
                    f"{c['warm_ge_fresh_mrr']}/{len(rows)}; cross-seed Jaccard of the kept sites {c['cross_seed_jaccard']:.2f} "
                    f"(two random placements of this size: {c['random_jaccard_expected']:.2f}); kept in every seed: "
                    f"{len(c['kept_in_every_seed'])} sites", ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["A", "B", "C", "Csens", "Ctask", "all"], default="all")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--a-seeds", type=int, default=2)
    ap.add_argument("--a-steps", type=int, default=600)
    ap.add_argument("--b-steps", type=int, default=40)
    ap.add_argument("--b-batch", type=int, default=16)
    ap.add_argument("--b-lr", type=float, default=3e-3)
    ap.add_argument("--b-methods", default="", help="comma-separated name prefixes: run only these methods in B")
    ap.add_argument("--c-problems", default="", help="C: comma-separated planted problems to run (mlp, llama, llama_v1)")
    ap.add_argument("--c-random", type=int, default=3, help="random placements per seed in C on the task")
    ap.add_argument("--c-steps", type=int, default=40)
    ap.add_argument("--c-search-steps", type=int, default=20)
    ap.add_argument("--c-budget", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tables", action="store_true", help="print the markdown tables of the saved results and exit")
    args = ap.parse_args()
    if args.tables:
        print(tables(json.loads(RESULTS.read_text())))
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import platform

    res: dict = {}
    cond = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads,
            "machine": platform.machine()}
    for part in ("A", "B", "C", "Csens", "Ctask"):
        if args.part not in (part, "all"):
            continue
        t = time.perf_counter()
        if part == "Csens":
            part = "C_sensitivity"
            res[part] = part_c_sensitivity(args.seeds)
        if part == "Ctask":
            part = "C_task"
            res[part] = part_c_task(args.seeds, args.c_random, args.c_steps, args.b_batch, args.b_lr,
                                    args.c_budget, args.c_search_steps)
        if part == "A":
            res["A"] = part_a(args.a_seeds, args.a_steps)
        elif part == "B":
            res["B"] = part_b(args.seeds, args.b_steps, args.b_batch, args.b_lr, args.b_methods)
        elif part == "C":
            res["C"] = part_c(args.seeds, only=args.c_problems)
        res[part]["wall_s"] = round(time.perf_counter() - t, 1)
        res[part]["cpu_s"] = round(time.process_time(), 1)
        # re-read just before writing: parts may run as separate processes side by side
        cur = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        if part == "B" and "B" in cur:  # methods may run as separate processes: merge their runs
            res["B"]["runs"] = {**cur["B"].get("runs", {}), **res["B"]["runs"]}
        if part == "B":
            summarize_b(res["B"])
        if part == "C" and "C" in cur:  # problems may run as separate processes: merge them
            res["C"]["problems"] = {**{k: v for k, v in cur["C"].get("problems", {}).items() if k in C_PROBLEMS},
                                    **res["C"]["problems"]}
            res["C"]["problems"] = {k: res["C"]["problems"][k] for k in C_PROBLEMS if k in res["C"]["problems"]}
        if part == "C":
            _plot_c(res["C"])
        cur.update({part: res[part], "conditions": cond})
        _write_json(RESULTS, cur)
    print(f"results: {RESULTS}")


if __name__ == "__main__":
    main()
