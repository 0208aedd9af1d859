"""Bad input: a clear error naming the module and the fix, and the model left exactly as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftcompile as pc
from conftest import MLP, tiny_bert, tiny_llama
from test_io import assert_unchanged, snapshot


class Untraceable(nn.Module):
    """Data-dependent control flow around its own F.linear: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        if x.sum() > 0:
            return F.linear(x, self.w)
        return x


def test_k_not_dividing_features():
    m = tiny_llama()  # hidden 32, intermediate 64: 3 divides neither
    snap = snapshot(m)
    with pytest.raises(pc.AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj: GraLoRA k=3 must divide"):
        pc.adapt(m, pc.AdapterSpec(pc.GraLoRA(r=6, k=3, alpha=8)))
    assert_unchanged(m, snap)


@pytest.mark.parametrize("make", [lambda: pc.LoRA(r=0), lambda: pc.GraLoRA(r=-1, k=1), lambda: pc.RaSA(r=0, k=1)])
def test_rank_must_be_positive(make):
    with pytest.raises(ValueError, match="r must be a positive int"):
        make()


def test_targets_matching_nothing_lists_sites():
    m = MLP()
    snap = snapshot(m)
    with pytest.raises(pc.AdapterError, match=r"matched no linear site\. Available sites: \['fc1', 'fc2'\]"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"]))
    assert_unchanged(m, snap)


def test_untraceable_module_is_named_with_reason():
    m = Untraceable()
    snap = snapshot(m)
    with pytest.raises(pc.AdapterError, match=r"could not be traced whole.*<root>.*TraceError"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["w"]))
    assert_unchanged(m, snap)


def test_duplicate_adapter_name():
    m = tiny_bert()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["query"]))
    snap = snapshot(m)
    with pytest.raises(pc.AdapterError, match="already exists"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["value"]))
    assert_unchanged(m, snap)


def test_placement_with_unknown_sites():
    m = MLP()
    snap = snapshot(m)
    with pytest.raises(pc.AdapterError, match="does not have"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2)), placement=pc.Placement(sites=["fc1", "fc9"]))
    assert_unchanged(m, snap)


def test_spec_validation():
    with pytest.raises(TypeError, match="method config"):
        pc.AdapterSpec("lora")
    with pytest.raises(ValueError, match="not a valid regex"):
        pc.AdapterSpec(pc.LoRA(r=2), targets="(")
    with pytest.raises(pc.AdapterError, match="no peftcompile adapters"):
        pc.merge(MLP())
