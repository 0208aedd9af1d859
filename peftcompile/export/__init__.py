"""Export an adapted model: ONNX merged (deltas folded) or unmerged (adapter as named inputs).

``to_onnx`` writes the file (:mod:`.onnx`); the side files' formats live in :mod:`.formats`;
``OrtAdapterSession`` runs an unmerged export with onnxruntime and binds adapters after
checking them against the graph and the export's fingerprint (:mod:`.ort`); adapters written
for an export are stamped with it (``write_ort_adapter(..., export=)``). ``to_genai`` builds
an onnxruntime-genai folder (KV cache, tokenizer, generation loop) with switchable adapters
(:mod:`.genai`).
"""

from .formats import (AdapterFile, AdapterInput, export_fingerprint, read_adapter, read_adapter_file, read_metadata,
                      write_ort_adapter, write_sidecar)
from .genai import GenaiAdapters, GenaiExport, to_genai
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
    "read_adapter",
    "AdapterFile",
    "export_fingerprint",
    "write_ort_adapter",
    "write_sidecar",
]
