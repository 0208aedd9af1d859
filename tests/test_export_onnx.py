"""ONNX export (peftcompile.export): merged and unmerged files checked against onnxruntime (CPU EP).

Each (method, model) case is exported once (module-scoped cache) and shared by its tests:
an unmerged file (adapter = named graph inputs with zero defaults), a merged file, and a plain
export of the base model. Adapters are random and non-zero, and a second adapter of the same
spec (other values) is bound at run time.

Dynamic batch/sequence axes: the cases in DYNAMIC (one method per HF model, every MLP case)
export with them (batch 2 x seq 7) and are checked at batch 3 x seq 11. The other cases export
static shapes and are checked on other values of the same shape: symbolic batch/seq axes make
an HF export 2.5-3x slower (tiny Llama, unmerged LoRA: 9.5 s vs 2.8 s on a loaded 2-core box),
and the export path is the same.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import MLP, hf_output, randomize_adapters_, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn

import peftcompile as pc
from peftcompile.state import adapter_params
from peftcompile.export import (
    OnnxExport,
    OnnxExportError,
    OrtAdapterSession,
    read_metadata,
    to_onnx,
    write_ort_adapter,
)

TOL = 1e-4  # max relative error, fp32

METHODS = {
    "lora": pc.LoRA(r=4, alpha=8.0),
    "gralora": pc.GraLoRA(r=4, k=2, alpha=8.0, hybrid_r=2),
    "rasa": pc.RaSA(r=4, k=1, alpha=8.0),
}


def _ids(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 100 + seq + 7 * seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _x(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(batch + 2, 16, generator=torch.Generator().manual_seed(batch + 7 * seed))}


# family: (factory, targets, inputs(batch, seq)). Target subsets keep exports small but cover
# nn.Linear and GPT-2's transposed Conv1D; RaSA groups span both layers of each model.
MODELS = {
    "mlp": (MLP, "all-linear", _x),
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"], _ids),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"], _ids),
    "bert": (tiny_bert, ["query", "value", "intermediate.dense"], _ids),
}
CASES = [(m, f) for f in MODELS for m in METHODS]
DYNAMIC = {("lora", "llama"), ("rasa", "gpt2"), ("gralora", "bert")} | {(m, "mlp") for m in METHODS}


def torch_out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    kw = dict(inputs)
    if hasattr(model, "config"):  # HF: the no-cache forward, as exported
        kw["use_cache"] = False
    with torch.no_grad():
        out = model(**kw)
    return out if isinstance(out, torch.Tensor) else hf_output(out)


def rel(got, want: torch.Tensor) -> float:
    return float((torch.as_tensor(np.asarray(got)) - want).abs().max() / want.abs().max())


def first(outputs: dict) -> np.ndarray:
    return next(iter(outputs.values()))


@dataclass
class Case:
    method: str
    family: str
    dynamic: bool
    model: nn.Module
    other: nn.Module  # same base and spec, other adapter values
    check: dict[str, torch.Tensor]
    ref: torch.Tensor
    ref_other: torch.Tensor
    ref_base: torch.Tensor
    state_before: dict[str, torch.Tensor]
    unmerged: OnnxExport
    merged: OnnxExport
    base: OnnxExport
    other_dir: Path  # save_adapters folder of `other`
    other_ort: Path  # `other` in onnxruntime's adapter format


_BASE_MODELS: dict[str, nn.Module] = {}
_BASES: dict[tuple[str, bool], OnnxExport] = {}
_CASES: dict[tuple[str, str], Case] = {}


def base_model(family: str) -> nn.Module:
    if family not in _BASE_MODELS:
        torch.manual_seed(0)
        _BASE_MODELS[family] = MODELS[family][0]().eval()
    return _BASE_MODELS[family]


def _base_export(family: str, dynamic: bool, root: Path) -> OnnxExport:
    if (family, dynamic) not in _BASES:
        make = MODELS[family][2]
        _BASES[family, dynamic] = to_onnx(base_model(family), make(2, 7), root / f"{family}.{dynamic}.base.onnx",
                                          dynamic_axes="auto" if dynamic else None, allow_plain=True)
    return _BASES[family, dynamic]


def get_case(method: str, family: str, tmp_path_factory) -> Case:
    key = (method, family)
    if key not in _CASES:
        root = tmp_path_factory.mktemp(f"{method}_{family}")
        dynamic = key in DYNAMIC
        axes = "auto" if dynamic else None
        base_exp = _base_export(family, dynamic, tmp_path_factory.getbasetemp())
        _, targets, make = MODELS[family]
        model = copy.deepcopy(base_model(family))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # RaSA on the MLP: single-site groups
            pc.adapt(model, pc.AdapterSpec(METHODS[method], targets))
        randomize_adapters_(model, seed=0)
        other = copy.deepcopy(model)
        randomize_adapters_(other, seed=1)
        state_before = {k: v.clone() for k, v in model.state_dict().items()}
        check = make(3, 11) if dynamic else make(2, 7, seed=1)
        with pc.disabled(model):
            ref_base = torch_out(model, check)
        unmerged = to_onnx(model, make(2, 7), root / "unmerged.onnx", merged=False, dynamic_axes=axes)
        merged = to_onnx(model, make(2, 7), root / "merged.onnx", merged=True, dynamic_axes=axes)
        other_dir = pc.save_adapters(other, root / "other_adapter")
        other_ort = write_ort_adapter(
            root / "other.onnx_adapter", dict(adapter_params(other, "default")), export=unmerged
        )
        _CASES[key] = Case(method, family, dynamic, model, other, check, torch_out(model, check), torch_out(other, check),
                           ref_base, state_before, unmerged, merged, base_exp, other_dir, other_ort)
    return _CASES[key]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{f}" for m, f in CASES])
def case(request, tmp_path_factory) -> Case:
    return get_case(*request.param, tmp_path_factory)


# ----------------------------------------------------------------------------- parity

def test_unmerged_matches_pytorch_with_its_adapter_and_another(case: Case):
    sess = OrtAdapterSession(case.unmerged.path)
    assert rel(first(sess.bind(case.unmerged.sidecar).run(case.check)), case.ref) <= TOL
    # A second adapter of the same spec, bound at run time without re-export.
    assert rel(case.ref_other, case.ref) > 1e-2, "the two adapters must differ for this test to mean anything"
    assert rel(first(sess.bind(case.other_dir).run(case.check)), case.ref_other) <= TOL
    assert rel(first(sess.bind(case.other).run(case.check)), case.ref_other) <= TOL


def test_two_adapters_swap_on_one_onnxruntime_session(case: Case):
    """onnxruntime's own LoraAdapter + RunOptions.add_active_adapter on a plain InferenceSession."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(case.unmerged.path), so, providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in case.check.items()}
    for file, want in [(case.unmerged.ort_adapter, case.ref), (case.other_ort, case.ref_other),
                       (case.unmerged.ort_adapter, case.ref)]:
        adapter = ort.LoraAdapter()
        adapter.Load(str(file))
        ro = ort.RunOptions()
        ro.add_active_adapter(adapter)
        assert rel(sess.run(None, feeds, ro)[0], want) <= TOL, file
    # No adapter bound: the zero defaults make it the base model.
    assert rel(sess.run(None, feeds)[0], case.ref_base) <= TOL


def test_unbound_file_runs_as_base_model(case: Case):
    sess = OrtAdapterSession(case.unmerged.path)
    assert rel(first(sess.run(case.check)), case.ref_base) <= TOL
    assert rel(case.ref, case.ref_base) > 1e-2
    inits = {t.name: tuple(t.dims) for t in onnx.load(str(case.unmerged.path)).graph.initializer}
    for name, a in case.unmerged.adapter_inputs.items():
        assert inits[name] == a.default_shape, name
        if case.method == "gralora":  # zero-valued, full shape (the registry entry has zero_rank_default=False)
            assert a.default_shape == a.shape
        else:  # zero rank
            assert 0 in a.default_shape and a.default_shape != a.shape


def test_merged_matches_pytorch_and_the_unmerged_file(case: Case):
    got_merged = first(OrtAdapterSession(case.merged.path).run(case.check))
    assert rel(got_merged, case.ref) <= TOL
    got_unmerged = first(OrtAdapterSession(case.unmerged.path).bind(case.unmerged.ort_adapter).run(case.check))
    assert rel(got_merged, torch.as_tensor(got_unmerged)) <= TOL


def test_base_export_matches_pytorch(case: Case):
    assert rel(first(OrtAdapterSession(case.base.path).run(case.check)), case.ref_base) <= TOL


# ----------------------------------------------------------------------------- graphs and names

def _adapter_nodes(path: Path) -> list[str]:
    """Nodes the exporter attributes to a peftcompile SiteAdapter(s) module."""
    g = onnx.load(str(path)).graph
    return [n.name for n in g.node
            if any(p.key == "pkg.torch.onnx.class_hierarchy" and "peftcompile.modules.SiteAdapter" in p.value
                   for p in n.metadata_props)]


def test_merged_graph_is_the_base_graph(case: Case):
    merged = onnx.load(str(case.merged.path)).graph
    base = onnx.load(str(case.base.path)).graph
    assert {t.name: tuple(t.dims) for t in merged.initializer} == {t.name: tuple(t.dims) for t in base.initializer}
    assert [i.name for i in merged.input] == [i.name for i in base.input]
    assert len(merged.node) == len(base.node)
    assert _adapter_nodes(case.merged.path) == []
    assert _adapter_nodes(case.unmerged.path), "positive control: the unmerged graph keeps its adapter nodes"


def test_adapter_inputs_have_stable_names(case: Case):
    saved = load_file(str(case.other_dir / "adapter_model.safetensors"))
    assert set(case.unmerged.adapter_inputs) == set(saved)  # the keys of save_adapters
    g = onnx.load(str(case.unmerged.path)).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.input}
    assert set(case.unmerged.adapter_inputs) <= set(inputs)
    if case.family == "mlp":
        assert inputs["x"] == ["batch", 16]
    else:
        assert inputs["input_ids"] == (["batch", "sequence"] if case.dynamic else [2, 7])
    if (case.method, case.family) == ("lora", "llama"):
        assert "model.layers.0.self_attn.q_proj.lora_A" in inputs
    if (case.method, case.family) == ("rasa", "llama"):
        assert "shared.model.layers.*.self_attn.q_proj.rasa_A_shared" in inputs
    meta = read_metadata(case.unmerged.path)
    assert meta["adapter"] == "default" and meta["merged"] is False
    assert meta["specs"]["default"]["method"]["method"] == case.method
    side = load_file(str(case.unmerged.sidecar))
    for k, t in side.items():
        assert torch.equal(t, adapter_params(case.model, "default")[k].detach())


def test_export_leaves_the_model_unchanged(case: Case):
    after = case.model.state_dict()
    assert after.keys() == case.state_before.keys()
    assert all(torch.equal(after[k], v) for k, v in case.state_before.items())
    assert pc.adapters_of(case.model)  # merged export worked on a copy
    assert rel(torch_out(case.model, case.check), case.ref) == 0.0


# ----------------------------------------------------------------------------- options

def test_gralora_zero_rank_defaults_on_request(tmp_path):
    torch.manual_seed(0)
    m = MLP().eval()
    pc.adapt(m, pc.AdapterSpec(METHODS["gralora"]))
    randomize_adapters_(m)
    x = {"x": torch.randn(5, 16)}
    exp = to_onnx(m, {"x": torch.randn(2, 16)}, tmp_path / "g.onnx", merged=False, defaults="zero-rank")
    shapes = {k.rsplit(".", 1)[1]: a.default_shape for k, a in exp.adapter_inputs.items() if k.startswith("fc1.")}
    assert shapes == {"gralora_A": (2, 8, 0), "gralora_B": (2, 0, 16), "gralora_A_hybrid": (0, 16),
                      "gralora_B_hybrid": (32, 0)}
    sess = OrtAdapterSession(exp.path)
    with pc.disabled(m):
        assert rel(first(sess.run(x)), torch_out(m, x)) <= TOL
    assert rel(first(sess.bind(exp.ort_adapter).run(x)), torch_out(m, x)) <= TOL


def test_training_model_exports_in_eval_mode_and_stays_in_training(tmp_path):
    """Adapter dropout must not be baked into the file; the caller's train() state survives."""
    torch.manual_seed(0)
    m = MLP()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, dropout=0.5)))
    randomize_adapters_(m)
    m.train()
    exp = to_onnx(m, torch.randn(2, 16), tmp_path / "t.onnx", merged=False)
    assert m.training and all(mod.training for mod in m.modules())
    x = {"x": torch.randn(5, 16)}
    got = first(OrtAdapterSession(exp.path).bind(exp.sidecar).run(x))
    m.eval()
    assert rel(got, torch_out(m, x)) <= TOL


# ----------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def mlp_case(tmp_path_factory) -> Case:
    return get_case("lora", "mlp", tmp_path_factory)


def test_model_without_adapters_is_refused_unless_allow_plain(tmp_path):
    with pytest.raises(pc.AdapterError, match="no peftcompile adapters.*allow_plain=True"):
        to_onnx(MLP(), torch.randn(2, 16), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    # allow_plain=True exports the base: checked against PyTorch in test_base_export_matches_pytorch.


def test_bind_adapter_of_wrong_rank_fails_before_running(mlp_case: Case):
    wrong = copy.deepcopy(base_model("mlp"))
    pc.adapt(wrong, pc.AdapterSpec(pc.LoRA(r=8, alpha=16.0)))
    sess = OrtAdapterSession(mlp_case.unmerged.path)
    tensors = dict(adapter_params(wrong, "default"))
    with pytest.raises(pc.AdapterError, match=r"shape mismatch: fc1\.lora_A: \(8, 16\) vs graph \(4, 16\)"):
        sess.bind(tensors)
    with pytest.raises(pc.AdapterError, match="exported for"):  # the model records its spec
        sess.bind(wrong)
    file = mlp_case.unmerged.path.with_name("wrong.onnx_adapter")
    with pytest.raises(pc.AdapterError, match=r"shape mismatch: fc1\.lora_A: \(8, 16\) vs graph \(4, 16\)"):
        write_ort_adapter(file, tensors, export=mlp_case.unmerged)  # the stamped writer checks first
    assert not file.exists()
    with pytest.raises(pc.AdapterError, match="not stamped for an export.*write_ort_adapter"):
        sess.bind(write_ort_adapter(file, tensors))  # unstamped: plain onnxruntime use only
    with pytest.raises(pc.AdapterError, match="shape mismatch"):  # stamped by hand: bind still checks shapes
        sess.bind(stamp_by_hand(file, mlp_case.unmerged.fingerprint))
    assert sess.bound is None


def stamp_by_hand(file: Path, fingerprint: int) -> Path:
    """Forge an export's stamp on an .onnx_adapter without write_ort_adapter's checks."""
    fmt = ort.AdapterFormat.read_adapter(str(file))
    fmt.set_model_version(fingerprint)
    fmt.export_adapter(str(file))
    return file


def test_bind_adapter_of_other_spec_with_same_shapes_fails(mlp_case: Case, tmp_path):
    """Same shapes, other alpha: the scaling baked into the graph would be wrong."""
    other = copy.deepcopy(base_model("mlp"))
    pc.adapt(other, pc.AdapterSpec(pc.LoRA(r=4, alpha=32.0)))
    sess = OrtAdapterSession(mlp_case.unmerged.path)
    with pytest.raises(pc.AdapterError, match="exported for"):
        sess.bind(pc.save_adapters(other, tmp_path / "a"))
    with pytest.raises(pc.AdapterError, match="exported for"):
        sess.bind(other)


def test_bind_missing_or_unknown_tensors_fails(mlp_case: Case):
    sess = OrtAdapterSession(mlp_case.unmerged.path)
    good = dict(adapter_params(mlp_case.model, "default"))
    bad = dict(good)
    bad.pop("fc2.lora_B")
    bad["fc3.lora_A"] = torch.zeros(4, 16)
    with pytest.raises(pc.AdapterError, match=r"missing: \['fc2.lora_B'\].*not inputs of this graph: \['fc3.lora_A'\]"):
        sess.bind(bad)
    with pytest.raises(ValueError, match="bind adapters with .bind"):
        sess.run({**mlp_case.check, **{k: v.detach().numpy() for k, v in good.items()}})
    assert rel(first(sess.bind(good).run(mlp_case.check)), mlp_case.ref) <= TOL


def test_bfloat16_adapter_file_is_checked_by_dtype(mlp_case: Case, tmp_path):
    """.onnx_adapter carries bfloat16 (numpy cannot); a float32 graph refuses it before running."""
    good = {k: t.detach() for k, t in adapter_params(mlp_case.model, "default").items()}
    bf16 = {k: t.to(torch.bfloat16) for k, t in good.items()}
    with pytest.raises(pc.AdapterError, match=r"dtype mismatch: fc1\.lora_A: bfloat16 vs graph float32"):
        write_ort_adapter(tmp_path / "bf16.onnx_adapter", bf16, export=mlp_case.unmerged)
    file = stamp_by_hand(write_ort_adapter(tmp_path / "bf16.onnx_adapter", bf16), mlp_case.unmerged.fingerprint)
    params = ort.AdapterFormat.read_adapter(str(file)).get_parameters()
    assert {k: (tuple(v.shape()), v.data_type()) for k, v in params.items()} == {
        k: (tuple(t.shape), "tensor(bfloat16)") for k, t in good.items()}
    sess = OrtAdapterSession(mlp_case.unmerged.path)
    with pytest.raises(pc.AdapterError, match=r"dtype mismatch: fc1\.lora_A: bfloat16 vs graph float32"):
        sess.bind(file)
    with pytest.raises(pc.AdapterError, match="write_ort_adapter"):
        sess.bind({k: t.to(torch.bfloat16) for k, t in good.items()})


def test_merged_file_has_nothing_to_bind(mlp_case: Case):
    with pytest.raises(pc.AdapterError, match="merged"):
        OrtAdapterSession(mlp_case.merged.path).bind(mlp_case.unmerged.sidecar)


def test_session_refuses_files_not_written_by_to_onnx(tmp_path):
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    vi = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in ("x", "y")]
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([node], "g", vi[:1], vi[1:])), tmp_path / "r.onnx")
    with pytest.raises(pc.AdapterError, match="not written by peftcompile"):
        OrtAdapterSession(tmp_path / "r.onnx")


def test_unmerged_export_needs_one_active_unmerged_adapter(tmp_path):
    m = MLP()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2)), "a")
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2)), "b")
    pc.set_active(m, ["a", "b"])
    with pytest.raises(pc.AdapterError, match="exactly one adapter.*2 are active"):
        to_onnx(m, torch.randn(2, 16), tmp_path / "m.onnx", merged=False)
    pc.set_active(m, "a")
    with pytest.raises(pc.AdapterError, match="not active"):
        to_onnx(m, torch.randn(2, 16), tmp_path / "m.onnx", merged=False, adapter="b")
    pc.merge(m)
    with pytest.raises(pc.AdapterError, match="unmerge"):
        to_onnx(m, torch.randn(2, 16), tmp_path / "m.onnx", merged=False)


def test_bad_dynamic_axes(tmp_path):
    m = MLP()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2)))
    with pytest.raises(ValueError, match="size 1 in the example"):
        to_onnx(m, torch.randn(1, 16), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"does not take; inputs: \['x'\]"):
        to_onnx(m, torch.randn(2, 16), tmp_path / "m.onnx", dynamic_axes={"input_ids": {0: "batch"}})
    with pytest.raises(ValueError, match=r"\.onnx"):
        to_onnx(m, torch.randn(2, 16), tmp_path / "m.pt")


@torch.library.custom_op("peftcompile_test::odd_scale", mutates_args=())
def _odd_scale(x: torch.Tensor) -> torch.Tensor:
    return x * 3


@_odd_scale.register_fake
def _(x):
    return torch.empty_like(x)


class _Odd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.peftcompile_test.odd_scale(x)


def test_unsupported_op_is_named_with_its_module(tmp_path):
    m = MLP()
    m.drop = _Odd()  # between fc1 and fc2
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2)))
    # capture traces the plain MLP whole, inlining _Odd's forward, so the op is placed at MLP.
    with pytest.raises(OnnxExportError, match=r"peftcompile_test\.odd_scale\.default \(in MLP\)"
                                              r".*custom_translation_table"):
        to_onnx(m.eval(), torch.randn(2, 16), tmp_path / "m.onnx", merged=False)


# ----------------------------------------------------------------------------- CLI

def test_cli_export_unmerged_with_adapter(tmp_path):
    import typer
    from typer.testing import CliRunner

    from peftcompile.export.cli import export_command
    from peftcompile.models import load_model

    base, _ = load_model("tiny-gpt2")  # the CLI rebuilds the same seeded model
    pc.adapt(base, pc.AdapterSpec(pc.LoRA(r=4, alpha=8.0), ["c_attn"]))
    randomize_adapters_(base)
    pc.save_adapters(base, tmp_path / "adapter")

    app = typer.Typer()
    app.command("export")(export_command)
    app.command("noop")(lambda: None)  # two commands: typer then expects the command name
    out = tmp_path / "g.onnx"
    r = CliRunner().invoke(app, ["export", "tiny-gpt2", "--adapter", str(tmp_path / "adapter"), "-o", str(out),
                                 "--unmerged"])
    assert r.exit_code == 0, r.output
    assert "max rel err" in r.output
    assert out.is_file() and out.with_name("g.onnx_adapter").is_file() and out.with_name("g.adapter.safetensors").is_file()
    assert read_metadata(out)["specs"]["default"]["method"] == pc.LoRA(r=4, alpha=8.0).to_dict()
    r = CliRunner().invoke(app, ["export", "tiny-gpt2", "-o", str(tmp_path / "p.onnx")])
    assert r.exit_code == 2 and "--allow-plain" in r.output
