"""Export an adapted model: ONNX merged (deltas folded) or unmerged (adapter as named inputs).

``to_onnx`` writes the file; ``OrtAdapterSession`` runs an unmerged export with onnxruntime
and binds adapters after checking them against the graph.
"""

from .onnx import (
    AdapterInput,
    OnnxExport,
    OnnxExportError,
    RANK_AXES,
    adapter_tensors,
    default_dynamic_axes,
    read_metadata,
    register_rank_axes,
    to_onnx,
)
from .ort import OrtAdapterSession, read_adapter_file, write_ort_adapter, write_sidecar

__all__ = [
    "to_onnx",
    "OnnxExport",
    "AdapterInput",
    "OnnxExportError",
    "OrtAdapterSession",
    "RANK_AXES",
    "register_rank_axes",
    "default_dynamic_axes",
    "adapter_tensors",
    "read_metadata",
    "read_adapter_file",
    "write_ort_adapter",
    "write_sidecar",
]
