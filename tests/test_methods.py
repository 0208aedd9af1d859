"""Reference math of each method against PEFT (the reference implementation) and the design formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftcompile.methods import GraLoRA, LoRA, get_method
from peftcompile.methods.gralora import gralora_delta, gralora_delta_weight

TOL = dict(atol=1e-5, rtol=1e-5)


def _peft_gralora_layer(in_f, out_f, r, k, hybrid_r, alpha):
    from peft import GraloraConfig
    from peft.tuners.gralora.layer import Linear as GraloraLinear

    base = nn.Linear(in_f, out_f)
    cfg = GraloraConfig(r=r, gralora_k=k, hybrid_r=hybrid_r, alpha=alpha, init_weights=False, target_modules=["x"])
    layer = GraloraLinear(base, "default", "x", cfg, r=r)
    return layer


def _ours_from_peft(layer, hybrid_r):
    p = {"gralora_A": layer.gralora_A["default"].detach(), "gralora_B": layer.gralora_B["default"].detach()}
    if hybrid_r:
        p["gralora_A_hybrid"] = layer.gralora_A_general["default"].weight.detach()
        p["gralora_B_hybrid"] = layer.gralora_B_general["default"].weight.detach()
    return p


@pytest.mark.parametrize("hybrid_r", [0, 2])
@pytest.mark.parametrize("shape", [(5, 24), (3, 4, 24)], ids=["2d", "3d"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_gralora_matches_peft(hybrid_r, shape, k):
    """Same A/B tensors -> same delta output and same delta weight as PEFT's GraLoRA layer."""
    torch.manual_seed(1)
    in_f, out_f, r, alpha = 24, 16, 8, 12.0
    layer = _peft_gralora_layer(in_f, out_f, r, k, hybrid_r, alpha)
    cfg = GraLoRA(r=r, k=k, alpha=alpha, hybrid_r=hybrid_r)
    p = _ours_from_peft(layer, hybrid_r)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = layer(x) - layer.base_layer(x)
        ours = gralora_delta(x, p, cfg)
        torch.testing.assert_close(ours, ref, **TOL)
        torch.testing.assert_close(gralora_delta_weight(p, cfg), layer.get_delta_weight("default"), **TOL)
        # and the delta weight reproduces the forward: delta(x) == x @ dW.T
        torch.testing.assert_close(ours, x @ gralora_delta_weight(p, cfg).t(), **TOL)


def test_gralora_init_matches_peft_conventions():
    """A kaiming per block, B zero, scaling alpha/(r+hybrid_r)."""
    m = get_method("gralora")
    cfg = GraLoRA(r=8, k=2, alpha=10, hybrid_r=2)
    shapes = m.shapes(cfg, 32, 16)
    assert shapes == {"gralora_A": (2, 16, 8), "gralora_B": (2, 8, 8),
                      "gralora_A_hybrid": (2, 32), "gralora_B_hybrid": (16, 2)}
    p = {k: torch.empty(s) for k, s in shapes.items()}
    m.init(cfg, p)
    assert p["gralora_B"].abs().sum() == 0 and p["gralora_B_hybrid"].abs().sum() == 0
    bound = 1 / 16**0.5  # kaiming_uniform(a=sqrt(5)) on an [r, in_b] block: U(-1/sqrt(in_b), 1/sqrt(in_b))
    assert 0.5 * bound < p["gralora_A"].abs().max() <= bound
    assert cfg.scaling == pytest.approx(10 / 10)


def test_gralora_rank_reaches_k_times_r():
    torch.manual_seed(0)
    cfg = GraLoRA(r=4, k=4, alpha=4)
    m = get_method("gralora")
    p = {k: torch.randn(s, dtype=torch.float64) for k, s in m.shapes(cfg, 64, 64).items()}
    dw = gralora_delta_weight(p, cfg)
    assert torch.linalg.matrix_rank(dw).item() == cfg.k * cfg.r  # 16, vs LoRA's 4 at the same parameter count
    lora_params = sum(torch.Size(s).numel() for s in get_method("lora").shapes(LoRA(r=4), 64, 64).values())
    assert sum(t.numel() for t in p.values()) == lora_params


def test_gralora_block_structure_formula():
    """Block (j, i) of dW equals (A[i][:, j-chunk] @ B[j][i-chunk, :]).T (design notes)."""
    torch.manual_seed(0)
    k, r, in_f, out_f = 2, 4, 6, 8
    cfg = GraLoRA(r=r, k=k, alpha=r)  # scaling 1
    A, B = torch.randn(k, in_f // k, r), torch.randn(k, r, out_f // k)
    dw = gralora_delta_weight({"gralora_A": A, "gralora_B": B}, cfg)
    s, ib, ob = r // k, in_f // k, out_f // k
    for j in range(k):
        for i in range(k):
            blk = (A[i][:, j * s:(j + 1) * s] @ B[j][i * s:(i + 1) * s, :]).t()
            torch.testing.assert_close(dw[j * ob:(j + 1) * ob, i * ib:(i + 1) * ib], blk)


def test_lora_matches_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = get_peft_model(nn.Sequential(nn.Linear(12, 10)),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    layer = net.base_model.model[0]
    base = layer.base_layer
    cfg = LoRA(r=4, alpha=8)
    p = {"lora_A": layer.lora_A["default"].weight.detach(), "lora_B": layer.lora_B["default"].weight.detach()}
    m = get_method("lora")
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        torch.testing.assert_close(m.delta(x, p, cfg), layer(x) - base(x), **TOL)
        torch.testing.assert_close(m.delta_weight(p, cfg), layer.get_delta_weight("default"), **TOL)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(r=0, k=1, alpha=1), "r must be a positive int"),
    (dict(r=6, k=4, alpha=1), "must divide r"),
    (dict(r=4, k=2, alpha=1, hybrid_r=-1), "hybrid_r"),
])
def test_gralora_config_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        GraLoRA(**kwargs)


def test_registry_rejects_duplicates():
    from peftcompile.methods import register_method

    with pytest.raises(ValueError, match="already registered"):
        register_method(get_method("lora"))
    with pytest.raises(KeyError, match="unknown method"):
        get_method("nope")
