"""RaSA: grouping across repeated blocks, the design formula, shared gradients, effective rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftcompile as pc
from peftcompile.api import SHARED_ATTR, site_adapters
from peftcompile.methods.rasa import rasa_group_key
from conftest import VOCAB, randomize_adapters_, tiny_bert, tiny_gpt2, tiny_llama


def adapters(model, name="default"):
    return {c.site: c[name] for _, _, c in site_adapters(model) if name in c}


@pytest.mark.parametrize("site, key", [
    ("model.layers.3.self_attn.q_proj", "model.layers.*.self_attn.q_proj"),
    ("transformer.h.11.attn.c_attn", "transformer.h.*.attn.c_attn"),
    ("encoder.layer.0.attention.self.query", "encoder.layer.*.attention.self.query"),
    ("blocks.2.experts.5.fc", "blocks.*.experts.*.fc"),
    ("0.fc", "*.fc"),
    ("lm_head", "lm_head"),
    ("proj2.fc", "proj2.fc"),
])
def test_group_key(site, key):
    assert rasa_group_key(site) == key


@pytest.mark.parametrize("factory, n_groups, L", [(tiny_llama, 7, 2), (tiny_gpt2, 4, 2), (tiny_bert, 6, 2)])
def test_grouping_on_hf_models(factory, n_groups, L):
    m = factory()
    with pytest.warns(UserWarning, match="single site") if factory is tiny_bert else _no_warning():
        pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1, alpha=8), targets="all-linear"))
    groups = {}
    for a in adapters(m).values():
        groups.setdefault(a.group, set()).add(a.site)
    assert len(groups) == n_groups + (1 if factory is tiny_bert else 0)  # BERT's pooler stands alone
    for g, members in groups.items():
        if g != "pooler.dense":
            assert len(members) == L
    a = next(iter(adapters(m).values()))
    assert a.rasa_D.shape == (4 - 1 + L * 1,)
    assert a.shared.rasa_A_shared.shape == (L * 1, a.in_features)


class _no_warning:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def test_init_matches_design():
    r, k, alpha, L = 8, 2, 16, 2
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=r, k=k, alpha=alpha), targets=["q_proj"]))
    for a in adapters(m).values():
        D = a.rasa_D.detach()
        assert torch.all(D[: r - k] == 0.5 * alpha / (r - k)) and torch.all(D[r - k:] == 0.5 * alpha / (L * k))
        assert a.rasa_B.abs().sum() == 0 and a.shared.rasa_B_shared.abs().sum() == 0
        assert a.rasa_A.abs().sum() > 0 and a.shared.rasa_A_shared.abs().sum() > 0
    # the group's shared tensors are one object, stored once at the root
    shared = {id(a.shared) for a in adapters(m).values()}
    assert len(shared) == 1 and len(getattr(m, SHARED_ATTR)["default"]) == 1


def test_forward_and_delta_weight_equal_formula():
    torch.manual_seed(0)
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1, alpha=8), targets=["gate_proj"]))
    randomize_adapters_(m)
    x = torch.randn(3, 5, 32)
    for site, a in adapters(m).items():
        # written out independently of the method module
        Bcat = torch.cat([a.rasa_B, a.shared.rasa_B_shared], dim=1)
        Acat = torch.cat([a.rasa_A, a.shared.rasa_A_shared], dim=0)
        dW = Bcat @ torch.diag(a.rasa_D) @ Acat
        torch.testing.assert_close(a.delta_weight(), dW, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a(x), x @ dW.t(), atol=1e-4, rtol=1e-4)
        host = m.get_submodule(site)
        torch.testing.assert_close(host(x), x @ (host.weight + dW).t(), atol=1e-4, rtol=1e-4)


def test_shared_gradient_is_sum_of_layer_contributions():
    torch.manual_seed(0)
    m = tiny_llama()
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1, alpha=8), targets=["up_proj"]))
    randomize_adapters_(m)
    ads = list(adapters(m).values())
    shared = ads[0].shared
    xs = [torch.randn(4, 32) for _ in ads]
    total = sum((a(x) ** 2).sum() for a, x in zip(ads, xs))
    gA, gB = torch.autograd.grad(total, [shared.rasa_A_shared, shared.rasa_B_shared])
    parts = [torch.autograd.grad((a(x) ** 2).sum(), [shared.rasa_A_shared, shared.rasa_B_shared]) for a, x in zip(ads, xs)]
    torch.testing.assert_close(gA, sum(p[0] for p in parts))
    torch.testing.assert_close(gB, sum(p[1] for p in parts))
    assert all(p[0].abs().sum() > 0 for p in parts)  # every layer contributes


def test_effective_rank():
    torch.manual_seed(0)
    L, r, k = 4, 8, 2
    m = tiny_llama(num_hidden_layers=L, hidden_size=64, intermediate_size=128)
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=r, k=k, alpha=8), targets=["o_proj"]))
    randomize_adapters_(m)
    m.double()  # rank in float64, so rounding noise does not count as rank
    for a in adapters(m).values():
        assert torch.linalg.matrix_rank(a.delta_weight()).item() == (r - k) + L * k  # 14 > r = 8
    s = pc.summary(m)
    info = s.adapters["default"]
    assert info["groups"] == {"model.layers.*.self_attn.o_proj": {"L": L, "effective_rank": (r - k) + L * k}}
    # parameter count close to LoRA's at rank r: private (r-k)(in+out) + D, shared L*k(in+out)
    assert info["baseline_params"] == L * r * (64 + 64)
    assert info["params"] == L * ((r - k) * 128 + (r - k) + L * k) + L * k * 128
    assert "effective rank/site=14" in str(s)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert])
def test_training_decreases_loss(factory):
    torch.manual_seed(0)
    m = factory().train()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1, alpha=8)))
    ids = torch.randint(3, VOCAB, (2, 8))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        if factory is tiny_bert:
            o = m(input_ids=ids)
            loss = o.last_hidden_state.pow(2).mean() + o.pooler_output.pow(2).mean()
        else:
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        shared = getattr(m, SHARED_ATTR)["default"]
        assert all(p.grad is not None for p in shared.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_merge_exact():
    torch.manual_seed(0)
    m = tiny_gpt2().eval()
    w0 = {k: v.clone() for k, v in m.state_dict().items()}
    pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1, alpha=8)))
    randomize_adapters_(m, std=0.1)
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        y = m(input_ids=ids).logits
        pc.merge(m)
        torch.testing.assert_close(m(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)
        pc.unmerge(m)
    assert all((m.state_dict()[k] - v).abs().max() <= 1e-6 for k, v in w0.items())


@pytest.mark.parametrize("kw, msg", [(dict(r=4, k=4), "must be smaller than r"), (dict(r=4, k=0), "k must be an int >= 1")])
def test_bad_k(kw, msg):
    with pytest.raises(ValueError, match=msg):
        pc.RaSA(alpha=8, **kw)


class Uneven(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 32)])

    def forward(self, x):
        return self.layers[1](self.layers[0](x))


def test_group_with_mismatched_shapes_names_sites():
    from test_io import assert_unchanged, snapshot

    m = Uneven()
    snap = snapshot(m)
    with pytest.raises(pc.AdapterError, match=r"group '\*' .*layers\.0.*layers\.1|group 'layers\.\*' .*layers\.0.*layers\.1"):
        pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1, alpha=8)))
    assert_unchanged(m, snap)


def test_single_member_group_falls_back_with_warning():
    m = tiny_bert()
    with pytest.warns(UserWarning, match="sharing needs >= 2 layers"):
        pc.adapt(m, pc.AdapterSpec(pc.RaSA(r=4, k=1, alpha=8), targets=["pooler.dense"]))
    a = adapters(m)["pooler.dense"]
    assert a.n_members == 1 and a.rasa_D.shape == (4,)  # LoRA of rank r with a trainable diagonal
