"""Fused adapter ops (torch.library) with reference math on every device and Triton on CUDA."""

from . import ops  # noqa: F401  (registers torch.ops.peftcompile.*)
from . import dispatch_cuda  # noqa: F401  (CUDA kernels; imports triton lazily)
