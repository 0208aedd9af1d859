"""Export an adapted model: ONNX merged (deltas folded) or unmerged (adapter as named inputs).

``to_onnx`` writes the file (:mod:`.onnx`); the side files' formats live in :mod:`.formats`;
``OrtAdapterSession`` runs an unmerged export with onnxruntime and binds adapters after
checking them against the graph (:mod:`.ort`). ``to_genai`` builds an onnxruntime-genai
folder (KV cache, tokenizer, generation loop) with switchable adapters (:mod:`.genai`).
"""

from .genai import GenaiAdapters, GenaiExport, to_genai
from .formats import AdapterInput, read_adapter_file, read_metadata, write_ort_adapter, write_sidecar
from .onnx import OnnxExport, OnnxExportError, default_dynamic_axes, to_onnx
from .ort import OrtAdapterSession

__all__ = [
    "to_onnx",
    "to_genai",
    "GenaiExport",
    "GenaiAdapters",
    "OnnxExport",
    "AdapterInput",
    "OnnxExportError",
    "OrtAdapterSession",
    "default_dynamic_axes",
    "read_metadata",
    "read_adapter_file",
    "write_ort_adapter",
    "write_sidecar",
]
