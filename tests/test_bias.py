"""PEFT's bias options: ``LoRA(lora_bias=True)`` (a bias on B) and ``AdapterSpec(bias="all" |
"lora_only")`` (training the base biases), against PEFT 0.21's numbers (<= 1e-5), both
checkpoint directions, merge, the backend's fused path, and the bad inputs. Our one
difference on purpose: each adapter has its own copy of the biases it trains (PEFT shares
them), so ``disabled()`` and switching adapters see the biases of the base / other adapter."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import peftcompile as pc
from peftcompile.errors import AdapterError, AdapterTypeError, AdapterWarning
from peftcompile.state import merged_sites, state_of
from conftest import MLP, compile_fast, counted, param_grads, tiny_llama, token_ids

peft = pytest.importorskip("peft")


class Net(nn.Module):
    """Biased and bias-free linears around a LayerNorm (whose bias bias="all" trains too)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 12)
        self.ln = nn.LayerNorm(12)
        self.lin1 = nn.Linear(12, 10, bias=False)
        self.lin2 = nn.Linear(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.relu(self.lin1(self.ln(self.lin0(x)))))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def x_(seed: int = 1) -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))


def _randomize_(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _pair(peft_kwargs: dict, spec_kwargs: dict, method_kwargs: dict | None = None):
    """(PeftModel, ours) on equal base weights with equal trainable tensors."""
    torch.manual_seed(0)
    base = Net()
    sd = copy.deepcopy(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=6, **peft_kwargs))
    ours = Net()
    ours.load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterWarning)
        pc.adapt(ours, pc.AdapterSpec(pc.LoRA(r=4, alpha=6, **(method_kwargs or {})),
                                      targets=peft_kwargs["target_modules"], **spec_kwargs))
    _randomize_(pm)
    return pm, ours


def _copy_peft_into_ours_(pm, ours, tmp_path) -> None:
    pm.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AdapterWarning)
        pc.delete_adapter(ours, "default")  # the last adapter: unload; then load PEFT's
        pc.load_peft_adapter(ours, tmp_path / "peft", is_trainable=True)


# ------------------------------------------------------------------ lora_bias
def test_lora_bias_matches_peft_forward_merge_and_both_checkpoint_ways(tmp_path):
    pm, ours = _pair(dict(target_modules=["lin0", "lin2"], lora_bias=True), {}, dict(lora_bias=True))
    _copy_peft_into_ours_(pm, ours, tmp_path)
    x = x_()
    want = pm(x)
    assert rel(ours(x), want) <= 1e-5
    assert ours.lin0.peftcompile["default"].lora_B_bias.abs().max() > 0.1  # the bias is really there
    # ours -> PEFT format -> PeftModel
    pc.save_adapters(ours, tmp_path / "ours", format="peft")
    back = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
    back.base_model.model.load_state_dict(pm.base_model.model.state_dict(), strict=False)
    with torch.no_grad():
        sd = {k: v for k, v in pm.get_base_model().state_dict().items() if "lora_" not in k}
        back.get_base_model().load_state_dict(sd, strict=False)
    assert rel(back(x), want) <= 1e-5
    # merge folds s * b_B into the base bias, as PEFT's merge
    merged = pm.merge_and_unload()
    pc.merge(ours)
    assert rel(ours(x), want) <= 1e-5
    torch.testing.assert_close(ours.lin0.bias, merged.lin0.bias, atol=1e-6, rtol=1e-5)
    pc.unmerge(ours)
    assert rel(ours(x), want) <= 1e-5


def test_lora_bias_training_step_matches_peft(tmp_path):
    pm, ours = _pair(dict(target_modules=["lin0", "lin2"], lora_bias=True), {}, dict(lora_bias=True))
    _copy_peft_into_ours_(pm, ours, tmp_path)
    x = x_()
    for m in (pm, ours):
        m(x).square().mean().backward()
    g_peft = pm.base_model.model.lin2.lora_B["default"].bias.grad
    g_ours = ours.lin2.peftcompile["default"].lora_B_bias.grad
    assert g_ours is not None and rel(g_ours, g_peft) <= 1e-5


def test_lora_bias_on_a_site_without_base_bias_warns_and_refuses_merge_untouched():
    m = Net()
    with pytest.warns(AdapterWarning, match=r"lin1.*no bias"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, lora_bias=True), targets=["lin0", "lin1"]))
    _randomize_(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = x_()
    y = m(x)
    with pytest.raises(AdapterError, match=r"lin1.*no bias to merge"):
        pc.merge(m)
    with pytest.raises(AdapterError, match=r"lin1.*no bias to merge"):
        pc.merge_and_unload(m)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # lin0 was not merged either
    assert merged_sites(m) == [] and torch.equal(m(x), y)


def test_base_model_state_dict_takes_a_merged_lora_bias_out_of_the_base_bias():
    torch.manual_seed(0)
    m = Net()
    orig = {k: v.clone() for k, v in m.state_dict().items()}
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, lora_bias=True), targets=["lin0", "lin2"]))
    _randomize_(m)
    pc.merge(m)
    sd = pc.get_base_model_state_dict(m)
    for k, v in orig.items():
        torch.testing.assert_close(sd[k], v, atol=1e-6, rtol=1e-5, msg=lambda s: f"{k}: {s}")


@pytest.mark.parametrize("fmt", ["peftcompile", "peft"])
def test_saving_a_merged_lora_bias_adapter_that_trains_the_site_bias_keeps_the_bias_unmerged(tmp_path, fmt):
    torch.manual_seed(0)
    base = Net()
    m = copy.deepcopy(base)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, lora_bias=True), targets=["lin0"], bias="lora_only"))
    _randomize_(m)
    x = x_()
    y = m(x)
    pc.merge(m)  # s * b_B now sits in lin0.bias, which this adapter trains (its copy is live)
    pc.save_adapters(m, tmp_path / "ck", format=fmt)
    load = pc.load_adapters if fmt == "peftcompile" else pc.load_peft_adapter
    back = load(copy.deepcopy(base), tmp_path / "ck")
    assert rel(back(x), y) <= 1e-5


def test_lora_bias_is_fused_under_the_backend_and_gated_when_disabled():
    torch._dynamo.reset()
    counters.clear()
    m = tiny_llama(num_hidden_layers=1, attention_bias=True)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=8, lora_bias=True), targets=["q_proj", "v_proj"]))
    _randomize_(m)
    ref = copy.deepcopy(m)
    ids = token_ids()
    cm = compile_fast(m)
    out = cm(input_ids=ids).logits
    expected = ref(input_ids=ids).logits
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    ga, gb = param_grads(m), param_grads(ref)
    assert any(k.endswith("lora_B_bias") for k in ga)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-5, rtol=1e-5, msg=lambda s: f"{k}: {s}")
    assert counters["peftcompile"]["fused_lora"] == 2 and counted("skipped_") == 0
    with pc.disabled(m), torch.no_grad():  # the bias term is gated off with the rest of the delta
        with pc.disabled(ref):
            torch.testing.assert_close(cm(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_bias_refusals_name_the_fix(tmp_path):
    m = MLP()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, lora_bias=True), targets="all-linear"))
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, lora_bias=True), targets="all-linear"), "b")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    for kind in ("linear", "cat", "svd"):
        with pytest.raises(AdapterError, match="lora_bias"):
            pc.add_weighted_adapter(m, ["default", "b"], [0.5, 0.5], "mix", combination_type=kind)
    assert set(pc.summary(m).sites) == {"default", "b"}
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    emb = tiny_llama(num_hidden_layers=1)
    with pytest.raises(AdapterError, match=r"embed_tokens.*lora_bias=True\) has no nn.Embedding form"):
        pc.adapt(emb, pc.AdapterSpec(pc.LoRA(r=2, lora_bias=True), targets=["embed_tokens"]))
    assert state_of(emb) is None  # nothing attached
    with pytest.raises(AdapterTypeError, match="lora_bias"):
        pc.LoRA(lora_bias=1)


# ------------------------------------------------------------------ bias="all" / "lora_only"
PEFT_TRAINED = {  # PEFT's trainable base biases (names without the base_layer wrapper)
    "all": {"lin0.bias", "ln.bias", "lin2.bias"},
    "lora_only": {"lin0.bias"},
}


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_option_trains_peft_s_biases_and_matches_its_step(bias):
    pm, ours = _pair(dict(target_modules=["lin0", "lin1"], bias=bias), dict(bias=bias))
    peft_trained = {n.removeprefix("base_model.model.").replace(".base_layer", "")
                    for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n}
    ours_trained = {n for n, p in ours.named_parameters() if p.requires_grad and "peftcompile" not in n}
    assert peft_trained == ours_trained == PEFT_TRAINED[bias]


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_option_checkpoints_load_both_ways_with_peft_outputs(tmp_path, bias):
    pm, ours = _pair(dict(target_modules=["lin0", "lin1"], bias=bias), dict(bias=bias))
    _copy_peft_into_ours_(pm, ours, tmp_path)  # PEFT -> ours: the trained biases come with it
    x = x_()
    want = pm(x)
    assert rel(ours(x), want) <= 1e-5
    assert state_of_spec(ours).bias == bias
    # one SGD step on both gives the same model
    for m in (pm, ours):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        m(x).square().mean().backward()
        opt.step()
    want = pm(x)
    assert rel(ours(x), want) <= 1e-5
    # ours -> format="peft" -> PeftModel on the untrained base: equal outputs
    pc.save_adapters(ours, tmp_path / "ours", format="peft")
    torch.manual_seed(0)
    back = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours")
    assert back.peft_config["default"].bias == bias
    assert rel(back(x), want) <= 1e-5
    # and our own format round-trips exactly into a fresh base
    pc.save_adapters(ours, tmp_path / "own")
    torch.manual_seed(0)
    fresh = pc.load_adapters(Net(), tmp_path / "own")
    assert torch.equal(fresh(x), ours(x))


def state_of_spec(m: nn.Module):
    return state_of(m).specs["default"]


class WithMHA(nn.Module):
    """nn.MultiheadAttention's in_proj_bias is named like a bias, but PEFT 0.21's bias="all" trains
    only parameters named ``bias``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin0(x)
        return self.lin2(self.mha(h, h, h, need_weights=False)[0])


def test_bias_all_trains_peft_s_set_and_loads_its_checkpoint_beside_in_proj_bias(tmp_path):
    torch.manual_seed(0)
    base = WithMHA()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["lin0"], bias="all"))
    _randomize_(pm)
    peft_trained = {n.removeprefix("base_model.model.").replace(".base_layer", "")
                    for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n}
    ours = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(pc.LoRA(r=2), targets=["lin0"], bias="all"))
    assert {n for n, p in ours.named_parameters() if p.requires_grad and "peftcompile" not in n} == peft_trained
    pm.save_pretrained(tmp_path / "peft")
    loaded = pc.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    x = torch.randn(2, 3, 8)
    assert rel(loaded(x), pm(x)) <= 1e-5


def test_bias_copies_are_per_adapter_and_disabled_is_the_base():
    torch.manual_seed(0)
    m = Net()
    base = copy.deepcopy(m)
    x = x_()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["lin0"], bias="all"))
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["lin0"], bias="all"), "b")
    pc.set_active(m, "default")
    _randomize_(m, seed=1)
    y_default = m(x)
    pc.set_active(m, "b")
    _randomize_(m, seed=2)
    y_b = m(x)
    assert rel(y_b, y_default) > 1e-3
    with pc.disabled(m):
        assert torch.equal(m(x), base(x))  # PEFT would keep the trained biases here (our difference)
    pc.set_active(m, "default")
    assert torch.equal(m(x), y_default)
    with pytest.raises(AdapterError, match=r"both train .*bias"):
        pc.set_active(m, ["default", "b"])
    assert torch.equal(m(x), y_default)
    pc.delete_adapter(m, "default")  # b becomes active, with its own biases
    assert torch.equal(m(x), y_b)
    b_biases = {k: v.clone() for k, v in m.named_parameters() if k.endswith("bias") and "peftcompile" not in k}
    assert any(not torch.equal(v, base.get_parameter(k)) for k, v in b_biases.items())
    pc.unload(m)  # keeps the active adapter's biases (PEFT keeps its trained biases too)
    assert all(torch.equal(m.get_parameter(k), v) for k, v in b_biases.items())
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {n for n, _ in base.named_parameters()}


def test_lora_only_on_a_site_without_bias_trains_nothing_extra():
    m = Net()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["lin1"], bias="lora_only"))
    assert {n for n, p in m.named_parameters() if p.requires_grad and "peftcompile" not in n} == set()


@pytest.mark.parametrize("bad", ["some", "All", ["all"], 1, True])
def test_bad_bias_values_are_refused(bad):
    with pytest.raises(AdapterError, match="bias"):
        pc.AdapterSpec(pc.LoRA(), targets=["lin0"], bias=bad)


def test_gralora_peft_format_refuses_trained_biases(tmp_path):
    m = Net()
    pc.adapt(m, pc.AdapterSpec(pc.GraLoRA(r=4, k=2), targets=["lin0"], bias="all"))
    with pytest.raises(AdapterError, match=r"bias='all'.*default format"):
        pc.save_adapters(m, tmp_path / "g", format="peft")
    assert not (tmp_path / "g").exists()


def test_mixed_batches_refuse_adapters_with_trained_biases():
    m = Net().eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["lin0"], bias="lora_only"))
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["lin0"]), "b")
    with pytest.raises(AdapterError, match=r"biases"):
        m(torch.randn(2, 8), adapter_names=["default", "b"])


# ------------------------------------------------------------------ ONNX
def _first(outputs: dict) -> torch.Tensor:
    return torch.as_tensor(next(iter(outputs.values())))


def test_lora_bias_exports_to_onnx_unmerged_and_merged(tmp_path):
    from peftcompile.export import OrtAdapterSession, to_onnx

    torch.manual_seed(0)
    m = Net().eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, lora_bias=True), targets=["lin0", "lin2"]))
    _randomize_(m)
    x = x_()
    with torch.no_grad():
        want = m(x)
        with pc.disabled(m):
            base = m(x)
    un = to_onnx(m, (x,), tmp_path / "un.onnx", merged=False)
    sess = OrtAdapterSession(un.path)
    got = sess.bind(un.sidecar).run((x,))
    got = _first(got)
    assert rel(got, want) <= 1e-5
    unbound = OrtAdapterSession(un.path).run((x,))  # the defaults: no adapter, the base model (the bias term too)
    assert rel(_first(unbound), base) <= 1e-5
    merged = to_onnx(m, (x,), tmp_path / "merged.onnx", merged=True)
    got = OrtAdapterSession(merged.path).run((x,))
    assert rel(_first(got), want) <= 1e-5


@pytest.mark.parametrize("kw", [dict(bias="lora_only"), dict(trainable=["lin2"])])
def test_unmerged_onnx_export_refuses_an_adapter_that_trains_base_parameters(tmp_path, kw):
    """Its trained biases (or modules) are not graph inputs: the file would bake them in, so it would not run as
    the base model unbound, nor as another adapter with that adapter's sidecar."""
    from peftcompile.export import OrtAdapterSession, to_onnx

    torch.manual_seed(0)
    m = Net().eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["lin0"], **kw))
    _randomize_(m)
    x = x_()
    with pytest.raises(AdapterError, match=r"trains base parameters.*merged=True"):
        to_onnx(m, (x,), tmp_path / "un.onnx", merged=False)
    assert not (tmp_path / "un.onnx").exists()
    merged = to_onnx(m, (x,), tmp_path / "merged.onnx", merged=True)  # the fix named
    with torch.no_grad():
        assert rel(_first(OrtAdapterSession(merged.path).run((x,))), m(x)) <= 1e-5


def test_weighted_adapter_starts_from_the_first_adapter_s_trained_biases():
    """Biases trained by adapters[0] (bias=) carry into the combination: the new adapter's copies start
    from adapters[0]'s values (PEFT's biases are shared, so it would run on the trained ones too; it
    refuses a second adapter with bias, we do not). Two adapters training one bias are refused."""
    torch.manual_seed(0)
    m = Net()
    base = copy.deepcopy(m)
    for name, bias in (("a", "lora_only"), ("b", None)):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["lin0"], bias=bias), name)
        pc.set_active(m, name)
        _randomize_(m, seed=ord(name))
    pc.set_active(m, "a")
    a_bias = m.lin0.bias.detach().clone()
    assert not torch.equal(a_bias, base.lin0.bias)
    pc.add_weighted_adapter(m, ["a", "b"], [1.0, 0.0], "mix", combination_type="cat")
    assert torch.equal(m.lin0.bias, a_bias)  # still "a" active: untouched
    pc.set_active(m, "mix")
    torch.testing.assert_close(m.lin0.bias, a_bias)
    x = x_()
    pc.set_active(m, "a")
    y_a = m(x)
    pc.set_active(m, "mix")
    torch.testing.assert_close(m(x), y_a, atol=1e-6, rtol=1e-5)  # weights [1, 0]: adapter a exactly


class RootBias(nn.Module):
    """A model whose root holds a bias parameter itself."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 6)
        self.bias = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin0(x) + self.bias


def test_root_level_bias_round_trips_through_peft_format(tmp_path):
    torch.manual_seed(0)
    base = RootBias()
    m = copy.deepcopy(base)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["lin0"], bias="all"))
    _randomize_(m)
    x = x_()
    want = m(x)
    pc.save_adapters(m, tmp_path / "p", format="peft")
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "p" / "adapter_model.safetensors")))
    assert "base_model.model.bias" in keys and not any(".." in k for k in keys)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    assert rel(back(x), want) <= 1e-5
    ours = pc.load_peft_adapter(copy.deepcopy(base), tmp_path / "p")
    assert rel(ours(x), want) <= 1e-5
