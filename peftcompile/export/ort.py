"""onnxruntime side of an unmerged export: a session that checks adapters before binding them.

The files it reads are described in :mod:`peftcompile.export.formats`. :class:`OrtAdapterSession`
checks names, shapes, dtypes, spec and export fingerprint of an adapter against the graph
before onnxruntime runs, so a wrong adapter fails with a message instead of a shape error
deep inside a kernel (or, worse, a silent broadcast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort
from torch import nn

from ..errors import AdapterError
from ..state import adapter_params, state_of
from .formats import (METADATA_KEY, AdapterFile, AdapterInput, as_numpy, check_adapter_tensors,
                      export_fingerprint, one_line, parse_metadata, read_adapter, write_ort_adapter)

__all__ = ["OrtAdapterSession"]

def _arrays(tensors: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    try:
        return {k: as_numpy(v) for k, v in tensors.items()}
    except TypeError as e:  # bfloat16 has no numpy type
        raise AdapterError(f"{source}: {e}; write the tensors with write_ort_adapter and bind that .onnx_adapter "
                           f"file (onnxruntime feeds it without numpy)") from None



class OrtAdapterSession:
    """An onnxruntime session over an export of :func:`to_onnx`, with checked adapter binding.

    ``bind`` accepts an ``.onnx_adapter`` file stamped for this export (bound through
    onnxruntime's ``LoraAdapter``), an export's ``.adapter.safetensors`` sidecar, a
    :func:`peftcompile.save_adapters` directory, a mapping of graph input name ->
    tensor/array, or an adapted ``nn.Module`` (its active adapter). Names, shapes, dtypes,
    the method config and (for files) the export fingerprint must match the export;
    ``save_adapter`` stamps an adapter for it.
    ``unbind`` returns to the defaults (the base model). ``run`` returns output name -> array.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 sess_options: Any = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise AdapterError(f"ONNX file not found: {self.path}")
        if sess_options is None:
            sess_options = ort.SessionOptions()
            # onnxruntime warns once per adapter input that an initializer is also a graph
            # input: that is the point here (an overridable default), so keep errors only.
            sess_options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=sess_options, providers=list(providers))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise AdapterError(f"{self.path} is not a loadable ONNX model ({type(e).__name__}: {one_line(e)}); "
                               f"export it again") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise AdapterError(f"{self.path} was not written by peftcompile.export.to_onnx (no '{METADATA_KEY}' "
                               f"metadata); run it with onnxruntime.InferenceSession directly")
        self.meta = parse_metadata(meta, self.path)
        fp = self.meta.get("fingerprint")
        #: what an adapter must be stamped with to bind (see formats.export_fingerprint)
        self.fingerprint: int = fp if isinstance(fp, int) else export_fingerprint(self.meta)
        self.adapter_inputs = {k: AdapterInput.from_dict(k, v) for k, v in self.meta["adapter_inputs"].items()}
        graph_inputs = {i.name for i in self.session.get_inputs()}
        self.input_names = [n for n in self.meta["inputs"] if n in graph_inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._feeds: dict[str, np.ndarray] = {}
        self._run_options = None
        self._adapter = None  # keeps the LoraAdapter alive while bound
        self.bound: str | None = None

    @property
    def spec(self) -> dict | None:
        """The bindable adapter's method config (``AdapterSpec.to_dict()["method"]``); None if merged."""
        if self.meta["merged"] or not self.meta["adapter_inputs"]:
            return None
        return self.meta["specs"][self.meta["adapter"]]["method"]

    # -- binding -------------------------------------------------------------------
    def check(self, tensors: Mapping[str, Any], spec: Mapping | None = None, source: str = "adapter") -> None:
        """Raise :class:`AdapterError` unless ``tensors`` fit the exported adapter inputs."""
        if not self.adapter_inputs:
            raise AdapterError(f"{self.path} is a merged (or plain) export: it has no adapter inputs to bind; "
                               f"export with merged=False to swap adapters at run time")
        if spec is not None and self.spec is not None and dict(spec) != dict(self.spec):
            raise AdapterError(f"{source} is a {dict(spec)} adapter but {self.path.name} was exported for "
                               f"{self.spec}; export again with that spec")
        check_adapter_tensors(self.meta, tensors, source, self.path.name)

    def _check_file(self, f: AdapterFile) -> None:
        """Spec, shapes and export fingerprint of an adapter file."""
        if not self.adapter_inputs:
            self.check({}, None, str(f.path))
        if f.kind == "onnx_adapter" and f.fingerprint is None:
            raise AdapterError(
                f"{f.path} is not stamped for an export (onnxruntime model_version is not a peftcompile fingerprint), "
                f"so its spec cannot be checked. Fix: write it with write_ort_adapter(path, tensors, "
                f"export='{self.path.name}') or OrtAdapterSession.save_adapter(path, source)")
        self.check(f.tensors, f.spec, str(f.path))
        if f.fingerprint is not None and f.fingerprint != self.fingerprint:
            spec = f.spec if f.spec is not None else "unknown (no spec recorded next to it)"
            raise AdapterError(
                f"{f.path} was written for another export (spec {spec}, fingerprint {f.fingerprint}) than "
                f"{self.path.name} (spec {self.spec}, fingerprint {self.fingerprint}); bind an adapter written for "
                f"this export (write_ort_adapter(path, tensors, export=...)) or export again with that spec")

    def _tensors_of(self, source: Any) -> tuple[dict[str, Any], dict | None, str, AdapterFile | None]:
        label = type(source).__name__
        if isinstance(source, nn.Module):
            st = state_of(source)
            if st is None or len(st.active) != 1:
                raise AdapterError(f"{type(source).__name__} must have exactly one active peftcompile adapter to bind")
            return (_arrays(adapter_params(source, st.active[0]), label), st.specs[st.active[0]].to_dict()["method"],
                    label, None)
        if isinstance(source, Mapping):
            return _arrays(source, label), None, label, None
        if isinstance(source, (str, Path)):
            f = read_adapter(source)
            return f.tensors, f.spec, str(source), f
        raise AdapterError(f"cannot bind a {label}: pass an adapter file or folder, a mapping of graph input name -> "
                           f"tensor, or an adapted model")

    def bind(self, source: str | Path | Mapping[str, Any] | nn.Module) -> "OrtAdapterSession":
        """Make ``source`` the adapter of the following ``run`` calls (checked first).

        Files must record what they were written for: an ``.onnx_adapter`` must be stamped
        with this export's fingerprint (:func:`write_ort_adapter` with ``export=``), a sidecar
        carries the description of its export; either written for another export raises.
        """
        tensors, spec, label, f = self._tensors_of(source)
        if f is not None:
            self._check_file(f)
        else:
            self.check(tensors, spec, label)
        if f is not None and f.kind == "onnx_adapter":
            adapter = ort.LoraAdapter()
            adapter.Load(str(f.path))
            ro = ort.RunOptions()
            ro.add_active_adapter(adapter)
            self._adapter, self._run_options, self._feeds = adapter, ro, {}
        else:
            types = {i.name: i.type for i in self.session.get_inputs()}
            tensors = _arrays(tensors, label)
            self._feeds = {k: v.astype(_ORT_TYPES.get(types.get(k), v.dtype), copy=False) for k, v in tensors.items()}
            self._adapter = self._run_options = None
        self.bound = label
        return self

    def save_adapter(self, path: str | Path, source: str | Path | Mapping[str, Any] | nn.Module) -> Path:
        """Write ``source`` (anything :meth:`bind` takes, or an unstamped ``.onnx_adapter``)
        as an ``.onnx_adapter`` stamped for this export, after checking it fits.

        The supported way to turn adapters written elsewhere into files :meth:`bind` accepts;
        a recorded spec other than this export's still raises.
        """
        tensors, spec, label, _ = self._tensors_of(source)
        self.check(tensors, spec, label)
        return write_ort_adapter(path, tensors, export=self.meta)

    def unbind(self) -> "OrtAdapterSession":
        """Run the base model again (the adapter inputs' zero defaults)."""
        self._feeds, self._adapter, self._run_options, self.bound = {}, None, None, None
        return self

    # -- running -------------------------------------------------------------------
    def run(self, inputs: Mapping[str, Any] | Sequence[Any] | Any) -> dict[str, np.ndarray]:
        """Run with the bound adapter (or the base model); returns output name -> array."""
        if isinstance(inputs, Mapping):
            feeds = {k: as_numpy(v) for k, v in inputs.items()}
        elif isinstance(inputs, (list, tuple)):
            feeds = dict(zip(self.input_names, (as_numpy(v) for v in inputs)))
        else:
            feeds = {self.input_names[0]: as_numpy(inputs)}
        unknown = sorted(set(feeds) - set(self.input_names))
        missing = sorted(set(self.input_names) - set(feeds))
        if unknown or missing:
            raise AdapterError(f"{self.path.name} takes inputs {self.input_names}; missing {missing}, unknown {unknown}"
                             + ("; bind adapters with .bind(), not as inputs" if set(unknown) & set(self.adapter_inputs)
                                else ""))
        if self.bound is None:
            required = [k for k, a in self.adapter_inputs.items() if a.default_shape is None]
            if required:
                raise AdapterError(f"{self.path.name} has adapter inputs without defaults ({required[:4]}); "
                                   f"bind an adapter before run")
        feeds.update(self._feeds)
        outs = self.session.run(None, feeds, self._run_options)
        return dict(zip(self.output_names, outs))


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
}
