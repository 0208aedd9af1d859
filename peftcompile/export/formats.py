"""File formats of an unmerged export, shared by the exporter and the onnxruntime side.

Next to ``model.onnx`` (whose ``metadata_props["peftcompile"]`` holds the export's
description, :func:`read_metadata`):
* ``model.adapter.safetensors`` (the sidecar): the exported adapter's tensors under their
  graph input names, the export's description in the safetensors metadata;
* ``model.onnx_adapter``: the same tensors in onnxruntime's adapter format, bound with
  ``onnxruntime.LoraAdapter`` + ``RunOptions.add_active_adapter`` (onnxruntime feeds them
  by name, overriding the graph inputs' default initializers).
:func:`read_adapter_file` reads either, or a :func:`peftcompile.save_adapters` directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..errors import AdapterError
from ..io import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["METADATA_KEY", "FORMAT", "SIDECAR_SUFFIX", "ORT_ADAPTER_SUFFIX", "AdapterInput", "read_metadata",
           "write_sidecar", "write_ort_adapter", "read_adapter_file", "as_numpy", "ORT_DTYPE"]

METADATA_KEY = "peftcompile"
FORMAT = "peftcompile-onnx/1"
SIDECAR_SUFFIX = ".adapter.safetensors"
ORT_ADAPTER_SUFFIX = ".onnx_adapter"

@dataclass(frozen=True)
class AdapterInput:
    """One adapter tensor as a graph input of an unmerged export."""

    name: str  # graph input name: "<site>.<param>" or "shared.<group>.<param>"
    shape: tuple[int, ...]  # the exported adapter's shape: what a bound adapter must have
    default_shape: tuple[int, ...] | None  # shape of the zero default initializer (None: no default)
    dtype: str  # numpy dtype name

    def to_dict(self) -> dict:
        dflt = None if self.default_shape is None else list(self.default_shape)
        return {"shape": list(self.shape), "default_shape": dflt, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, name: str, d: Mapping) -> "AdapterInput":
        dflt = d.get("default_shape")
        return cls(name, tuple(d["shape"]), None if dflt is None else tuple(dflt), str(d["dtype"]))


# onnxruntime element type -> torch/numpy dtype name (what AdapterInput.dtype records).
ORT_DTYPE = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(double)": "float64"}


def as_numpy(t: Any) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().contiguous().numpy()
    return np.asarray(t)


def _ort_value(t: Any) -> ort.OrtValue:
    if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
        # numpy has no bfloat16: hand onnxruntime the raw 16-bit words with the element type.
        words = t.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(words, onnx.TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(as_numpy(t)))


def write_sidecar(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> Path:
    """Adapter tensors keyed by graph input name, the export description as metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(path),
              metadata={METADATA_KEY: json.dumps(meta)})
    return path


def write_ort_adapter(path: str | Path, tensors: Mapping[str, Any], adapter_version: int = 1,
                      model_version: int = 1) -> Path:
    """Write ``tensors`` (graph input name -> tensor) in onnxruntime's ``.onnx_adapter`` format."""
    path = Path(path)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(model_version)
    fmt.set_parameters({k: _ort_value(t) for k, t in tensors.items()})
    fmt.export_adapter(str(path))
    return path


def read_adapter_file(source: str | Path) -> tuple[dict[str, Any], dict | None]:
    """Tensors (and the spec, if the file records one) from an adapter file or directory.

    Accepts an ``.onnx_adapter`` file (values are ``onnxruntime.OrtValue``), a sidecar or any
    ``.safetensors`` file keyed by graph input names, or a directory written by
    :func:`peftcompile.save_adapters` (same keys); those give numpy arrays.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(source)
    if p.is_dir():
        cfg_file = p / CONFIG_NAME
        if not (p / WEIGHTS_NAME).is_file() or not cfg_file.is_file():
            raise AdapterError(f"{p} is not an adapter directory (expected {WEIGHTS_NAME} and "
                               f"{CONFIG_NAME}, as save_adapters writes)")
        cfg = json.loads(cfg_file.read_text())
        if "peft_type" in cfg:
            raise AdapterError(f"{p} is a PEFT adapter; load it into the model with peftcompile.load_peft_adapter "
                               f"and bind the model, or save_adapters it first")
        tensors = {k: as_numpy(v) for k, v in load_file(str(p / WEIGHTS_NAME)).items()}
        return tensors, (cfg.get("spec") or {}).get("method")
    if not p.is_file():
        raise AdapterError(f"adapter file not found: {p}")
    if p.suffix == ".onnx_adapter":
        try:
            params = ort.AdapterFormat.read_adapter(str(p)).get_parameters()
        except Exception as e:  # noqa: BLE001 - onnxruntime raises bare RuntimeErrors
            raise AdapterError(f"{p} is not a readable .onnx_adapter file ({e})") from None
        return dict(params), None
    if p.suffix == ".safetensors":
        with safe_open(str(p), "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        spec = None
        if METADATA_KEY in meta:
            specs = json.loads(meta[METADATA_KEY]).get("specs") or {}
            spec = next(iter(specs.values()))["method"] if len(specs) == 1 else None
        return tensors, spec
    raise AdapterError(f"{p}: unknown adapter file type; use .onnx_adapter, .safetensors or a save_adapters directory")


def read_metadata(path: str | Path) -> dict:
    """The ``peftcompile`` metadata of an exported file ({} if it has none)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for p in m.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    return {}

