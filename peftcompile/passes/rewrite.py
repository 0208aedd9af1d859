"""Rewrite: turn each adapted site node into ``base(x) + delta(x)`` and bind the graph.

After the base node ``y = site(x)`` it inserts ``y' = host.peftcompile(y, x)`` (a
``call_module`` to the site's :class:`~peftcompile.modules.SiteAdapterSet`), so the
delta is read through the live module at run time: dropout follows train/eval,
adapters can be switched or merged without retracing, and parameters replaced on the
module (``.to()``, loading) are seen. The regenerated code is bound to the same
module instance through :class:`GraphForward`, which keeps the model's class, its
``isinstance`` checks, ``state_dict`` keys, deep-copy and pickle.
"""

from __future__ import annotations

import itertools
import linecache
import types
from typing import Any, Iterable

import torch.fx as fx
from torch import nn

from .capture import Unit
from .match import Site

__all__ = ["GraphForward", "rewrite_unit_", "restore_unit_"]

_counter = itertools.count()


def _compile(src: str, globals_: dict[str, Any]) -> types.FunctionType:
    # A linecache entry makes tracebacks (and dynamo) show the generated source.
    fname = f"<peftcompile-forward-{next(_counter)}>"
    linecache.cache[fname] = (len(src), None, src.splitlines(True), fname)
    g = dict(globals_)
    exec(compile(src, fname, "exec"), g)
    return g["forward"]


class GraphForward:
    """The rewritten forward of one module instance: callable, deep-copyable, picklable.

    Pickles as its generated source and globals (functions by reference), since an
    exec'd function cannot be pickled by itself.
    """

    def __init__(self, module: nn.Module, graph: fx.Graph) -> None:
        code = graph.python_code(root_module="self")
        self.module = module
        self.src = code.src
        self.globals = dict(code.globals)
        self.fn = _compile(self.src, self.globals)

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)

    def __getstate__(self) -> dict:
        g = {k: ("__module__", v.__name__) if isinstance(v, types.ModuleType) else v for k, v in self.globals.items()}
        return {"module": self.module, "src": self.src, "globals": g}

    def __setstate__(self, state: dict) -> None:
        import importlib

        g = {}
        for k, v in state["globals"].items():
            if isinstance(v, tuple) and len(v) == 2 and v[0] == "__module__":
                v = importlib.import_module(v[1])
            g[k] = v
        self.module, self.src, self.globals = state["module"], state["src"], g
        self.fn = _compile(self.src, g)

    def __repr__(self) -> str:
        return f"GraphForward({type(self.module).__name__})"


def rewrite_unit_(unit: Unit, sites: Iterable[Site]) -> fx.Graph:
    """Insert the adapter call after every site node of ``unit`` (in place on unit.graph)
    and bind the regenerated forward to ``unit.module``. Returns the graph."""
    g = unit.graph
    nodes = {n.name: n for n in g.nodes}
    adapted: dict[fx.Node, fx.Node] = {}
    for s in sites:
        y, x = nodes[s.node_name], nodes[s.x_node_name]
        x = adapted.get(x, x)  # a site fed by an earlier site (fc(fc(x))) reads its adapted output
        target = ".".join(p for p in (s.host_rel, s.host_attr) if p)
        with g.inserting_after(y):
            out = g.call_module(target, (y, x))
        y.replace_all_uses_with(out, delete_user_cb=lambda u: u is not out)
        adapted[y] = out
    g.lint()
    unit.module.forward = GraphForward(unit.module, g)
    return g


def restore_unit_(module: nn.Module) -> None:
    """Give the module its class forward back (undo rewrite_unit_)."""
    if isinstance(module.__dict__.get("forward"), GraphForward):
        del module.__dict__["forward"]
