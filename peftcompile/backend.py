"""The ``peftcompile`` torch.compile backend: fuse adapter regions, inductor for the rest.

    model = torch.compile(model, backend="peftcompile")

Dynamo hands the backend a torch-level graph in which every adapter's nodes carry the
tag ``SiteAdapter.forward`` annotated them with. :func:`~peftcompile.passes.lower.lower_adapters_`
replaces each ``base linear + delta`` region by one ``torch.ops.peftcompile.*`` op, then
the graph goes to inductor's ``compile_fx`` (which runs aot_autograd): the ops'
registered autograd becomes the backward, and inductor compiles everything around them.
A model without adapters is compiled exactly as ``backend="inductor"`` would.

Where the op has no kernel for the device (CPU: only the reference math), running it
opaque would cost a python call per site and block inductor's fusion, so by default it
is decomposed back into its reference math inside aot_autograd: the forward and the
hand-written backward (no dW for the frozen base) are then compiled by inductor like
any other aten code. Where a kernel is registered (Triton on CUDA) it runs as is.

Options (``torch.compile(..., options={...})``; other keys go to inductor's config):
    "peftcompile.fuse": bool (default True): run the lowering pass at all.
    "peftcompile.decompose": "auto" | True | False (default "auto", see above).
    "peftcompile.compiler": "inductor" (default) | "aot_eager": aot_autograd without code
        generation, to check the lowering quickly (seconds instead of inductor's C++ builds).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch._inductor.config
import torch.fx as fx
from torch._dynamo import register_backend
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .kernels import ops
from .passes.lower import COUNTER, lower_adapters_

__all__ = ["peftcompile_backend", "FUSED_OPS"]

log = logging.getLogger(__name__)

#: The fused ops and their reference math (the decomposition used where no kernel exists),
#: as :mod:`peftcompile.kernels.ops` registers them.
FUSED_OPS: dict[torch._ops.OpOverload, Callable[..., Any]] = dict(ops.REFERENCES)


_OPTIONS = {"peftcompile.fuse": True, "peftcompile.decompose": "auto", "peftcompile.compiler": "inductor"}


def _split_options(options: dict | None) -> tuple[dict, dict]:
    options = dict(options or {})
    ours = {k: options.pop(k, v) for k, v in _OPTIONS.items()}
    unknown = [k for k in options if k.startswith("peftcompile.")]
    if unknown:
        raise ValueError(f"unknown peftcompile backend options {unknown}; known: {sorted(_OPTIONS)}")
    if ours["peftcompile.compiler"] not in ("inductor", "aot_eager"):
        raise ValueError(f"options['peftcompile.compiler'] must be 'inductor' or 'aot_eager', "
                         f"got {ours['peftcompile.compiler']!r}")
    if ours["peftcompile.decompose"] not in ("auto", True, False):
        raise ValueError(f"options['peftcompile.decompose'] must be 'auto', True or False, "
                         f"got {ours['peftcompile.decompose']!r}")
    return ours, options


def _decompositions(gm: fx.GraphModule, mode: Any) -> dict:
    """Reference-math decompositions for the fused ops used in ``gm`` that no device kernel serves."""
    if mode is False:
        return {}
    used = {n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in FUSED_OPS}
    if not used:
        return {}
    devices = {n.meta["example_value"].device.type for n in gm.graph.nodes if n.target in used}
    table = {}
    for op, ref in FUSED_OPS.items():
        name = op.name()
        served = all(torch._C._dispatch_has_kernel_for_dispatch_key(name, torch._C._dispatch_key_for_device(d))
                     for d in devices)
        if mode is True or not served:
            table[op] = ref
    return table


class _DecomposedOpsKey(CustomGraphPass):
    """Tells inductor's caches what they cannot see: which fused ops were decomposed into their
    reference math (inlined into the cached code) and the source of that math. Installed as
    the post-grad pre-pass; runs the user's own pre-pass, if there is one."""

    def __init__(self, decomposed: tuple[str, ...], inner: Callable | None) -> None:
        self.decomposed, self.inner = decomposed, inner

    def __call__(self, graph: fx.Graph) -> None:
        if self.inner is not None:
            self.inner(graph)

    def uuid(self) -> Any | None:
        inner = None
        if self.inner is not None:
            inner = self.inner.uuid() if hasattr(self.inner, "uuid") else None
            if inner is None:
                return None  # an opaque user pass: no caching, as inductor does for it
        return (get_hash_for_files(_SOURCES), self.decomposed, inner)


_ROOT = Path(__file__).resolve().parent
# The decompositions are the reference math: any change to the ops or to the low-rank products
# they are written with must invalidate inductor's cache.
_SOURCES = tuple(str(_ROOT / f) for f in ("backend.py", "kernels/ops.py", "methods/lowrank.py", "passes/lower.py"))


def peftcompile_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                        options: dict | None = None) -> Callable:
    """torch.compile backend: lower adapter regions to fused ops, compile the rest with inductor."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    ours, inductor_options = _split_options(options)
    if ours["peftcompile.fuse"]:
        lower_adapters_(gm)
    if ours["peftcompile.compiler"] == "aot_eager":
        # aot_autograd without code generation: the ops (and their autograd) run as registered.
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    decomps = _decompositions(gm, ours["peftcompile.decompose"])
    if decomps:
        torch._dynamo.utils.counters[COUNTER]["decomposed_graphs"] += 1
        log.debug("peftcompile: no device kernel for %s; inductor compiles their reference math",
                  sorted(op.name() for op in decomps))
        decomps = {**select_decomp_table(), **decomps}
    patches = {**(list_mode_options(mode) if mode else {}), **inductor_options}
    if decomps:
        inner = patches.get("post_grad_custom_pre_pass", torch._inductor.config.post_grad_custom_pre_pass)
        names = tuple(sorted(op.name() for op in decomps if op in FUSED_OPS))
        patches["post_grad_custom_pre_pass"] = _DecomposedOpsKey(names, inner)
    return compile_fx(gm, example_inputs, config_patches=patches or None, decompositions=decomps or None)


def _installed_as_entry_point() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == BACKEND_NAME for ep in entry_points(group="torch_dynamo_backends"))


BACKEND_NAME = "peftcompile"
# When the package is installed, dynamo registers the backend itself from the
# ``torch_dynamo_backends`` entry point on the first lookup (loading this module), and
# would raise "duplicate name" had the import already registered it.
if not _installed_as_entry_point():
    register_backend(compiler_fn=peftcompile_backend, name=BACKEND_NAME)
