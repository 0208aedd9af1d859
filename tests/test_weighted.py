"""add_weighted_adapter: PEFT's numbers for LoRA (linear / cat / svd), exact cat/svd for any
method through its low-rank form, PEFT's activation semantics, and the bad inputs."""

from __future__ import annotations

import pytest
import torch

import peftcompile as pc
from peftcompile.errors import AdapterTypeError
from peftcompile.state import site_adapters, state_of
from conftest import VOCAB, hf_output, randomize_adapters_, tiny_llama

peft = pytest.importorskip("peft")


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))


def logits(m, x=None) -> torch.Tensor:
    with torch.no_grad():
        return hf_output(m(input_ids=ids() if x is None else x))


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CONFIGS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=2, target_modules=["v_proj", "down_proj"]),
    "c": dict(r=2, lora_alpha=8, target_modules=["v_proj", "o_proj"]),
}


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """A PEFT model with adapters a, b, c (random, init_lora_weights=False) and their folders."""
    root = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    base = tiny_llama().eval()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    pm = None
    for n, c in CONFIGS.items():
        cfg = peft.LoraConfig(init_lora_weights=False, **c)
        pm = peft.get_peft_model(base, cfg, adapter_name=n) if pm is None else (pm.add_adapter(n, cfg) or pm)
    for n in CONFIGS:
        pm.save_pretrained(root, selected_adapters=[n])
    dirs = {n: root / n for n in CONFIGS}  # PEFT writes non-default adapters to subfolders
    return pm.eval(), sd, dirs


def ours_from(peft_pair):
    _, sd, dirs = peft_pair
    m = tiny_llama().eval()
    m.load_state_dict(sd)
    for n, d in dirs.items():
        pc.load_peft_adapter(m, d, n)
    return m


@pytest.mark.parametrize("adapters,weights,kind,kw", [
    (["a", "b"], [0.7, -0.4], "cat", {}),
    (["a", "b", "c"], [1.0, 0.5, 2.0], "cat", {}),
    (["a", "b"], [0.7, 0.3], "linear", {}),
    (["a", "b"], [1.2, -0.6], "linear", {}),
    (["a", "c"], [0.5, 1.5], "svd", {}),
    (["a", "b", "c"], [0.5, 1.0, 0.8], "svd", {"svd_rank": 3}),
    (["a", "b"], [1.0, 1.0], "svd", {"svd_rank": 2, "svd_clamp": 0.9}),
    (["c"], [2.0], "svd", {}),  # one adapter: PEFT switches to linear
])
def test_matches_peft(peft_pair, adapters, weights, kind, kw):
    pm, _, _ = peft_pair
    name = f"mix_{kind}_{len(adapters)}_{abs(hash(str(weights))) % 1000}"
    pm.add_weighted_adapter(adapters, weights, name, combination_type=kind, **kw)
    pm.set_adapter(name)
    want = logits(pm)
    pm.set_adapter("a")
    pm.delete_adapter(name)

    m = ours_from(peft_pair)
    before = logits(m)
    pc.add_weighted_adapter(m, adapters, weights, "mix", combination_type=kind, **kw)
    assert torch.equal(logits(m), before)  # not activated (PEFT)
    pc.set_active(m, "mix")
    assert rel(logits(m), want) <= 1e-5
    # it runs at the union of the sources' sites
    sites = {c.site for _, _, c in site_adapters(m) if "mix" in c}
    assert sites == {c.site for _, _, c in site_adapters(m) if any(a in c for a in adapters)}


def test_new_adapter_is_frozen_until_asked():
    torch.manual_seed(0)
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"]), "a")
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"]), "b")
    pc.add_weighted_adapter(m, ["a", "b"], [1, 1], "ab", combination_type="cat")
    assert state_of(m).active == ("b",)
    pc.set_active(m, "ab")
    assert not any(p.requires_grad for _, _, c in site_adapters(m) for p in c["ab"].parameters())
    pc.set_active(m, "ab", inference_mode=False)
    assert all(p.requires_grad for _, _, c in site_adapters(m) for p in c["ab"].parameters())


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_cat_and_full_rank_svd_are_exact_for_any_method(kind):
    """Across methods (GraLoRA + RaSA + LoRA): delta_weight of the result == sum w_i dW_i."""
    torch.manual_seed(0)
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.GraLoRA(r=4, k=2, hybrid_r=2), targets=["q_proj", "v_proj"]), "g")
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1), targets=["v_proj", "o_proj"]), "r")
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, use_rslora=True), targets=["q_proj"]), "l")
    randomize_adapters_(m, std=0.3)
    w = {"g": 0.6, "r": -1.3, "l": 2.0}
    kw = {"svd_rank": 64} if kind == "svd" else {}  # >= every site's full rank: no truncation
    pc.add_weighted_adapter(m, list(w), list(w.values()), "mix", combination_type=kind, **kw)
    for _, _, c in site_adapters(m):
        want = sum(wt * c[a].delta_weight().double() for a, wt in w.items() if a in c)
        got = c["mix"].delta_weight().double()
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), c.site
    # and in the forward: only "mix" active == base + sum of weighted deltas
    pc.set_active(m, "mix")
    with torch.no_grad():
        y_mix = logits(m)
    pc.merge_and_unload(m)
    assert rel(logits(m), y_mix) <= 1e-5


def test_svd_truncation_keeps_the_top_singular_directions():
    torch.manual_seed(0)
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4), targets=["q_proj"]), "a")
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4), targets=["q_proj"]), "b")
    randomize_adapters_(m, std=0.3)
    pc.add_weighted_adapter(m, ["a", "b"], [1.0, 1.0], "top2", svd_rank=2)
    for _, _, c in site_adapters(m):
        full = c["a"].delta_weight() + c["b"].delta_weight()
        U, S, Vh = torch.linalg.svd(full)
        best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
        assert torch.allclose(c["top2"].delta_weight(), best, atol=1e-5)


def _model_state(m):
    st = state_of(m)
    return (sorted(m.state_dict()), sorted(st.specs), st.active, sorted(st.frozen),
            [(c.site, tuple(c), c.active) for _, _, c in site_adapters(m)])


@pytest.mark.parametrize("args,kw,exc,match", [
    ((["a", "zz"], [1, 1], "m"), {}, pc.AdapterError, r"unknown adapter\(s\) \['zz'\]"),
    (("a", [1], "m"), {}, AdapterTypeError, "non-empty list of adapter names"),
    (([], [], "m"), {}, AdapterTypeError, "non-empty list"),
    ((["a", "a"], [1, 1], "m"), {}, pc.AdapterError, "twice"),
    ((["a", "b"], [1], "m"), {}, pc.AdapterError, "one number per adapter"),
    ((["a", "b"], [1, float("nan")], "m"), {}, pc.AdapterError, "finite numbers"),
    ((["a", "b"], [1, 1], "b"), {}, pc.AdapterError, "named 'b' exists"),
    ((["a", "b"], [1, 1], "bad name"), {}, pc.AdapterError, "bad name"),
    ((["a", "b"], [1, 1], "m"), {"combination_type": "ties"}, pc.AdapterError, "TIES/DARE"),
    ((["a", "b"], [1, 1], "m"), {"combination_type": "mean"}, pc.AdapterError, "must be one of"),
    ((["a", "b"], [1, 1], "m"), {"svd_rank": 0}, pc.AdapterError, "svd_rank"),
    ((["a", "b"], [1, 1], "m"), {"svd_clamp": 1.5}, pc.AdapterError, "svd_clamp"),
    ((["a", "g"], [1, 1], "m"), {"combination_type": "linear"}, pc.AdapterError, r"\['gralora'\] adapters have none"),
    ((["a", "b"], [1, 1], "m"), {"combination_type": "linear"}, pc.AdapterError, "equal ranks"),
])
def test_bad_calls_change_nothing(args, kw, exc, match):
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"]), "a")
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4), targets=["v_proj"]), "b")
    pc.adapt(m, pc.AdapterSpec(pc.GraLoRA(r=4, k=2), targets=["q_proj"]), "g")
    before, y = _model_state(m), logits(m)
    with pytest.raises(exc, match=match):
        pc.add_weighted_adapter(m, *args, **kw)
    assert _model_state(m) == before and torch.equal(logits(m), y)


def test_merged_sources_are_refused_with_the_fix():
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"]), "a")
    pc.merge(m)
    with pytest.raises(pc.AdapterError, match="unmerge"):
        pc.add_weighted_adapter(m, ["a"], [1.0], "m")
    assert sorted(state_of(m).specs) == ["a"]
