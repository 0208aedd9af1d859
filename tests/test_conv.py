"""LoRA on nn.Conv1d / nn.Conv2d / nn.Conv3d sites (PEFT's ``lora.Conv1d/2d/3d``): matching, parity
with PEFT (forward, merge, unmerge, disable, training step, gradients), checkpoints both ways, ONNX,
the compile backend, weighted combinations, mixed-adapter batches, DiffoRA, and every refusal."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import peftcompile as pc
from peftcompile.state import site_adapters, state_of

from conftest import ort_output, randomize_adapters_

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

TOL = 1e-5
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class ConvNet(nn.Module):
    """conv -> relu -> 1x1 conv -> mean over space -> linear, in 1, 2 or 3 spatial dims."""

    def __init__(self, dims: int = 2, kernel=3, stride=2, padding=1, bias: bool = True, **conv_kw) -> None:
        super().__init__()
        conv = CONVS[dims]
        self.dims = dims
        self.conv = conv(3, 6, kernel, stride=stride, padding=padding, bias=bias, **conv_kw)
        self.pw = conv(6, 5, 1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        h = self.pw(self.conv(x).relu())
        return self.fc(h.mean(tuple(range(2, 2 + self.dims))))


#: (dims, conv options): strides, paddings ('same' too), 1x1 and non-square kernels, no bias
SHAPES = [
    (1, {}),
    (1, {"kernel": 4, "stride": 1, "padding": "same"}),
    (2, {}),
    (2, {"kernel": (3, 1), "stride": (1, 2), "padding": (1, 0), "bias": False}),
    (2, {"kernel": 1, "stride": 1, "padding": 0}),
    (2, {"kernel": 3, "stride": 1, "padding": "valid"}),
    (3, {"targets": ("conv", "fc")}),  # pw, a 1x1x1 Conv3d: PEFT cannot merge it (test_conv3d_1x1x1_...)
]
SHAPE_IDS = ["1d", "1d-same", "2d", "2d-3x1-nobias", "2d-1x1", "2d-valid", "3d"]


def _x(dims: int, n: int = 4, size: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, *([size] * dims), generator=torch.Generator().manual_seed(seed))


def _twins(dims=2, targets=("conv", "pw", "fc"), r=4, alpha=8.0, dropout=0.0, **kw):
    """(base, PEFT model, ours) on one base with the same random adapter weights (eval mode)."""
    torch.manual_seed(0)
    base = ConvNet(dims, **kw).eval()
    ours = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(pc.LoRA(r=r, alpha=alpha, dropout=dropout), list(targets)))
    randomize_adapters_(ours)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                        target_modules=list(targets)))
    with torch.no_grad():  # ours -> PEFT (PEFT's conv layout: the same values, reshaped)
        for n, p in pm.named_parameters():
            if ".lora_" in n:
                site, kind = n.removeprefix("base_model.model.").split(".lora_")
                p.copy_(getattr(ours.get_submodule(site).peftcompile["default"], "lora_" + kind[0]).reshape(p.shape))
    return base, pm.eval(), ours.eval()


def _unchanged(model, before):
    assert state_of(model) is None and not list(site_adapters(model))
    sd = model.state_dict()
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], v) for k, v in before.items())


# ----------------------------------------------------------------------------- matching
def test_conv_is_a_site_only_when_named():
    m = ConvNet()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets="all-linear"))
    assert [c.site for _, _, c in site_adapters(m)] == ["fc"]  # PEFT's all-linear leaves convs out
    m = ConvNet()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["conv"]))
    (c,) = [c for _, _, c in site_adapters(m)]
    assert (c.site, c.kind, c.in_features, c.out_features) == ("conv", "conv", 3 * 3 * 3, 6)
    a = c["default"]
    assert a.lora_A.shape == (2, 27) and a.lora_B.shape == (6, 2)  # PEFT's [2, 3, 3, 3] / [6, 2, 1, 1], flattened
    assert a.conv == {"kernel_size": (3, 3), "stride": (2, 2), "padding": (1, 1)}
    # PEFT's default init: A kaiming-uniform over the conv's fan-in (C_in * k * k), B zeros
    bound = 1 / 27 ** 0.5
    assert a.lora_A.abs().max() <= bound and torch.count_nonzero(a.lora_A) > 0
    assert torch.count_nonzero(a.lora_B) == 0
    assert type(m.conv) is nn.Conv2d  # same module and class
    # a regex string also reaches convs (PEFT: target_modules as a str is a full-name regex)
    m = ConvNet(3)
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=r"conv|pw"))
    assert sorted(c.site for _, _, c in site_adapters(m)) == ["conv", "pw"]


# ----------------------------------------------------------------------------- parity with PEFT
@pytest.mark.parametrize("dims, kw", SHAPES, ids=SHAPE_IDS)
def test_forward_merge_unmerge_disable_equal_peft(dims, kw):
    kw = dict(kw)
    targets = kw.pop("targets", ("conv", "pw", "fc"))
    base, pm, m = _twins(dims, targets, **kw)
    convs = [s for s in targets if s != "fc"]
    x = _x(dims)
    with torch.no_grad():
        y, y0 = m(x), base(x)
        assert (y - y0).abs().max() > 1e-2  # the adapters do something
        torch.testing.assert_close(y, pm(x), rtol=TOL, atol=TOL)
        with pc.disabled(m):
            torch.testing.assert_close(m(x), y0, rtol=0, atol=0)
        with pm.disable_adapter():
            torch.testing.assert_close(pm(x), y0, rtol=0, atol=0)
        w0 = {s: m.get_submodule(s).weight.clone() for s in convs}
        pc.merge(m)
        for s in convs:  # the merged weight is PEFT's W + get_delta_weight
            want = w0[s] + pm.base_model.model.get_submodule(s).get_delta_weight("default")
            torch.testing.assert_close(m.get_submodule(s).weight, want, rtol=TOL, atol=TOL)
        torch.testing.assert_close(m(x), y, rtol=TOL, atol=TOL)
        pc.unmerge(m)
        for s in convs:
            torch.testing.assert_close(m.get_submodule(s).weight, w0[s], rtol=0, atol=1e-6)
        torch.testing.assert_close(m(x), y, rtol=TOL, atol=TOL)
        want = pm.merge_and_unload()
        out = pc.merge_and_unload(m)
        assert state_of(out) is None and type(out.conv) is CONVS[dims]
        assert out.state_dict().keys() == base.state_dict().keys()
        for k, v in want.state_dict().items():
            torch.testing.assert_close(out.state_dict()[k], v, rtol=TOL, atol=TOL)
        torch.testing.assert_close(out(x), y, rtol=TOL, atol=TOL)


def test_conv3d_1x1x1_merges_exactly_where_peft_raises():
    """PEFT 0.21.2's get_delta_weight takes a 1x1x1 Conv3d for a 1x1 Conv2d (it tests
    ``weight.size()[2:4] == (1, 1)``) and fails on the shapes; ours merges B @ A * s exactly."""
    base, pm, m = _twins(3, ("pw",))
    x = _x(3)
    a = m.pw.peftcompile["default"]
    with torch.no_grad():
        y = m(x)
        torch.testing.assert_close(y, pm(x), rtol=TOL, atol=TOL)
        with pytest.raises(RuntimeError):
            pm.base_model.model.pw.get_delta_weight("default")
        w0 = m.pw.weight.clone()
        pc.merge(m)
        want = w0 + (a.lora_B @ a.lora_A * 2.0).view(5, 6, 1, 1, 1)
        torch.testing.assert_close(m.pw.weight, want, rtol=TOL, atol=TOL)
        torch.testing.assert_close(m(x), y, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_training_step_and_gradients_equal_peft(dims):
    _, pm, m = _twins(dims)
    x = _x(dims)
    for model in (pm, m):
        model.zero_grad()
        model(x).square().mean().backward()
    # only adapter parameters get gradients, and they equal PEFT's (in PEFT's conv layout)
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads.keys() == {n for n, p in m.named_parameters() if p.requires_grad}
    assert grads and all(".peftcompile." in n for n in grads)
    for n, p in pm.named_parameters():
        if ".lora_" in n:
            site, kind = n.removeprefix("base_model.model.").split(".lora_")
            ours = grads[f"{site}.peftcompile.default.lora_{kind[0]}"]
            torch.testing.assert_close(ours.reshape(p.shape), p.grad, rtol=TOL, atol=1e-6)
        else:
            assert p.grad is None
    for model in (pm, m):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(m(x), pm(x), rtol=TOL, atol=TOL)


def test_dropout_draws_in_training_and_eval_equals_peft():
    _, pm, m = _twins(2, dropout=0.3)
    x = _x(2)
    m.train()
    assert not torch.allclose(m(x), m(x))
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), pm(x), rtol=TOL, atol=TOL)


def test_fp16_base_keeps_fp32_adapters_and_merges():
    torch.manual_seed(0)
    base = ConvNet(2).half()
    m = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(pc.LoRA(r=4, alpha=8), ["conv"]))
    randomize_adapters_(m, std=0.05)
    a = m.conv.peftcompile["default"]
    assert a.lora_A.dtype == torch.float32 and m.conv.weight.dtype == torch.float16
    x = _x(2).half()
    with torch.no_grad():
        y = m(x)
        pc.merge(m)
        assert m.conv.weight.dtype == torch.float16
        torch.testing.assert_close(m(x), y, rtol=1e-2, atol=1e-2)
        pc.unmerge(m)


def test_hf_whisper_conv_sites_keep_their_class_and_match_peft_per_layer():
    """HF modules are captured per site: Whisper's encoder convs are adapted in place and keep their
    class, so Whisper's own ``self.conv1.stride[0]`` still works (PEFT 0.21.2's wrapper has no
    ``stride``: PeftModel(whisper) raises AttributeError). Each conv's output equals PEFT's lora.Conv1d
    on the same layer; merge and unmerge are exact on the whole model."""
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(0)
    cfg = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                        max_source_positions=10, max_target_positions=10, vocab_size=60, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    base = WhisperModel(cfg).eval()
    m = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(pc.LoRA(r=4, alpha=8), ["conv1", "conv2", "q_proj"]))
    kinds = {c.site: c.kind for _, _, c in site_adapters(m)}
    assert kinds["encoder.conv1"] == kinds["encoder.conv2"] == "conv" and type(m.encoder.conv1) is nn.Conv1d
    randomize_adapters_(m)
    m.eval()
    feats, dec = torch.randn(2, 8, 20), torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        y = m(feats, decoder_input_ids=dec).last_hidden_state
        assert (y - base(feats, decoder_input_ids=dec).last_hidden_state).abs().max() > 1e-2
        for site, x in (("conv1", feats), ("conv2", torch.randn(2, 16, 20))):
            conv = m.encoder.get_submodule(site)
            one = nn.Sequential()
            one.add_module(site, copy.deepcopy(base.encoder.get_submodule(site)))
            pm = get_peft_model(one, LoraConfig(r=4, lora_alpha=8, target_modules=[site])).eval()
            layer = pm.base_model.model.get_submodule(site)
            a = conv.peftcompile["default"]
            layer.lora_A["default"].weight.copy_(a.lora_A.reshape(layer.lora_A["default"].weight.shape))
            layer.lora_B["default"].weight.copy_(a.lora_B.reshape(layer.lora_B["default"].weight.shape))
            torch.testing.assert_close(conv(x), pm(x), rtol=TOL, atol=TOL)
        pc.merge(m)
        torch.testing.assert_close(m(feats, decoder_input_ids=dec).last_hidden_state, y, rtol=TOL, atol=TOL)
        pc.unmerge(m)
        torch.testing.assert_close(m(feats, decoder_input_ids=dec).last_hidden_state, y, rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_checkpoints_ours_and_peft_both_ways(dims, tmp_path):
    from safetensors.torch import load_file

    base, pm, m = _twins(dims)
    x = _x(dims)
    with torch.no_grad():
        y = m(x)
    # ours -> ours
    pc.save_adapters(m, tmp_path / "ours")
    m2 = pc.load_adapters(copy.deepcopy(base), tmp_path / "ours")
    assert m2.conv.peftcompile["default"].conv == m.conv.peftcompile["default"].conv
    with torch.no_grad():
        assert torch.equal(m2.eval()(x), y)
    # ours in PEFT's format -> PeftModel.from_pretrained: PEFT's keys and conv shapes
    pc.save_adapters(m, tmp_path / "as_peft", format="peft")
    pm.save_pretrained(tmp_path / "peft")
    got, want = load_file(str(tmp_path / "as_peft" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert got["base_model.model.conv.lora_A.weight"].shape == (4, 3, *([3] * dims))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "as_peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y, rtol=TOL, atol=TOL)
    # PEFT's save_pretrained -> load_peft_adapter
    m3 = pc.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert {c.site: c.kind for _, _, c in site_adapters(m3)} == {"conv": "conv", "pw": "conv", "fc": "linear"}
    with torch.no_grad():
        torch.testing.assert_close(m3.eval()(x), pm(x), rtol=TOL, atol=TOL)


def test_peft_checkpoint_for_another_kernel_is_refused(tmp_path):
    torch.manual_seed(0)
    get_peft_model(ConvNet(2, kernel=5, padding=2), LoraConfig(r=4, target_modules=["conv"])).save_pretrained(tmp_path)
    m = ConvNet(2)  # kernel 3: same C_in, other kernel
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(pc.AdapterError, match=r"conv\.lora_A.*\(4, 3, 5, 5\).*needs \(4, 3, 3, 3\)"):
        pc.load_peft_adapter(m, tmp_path)
    _unchanged(m, before)


def test_peft_checkpoint_of_grouped_conv_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    get_peft_model(ConvNet(2, groups=3), LoraConfig(r=3, target_modules=["conv"])).save_pretrained(tmp_path)
    m = ConvNet(2, groups=3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(pc.AdapterError, match=r"Conv2d site 'conv': groups=3"):
        pc.load_peft_adapter(m, tmp_path)
    _unchanged(m, before)


# ----------------------------------------------------------------------------- lifecycle
def test_delete_unload_and_several_adapters():
    base, _, m = _twins(2, targets=("conv",))
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, alpha=2), ["conv", "pw"]), "b")
    randomize_adapters_(m, seed=5)
    x = _x(2)
    with torch.no_grad():
        pc.set_active(m, ["default", "b"])  # both run; both merge
        both = m(x)
        assert not torch.allclose(both, base(x))
        pc.merge(m)
        torch.testing.assert_close(m(x), both, rtol=TOL, atol=TOL)
        pc.unmerge(m)
        pc.set_active(m, "default")
        a = m(x)
        y0 = base(x)
        pc.delete_adapter(m, "b")
        assert set(pc.adapters_of(m)) == {"default"} and "b" not in m.conv.peftcompile
        torch.testing.assert_close(m(x), a, rtol=0, atol=0)
        out = pc.unload(m)
        assert out.state_dict().keys() == base.state_dict().keys()
        torch.testing.assert_close(out(x), y0, rtol=0, atol=1e-6)  # merged and unmerged once: fp32 rounding


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("combination", ["cat", "svd", "linear"])
def test_add_weighted_adapter_equals_peft(dims, combination):
    """PEFT's numbers where PEFT computes them (cat and linear in every dimension, svd on Conv2d).
    PEFT 0.21's svd takes a batched SVD of the 3-D Conv1d delta (wrong factors) and raises on Conv3d;
    ours is the truncated SVD of the flattened delta there too, exact at full rank."""
    base, pm, m = _twins(dims, targets=("conv",))
    pm.add_adapter("b", LoraConfig(r=4, lora_alpha=3, target_modules=["conv"]))
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=3), ["conv"]), "b")
    randomize_adapters_(m, seed=7)
    with torch.no_grad():  # ours -> PEFT's "b"
        a, conv = m.conv.peftcompile["b"], pm.base_model.model.conv
        conv.lora_A["b"].weight.copy_(a.lora_A.reshape(conv.lora_A["b"].weight.shape))
        conv.lora_B["b"].weight.copy_(a.lora_B.reshape(conv.lora_B["b"].weight.shape))
    x = _x(dims)
    w = [0.7, -1.3]
    kw = {"svd_rank": 6} if combination == "svd" else {}  # rank 6 = C_out: the SVD is exact
    pc.add_weighted_adapter(m, ["default", "b"], w, "mix", combination_type=combination, **kw)
    mix = m.conv.peftcompile["mix"]
    assert mix.conv == a.conv
    pc.set_active(m, "mix")
    with torch.no_grad():
        got = m(x)
        assert not torch.allclose(got, base(x))
        if combination != "linear":  # cat and full-rank svd are exact
            dw = sum(wi * m.conv.peftcompile[n].delta_weight() for wi, n in zip(w, ("default", "b")))
            torch.testing.assert_close(mix.delta_weight(), dw, rtol=1e-4, atol=1e-5)
        if combination == "svd" and dims != 2:
            return
        pm.add_weighted_adapter(["default", "b"], w, "mix", combination_type=combination, **kw)
        pm.set_adapter("mix")
        torch.testing.assert_close(got, pm(x), rtol=1e-4, atol=TOL)


def test_mixed_adapter_batch_equals_peft():
    base, pm, m = _twins(2, targets=("conv", "fc"))
    pm.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["conv"]))
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, alpha=4), ["conv"]), "b")
    randomize_adapters_(m, seed=3)
    with torch.no_grad():
        a = m.conv.peftcompile["b"]
        pm.base_model.model.conv.lora_A["b"].weight.copy_(a.lora_A.reshape(2, 3, 3, 3))
        pm.base_model.model.conv.lora_B["b"].weight.copy_(a.lora_B.reshape(6, 2, 1, 1))
    pc.set_active(m, "default")
    m.eval()
    x = _x(2)
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        y = m(x, adapter_names=names)
        torch.testing.assert_close(y, pm(x, adapter_names=names), rtol=TOL, atol=TOL)
        torch.testing.assert_close(y[1], base(x)[1], rtol=0, atol=0)


def test_diffora_search_places_conv_sites():
    from peftcompile import diffora

    torch.manual_seed(0)
    model = ConvNet(2)
    batches = [{"x": _x(2, seed=i), "y": torch.randn(4, 4, generator=torch.Generator().manual_seed(i))}
               for i in range(4)]

    def loss_fn(m, b):
        return (m(b["x"]) - b["y"]).square().mean()

    spec = pc.AdapterSpec(pc.LoRA(r=2), ["conv", "pw", "fc"])
    p = diffora.search(model, spec, batches[:2], batches[2:], budget=0.67, steps=4, loss_fn=loss_fn, progress=False)
    assert set(p.gates) == {"conv", "pw", "fc"} and len(p.sites) == 2
    pc.adapt(model, spec, placement=p)
    kinds = {c.site: c.kind for _, _, c in site_adapters(model)}
    assert set(kinds) == set(p.sites) and all(kinds[s] == ("linear" if s == "fc" else "conv") for s in kinds)
    for s in p.sites:  # warm-started from the search
        for k, t in p.weights[s].items():
            assert torch.equal(getattr(model.get_submodule(s).peftcompile["default"], k), t)


# ----------------------------------------------------------------------------- backend and ONNX
@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_conv_is_reference_math_and_linears_stay_fused():
    from torch._dynamo.utils import counters

    from conftest import compile_fast, counted, param_grads

    torch.manual_seed(0)
    m = pc.adapt(ConvNet(2), pc.AdapterSpec(pc.LoRA(r=4, alpha=8, dropout=0.1), ["conv", "pw", "fc"]))
    randomize_adapters_(m)
    m.train()
    ref = copy.deepcopy(m)
    x = _x(2)
    torch.manual_seed(1)
    out = compile_fast(m)(x)
    torch.manual_seed(1)  # the same dropout masks
    expected = ref(x)
    torch.testing.assert_close(out, expected, rtol=TOL, atol=TOL)
    out.square().mean().backward()
    expected.square().mean().backward()
    ga, gb = param_grads(m), param_grads(ref)
    assert ga.keys() == gb.keys() and any(k.startswith("conv.") for k in ga)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=TOL, atol=TOL)
    # the linear site is fused; the two conv regions stay reference math (counted skipped)
    assert counters["peftcompile"]["fused_lora"] == 1
    assert counters["peftcompile"]["skipped_lora"] == counted("skipped_") == 2
    # disabled and merged under the compiled model equal eager
    compiled = compile_fast(m)
    m.eval(), ref.eval()
    with torch.no_grad():
        with pc.disabled(m), pc.disabled(ref):
            torch.testing.assert_close(compiled(x), ref(x), rtol=TOL, atol=TOL)
        pc.merge(m)
        torch.testing.assert_close(compiled(x), ref(x), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("dims", [1, 2])
def test_onnx_unmerged_and_merged_match_pytorch(dims, tmp_path):

    pytest.importorskip("onnxruntime")
    from peftcompile.export import OrtAdapterSession, to_onnx

    _, _, m = _twins(dims)
    other = copy.deepcopy(m)
    randomize_adapters_(other, seed=1)
    inp = {"x": _x(dims, n=2)}
    with torch.no_grad():
        ref, ref_other = m(**inp), other(**inp)
        with pc.disabled(m):
            ref_base = m(**inp)
    assert (ref - ref_other).abs().max() > 1e-2

    def run(sess, adapter=None) -> torch.Tensor:
        return ort_output(sess, inp, adapter)

    unmerged = to_onnx(m, inp, tmp_path / "u.onnx", merged=False)
    assert "conv.lora_A" in unmerged.adapter_inputs
    torch.testing.assert_close(run(OrtAdapterSession(unmerged.path), unmerged.sidecar), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(OrtAdapterSession(unmerged.path), pc.save_adapters(other, tmp_path / "other")),
                               ref_other, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(OrtAdapterSession(unmerged.path)), ref_base, rtol=1e-4, atol=1e-5)  # zero rank
    merged = to_onnx(m, inp, tmp_path / "m.onnx", merged=True)
    assert not merged.adapter_inputs
    torch.testing.assert_close(run(OrtAdapterSession(merged.path)), ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- refusals
class StdConv2d(nn.Conv2d):
    """A Conv2d subclass that changes its weight in forward (weight standardisation)."""

    def forward(self, x):
        w = (self.weight - self.weight.mean((1, 2, 3), keepdim=True)) / (self.weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


REFUSED = [
    # GraLoRA's own check on the conv as a linear on patches (in = 3 * 3*3 = 27); more in test_block_kinds.py
    ("gralora-k", lambda: ConvNet(2), lambda: pc.GraLoRA(r=4, k=2), ["conv", "fc"],
     r"conv: GraLoRA k=2 must divide in_features=27.*in_channels \* prod\(kernel_size\) = 3 \* 3\*3"),
    ("rasa-groups", lambda: ConvNet(1, groups=3), lambda: pc.RaSA(r=2, k=1), ["conv"], r"Conv1d site 'conv': groups=3"),
    ("groups", lambda: ConvNet(2, groups=3), lambda: pc.LoRA(r=3), ["conv"], r"Conv2d site 'conv': groups=3.*exclude"),
    ("dilation", lambda: ConvNet(1, dilation=2), lambda: pc.LoRA(r=2), ["conv"],
     r"Conv1d site 'conv': dilation=\(2,\)"),
    ("padding_mode", lambda: ConvNet(3, padding_mode="reflect"), lambda: pc.LoRA(r=2), ["conv"],
     r"Conv3d site 'conv': padding_mode='reflect'"),
    ("subclass", lambda: nn.Sequential(StdConv2d(3, 4, 3), nn.Conv2d(4, 4, 1)), lambda: pc.LoRA(r=2), ["0", "1"],
     r"target '0' names \['StdConv2d'\]"),
    ("transposed", lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.Conv2d(4, 4, 1)), lambda: pc.LoRA(r=2),
     ["0", "1"], r"target '0' names \['ConvTranspose2d'\]"),
]


@pytest.mark.parametrize("what, make, method, targets, match", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_by_name_model_unchanged(what, make, method, targets, match):
    torch.manual_seed(0)
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(pc.AdapterError, match=match):
        pc.adapt(m, pc.AdapterSpec(method(), targets))
    _unchanged(m, before)


def test_checkpoint_of_method_without_conv_form_is_refused(tmp_path, linear_only):
    """Our own format with a spec naming a conv site for a method that has no conv form (a hand-edited
    or foreign file)."""
    import json

    torch.manual_seed(0)
    m = pc.adapt(ConvNet(2), pc.AdapterSpec(linear_only, ["fc"]))
    pc.save_adapters(m, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["sites"] = {"conv": [27, 6]}
    cfg["spec"]["targets"] = ["conv"]
    cfg.pop("weights_sha256")
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = ConvNet(2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(pc.AdapterError, match=r"linonly: cannot adapt nn.Conv1d/2d/3d site\(s\) \['conv'\]"):
        pc.load_adapters(fresh, tmp_path)
    _unchanged(fresh, before)
