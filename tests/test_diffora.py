"""DiffoRA placement search: ranking on a planted task, gate mechanics, bi-level gradient
isolation, warm start, save/load, plot and bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftcompile as pc
from peftcompile.state import SHARED_ATTR, STATE_ATTR, site_adapters
from peftcompile.diffora import DiffoRASearch, gate_grid, n_kept, parse_site, plot_placement, search
from peftcompile.methods import method_for
from peftcompile.modules import SiteAdapterSet

from conftest import ResidualStack, MLP, VOCAB, tiny_llama

PLANTED = ("blocks.2.fc", "blocks.5.fc")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tensors here are tiny: on the shared 2-core machine OpenMP threads only contend
    # (a 150-step search took 15 s with 2 threads, 5 s with 1).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Stack(ResidualStack):
    def __init__(self, d: int = 32, n: int = 8) -> None:
        super().__init__(d, n)


def mse(model: nn.Module, batch) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def planted_task(seed: int = 0, d: int = 32, n_batches: int = 8, bs: int = 32):
    """A base Stack and (x, teacher(x)) batches; the teacher differs from the base only by a
    rank-2 change of the two PLANTED projections, so exactly those sites can explain the data."""
    torch.manual_seed(seed)
    base = Stack(d)
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for site in PLANTED:
            u, v = torch.randn(d, 2, generator=g), torch.randn(2, d, generator=g)
            teacher.get_submodule(site).weight += (u @ v) / d**0.5

    def batches(offset: int):
        out = []
        for j in range(n_batches):
            x = torch.randn(bs, d, generator=torch.Generator().manual_seed(offset + j))
            with torch.no_grad():
                out.append((x, teacher(x)))
        return out

    return base, batches(0), batches(1000)


SPECS = {
    "lora": pc.AdapterSpec(pc.LoRA(r=2, alpha=4)),
    "gralora": pc.GraLoRA(r=4, k=2, alpha=8),
    "rasa": pc.RaSA(r=3, k=1, alpha=4),
}
SPECS = {k: v if isinstance(v, pc.AdapterSpec) else pc.AdapterSpec(v) for k, v in SPECS.items()}


# --- the search finds what was planted --------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "gralora", "rasa"])
def test_search_keeps_the_planted_sites(method):
    base, train, val = planted_task(seed=0)
    p = search(base, SPECS[method], train, val, budget=0.25, steps=100, warmup=50, loss_fn=mse,
               lr=3e-2, gate_lr=5e-2, progress=False)
    assert sorted(p.gates) == [f"blocks.{i}.fc" for i in range(8)]
    assert tuple(p.sites) == PLANTED, sorted(p.gates.items(), key=lambda kv: -kv[1])
    others = [v for s, v in p.gates.items() if s not in PLANTED]
    # budget-coupled gates: they share a total of K = 2 and separate (annealed towards 0/1; the gate
    # step anneals with the temperature, so a site the data decides late can end at 0.7 / 0.3:
    # measured LoRA 1.0 / 0.0, GraLoRA 1.0, 0.73 / 0.27)
    assert all(0.0 <= v <= 1.0 for v in p.gates.values())
    assert sum(p.gates.values()) == pytest.approx(2.0, abs=1e-3)
    assert min(p.gates[s] for s in PLANTED) > 0.7 and max(others) < 0.3, p.gates


def test_search_keeps_the_planted_sites_other_seed():
    base, train, val = planted_task(seed=1)
    p = search(base, SPECS["lora"], train, val, budget=0.25, steps=100, warmup=50, loss_fn=mse,
               lr=3e-2, gate_lr=5e-2, seed=1, progress=False)
    assert tuple(p.sites) == PLANTED


def test_search_leaves_user_model_and_rng_alone():
    base, train, val = planted_task()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    flags = {k: p.requires_grad for k, p in base.named_parameters()}
    forward = base.__dict__.get("forward")
    rng = torch.get_rng_state()
    search(base, SPECS["rasa"], train, val, steps=3, loss_fn=mse, progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
    assert {k: p.requires_grad for k, p in base.named_parameters()} == flags
    assert STATE_ATTR not in base.__dict__ and not hasattr(base, SHARED_ATTR)
    assert not any(isinstance(m, SiteAdapterSet) for m in base.modules())
    assert base.__dict__.get("forward") is forward


def test_search_on_adapted_model_keeps_existing_adapter():
    base, train, val = planted_task()
    pc.adapt(base, pc.AdapterSpec(pc.LoRA(r=2), targets=["blocks.0.fc"]))
    with torch.no_grad():
        base.blocks[0].fc.peftcompile["default"].lora_B.fill_(0.1)
    ref = base(train[0][0]).detach()
    s = DiffoRASearch(base, SPECS["lora"], loss_fn=mse)
    # the gated search adapter starts at delta 0: the copy computes what the user's model does
    torch.testing.assert_close(s.model(train[0][0]), ref, rtol=0, atol=0)
    old = {k: v.clone() for k, v in s.model.blocks[0].fc.peftcompile["default"].named_parameters()}
    s.run(train, val, 3, progress=False)
    for k, v in s.model.blocks[0].fc.peftcompile["default"].named_parameters():
        assert torch.equal(v, old[k]), k  # the user's adapter is frozen during the search
    assert "default" in pc.adapters_of(base) and len(pc.adapters_of(base)) == 1
    assert s.sites == [f"blocks.{i}.fc" for i in range(8)]


def test_search_is_deterministic_for_a_seed():
    base, train, val = planted_task()
    kw = dict(budget=0.5, steps=8, warmup=2, loss_fn=mse, lr=3e-2, gate_lr=5e-2, progress=False)
    a = search(base, SPECS["rasa"], train, val, seed=3, **kw)
    b = search(base, SPECS["rasa"], train, val, seed=3, **kw)
    c = search(base, SPECS["rasa"], train, val, seed=4, **kw)
    assert a.gates == b.gates and a.sites == b.sites
    for s in a.weights:
        for k, t in a.weights[s].items():
            assert torch.equal(t, b.weights[s][k])
    for g in a.shared:
        for k, t in a.shared[g].items():
            assert torch.equal(t, b.shared[g][k])
    assert a.gates != c.gates  # the seed is actually used (init and data order)


def test_budget_one_keeps_every_site_and_rounding():
    base, train, val = planted_task()
    p = search(base, SPECS["lora"], train, val, budget=1.0, steps=2, loss_fn=mse, progress=False)
    assert p.sites == [f"blocks.{i}.fc" for i in range(8)] == list(p.gates)
    assert set(p.weights) == set(p.sites)
    assert [n_kept(b, 8) for b in (0.0625, 0.25, 0.5, 1.0)] == [1, 2, 4, 8]
    assert n_kept(0.5, 7) == 4 and n_kept(0.3, 5) == 2  # half up
    # a budget that keeps no site is an error naming the budget and the smallest valid one
    # (it used to be bumped silently to one site)
    with pytest.raises(pc.AdapterError, match=r"budget=0.01 keeps 0 of the 8 candidate sites.*budget >= 0.0625"):
        n_kept(0.01, 8)


def test_kept_sites_are_the_top_gates():
    base, train, val = planted_task()
    s = DiffoRASearch(base, SPECS["lora"], loss_fn=mse, lr=3e-2, gate_lr=5e-2)
    s.run(train, val, 10, progress=False)
    p = s.placement(0.375)
    top = sorted(p.gates, key=lambda k: -p.gates[k])[:3]
    assert sorted(p.sites) == sorted(top) and len(p.sites) == 3
    assert p.sites == [x for x in s.sites if x in p.sites]  # model order


# --- gate mechanics and the bi-level steps ----------------------------------------------

def test_gate_scales_each_delta_by_its_budget_coupled_gate():
    """Each delta is scaled by gamma_c = sigmoid((g_c - theta) / tau), theta such that the
    gammas sum to K (here 1 of 2 sites); the hooks go away with close()."""

    model = MLP()
    spec = pc.AdapterSpec(pc.LoRA(r=4, alpha=8))
    s = DiffoRASearch(model, spec, 0.5, loss_fn=lambda m, b: m(b).sum())
    assert s.k == 1
    fc1, fc2 = s.adapters["fc1"], s.adapters["fc2"]
    with torch.no_grad():
        for p in (fc1.lora_B, fc2.lora_B):
            p.normal_()
        s.loop.gates.logits.copy_(torch.tensor([1.5, -0.7]))
    s.loop.set_tau(0.5)
    # two sites, sum 1: gamma_1 = sigmoid((g1 - g2) / (2 tau)) in closed form
    g1 = torch.sigmoid(torch.tensor((1.5 + 0.7) / (2 * 0.5), dtype=torch.float64)).item()
    assert s.gates() == pytest.approx({"fc1": g1, "fc2": 1 - g1}, abs=1e-6)  # fp32 logits
    x = torch.randn(5, 16)
    m = method_for(spec.method)
    with torch.no_grad():
        h = F.linear(x, s.model.fc1.weight, s.model.fc1.bias)
        h = h + g1 * m.delta(x, dict(fc1.named_parameters()), spec.method)
        h = F.relu(h)
        y = F.linear(h, s.model.fc2.weight, s.model.fc2.bias)
        y = y + (1 - g1) * m.delta(h, dict(fc2.named_parameters()), spec.method)
        torch.testing.assert_close(s.model(x), y, rtol=1e-5, atol=1e-6)
    s.close()  # hooks removed: plain deltas again
    with torch.no_grad():
        hp = F.relu(F.linear(x, s.model.fc1.weight, s.model.fc1.bias)
                    + m.delta(x, dict(fc1.named_parameters()), spec.method))
        yp = F.linear(hp, s.model.fc2.weight, s.model.fc2.bias) + m.delta(hp, dict(fc2.named_parameters()), spec.method)
        torch.testing.assert_close(s.model(x), yp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k, tau", [(1, 1.0), (3, 0.3), (5, 0.05)])
def test_soft_top_k_sums_to_k_and_its_gradient_is_exact(k, tau):
    g = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    gam = soft_top_k_(g, k, tau)
    assert gam.sum().item() == pytest.approx(k, abs=1e-9)
    assert ((gam >= 0) & (gam <= 1)).all()
    order = torch.argsort(g, descending=True)
    assert (gam[order][:-1] >= gam[order][1:]).all()  # monotone in the logit
    # the implicit gradient of theta equals central differences of the solved map
    w = torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + k))
    gg = g.clone().requires_grad_(True)
    (soft_top_k_(gg, k, tau) * w).sum().backward()
    eps = 1e-6
    for i in range(8):
        e = torch.zeros(8, dtype=torch.float64)
        e[i] = eps
        num = ((soft_top_k_(g + e, k, tau) * w).sum() - (soft_top_k_(g - e, k, tau) * w).sum()) / (2 * eps)
        assert gg.grad[i].item() == pytest.approx(num.item(), rel=1e-5, abs=1e-8)
    # competition: raising every logit together changes nothing
    torch.testing.assert_close(soft_top_k_(g + 3.0, k, tau), gam)


def soft_top_k_(g, k, tau):
    from peftcompile.diffora import soft_top_k

    return soft_top_k(g, k, tau)


def test_gates_get_gradients_only_from_the_validation_step():
    base, train, val = planted_task()
    s = DiffoRASearch(base, SPECS["rasa"], loss_fn=mse, lr=3e-2, gate_lr=5e-2)
    logits = s.loop.gates.logits
    weights = s.loop.weights
    assert len(weights) == 8 * 3 + 2  # A, B, D per site + one shared pool (A_S, B_S)
    for t in range(1, 4):
        g0 = logits.detach().clone()
        w0 = [w.detach().clone() for w in weights]
        s.loop.weight_step(train[t], t)
        assert logits.grad is None, "the training loss reached the gates"
        assert torch.equal(logits, g0)
        assert all(w.grad is not None for w in weights)
        assert any(not torch.equal(w, w0_) for w, w0_ in zip(weights, w0))
        w1 = [w.detach().clone() for w in weights]
        s.loop.gate_step(val[t], t)
        assert all(w.grad is None for w in weights), "the validation loss reached the adapter weights"
        assert all(torch.equal(w, w1_) for w, w1_ in zip(weights, w1))
        assert logits.grad is not None and logits.grad.abs().sum() > 0
        assert not torch.equal(logits, g0)


def test_gate_gradient_is_the_validation_loss_gradient():
    """The gate step's gradient is d L_val / d g (checked against central differences)."""
    base, train, val = planted_task()
    base.double()  # float64 so that central differences resolve the gradient
    train = [(x.double(), y.double()) for x, y in train]
    val = [(x.double(), y.double()) for x, y in val]
    s = DiffoRASearch(base, SPECS["lora"], loss_fn=mse, lr=3e-2)
    for t in range(3):
        s.loop.weight_step(train[t])
    s.loop._only(weights=False)
    loss = mse(s.model, val[0])
    loss.backward()
    grad = s.loop.gates.logits.grad.clone()
    eps = 1e-3
    with torch.no_grad():
        for i in (0, 2, 5):
            lg = s.loop.gates.logits
            lg[i] += eps
            up = mse(s.model, val[0]).item()
            lg[i] -= 2 * eps
            down = mse(s.model, val[0]).item()
            lg[i] += eps
            assert grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-9)


# --- warm start ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lora", "gralora", "rasa"])
def test_warm_start_reproduces_searched_adapters(method):
    base, train, val = planted_task()
    spec = SPECS[method]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        s = DiffoRASearch(base, spec, loss_fn=mse, lr=3e-2, gate_lr=5e-2)
    s.run(train, val, 6, progress=False)
    p = s.placement(0.5)
    s.close()
    assert len(p.sites) == 4 and set(p.weights) == set(p.sites)
    final = pc.adapt(copy.deepcopy(base), spec, placement=p)
    assert sorted(pc.summary(final).sites["default"]) == sorted(p.sites)

    # The same function in the search copy: drop the non-kept deltas (and, for RaSA, the
    # dropped members' rows of the shared pool) without gates.
    m = method_for(spec.method)
    with torch.no_grad():
        for site, a in s.adapters.items():
            if site not in p.sites:
                for t in a.parameters():
                    t.zero_()
            elif method == "rasa":
                priv = spec.method.r - spec.method.k
                members = s.shared[a.group].members
                for i, mem in enumerate(members):
                    if mem not in p.sites:
                        a.rasa_D[priv + i * spec.method.k: priv + (i + 1) * spec.method.k] = 0
    x = torch.randn(10, 32)
    for _, _, cont in site_adapters(final):
        got = cont["default"](x)
        want = s.adapters[cont.site](x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        ref = m.delta(x, {**p.weights[cont.site], **(p.shared.get(cont["default"].group) or {})}, spec.method)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(final(x), s.model(x), rtol=1e-5, atol=1e-6)
    if method != "rasa":  # without sharing the kept adapters are exactly the searched ones
        for site in p.sites:
            for k, t in p.weights[site].items():
                assert torch.equal(t, getattr(s.adapters[site], k))


def test_rasa_shared_pool_is_cut_to_the_kept_members():
    base, train, val = planted_task()
    cfg = pc.RaSA(r=4, k=2, alpha=4)
    s = DiffoRASearch(base, pc.AdapterSpec(cfg), loss_fn=mse, lr=3e-2, gate_lr=5e-2)
    s.run(train, val, 4, progress=False)
    with torch.no_grad():  # make the ranking known: keep blocks 1, 4, 6
        s.loop.gates.logits.copy_(torch.tensor([0, 3, 0, 0, 2, 0, 1, -1.0]))
    p = s.placement(3 / 8)
    assert p.sites == ["blocks.1.fc", "blocks.4.fc", "blocks.6.fc"]
    (group,) = p.shared
    assert group == "blocks.*.fc"
    sh = s.shared[group]
    rows = [2, 3, 8, 9, 12, 13]  # k=2 rows per member, members 1, 4, 6
    assert torch.equal(p.shared[group]["rasa_A_shared"], sh.rasa_A_shared[rows])
    assert torch.equal(p.shared[group]["rasa_B_shared"], sh.rasa_B_shared[:, rows])
    assert p.shared[group]["rasa_A_shared"].shape == (3 * 2, 32)
    for site in p.sites:
        d = s.adapters[site].rasa_D
        assert p.weights[site]["rasa_D"].shape == (2 + 3 * 2,)
        assert torch.equal(p.weights[site]["rasa_D"], torch.cat([d[:2], d[2:][rows]]))
        assert torch.equal(p.weights[site]["rasa_A"], s.adapters[site].rasa_A)
    final = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(cfg), placement=p)
    sh_final = getattr(final, SHARED_ATTR)["default"]["blocks__*__fc"]
    assert torch.equal(sh_final.rasa_A_shared, p.shared[group]["rasa_A_shared"])


# --- save / load / plot ----------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    base, train, val = planted_task()
    p = search(base, SPECS["rasa"], train, val, budget=0.5, steps=4, loss_fn=mse, progress=False)
    p.save(tmp_path / "placement.json")
    assert (tmp_path / "placement.safetensors").is_file()
    q = pc.Placement.load(tmp_path / "placement.json")
    assert q.sites == p.sites and q.gates == p.gates
    assert q.weights.keys() == p.weights.keys() and q.shared.keys() == p.shared.keys()
    for s in p.weights:
        assert q.weights[s].keys() == p.weights[s].keys()
        for k in p.weights[s]:
            assert torch.equal(q.weights[s][k], p.weights[s][k])
    for g in p.shared:
        for k in p.shared[g]:
            assert torch.equal(q.shared[g][k], p.shared[g][k])
    x = torch.randn(3, 32)
    a = pc.adapt(copy.deepcopy(base), SPECS["rasa"], placement=p)
    b = pc.adapt(copy.deepcopy(base), SPECS["rasa"], placement=q)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)

    p.save(tmp_path / "bare.json", weights=False)
    assert not (tmp_path / "bare.safetensors").exists()
    r = pc.Placement.load(tmp_path / "bare.json")
    assert r.sites == p.sites and r.gates == p.gates and not r.weights and not r.shared

    (tmp_path / "placement.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="placement.safetensors"):
        pc.Placement.load(tmp_path / "placement.json")
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a placement file"):
        pc.Placement.load(tmp_path / "junk.json")


@pytest.mark.parametrize(
    "name, want",
    [
        ("model.layers.3.self_attn.q_proj", ("model.layers", 3, "self_attn.q_proj")),
        ("transformer.h.1.attn.c_attn", ("transformer.h", 1, "attn.c_attn")),
        ("encoder.layer.0.attention.self.query", ("encoder.layer", 0, "attention.self.query")),
        ("blocks.12", ("blocks", 12, "blocks")),
        ("pooler.dense", ("", None, "pooler.dense")),
        ("fc1", ("", None, "fc1")),
    ],
)
def test_parse_site(name, want):
    assert parse_site(name) == want


def test_gate_grid_and_plot(tmp_path):
    gates = {f"model.layers.{i}.self_attn.{t}": 0.1 * i + (0.01 if t == "v_proj" else 0)
             for i in range(3) for t in ("q_proj", "v_proj")}
    gates["model.layers.1.mlp.down_proj"] = 0.9
    gates["lm_head"] = 0.2
    p = pc.Placement(["model.layers.2.self_attn.v_proj", "model.layers.1.mlp.down_proj"], gates)
    g = gate_grid(p)
    assert g.rows == ["0", "1", "2", "(no layer)"] and g.ylabel == "model.layers"
    assert g.cols == ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "lm_head"]
    assert g.values[2, 1] == pytest.approx(0.21) and g.values[1, 2] == 0.9 and g.values[3, 3] == 0.2
    assert math.isnan(g.values[0, 2]) and math.isnan(g.values[0, 3])
    assert g.kept.sum() == 2 and g.kept[2, 1] and g.kept[1, 2]
    out = plot_placement(p, tmp_path / "gates.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000

    mixed = pc.Placement(["encoder.layer.0.attention.self.query"],
                         {"encoder.layer.0.attention.self.query": 0.7, "decoder.layer.0.attention.self.query": 0.3})
    assert gate_grid(mixed).rows == ["encoder.layer.0", "decoder.layer.0"]
    plot_placement(mixed, tmp_path / "mixed.png")
    assert (tmp_path / "mixed.png").stat().st_size > 0


# --- HF models, batch kinds, progress ----------------------------------------------------

def _lm_batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (2, 8), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def test_search_hf_llama_default_loss_and_adapt(tmp_path):
    model = tiny_llama()
    spec = pc.AdapterSpec(pc.GraLoRA(r=4, k=2, alpha=8))
    p = search(model, spec, _lm_batches(2, 0), (b for b in _lm_batches(2, 1)), budget=0.5, steps=4,
               lr=1e-2, gate_lr=5e-2, progress=False)
    cands = [f"model.layers.{i}.{t}" for i in range(2) for t in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert sorted(p.gates) == sorted(cands)  # all-linear: every projection, not lm_head
    assert len(p.sites) == 7 and set(p.sites) <= set(cands)
    assert len(set(p.gates.values())) > 1  # the gates moved apart
    pc.adapt(model, spec, placement=p)
    assert sorted(pc.summary(model).sites["default"]) == sorted(p.sites)
    out = model(**_lm_batches(1, 2)[0])
    assert torch.isfinite(out.loss)
    plot_placement(p, tmp_path / "llama.png")
    g = gate_grid(p)
    assert g.rows == ["0", "1"] and len(g.cols) == 7 and g.kept.sum() == 7


def test_cycle_batches_orders():
    from peftcompile.diffora.loop import cycle_batches

    def take(it, n):
        return [next(it) for _ in range(n)]

    data = list(range(5))
    a = take(cycle_batches(data, "b", torch.Generator().manual_seed(0), True), 15)
    b = take(cycle_batches(data, "b", torch.Generator().manual_seed(0), True), 15)
    assert a == b and all(sorted(a[i:i + 5]) == data for i in (0, 5, 10))  # each pass a permutation
    assert a[:5] != a[5:10] or a[5:10] != a[10:]  # reshuffled between passes
    assert take(cycle_batches(data, "b", torch.Generator(), False), 7) == data + data[:2]
    gen = (x for x in data)  # one-shot: cached on the first pass, then replayed
    assert take(cycle_batches(gen, "b", torch.Generator(), True), 12) == data + data + data[:2]
    loader = torch.utils.data.DataLoader(torch.arange(4), batch_size=2)  # re-iterable
    got = take(cycle_batches(loader, "b", torch.Generator(), True), 3)
    assert [t.tolist() for t in got] == [[0, 1], [2, 3], [0, 1]]


def test_progress_bar(capsys):
    base, train, val = planted_task()
    search(base, SPECS["lora"], train, val, steps=3, loss_fn=mse, progress=False)
    assert "DiffoRA" not in capsys.readouterr().err
    search(base, SPECS["lora"], train, val, steps=3, loss_fn=mse, progress=True)
    assert "DiffoRA search" in capsys.readouterr().err


# --- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0, 0.0, -0.5, 1.01, 2, float("nan"), True, "0.5", None])
def test_bad_budget(budget):
    base, train, val = planted_task(n_batches=1)
    with pytest.raises(ValueError, match=r"budget=.*valid range \(0, 1\]") as e:
        search(base, SPECS["lora"], train, val, budget=budget, steps=2, loss_fn=mse, progress=False)
    assert repr(budget) in str(e.value)


def test_empty_batches():
    base, train, val = planted_task(n_batches=1)
    with pytest.raises(ValueError, match="train_batches is empty"):
        search(base, SPECS["lora"], [], val, steps=2, loss_fn=mse, progress=False)
    with pytest.raises(ValueError, match="val_batches is empty"):
        search(base, SPECS["lora"], train, [], steps=2, loss_fn=mse, progress=False)
    with pytest.raises(ValueError, match="val_batches yielded no batches"):
        search(base, SPECS["lora"], train, iter(()), steps=2, loss_fn=mse, progress=False)


def test_nan_loss_names_the_step():
    base, train, val = planted_task(n_batches=4)
    bad = list(train)
    bad[2] = (bad[2][0], torch.full_like(bad[2][1], float("nan")))
    with pytest.raises(FloatingPointError, match="train loss is nan at step 3"):
        search(base, SPECS["lora"], bad, val, steps=10, loss_fn=mse, shuffle=False, progress=False)
    bad_val = [(val[0][0] * float("nan"), val[0][1])]
    with pytest.raises(FloatingPointError, match="validation loss is nan at step 1"):  # warmup=0: gates from step 1
        search(base, SPECS["lora"], train, bad_val, steps=10, warmup=0, loss_fn=mse, progress=False)
    with pytest.raises(pc.AdapterError, match="validation loss is nan at step 6"):  # default warmup = steps // 2
        search(base, SPECS["lora"], train, bad_val, steps=10, loss_fn=mse, progress=False)


def test_no_candidate_sites():
    base, train, val = planted_task(n_batches=1)
    with pytest.raises(pc.AdapterError, match="DiffoRA search.*nonexistent.*matched no linear site"):
        search(base, pc.AdapterSpec(pc.LoRA(), targets=["nonexistent"]), train, val, steps=2,
               loss_fn=mse, progress=False)


def test_other_bad_input():
    base, train, val = planted_task(n_batches=1)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        search(base, SPECS["lora"], train, val, steps=0, loss_fn=mse)
    with pytest.raises(ValueError, match="warmup must be an int >= 0"):
        search(base, SPECS["lora"], train, val, steps=1, warmup=-1, loss_fn=mse)
    with pytest.raises(ValueError, match="gate_lr must be a positive number"):
        search(base, SPECS["lora"], train, val, steps=1, gate_lr=0, loss_fn=mse)
    with pytest.raises(TypeError, match="needs dict batches.*loss_fn"):
        search(base, SPECS["lora"], train, val, steps=1, progress=False)  # tuples, default HF loss
    with pytest.raises(TypeError, match="scalar tensor"):
        search(base, SPECS["lora"], train, val, steps=1, loss_fn=lambda m, b: m(b[0]), progress=False)
    with pytest.raises(ValueError, match="returned no .loss.*labels.*loss_fn"):
        search(base, SPECS["lora"], [{"x": train[0][0]}], [{"x": val[0][0]}], steps=1, progress=False)
    with pytest.raises(TypeError, match="AdapterSpec"):
        search(base, pc.LoRA(), train, val, steps=1, loss_fn=mse)
