"""DiffoRA's budget-coupled search: sites compete, planted sites are recovered, the package
layout (one home, spec.py not reaching up), and bad input leaving the user's model alone."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftcompile as pc

from conftest import ResidualStack
from peftcompile.state import STATE_ATTR
from peftcompile.diffora import DiffoRASearch, SearchInputError, SearchLossError, search


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine
    yield
    torch.set_num_threads(n)


class Stack(ResidualStack):
    def __init__(self, d: int = 32, n: int = 12) -> None:
        super().__init__(d, n)


def mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def planted(seed: int, n_planted: int = 3, n_blocks: int = 12, d: int = 32):
    """A residual stack and a teacher that differs by a rank-2 change at ``n_planted``
    random blocks (drawn from the seed, so each seed plants elsewhere)."""
    torch.manual_seed(seed)
    base = Stack(d, n_blocks)
    sites = [f"blocks.{i}.fc" for i in range(n_blocks)]
    where = sorted(random.Random(seed).sample(sites, n_planted))
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for s in where:
            teacher.get_submodule(s).weight += torch.randn(d, 2, generator=g) @ torch.randn(2, d, generator=g) / d**0.5

    def batches(off):
        out = []
        for j in range(8):
            x = torch.randn(32, d, generator=torch.Generator().manual_seed(off + j))
            with torch.no_grad():
                out.append((x, teacher(x)))
        return out

    return base, where, batches(0), batches(1000)


def snapshot(m: nn.Module) -> dict:
    return {"sd": {k: v.clone() for k, v in m.state_dict().items()},
            "rg": {k: p.requires_grad for k, p in m.named_parameters()},
            "mods": [n for n, _ in m.named_modules()], "state": STATE_ATTR in m.__dict__}


def assert_unchanged(m: nn.Module, snap: dict) -> None:
    assert {k: p.requires_grad for k, p in m.named_parameters()} == snap["rg"]
    assert [n for n, _ in m.named_modules()] == snap["mods"]
    assert (STATE_ATTR in m.__dict__) == snap["state"]
    sd = m.state_dict()
    assert sd.keys() == snap["sd"].keys() and all(torch.equal(sd[k], v) for k, v in snap["sd"].items())


# --- the search recovers planted sites --------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_random_planted_sites_and_gates_separate(seed):
    base, where, train, val = planted(seed)
    p = search(base, pc.AdapterSpec(pc.LoRA(r=2, alpha=4)), train, val, budget=3 / 12, steps=100, loss_fn=mse,
               lr=3e-2, seed=seed, progress=False)
    assert sorted(p.sites) == where, sorted(p.gates.items(), key=lambda kv: -kv[1])[:5]
    kept = [p.gates[s] for s in where]
    rest = [v for s, v in p.gates.items() if s not in where]
    assert min(kept) > 0.9 and max(rest) < 0.1  # separated, not 0.44..0.54
    assert sum(p.gates.values()) == pytest.approx(3.0, abs=1e-3)  # the budget holds


def test_independent_gates_would_not_compete():
    """The gate gradient of a shift of every logit is zero: raising all gates together is
    not a direction the search can take (sites compete for the budget)."""
    base, where, train, val = planted(0)
    s = DiffoRASearch(base, pc.AdapterSpec(pc.LoRA(r=2, alpha=4)), 0.25, loss_fn=mse, lr=3e-2)
    s.run(train, val, 6, warmup=3, progress=False)
    s.loop._only(weights=False)
    mse(s.model, val[0]).backward()
    g = s.loop.gates.logits.grad
    assert g.abs().max() > 0
    assert g.sum().abs() <= 1e-6 * g.abs().sum() + 1e-12
    s.close()


def test_search_is_deterministic_and_seed_dependent():
    base, where, train, val = planted(3)
    kw = dict(budget=0.25, steps=20, loss_fn=mse, lr=3e-2, progress=False)
    a = search(base, pc.AdapterSpec(pc.GraLoRA(r=4, k=2, alpha=8)), train, val, seed=5, **kw)
    b = search(base, pc.AdapterSpec(pc.GraLoRA(r=4, k=2, alpha=8)), train, val, seed=5, **kw)
    c = search(base, pc.AdapterSpec(pc.GraLoRA(r=4, k=2, alpha=8)), train, val, seed=6, **kw)
    assert a.gates == b.gates and a.sites == b.sites
    assert all(torch.equal(a.weights[s][k], b.weights[s][k]) for s in a.weights for k in a.weights[s])
    assert a.gates != c.gates


def test_warm_start_false_returns_sites_only():
    base, where, train, val = planted(0)
    p = search(base, pc.AdapterSpec(pc.LoRA(r=2, alpha=4)), train, val, budget=0.25, steps=10, loss_fn=mse,
               warm_start=False, progress=False)
    assert len(p.sites) == 3 and not p.weights and not p.shared and len(p.gates) == 12
    m = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(pc.LoRA(r=2, alpha=4)), placement=p)
    for s in p.sites:  # fresh adapters: B starts at zero
        assert torch.count_nonzero(m.get_submodule(s).peftcompile["default"].lora_B) == 0


def test_search_on_tiny_llama_finds_the_planted_projections():
    """A teacher that differs from a tiny Llama at two projections: the search keeps them. The change
    has the weight's own norm (a change ~25x the weight is not learnable by fresh adapters in this
    budget: benchmarks/FIDELITY.md C.1, "Why the first tiny-Llama problem failed")."""
    from peftcompile.models import tiny_llama

    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=2).eval()
    where = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for s in where:
            w = teacher.get_submodule(s).weight
            d = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
            w += w.norm() / d.norm() * d

    def batches(off):
        out = []
        for j in range(6):
            ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(off + j))
            with torch.no_grad():
                out.append({"input_ids": ids, "t": teacher(input_ids=ids).logits})
        return out

    def loss(m, b):
        return F.mse_loss(m(input_ids=b["input_ids"]).logits, b["t"])

    p = search(base, pc.AdapterSpec(pc.LoRA(r=2, alpha=4)), batches(0), batches(100), budget=2 / 14, steps=80,
               loss_fn=loss, lr=3e-2, progress=False)
    assert sorted(p.sites) == sorted(where), sorted(p.gates.items(), key=lambda kv: -kv[1])[:4]
    assert min(p.gates[s] for s in where) > 0.9 and max(v for s, v in p.gates.items() if s not in where) < 0.05


LLAMA_KINDS = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def planted_llama(seed: int, n_planted: int = 3, rel: float = 1.0):
    """A 4-layer tiny Llama (28 projection sites) and a teacher that differs from it by a rank-2
    change of Frobenius norm ``rel * ||W||`` at ``n_planted`` random projections (drawn from the
    seed among v/o/gate/up/down; a q/k change hardly moves a random tiny model's logits). The
    loss is the MSE to the teacher's logits. Same problem as benchmarks/fidelity.py (C)."""
    from peftcompile.models import tiny_llama

    torch.manual_seed(seed)
    base = tiny_llama(num_hidden_layers=4).eval()
    sites = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    where = sorted(random.Random(seed).sample([s for s in sites if s.endswith(LLAMA_KINDS)], n_planted))
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for s in where:
            w = teacher.get_submodule(s).weight
            d = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g)
            w += rel * w.norm() / d.norm() * d

    def batches(off):
        out = []
        for j in range(8):
            ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(off + j))
            with torch.no_grad():
                out.append({"input_ids": ids, "t": teacher(input_ids=ids).logits})
        return out

    return base, sites, where, batches(0), batches(1000)


def llama_mse(model, batch):
    return F.mse_loss(model(input_ids=batch["input_ids"]).logits, batch["t"])


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_planted_projections_of_a_tiny_llama(seed):
    """3 planted projections among 28 sites of an HF model: the search keeps exactly them and
    the gates separate (the settings of benchmarks/fidelity.py C, where 5/5 seeds recover all 3)."""
    base, sites, where, train, val = planted_llama(seed)
    p = search(base, pc.AdapterSpec(pc.LoRA(r=2, alpha=4)), train, val, budget=3 / 28, steps=100,
               loss_fn=llama_mse, lr=3e-2, seed=seed, progress=False)
    assert sorted(p.gates) == sorted(sites)
    assert sorted(p.sites) == where, sorted(p.gates.items(), key=lambda kv: -kv[1])[:5]
    rest = [v for s, v in p.gates.items() if s not in where]
    assert min(p.gates[s] for s in where) > 0.8 and max(rest) < 0.2, p.gates
    assert sum(p.gates.values()) == pytest.approx(3.0, abs=1e-3)


def test_tiny_llama_search_is_deterministic_for_a_seed():
    base, sites, where, train, val = planted_llama(2)
    kw = dict(budget=3 / 28, steps=12, warmup=4, loss_fn=llama_mse, lr=3e-2, progress=False)
    spec = pc.AdapterSpec(pc.LoRA(r=2, alpha=4))
    a, b = search(base, spec, train, val, seed=7, **kw), search(base, spec, train, val, seed=7, **kw)
    assert a.gates == b.gates and a.sites == b.sites
    assert all(torch.equal(a.weights[s][k], b.weights[s][k]) for s in a.weights for k in a.weights[s])
    assert search(base, spec, train, val, seed=8, **kw).gates != a.gates


# --- one home, no reaching up -------------------------------------------------------------

def test_diffora_is_a_package_reachable_from_peftcompile():
    import importlib.util

    import peftcompile

    assert peftcompile.diffora.search is search
    from peftcompile import diffora

    assert diffora.plot_placement.__module__ == "peftcompile.diffora.plot"
    assert diffora.BiLevelSearch.__module__ == "peftcompile.diffora.loop"
    assert importlib.util.find_spec("peftcompile.passes.placement") is None  # passes/ holds fx passes only
    assert not hasattr(pc.Placement, "plot")


def test_spec_does_not_import_diffora():
    """spec.py must not reach up into the search or its plotting, not even lazily."""
    import ast

    from peftcompile import spec

    with open(spec.__file__) as f:
        src = f.read()
    tree = ast.parse(src)
    mods = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    mods += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in mods if "diffora" in m or "matplotlib" in m], mods
    assert "diffora" not in src.replace("peftcompile.diffora.plot_placement", "")


# --- bad input: clear error naming the argument/step, model untouched ---------------------

def test_budget_keeping_no_site_names_budget_and_leaves_model():
    base, where, train, val = planted(0)
    snap = snapshot(base)
    with pytest.raises(pc.AdapterError, match=r"budget=0\.02 keeps 0 of the 12 candidate sites.*budget >= 0\.04"):
        search(base, pc.AdapterSpec(pc.LoRA(r=2)), train, val, budget=0.02, steps=2, loss_fn=mse, progress=False)
    assert_unchanged(base, snap)


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan"), "half"])
def test_budget_out_of_range_is_an_adapter_error(budget):
    base, where, train, val = planted(0)
    snap = snapshot(base)
    with pytest.raises(pc.AdapterError, match=r"budget=.*valid range \(0, 1\]"):
        search(base, pc.AdapterSpec(pc.LoRA(r=2)), train, val, budget=budget, steps=2, loss_fn=mse, progress=False)
    assert_unchanged(base, snap)


@pytest.mark.parametrize("bad, what, pattern", [
    ({"input_ids": torch.zeros(2, 3, dtype=torch.long)}, "train_batches", "train_batches must be an iterable of batches.*dict"),
    (torch.zeros(4, 32), "train_batches", "train_batches must be an iterable of batches.*Tensor"),
    ([(torch.zeros(2, 32), torch.zeros(2, 32))], "val_batches", r"val_batches\[0\] is a tuple.*dict batches.*loss_fn"),
    (42, "val_batches", "val_batches must be an iterable of batches, got int"),
])
def test_batches_of_the_wrong_form(bad, what, pattern):
    from peftcompile.models import tiny_llama

    m = tiny_llama()
    snap = snapshot(m)
    ok = [{"input_ids": torch.randint(3, 128, (2, 6)), "labels": torch.randint(3, 128, (2, 6))}]
    train, val = (bad, ok) if what == "train_batches" else (ok, bad)
    with pytest.raises(SearchInputError, match=pattern) as e:
        search(m, pc.AdapterSpec(pc.LoRA(r=2)), train, val, steps=2, progress=False)
    assert isinstance(e.value, pc.AdapterError) and isinstance(e.value, TypeError)
    assert_unchanged(m, snap)


def test_batch_of_the_wrong_form_mid_stream_names_the_step():
    base, where, train, val = planted(0, n_blocks=4)
    snap = snapshot(base)
    bad = list(train[:3]) + ["not a batch"]
    with pytest.raises(SearchInputError, match=r"train step 4 \(train_batches\): expected \(x, y\) batches, got str"):
        search(base, pc.AdapterSpec(pc.LoRA(r=2)), bad, val, steps=6, loss_fn=_strict_mse, shuffle=False,
               progress=False)
    assert_unchanged(base, snap)


def _strict_mse(model, batch):
    if not isinstance(batch, tuple):
        raise SearchInputError(f"expected (x, y) batches, got {type(batch).__name__}")
    return mse(model, batch)


def test_nan_loss_is_an_adapter_error_naming_the_step_and_model_is_untouched():
    base, where, train, val = planted(0, n_blocks=4)
    snap = snapshot(base)
    bad = list(train[:4])
    bad[1] = (bad[1][0], torch.full_like(bad[1][1], float("nan")))
    with pytest.raises(SearchLossError, match="train loss is nan at step 2") as e:
        search(base, pc.AdapterSpec(pc.LoRA(r=2)), bad, val, steps=4, loss_fn=mse, shuffle=False, progress=False)
    assert isinstance(e.value, pc.AdapterError) and isinstance(e.value, FloatingPointError)
    assert_unchanged(base, snap)


@pytest.mark.parametrize("phase, value", [("train", float("nan")), ("validation", float("nan")),
                                          ("train", float("inf")), ("validation", float("-inf"))])
def test_non_finite_loss_names_phase_step_and_batches(phase, value):
    """A NaN/inf loss in either step stops the search with the step, the phase and the argument
    whose batch produced it; the user's model is untouched."""
    base, where, train, val = planted(0, n_blocks=4)
    snap = snapshot(base)
    train, val = list(train[:4]), list(val[:4])
    bad = train if phase == "train" else val
    bad[2] = (bad[2][0], torch.full_like(bad[2][1], value))
    what = "train_batches" if phase == "train" else "val_batches"
    shown = "nan" if value != value else "inf"  # an MSE to a -inf target is +inf
    with pytest.raises(SearchLossError, match=rf"the {phase} loss is {shown} at step 3 \(a batch of {what}\).*"
                                              r"your model is unchanged"):
        search(base, pc.AdapterSpec(pc.LoRA(r=2)), train, val, steps=6, warmup=0, loss_fn=mse, shuffle=False,
               progress=False)
    assert_unchanged(base, snap)


def test_validation_batch_of_the_wrong_form_names_the_step():
    base, where, train, val = planted(0, n_blocks=4)
    snap = snapshot(base)
    bad = list(val[:2]) + [["not", "a", "batch"]]
    with pytest.raises(SearchInputError, match=r"validation step 3 \(val_batches\): expected \(x, y\) batches, got list"):
        search(base, pc.AdapterSpec(pc.LoRA(r=2)), train, bad, steps=6, warmup=0, loss_fn=_strict_mse, shuffle=False,
               progress=False)
    assert_unchanged(base, snap)


def test_bad_schedule_arguments():
    base, where, train, val = planted(0, n_blocks=4)
    for kw, pat in [(dict(tau_start=0.0), "tau_start must be a positive number"),
                    (dict(tau_start=0.1, tau_end=0.5), "tau_end=0.5 must be <= tau_start=0.1"),
                    (dict(lr=float("nan")), "lr must be a positive number"),
                    (dict(loss_fn="mse"), "loss_fn must be callable")]:
        kw = {"loss_fn": mse, **kw}
        with pytest.raises(pc.AdapterError, match=pat):
            search(base, pc.AdapterSpec(pc.LoRA(r=2)), train, val, steps=2, progress=False, **kw)
