"""The ``peftcompile`` torch.compile backend and its lowering pass (passes/lower.py).

Most tests compile with ``options={"peftcompile.compiler": "aot_eager"}``: the same
lowering and aot_autograd (so the fused ops' autograd is what runs), without inductor's
C++ builds, which take tens of seconds per graph on a shared 2-core machine. The inductor
path itself (decomposed and opaque ops) is checked on small MLPs.
Tolerances: fp32 throughout; the fused ops reorder the same fp32 math, so 1e-5 relative.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import peftcompile as pc
from peftcompile.api import site_adapters
from peftcompile.backend import peftcompile_backend

from conftest import FAST, CountingBackend, compile_fast, counted, param_grads, token_ids, MLP, VOCAB, FunctionalMLP, hf_output, randomize_adapters_, tiny_bert, tiny_gpt2, tiny_llama

# RaSA on a module without repeated layers warns that its groups have one site; expected here.
pytestmark = [pytest.mark.filterwarnings("ignore:.*has a single site"), pytest.mark.usefixtures("fresh_dynamo")]

ATOL, RTOL = 1e-5, 1e-5
# Dropout off (outputs are compared with eager); ``layers`` kept small: dynamo's tracing time
# grows with the depth, and one layer exercises every site kind. RaSA needs 2 (sharing).
NO_DROPOUT = {
    "llama": lambda layers=1: tiny_llama(num_hidden_layers=layers),
    "gpt2": lambda layers=1: tiny_gpt2(n_layer=layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "bert": lambda layers=1: tiny_bert(num_hidden_layers=layers, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0),
}
# (model, method config, layers, sites expected to fuse): all-linear leaves out the LM head.
TEST_CASES = [
    ("llama", pc.LoRA(r=4, alpha=8), 1, 7),
    ("llama", pc.GraLoRA(r=4, k=2, hybrid_r=2), 1, 7),
    ("llama", pc.RaSA(r=4, k=1), 2, 14),
    ("gpt2", pc.LoRA(r=4, alpha=8), 1, 4),  # HF Conv1D: addmm on a [in, out] weight
    ("gpt2", pc.GraLoRA(r=4, k=2), 1, 4),
    ("gpt2", pc.RaSA(r=4, k=2), 2, 8),
    ("bert", pc.LoRA(r=4, alpha=8), 1, 7),  # 6 per layer + the pooler
    ("bert", pc.GraLoRA(r=4, k=2, hybrid_r=2), 1, 7),
]






def _adapted(kind: str, cfg, targets="all-linear", layers: int = 1):
    m = NO_DROPOUT[kind](layers)
    pc.adapt(m, pc.AdapterSpec(cfg, targets=targets))
    randomize_adapters_(m, std=0.1)
    return m




def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()




def _assert_grads_equal(a, b) -> None:
    ga, gb = param_grads(a), param_grads(b)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=ATOL, rtol=RTOL, msg=lambda m: f"{k}: {m}")








# ---------------------------------------------------------------- lowering + parity
@pytest.mark.parametrize("kind,cfg,layers,n_sites", TEST_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_lowering_fuses_every_site_and_matches_eager(kind, cfg, layers, n_sites):
    model = _adapted(kind, cfg, layers=layers)
    assert len(list(site_adapters(model))) == n_sites
    ref = copy.deepcopy(model)
    ids = token_ids()
    out = hf_output(compile_fast(model)(ids))
    _loss(out).backward()
    assert counters["peftcompile"][f"fused_{cfg.name}"] == n_sites
    assert counted("skipped_") == 0
    assert not counters["graph_break"], dict(counters["graph_break"])
    expected = hf_output(ref(ids))
    _loss(expected).backward()
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    _assert_grads_equal(model, ref)


def test_fused_op_is_in_the_compiled_graph():
    """The rewritten graph holds the op, not the reference math (checked on the graph itself)."""
    seen = []

    def spy(gm, example_inputs):
        out = peftcompile_backend(gm, example_inputs, options=FAST)
        seen.append([n.target for n in gm.graph.nodes if n.op == "call_function"])
        return out

    model = _adapted("gpt2", pc.GraLoRA(r=4, k=2, hybrid_r=2), targets=["c_attn"])
    torch.compile(model, backend=spy)(token_ids())
    targets = seen[0]
    assert targets.count(torch.ops.peftcompile.block_lowrank_linear.default) == 1
    assert torch.addmm not in targets[:targets.index(torch.ops.peftcompile.block_lowrank_linear.default)]
    assert torch.einsum not in targets  # the delta's einsums are gone


def test_functional_site_and_plain_module():
    """F.linear sites on parameters not named ``weight`` (whole-graph capture)."""
    model = FunctionalMLP()
    pc.adapt(model, pc.AdapterSpec(pc.RaSA(r=4, k=1), targets="all-linear"))
    randomize_adapters_(model, std=0.1)
    ref = copy.deepcopy(model)
    x = torch.randn(3, 5, 16)
    out = compile_fast(model)(x)
    _loss(out).backward()
    _loss(ref(x)).backward()
    assert counters["peftcompile"]["fused_rasa"] == 2
    torch.testing.assert_close(out, ref(x), atol=ATOL, rtol=RTOL)
    _assert_grads_equal(model, ref)


# dtype -> (atol, rtol) for outputs and grads through the backend vs eager. bf16: the fused op
# rounds the base and the delta once, eager rounds y, the delta and the sum separately.
DTYPE_TOL = {torch.float32: (ATOL, RTOL), torch.bfloat16: (3e-2, 3e-2)}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
@pytest.mark.parametrize("cfg", [pc.LoRA(r=8), pc.GraLoRA(r=8, k=4, hybrid_r=2), pc.RaSA(r=8, k=2)], ids=repr)
def test_odd_shapes_and_dtypes(cfg, dtype):
    """Odd token counts and a 3-D input through a plain module, in fp32 and bf16."""
    atol, rtol = DTYPE_TOL[dtype]
    model = MLP(d_in=24, d_hidden=40, d_out=8).to(dtype)
    pc.adapt(model, pc.AdapterSpec(cfg, targets="all-linear"))
    randomize_adapters_(model, std=0.1)
    ref = copy.deepcopy(model)
    x = torch.randn(3, 7, 24, dtype=dtype)
    out = compile_fast(model)(x)
    _loss(out).backward()
    expected = ref(x)
    _loss(expected).backward()
    assert counters["peftcompile"][f"fused_{cfg.name}"] == 2
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    ga, gb = param_grads(model), param_grads(ref)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def test_mixed_dtypes_are_fused():
    """fp32 adapters on a bf16 base: the op casts x to the adapter dtype and the delta back, as
    eager does (more cases in test_backend_fused.py)."""
    model = MLP().to(torch.bfloat16)
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(r=4), targets=["fc1"]))
    model.fc1.peftcompile.float()
    randomize_adapters_(model, std=0.1)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    out = compile_fast(model)(x)
    assert counters["peftcompile"]["fused_lora"] == 1 and counted("skipped_") == 0
    torch.testing.assert_close(out, model(x))


def test_autocast_is_fused():
    """Under autocast the base linear runs in bf16 on fp32 tensors: the lowering casts explicitly."""
    model = MLP()
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(r=4), targets="all-linear"))
    randomize_adapters_(model, std=0.1)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compile_fast(model)(x)
        expected = model(x)
    assert counters["peftcompile"]["fused_lora"] == 2 and counted("skipped_") == 0
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_malformed_tag_is_skipped_not_fatal():
    """A region whose tag cannot be parsed stays as it is; the compile goes on."""
    model = MLP()
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(r=4), targets=["fc1"]))
    randomize_adapters_(model, std=0.1)
    model.fc1.peftcompile["default"]._tag["config"] = "{not json"
    x = torch.randn(4, 16)
    out = compile_fast(model)(x)
    assert counters["peftcompile"]["skipped_lora"] == 1
    torch.testing.assert_close(out, model(x))


class Twice(torch.nn.Module):
    """One linear applied twice: two regions with the same (site, adapter) tag, chained."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.fc(x))


def test_site_called_twice_gives_two_regions():
    model = Twice()
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(r=4), targets=["fc"]))
    randomize_adapters_(model, std=0.1)
    x = torch.randn(3, 16)
    out = compile_fast(model)(x)
    assert counters["peftcompile"]["fused_lora"] == 2 and counted("skipped_") == 0
    fc, a = model.fc, model.fc.peftcompile["default"]
    expected = x
    for _ in range(2):  # the second call's delta reads the first call's adapted output
        expected = F.linear(expected, fc.weight, fc.bias) + expected @ (a.delta_weight()).t()
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)


def test_training_steps_match_eager():
    model = _adapted("llama", pc.GraLoRA(r=4, k=2))
    ref = copy.deepcopy(model)
    compiled = compile_fast(model)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (model, ref)]
    losses = []
    ids = token_ids()  # one batch: the loss must go down
    for _ in range(4):
        pair = []
        for m, opt in zip((compiled, ref), opts):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(hf_output(m(ids))[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair)
    got, want = zip(*losses)
    assert got == pytest.approx(want, rel=1e-5)
    assert want[-1] < want[0]  # it trains


# ---------------------------------------------------------------- inductor
@pytest.mark.parametrize("decompose", ["auto", False])
def test_inductor_path(decompose):
    """Default compiler. On CPU ("auto") the ops decompose into their reference math inside
    aot_autograd, so inductor generates code for them; with decompose=False they stay opaque
    (as the CUDA kernels do) and the generated code calls them."""
    from torch._inductor.utils import run_and_get_code

    model = MLP()
    pc.adapt(model, pc.AdapterSpec(pc.GraLoRA(r=4, k=2, hybrid_r=2), targets="all-linear"))
    randomize_adapters_(model, std=0.1)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="peftcompile", options={"peftcompile.decompose": decompose})
    x = torch.randn(2, 3, 16)

    def fwd_bwd():
        out = compiled(x)
        _loss(out).backward()
        return out

    out, code = run_and_get_code(fwd_bwd)
    _loss(ref(x)).backward()
    assert counters["peftcompile"]["fused_gralora"] == 2
    torch.testing.assert_close(out, ref(x), atol=ATOL, rtol=RTOL)
    _assert_grads_equal(model, ref)
    calls = [ln for c in code for ln in c.splitlines() if "= torch.ops.peftcompile." in ln]
    assert bool(calls) == (decompose is False), calls


def test_model_without_adapters_is_plain_inductor():
    model = MLP()
    x = torch.randn(4, 16)
    out = torch.compile(model, backend="peftcompile")(x)
    torch.testing.assert_close(out, model(x))
    assert not counters["peftcompile"]


def test_backend_is_found_by_name_with_or_without_the_entry_point(monkeypatch):
    """Imported from a checkout, the module registers itself; pip-installed, dynamo loads it from
    the ``torch_dynamo_backends`` entry point on the first lookup. Both must give our function."""
    from torch._dynamo.backends import registry

    assert registry.lookup_backend("peftcompile") is peftcompile_backend

    class EntryPoint:  # what importlib.metadata gives dynamo for pyproject's entry point
        name = "peftcompile"

        def load(self):
            return peftcompile_backend

    monkeypatch.delitem(registry._COMPILER_FNS, "peftcompile")
    monkeypatch.setitem(registry._BACKENDS, "peftcompile", EntryPoint())
    assert registry.lookup_backend("peftcompile") is peftcompile_backend


def test_bad_option_names_the_fix():
    # dynamo wraps what a backend raises in BackendCompilerFailed, keeping the message
    with pytest.raises(Exception, match="peftcompile.compiler'] must be 'inductor' or 'aot_eager'"):
        torch.compile(MLP(), backend="peftcompile", options={"peftcompile.compiler": "tvm"})(torch.randn(2, 16))
    with pytest.raises(Exception, match="unknown peftcompile backend options"):
        torch.compile(MLP(), backend="peftcompile", options={"peftcompile.fuze": True})(torch.randn(2, 16))


# ---------------------------------------------------------------- skipped regions stay correct
def test_trainable_base_weight_is_left_as_reference_math():
    model = _adapted("llama", pc.LoRA(r=4), targets=["q_proj"], layers=2)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    ref = copy.deepcopy(model)
    ids = token_ids()
    out = hf_output(compile_fast(model)(ids))
    _loss(out).backward()
    _loss(hf_output(ref(ids))).backward()
    assert counters["peftcompile"]["skipped_lora"] == 1 and counters["peftcompile"]["fused_lora"] == 1
    _assert_grads_equal(model, ref)  # includes the base weight's grad


def test_two_active_adapters_of_two_methods_on_one_site():
    """y + d_a + d_b of different methods: the first add sits on the base linear and fuses; the
    second stays (same-method adapters share one op: test_backend_fused.py)."""
    model = NO_DROPOUT["llama"]()
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(r=4), targets=["v_proj"]), "a")
    pc.adapt(model, pc.AdapterSpec(pc.GraLoRA(r=4, k=2), targets=["v_proj"]), "b")
    pc.set_active(model, ["a", "b"])
    randomize_adapters_(model, std=0.1)
    ref = copy.deepcopy(model)
    ids = token_ids()
    out = hf_output(compile_fast(model)(ids))
    assert counters["peftcompile"]["fused_lora"] == 1 and counters["peftcompile"]["skipped_gralora"] == 1
    torch.testing.assert_close(out, hf_output(ref(ids)), atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------- dynamo behaviour
@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_no_graph_breaks(kind):
    model = _adapted(kind, pc.GraLoRA(r=4, k=2, hybrid_r=2, dropout=0.1))
    model.train()
    exp = torch._dynamo.explain(model)(token_ids())
    assert exp.graph_break_count == 0, exp.break_reasons
    assert exp.graph_count == 1


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_generate_prefill_and_cached_decode(kind):
    model = _adapted(kind, pc.LoRA(r=4, alpha=8)).eval()
    ids = token_ids(seq=6, batch=1)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False)
    backend = CountingBackend()
    model.forward = torch.compile(model.forward, backend=backend)
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert 2 <= backend.frames <= 3  # prefill, first decode step, then one dynamic decode graph
    assert counted("fused_") == backend.frames * len(list(site_adapters(model)))


def test_sequence_length_change_does_not_recompile_per_length():
    model = _adapted("llama", pc.RaSA(r=4, k=1), layers=2)
    ref = copy.deepcopy(model)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    for seq in (5, 7, 9, 12, 16):
        ids = token_ids(seq=seq)
        out = hf_output(compiled(ids))
        torch.testing.assert_close(out, hf_output(ref(ids)), atol=ATOL, rtol=RTOL)
    assert backend.frames == 2  # static first shape, then one graph with a symbolic length
    assert counted("fused_") == 2 * 14 and counted("skipped_") == 0  # the pass also fuses the dynamic graph


def test_reloading_adapter_weights_does_not_recompile(tmp_path):
    model = _adapted("gpt2", pc.GraLoRA(r=4, k=2))
    other = copy.deepcopy(model)
    randomize_adapters_(other, std=0.1, seed=1)
    pc.save_adapters(other, tmp_path / "other")
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    ids = token_ids()
    before = hf_output(compiled(ids))
    pc.load_adapters(model, tmp_path / "other", name="default")
    after = hf_output(compiled(ids))
    with torch.no_grad():  # and copying into the parameters directly
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(0.5)
    halved = hf_output(compiled(ids))
    assert backend.frames == 1
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, hf_output(other(ids)), atol=ATOL, rtol=RTOL)
    ref = copy.deepcopy(model)
    torch.testing.assert_close(halved, hf_output(ref(ids)), atol=ATOL, rtol=RTOL)


def test_set_active_switch():
    model = NO_DROPOUT["bert"]()
    pc.adapt(model, pc.AdapterSpec(pc.LoRA(r=4), targets=["query", "value"]), "a")
    pc.adapt(model, pc.AdapterSpec(pc.GraLoRA(r=4, k=2), targets=["query", "value"]), "b")
    randomize_adapters_(model, std=0.1)
    pc.set_active(model, "a")
    compiled = compile_fast(model)
    ids = token_ids()
    outs = {}
    for name in ("a", "b", "a"):
        pc.set_active(model, name)
        outs[name] = hf_output(compiled(ids))
        torch.testing.assert_close(outs[name], hf_output(model(ids)), atol=ATOL, rtol=RTOL)
    assert not torch.allclose(outs["a"], outs["b"])
    # one graph per structure (LoRA r4, GraLoRA r4 k2); switching back to "a" reuses its graph
    assert counters["peftcompile"]["fused_lora"] == 2 and counters["peftcompile"]["fused_gralora"] == 2


def test_dropout_only_in_train():
    model = _adapted("llama", pc.LoRA(r=4, dropout=0.5), targets=["q_proj", "v_proj", "down_proj"])
    compiled = compile_fast(model)
    ids = token_ids()
    model.eval()
    eval_out = hf_output(compiled(ids))
    torch.testing.assert_close(eval_out, hf_output(model(ids)), atol=ATOL, rtol=RTOL)
    assert counters["peftcompile"]["fused_lora"] == 3 and counted("skipped_") == 0
    model.train()
    t1, t2 = hf_output(compiled(ids)), hf_output(compiled(ids))
    assert counters["peftcompile"]["fused_lora"] == 6 and counted("skipped_") == 0  # active dropout: op reads its output
    assert not torch.allclose(t1, t2) and not torch.allclose(t1, eval_out)
    model.eval()
    torch.testing.assert_close(hf_output(compiled(ids)), eval_out)
