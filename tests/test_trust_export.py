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
import os
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
