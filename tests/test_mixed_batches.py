"""Mixed-adapter batches (issue #12 item 7): PEFT's ``model(..., adapter_names=[...])``, one
adapter per row, ``"__base__"`` for none, with PEFT's refusals (wrong length, unknown names,
merged adapters, training mode) and ``generate(..., adapter_names=...)`` (greedy and beam
search, where HF repeats each row per beam). Every row must equal that row run alone with its
adapter active (``"__base__"``: under ``pc.disabled``), fp32 <= 1e-5. Under torch.compile the
call is refused with an AdapterError, never run with the wrong adapter.
"""

from __future__ import annotations

import pytest
import torch

import peftcompile as pc

from conftest import FAST, MLP, hf_output, randomize_adapters_, tiny_llama, token_ids

pytestmark = pytest.mark.filterwarnings("ignore:.*has a single site")

ATOL, RTOL = 1e-5, 1e-5
METHODS = [pc.LoRA(r=4, alpha=8), pc.GraLoRA(r=4, k=2, hybrid_r=2), pc.RaSA(r=4, k=1)]


def _two_adapters(model, cfg, targets="all-linear", other_targets=None):
    """Adapter "a" (cfg) and "b" (cfg, on ``other_targets`` if given), both with random weights."""
    pc.adapt(model, pc.AdapterSpec(cfg, targets=targets), "a")
    randomize_adapters_(model, std=0.1, seed=1)
    pc.adapt(model, pc.AdapterSpec(cfg, targets=other_targets or targets), "b")
    randomize_adapters_(model, std=0.1, seed=2)
    return model.eval()


def _alone(model, name, *args, call=None, **kwargs):
    """The model run with only ``name`` (``"__base__"``: no adapter)."""
    call = call or model
    if name == "__base__":
        with pc.disabled(model):
            return call(*args, **kwargs)
    pc.set_active(model, name)
    return call(*args, **kwargs)


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: c.name)
def test_mlp_rows_equal_each_adapter_alone(cfg):
    model = _two_adapters(MLP(d_in=16, d_hidden=32, d_out=8), cfg)
    x = torch.randn(5, 16)
    names = ["a", "__base__", "b", "a", "b"]
    with torch.no_grad():
        got = model(x, adapter_names=names)
        for i, n in enumerate(names):
            torch.testing.assert_close(got[i:i + 1], _alone(model, n, x[i:i + 1]), atol=ATOL, rtol=RTOL)
        # the rows differ: each really ran its own adapter
        assert not torch.allclose(got[0], _alone(model, "b", x[:1])[0])
        assert not torch.allclose(got[1], _alone(model, "a", x[1:2])[0])
    assert pc.adapters_of(model) and model(x).shape == got.shape  # routing is gone after the call


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: c.name)
def test_llama_logits_and_generate_per_row(cfg):
    """Tiny Llama: "a" on every linear, "b" on q/v only (rows of "b" run the base elsewhere, as in
    PEFT). Logits per row, then greedy generate with the KV cache, then beam search."""
    model = _two_adapters(tiny_llama(num_hidden_layers=1), cfg, other_targets=["q_proj", "v_proj"])
    ids = token_ids(seq=5, batch=3)
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        got = hf_output(model(input_ids=ids, adapter_names=names))
        for i, n in enumerate(names):
            torch.testing.assert_close(got[i:i + 1], hf_output(_alone(model, n, ids[i:i + 1])), atol=ATOL, rtol=RTOL)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, adapter_names=names)
    for i, n in enumerate(names):
        want = _alone(model, n, ids[i:i + 1], max_new_tokens=4, do_sample=False, call=model.generate)
        assert torch.equal(out[i:i + 1], want), n
    beams = model.generate(ids, max_new_tokens=3, do_sample=False, num_beams=2, adapter_names=names)
    for i, n in enumerate(names):
        want = _alone(model, n, ids[i:i + 1], max_new_tokens=3, do_sample=False, num_beams=2, call=model.generate)
        assert torch.equal(beams[i:i + 1], want), n


def test_disabled_model_runs_every_row_on_the_base():
    """As PEFT: disabled adapters win over adapter_names."""
    model = _two_adapters(MLP(), pc.LoRA(r=4))
    x = torch.randn(3, 16)
    with torch.no_grad(), pc.disabled(model):
        base = model(x)
        torch.testing.assert_close(model(x, adapter_names=["a", "b", "__base__"]), base, atol=0, rtol=0)


def _state(model):
    from peftcompile.state import site_adapters, state_of

    return (state_of(model).active, [(c.active, c.merged, c.disabled) for _, _, c in site_adapters(model)],
            {n: p.requires_grad for n, p in model.named_parameters()}, state_of(model).routing.names)


@pytest.mark.parametrize("bad, match", [
    (dict(adapter_names=["a", "b"]), "adapter_names has 2 names but the batch has 3 rows"),
    (dict(adapter_names=["a", "c", "__base__"]), r"unknown adapter\(s\) \['c'\]"),
    (dict(adapter_names="a"), "must be a list of adapter names"),
    (dict(adapter_names=["a", 1, "b"]), "must be a list of adapter names"),
], ids=["length", "unknown", "string", "not-str"])
def test_bad_adapter_names_raise_and_change_nothing(bad, match):
    model = _two_adapters(MLP(), pc.LoRA(r=4))
    x = torch.randn(3, 16)
    before, out = _state(model), model(x)
    with pytest.raises(pc.AdapterError, match=match):
        model(x, **bad)
    assert _state(model) == before
    torch.testing.assert_close(model(x), out, atol=0, rtol=0)


def test_merged_and_training_are_refused_with_the_fix():
    model = _two_adapters(MLP(), pc.LoRA(r=4))
    x = torch.randn(3, 16)
    pc.merge(model)
    with pytest.raises(pc.AdapterError, match=r"merged.*unmerge\(model\)"):
        model(x, adapter_names=["a", "b", "a"])
    pc.unmerge(model)
    model.train()
    with pytest.raises(pc.AdapterError, match=r"training mode.*model.eval\(\)"):
        model(x, adapter_names=["a", "b", "a"])
    llama = _two_adapters(tiny_llama(num_hidden_layers=1), pc.LoRA(r=2), targets=["q_proj"])
    with pytest.raises(pc.AdapterError, match="adapter_names has 1 names but the batch has 2 rows"):
        llama.generate(token_ids(seq=4), max_new_tokens=1, adapter_names=["a"])


def test_a_layer_without_the_batch_in_dim_0_raises():
    """A site whose input does not carry the batch in dim 0 (here: a flattened [batch*seq, in])
    cannot route rows: AdapterError naming the site, not a silently mixed result."""

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x.reshape(-1, 8)).reshape(x.shape)

    model = _two_adapters(Flat(), pc.LoRA(r=2))
    x = torch.randn(2, 3, 8)
    with pytest.raises(pc.AdapterError, match=r"fc: adapter_names has 2 names, but this layer's input has shape \(6, 8\)"):
        model(x, adapter_names=["a", "b"])
    model(x)  # the routing was cleared although the forward raised


@pytest.mark.usefixtures("fresh_dynamo")
def test_under_the_backend_it_is_refused_not_wrong():
    """torch.compile(model) with adapter_names: AdapterError with the fix; the compiled model still
    runs plain batches, and the uncompiled one runs the mixed batch."""
    model = _two_adapters(tiny_llama(num_hidden_layers=1), pc.LoRA(r=2), targets=["q_proj", "v_proj"])
    compiled = torch.compile(model, backend="peftcompile", options=FAST)
    ids = token_ids(seq=4)
    with torch.no_grad():
        want = hf_output(model(ids))
        torch.testing.assert_close(hf_output(compiled(ids)), want, atol=ATOL, rtol=RTOL)
        with pytest.raises(pc.AdapterError, match="eager mode only.*_orig_mod"):
            compiled(ids, adapter_names=["a", "b"])
        torch.testing.assert_close(hf_output(compiled(ids)), want, atol=ATOL, rtol=RTOL)
        mixed = hf_output(compiled._orig_mod(ids, adapter_names=["a", "b"]))
        torch.testing.assert_close(mixed[1:], hf_output(_alone(model, "b", ids[1:])), atol=ATOL, rtol=RTOL)
