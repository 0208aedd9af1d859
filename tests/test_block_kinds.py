"""GraLoRA and RaSA at nn.Embedding and nn.Conv1d/2d/3d sites (issue #12, item 10).

References: at a conv site the method's delta is ``F.convNd(x, dW.view(W.shape))`` with dW its
``delta_weight`` on the conv as a linear on unfolded patches (in = C_in * prod(kernel)); at an
embedding site it is ``method.delta(one_hot(ids))`` (in = num_embeddings). Checked: parity and
gradients against those references, inits, merge / unmerge / disabled / delete, checkpoints, the
compile backend, ONNX, weighted combinations, DiffoRA, RaSA groups, and every refusal.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftcompile as pc
from peftcompile.methods import get_method
from peftcompile.methods import lowrank as lowrank_mod
from peftcompile.state import site_adapters, state_of

from conftest import ort_output, randomize_adapters_

TOL = 1e-5
CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
OPTS = {"padding_idx": None, "scale_grad_by_freq": False, "sparse": False}

#: (id, config): GraLoRA plain / hybrid / k = 1, RaSA
METHODS = [
    ("gralora", pc.GraLoRA(r=4, k=2, alpha=8)),
    ("gralora-hybrid", pc.GraLoRA(r=6, k=3, alpha=6, hybrid_r=2)),
    ("gralora-k1", pc.GraLoRA(r=2, k=1, alpha=4)),
    ("rasa", pc.RaSA(r=4, k=1, alpha=8)),
]
CFGS = [c for _, c in METHODS]
CFG_IDS = [i for i, _ in METHODS]
#: the methods on the test model (its sizes are even: k = 2)
MODEL_METHODS = [("gralora", pc.GraLoRA(r=4, k=2, alpha=8)), ("gralora-hybrid", pc.GraLoRA(r=4, k=2, alpha=6, hybrid_r=2)),
                 ("gralora-k1", pc.GraLoRA(r=2, k=1, alpha=4)), ("rasa", pc.RaSA(r=4, k=1, alpha=8))]
MCFGS = [c for _, c in MODEL_METHODS]
MCFG_IDS = [i for i, _ in MODEL_METHODS]


def _params(cfg, in_f: int, out_f: int, n: int = 2, dtype=torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    m = get_method(cfg.name)
    g = torch.Generator().manual_seed(seed)
    shapes = dict(m.shapes(cfg, in_f, out_f, n))
    if m.shared_shapes is not None:
        shapes.update(m.shared_shapes(cfg, in_f, out_f, n))
    return {k: torch.randn(s, generator=g, dtype=dtype).requires_grad_() for k, s in shapes.items()}


def _conv_ref(x, p, cfg, opts, c_in):
    """The reference: the base conv's shape with dW = delta_weight as its weight."""
    dw = get_method(cfg.name).delta_weight(p, cfg)
    ks = opts["kernel_size"]
    return CONVS[len(ks)](x, dw.view(dw.shape[0], c_in, *ks), None, opts["stride"], opts["padding"])


#: (id, dims, C_in, kernel, stride, padding); C_out = 6. For GraLoRA k=2 the first four are grouped
#: (k | C_in), "2d-cin3" runs the dense block conv (k does not divide C_in = 3, but does in = 12)
CONV_SHAPES = [
    ("1d", 1, 6, (3,), (2,), (1,)),
    ("1d-same", 1, 6, (4,), (1,), "same"),
    ("2d", 2, 6, (3, 3), (2, 2), (1, 1)),
    ("3d-1x1x1", 3, 6, (1, 1, 1), (1, 1, 1), (0, 0, 0)),
    ("2d-cin3", 2, 3, (2, 2), (1, 1), (0, 0)),
]


def _fits(cfg, in_f, out_f) -> bool:
    return get_method(cfg.name).check_site(cfg, in_f, out_f) is None


# ----------------------------------------------------------------------------- the forms vs the references
@pytest.mark.parametrize("cfg", CFGS, ids=CFG_IDS)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=[s[0] for s in CONV_SHAPES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_form_equals_dense_conv_with_delta_weight_and_gradients(cfg, shape, dtype):
    _, dims, c_in, ks, stride, padding = shape
    in_f, out_f = c_in * math.prod(ks), 6
    if not _fits(cfg, in_f, out_f):
        pytest.skip("k does not divide in/out (refusal tested below)")
    m = get_method(cfg.name)
    p = _params(cfg, in_f, out_f, dtype=dtype)
    opts = {"kernel_size": ks, "stride": stride, "padding": padding}
    x = torch.randn(2, c_in, *[7] * dims, dtype=dtype, generator=torch.Generator().manual_seed(1))
    got, want = m.conv(x, p, cfg, opts), _conv_ref(x, p, cfg, opts, c_in)
    assert got.shape == want.shape
    tol = 1e-12 if dtype == torch.float64 else TOL
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= tol, err
    gy = torch.randn_like(got)
    g1 = torch.autograd.grad(got, list(p.values()), gy)
    g2 = torch.autograd.grad(want, list(p.values()), gy)
    for k, a, b in zip(p, g1, g2):
        assert ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() <= tol, k


def test_gralora_conv_runs_grouped_without_dense_weight_when_k_divides_c_in(monkeypatch):
    """k | C_in: grouped convs (groups = k), dW never formed; otherwise the dense block conv."""
    cfg = pc.GraLoRA(r=4, k=2)
    seen = []
    real_conv = F.conv2d

    def spy(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        seen.append((tuple(w.shape), groups))
        return real_conv(x, w, b, stride, padding, dilation, groups)

    def no_dense(*a, **k):
        raise AssertionError("dense dW formed")

    monkeypatch.setitem(lowrank_mod._CONVS, 2, spy)
    with monkeypatch.context() as mp:
        mp.setattr(lowrank_mod, "block_lowrank_weight", no_dense)
        p = _params(cfg, 4 * 9, 6, dtype=torch.float32)
        get_method("gralora").conv(torch.randn(1, 4, 5, 5), p, cfg, {"kernel_size": (3, 3), "stride": (1, 1),
                                                                      "padding": (1, 1)})
    # stage A: [k*r, C_in/k, 3, 3] in k groups; stage B: 1x1 [out, r, 1, 1] in k groups
    assert seen == [((8, 2, 3, 3), 2), ((6, 4, 1, 1), 2)]
    seen.clear()
    p = _params(cfg, 3 * 4, 6, dtype=torch.float32)  # C_in = 3: blocks cut through channels
    get_method("gralora").conv(torch.randn(1, 3, 5, 5), p, cfg, {"kernel_size": (2, 2), "stride": (1, 1),
                                                                  "padding": (0, 0)})
    assert seen == [((6, 3, 2, 2), 1)]  # one dense conv with dW viewed as the base weight


@pytest.mark.parametrize("cfg", CFGS, ids=CFG_IDS)
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_embed_equals_delta_on_one_hot_and_gradients(cfg, padding_idx):
    num, dim = 12, 6
    m = get_method(cfg.name)
    p = _params(cfg, num, dim, dtype=torch.float32)
    ids = torch.randint(0, num, (3, 5), generator=torch.Generator().manual_seed(2))
    ids[0, :3] = 3
    got = m.embed(ids, p, cfg, {**OPTS, "padding_idx": padding_idx})
    want = m.delta(F.one_hot(ids, num).to(torch.float32), p, cfg)
    assert (got - want).abs().max().item() <= 1e-6
    gy = torch.randn_like(got)
    g1 = dict(zip(p, torch.autograd.grad(got, list(p.values()), gy)))
    g2 = dict(zip(p, torch.autograd.grad(want, list(p.values()), gy)))
    for k in p:
        a, b = g1[k], g2[k]
        if padding_idx is not None and k in ("gralora_A", "rasa_A", "rasa_A_shared", "gralora_A_hybrid"):
            # F.embedding's padding_idx: the padding row of the looked-up factor gets no gradient (as LoRA's)
            row = _lookup_rows(k, a, num)
            assert torch.count_nonzero(row(a)[padding_idx]) == 0 and torch.count_nonzero(row(b)[padding_idx]) > 0
            a, b = row(a).clone(), row(b).clone()
            a[padding_idx] = b[padding_idx] = 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _lookup_rows(param: str, t: torch.Tensor, num: int):
    """A view of ``param``'s gradient with one row per embedding id."""
    if param == "gralora_A":  # [k, num/k, r]: id = i * in_b + local
        return lambda g: g.reshape(num, -1)
    return lambda g: g.t()  # [R, num]: column per id


@pytest.mark.parametrize("cfg", CFGS, ids=CFG_IDS)
def test_embed_scale_grad_by_freq_as_lora(cfg):
    """scale_grad_by_freq divides each looked-up row's gradient by its id's count in the batch, for the
    method's lookup as for LoRA's (the B side is unchanged)."""
    num, dim = 12, 6
    m = get_method(cfg.name)
    p = _params(cfg, num, dim, dtype=torch.float64)
    ids = torch.tensor([[1, 1, 1, 4, 7, 7]])
    counts = torch.bincount(ids.flatten(), minlength=num).clamp_min(1).to(torch.float64)
    gy = torch.randn(1, 6, dim, dtype=torch.float64)
    plain = dict(zip(p, torch.autograd.grad(m.embed(ids, p, cfg, OPTS), list(p.values()), gy)))
    freq = dict(zip(p, torch.autograd.grad(m.embed(ids, p, cfg, {**OPTS, "scale_grad_by_freq": True}),
                                           list(p.values()), gy)))
    for k in p:
        if k in ("gralora_A", "rasa_A", "rasa_A_shared", "gralora_A_hybrid"):
            row = _lookup_rows(k, plain[k], num)
            torch.testing.assert_close(row(freq[k]), row(plain[k]) / counts[:, None])
        else:
            torch.testing.assert_close(freq[k], plain[k])


# ----------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, c: int = 4, kernel=3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel, padding=kernel // 2)

    def forward(self, x):
        return x + self.conv(x).relu()


class Net(nn.Module):
    """An embedding (padding_idx 0) whose rows become a 4-channel 2x2 image, conv blocks, a linear head."""

    def __init__(self, n_blocks: int = 2, num: int = 16, kernels=None) -> None:
        super().__init__()
        self.emb = nn.Embedding(num, 16, padding_idx=0)
        self.stem = nn.Conv1d(4, 4, 3, padding=1)
        self.blocks = nn.ModuleList(Block(4, k) for k in (kernels or [3] * n_blocks))
        self.fc = nn.Linear(4, 6)

    def forward(self, ids):
        h = self.emb(ids)  # [N, T, 16]
        n, t = ids.shape
        h = self.stem(h.reshape(n * t, 4, 4)).reshape(n * t, 4, 2, 2)
        for b in self.blocks:
            h = b(h)
        return self.fc(h.mean((2, 3))).reshape(n, t, -1)


TARGETS = ["emb", "stem", "conv", "fc"]


def _ids(n: int = 16, shape=(2, 5), seed: int = 1) -> torch.Tensor:
    return torch.randint(0, n, shape, generator=torch.Generator().manual_seed(seed))


def _adapted(cfg, targets=TARGETS, seed=0, **kw):
    torch.manual_seed(0)
    base = Net(**kw).eval()
    m = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(cfg, list(targets)))
    randomize_adapters_(m, std=0.2, seed=seed)  # deltas of the base's size, not 100x it
    return base, m.eval()


def _reference_model(base, m):
    """``base`` with every site's W + dW (the merge, computed here from delta_weight)."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for host, _, c in site_adapters(m):
            name = next(n for n, mod in m.named_modules() if mod is host)
            w = ref.get_submodule(name).weight
            dw = c["default"].delta_weight()
            w.add_(dw.t() if c.kind == "embedding" else dw.view(w.shape))
    return ref


@pytest.mark.parametrize("cfg", MCFGS, ids=MCFG_IDS)
def test_adapt_forward_merge_unmerge_disable_delete(cfg):
    base, m = _adapted(cfg)
    kinds = {c.site: c.kind for _, _, c in site_adapters(m)}
    assert kinds == {"emb": "embedding", "stem": "conv", "blocks.0.conv": "conv", "blocks.1.conv": "conv",
                     "fc": "linear"}
    assert type(m.emb) is nn.Embedding and type(m.stem) is nn.Conv1d  # same classes
    ids = _ids()
    ids[0, 0] = 0  # the padding id
    with torch.no_grad():
        y, y0 = m(ids), base(ids)
        assert (y - y0).abs().max() > 1e-2
        want = _reference_model(base, m)(ids)
        err = ((y - want).abs().max() / want.abs().max()).item()
        assert err <= TOL, err
        with pc.disabled(m):
            torch.testing.assert_close(m(ids), y0, rtol=0, atol=0)
        w0 = {k: v.clone() for k, v in m.state_dict().items() if k.endswith("weight") and "peftcompile" not in k}
        pc.merge(m)
        torch.testing.assert_close(m(ids), y, rtol=TOL, atol=TOL)
        pc.unmerge(m)
        sd = m.state_dict()
        for k, v in w0.items():
            torch.testing.assert_close(sd[k], v, rtol=0, atol=1e-6)
        torch.testing.assert_close(m(ids), y, rtol=TOL, atol=TOL)
        out = pc.merge_and_unload(copy.deepcopy(m))
        assert state_of(out) is None and out.state_dict().keys() == base.state_dict().keys()
        torch.testing.assert_close(out(ids), y, rtol=TOL, atol=TOL)
        pc.delete_adapter(m, "default")
        assert not list(site_adapters(m)) or all(not len(c) for _, _, c in site_adapters(m))
        torch.testing.assert_close(m(ids), y0, rtol=0, atol=1e-6)  # merged and unmerged once: fp32 rounding


@pytest.mark.parametrize("cfg", MCFGS, ids=MCFG_IDS)
def test_training_step_gradients_equal_reference(cfg):
    """One backward through the adapted model equals the same loss on the reference deltas (W + dW with
    dW from delta_weight, differentiable), for every adapter tensor."""
    base, m = _adapted(cfg)
    m.train()
    # no padding id: F.embedding's padding_idx stops the gradient of a whole looked-up row of W + dW here,
    # but only of the A side in the adapter's lookup (as LoRA's: B still sees the padding rows)
    ids = _ids().clamp_min(1)
    loss = m(ids).square().mean()
    loss.backward()
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    got = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None

    # the same adapter tensors through the base's functional forward with W + dW
    adapters = {c.site: c["default"] for _, _, c in site_adapters(m)}
    names = dict((id(mod), n) for n, mod in m.named_modules())
    weights = {}
    for host, _, c in site_adapters(m):
        w = host.weight
        dw = adapters[c.site].delta_weight()
        weights[names[id(host)] + ".weight"] = w + (dw.t() if c.kind == "embedding" else dw.view(w.shape))
    ref = torch.func.functional_call(base, weights, (ids,))
    ref.square().mean().backward()
    assert abs(loss.item() - ref.square().mean().item()) <= 1e-6 * max(1.0, loss.item())
    for n, g in got.items():
        want = params[n].grad
        assert want is not None, n
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("cfg", [pc.GraLoRA(r=4, k=2, hybrid_r=2), pc.RaSA(r=4, k=1)], ids=["gralora", "rasa"])
def test_embedding_init_starts_at_zero(cfg):
    torch.manual_seed(0)
    base = Net().eval()
    m = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(cfg, TARGETS))
    a = m.emb.peftcompile["default"]
    if cfg.name == "gralora":  # PEFT's convention for LoRA embeddings: A = 0, B normal (hybrid likewise)
        assert torch.count_nonzero(a.gralora_A) == 0 and torch.count_nonzero(a.gralora_A_hybrid) == 0
        assert torch.count_nonzero(a.gralora_B) > 0 and torch.count_nonzero(a.gralora_B_hybrid) > 0
        # linear and conv sites keep GraLoRA's own init (A kaiming, B zeros)
        s = m.stem.peftcompile["default"]
        assert torch.count_nonzero(s.gralora_A) > 0 and torch.count_nonzero(s.gralora_B) == 0
    else:  # RaSA's own init: B_l = B_S = 0
        assert torch.count_nonzero(a.rasa_B) == 0 and torch.count_nonzero(a.rasa_A) > 0
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(a(ids), torch.zeros(2, 5, 16))
        torch.testing.assert_close(m(ids), base(ids), rtol=0, atol=0)


def test_gralora_padding_row_keeps_zero_delta_while_training():
    torch.manual_seed(0)
    m = pc.adapt(Net(), pc.AdapterSpec(pc.GraLoRA(r=4, k=2), ["emb"]))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    ids = _ids()
    ids[:, 0] = 0
    for _ in range(2):
        opt.zero_grad()
        m(ids).square().mean().backward()
        opt.step()
    a = m.emb.peftcompile["default"]
    with torch.no_grad():
        d = a(torch.tensor([0, 5]))
    assert torch.count_nonzero(d[0]) == 0 and torch.count_nonzero(d[1]) > 0


def test_scaled_embedding_subclass_scales_the_delta_and_merges():
    """Gemma 3's scaled embedding (forward = lookup * embed_scale): the delta is scaled too (as LoRA's),
    so merging W += dW^T equals the unmerged model."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    base = Gemma3ForCausalLM(cfg).eval()
    for method in (pc.GraLoRA(r=4, k=2), pc.RaSA(r=4, k=1)):
        m = copy.deepcopy(base)
        pc.adapt(m, pc.AdapterSpec(method, ["embed_tokens", "q_proj"]))
        randomize_adapters_(m)
        ids = _ids(64, (2, 7))
        with torch.no_grad():
            y = m(input_ids=ids).logits
            assert (y - base(input_ids=ids).logits).abs().max() > 1e-2
            emb = m.model.embed_tokens
            a = emb.peftcompile["default"]
            scale = float(emb.embed_scale)
            want = get_method(method.name).delta(F.one_hot(ids, 64).float(), a.tensors(), a.cfg) * scale
            torch.testing.assert_close(a(ids), want, rtol=0, atol=1e-6)
            pc.merge(m)
            assert ((m(input_ids=ids).logits - y).abs().max() / y.abs().max()).item() <= TOL
            pc.unmerge(m)
            torch.testing.assert_close(m(input_ids=ids).logits, y, rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------- RaSA groups
def test_rasa_group_of_equal_conv_sites_shares_its_pool():
    base, m = _adapted(pc.RaSA(r=4, k=1), targets=["conv"], n_blocks=3)
    adapters = [m.blocks[i].conv.peftcompile["default"] for i in range(3)]
    assert {a.group for a in adapters} == {"blocks.*.conv"} and all(a.shared is adapters[0].shared for a in adapters)
    assert adapters[0].shared.rasa_A_shared.shape == (3, 36) and adapters[0].rasa_D.shape == (3 + 3,)
    ids = _ids()
    with torch.no_grad():
        y = m(ids)
        torch.testing.assert_close(y, _reference_model(base, m)(ids), rtol=TOL, atol=TOL)
        pc.merge(m)
        torch.testing.assert_close(m(ids), y, rtol=TOL, atol=TOL)


def test_rasa_group_of_conv_sites_with_other_kernels_is_refused_by_name():
    # blocks.0.conv 4->4 3x3 (in 36) and blocks.1.conv 4->4 1x1 (in 4): different shapes
    m = Net(kernels=[3, 1])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(pc.AdapterError, match=r"group 'blocks\.\*\.conv' has sites of different shapes"):
        pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1), ["conv"]))
    assert state_of(m) is None and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


class Mixed(nn.Module):
    """layers.0.proj a Conv1d 3->4 with kernel 4 (in 12), layers.1.proj a Linear 12->4: one group by name,
    one linear shape, two kinds."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"proj": nn.Conv1d(3, 4, 4)}),
                                     nn.ModuleDict({"proj": nn.Linear(12, 4)})])

    def forward(self, x):  # x [N, 3, 4]
        return self.layers[0]["proj"](x).flatten(1) + self.layers[1]["proj"](x.flatten(1))


def test_rasa_group_mixing_conv_and_linear_is_refused_by_name():
    m = Mixed()
    with pytest.raises(pc.AdapterError, match=r"group 'layers\.\*\.proj' has sites of different shapes.*one kind"):
        pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1), ["proj"]))
    assert state_of(m) is None


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("cfg", MCFGS, ids=MCFG_IDS)
def test_save_load_ours_round_trip(cfg, tmp_path):
    base, m = _adapted(cfg)
    ids = _ids()
    with torch.no_grad():
        y = m(ids)
    pc.save_adapters(m, tmp_path / "a")
    m2 = pc.load_adapters(copy.deepcopy(base), tmp_path / "a")
    assert {c.site: c.kind for _, _, c in site_adapters(m2)} == {c.site: c.kind for _, _, c in site_adapters(m)}
    assert m2.emb.peftcompile["default"].embedding is not None and m2.stem.peftcompile["default"].conv is not None
    with torch.no_grad():
        assert torch.equal(m2.eval()(ids), y)


@pytest.mark.parametrize("targets, layer", [(["emb", "fc"], r"nn\.Embedding site\(s\) \['emb'\]"),
                                            (["stem", "fc"], r"nn\.Conv1d/2d/3d site\(s\) \['stem'\]")],
                         ids=["embedding", "conv"])
def test_peft_format_refuses_gralora_at_embedding_and_conv_by_name(targets, layer, tmp_path):
    """PEFT's GraLoRA has Linear (and HF Conv1D) layers only: PeftModel could not load such a file."""
    _, m = _adapted(pc.GraLoRA(r=4, k=2), targets=targets)
    with pytest.raises(pc.AdapterError, match=rf"adapter 'default' \(gralora\) adapts {layer}, but PEFT's GRALORA "
                                              rf"has no .* layer.*default format"):
        pc.save_adapters(m, tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()
    pc.save_adapters(m, tmp_path / "ours")  # the default format keeps them


def test_peft_format_of_rasa_is_refused_as_before(tmp_path):
    _, m = _adapted(pc.RaSA(r=4, k=1))
    with pytest.raises(pc.AdapterError, match=r"\(rasa\) has no PEFT format"):
        pc.save_adapters(m, tmp_path / "p", format="peft")


def test_checkpoint_into_a_model_where_k_does_not_divide_is_refused(tmp_path):
    _, m = _adapted(pc.GraLoRA(r=4, k=2), targets=["emb"])
    pc.save_adapters(m, tmp_path / "a")
    other = Net(num=15)  # 15 ids: k = 2 does not divide num_embeddings
    with pytest.raises(pc.AdapterError, match=r"emb: GraLoRA k=2 must divide in_features=15.*num_embeddings"):
        pc.load_adapters(other, tmp_path / "a")
    assert state_of(other) is None


# ----------------------------------------------------------------------------- refusals at adapt
REFUSED = [
    ("gralora-embedding-num", lambda: Net(num=15), pc.GraLoRA(r=4, k=2), ["emb", "fc"],
     r"emb: GraLoRA k=2 must divide in_features=15 and out_features=16.*nn\.Embedding, in_features = num_embeddings"),
    ("gralora-conv-in", lambda: Net(), pc.GraLoRA(r=3, k=3), ["stem"],
     r"stem: GraLoRA k=3 must divide in_features=12 and out_features=4.*Conv1d, in_features = in_channels \* "
     r"prod\(kernel_size\) = 4 \* 3"),
    ("gralora-grouped-conv", lambda: nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), pc.GraLoRA(r=4, k=2), ["0"],
     r"Conv2d site '0': groups=2"),
    ("rasa-dilated-conv", lambda: nn.Sequential(nn.Conv1d(4, 4, 3, dilation=2)), pc.RaSA(r=2, k=1), ["0"],
     r"Conv1d site '0': dilation=\(2,\)"),
    ("rasa-max-norm", lambda: nn.Sequential(nn.Embedding(8, 4, max_norm=1.0)), pc.RaSA(r=2, k=1), ["0"],
     r"max_norm"),
]


@pytest.mark.parametrize("what, make, cfg, targets, match", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_by_name_model_unchanged(what, make, cfg, targets, match):
    torch.manual_seed(0)
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(pc.AdapterError, match=match):
        pc.adapt(m, pc.AdapterSpec(cfg, targets))
    assert state_of(m) is None and not list(site_adapters(m))
    sd = m.state_dict()
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], v) for k, v in before.items())


# ----------------------------------------------------------------------------- weighted, DiffoRA
@pytest.mark.parametrize("combination", ["cat", "svd"])
def test_add_weighted_adapter_is_exact_at_embedding_and_conv(combination):
    torch.manual_seed(0)
    m = Net().eval()
    pc.adapt(m, pc.AdapterSpec(pc.GraLoRA(r=4, k=2, alpha=8), TARGETS), "g")
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1, alpha=8), TARGETS), "r")
    randomize_adapters_(m)
    w = [0.7, -1.3]
    # svd at full rank (the smallest site side is 4; rank >= every delta's) is exact
    kw = {"svd_rank": 16} if combination == "svd" else {}
    pc.add_weighted_adapter(m, ["g", "r"], w, "mix", combination_type=combination, **kw)
    for _, _, c in site_adapters(m):
        want = sum(wi * c[n].delta_weight() for wi, n in zip(w, ("g", "r")))
        torch.testing.assert_close(c["mix"].delta_weight(), want, rtol=1e-4, atol=1e-5)
    ids = _ids()
    with torch.no_grad():
        outs = {}
        for n in ("g", "r"):
            pc.set_active(m, n)
            outs[n] = m(ids)
        pc.set_active(m, "mix")
        got = m(ids)
        pc.set_active(m, ["g", "r"])
        assert torch.isfinite(got).all() and got.shape == outs["g"].shape
    # an embedding/conv delta is linear in W here: the combination's delta equals the weighted deltas
    emb = m.emb.peftcompile
    torch.testing.assert_close(emb["mix"](ids), w[0] * emb["g"](ids) + w[1] * emb["r"](ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cfg", [pc.GraLoRA(r=4, k=2), pc.RaSA(r=4, k=1)], ids=["gralora", "rasa"])
def test_diffora_search_places_embedding_and_conv_sites(cfg):
    from peftcompile import diffora

    torch.manual_seed(0)
    model = Net(n_blocks=3)
    batches = [{"ids": _ids(seed=i), "y": torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(i))}
               for i in range(4)]

    def loss_fn(m, b):
        return (m(b["ids"]) - b["y"]).square().mean()

    spec = pc.AdapterSpec(cfg, TARGETS)
    p = diffora.search(model, spec, batches[:2], batches[2:], budget=0.6, steps=3, loss_fn=loss_fn, progress=False)
    assert set(p.gates) == {"emb", "stem", "blocks.0.conv", "blocks.1.conv", "blocks.2.conv", "fc"}
    pc.adapt(model, spec, placement=p)
    kinds = {c.site: c.kind for _, _, c in site_adapters(model)}
    assert set(kinds) == set(p.sites)
    ids = _ids()
    with torch.no_grad():
        y = model(ids)
        pc.merge(model)
        torch.testing.assert_close(model(ids), y, rtol=TOL, atol=TOL)


# ----------------------------------------------------------------------------- backend and ONNX
@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("cfg", [pc.GraLoRA(r=4, k=2, hybrid_r=2, dropout=0.1), pc.RaSA(r=4, k=1, dropout=0.1)],
                         ids=["gralora", "rasa"])
def test_compiled_equals_eager_embedding_and_conv_regions_skipped(cfg):
    from torch._dynamo.utils import counters

    from conftest import compile_fast, counted, param_grads

    _, m = _adapted(cfg)
    m.train()
    ref = copy.deepcopy(m)
    ids = _ids()
    torch.manual_seed(1)
    out = compile_fast(m)(ids)
    torch.manual_seed(1)  # the same dropout masks
    expected = ref(ids)
    torch.testing.assert_close(out, expected, rtol=TOL, atol=TOL)
    out.square().mean().backward()
    expected.square().mean().backward()
    ga, gb = param_grads(m), param_grads(ref)
    assert ga.keys() == gb.keys() and any(k.startswith("emb.") for k in ga) and any(k.startswith("stem.") for k in ga)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=TOL, atol=TOL)
    # fc fused; the embedding and the three conv regions stay reference math, counted skipped
    assert counters["peftcompile"][f"fused_{cfg.name}"] == 1
    assert counters["peftcompile"][f"skipped_{cfg.name}"] == counted("skipped_") == 4
    compiled = compile_fast(m)
    m.eval(), ref.eval()
    with torch.no_grad():
        with pc.disabled(m), pc.disabled(ref):
            torch.testing.assert_close(compiled(ids), ref(ids), rtol=TOL, atol=TOL)
        pc.merge(m)
        torch.testing.assert_close(compiled(ids), ref(ids), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("cfg", [pc.GraLoRA(r=4, k=2, hybrid_r=2), pc.RaSA(r=4, k=1)], ids=["gralora", "rasa"])
def test_onnx_unmerged_and_merged_match_onnxruntime(cfg, tmp_path):

    pytest.importorskip("onnxruntime")
    from peftcompile.export import OrtAdapterSession, to_onnx

    _, m = _adapted(cfg)
    other = copy.deepcopy(m)
    randomize_adapters_(other, std=0.2, seed=1)
    inp = {"ids": _ids()}
    with torch.no_grad():
        ref, ref_other = m(**inp), other(**inp)
        with pc.disabled(m):
            ref_base = m(**inp)
    assert (ref - ref_other).abs().max() > 1e-2

    def run(sess, adapter=None) -> torch.Tensor:
        return ort_output(sess, inp, adapter)

    unmerged = to_onnx(m, inp, tmp_path / "u.onnx", merged=False)
    assert any(k.startswith("emb.") for k in unmerged.adapter_inputs)
    assert any(k.startswith("stem.") for k in unmerged.adapter_inputs)
    torch.testing.assert_close(run(OrtAdapterSession(unmerged.path), unmerged.sidecar), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(OrtAdapterSession(unmerged.path), pc.save_adapters(other, tmp_path / "other")),
                               ref_other, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(run(OrtAdapterSession(unmerged.path)), ref_base, rtol=1e-4, atol=1e-5)  # defaults
    merged = to_onnx(m, inp, tmp_path / "m.onnx", merged=True)
    assert not merged.adapter_inputs
    torch.testing.assert_close(run(OrtAdapterSession(merged.path)), ref, rtol=1e-4, atol=1e-5)


def test_summary_counts_embedding_and_conv_sites():
    _, m = _adapted(pc.GraLoRA(r=4, k=2))
    text = str(pc.summary(m))
    assert "emb" in text and "stem" in text
    cfg = json.loads(json.dumps(m.emb.peftcompile["default"].cfg.to_dict()))
    assert cfg["method"] == "gralora"


class ImgNet(nn.Module):
    """An embedding feeding nothing spatial, and a conv on an image: every site sees the batch as dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 4)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, ids, img):  # ids [N, T], img [N, 4, 5, 5]
        h = self.conv(img + self.emb(ids).mean(1)[:, :, None, None]).mean((2, 3))
        return self.fc(h)


def test_mixed_adapter_batch_routes_rows_at_embedding_and_conv():
    torch.manual_seed(0)
    m = ImgNet().eval()
    pc.adapt(m, pc.AdapterSpec(pc.GraLoRA(r=4, k=2), ["emb", "conv", "fc"]), "g")
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1), ["emb", "conv", "fc"]), "r")
    randomize_adapters_(m, std=0.2)
    ids, img = _ids(shape=(3, 5)), torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = {}
        for n in ("g", "r"):
            pc.set_active(m, n)
            want[n] = m(ids, img)
        with pc.disabled(m):
            want["__base__"] = m(ids, img)
        names = ["r", "__base__", "g"]
        got = m(ids, img, adapter_names=names)
    for i, n in enumerate(names):
        torch.testing.assert_close(got[i], want[n][i], rtol=TOL, atol=1e-6)
