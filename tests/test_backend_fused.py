"""The fused path for everyday PEFT settings (issue #14): adapter dropout in training, fp32
adapters on a 16-bit base and autocast, several active adapters on one site, linears written
as ``x @ W.T``, and no recompiles for sequence lengths, adapter switching or disabling.

Each case checks the counters (``fused_<method>`` = regions fused), that no region is left
as reference math, and outputs and every gradient against eager. Compiled with aot_eager
(the same lowering and aot_autograd, no inductor code generation), whose dropout draws the
same masks as eager under the same seed, so compiled and eager see the same dropped input.
Tolerances: fp32 1e-5 (the fused ops reorder the same fp32 math); 16-bit bases: the eager
reference computed in float64 from the same rounded tensors, compiled error at most
twice eager's own error plus one 16-bit rounding of the output.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import peftcompile as pc
from peftcompile.api import site_adapters
from peftcompile.backend import peftcompile_backend

from conftest import FAST, CountingBackend, compile_fast, counted, param_grads, token_ids, MLP, VOCAB, hf_output, randomize_adapters_, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore:.*has a single site"), pytest.mark.usefixtures("fresh_dynamo")]

ATOL, RTOL = 1e-5, 1e-5
METHODS = [pc.LoRA(r=4, alpha=8), pc.GraLoRA(r=4, k=2, hybrid_r=2), pc.RaSA(r=4, k=1)]












def _assert_same(out, expected, model, ref, atol=ATOL, rtol=RTOL) -> None:
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    ga, gb = param_grads(model), param_grads(ref)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")




def _llama(cfg, targets="all-linear", layers: int = 2):
    m = tiny_llama(num_hidden_layers=layers)
    pc.adapt(m, pc.AdapterSpec(cfg, targets=targets))
    randomize_adapters_(m, std=0.1)
    return m


# ---------------------------------------------------------------- dropout
@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: c.name)
def test_dropout_in_training_is_fused(cfg):
    """Adapter dropout (PEFT's lora_dropout) in train mode: the dropout node stays in the graph
    and feeds the op's ``xa``; the base reads x. Same seed -> same masks -> same numbers."""
    cfg = type(cfg)(**{**cfg.__dict__, "dropout": 0.1})
    model = _llama(cfg).train()
    n = len(list(site_adapters(model)))
    ref = copy.deepcopy(model)
    ids = token_ids()
    torch.manual_seed(7)
    out = hf_output(compile_fast(model)(ids))
    out.float().square().mean().backward()
    torch.manual_seed(7)
    expected = hf_output(ref(ids))
    expected.float().square().mean().backward()
    assert counters["peftcompile"][f"fused_{cfg.name}"] == n == 14 and counted("skipped_") == 0
    _assert_same(out, expected, model, ref)
    # and the masks really drop: a second step draws other ones
    model.zero_grad()
    again = hf_output(compile_fast(model)(ids))
    assert not torch.allclose(again, out)


def test_dropout_op_gets_the_dropped_input():
    """The op's xa is the dropout node (the graph keeps one dropout per site, no delta math)."""
    seen = []

    def spy(gm, example_inputs):
        out = peftcompile_backend(gm, example_inputs, options=FAST)
        seen.append(gm)
        return out

    model = _llama(pc.LoRA(r=4, dropout=0.2), targets=["v_proj"], layers=1).train()
    torch.compile(model, backend=spy)(token_ids())
    ops = [n for n in seen[0].graph.nodes if n.target is torch.ops.peftcompile.lowrank_linear.default]
    assert len(ops) == 1
    xa = ops[0].args[7]
    assert "dropout" in str(xa.target), xa.target
    assert xa.args[0].args[0] is ops[0].args[0]  # dropout(x.to(dtype)) of the base's own x


# ---------------------------------------------------------------- dtypes
def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("base", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: c.name)
def test_fp32_adapters_on_16bit_base_are_fused(cfg, base):
    """PEFT's default dtype policy: adapters in fp32 on a bf16 / fp16 model. The op casts x to
    the adapter dtype, computes the delta in fp32 and rounds it once, as eager does."""
    model = MLP(d_in=24, d_hidden=40, d_out=8)
    model.fc1.to(base)
    model.fc2.to(base)
    pc.adapt(model, pc.AdapterSpec(cfg, targets="all-linear"))
    for _, _, cont in site_adapters(model):
        cont.float()
    for m in model.modules():  # RaSA's shared tensors live at the root
        if type(m).__name__ == "SharedTensors":
            m.float()
    randomize_adapters_(model, std=0.1)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    ref = copy.deepcopy(model)
    x = torch.randn(3, 7, 24).to(base)
    out = compile_fast(model)(x)
    out.float().square().mean().backward()
    expected = ref(x)
    expected.float().square().mean().backward()
    assert counters["peftcompile"][f"fused_{cfg.name}"] == 2 and counted("skipped_") == 0
    assert out.dtype == base
    # the same math in float64 (inputs as rounded), to measure each side's own rounding error
    exact = copy.deepcopy(ref).double()
    ex = exact(x.double())
    eps = torch.finfo(base).eps
    assert _err(out, ex) <= 2 * _err(expected, ex) + eps * ex.abs().max().item()
    torch.testing.assert_close(out, expected, atol=4 * eps, rtol=4 * eps)
    for k, g in param_grads(model).items():
        assert g.dtype == torch.float32, k
        torch.testing.assert_close(g, param_grads(ref)[k], atol=4 * eps * g.abs().max().item(), rtol=4 * eps,
                                   msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: c.name)
def test_autocast_is_fused(cfg):
    """fp32 model and adapters under torch.autocast(bf16): the lowering makes autocast's casts
    explicit (x, W, b and the adapter to bf16) and the op computes in bf16, as eager does."""
    model = MLP(d_in=24, d_hidden=40, d_out=8)
    pc.adapt(model, pc.AdapterSpec(cfg, targets="all-linear"))
    randomize_adapters_(model, std=0.1)
    ref = copy.deepcopy(model)
    x = torch.randn(3, 7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compile_fast(model)(x)
        expected = ref(x)
    out.float().square().mean().backward()
    expected.float().square().mean().backward()
    assert counters["peftcompile"][f"fused_{cfg.name}"] == 2 and counted("skipped_") == 0
    assert out.dtype == expected.dtype == torch.bfloat16
    eps = torch.finfo(torch.bfloat16).eps
    ex = copy.deepcopy(ref).double()(x.double())
    assert _err(out, ex) <= 2 * _err(expected, ex) + eps * ex.abs().max().item()
    for k, g in param_grads(model).items():
        want = param_grads(ref)[k]
        torch.testing.assert_close(g, want, atol=8 * eps * want.abs().max().item(), rtol=8 * eps,
                                   msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------- several adapters
STACKS = {
    "lora": (pc.LoRA(r=4, alpha=8), pc.LoRA(r=2, alpha=3)),
    "gralora": (pc.GraLoRA(r=4, k=2, hybrid_r=2), pc.GraLoRA(r=6, k=2, alpha=5)),
    "rasa": (pc.RaSA(r=4, k=1), pc.RaSA(r=3, k=2, alpha=4)),
}


@pytest.mark.parametrize("method", list(STACKS))
def test_two_active_adapters_are_one_op(method):
    """Two active adapters of one method on every site: one op per site, A/B concatenated along
    the rank with the scalings folded in (GraLoRA: per chunk, so the block structure holds)."""
    a, b = STACKS[method]
    model = tiny_llama(num_hidden_layers=2)
    pc.adapt(model, pc.AdapterSpec(a, targets="all-linear"), "a")
    pc.adapt(model, pc.AdapterSpec(b, targets="all-linear"), "b")
    pc.set_active(model, ["a", "b"])
    randomize_adapters_(model, std=0.1)
    ref = copy.deepcopy(model)
    ids = token_ids()
    seen = []

    def spy(gm, example_inputs):
        compiled = peftcompile_backend(gm, example_inputs, options=FAST)  # lowers gm in place
        seen.append([n.target for n in gm.graph.nodes])
        return compiled

    out = hf_output(torch.compile(model, backend=spy)(ids))
    out.float().square().mean().backward()
    expected = hf_output(ref(ids))
    expected.float().square().mean().backward()
    sites = 14
    assert counters["peftcompile"][f"fused_{method}"] == 2 * sites and counted("skipped_") == 0
    assert counters["peftcompile"]["stacked_sites"] == sites
    fused_ops = [t for t in seen[0] if isinstance(t, torch._ops.OpOverload) and t.namespace == "peftcompile"]
    assert len(fused_ops) == sites
    _assert_same(out, expected, model, ref, atol=1e-4, rtol=1e-4)


def test_stacking_falls_back_with_dropout():
    """Each adapter's dropout draws its own mask: no shared input, so the first adapter fuses
    (with its dropped input) and the second stays reference math on top, counted skipped."""
    model = MLP()
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(r=4, dropout=0.1), targets="all-linear"), "a")
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(r=2, dropout=0.1), targets="all-linear"), "b")
    pc.set_active(model, ["a", "b"])
    randomize_adapters_(model, std=0.1)
    model.train()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 16)
    torch.manual_seed(3)
    out = compile_fast(model)(x)
    torch.manual_seed(3)
    expected = ref(x)
    assert counters["peftcompile"]["fused_lora"] == 2 and counters["peftcompile"]["skipped_lora"] == 2
    assert not counters["peftcompile"]["stacked_sites"]
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- x @ W.T linears
class FalconStyleLinear(nn.Linear):
    """As transformers' FalconLinear: ``x @ self.weight.T`` (+ bias)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class MatmulMLP(nn.Module):
    """A plain module with linears written as matmuls on its own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(32, 16) / 4)
        self.b_in = nn.Parameter(torch.zeros(32))
        self.w_mid = nn.Parameter(torch.randn(32, 32) / 6)
        self.out = FalconStyleLinear(32, 8)
        self.head = FalconStyleLinear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ self.w_in.T + self.b_in)
        h = torch.relu(torch.matmul(h, self.w_mid.t()))
        return self.head(self.out(h))


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: c.name)
def test_matmul_linears_are_adapted_and_fused(cfg):
    model = MatmulMLP()
    model.requires_grad_(False)
    pc.adapt(model, pc.AdapterSpec(cfg, targets=["w_in", "w_mid", "out", "head"]))
    assert len(list(site_adapters(model))) == 4
    randomize_adapters_(model, std=0.1)
    ref = copy.deepcopy(model)
    x = torch.randn(3, 5, 16)
    out = compile_fast(model)(x)
    out.square().mean().backward()
    expected = ref(x)
    expected.square().mean().backward()
    assert counters["peftcompile"][f"fused_{cfg.name}"] == 4 and counted("skipped_") == 0
    _assert_same(out, expected, model, ref)


def test_falcon_linears_are_fused():
    """transformers' Falcon: every projection is a FalconLinear (``x @ self.weight.T + bias``)."""
    from transformers import FalconConfig, FalconForCausalLM

    model = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, bias=True, hidden_dropout=0.0,
                                           attention_dropout=0.0))
    pc.adapt(model, pc.AdapterSpec(pc.GraLoRA(r=4, k=2), targets="all-linear"))
    n = len(list(site_adapters(model)))
    randomize_adapters_(model, std=0.1)
    ref = copy.deepcopy(model)
    ids = token_ids()
    out = compile_fast(model)(ids).logits
    out.square().mean().backward()
    expected = ref(ids).logits
    expected.square().mean().backward()
    assert n == 4 and counters["peftcompile"]["fused_gralora"] == n and counted("skipped_") == 0
    _assert_same(out, expected, model, ref)


# ---------------------------------------------------------------- recompiles
def test_marked_dynamic_length_compiles_once():
    """A length marked dynamic on the first call: one graph serves the next lengths, fused."""
    model = _llama(pc.GraLoRA(r=4, k=2), layers=1)
    ref = copy.deepcopy(model)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    for seq in (6, 11, 17):
        ids = token_ids(seq=seq)
        torch._dynamo.mark_dynamic(ids, 1)
        torch.testing.assert_close(hf_output(compiled(ids)), hf_output(ref(ids)), atol=ATOL, rtol=RTOL)
    assert backend.frames == 1
    assert counters["peftcompile"]["fused_gralora"] == 7 and counted("skipped_") == 0


def _states_model(cfg, names=("a", "b")):
    model = tiny_llama(num_hidden_layers=1)
    for i, n in enumerate(names):
        pc.adapt(model, pc.AdapterSpec(cfg, targets=["q_proj", "v_proj"]), n)
        randomize_adapters_(model, std=0.1, seed=i)  # the new adapter is the trainable one
    return model


def _enter(model, state) -> contextlib.AbstractContextManager:
    """Put ``model`` in ``state``: an adapter name (list), "disabled()" (the context manager,
    returned), "disable_adapter_layers" (persistent; enable_adapter_layers undoes it)."""
    if state == "disabled()":
        return pc.disabled(model)
    pc.enable_adapter_layers(model)
    if state == "disable_adapter_layers":
        pc.disable_adapter_layers(model)
    else:
        pc.set_active(model, state)
    return contextlib.nullcontext()


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: c.name)
def test_switching_and_disabling_do_not_recompile(cfg):
    """Two adapters of one config: switching a -> b -> a, ``pc.disabled``, disable/enable_adapter_layers
    and new (marked dynamic) lengths all run the first graph: the compiled forward reads the
    running adapters through the same slot and the on/off gate as a tensor. Training mode,
    outputs and every gradient equal eager; the graph stays fused."""
    model = _states_model(cfg).train()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    outs = {}
    for seq, state in zip((6, 9, 7, 11, 6, 8), ("a", "b", "disabled()", "disable_adapter_layers", "a", "b")):
        ids = token_ids(seq=seq)
        torch._dynamo.mark_dynamic(ids, 1)
        with _enter(model, state):
            ref = copy.deepcopy(model)
            model.zero_grad()
            out = hf_output(compiled(ids))
            out.square().mean().backward()
            expected = hf_output(ref(ids))
            if expected.requires_grad:
                expected.square().mean().backward()
            _assert_same(out, expected, model, ref)
        outs[(state, seq)] = out.detach()
    assert backend.frames == 1 and counters["stats"]["unique_graphs"] == 1
    assert counters["peftcompile"][f"fused_{cfg.name}"] == 2 and counted("skipped_") == 0
    # the states really differ: a, b and the base model give three different outputs
    ids = token_ids(seq=6)
    with pc.disabled(model):
        plain = hf_output(model(ids))
    pc.set_active(model, "b")
    other = hf_output(model(ids))
    assert not torch.allclose(outs[("a", 6)], plain) and not torch.allclose(outs[("a", 6)], other)


def test_other_structures_compile_once_each():
    """What dynamo guards on now is the *structure* of the running adapters (method config incl.
    alpha, tensor shapes, dtypes, requires_grad, how many run), not their names or the on/off
    state: each distinct structure compiles once, an adapter equal to one seen reuses its graph,
    and revisiting states compiles nothing."""
    model = tiny_llama(num_hidden_layers=1)
    for i, (name, cfg) in enumerate({"a": pc.LoRA(r=4), "b": pc.LoRA(r=2), "c": pc.LoRA(r=4),
                                     "d": pc.LoRA(r=4, alpha=32)}.items()):
        pc.adapt(model, pc.AdapterSpec(cfg, targets=["q_proj", "v_proj"]), name)
        randomize_adapters_(model, std=0.1, seed=i)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    ids = token_ids()
    seen = []
    for state in ["a", "b", "c", ["a", "b"], "disabled()", "d", "a", ["a", "b"], "b", "disabled()", "c"]:
        with _enter(model, state):
            torch.testing.assert_close(hf_output(compiled(ids)), hf_output(model(ids)), atol=ATOL, rtol=RTOL)
        seen.append(backend.frames)
    # a: 1; b (rank 2): 2; c (= a's config): reuses; [a, b]: 3; disabled: reuses; d (alpha 32): 4
    assert seen == [1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4]
    # a, b, d: 2 sites each; [a, b]: 2 stacked sites (4 regions)
    assert counters["peftcompile"]["fused_lora"] == 2 + 2 + 4 + 2 and counted("skipped_") == 0


def test_reference_forward_inside_disabled_backprops_through_both():
    """A DPO-style step: the policy output, then the reference output under ``pc.disabled`` in
    the same autograd graph. The gate is swapped, not written in place, so the first graph's
    saved gate is intact for backward; gradients equal eager's."""
    model = _states_model(pc.LoRA(r=4), names=("a",)).train()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend=CountingBackend())
    ids = token_ids()
    out = hf_output(compiled(ids))
    with pc.disabled(model):
        base = hf_output(compiled(ids))
    (out - base).square().mean().backward()
    want = hf_output(ref(ids))
    with pc.disabled(ref):
        want_base = hf_output(ref(ids))
    (want - want_base).square().mean().backward()
    torch.testing.assert_close(base, want_base, atol=ATOL, rtol=RTOL)
    _assert_same(out, want, model, ref)


# ---------------------------------------------------------------- inductor
def test_inductor_decomposes_dropout_and_casts():
    """The default compiler on CPU: the ops (with xa and the dtype casts) decompose into their
    reference math and inductor compiles them; ``fallback_random`` makes inductor draw the
    dropout masks as eager does, so the numbers can be compared."""
    model = MLP(d_in=16, d_hidden=24, d_out=8)
    model.fc2.to(torch.bfloat16)
    model.fc1.to(torch.bfloat16)
    pc.adapt(model, pc.AdapterSpec(pc.GraLoRA(r=4, k=2, hybrid_r=2, dropout=0.2), targets="all-linear"))
    for _, _, cont in site_adapters(model):
        cont.float()
    randomize_adapters_(model, std=0.1)
    model.train()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, backend="peftcompile")
        torch.manual_seed(5)
        out = compiled(x)
        out.float().square().mean().backward()
    torch.manual_seed(5)
    expected = ref(x)
    expected.float().square().mean().backward()
    assert counters["peftcompile"]["fused_gralora"] == 2 and counted("skipped_") == 0
    assert counters["peftcompile"]["decomposed_graphs"] >= 1
    eps = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(out, expected, atol=4 * eps, rtol=4 * eps)
    for k, g in param_grads(model).items():
        want = param_grads(ref)[k]
        torch.testing.assert_close(g, want, atol=4 * eps * want.abs().max().item(), rtol=4 * eps,
                                   msg=lambda m: f"{k}: {m}")


# ---------------------------------------------------------------- inference
def test_generate_unmerged_through_backend_equals_eager_and_merged():
    """Prefill and cached decode (``generate`` with KV cache) through the compiled forward with
    the adapter unmerged: the same tokens as eager, every site fused in every graph; and the
    merged model (plain linears) compiled gives the same tokens."""
    model = _llama(pc.GraLoRA(r=4, k=2, hybrid_r=2, dropout=0.1), layers=1).eval()
    ids = token_ids(seq=6, batch=1)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
    merged = copy.deepcopy(model)
    pc.merge(merged)
    backend = CountingBackend()
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["peftcompile"]["fused_gralora"] == backend.frames * 7 and counted("skipped_") == 0
    frames = backend.frames
    merged.forward = torch.compile(merged.forward, backend=backend)
    with torch.no_grad():
        assert torch.equal(merged.generate(ids, max_new_tokens=5, do_sample=False), want)
    assert counters["peftcompile"]["fused_gralora"] == frames * 7  # merged: no adapter regions left


# ---------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("cfg", [pc.LoRA(r=4, alpha=8, dropout=0.1), *METHODS[1:]], ids=lambda c: c.name)
def test_gradient_checkpointing_is_fused(cfg, reentrant):
    """HF gradient checkpointing puts each layer in a higher-order op's body subgraph
    (tag_activation_checkpoint): the regions there are fused too (they stayed unfused before:
    no fused_* counted), with loss and every gradient equal to eager, dropout included (the
    recomputation replays the RNG state)."""
    m = _llama(cfg)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    m.train()
    ref = copy.deepcopy(m)
    ids = token_ids()
    torch.manual_seed(1)
    out = compile_fast(m)(input_ids=ids, labels=ids).loss
    out.backward()
    torch.manual_seed(1)
    expected = ref(input_ids=ids, labels=ids).loss
    expected.backward()
    _assert_same(out, expected, m, ref)
    assert counters["peftcompile"][f"fused_{cfg.name}"] == 14 and counted("skipped_") == 0
