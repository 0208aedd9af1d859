"""Port of PEFT's ``tests/test_initialization.py``: ``TestLoraInitialization`` (the linear-layer,
conv2d and option tests; the scaling tests on PEFT's linear / embedding / conv2d model) and
``TestGraLoRAInitialization``.

LoRA offers PEFT's ``init_lora_weights`` choices that do not read the base weight (True: A
kaiming-uniform, B zero; "gaussian"; "orthogonal"; False), checked with PEFT's statistical tests;
GraLoRA has PEFT's default, bit-for-bit PEFT's draw. A PEFT checkpoint trained from any of them is
just weights and loads with PEFT's outputs, while inits that change the base weights (PiSSA,
OLoRA, ...) are refused by name.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from peft import GraloraConfig, LoraConfig, PeftModel, get_peft_model
from scipy import stats
from torch import nn

import peftcompile as pc
from peftcompile.errors import AdapterWarning
from peftcompile.state import state_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class MyModule(nn.Module):
    # PEFT's TestLoraInitialization.get_model, linear part ("a large weight so that averages are
    # close to expected values"), for the linear-layer tests.
    def __init__(self, bias=True, size=1000):
        super().__init__()
        self.linear = nn.Linear(size, size, bias=bias)

    def forward(self, x):
        return self.linear(x)


def get_model(size=1000):
    return MyModule(size=size).eval()


class ThreeLayers(nn.Module):
    # PEFT's TestLoraInitialization.get_model, whole: a linear, an embedding and a conv2d, each adapted
    # by LoRA (sizes scaled by ``size``: 1000 is PEFT's; the conv2d has C_in = size / 10).
    def __init__(self, bias=True, size=1000):
        super().__init__()
        self.linear = nn.Linear(size, size, bias=bias)
        self.embed = nn.Embedding(max(size, 100), size)  # ids are int(100 * x), x in [0, 1)
        self.channels = size // 10
        self.conv2d = nn.Conv2d(self.channels, self.channels, 3, bias=bias)

    def forward(self, x):
        x_int = (100 * x).int()
        x_4d = x.flatten().reshape(-1, self.channels, 10, 10)
        return self.linear(x), self.embed(x_int), self.conv2d(x_4d)


def get_three(size=1000):
    return ThreeLayers(size=size).eval()


@pytest.fixture
def data():
    return torch.rand(10, 1000)


def weights(model, name="default", site="linear"):
    a = model.get_submodule(site).peftcompile[name]
    return (a.lora_A, a.lora_B) if hasattr(a, "lora_A") else (a.gralora_A, a.gralora_B)


def test_lora_linear_init_default():
    torch.manual_seed(0)
    model = pc.adapt(get_model(), pc.AdapterSpec(pc.LoRA(), targets=["linear"]))
    weight_A, weight_B = weights(model)
    a = weight_A.detach().flatten().numpy()
    # weight A is kaiming-uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)). PEFT tests p > 0.5 against
    # a *sampled* uniform, which holds for about one seed in two by chance (p is uniform under the
    # null); the test here is against the exact distribution, at p > 0.01.
    bound = 1 / math.sqrt(1000)
    assert stats.kstest(a, stats.uniform(loc=-bound, scale=2 * bound).cdf).pvalue > 0.01
    # check that weight A is *not* from a normal distribution (PEFT's check, PEFT's threshold)
    normal = torch.distributions.normal.Normal(weight_A.mean().item(), weight_A.std().item()).sample((10000,))
    assert stats.kstest(a, normal.numpy()).pvalue < 0.05
    # check that weight B is zero
    assert (weight_B == 0.0).all()
    # yardstick: the same distribution as PEFT's draw (two-sample test)
    torch.manual_seed(1)
    peft_model = get_peft_model(get_model(), LoraConfig(target_modules=["linear"]))
    peft_A = peft_model.base_model.model.linear.lora_A["default"].weight.detach().flatten().numpy()
    assert stats.ks_2samp(a, peft_A).pvalue > 0.01


def test_lora_conv2d_default():
    # A kaiming-uniform over the conv's fan-in (C_in * 3 * 3 = 900), B zero: PEFT's init of its lora_A conv
    torch.manual_seed(0)
    model = pc.adapt(get_three(), pc.AdapterSpec(pc.LoRA(), targets=["conv2d"]))
    weight_A, weight_B = weights(model, site="conv2d")
    assert weight_A.shape == (8, 100 * 3 * 3)  # PEFT's [8, 100, 3, 3], flattened
    a = weight_A.detach().flatten().numpy()
    bound = 1 / math.sqrt(100 * 3 * 3)
    assert stats.kstest(a, stats.uniform(loc=-bound, scale=2 * bound).cdf).pvalue > 0.01  # as in the linear test
    normal = torch.distributions.normal.Normal(weight_A.mean().item(), weight_A.std().item()).sample((10000,))
    assert stats.kstest(a, normal.numpy()).pvalue < 0.05
    assert (weight_B == 0.0).all()
    # yardstick: PEFT's draw has the same distribution
    torch.manual_seed(1)
    peft_model = get_peft_model(get_three(), LoraConfig(target_modules=["conv2d"]))
    peft_A = peft_model.base_model.model.conv2d.lora_A["default"].weight
    assert peft_A.shape == (8, 100, 3, 3)
    assert stats.ks_2samp(a, peft_A.detach().flatten().numpy()).pvalue > 0.01


@pytest.mark.parametrize("init", ["gaussian", False])
def test_lora_conv2d_init_variants_load_from_peft(init, tmp_path):
    # test_lora_conv2d_init_gaussian / test_lora_conv2d_false: not offered in code, but a PEFT conv adapter
    # that started from them is plain LoRA weights: it loads, and outputs equal PEFT's
    torch.manual_seed(0)
    base = get_three(size=40)
    x = torch.rand(10, 40)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["conv2d"], init_lora_weights=init))
    weight_B = peft_model.base_model.model.conv2d.lora_B["default"].weight
    if init is False:
        assert not torch.allclose(weight_B, torch.zeros_like(weight_B))
    else:
        assert (weight_B == 0.0).all()
        with torch.no_grad():  # a trained adapter: non-zero B
            weight_B.normal_()
    peft_model.save_pretrained(tmp_path)
    model = pc.load_peft_adapter(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        for got, want in zip(model(x), peft_model(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gralora_init_default_is_peft_draw():
    # GraLoRA's default block init draws exactly what PEFT draws (same generator calls, same order);
    # the hybrid pair is kaiming-uniform like PEFT's (PEFT builds an nn.Linear first, another draw)
    torch.manual_seed(0)
    base = get_model(size=64)
    torch.manual_seed(0)
    p = get_peft_model(copy.deepcopy(base), GraloraConfig(target_modules=["linear"], r=8, hybrid_r=2))
    torch.manual_seed(0)
    o = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(pc.GraLoRA(r=8, hybrid_r=2), targets=["linear"]))
    lin = p.base_model.model.linear
    ours = o.linear.peftcompile["default"]
    assert torch.equal(lin.gralora_A["default"], ours.gralora_A)
    assert ours.gralora_A_hybrid.abs().max() <= 1 / math.sqrt(64)
    assert lin.gralora_A_general["default"].weight.shape == ours.gralora_A_hybrid.shape
    assert (ours.gralora_B == 0).all() and (ours.gralora_B_hybrid == 0).all()


def _normal(mean: float, std: float) -> torch.Tensor:
    return torch.distributions.normal.Normal(mean, std).sample((10000,))


def _uniform(lo: float, hi: float) -> torch.Tensor:
    return torch.distributions.uniform.Uniform(lo, hi).sample((10000,))


def _ks(a: torch.Tensor, sample: torch.Tensor) -> float:
    return stats.kstest(a.detach().flatten().numpy(), sample.flatten().numpy()).pvalue


def test_lora_linear_init_gaussian():
    torch.manual_seed(0)
    model = pc.adapt(get_model(), pc.AdapterSpec(pc.LoRA(init_lora_weights="gaussian"), targets=["linear"]))
    weight_A, weight_B = weights(model)
    # against the exact N(0, 1/r) (PEFT's p > 0.5 against a sample holds for one seed in two; this
    # draw gives p = 0.005, a wrong std such as 1/r^2 or 1 gives p < 1e-300), and the std itself
    assert stats.kstest(weight_A.detach().flatten().numpy(), stats.norm(0, 1 / 8).cdf).pvalue > 1e-3
    assert abs(weight_A.std().item() - 1 / 8) < 0.005
    assert _ks(weight_A, _uniform(weight_A.min().item(), weight_A.max().item())) < 0.05
    assert (weight_B == 0.0).all()


def test_lora_linear_false():
    torch.manual_seed(0)
    model = pc.adapt(get_model(), pc.AdapterSpec(pc.LoRA(init_lora_weights=False), targets=["linear"]))
    _, weight_B = weights(model)
    assert not torch.allclose(weight_B, torch.zeros_like(weight_B))


def test_lora_init_orthogonal():
    torch.manual_seed(0)
    model = pc.adapt(get_model(), pc.AdapterSpec(pc.LoRA(init_lora_weights="orthogonal"), targets=["linear"]))
    weight_A, weight_B = weights(model)
    assert not torch.allclose(weight_A, torch.zeros_like(weight_A))
    assert not torch.allclose(weight_B, torch.zeros_like(weight_B))
    assert (weight_B @ weight_A).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_init_orthogonal_half_precision_dtype(dtype):
    torch.manual_seed(0)
    model = pc.adapt(get_model().to(dtype), pc.AdapterSpec(pc.LoRA(init_lora_weights="orthogonal"),
                                                           targets=["linear"]), autocast_adapter_dtype=False)
    weight_A, weight_B = weights(model)
    assert weight_A.dtype == weight_B.dtype == dtype


def test_lora_init_orthogonal_odd_rank_raises():
    with pytest.raises(pc.AdapterError, match="needs an even r.*got r=7"):
        pc.LoRA(r=7, init_lora_weights="orthogonal")


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 1000)

    def forward(self, x):
        return self.embed(x)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_lora_embedding_default_and_gaussian(init):
    # embedding is initialized as a normal distribution, not kaiming uniform; gaussian changes nothing
    torch.manual_seed(0)
    model = pc.adapt(WithEmbedding(), pc.AdapterSpec(pc.LoRA(init_lora_weights=init), targets=["embed"]))
    a = model.embed.peftcompile["default"]
    assert stats.kstest(a.lora_B.detach().flatten().numpy(), stats.norm(0, 1).cdf).pvalue > 0.01
    assert _ks(a.lora_B, _uniform(a.lora_B.min().item(), a.lora_B.max().item())) < 0.05
    assert (a.lora_A == 0.0).all()


def test_lora_embedding_false():
    torch.manual_seed(0)
    model = pc.adapt(WithEmbedding(), pc.AdapterSpec(pc.LoRA(init_lora_weights=False), targets=["embed"]))
    a = model.embed.peftcompile["default"]
    assert not torch.allclose(a.lora_A, torch.zeros_like(a.lora_A))


@pytest.mark.parametrize("init", ["gaussian", False, "orthogonal"])
def test_lora_linear_init_variants_load_from_peft_and_save_for_it(init, tmp_path):
    # an adapter that started from another init is plain LoRA weights: PEFT's loads with PEFT's
    # outputs (into an adapter created with our default init too), and ours records its init for PEFT
    torch.manual_seed(0)
    base = get_model(size=64)
    x = torch.rand(10, 64)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["linear"], init_lora_weights=init))
    peft_model.save_pretrained(tmp_path / "peft")
    model = pc.load_peft_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert model.linear.peftcompile["default"].cfg.init_lora_weights == init
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_model(x), rtol=1e-5, atol=1e-5)
    into_default = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(pc.LoRA(r=8, alpha=8), targets=["linear"]))
    pc.load_peft_adapter(into_default, tmp_path / "peft", name="default")
    with torch.no_grad():
        torch.testing.assert_close(into_default(x), peft_model(x), rtol=1e-5, atol=1e-5)
    ours = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(pc.LoRA(init_lora_weights=init), targets=["linear"]))
    pc.save_adapters(ours, tmp_path / "ours", format="peft")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert back.peft_config["default"].init_lora_weights == init
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-5)


def test_lora_scaling_default():
    # check scaling factor use_rslora=False
    cfg = pc.LoRA(r=16, alpha=3)
    assert cfg.scaling == 3 / 16
    config = LoraConfig(target_modules=["linear"], lora_alpha=3, r=16, use_rslora=False)
    peft_model = get_peft_model(get_model(size=32), config)
    assert peft_model.base_model.model.linear.scaling["default"] == cfg.scaling
    assert pc.GraLoRA(r=8, k=2, alpha=4, hybrid_r=2).scaling == 4 / (8 + 2)  # PEFT: alpha / (r + hybrid_r)


def scalings(model, name="default"):
    return {s: model.get_submodule(s).peftcompile[name].cfg.scaling for s in ("linear", "embed", "conv2d")}


def lora_spec(config: LoraConfig) -> pc.AdapterSpec:
    return pc.AdapterSpec(pc.LoRA(r=config.r, alpha=config.lora_alpha, use_rslora=config.use_rslora),
                          targets=sorted(config.target_modules), rank_pattern=config.rank_pattern or None,
                          alpha_pattern=config.alpha_pattern or None)


def adapt_both(config: LoraConfig, tmp_path):
    """(ours, PEFT's model, PEFT's checkpoint loaded by us), on the same base."""
    torch.manual_seed(0)
    base = get_three(size=40)  # PEFT's get_model: linear, embed, conv2d
    peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(tmp_path)
    ours = pc.adapt(copy.deepcopy(base), lora_spec(config))
    return ours, peft_model, pc.load_peft_adapter(copy.deepcopy(base), tmp_path)


def assert_scalings(ours, peft_model, loaded, expected):
    for s, want in expected.items():
        assert peft_model.base_model.model.get_submodule(s).scaling["default"] == want  # PEFT's assertion
    assert scalings(ours) == expected
    assert scalings(loaded) == expected
    x = torch.rand(10, 40)
    with torch.no_grad():
        for got, want in zip(loaded(x), peft_model(x)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_rslora_scaling(tmp_path):
    config = LoraConfig(target_modules=["linear", "embed", "conv2d"], lora_alpha=3, r=16, use_rslora=True)
    expected_scaling = config.lora_alpha / (config.r**0.5)
    assert_scalings(*adapt_both(config, tmp_path), dict.fromkeys(("linear", "embed", "conv2d"), expected_scaling))


def test_lora_default_scaling_pattern(tmp_path):
    config = LoraConfig(target_modules=["linear", "embed", "conv2d"], rank_pattern={"embed": 9, "conv2d": 16},
                        alpha_pattern={"linear": 11, "conv2d": 13}, lora_alpha=17, r=25, use_rslora=False)
    expected_scaling = {
        "linear": config.alpha_pattern["linear"] / config.r,
        "embed": config.lora_alpha / config.rank_pattern["embed"],
        "conv2d": config.alpha_pattern["conv2d"] / config.rank_pattern["conv2d"],
    }
    assert_scalings(*adapt_both(config, tmp_path), expected_scaling)


def test_lora_rslora_scaling_pattern(tmp_path):
    config = LoraConfig(target_modules=["linear", "embed", "conv2d"], rank_pattern={"embed": 9, "conv2d": 16},
                        alpha_pattern={"linear": 11, "conv2d": 13}, lora_alpha=17, r=25, use_rslora=True)
    expected_scaling = {
        "linear": config.alpha_pattern["linear"] / (config.r**0.5),
        "embed": config.lora_alpha / (config.rank_pattern["embed"] ** 0.5),
        "conv2d": config.alpha_pattern["conv2d"] / (config.rank_pattern["conv2d"] ** 0.5),
    }
    assert_scalings(*adapt_both(config, tmp_path), expected_scaling)


def test_rank_alpha_pattern_override():
    torch.manual_seed(0)
    layer = get_model(size=32)
    model = pc.adapt(nn.Sequential(layer, layer), pc.AdapterSpec(
        pc.LoRA(r=8, alpha=1), targets=["linear"], rank_pattern={"linear": 8}, alpha_pattern={"0.linear": 2}))
    scaling_with_rank_pattern = model[0].linear.peftcompile["default"].cfg.scaling
    layer = get_model(size=32)
    model = pc.adapt(nn.Sequential(layer, layer), pc.AdapterSpec(
        pc.LoRA(r=8, alpha=1), targets=["linear"], alpha_pattern={"0.linear": 2}))
    scaling_without_rank_pattern = model[0].linear.peftcompile["default"].cfg.scaling
    assert scaling_with_rank_pattern == scaling_without_rank_pattern
    # PEFT's numbers on the same model
    peft_model = get_peft_model(nn.Sequential(layer, layer), LoraConfig(
        target_modules=["linear"], lora_alpha=1, r=8, rank_pattern={"linear": 8}, alpha_pattern={"0.linear": 2}))
    assert peft_model.base_model.model[0].linear.scaling["default"] == scaling_with_rank_pattern == 2 / 8


# Base-modifying inits and DoRA: refused by name on load (README "Guarantees":
# "base-modifying inits such as PiSSA/LoftQ"; "Coming from PEFT": DoRA refused by name).
REFUSED = [
    ("test_lora_pissa_linear_init_default", {"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ("test_lora_olora_linear_init_default", {"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ("test_lora_use_dora_linear", {"use_dora": True}, "use_dora"),
]


@pytest.mark.parametrize("test_name, config_kwargs, field", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_init_or_scaling_is_refused_by_name(test_name, config_kwargs, field, tmp_path):
    torch.manual_seed(0)
    base = get_model(size=32)
    get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["linear"], **config_kwargs)).save_pretrained(
        tmp_path)
    model = copy.deepcopy(base)
    with pytest.raises(pc.AdapterError, match=field):
        pc.load_peft_adapter(model, tmp_path)
    assert state_of(model) is None and torch.equal(model.linear.weight, base.linear.weight)


def test_modules_to_save_targets_lora_layer_raises():
    # PEFT: modules_to_save equal to the adapter name would wrap a module inside the LoRA layer. Ours:
    # a trainable pattern that selects an adapter module is refused (it matches nothing of the model
    # before the adapter exists, and holds an adapted site after).
    model = get_model(size=32)
    with pytest.raises(pc.AdapterError, match="matched no module"):
        pc.adapt(model, pc.AdapterSpec(pc.LoRA(), targets=["linear"], trainable=["foobar"]), name="foobar")
    assert state_of(model) is None
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(), targets=["linear"]), name="foobar")
    with pytest.raises(pc.AdapterError, match="hold adapted sites"):
        pc.adapt(model, pc.AdapterSpec(pc.LoRA(), targets=["linear"], trainable=["foobar"]), name="other")
    assert set(pc.adapters_of(model)) == {"foobar"}


@pytest.mark.parametrize("target_modules", [["foo"], "bar"])
def test_valid_no_target_module_nor_target_parameter_match_raises(target_modules):
    model = get_model(size=32)
    with pytest.raises(ValueError):  # PEFT: a ValueError subclass, too
        get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=target_modules))
    with pytest.raises(pc.AdapterError, match="matched no linear site"):
        pc.adapt(model, pc.AdapterSpec(pc.LoRA(), targets=target_modules))
    assert state_of(model) is None


class ModelConv2DGroups(nn.Module):
    """PEFT's get_model_conv2d_groups (for testing when the groups argument is used in a conv layer)."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X):
        X = torch.arange(9 * 16 * 20 * 20).view([9, 16, 20, 20]).to(self.conv2d.weight.device)
        X = X.to(self.dtype)
        X = self.sm(self.lin0(self.flat(self.relu(self.conv2d(X)))))
        return X


@pytest.mark.parametrize("r", [8, 2, 1], ids=["rank divisible by groups", "rank equal to groups",
                                              "rank not divisible by groups"])
def test_error_raised_if_rank_not_divisible_by_groups(r):
    # PEFT raises for r % groups != 0 and otherwise adapts the grouped conv, but cannot merge it
    # ("Merging is not supported for _ConvNd layers with groups > 1"). Ours refuses every grouped conv
    # by name (README "Coming from PEFT": an adapter that cannot merge is refused), model unchanged.
    base_model = ModelConv2DGroups().eval()
    base_layer = base_model.conv2d
    if r % base_layer.groups != 0:
        with pytest.raises(ValueError, match=re.escape(
                f"Targeting a {base_layer.__class__.__name__} with groups={base_layer.groups} and rank {r}. "
                "Currently, support is limited to conv layers where the rank is divisible by groups. "
                "Either choose a different rank or do not target this specific layer.")):
            get_peft_model(copy.deepcopy(base_model), LoraConfig(r=r, target_modules=["conv2d"]))
    else:
        get_peft_model(copy.deepcopy(base_model), LoraConfig(r=r, target_modules=["conv2d"]))
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    with pytest.raises(pc.AdapterError, match=r"Conv2d site 'conv2d': groups=2 .*Fix: remove 'conv2d'"):
        pc.adapt(base_model, pc.AdapterSpec(pc.LoRA(r=r), targets=["conv2d"]))
    assert state_of(base_model) is None
    assert all(torch.equal(v, before[k]) for k, v in base_model.state_dict().items())


# ----------------------------------------------------------------------------- TestGraLoRAInitialization
class GraMLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 30, bias=bias)
        self.lin1 = nn.Linear(30, 2, bias=bias)

    def forward(self, X):
        X = self.lin0(X)
        X = self.lin1(X)
        return X


def test_gralora_with_incompatible_gralora_k_and_r_raises():
    r, gralora_k = 6, 4
    msg = f"r should be divisible by gralora_k, but got {r} and {gralora_k}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        GraloraConfig(target_modules=["lin0"], r=r, gralora_k=gralora_k)
    with pytest.raises(pc.AdapterError, match=re.escape(f"k={gralora_k} must divide r={r}")):
        pc.GraLoRA(r=r, k=gralora_k)


@pytest.mark.parametrize("gralora_k", [0, -1])
def test_gralora_with_non_positive_gralora_k_raises(gralora_k):
    r = 32
    msg = f"`gralora_k` should be a positive integer value but the value passed is {gralora_k}"
    with pytest.raises(ValueError, match=re.escape(msg)):
        GraloraConfig(target_modules=["lin0"], r=r, gralora_k=gralora_k)
    with pytest.raises(pc.AdapterError, match="k"):
        pc.GraLoRA(r=r, k=gralora_k)


@pytest.mark.parametrize("site, what", [("lin0", "in_features=10"), ("lin1", "out_features=2")])
def test_gralora_with_incompatible_gralora_k_and_features_raises(site, what):
    # test_gralora_with_incompatible_gralora_k_and_in_features_raises / ..._out_features_raises
    model = GraMLP().eval()
    with pytest.raises(ValueError, match="should be divisible by gralora_k"):
        get_peft_model(copy.deepcopy(model), GraloraConfig(target_modules=[site], r=6, gralora_k=3))
    with pytest.raises(pc.AdapterError, match=f"{site}: GraLoRA k=3 must divide .*{what}"):
        pc.adapt(model, pc.AdapterSpec(pc.GraLoRA(r=6, k=3), targets=[site]))
    assert state_of(model) is None


# ------------------------------------------------------------------ PEFT's bias tests
class LinearEmbed(nn.Module):
    # PEFT's get_model for the bias tests, without the conv2d part: a biased linear, an embedding
    def __init__(self, bias=True):
        super().__init__()
        self.linear = nn.Linear(100, 100, bias=bias)
        self.embed = nn.Embedding(100, 100)

    def forward(self, x):
        return self.linear(self.embed(x))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only", "invalid"])
def test_lora_with_bias_argument(bias):
    if bias == "invalid":  # PEFT: NotImplementedError from get_peft_model; ours: AdapterError from the spec
        with pytest.raises(pc.AdapterError, match="bias='invalid'"):
            pc.AdapterSpec(pc.LoRA(), targets=["linear"], bias=bias)
        return
    peft_model = get_peft_model(LinearEmbed(), LoraConfig(target_modules=["linear"], bias=bias))
    model = pc.adapt(LinearEmbed(), pc.AdapterSpec(pc.LoRA(), targets=["linear"], bias=bias))
    ours = {n for n, p in model.named_parameters() if n.endswith("bias") and p.requires_grad}
    theirs = {n.removeprefix("base_model.model.").replace(".base_layer", "")
              for n, p in peft_model.named_parameters() if n.endswith("bias") and p.requires_grad}
    assert ours == theirs == ({"linear.bias"} if bias != "none" else set())


def test_lora_with_bias_extra_params():
    no_bias = pc.adapt(LinearEmbed(), pc.AdapterSpec(pc.LoRA(), targets=["linear"]))
    with_bias = pc.adapt(LinearEmbed(), pc.AdapterSpec(pc.LoRA(lora_bias=True), targets=["linear"]))
    assert not hasattr(no_bias.linear.peftcompile["default"], "lora_B_bias")
    assert with_bias.linear.peftcompile["default"].lora_B_bias.shape == (100,)
    params_no_bias = {n for n, _ in no_bias.named_parameters()}
    params_bias = {n for n, _ in with_bias.named_parameters()}
    assert params_bias - params_no_bias == {"linear.peftcompile.default.lora_B_bias"}


def test_lora_with_bias_embedding_raises():
    model = LinearEmbed()
    with pytest.raises(pc.AdapterError, match=r"embed: LoRA\(lora_bias=True\) has no nn.Embedding form"):
        pc.adapt(model, pc.AdapterSpec(pc.LoRA(lora_bias=True), targets=["embed"]))
    assert state_of(model) is None


def test_lora_linear_with_bias_when_base_layer_has_no_bias_warns():
    with pytest.warns(AdapterWarning, match=r"\['linear'\].*base layer has no bias"):
        pc.adapt(LinearEmbed(bias=False), pc.AdapterSpec(pc.LoRA(lora_bias=True), targets=["linear"]))


def test_multiple_configs_with_bias_are_per_adapter():
    # PEFT: "supports only 1 adapter with bias" (ValueError on the second). Ours differs on purpose
    # (README "Coming from PEFT", bias=): each adapter trains its own copy of the biases.
    model = pc.adapt(LinearEmbed(), pc.AdapterSpec(pc.LoRA(), targets=["linear"], bias="all"))
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(), targets=["linear"], bias="lora_only"), "other")
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(), targets=["linear"]), "plain")
    assert set(state_of(model).specs) == {"default", "other", "plain"}
    original = model.linear.bias.detach().clone()
    pc.set_active(model, "other")
    with torch.no_grad():
        model.linear.bias.add_(1.0)  # "other" trains its copy
    for name, want in (("default", original), ("plain", original), ("other", original + 1)):
        pc.set_active(model, name)
        assert torch.equal(model.linear.bias, want), name
        assert model.linear.bias.requires_grad is (name != "plain")
