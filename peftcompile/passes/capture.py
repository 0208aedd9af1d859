"""Capture: trace a model into fx graphs at the largest granularity that is safe.

Why not one whole-model trace: every HF ``*Model``/decoder layer/attention module
fails ``symbolic_trace`` (decorated forwards, Proxy unpacking), and tracing an owner
module freezes ``self.training``, optional-arg ``None`` checks and the attention
implementation into the graph (see shared/design.md). So:

* plain modules (no ``transformers`` class anywhere below them) are traced whole, and
  only kept when the train-mode and eval-mode traces are identical;
* everything else falls back to its children, down to the linear sites themselves,
  which are traced one by one (``nn.Linear`` / HF ``Conv1D``).

Each traced region is a :class:`Unit`; the rewrite binds the regenerated forward to
the same module instance.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

__all__ = ["Unit", "Capture", "capture", "is_site_module", "is_embedding_site", "embed_scale", "is_conv_site", "site_kind",
           "Tracer"]

try:  # HF GPT-2 and friends: a linear layer with W stored as [in, out]
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except Exception:  # pragma: no cover - transformers is a dependency, but stay importable
    _HFConv1D = None

# Ordered dispatch: first match wins. (class, kind)
_SITE_KINDS: list[tuple[type, str]] = [(nn.Linear, "linear")]
if _HFConv1D is not None:
    _SITE_KINDS.append((_HFConv1D, "conv1d"))


def site_kind(m: nn.Module) -> str | None:
    """'linear' / 'conv1d' when ``m`` is a linear site module, else None."""
    for cls, kind in _SITE_KINDS:
        if isinstance(m, cls):
            return kind
    return None


def is_embedding_site(m: nn.Module) -> bool:
    """An ``nn.Embedding`` whose output is its lookup, optionally times a scalar ``embed_scale``
    (Gemma's scaled embeddings; PEFT scales the adapter's output by it too): a site of kind
    "embedding" that match() reports only when asked (an explicit target names it). Other
    subclasses that override forward may reshape or mix the lookup: not sites."""
    if not isinstance(m, nn.Embedding):
        return False
    return type(m).forward is nn.Embedding.forward or embed_scale(m) is not None


def embed_scale(m: nn.Module) -> float | None:
    """The scalar ``embed_scale`` of a scaled embedding subclass (PEFT's ``_get_embed_scale``), or None."""
    s = getattr(m, "embed_scale", None)
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    if isinstance(s, torch.Tensor) and s.numel() == 1 and s.is_floating_point():
        return float(s)
    return None


#: The convolutions that are sites (exact classes, as for embeddings: a subclass may change its
#: weight or input in forward, e.g. weight standardisation).
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv_site(m: nn.Module) -> bool:
    """A plain ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``: a site of kind "conv" that match()
    reports only when asked (an explicit target names it; PEFT's "all-linear" leaves convs out)."""
    return type(m) in CONV_TYPES


def is_site_module(m: nn.Module) -> bool:
    return site_kind(m) is not None or is_embedding_site(m) or is_conv_site(m)


def site_features(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a site module (an embedding: (num_embeddings, embedding_dim),
    its weight [num, dim] being the [in, out] matrix of a linear on one-hot ids; a conv:
    (in_channels / groups * prod(kernel_size), out_channels), its weight [out, in, *k] flattened to
    the [out, in * prod(k)] matrix of a linear on the unfolded input patches)."""
    w = m.weight
    if is_conv_site(m):
        return math.prod(w.shape[1:]), w.shape[0]
    transposed = site_kind(m) == "conv1d" or is_embedding_site(m)
    return (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])


class Tracer(fx.Tracer):
    """fx tracer that keeps linear sites (incl. Conv1D) as call_module leaves, and modules holding
    stacked (3-D) parameters too: their forward must run as a call, where a parameter site's hooks
    put W + dW in place (passes/params.py)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        stacked = any(p is not None and p.dim() == 3 for p in m._parameters.values())  # (torch.nn layers: leaves anyway)
        return is_site_module(m) or stacked or super().is_leaf_module(m, qualname)


@dataclass
class Unit:
    """A module whose (class) forward was traced into ``graph``; ``path`` is its qualified name."""

    path: str
    module: nn.Module
    graph: fx.Graph
    is_site: bool  # the unit is one linear site traced on its own


@dataclass
class Capture:
    units: list[Unit]
    failures: dict[str, str] = field(default_factory=dict)  # module path -> why it was not traced whole


def _is_hf(m: nn.Module) -> bool:
    return type(m).__module__.startswith("transformers.")


def _has_sites(m: nn.Module) -> bool:
    if any(is_site_module(x) for x in m.modules()):
        return True
    return any(p.dim() == 2 for p in m.parameters())  # F.linear candidates


def trace(m: nn.Module) -> fx.Graph:
    """Trace the class forward of ``m`` (not an instance forward bound by a rewrite)."""
    return Tracer().trace(m)


def _trace_both_modes(m: nn.Module) -> fx.Graph:
    """Trace in train and eval mode; refuse graphs that froze ``self.training`` or another
    run-time Python attribute (a flag, a dtype) read by ``forward``."""
    was = [(x, x.training) for x in m.modules()]
    try:
        m.train(True)
        with _attribute_reads(m) as reads:
            g_train = trace(m)
        m.train(False)
        g_eval = trace(m)
    finally:
        for x, t in was:
            x.training = t
    if g_train.python_code("self").src != g_eval.python_code("self").src:
        raise RuntimeError("its traced graph depends on train/eval mode (self.training was frozen)")
    frozen = sorted(reads)
    if frozen:
        raise RuntimeError(f"its forward reads Python attributes that a trace would freeze: {frozen[:4]}")
    return g_eval


#: Attribute values a whole-module trace may bake in: sizes and other structure (changing a
#: layer's width after construction breaks the module anyway). Flags, dtypes, devices,
#: floats and strings are run-time switches: a module reading them is captured per site.
_STRUCTURAL = (int,)


def _structural(v: object) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, _STRUCTURAL):
        return True
    return isinstance(v, tuple) and all(_structural(i) for i in v)


@contextmanager
def _attribute_reads(root: nn.Module):
    """Record ``self.<name>`` reads of plain instance attributes during a trace: the module
    classes are swapped, for the trace only, for subclasses whose ``__getattribute__``
    notes reads of non-structural values (see :data:`_STRUCTURAL`)."""
    reads: set[str] = set()
    swapped = []
    paths = {id(x): n for n, x in root.named_modules()}

    def hook(self, name):
        v = object.__getattribute__(self, name)
        if not name.startswith("_") and name != "training":
            d = object.__getattribute__(self, "__dict__")
            if name in d and not isinstance(v, (nn.Module, torch.Tensor)) and not callable(v) and not _structural(v):
                path = paths.get(id(self), "")
                reads.add(f"{path}.{name}" if path else f"self.{name}")
        return v

    for x in root.modules():
        if is_site_module(x) or type(x).__module__.startswith("torch.nn"):
            continue  # leaves: not traced into
        cls = type(x)
        # a fresh subclass per trace: its hook closes over this trace's ``reads``
        sub = type(cls.__name__, (cls,), {"__getattribute__": hook, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
        swapped.append((x, cls))
        x.__class__ = sub
    try:
        yield reads
    finally:
        for x, cls in swapped:
            x.__class__ = cls



def capture(model: nn.Module) -> Capture:
    """Find the traceable units of ``model``; does not modify it."""
    units: list[Unit] = []
    failures: dict[str, str] = {}

    def visit(path: str, m: nn.Module) -> None:
        if is_site_module(m):
            units.append(Unit(path, m, trace(m), True))
            return
        if not _has_sites(m):
            return
        if any(_is_hf(x) for x in m.modules()):
            reason = "HF modules are captured per linear site (their forwards do not trace safely)"
        else:
            try:
                units.append(Unit(path, m, _trace_both_modes(m), False))
                return
            except Exception as e:  # fx raises many types; the message is what matters
                reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        failures[path] = reason
        for name, child in m.named_children():
            if name.startswith("peftcompile"):  # our own adapter containers (on untraced hosts): never sites
                continue
            visit(f"{path}.{name}" if path else name, child)

    visit("", model)
    return Capture(units, failures)
