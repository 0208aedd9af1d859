"""Trust (issue #11), export half: every bad call of the export API raises AdapterError, and
the target folder (file names + sha256) and the model (state_dict, adapter state, output)
are exactly as before the call.

BAD_CALLS is a table: each row sets up one bad call on a fresh copy of an unmerged export's
folder (model.onnx + model.adapter.safetensors + model.onnx_adapter[.json]). The exports are
made once per module: a tiny MLP with LoRA alpha=8 ("A") and the same shapes with alpha=32
("B": an adapter of B binds to A with no shape error, only the scaling is wrong).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
import torch
from conftest import MLP, randomize_adapters_
from torch import nn

import peftcompile as pc
from peftcompile.export import OnnxExport, OrtAdapterSession, read_adapter_file, read_metadata, to_onnx, write_ort_adapter
from peftcompile.state import adapter_params

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


def _lora_mlp(alpha: float, seed: int) -> nn.Module:
    torch.manual_seed(0)
    m = MLP().eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=alpha)))
    randomize_adapters_(m, seed=seed)
    return m


@dataclass
class Ctx:
    a: nn.Module  # LoRA alpha=8
    b: nn.Module  # LoRA alpha=32, same shapes
    exp_a: OnnxExport
    exp_b: OnnxExport
    merged_a: OnnxExport
    x: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    root = tmp_path_factory.mktemp("trust")
    a, b = _lora_mlp(8.0, 0), _lora_mlp(32.0, 1)
    ex = torch.randn(2, 16)
    return Ctx(a, b, to_onnx(a, ex, root / "a" / "model.onnx", merged=False),
               to_onnx(b, ex, root / "b" / "model.onnx", merged=False),
               to_onnx(a, ex, root / "am" / "model.onnx", merged=True), {"x": torch.randn(5, 16)})


# ----------------------------------------------------------------------------- snapshots

def folder_snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>")
            for p in sorted(d.rglob("*"))}


def model_snapshot(m: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    h = hashlib.sha256()
    for k, v in sorted(m.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    st = pc.state.state_of(m)
    state = None if st is None else (sorted(st.specs), list(st.active),
                                     [(c.site, bool(c.merged)) for _, _, c in pc.state.site_adapters(m)])
    with torch.no_grad():
        out = m(x).numpy().tobytes()
    return {"state_dict": h.hexdigest(), "adapters": state, "output": hashlib.sha256(out).hexdigest(),
            "training": m.training}


# ----------------------------------------------------------------------------- the table

Call = Callable[[], Any]


def _session_bind(d: Path, source: Any) -> Call:
    return lambda: OrtAdapterSession(d / "model.onnx").bind(source)


def _dir_with_config(c: Ctx, d: Path, edit: Callable[[dict], Any]) -> Path:
    src = pc.save_adapters(c.a, d.parent / f"{d.name}-src")
    ad = d / "adapter"
    shutil.copytree(src, ad)
    shutil.rmtree(src)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    new = edit(cfg)
    (ad / "adapter_config.json").write_text(new if isinstance(new, str) else json.dumps(cfg))
    return ad


def _edit_metadata(d: Path, value: str) -> Path:
    m = onnx.load(str(d / "model.onnx"))
    for p in m.metadata_props:
        if p.key == "peftcompile":
            p.value = value
    onnx.save(m, str(d / "model.onnx"))
    return d / "model.onnx"


def _stale_adapter_of(c: Ctx, d: Path) -> Path:
    """The A export's folder after B was exported to the same path, except for A's .onnx_adapter
    (a stale file: a crash, or a hand copy): B's files, A's adapter file next to them."""
    keep = {p.name: p.read_bytes() for p in d.iterdir() if p.name.startswith("model.onnx_adapter")}
    for p in c.exp_b.path.parent.iterdir():
        shutil.copy(p, d / p.name)
    for name, data in keep.items():
        (d / name).write_bytes(data)
    return d / "model.onnx_adapter"


def _other_spec_onnx_adapter(c: Ctx, d: Path) -> Path:
    """B's own .onnx_adapter (and its .json, where the exporter writes one) copied under another name."""
    for p in c.exp_b.path.parent.iterdir():
        if p.name.startswith("model.onnx_adapter"):
            shutil.copy(p, d / p.name.replace("model", "b", 1))
    return d / "b.onnx_adapter"


def _b_tensors(c: Ctx) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in adapter_params(c.b, "default").items()}


def _plain_safetensors(c: Ctx, d: Path) -> Path:
    from safetensors.torch import save_file

    save_file(_b_tensors(c), str(d / "b.safetensors"))
    return d / "b.safetensors"


def _merged_copy(c: Ctx) -> nn.Module:
    m = copy.deepcopy(c.a)
    pc.merge(m)
    return m


def _json_side(d: Path, text: str) -> Path:
    (d / "model.onnx_adapter.json").write_text(text)
    return d / "model.onnx_adapter"


def _mismatched_json(d: Path) -> Path:
    side = d / "model.onnx_adapter.json"
    doc = json.loads(side.read_text()) if side.exists() else {"format": "peftcompile-onnx/1",
                                                            "spec": {"method": {"method": "lora"}}}
    doc["fingerprint"] = 1234567  # not what model.onnx_adapter is stamped with
    side.write_text(json.dumps(doc))
    return d / "model.onnx_adapter"


def _garbage(d: Path, name: str) -> Path:
    (d / name).write_bytes(b"\x00not a real file\xff" * 8)
    return d / name


def _file_in_the_way(d: Path) -> Path:
    (d / "blocker").write_text("a file")
    return d / "blocker" / "sub" / "model.onnx"


# (id, setup(ctx, folder) -> (the bad call, the model it is given or None))
BAD_CALLS: list[tuple[str, Callable[[Ctx, Path], tuple[Call, nn.Module | None]]]] = [
    # --- to_onnx: paths and arguments
    ("export-parent-is-a-file", lambda c, d: (lambda p: (lambda: to_onnx(c.a, torch.randn(2, 16), p, merged=False),
                                                         c.a))(_file_in_the_way(d))),
    ("export-path-is-a-directory", lambda c, d: ((d / "dir.onnx").mkdir(), lambda: to_onnx(
        c.a, torch.randn(2, 16), d / "dir.onnx", merged=False))[1:] + (c.a,)),
    ("export-side-file-path-is-a-directory", lambda c, d: ((d / "new.onnx_adapter").mkdir(), lambda: to_onnx(
        c.a, torch.randn(2, 16), d / "new.onnx", merged=False))[1:] + (c.a,)),
    ("export-path-not-onnx", lambda c, d: (lambda: to_onnx(c.a, torch.randn(2, 16), d / "model.pt"), c.a)),
    ("export-bad-defaults", lambda c, d: (lambda: to_onnx(c.a, torch.randn(2, 16), d / "model.onnx", merged=False,
                                                          defaults="ones"), c.a)),
    ("export-example-inputs-not-tensors", lambda c, d: (lambda: to_onnx(c.a, "x", d / "model.onnx"), c.a)),
    ("export-dynamic-axes-unknown-input", lambda c, d: (lambda: to_onnx(
        c.a, torch.randn(2, 16), d / "model.onnx", dynamic_axes={"input_ids": {0: "batch"}}), c.a)),
    ("export-dynamic-axis-size-1", lambda c, d: (lambda: to_onnx(c.a, torch.randn(1, 16), d / "model.onnx"), c.a)),
    ("export-merged-model-unmerged", lambda c, d: (lambda m: (lambda: to_onnx(m, torch.randn(2, 16), d / "model.onnx",
                                                                              merged=False), m))(_merged_copy(c))),
    ("export-unknown-adapter-name", lambda c, d: (lambda: to_onnx(c.a, torch.randn(2, 16), d / "model.onnx",
                                                                  merged=False, adapter="nope"), c.a)),
    # --- binding: files of another export / spec, stale and unstamped files
    ("bind-onnx-adapter-of-other-spec", lambda c, d: (_session_bind(d, _other_spec_onnx_adapter(c, d)), None)),
    ("bind-stale-onnx-adapter-after-reexport", lambda c, d: (_session_bind(d, _stale_adapter_of(c, d)), None)),
    ("bind-unstamped-onnx-adapter", lambda c, d: (_session_bind(d, write_ort_adapter(d / "u.onnx_adapter",
                                                                                     _b_tensors(c))), None)),
    ("bind-sidecar-of-other-spec", lambda c, d: (
        (shutil.copy(c.exp_b.sidecar, d / "b.adapter.safetensors"),
         _session_bind(d, d / "b.adapter.safetensors"))[1], None)),
    ("bind-safetensors-without-metadata", lambda c, d: (_session_bind(d, _plain_safetensors(c, d)), None)),
    ("bind-model-of-other-spec", lambda c, d: (_session_bind(d, c.b), c.b)),
    ("bind-to-merged-export", lambda c, d: (lambda: OrtAdapterSession(c.merged_a.path).bind(d / "model.onnx_adapter"),
                                            None)),
    ("bind-wrong-rank-tensors", lambda c, d: (_session_bind(d, {k: torch.zeros(8, *v.shape[1:]) if "lora_A" in k else v
                                                                for k, v in _b_tensors(c).items()}), None)),
    ("bind-not-a-source", lambda c, d: (_session_bind(d, 42), None)),
    # --- malformed files
    ("bind-dir-config-malformed-json", lambda c, d: (_session_bind(d, _dir_with_config(c, d, lambda cfg: "{oops")),
                                                     None)),
    ("bind-dir-config-missing-spec", lambda c, d: (_session_bind(d, _dir_with_config(c, d, lambda cfg: cfg.pop("spec"))),
                                                   None)),
    ("bind-dir-config-missing-sites", lambda c, d: (_session_bind(d, _dir_with_config(c, d, lambda cfg: cfg.pop("sites"))),
                                                    None)),
    ("bind-dir-config-unknown-field", lambda c, d: (_session_bind(d, _dir_with_config(
        c, d, lambda cfg: cfg.update(lora_alpha=32))), None)),
    ("bind-dir-config-unknown-method", lambda c, d: (_session_bind(d, _dir_with_config(
        c, d, lambda cfg: cfg["spec"]["method"].update(method="nope"))), None)),
    ("bind-dir-config-is-a-list", lambda c, d: (_session_bind(d, _dir_with_config(c, d, lambda cfg: "[1, 2]")), None)),
    ("bind-onnx-adapter-json-malformed", lambda c, d: (_session_bind(d, _json_side(d, "{not json")), None)),
    ("bind-onnx-adapter-json-mismatched", lambda c, d: (_session_bind(d, _mismatched_json(d)), None)),
    ("bind-garbage-onnx-adapter", lambda c, d: (_session_bind(d, _garbage(d, "g.onnx_adapter")), None)),
    ("bind-garbage-safetensors", lambda c, d: (_session_bind(d, _garbage(d, "g.safetensors")), None)),
    ("bind-missing-file", lambda c, d: (_session_bind(d, d / "nope.onnx_adapter"), None)),
    ("session-metadata-malformed-json", lambda c, d: (lambda p: (lambda: OrtAdapterSession(p), None))(
        _edit_metadata(d, "{oops"))),
    ("session-metadata-missing-adapter-inputs", lambda c, d: (lambda p: (lambda: OrtAdapterSession(p), None))(
        _edit_metadata(d, json.dumps({k: v for k, v in read_metadata(d / "model.onnx").items()
                                      if k != "adapter_inputs"})))),
    ("session-metadata-not-an-object", lambda c, d: (lambda p: (lambda: OrtAdapterSession(p), None))(
        _edit_metadata(d, "[1]"))),
    ("session-missing-file", lambda c, d: (lambda: OrtAdapterSession(d / "nope.onnx"), None)),
    ("session-garbage-file", lambda c, d: (lambda p: (lambda: OrtAdapterSession(p), None))(_garbage(d, "g.onnx"))),
    ("read-metadata-garbage", lambda c, d: (lambda p: (lambda: read_metadata(p), None))(_garbage(d, "g.onnx"))),
    ("read-adapter-file-garbage-safetensors", lambda c, d: (lambda p: (lambda: read_adapter_file(p), None))(
        _garbage(d, "g.safetensors"))),
    ("write-ort-adapter-wrong-suffix", lambda c, d: (lambda: write_ort_adapter(d / "a.bin", _b_tensors(c)), None)),
    ("run-missing-input", lambda c, d: (lambda: OrtAdapterSession(d / "model.onnx").run({"y": np.zeros((2, 16),
                                                                                                     np.float32)}), None)),
]


@pytest.mark.parametrize("setup", [s for _, s in BAD_CALLS], ids=[i for i, _ in BAD_CALLS])
def test_bad_call_raises_adapter_error_and_changes_nothing(setup, ctx: Ctx, tmp_path):
    d = tmp_path / "export"
    shutil.copytree(ctx.exp_a.path.parent, d)
    call, model = setup(ctx, d)
    model = model if model is not None else ctx.a
    files, state = folder_snapshot(d), model_snapshot(model, ctx.x["x"])
    with pytest.raises(pc.AdapterError) as info:
        call()
    msg = str(info.value)
    assert msg and "\n" not in msg.strip(), msg
    assert folder_snapshot(d) == files
    assert model_snapshot(model, ctx.x["x"]) == state


# ----------------------------------------------------------------------------- 1, 2: fingerprints

def _run(path: Path, source: Any, x: dict) -> torch.Tensor:
    return torch.as_tensor(next(iter(OrtAdapterSession(path).bind(source).run(x).values())))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def test_onnx_adapter_is_stamped_with_the_export_fingerprint_and_spec(ctx: Ctx, tmp_path):
    import onnxruntime as ort

    a, b = ctx.exp_a, ctx.exp_b
    assert a.fingerprint != b.fingerprint  # alpha differs, shapes do not
    assert ort.AdapterFormat.read_adapter(str(a.ort_adapter)).get_model_version() == a.fingerprint
    side = json.loads(a.ort_adapter.with_name(a.ort_adapter.name + ".json").read_text())
    assert side["fingerprint"] == a.fingerprint and side["spec"]["method"]["alpha"] == 8.0
    assert read_metadata(a.path)["fingerprint"] == a.fingerprint
    with torch.no_grad():
        want_a = ctx.a(**ctx.x)
    assert _rel(_run(a.path, a.ort_adapter, ctx.x), want_a) <= TOL
    # B's file (same shapes, alpha 32) on A's export: refused, naming both specs.
    with pytest.raises(pc.AdapterError, match=r"alpha': 32\.0.*exported for.*alpha': 8\.0"):
        OrtAdapterSession(a.path).bind(b.ort_adapter)
    # Without the .json (spec unknown), the stamp alone still refuses it.
    lone = shutil.copy(b.ort_adapter, tmp_path / "lone.onnx_adapter")
    with pytest.raises(pc.AdapterError, match=rf"written for another export.*fingerprint {b.fingerprint}.*"
                                              rf"fingerprint {a.fingerprint}"):
        OrtAdapterSession(a.path).bind(lone)


def test_user_written_adapters_go_through_the_stamped_path(ctx: Ctx, tmp_path):
    """write_ort_adapter(..., export=) and OrtAdapterSession.save_adapter stamp; unstamped is refused."""
    sess = OrtAdapterSession(ctx.exp_a.path)
    other = copy.deepcopy(ctx.a)
    randomize_adapters_(other, seed=5)
    tensors = {k: v.detach() for k, v in adapter_params(other, "default").items()}
    with torch.no_grad():
        want = other(**ctx.x)
    unstamped = write_ort_adapter(tmp_path / "u.onnx_adapter", tensors)
    with pytest.raises(pc.AdapterError, match="not stamped.*write_ort_adapter.*save_adapter"):
        sess.bind(unstamped)
    for file in (write_ort_adapter(tmp_path / "w.onnx_adapter", tensors, export=ctx.exp_a),
                 write_ort_adapter(tmp_path / "p.onnx_adapter", tensors, export=ctx.exp_a.path),
                 sess.save_adapter(tmp_path / "s.onnx_adapter", other),
                 sess.save_adapter(tmp_path / "f.onnx_adapter", unstamped)):  # stamping a file written elsewhere
        assert _rel(_run(ctx.exp_a.path, file, ctx.x), want) <= TOL, file
    with pytest.raises(pc.AdapterError, match="exported for"):
        sess.save_adapter(tmp_path / "b.onnx_adapter", ctx.b)  # records its spec: alpha 32
    assert not (tmp_path / "b.onnx_adapter").exists()
    # Rewriting a stamped file unstamped removes its now-contradicting .json.
    write_ort_adapter(tmp_path / "w.onnx_adapter", tensors)
    assert not (tmp_path / "w.onnx_adapter.json").exists()


def test_reexport_with_another_spec_leaves_no_stale_file_that_binds(ctx: Ctx, tmp_path):
    p = tmp_path / "model.onnx"
    ex = torch.randn(2, 16)
    old = to_onnx(ctx.a, ex, p, merged=False)
    keep = tmp_path / "keep"
    keep.mkdir()
    for f in (old.sidecar, old.ort_adapter, old.ort_adapter.with_name(old.ort_adapter.name + ".json")):
        shutil.copy(f, keep / f.name)
    new = to_onnx(ctx.b, ex, p, merged=False)  # same path, alpha 32
    with torch.no_grad():
        want_b = ctx.b(**ctx.x)
    for f in (new.sidecar, new.ort_adapter):  # the side files are the new export's
        assert _rel(_run(p, f, ctx.x), want_b) <= TOL
    for f in keep.iterdir():  # put the old ones back (a crash, a copy, a sync tool)
        shutil.copy(f, tmp_path / f.name)
    for f in (new.sidecar, new.ort_adapter):
        with pytest.raises(pc.AdapterError, match=r"alpha': 8\.0.*exported for.*alpha': 32\.0"):
            OrtAdapterSession(p).bind(f)
    to_onnx(ctx.a, ex, p, merged=True)  # a merged export over it: the old side files stay, but bind nothing
    for f in (new.sidecar, new.ort_adapter):
        with pytest.raises(pc.AdapterError, match="merged"):
            OrtAdapterSession(p).bind(f)


# ----------------------------------------------------------------------------- 3: crash safety

_CHILD = textwrap.dedent("""
    import os, sys, warnings
    warnings.simplefilter("ignore")
    sys.path[:0] = [{repo!r}, {tests!r}]
    import torch
    import peftcompile as pc
    from test_trust_export import _lora_mlp
    from peftcompile.export import to_onnx
    mode, path = sys.argv[1], sys.argv[2]
    model = _lora_mlp(32.0, 1)  # the new export: another spec than the one on disk
    if mode == "save":  # die half-way through writing the .onnx
        real = torch.onnx.ONNXProgram.save
        def save(self, dest, **kw):
            real(self, dest, **kw)
            data = open(dest, "rb").read()
            open(dest, "wb").write(data[: len(data) // 2])
            os._exit(9)
        torch.onnx.ONNXProgram.save = save
    else:  # die after n files were moved into place
        n, real_replace, count = int(mode), os.replace, [0]
        def replace(a, b):
            if count[0] == n and os.path.dirname(os.path.abspath(b)) == os.path.dirname(os.path.abspath(path)):
                os._exit(9)
            real_replace(a, b)
            if os.path.dirname(os.path.abspath(b)) == os.path.dirname(os.path.abspath(path)):
                count[0] += 1
        os.replace = replace
    to_onnx(model, torch.randn(2, 16), path, merged=False)
    os._exit(0)
""")


@pytest.mark.parametrize("mode", ["save", "0", "1", "2", "3"])
def test_export_killed_midway_leaves_the_previous_export_usable(mode, ctx: Ctx, tmp_path):
    d = tmp_path / "export"
    shutil.copytree(ctx.exp_a.path.parent, d)
    before = folder_snapshot(d)
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(repo=str(REPO), tests=str(REPO / "tests")))
    r = subprocess.run([sys.executable, str(script), mode, str(d / "model.onnx")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]
    after = folder_snapshot(d)
    model_files = {k: v for k, v in after.items() if k.startswith("model.")}
    assert model_files["model.onnx"] == before["model.onnx"], "the .onnx is replaced last, or not at all"
    if mode in ("save", "0"):
        assert model_files == before
    # The previous export still loads and runs: base (unbound) and with A's adapter.
    with torch.no_grad(), pc.disabled(ctx.a):
        want_base = ctx.a(**ctx.x)
    with torch.no_grad():
        want_a = ctx.a(**ctx.x)
    sess = OrtAdapterSession(d / "model.onnx")
    assert _rel(torch.as_tensor(next(iter(sess.run(ctx.x).values()))), want_base) <= TOL
    # A half-done state never binds silently: each side file either binds with A's exact
    # outputs (it is still A's) or raises (it is B's, or a mismatched pair).
    outcomes = {}
    for f in ("model.adapter.safetensors", "model.onnx_adapter"):
        try:
            got = _run(d / "model.onnx", d / f, ctx.x)
        except pc.AdapterError as e:
            outcomes[f] = "refused"
            assert "alpha': 32.0" in str(e) or "different writes" in str(e), str(e)
        else:
            outcomes[f] = "bound"
            assert _rel(got, want_a) <= TOL, f
    expected_refused = {"save": 0, "0": 0, "1": 1, "2": 2, "3": 2}[mode]
    assert list(outcomes.values()).count("refused") == expected_refused, outcomes
    # Only a temporary sibling may be left, never a file under a final name.
    assert all(k in before or k.startswith(".model.onnx.tmp-") for k in after), sorted(after)


# ----------------------------------------------------------------------------- 4: paths checked first

def test_unwritable_output_fails_before_any_export_work(ctx: Ctx, tmp_path, monkeypatch):
    import peftcompile.export.onnx as onnx_mod

    def no_export(*a, **k):
        raise AssertionError("export work started before the output path was checked")

    monkeypatch.setattr(onnx_mod, "_export", no_export)
    (tmp_path / "file").write_text("x")
    (tmp_path / "m.onnx").mkdir()
    (tmp_path / "s.adapter.safetensors").mkdir()
    for bad, why in [(tmp_path / "file" / "m.onnx", "is not a directory"), (tmp_path / "m.onnx", "is a directory"),
                     (tmp_path / "s.onnx", r"s\.adapter\.safetensors is a directory")]:
        with pytest.raises(pc.AdapterError, match=why) as info:
            to_onnx(ctx.a, torch.randn(2, 16), bad, merged=False)
        assert str(bad) in str(info.value) or bad.stem in str(info.value)


# ----------------------------------------------------------------------------- 6: default dynamic axes

def test_default_axes_of_whisper_style_inputs():
    from peftcompile.export import default_dynamic_axes

    names = ["input_features", "decoder_input_ids", "decoder_attention_mask", "attention_mask", "pixel_values",
             "inputs_embeds", "decoder_inputs_embeds", "labels", "x", "scale"]
    tensors = [torch.randn(2, 80, 300), torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long),
               torch.ones(2, 7, dtype=torch.long), torch.randn(2, 3, 16, 16), torch.randn(2, 7, 32),
               torch.randn(2, 5, 32), torch.ones(2, 7, dtype=torch.long), torch.randn(2, 16), torch.randn(4)]
    assert default_dynamic_axes(names, tensors) == {
        "input_features": {0: "batch"},  # mel bins and frames stay static
        "decoder_input_ids": {0: "batch", 1: "decoder_sequence"},
        "decoder_attention_mask": {0: "batch", 1: "decoder_sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "pixel_values": {0: "batch"},
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "decoder_inputs_embeds": {0: "batch", 1: "decoder_sequence"},
        "labels": {0: "batch", 1: "labels"},
        "x": {0: "batch"},
    }


def _ort_first(path: Path, inputs: dict) -> torch.Tensor:
    exp = read_metadata(path)
    sess = OrtAdapterSession(path).bind(path.with_name(exp["ort_adapter"]))
    return torch.as_tensor(next(iter(sess.run(inputs).values())))


def test_encoder_decoder_default_axes_run_other_lengths(tmp_path):
    from transformers import BartConfig, BartModel

    torch.manual_seed(0)
    m = BartModel(BartConfig(vocab_size=128, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                             max_position_embeddings=64)).eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, alpha=4.0), ["q_proj", "v_proj"]))
    randomize_adapters_(m)

    def ex(b: int, s: int, t: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 128, (b, s), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "decoder_input_ids": torch.randint(3, 128, (b, t), generator=g)}

    exp = to_onnx(m, ex(2, 7, 5, 0), tmp_path / "bart.onnx", merged=False)
    chk = ex(3, 9, 4, 1)  # encoder and decoder lengths other than the example's, and unequal
    with torch.no_grad():
        want = m(**chk, use_cache=False).last_hidden_state
    assert _rel(_ort_first(exp.path, chk), want) <= TOL


def test_image_inputs_keep_channels_static_and_batch_dynamic(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    m = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           image_size=16, patch_size=8, num_channels=3)).eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), ["q_proj", "v_proj"]))
    randomize_adapters_(m)
    exp = to_onnx(m, {"pixel_values": torch.randn(2, 3, 16, 16)}, tmp_path / "vit.onnx", merged=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(exp.path)).graph.input}
    assert dims["pixel_values"] == ["batch", 3, 16, 16]
    chk = {"pixel_values": torch.randn(3, 3, 16, 16)}
    with torch.no_grad():
        want = m(**chk).last_hidden_state
    assert _rel(_ort_first(exp.path, chk), want) <= TOL


# ----------------------------------------------------------------------------- 8: lazy subpackage

def test_pc_export_to_onnx_without_importing_the_subpackage(tmp_path):
    code = textwrap.dedent(f"""
        import sys, warnings
        warnings.simplefilter("ignore")
        sys.path.insert(0, {str(REPO)!r})
        import torch
        import peftcompile as pc
        assert "peftcompile.export" not in sys.modules
        m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2)))
        e = pc.export.to_onnx(m, torch.randn(2, 4), {str(tmp_path / 'm.onnx')!r}, merged=False)
        print("OK", e.path.is_file(), type(e).__name__)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK True OnnxExport" in r.stdout


# ----------------------------------------------------------------------------- 7: command line

def _cli(args: list[str]):
    from typer.testing import CliRunner

    from peftcompile.cli import app

    return CliRunner().invoke(app, args)


def _assert_clean_error(r, *needles: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # exited, no escaped exception
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    # Progress lines ("loading ...") may precede it; the error is one line, the last.
    assert lines and lines[-1].startswith("error: "), r.output
    assert sum(ln.startswith("error") for ln in lines) == 1, r.output
    for n in needles:
        assert n in r.output, (n, r.output)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    from peftcompile.models import load_model

    m, _ = load_model("tiny-gpt2")
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), ["c_attn"]))
    pc.save_adapters(m, root / "adapter")
    m.save_pretrained(root / "model")  # an HF folder (with the adapter's own modules: only a path target here)
    (root / "a_file").write_text("x")
    (root / "not_a_model").mkdir()
    (root / "broken_model").mkdir()
    (root / "broken_model" / "config.json").write_text("{oops")
    (root / "bad_adapter").mkdir()
    (root / "bad_adapter" / "adapter_config.json").write_text("{oops")
    (root / "bad_adapter" / "adapter_model.safetensors").write_bytes(b"junk")
    return root


def test_cli_bad_paths_and_folders_exit_with_one_line(cli_files):
    r = cli_files
    for args, needles in [
        (["inspect", str(r / "nope")], ("nope", "neither an example")),
        (["inspect", str(r / "not_a_model")], ("not_a_model", "config.json")),
        (["inspect", str(r / "broken_model")], ("broken_model", "config.json")),
        (["merge", str(r / "broken_model"), str(r / "adapter"), str(r / "out")], ("broken_model",)),
        (["inspect", "tiny-gpt2", "--adapter", str(r / "nope")], ("adapter folder not found",)),
        (["inspect", "tiny-gpt2", "--adapter", str(r / "bad_adapter")], ("bad_adapter",)),
        (["merge", str(r / "nope"), str(r / "adapter"), str(r / "out")], ("nope",)),
        (["merge", "tiny-gpt2", str(r / "not_a_model"), str(r / "out")], ("not_a_model", "adapter_config.json")),
        (["merge", "tiny-gpt2", str(r / "bad_adapter"), str(r / "out")], ("bad_adapter",)),
        (["merge", "tiny-gpt2", str(r / "adapter"), str(r / "a_file" / "out")], ("a_file", "not a directory")),
        (["export", "tiny-gpt2", "-a", str(r / "nope"), "-o", str(r / "x.onnx")], ("adapter folder not found",)),
        (["export", "tiny-gpt2", "-a", str(r / "bad_adapter"), "-o", str(r / "x.onnx")], ("bad_adapter",)),
        (["export", "tiny-gpt2", "-a", str(r / "adapter"), "-o", str(r / "a_file" / "x.onnx")], ("not a directory",)),
        (["export", "tiny-gpt2", "-a", str(r / "adapter"), "-o", str(r / "x.txt")], (".onnx",)),
        (["export", "tiny-gpt2", "-o", str(r / "p.onnx")], ("--allow-plain",)),
        (["demo", "--out", str(r / "a_file")], ("a_file", "is a file")),
    ]:
        before = folder_snapshot(r)
        res = _cli(args)
        _assert_clean_error(res, *needles)
        assert folder_snapshot(r) == before, args
    res = _cli(["--debug", "inspect", str(r / "nope")])
    assert isinstance(res.exception, pc.AdapterError)  # --debug: the exception (and traceback) comes through


def test_cli_refuses_to_write_into_its_inputs_or_over_an_output(cli_files):
    r = cli_files
    (r / "existing").mkdir(exist_ok=True)
    (r / "existing.onnx").write_text("keep me")
    for args, needles in [
        (["merge", str(r / "model"), str(r / "adapter"), str(r / "model")], ("inside the input model folder",)),
        (["merge", str(r / "model"), str(r / "adapter"), str(r / "model" / "merged")], ("inside the input model",)),
        (["merge", "tiny-gpt2", str(r / "adapter"), str(r / "adapter" / "m")], ("inside the input adapter",)),
        (["merge", "tiny-gpt2", str(r / "adapter"), str(r / "existing")], ("already exists", "--overwrite")),
        (["export", str(r / "model"), "-o", str(r / "model" / "m.onnx"), "--allow-plain"], ("inside the input model",)),
        (["export", "tiny-gpt2", "-a", str(r / "adapter"), "-o", str(r / "existing.onnx")], ("--overwrite",)),
    ]:
        before = folder_snapshot(r)
        _assert_clean_error(_cli(args), *needles)
        assert folder_snapshot(r) == before, args


def test_cli_merge_overwrite_replaces_the_folder_whole(cli_files, tmp_path):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    res = _cli(["merge", "tiny-gpt2", str(cli_files / "adapter"), str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert GPT2LMHeadModel.from_pretrained(out) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder left
