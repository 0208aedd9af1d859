"""The architecture's promises, checked: no import cycles, no private imports across modules,
no method name outside ``methods/``, and a method added from a test (one folder's worth of
code, one ``register_method`` call) works end to end: adapt, merge, save/load, lower, export.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import peftcompile as pc
from peftcompile.methods import Lowering, Method, MethodConfig, register_method, unregister_method
from peftcompile.methods.lowrank import lowrank, lowrank_weight
from peftcompile.methods.registry import kaiming_, shapes_check

from conftest import MLP, randomize_adapters_, tiny_llama

PKG = Path(pc.__file__).parent
MODULES = sorted(PKG.rglob("*.py"))


def _modname(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names) for the module-level imports of ``path`` inside peftcompile
    (imports inside functions are lazy by design and do not form load-time cycles)."""
    tree = ast.parse(path.read_text())
    name = _modname(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("peftcompile")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("peftcompile"):
                continue
            names = [a.name for a in node.names]
            # "from . import x" imports submodule x
            known = {_modname(p) for p in MODULES}
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in known]
            out += [(s, []) for s in subs] or [(mod, names)]
    return out


def test_no_import_cycles():
    known = {_modname(p) for p in MODULES}
    graph: dict[str, set[str]] = {}
    for p in MODULES:
        deps = set()
        for mod, _ in _module_imports(p):
            # importing a.b.c runs a and a.b first
            parts = mod.split(".")
            deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
        me = _modname(p)
        # a package's own parents run before it, never the other way round: drop self and parents
        graph[me] = {d for d in deps if d != me and not me.startswith(d + ".")}
    # Tarjan-free: DFS with colours, report the first cycle found
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if colour.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if colour.get(d) is None:
                cyc = visit(d)
                if cyc:
                    return cyc
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if colour.get(n) is None:
            cyc = visit(n)
            assert cyc is None, "import cycle: " + " -> ".join(cyc)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for p in MODULES:
        for mod, names in _module_imports(p):
            bad += [f"{_modname(p)}: from {mod} import {n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, bad


# Application code that picks a method by design (the demo fine-tunes with GraLoRA), the
# top-level re-exports of the method configs, and the onnxruntime-genai exporter, whose target
# format *is* the builder's LoRA layout (every method reaches it through Method.as_lora).
_METHOD_NAME_ALLOWED = {"__init__.py", "demo.py", "export/genai.py"}
_IDENT = re.compile(r"lora|rasa", re.IGNORECASE)
# Third-party identifiers that happen to contain a method name (onnxruntime's adapter class).
_THIRD_PARTY = {"LoraAdapter", "as_lora"}  # and the registry's exact-LoRA-form hook
_LITERAL = re.compile(r"\b(lora|gralora|rasa)(_\w+)?\b")
# PEFT's own option values that contain a method name (AdapterSpec.bias="lora_only").
_PEFT_VALUES = {'"lora_only"'}


def _code_tokens(path: Path):
    """Identifiers and non-docstring string literals of a file (comments and docstrings are docs)."""
    src = path.read_text()
    doc_lines = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                doc_lines.add(first.lineno)
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.NAME:
            yield tok.start[0], tok.string, "name"
        elif tok.type == tokenize.STRING and tok.start[0] not in doc_lines:
            yield tok.start[0], tok.string, "string"


def test_no_method_name_outside_methods():
    bad = []
    for p in MODULES:
        rel = p.relative_to(PKG)
        if rel.parts[0] == "methods" or str(rel) in _METHOD_NAME_ALLOWED:
            continue
        for line, text, kind in _code_tokens(p):
            if (kind == "name" and _IDENT.search(text) and text not in _THIRD_PARTY) or (kind == "string" and _LITERAL.search(text) and text not in _PEFT_VALUES):
                bad.append(f"{rel}:{line}: {text[:60]}")
    assert not bad, "method knowledge outside methods/:\n" + "\n".join(bad)


# ----------------------------------------------------------------- a method added by a test
@dataclass(frozen=True)
class Gated(MethodConfig):
    """LoRA with a trainable per-rank gate g: delta = s * ((x A^T) * g) B^T."""

    r: int = field(default=4)
    alpha: float = field(default=8.0)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def _shapes(cfg, in_f, out_f, n=1):
    return {"gated_A": (cfg.r, in_f), "gated_B": (out_f, cfg.r), "gated_g": (cfg.r,)}


def _init(cfg, p, n=1):
    kaiming_(p["gated_A"])
    torch.nn.init.zeros_(p["gated_B"])
    torch.nn.init.ones_(p["gated_g"])


def _delta(x, p, cfg):
    return lowrank(x, p["gated_A"], p["gated_B"], cfg.scaling, p["gated_g"])


def _delta_weight(p, cfg):
    return lowrank_weight(p["gated_A"], p["gated_B"], cfg.scaling, p["gated_g"])


def _lower(emit, x, w, b, p, cfg, xa=None):
    return emit(torch.ops.peftcompile.lowrank_linear.default, x, w, b, p["gated_A"], p["gated_B"], p["gated_g"],
                float(cfg.scaling), xa)


GATED = Method(
    name="gated", config_cls=Gated, shapes=_shapes, init=_init, delta=_delta, delta_weight=_delta_weight,
    check_site=lambda cfg, i, o: None, lowering=Lowering(shapes_check(_shapes), _lower),
    rank_axes={"gated_A": (0,), "gated_B": (1,), "gated_g": (0,)},
    as_lora=lambda p, cfg: (p["gated_A"], p["gated_B"] * p["gated_g"] * cfg.scaling),
)


@pytest.fixture
def gated():
    register_method(GATED)
    yield Gated(r=4, alpha=8.0)
    unregister_method("gated")


def _reference(model_plain, model, x):
    """Base output plus each site's delta, from the method's own math (MLP: fc1 -> relu -> fc2)."""
    a1, a2 = model.fc1.peftcompile["default"], model.fc2.peftcompile["default"]
    h = torch.relu(model_plain.fc1(x) + _delta(x, a1.tensors(), a1.cfg))
    return model_plain.fc2(h) + _delta(h, a2.tensors(), a2.cfg)


def test_registered_method_adapts_merges_saves_and_lowers(gated, tmp_path):
    import copy

    base = MLP()
    model = pc.adapt(copy.deepcopy(base), pc.AdapterSpec(gated, targets="all-linear"))
    randomize_adapters_(model)
    x = torch.randn(5, 16)
    want = _reference(base, model, x)
    got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # exact LoRA form
    a = model.fc1.peftcompile["default"]
    A, B = GATED.as_lora(a.tensors(), a.cfg)
    torch.testing.assert_close(B @ A, a.delta_weight(), rtol=1e-6, atol=1e-7)
    # merge / unmerge
    pc.merge(model)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    pc.unmerge(model)
    torch.testing.assert_close(model.fc1.weight, base.fc1.weight, rtol=0, atol=1e-6)
    # save / load into a fresh copy
    pc.save_adapters(model, tmp_path / "ad")
    other = pc.load_adapters(copy.deepcopy(base), tmp_path / "ad")
    torch.testing.assert_close(other(x), want, rtol=1e-6, atol=1e-6)
    # the backend lowers it through its registered Lowering
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="peftcompile", options={"peftcompile.compiler": "aot_eager"})
    out = compiled(x)
    out.sum().backward()
    assert counters["peftcompile"]["fused_gated"] == 2
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert a.gated_g.grad is not None and a.gated_g.grad.abs().sum() > 0
    torch._dynamo.reset()


def test_registered_method_exports_to_onnx(gated, tmp_path):
    from peftcompile.export import OrtAdapterSession, to_onnx

    model = pc.adapt(tiny_llama(num_hidden_layers=1), pc.AdapterSpec(gated, targets=["q_proj", "v_proj"]))
    randomize_adapters_(model, std=0.1)
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits.numpy()
        with pc.disabled(model):
            base = model(input_ids=ids).logits.numpy()
    exp = to_onnx(model, {"input_ids": ids}, tmp_path / "g.onnx", merged=False)
    # zero-rank defaults from the registered rank axes: unbound = base model
    assert exp.adapter_inputs["model.layers.0.self_attn.q_proj.gated_g"].default_shape == (0,)
    sess = OrtAdapterSession(exp.path)
    assert abs(sess.run({"input_ids": ids.numpy()})["logits"] - base).max() < 1e-4
    got = sess.bind(exp.ort_adapter).run({"input_ids": ids.numpy()})["logits"]
    assert abs(got - want).max() < 1e-4


def test_register_method_rejects_duplicates_and_bad_names(gated):
    with pytest.raises(ValueError, match="already registered"):
        register_method(GATED)
    import dataclasses

    with pytest.raises(ValueError, match="lower-case"):
        register_method(dataclasses.replace(GATED, name="Gated2"))
