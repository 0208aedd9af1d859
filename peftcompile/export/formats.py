"""File formats of an unmerged export, shared by the exporter and the onnxruntime side.

Next to ``model.onnx`` (whose ``metadata_props["peftcompile"]`` holds the export's
description, :func:`read_metadata`):
* ``model.adapter.safetensors`` (the sidecar): the exported adapter's tensors under their
  graph input names, the export's description in the safetensors metadata;
* ``model.onnx_adapter``: the same tensors in onnxruntime's adapter format, bound with
  ``onnxruntime.LoraAdapter`` + ``RunOptions.add_active_adapter`` (onnxruntime feeds them
  by name, overriding the graph inputs' default initializers). Its ``model_version`` is
  the export's *fingerprint* (:func:`export_fingerprint`), and ``model.onnx_adapter.json``
  next to it records the spec it was written for, so a binder can tell an adapter written
  for another export (another alpha, say: same shapes, silently wrong numbers) from one
  that fits.
:func:`read_adapter_file` reads either, or a :func:`peftcompile.save_adapters` directory.
Every file is written through a temporary sibling and ``os.replace`` (:mod:`peftcompile.atomic`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnxruntime as ort
import torch

from ..atomic import atomic_replace_files, check_writable, temp_sibling_dir
from ..errors import AdapterError
from ..io import CONFIG_NAME, WEIGHTS_NAME
from ..io import FORMAT as ADAPTER_DIR_FORMAT
from ..io import tensor_mismatch

__all__ = ["METADATA_KEY", "FORMAT", "SIDECAR_SUFFIX", "ORT_ADAPTER_SUFFIX", "ORT_ADAPTER_SPEC_SUFFIX",
           "AdapterInput", "AdapterFile", "read_metadata", "parse_metadata", "export_fingerprint",
           "write_sidecar", "write_ort_adapter", "read_adapter_file", "read_adapter", "check_adapter_tensors",
           "as_numpy", "one_line", "ORT_DTYPE"]

METADATA_KEY = "peftcompile"
FORMAT = "peftcompile-onnx/1"
SIDECAR_SUFFIX = ".adapter.safetensors"
ORT_ADAPTER_SUFFIX = ".onnx_adapter"
ORT_ADAPTER_SPEC_SUFFIX = ".json"  # appended: model.onnx_adapter.json
# Fingerprints have bit 30 set: never a small hand-written version number (onnxruntime's
# default model_version is 1), so "unstamped" and "stamped for another export" differ.
_STAMP_BIT = 1 << 30

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
    if isinstance(t, ort.OrtValue):
        return t.numpy()
    return np.asarray(t)


def _ort_value(t: Any) -> ort.OrtValue:
    if isinstance(t, ort.OrtValue):
        return t
    if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16:
        # numpy has no bfloat16: hand onnxruntime the raw 16-bit words with the element type.
        words = t.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(words, onnx.TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(as_numpy(t)))


def _dtype_name(t: Any) -> str:
    if isinstance(t, ort.OrtValue):
        return ORT_DTYPE.get(t.data_type(), t.data_type())
    if isinstance(t, torch.Tensor):
        return str(t.dtype).removeprefix("torch.")
    return str(np.asarray(t).dtype)


def one_line(e: BaseException) -> str:
    """An exception as one line (onnxruntime's messages span several, with C++ source paths)."""
    return " ".join(str(e).split()) or type(e).__name__


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape()) if isinstance(t, ort.OrtValue) else tuple(np.shape(t))


# ----------------------------------------------------------------------------- metadata

_META_KEYS = {"format": str, "merged": bool, "specs": dict, "inputs": list, "outputs": list, "adapter_inputs": dict}


def parse_metadata(text: str, source: str | Path) -> dict:
    """The export description (``metadata_props["peftcompile"]``), checked key by key."""
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise AdapterError(f"{source}: the '{METADATA_KEY}' metadata is not valid JSON ({e}); export the model "
                           f"again with peftcompile.export.to_onnx") from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{source}: the '{METADATA_KEY}' metadata is a {type(meta).__name__}, not an object; "
                           f"export the model again with peftcompile.export.to_onnx")
    if meta.get("format") != FORMAT:
        raise AdapterError(f"{source}: unsupported export format {meta.get('format')!r} (key 'format'; this version "
                           f"reads {FORMAT!r}); export the model again with peftcompile.export.to_onnx")
    for key, typ in _META_KEYS.items():
        if not isinstance(meta.get(key), typ):
            raise AdapterError(f"{source}: the '{METADATA_KEY}' metadata has no valid key {key!r} (expected a "
                               f"{typ.__name__}, got {type(meta.get(key)).__name__}); export the model again")
    adapter = meta.get("adapter")
    if meta["adapter_inputs"] and (not isinstance(adapter, str) or not isinstance(meta["specs"].get(adapter), dict)
                                   or not isinstance(meta["specs"][adapter].get("method"), dict)):
        raise AdapterError(f"{source}: the '{METADATA_KEY}' metadata names adapter {adapter!r} (key 'adapter') with no "
                           f"spec under 'specs'; export the model again")
    try:
        for k, v in meta["adapter_inputs"].items():
            AdapterInput.from_dict(k, v)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AdapterError(f"{source}: the '{METADATA_KEY}' metadata key 'adapter_inputs' is malformed "
                           f"({type(e).__name__}: {e}); export the model again") from None
    return meta


def read_metadata(path: str | Path) -> dict:
    """The ``peftcompile`` metadata of an exported file ({} if it has none)."""
    p = Path(path)
    if not p.is_file():
        raise AdapterError(f"ONNX file not found: {p}")
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises DecodeError and friends
        raise AdapterError(f"{p} is not a readable ONNX file ({type(e).__name__}: {one_line(e)})") from None
    for prop in m.metadata_props:
        if prop.key == METADATA_KEY:
            return parse_metadata(prop.value, p)
    return {}


def _method_spec(meta: Mapping) -> dict | None:
    """The bindable adapter's method config of an export description (None: merged or plain)."""
    if meta.get("merged") or not meta.get("adapter_inputs"):
        return None
    return meta["specs"][meta["adapter"]]["method"]


def export_fingerprint(meta: Mapping) -> int:
    """A 31-bit hash of what an adapter must match to bind to an export: the method config and
    the adapter inputs' names, shapes and dtypes (not the adapter's name, targets or values)."""
    spec = _method_spec(meta)
    desc = {"format": FORMAT,
            "spec": spec if spec is not None else {k: v.get("method") for k, v in sorted(meta["specs"].items())},
            "inputs": {k: [list(v["shape"]), str(v["dtype"])] for k, v in sorted(meta["adapter_inputs"].items())}}
    h = int(hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:8], 16)
    return (h & (_STAMP_BIT - 1)) | _STAMP_BIT


def _fingerprint_of(meta: Mapping) -> int:
    fp = meta.get("fingerprint")
    return fp if isinstance(fp, int) else export_fingerprint(meta)


def _export_meta(export: Any) -> dict:
    """The description of ``export``: an OnnxExport, an OrtAdapterSession, a metadata dict or an .onnx path."""
    if hasattr(export, "metadata") and callable(export.metadata):
        return export.metadata()
    if isinstance(getattr(export, "meta", None), Mapping):
        return dict(export.meta)
    if isinstance(export, Mapping):
        return parse_metadata(json.dumps(dict(export)), "export")
    if isinstance(export, (str, Path)):
        meta = read_metadata(export)
        if not meta:
            raise AdapterError(f"{export} was not written by peftcompile.export.to_onnx (no '{METADATA_KEY}' metadata)")
        return meta
    raise AdapterError(f"export must be an OnnxExport, an OrtAdapterSession, its metadata dict or an .onnx path, "
                       f"got {type(export).__name__}")


def check_adapter_tensors(meta: Mapping, tensors: Mapping[str, Any], source: str, where: str = "the export") -> None:
    """Raise :class:`AdapterError` unless ``tensors`` have the names, shapes and dtypes of the
    adapter inputs of the export described by ``meta``."""
    if not meta.get("adapter_inputs"):
        raise AdapterError(f"{where} is a merged (or plain) export: it has no adapter inputs to bind; "
                           f"export with merged=False to swap adapters at run time")
    want = {k: AdapterInput.from_dict(k, v) for k, v in meta["adapter_inputs"].items()}
    # Arrays are cast to the graph's float type on binding; onnxruntime's own adapter values
    # (and files written from bfloat16 tensors) are fed as they are, so their type must match.
    types = {k: _dtype_name(t) for k, t in tensors.items()
             if k in want and (isinstance(t, ort.OrtValue) or _dtype_name(t) == "bfloat16")}
    wrong_type = [f"{k}: {types[k]} vs graph {want[k].dtype}" for k in want if k in types and types[k] != want[k].dtype]
    why = tensor_mismatch({k: v.shape for k, v in want.items()}, {k: _shape(t) for k, t in tensors.items()},
                          got_as="", expected_as="graph", missing_as="missing",
                          extra_as="not inputs of this graph", n=6,
                          extra_problems=[f"dtype mismatch: {'; '.join(wrong_type[:6])}"] if wrong_type else ())
    if why:
        raise AdapterError(f"{source} does not fit {where} ({why}). An unmerged export binds adapters "
                           f"of the spec and sites it was exported with ({_method_spec(meta)})")


# ----------------------------------------------------------------------------- writing

def _save_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    from safetensors.torch import save_file

    save_file({k: torch.as_tensor(as_numpy(t)) if not isinstance(t, torch.Tensor) else t.detach().cpu().contiguous()
               for k, t in tensors.items()}, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def write_sidecar(path: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> Path:
    """Adapter tensors keyed by graph input name, the export description (with its
    fingerprint) as metadata; written atomically (temporary sibling + ``os.replace``)."""
    path = check_writable(path, "sidecar")
    meta = dict(meta)
    meta.setdefault("fingerprint", _fingerprint_of(meta))
    with temp_sibling_dir(path) as tmp:
        _save_safetensors(tmp / path.name, tensors, meta)
        atomic_replace_files(tmp, path.parent)
    return path


def write_ort_adapter(path: str | Path, tensors: Mapping[str, Any], export: Any = None, *,
                      adapter_version: int = 1, model_version: int = 1) -> Path:
    """Write ``tensors`` (graph input name -> tensor) in onnxruntime's ``.onnx_adapter`` format.

    With ``export`` (an :class:`OnnxExport`, an :class:`OrtAdapterSession`, its metadata dict
    or the ``.onnx`` path) the tensors are first checked against that export's adapter inputs,
    the file is stamped with its fingerprint (``model_version``) and ``<path>.json`` records
    the spec: :meth:`OrtAdapterSession.bind` accepts only stamped files. Without ``export``
    the file is unstamped (``model_version``), for plain onnxruntime use only.
    Both files are written atomically, the ``.json`` first.
    """
    path = Path(path)
    if path.suffix != ORT_ADAPTER_SUFFIX:
        raise AdapterError(f"path must end in {ORT_ADAPTER_SUFFIX} (onnxruntime's adapter format), got {path}")
    check_writable(path, "adapter file")
    side = path.with_name(path.name + ORT_ADAPTER_SPEC_SUFFIX)
    spec_doc = None
    if export is not None:
        meta = _export_meta(export)
        check_adapter_tensors(meta, tensors, "tensors", f"the export ({_method_spec(meta)})")
        model_version = _fingerprint_of(meta)
        spec_doc = {"format": FORMAT, "fingerprint": model_version, "adapter": meta.get("adapter"),
                    "spec": meta["specs"][meta["adapter"]]}
    elif model_version & _STAMP_BIT:
        raise AdapterError(f"model_version {model_version} looks like an export fingerprint; pass export=... "
                           f"to stamp a file for an export")
    values = {k: _ort_value(t) for k, t in tensors.items()}  # conversion errors before any write
    with temp_sibling_dir(path) as tmp:
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(adapter_version)
        fmt.set_model_version(model_version)
        fmt.set_parameters(values)
        fmt.export_adapter(str(tmp / path.name))
        if spec_doc is not None:
            (tmp / side.name).write_text(json.dumps(spec_doc, indent=1))
        atomic_replace_files(tmp, path.parent, order=[side.name, path.name])
    if spec_doc is None and side.exists():
        # A stale spec of an earlier stamped file would contradict this one.
        os.unlink(side)
    return path


# ----------------------------------------------------------------------------- reading

@dataclass
class AdapterFile:
    """What :func:`read_adapter` found in an adapter file or folder."""

    path: Path
    kind: str  # "onnx_adapter" | "safetensors" | "directory"
    tensors: dict[str, Any]
    spec: dict | None  # the method config it records (None: not recorded)
    fingerprint: int | None  # the export fingerprint it is stamped with (None: not stamped)


def _read_json_object(file: Path, fix: str) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{file} is not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise AdapterError(f"{file} cannot be read ({e.strerror}); {fix}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{file} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def _read_dir(p: Path) -> AdapterFile:
    from ..io import CHECKPOINT_KEYS, read_weights
    from ..spec import AdapterSpec

    cfg_file = p / CONFIG_NAME
    if not (p / WEIGHTS_NAME).is_file() or not cfg_file.is_file():
        raise AdapterError(f"{p} is not an adapter directory (expected {WEIGHTS_NAME} and "
                           f"{CONFIG_NAME}, as save_adapters writes)")
    fix = "write it with peftcompile.save_adapters"
    cfg = _read_json_object(cfg_file, fix)
    if "peft_type" in cfg:
        raise AdapterError(f"{p} is a PEFT adapter; load it into the model with peftcompile.load_peft_adapter "
                           f"and bind the model, or save_adapters it first")
    if cfg.get("format") != ADAPTER_DIR_FORMAT:
        raise AdapterError(f"{cfg_file}: key 'format' is {cfg.get('format')!r}, not {ADAPTER_DIR_FORMAT!r}; {fix}")
    for key in ("spec", "sites"):
        if key not in cfg:
            raise AdapterError(f"{cfg_file} has no key {key!r}; {fix}")
    unknown = sorted(set(cfg) - CHECKPOINT_KEYS)
    if unknown:
        raise AdapterError(f"{cfg_file} has unknown keys {unknown} (known: {sorted(CHECKPOINT_KEYS)}); {fix}")
    if not isinstance(cfg["sites"], dict):
        raise AdapterError(f"{cfg_file}: key 'sites' must map site -> [in, out]; {fix}")
    try:
        spec = AdapterSpec.from_dict(cfg["spec"]).method.to_dict()
    except AdapterError as e:
        raise AdapterError(f"{cfg_file}: key 'spec': {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AdapterError(f"{cfg_file}: key 'spec' is not a valid AdapterSpec ({type(e).__name__}: {e}); "
                           f"{fix}") from None
    # the same reader as load_adapters: the weights must belong to this config
    tensors = {k: as_numpy(v) for k, v in read_weights(p, cfg).items()}
    return AdapterFile(p, "directory", tensors, spec, None)


def _read_onnx_adapter(p: Path) -> AdapterFile:
    try:
        fmt = ort.AdapterFormat.read_adapter(str(p))
        params = dict(fmt.get_parameters())
        version = int(fmt.get_model_version())
    except Exception as e:  # noqa: BLE001 - onnxruntime raises bare RuntimeErrors
        raise AdapterError(f"{p} is not a readable .onnx_adapter file ({one_line(e)}); write it with "
                           f"write_ort_adapter") from None
    fix = "write it again with write_ort_adapter(path, tensors, export=...) or OrtAdapterSession.save_adapter"
    fingerprint = version if version & _STAMP_BIT else None
    spec = None
    side = p.with_name(p.name + ORT_ADAPTER_SPEC_SUFFIX)
    if side.exists():
        doc = _read_json_object(side, fix)
        for key in ("format", "fingerprint", "spec"):
            if key not in doc:
                raise AdapterError(f"{side} has no key {key!r}; {fix}")
        unknown = sorted(set(doc) - {"format", "fingerprint", "adapter", "spec"})
        if unknown:
            raise AdapterError(f"{side} has unknown keys {unknown}; {fix}")
        if doc["format"] != FORMAT:
            raise AdapterError(f"{side}: key 'format' is {doc['format']!r}, not {FORMAT!r}; {fix}")
        if not isinstance(doc["spec"], dict) or not isinstance(doc["spec"].get("method"), dict):
            raise AdapterError(f"{side}: key 'spec' must be an AdapterSpec dict with a 'method'; {fix}")
        if doc["fingerprint"] != version:
            raise AdapterError(f"{side} (fingerprint {doc['fingerprint']}) does not belong to {p.name} (stamped "
                               f"{version}): the pair is from two different writes; {fix}")
        spec = doc["spec"]["method"]
    return AdapterFile(p, "onnx_adapter", params, spec, fingerprint)


def _read_safetensors_file(p: Path) -> AdapterFile:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise AdapterError(f"{p} is not a readable safetensors file ({one_line(e)})") from None
    if METADATA_KEY not in meta:
        raise AdapterError(f"{p} has no '{METADATA_KEY}' metadata, so its spec cannot be checked against an export; "
                           f"bind the export's own sidecar, a save_adapters folder, or write the tensors with "
                           f"write_ort_adapter(path, tensors, export=...)")
    desc = parse_metadata(meta[METADATA_KEY], f"{p} (safetensors metadata)")
    return AdapterFile(p, "safetensors", tensors, _method_spec(desc), _fingerprint_of(desc) if desc["adapter_inputs"]
                       else None)


def read_adapter(source: str | Path) -> AdapterFile:
    """Read an adapter file or folder with what it records about its spec and export.

    Accepts an ``.onnx_adapter`` file (values are ``onnxruntime.OrtValue``; with its
    ``.json`` spec if present), an export's sidecar ``.safetensors``, or a directory written
    by :func:`peftcompile.save_adapters` (same keys); those give numpy arrays.
    Anything malformed raises :class:`AdapterError` naming the file and the key.
    """
    p = Path(source)
    if p.is_dir():
        return _read_dir(p)
    if not p.is_file():
        raise AdapterError(f"adapter file not found: {p}")
    if p.suffix == ORT_ADAPTER_SUFFIX:
        return _read_onnx_adapter(p)
    if p.suffix == ".safetensors":
        return _read_safetensors_file(p)
    raise AdapterError(f"{p}: unknown adapter file type; use .onnx_adapter, .safetensors or a save_adapters directory")


def read_adapter_file(source: str | Path) -> tuple[dict[str, Any], dict | None]:
    """Tensors (and the method config, if the file records one) from an adapter file or
    directory; see :func:`read_adapter`."""
    f = read_adapter(source)
    return f.tensors, f.spec
