"""PEFT's per-site and selection options: rank_pattern / alpha_pattern, use_rslora,
layers_to_transform / layers_pattern and per-architecture default targets -- same sites and
same numbers as PEFT, both checkpoint directions, and the bad inputs."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import peftcompile as pc
from peftcompile.errors import AdapterTypeError, AdapterWarning
from peftcompile.state import site_adapters, state_of
from conftest import MLP, VOCAB, hf_output, randomize_adapters_, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))


def logits(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_output(m(input_ids=x))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def peft_sites(pm) -> set[str]:
    return {n.removeprefix("base_model.model.") for n in pm.targeted_module_names}


def our_sites(m: nn.Module, name: str = "default") -> set[str]:
    return set(pc.summary(m).sites[name])


# ------------------------------------------------------------------ rank / alpha patterns, rsLoRA
PEFT_CONFIGS = {
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                     alpha_pattern={"down_proj": 3.0, "q_proj": 12.0}),
    "rslora": dict(r=8, lora_alpha=4, target_modules=["q_proj", "up_proj"], use_rslora=True),
    "rslora_patterns": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                            rank_pattern={"o_proj": 8}, alpha_pattern={"mlp.gate_proj": 2.0}),
}


def _spec_like(c: dict) -> pc.AdapterSpec:
    return pc.AdapterSpec(pc.LoRA(r=c["r"], alpha=c["lora_alpha"], use_rslora=c.get("use_rslora", False)),
                          targets=c["target_modules"], rank_pattern=c.get("rank_pattern"),
                          alpha_pattern=c.get("alpha_pattern"))


@pytest.mark.parametrize("case", list(PEFT_CONFIGS))
def test_patterns_and_rslora_match_peft_both_ways(tmp_path, case):
    """PEFT checkpoint -> ours equals PeftModel; our spec builds the same per-site shapes and
    scalings; ours -> format="peft" -> PeftModel.from_pretrained equals ours (<= 1e-5 rel)."""
    c = PEFT_CONFIGS[case]
    torch.manual_seed(0)
    base = tiny_llama().eval()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    pm = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **c)).eval()
    x = ids(1)
    want = logits(pm, x)
    pm.save_pretrained(tmp_path / "peft")

    ours = tiny_llama().eval()
    ours.load_state_dict(base_sd)
    pc.load_peft_adapter(ours, tmp_path / "peft")
    assert rel(logits(ours, x), want) <= 1e-5
    assert our_sites(ours) == peft_sites(pm)
    # every site has PEFT's rank and scaling
    for _, _, cont in site_adapters(ours):
        layer = pm.base_model.model.get_submodule(cont.site)
        a = cont["default"]
        assert a.lora_A.shape[0] == layer.r["default"], cont.site
        assert a.cfg.scaling == pytest.approx(layer.scaling["default"], rel=1e-12), cont.site

    # our own spec picks the same shapes and scalings
    built = tiny_llama().eval()
    pc.adapt(built, _spec_like(c))
    got = {cont.site: (a.lora_A.shape[0], a.cfg.scaling)
           for _, _, cont in site_adapters(built) for a in [cont["default"]]}
    assert got == {s: (pm.base_model.model.get_submodule(s).r["default"],
                       pytest.approx(pm.base_model.model.get_submodule(s).scaling["default"])) for s in got}

    # and back: our checkpoint in PEFT's format loads in PEFT with the same outputs
    pc.save_adapters(ours, tmp_path / "ours_peft", format="peft")
    fresh = tiny_llama().eval()
    fresh.load_state_dict(base_sd)
    back = peft.PeftModel.from_pretrained(fresh, tmp_path / "ours_peft").eval()
    assert rel(logits(back, x), want) <= 1e-5

    # and our own format round-trips exactly, patterns included
    pc.save_adapters(ours, tmp_path / "ours")
    spec = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["spec"]
    assert spec.get("rank_pattern") == c.get("rank_pattern") and spec.get("alpha_pattern") == c.get("alpha_pattern")
    again = tiny_llama().eval()
    again.load_state_dict(base_sd)
    pc.load_adapters(again, tmp_path / "ours")
    assert torch.equal(logits(again, x), logits(ours, x))


def test_rslora_scaling_and_merge():
    cfg = pc.LoRA(r=16, alpha=8, use_rslora=True)
    assert cfg.scaling == 2.0  # 8 / sqrt(16)
    torch.manual_seed(0)
    m = MLP().eval()
    pc.adapt(m, pc.AdapterSpec(cfg, targets="all-linear"))
    randomize_adapters_(m)
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = m(x)
        pc.merge(m)
        assert torch.allclose(m(x), y, atol=1e-5)


def test_pattern_order_first_match_wins_like_peft():
    """Two patterns match one site: the first listed wins (PEFT's get_pattern_key)."""
    spec = pc.AdapterSpec(pc.LoRA(r=4), targets=["q_proj"], rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 8})
    assert spec.config_for("model.layers.0.self_attn.q_proj").r == 2
    spec = pc.AdapterSpec(pc.LoRA(r=4), targets=["q_proj"], rank_pattern={r"layers\.0\.self_attn\.q_proj": 8, "q_proj": 2})
    assert spec.config_for("model.layers.0.self_attn.q_proj").r == 8
    assert spec.config_for("model.layers.1.self_attn.q_proj").r == 2
    # a pattern matches a whole dotted suffix, not a substring of a name
    assert spec.config_for("model.layers.1.self_attn.xq_proj").r == 4


def test_gralora_rank_pattern_checks_divisibility_per_site():
    m = tiny_llama()
    spec = pc.AdapterSpec(pc.GraLoRA(r=4, k=2, alpha=8), targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 8})
    pc.adapt(m, spec)
    shapes = {cont.site: tuple(cont["default"].gralora_A.shape) for _, _, cont in site_adapters(m)}
    assert shapes["model.layers.0.self_attn.v_proj"][-1] == 8 and shapes["model.layers.0.self_attn.q_proj"][-1] == 4
    with pytest.raises(pc.AdapterError, match=r"v_proj.*rank/alpha pattern gives \{'r': 3\}"):
        pc.adapt(tiny_llama(), pc.AdapterSpec(pc.GraLoRA(r=4, k=2), targets=["v_proj"], rank_pattern={"v_proj": 3}))


def test_rasa_group_members_need_one_config():
    """RaSA shares tensors across a group (same projection in every layer): one config per group."""
    m = tiny_llama()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(pc.AdapterError, match="group .* different configs"):
        pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1), targets=["q_proj"], rank_pattern={r"layers\.0\.self_attn\.q_proj": 6}))
    assert state_of(m) is None and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    # a pattern that gives the whole group the same rank is fine
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1), targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 6}))
    assert {a.cfg.r for _, _, c in site_adapters(m) if "v_proj" in c.site for a in [c["default"]]} == {6}


def test_peft_format_refuses_patterns_it_cannot_express(tmp_path):
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.GraLoRA(r=4, k=2), targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 8}))
    with pytest.raises(pc.AdapterError, match="rank_pattern.*GRALORA"):
        pc.save_adapters(m, tmp_path / "x", format="peft")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ layers_to_transform
LAYER_CASES = [
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 1]),
    dict(target_modules=["q_proj", "o_proj", "gate_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules=["v_proj"], layers_to_transform=[0], layers_pattern=["h", "layers"]),
]


@pytest.mark.parametrize("c", LAYER_CASES, ids=lambda c: f"{c['layers_to_transform']}-{c.get('layers_pattern')}")
def test_layers_to_transform_selects_peft_sites(c):
    pm = peft.get_peft_model(tiny_llama(num_hidden_layers=3), peft.LoraConfig(r=2, **c))
    ours = tiny_llama(num_hidden_layers=3)
    pc.adapt(ours, pc.AdapterSpec(pc.LoRA(r=2), targets=c["target_modules"], layers_to_transform=c["layers_to_transform"],
                                  layers_pattern=c.get("layers_pattern")))
    assert our_sites(ours) == peft_sites(pm)


def test_layers_to_transform_on_gpt2_blocks():
    c = dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1], layers_pattern="h")
    pm = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, fan_in_fan_out=True, **c))
    ours = tiny_gpt2()
    pc.adapt(ours, pc.AdapterSpec(pc.LoRA(r=2), targets=c["target_modules"], layers_to_transform=[1], layers_pattern="h"))
    assert our_sites(ours) == peft_sites(pm) and all(".h.1." in s for s in our_sites(ours))


def test_layers_that_match_nothing_name_the_layers():
    m = tiny_llama()
    with pytest.raises(pc.AdapterError, match=r"in layers \[7\].*layer of each site"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"], layers_to_transform=[7]))
    assert state_of(m) is None


def test_peft_checkpoint_with_layers_to_transform_loads(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=3).eval()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[2],
                                                   init_lora_weights=False)).eval()
    want = logits(pm, ids())
    pm.save_pretrained(tmp_path)
    ours = tiny_llama(num_hidden_layers=3).eval()
    ours.load_state_dict(sd)
    pc.load_peft_adapter(ours, tmp_path)
    assert our_sites(ours) == {"model.layers.2.self_attn.q_proj"}
    assert rel(logits(ours, ids()), want) <= 1e-5


# ------------------------------------------------------------------ default targets
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_default_targets_are_peft_defaults_for_the_architecture(make):
    kw = {"fan_in_fan_out": True} if make is tiny_gpt2 else {}
    pm = peft.get_peft_model(make(), peft.LoraConfig(r=2, **kw))
    ours = make()
    pc.adapt(ours, pc.AdapterSpec(pc.LoRA(r=2)))
    assert our_sites(ours) == peft_sites(pm)
    # the resolved targets are recorded in the adapter's spec (and so in its checkpoint)
    assert set(pc.adapters_of(ours)["default"].targets) == set(pm.peft_config["default"].target_modules)


def test_default_targets_follow_the_method():
    """GraLoRA has its own PEFT table; RaSA is not in PEFT, so it gets every linear site."""
    pm = peft.get_peft_model(tiny_llama(), peft.GraloraConfig(r=4, gralora_k=2))
    ours = tiny_llama()
    pc.adapt(ours, pc.AdapterSpec(pc.GraLoRA(r=4, k=2)))
    assert our_sites(ours) == peft_sites(pm)
    m = tiny_llama(num_hidden_layers=2)
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1)))
    assert len(our_sites(m)) == 14 and pc.adapters_of(m)["default"].targets == "all-linear"


def test_default_targets_without_a_peft_default_are_all_linear():
    """PEFT raises for models without a default; we adapt every linear site (documented)."""
    m = MLP()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2)))
    assert our_sites(m) == {n for n, x in MLP().named_modules() if isinstance(x, nn.Linear)}
    assert pc.adapters_of(m)["default"].targets == "all-linear"


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw,exc,match", [
    ({"rank_pattern": ["q_proj"]}, AdapterTypeError, "rank_pattern must map"),
    ({"rank_pattern": {"q_proj": 0}}, pc.AdapterError, r"rank_pattern\['q_proj'\] = 0: r must be an int >= 1"),
    ({"rank_pattern": {"q_proj": 2.5}}, pc.AdapterError, "r must be an int"),
    ({"rank_pattern": {"q_proj": True}}, pc.AdapterError, "r must be an int"),
    ({"rank_pattern": {"(q_proj": 2}}, pc.AdapterError, "rank_pattern key '\\(q_proj' is not a valid regex"),
    ({"rank_pattern": {3: 2}}, AdapterTypeError, "keys must be non-empty site patterns"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, pc.AdapterError, "finite, non-zero"),
    ({"alpha_pattern": {"q_proj": 0}}, pc.AdapterError, "finite, non-zero"),
    ({"layers_to_transform": -1}, AdapterTypeError, "layers_to_transform"),
    ({"layers_to_transform": []}, AdapterTypeError, "layers_to_transform"),
    ({"layers_to_transform": ["0"]}, AdapterTypeError, "layers_to_transform"),
    ({"layers_pattern": "layers"}, pc.AdapterError, "needs layers_to_transform"),
    ({"layers_pattern": "(", "layers_to_transform": 0}, pc.AdapterError, "layers_pattern '\\(' is not a valid regex"),
])
def test_bad_pattern_and_layer_options_are_refused(kw, exc, match):
    with pytest.raises(exc, match=match):
        pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"], **kw)


def test_unused_pattern_warns():
    with pytest.warns(AdapterWarning, match=r"rank_pattern keys \['k_proj'\] match no adapted site"):
        pc.adapt(tiny_llama(), pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"], rank_pattern={"k_proj": 4}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterWarning)
        pc.adapt(tiny_llama(), pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"], rank_pattern={"q_proj": 4}))


def test_load_into_adapter_with_other_per_site_ranks_is_refused(tmp_path):
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"], rank_pattern={r"layers\.0\.self_attn\.q_proj": 4}))
    pc.save_adapters(m, tmp_path)
    other = tiny_llama()
    pc.adapt(other, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"]))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(pc.AdapterError, match="other per-site ranks"):
        pc.load_adapters(other, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


# ------------------------------------------------------------------ the backend and ONNX honour per-site configs
@pytest.mark.usefixtures("fresh_dynamo")
def test_backend_fuses_sites_with_their_own_rank_and_scaling():
    from torch._dynamo.utils import counters
    from conftest import compile_fast, counted, param_grads, token_ids

    m = tiny_llama(num_hidden_layers=1)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=8, use_rslora=True), targets="all-linear",
                               rank_pattern={"v_proj": 2, "down_proj": 8}, alpha_pattern={"o_proj": 3.0}))
    randomize_adapters_(m, std=0.1)
    ref = copy.deepcopy(m)
    ids = token_ids()
    out = hf_output(compile_fast(m)(ids))
    out.square().mean().backward()
    want = hf_output(ref(ids))
    want.square().mean().backward()
    assert counters["peftcompile"]["fused_lora"] == 7 and counted("skipped_") == 0
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    ga, gb = param_grads(m), param_grads(ref)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-5, rtol=1e-5)


def test_unmerged_onnx_export_with_per_site_ranks_matches_pytorch(tmp_path):
    import numpy as np
    from peftcompile.export import to_onnx
    from peftcompile.export.ort import OrtAdapterSession

    torch.manual_seed(0)
    m = MLP().eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=8), targets="all-linear", rank_pattern={"fc2": 2}))
    randomize_adapters_(m)
    exp = to_onnx(m, torch.randn(2, 16), tmp_path / "m.onnx", merged=False)
    x = torch.randn(5, 16)
    got = next(iter(OrtAdapterSession(exp.path).bind(exp.sidecar).run({"x": x}).values()))
    with torch.no_grad():
        want = m(x).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def test_diffora_search_keeps_per_site_ranks_and_searches_all_linear_by_default():
    from peftcompile.diffora import search

    torch.manual_seed(0)
    base = tiny_llama(num_hidden_layers=1)

    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        return [{"input_ids": torch.randint(3, VOCAB, (2, 6), generator=g)} for _ in range(2)]

    def loss(model, batch):
        return hf_output(model(**batch)).float().square().mean()

    spec = pc.AdapterSpec(pc.LoRA(r=2), rank_pattern={"down_proj": 4})
    p = search(base, spec, batches(0), batches(1), budget=0.5, steps=2, loss_fn=loss, progress=False)
    assert len(p.gates) == 7  # every linear site was a candidate, not PEFT's q/v default
    m = pc.adapt(copy.deepcopy(base), spec, placement=p)
    assert p.weights and set(p.weights) == set(p.sites)
    for _, _, c in site_adapters(m):
        assert c["default"].lora_A.shape[0] == (4 if c.site.endswith("down_proj") else 2)
        assert torch.equal(c["default"].lora_A, p.weights[c.site]["lora_A"])  # warm-started at its own rank


# ------------------------------------------------------------------ adapter dtype policy
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adapters_are_float32_on_a_16bit_base_like_peft(tmp_path, dtype):
    """PEFT's autocast_adapter_dtype=True: float32 adapters on a 16-bit base, by default and
    when loading; the output error against a float64 reference (same rounded base weights)
    stays within 2x PEFT's own plus one rounding of the output."""
    torch.manual_seed(0)
    base = tiny_llama().eval()
    pm = peft.get_peft_model(copy.deepcopy(base).to(dtype),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    pm.eval().save_pretrained(tmp_path)
    ours = copy.deepcopy(base).to(dtype)
    pc.load_peft_adapter(ours, tmp_path)
    kinds = {(("peftcompile" in n), p.dtype) for n, p in ours.named_parameters()}
    assert kinds == {(True, torch.float32), (False, dtype)}
    assert {p.dtype for n, p in pm.named_parameters() if "lora_" in n} == {torch.float32}
    ref = copy.deepcopy(base).double()
    pc.load_peft_adapter(ref, tmp_path)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), ours.parameters()):
            p.copy_(q.double())
    x = ids(2)
    want = logits(ref, x)
    e_peft = (logits(pm, x).double() - want).abs().max().item()
    e_ours = (logits(ours, x).double() - want).abs().max().item()
    ulp = want.abs().max().item() * torch.finfo(dtype).eps
    assert e_ours <= 2 * e_peft + ulp, (e_ours, e_peft)
    # merging a float32 adapter into the 16-bit weight keeps W's dtype and the outputs
    y = logits(ours, x)
    pc.merge(ours)
    assert all(p.dtype == dtype for n, p in ours.named_parameters() if "peftcompile" not in n)
    assert (logits(ours, x).double() - y.double()).abs().max().item() <= 8 * ulp
    # autocast_adapter_dtype=False follows the base dtype
    m = copy.deepcopy(base).to(dtype)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"]), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in m.named_parameters() if "peftcompile" in n} == {dtype}
    with pytest.raises(AdapterTypeError, match="autocast_adapter_dtype"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"]), "b", autocast_adapter_dtype="yes")
