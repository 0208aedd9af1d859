"""onnxruntime side of an unmerged export: a session that checks adapters before binding them.

The files it reads are described in :mod:`peftcompile.export.formats`. :class:`OrtAdapterSession` checks names, shapes and spec of an adapter against the graph
before onnxruntime runs, so a wrong adapter fails with a message instead of a shape error
deep inside a kernel (or, worse, a silent broadcast).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnxruntime as ort
from torch import nn

from ..errors import AdapterError
from ..io import tensor_mismatch
from ..state import adapter_params, state_of
from .formats import FORMAT, METADATA_KEY, ORT_DTYPE, AdapterInput, as_numpy, read_adapter_file

__all__ = ["OrtAdapterSession"]

def _arrays(tensors: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
    try:
        return {k: as_numpy(v) for k, v in tensors.items()}
    except TypeError as e:  # bfloat16 has no numpy type
        raise AdapterError(f"{source}: {e}; write the tensors with write_ort_adapter and bind that .onnx_adapter "
                           f"file (onnxruntime feeds it without numpy)") from None


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape()) if isinstance(t, ort.OrtValue) else tuple(np.shape(t))



class OrtAdapterSession:
    """An onnxruntime session over an export of :func:`to_onnx`, with checked adapter binding.

    ``bind`` accepts an ``.onnx_adapter`` file (bound through onnxruntime's ``LoraAdapter``),
    a ``.safetensors`` file, a :func:`peftcompile.save_adapters` directory, a mapping of
    graph input name -> tensor/array, or an adapted ``nn.Module`` (its active adapter).
    Names, shapes and (where the source records it) the method config must match the export.
    ``unbind`` returns to the defaults (the base model). ``run`` returns output name -> array.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 sess_options: Any = None) -> None:
        self.path = Path(path)
        if sess_options is None:
            sess_options = ort.SessionOptions()
            # onnxruntime warns once per adapter input that an initializer is also a graph
            # input: that is the point here (an overridable default), so keep errors only.
            sess_options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), sess_options=sess_options, providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if meta is None:
            raise AdapterError(f"{self.path} was not written by peftcompile.export.to_onnx (no '{METADATA_KEY}' "
                               f"metadata); run it with onnxruntime.InferenceSession directly")
        self.meta = json.loads(meta)
        if self.meta.get("format") != FORMAT:
            raise AdapterError(f"{self.path}: unsupported export format {self.meta.get('format')!r}")
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
        if self.meta["merged"] or not self.meta.get("adapter"):
            return None
        return self.meta["specs"][self.meta["adapter"]]["method"]

    # -- binding -------------------------------------------------------------------
    def check(self, tensors: Mapping[str, Any], spec: Mapping | None = None, source: str = "adapter") -> None:
        """Raise :class:`AdapterError` unless ``tensors`` fit the exported adapter inputs."""
        if not self.adapter_inputs:
            raise AdapterError(f"{self.path} is a merged (or plain) export: it has no adapter inputs to bind; "
                               f"export with merged=False to swap adapters at run time")
        if spec is not None and self.spec is not None and dict(spec) != dict(self.spec):
            raise AdapterError(f"{source} is a {spec} adapter but {self.path.name} was exported for {self.spec}; "
                               f"export again with that spec")
        want = self.adapter_inputs
        # Arrays are cast to the graph's float type on binding; onnxruntime's own adapter
        # values are fed as they are, so their element type must match.
        types = {k: ORT_DTYPE.get(t.data_type(), t.data_type()) for k, t in tensors.items()
                 if k in want and isinstance(t, ort.OrtValue)}
        wrong_type = [f"{k}: {types[k]} vs graph {want[k].dtype}" for k in want if k in types and types[k] != want[k].dtype]
        why = tensor_mismatch({k: v.shape for k, v in want.items()}, {k: _shape(t) for k, t in tensors.items()},
                              got_as="", expected_as="graph", missing_as="missing",
                              extra_as="not inputs of this graph", n=6,
                              extra_problems=[f"dtype mismatch: {'; '.join(wrong_type[:6])}"] if wrong_type else ())
        if why:
            raise AdapterError(
                f"{source} does not fit {self.path.name} ({why}). An unmerged export binds adapters "
                f"of the spec and sites it was exported with ({self.spec})"
            )

    def bind(self, source: str | Path | Mapping[str, Any] | nn.Module) -> "OrtAdapterSession":
        """Make ``source`` the adapter of the following ``run`` calls (checked first)."""
        spec = None
        label = type(source).__name__
        if isinstance(source, nn.Module):
            st = state_of(source)
            if st is None or len(st.active) != 1:
                raise AdapterError(f"{type(source).__name__} must have exactly one active peftcompile adapter to bind")
            tensors = _arrays(adapter_params(source, st.active[0]), label)
            spec = st.specs[st.active[0]].to_dict()["method"]
        elif isinstance(source, Mapping):
            tensors = _arrays(source, label)
        else:
            label = str(source)
            tensors, spec = read_adapter_file(source)
        self.check(tensors, spec, label)
        if isinstance(source, (str, Path)) and Path(source).suffix == ".onnx_adapter":
            adapter = ort.LoraAdapter()
            adapter.Load(str(source))
            ro = ort.RunOptions()
            ro.add_active_adapter(adapter)
            self._adapter, self._run_options, self._feeds = adapter, ro, {}
        else:
            types = {i.name: i.type for i in self.session.get_inputs()}
            self._feeds = {k: v.astype(_ORT_TYPES.get(types.get(k), v.dtype), copy=False) for k, v in tensors.items()}
            self._adapter = self._run_options = None
        self.bound = label
        return self

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
            raise ValueError(f"{self.path.name} takes inputs {self.input_names}; missing {missing}, unknown {unknown}"
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
