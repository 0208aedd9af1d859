"""Match: find the linear sites in captured graphs.

A site is a node computing ``x @ W.T + b`` with a parameter W of the model:
* ``call_module`` to an ``nn.Linear`` or HF ``Conv1D`` inside a whole-module graph;
* ``call_function`` to ``F.linear`` whose weight is a ``get_attr`` parameter;
* ``x @ W.T`` / ``torch.matmul(x, W.t())`` on a 2-D ``get_attr`` parameter W (a linear written
  as a matmul, e.g. Falcon-style modules): a ``functional`` site like ``F.linear``'s;
* a unit that is itself a linear module traced on its own (its output is the site).
Only when asked (explicit targets): ``call_module`` to an ``nn.Embedding`` (kind "embedding") or
an ``nn.Conv1d/2d/3d`` (kind "conv"; a linear on unfolded input patches, W viewed as
[out, in * prod(kernel)]).
Matchers are tried in order; the first that accepts a node wins.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .capture import Capture, Unit, is_conv_site, is_embedding_site, site_features, site_kind

__all__ = ["Site", "match", "HOST_ATTR", "EXPLICIT_KINDS"]

#: Site kinds that only an explicit target reaches (PEFT's "all-linear" leaves them out).
EXPLICIT_KINDS = ("embedding", "conv")

HOST_ATTR = "peftcompile"


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


@dataclass
class Site:
    """One linear site: where it is computed (unit, node) and where its adapters live (host)."""

    name: str  # qualified name, as summary() prints it
    # 'linear' | 'conv1d' (HF Conv1D) | 'functional' | 'embedding' (in = num_embeddings, out = embedding_dim)
    # | 'conv' (nn.Conv1d/2d/3d: in = in_channels * prod(kernel_size), out = out_channels)
    kind: str
    in_features: int
    out_features: int
    unit: Unit
    node_name: str  # name of the node producing the base output in unit.graph
    x_node_name: str  # name of the node holding the site input
    host_path: str  # qualified name of the module that owns W (and gets the adapters)
    weight_attr: str  # W's attribute name on the host
    host_attr: str  # attribute under which the SiteAdapterSet hangs on the host

    @property
    def host_rel(self) -> str:
        """Host path relative to the unit (what the graph's get_attr/call_module uses)."""
        rel = self.host_path[len(self.unit.path):].lstrip(".") if self.unit.path else self.host_path
        return rel

    def weight(self, model: nn.Module):
        return getattr(model.get_submodule(self.host_path), self.weight_attr)


Matcher = Callable[[Unit, fx.Node], "Site | None"]


def _kind(m: nn.Module) -> str | None:
    if is_embedding_site(m):
        return "embedding"
    if is_conv_site(m):
        return "conv"
    return site_kind(m)


def _match_call_module(unit: Unit, node: fx.Node) -> Site | None:
    if node.op != "call_module":
        return None
    m = unit.module.get_submodule(node.target)
    kind = _kind(m)
    if kind is None:
        return None
    in_f, out_f = site_features(m)
    path = _join(unit.path, node.target)
    return Site(path, kind, in_f, out_f, unit, node.name, node.args[0].name, path, "weight", HOST_ATTR)


_LINEAR_FNS = {F.linear, getattr(F.linear, "__wrapped__", F.linear)}


def _transposed_param(t) -> fx.Node | None:
    """The get_attr W of a node computing ``W.T`` / ``W.t()`` / ``torch.t(W)``."""
    if not isinstance(t, fx.Node):
        return None
    if t.op == "call_function" and t.target is getattr and len(t.args) == 2 and t.args[1] == "T":
        w = t.args[0]
    elif (t.op == "call_method" and t.target == "t") or (t.op == "call_function" and t.target is torch.t):
        w = t.args[0]
    else:
        return None
    return w if isinstance(w, fx.Node) and w.op == "get_attr" else None


def _match_functional(unit: Unit, node: fx.Node) -> Site | None:
    if node.op != "call_function":
        return None
    if node.target in _LINEAR_FNS:
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    elif node.target in (operator.matmul, torch.matmul) and len(node.args) == 2 and not node.kwargs:
        w = _transposed_param(node.args[1])  # x @ W.T is F.linear(x, W)
    else:
        return None
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    owner_rel, _, attr = w.target.rpartition(".")
    owner = unit.module.get_submodule(owner_rel)
    p = getattr(owner, attr)
    if not isinstance(p, nn.Parameter) or p.dim() != 2:
        return None
    host = _join(unit.path, owner_rel)
    name = host if attr == "weight" and host else _join(host, attr)
    host_attr = HOST_ATTR if attr == "weight" else f"{HOST_ATTR}_{attr}"
    x = node.args[0] if node.args else node.kwargs["input"]
    return Site(name, "functional", p.shape[1], p.shape[0], unit, node.name, x.name, host, attr, host_attr)


_MATCHERS: list[Matcher] = [_match_call_module, _match_functional]


def _site_unit(unit: Unit) -> Site:
    g = unit.graph
    x = next(n for n in g.nodes if n.op == "placeholder")
    out = next(n for n in g.nodes if n.op == "output").args[0]
    in_f, out_f = site_features(unit.module)
    kind = _kind(unit.module)
    return Site(unit.path, kind, in_f, out_f, unit, out.name, x.name, unit.path, "weight", HOST_ATTR)


def match(cap: Capture, *, explicit: bool = False) -> list[Site]:
    """Every linear site in the captured units, in graph order (a site called twice appears twice).
    ``explicit``: also the sites only explicit targets reach (:data:`EXPLICIT_KINDS`: ``nn.Embedding``
    and ``nn.Conv1d/2d/3d``)."""
    sites: list[Site] = []
    for unit in cap.units:
        if unit.is_site:
            sites.append(_site_unit(unit))
            continue
        for node in unit.graph.nodes:
            for m in _MATCHERS:
                s = m(unit, node)
                if s is not None:
                    sites.append(s)
                    break
    if not explicit:
        return [s for s in sites if s.kind not in EXPLICIT_KINDS]
    # an F.linear on the embedding's own weight (a tied LM head) is a site of the same name and
    # host: that name keeps meaning the linear site, as it did before embeddings were sites
    linear_names = {s.name for s in sites if s.kind not in EXPLICIT_KINDS}
    return [s for s in sites if s.kind not in EXPLICIT_KINDS or s.name not in linear_names]
