"""Lower: swap each tagged ``base linear + adapter delta`` region for one fused op.

Why: ``adapt`` writes every adapter as reference math (``y = linear(x, W, b)`` then
``y + delta(x).to(y.dtype)``) so eager, export and ONNX need nothing special. Under
``torch.compile`` that math costs a second read of x, a materialised intermediate (k
times larger for GraLoRA) and a separate add; ``torch.ops.peftcompile.*`` computes the
same function in one op, with a hand-written backward that never forms the frozen
base's dW. This pass runs on the torch-level graph dynamo hands the backend, before
aot_autograd, so the ops' registered autograd is what the joint graph traces.

How a region is found: ``SiteAdapter.forward`` runs under
``torch.fx.traceback.annotate``, which dynamo keeps as ``node.meta["custom"]``:
``{"peftcompile": tag, "peftcompile_role": "delta" | "add"}``. Walking back from each
tagged add node through nodes with the same (site, adapter) tag gives one region; its
outside tensor inputs are x, the adapter parameters (named by their dynamo source) and
the base output y. If y is a base linear of that same x with a frozen weight, and the
method has a lowering, the region is replaced; otherwise it stays (it is correct
reference math) and is counted as skipped, with the reason logged at debug level.

Counters (``torch._dynamo.utils.counters["peftcompile"]``): ``fused_<method>`` per
replaced region, ``skipped_<method>`` per region left as is.
"""

from __future__ import annotations

import json
import logging
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._dynamo.utils import counters

from .. import kernels  # noqa: F401  (registers torch.ops.peftcompile.*)
from ..methods import Lowering, MethodConfig, config_from_dict, get_method
from ..methods.registry import same_shape
from ..modules import ANNOTATION_KEY, ROLE_KEY

__all__ = ["lower_adapters_", "COUNTER", "BASE_PATTERNS"]

log = logging.getLogger(__name__)

#: Key of ``torch._dynamo.utils.counters`` this pass counts under.
COUNTER = "peftcompile"

Node = fx.Node


# ---------------------------------------------------------------- base patterns
@dataclass
class BaseMatch:
    """The base computation producing y from x: W ([out, in] unless transposed), bias, its nodes."""

    weight: Node
    bias: Node | None
    transposed: bool
    nodes: list[Node]


_LINEAR = {torch._C._nn.linear, F.linear}
_RESHAPE_METHODS = {"view", "reshape"}


def _is_reshape(n: Any) -> bool:
    return isinstance(n, Node) and (
        (n.op == "call_method" and n.target in _RESHAPE_METHODS)
        or (n.op == "call_function" and n.target is torch.reshape)
    )


def _match_linear(y: Node, x: Node) -> BaseMatch | None:
    """Matches ``y = torch._C._nn.linear(x, W, b)`` (nn.Linear and F.linear sites)."""
    if y.op != "call_function" or y.target not in _LINEAR:
        return None
    args = list(y.args) + [None] * (3 - len(y.args))
    xin = args[0] if args[0] is not None else y.kwargs.get("input")
    w = args[1] if args[1] is not None else y.kwargs.get("weight")
    b = args[2] if args[2] is not None else y.kwargs.get("bias")
    if xin is not x or not isinstance(w, Node):
        return None
    return BaseMatch(w, b, False, [y])


def _match_conv1d(y: Node, x: Node) -> BaseMatch | None:
    """Matches HF Conv1D: ``y = addmm(b, x.view(-1, in), W).view(*x.shape[:-1], out)``, W [in, out]."""
    if not _is_reshape(y):
        return None
    mm = y.args[0]
    if not (isinstance(mm, Node) and mm.op == "call_function" and mm.target is torch.addmm
            and len(mm.args) == 3 and not mm.kwargs):
        return None
    b, x2, w = mm.args
    if not (_is_reshape(x2) and x2.args[0] is x and isinstance(w, Node)):
        return None
    return BaseMatch(w, b, True, [x2, mm, y])


#: Tried in order; the first that accepts (y, x) wins.
BASE_PATTERNS: list[Callable[[Node, Node], "BaseMatch | None"]] = [_match_linear, _match_conv1d]


# ---------------------------------------------------------------- regions
_PARAM_SOURCE = re.compile(r"_parameters\[['\"](\w+)['\"]\]$")
_ADDS = {operator.add, torch.add}
_DROPOUTS = {F.dropout, torch.dropout, torch.nn.functional.dropout}


class Skip(Exception):
    """A region that stays as reference math; the message says why."""


@dataclass
class Region:
    tag: dict
    add: Node
    nodes: list[Node] = field(default_factory=list)  # graph order, add last


def _tag(n: Node) -> tuple[dict | None, str | None]:
    c = n.meta.get("custom") or {}
    return c.get(ANNOTATION_KEY), c.get(ROLE_KEY)


def _key(tag: dict) -> tuple:
    return tag.get("site"), tag.get("adapter")


def _val(n: Any) -> Any:
    return n.meta.get("example_value", n.meta.get("val")) if isinstance(n, Node) else n


def _inputs(n: Node) -> list[Node]:
    return list(n.all_input_nodes)


def _regions(graph: fx.Graph) -> list[Region]:
    """One region per tagged add node: the connected tagged nodes above it."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    out = []
    for n in graph.nodes:
        tag, role = _tag(n)
        if role != "add" or n.op != "call_function" or n.target not in _ADDS:
            continue
        seen, stack = {n}, [n]
        while stack:
            for i in _inputs(stack.pop()):
                t, r = _tag(i)
                if i in seen or t is None or r not in ("delta", "add") or i.op in ("placeholder", "get_attr"):
                    continue
                if _key(t) != _key(tag) or (r == "add" and i.target in _ADDS):
                    continue  # another site, or the sink of an earlier call of this same site
                seen.add(i)
                stack.append(i)
        out.append(Region(tag, n, sorted(seen, key=order.__getitem__)))
    return out


def _param_name(n: Node) -> str | None:
    if n.op == "get_attr":
        return n.target.rpartition(".")[2]
    if n.op == "placeholder":
        ga = n.meta.get("grapharg")
        src = getattr(getattr(ga, "source", None), "name", None)
        src = src() if callable(src) else src
        m = _PARAM_SOURCE.search(src or "")
        return m.group(1) if m else None
    return None


@dataclass
class Plan:
    """A checked region, ready to replace."""

    region: Region
    cfg: MethodConfig
    lowering: Lowering
    x: Node
    base: BaseMatch
    params: dict[str, Node]


def _plan(region: Region) -> Plan:
    """Identify x, y, the parameters and the base of a region; raise Skip if anything is off."""
    tag = region.tag
    method = get_method(tag["method"])
    lowering = method.lowering
    if lowering is None:
        raise Skip(f"method {tag['method']!r} registers no lowering")
    cfg = config_from_dict(json.loads(tag["config"]))
    param_names = method.param_names(cfg)
    inside = set(region.nodes)
    for n in region.nodes[:-1]:
        if any(u not in inside for u in n.users):
            raise Skip(f"{n.name} (inside the delta) is also used outside it")
    xs, ys, params = set(), set(), {}
    for n in region.nodes:
        _, role = _tag(n)
        if n.op == "call_function" and n.target in _DROPOUTS:
            p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
            training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", True)
            if training and p > 0:
                raise Skip(f"adapter dropout p={p} is active (training); the fused op has no dropout")
        for i in _inputs(n):
            if i in inside or not isinstance(_val(i), torch.Tensor):
                continue  # region-internal, or a SymInt size under dynamic shapes
            name = _param_name(i)
            if role == "add":
                ys.add(i)
            elif name is not None and name in param_names:
                params[name] = i
            else:
                xs.add(i)
    missing = param_names - set(params)
    if missing:
        raise Skip(f"could not identify the adapter parameters {sorted(missing)} among the graph inputs")
    if len(xs) != 1 or len(ys) != 1:
        raise Skip(f"expected one input x and one base output y, found x={sorted(map(str, xs))}, "
                   f"y={sorted(map(str, ys))}")
    (x,), (y,) = xs, ys
    if len(y.users) != 1:
        raise Skip(f"the base output {y.name} is used outside the adapter add")
    base = next((m for m in (p(y, x) for p in BASE_PATTERNS) if m is not None), None)
    if base is None:
        raise Skip(f"the base output {y.name} ({y.op} {y.target}) is not a linear of the adapter's input {x.name}")
    _check_meta(x, y, base, params, lowering, cfg)
    return Plan(region, cfg, lowering, x, base, params)


def _check_meta(x: Node, y: Node, base: BaseMatch, params: dict[str, Node], lowering: Lowering,
                cfg: MethodConfig) -> None:
    xv, yv, wv = _val(x), _val(y), _val(base.weight)
    if not all(isinstance(t, torch.Tensor) for t in (xv, yv, wv)):
        raise Skip("missing example values on x, y or W")
    if wv.requires_grad:
        raise Skip("the base weight requires grad (full fine-tune); the fused op's kernels assume a frozen base")
    if wv.dim() != 2:
        raise Skip(f"base weight is {wv.dim()}-D")
    out_f, in_f = (wv.shape[1], wv.shape[0]) if base.transposed else (wv.shape[0], wv.shape[1])
    if xv.dim() < 1 or not same_shape(xv.shape[-1:], (in_f,)) or not same_shape(yv.shape, (*xv.shape[:-1], out_f)):
        raise Skip(f"shapes x {tuple(xv.shape)}, W {tuple(wv.shape)}, y {tuple(yv.shape)} are not a linear site")
    tensors = {"x": xv, "y": yv, "W": wv, **{k: _val(v) for k, v in params.items()}}
    if base.bias is not None:
        bv = _val(base.bias)
        if not isinstance(bv, torch.Tensor) or not same_shape(bv.shape, (out_f,)):
            raise Skip(f"bias of shape {getattr(bv, 'shape', None)} does not fit out_features={out_f}")
        tensors["bias"] = bv
    dtypes = {k: t.dtype for k, t in tensors.items()}
    if len(set(dtypes.values())) != 1:
        raise Skip(f"mixed dtypes {dtypes}; the fused op computes in one dtype")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise Skip(f"tensors on several devices {sorted(map(str, devices))}")
    why = lowering.check(cfg, {k: _val(v).shape for k, v in params.items()}, in_f, out_f)
    if why:
        raise Skip(why)


# ---------------------------------------------------------------- rewrite
def _emitter(graph: fx.Graph, like: Node, fake_mode, emitted: list[Node]) -> Callable[..., Node]:
    """Insert call_function nodes before ``like``, with example values and the region's tag."""

    def emit(target, *args):
        n = graph.call_function(target, args)
        emitted.append(n)
        n.meta["custom"] = {**(like.meta.get("custom") or {}), ROLE_KEY: "fused"}
        for k in ("stack_trace", "nn_module_stack", "source_fn_stack"):
            if k in like.meta:
                n.meta[k] = like.meta[k]
        vals = fx.node.map_arg(args, _val)
        with fake_mode:
            n.meta["example_value"] = target(*vals)
        return n

    return emit


def _apply_(graph: fx.Graph, plan: Plan, order: dict[Node, int]) -> None:
    add = plan.region.add
    # The example values' own mode: the backend's tracing context may hold another one.
    fake_mode = getattr(_val(plan.x), "fake_mode", None)
    if fake_mode is None:
        raise Skip("no fake mode on the example values")
    emitted: list[Node] = []
    with graph.inserting_before(add):
        emit = _emitter(graph, add, fake_mode, emitted)
        try:
            w = emit(torch.t, plan.base.weight) if plan.base.transposed else plan.base.weight
            fused = plan.lowering.replace(emit, plan.x, w, plan.base.bias, plan.params, plan.cfg)
        except Exception as e:  # a lowering that cannot build its op leaves the graph as it was
            for n in reversed(emitted):
                graph.erase_node(n)
            raise Skip(f"building the fused op failed: {type(e).__name__}: {e}") from e
    add.replace_all_uses_with(fused)
    for n in sorted(plan.region.nodes + plan.base.nodes, key=order.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)


def lower_adapters_(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every fusable adapter region of ``gm`` by a fused op (in place); returns gm."""
    graph = gm.graph
    regions = _regions(graph)
    if not regions:
        return gm
    order = {n: i for i, n in enumerate(graph.nodes)}
    for region in regions:
        method, site = region.tag.get("method"), region.tag.get("site")
        try:
            try:
                plan = _plan(region)
            except Skip:
                raise
            except Exception as e:  # a malformed tag must not fail the whole compile
                raise Skip(f"unexpected {type(e).__name__} while matching: {e}") from e
            _apply_(graph, plan, order)
        except Skip as why:
            counters[COUNTER][f"skipped_{method}"] += 1
            log.debug("peftcompile: %s (adapter %r, %s) left as reference math: %s",
                      site, region.tag.get("adapter"), method, why)
            continue
        counters[COUNTER][f"fused_{method}"] += 1
    # Only the replaced nodes are erased (in _apply_); no eliminate_dead_code() here, since
    # dynamo graphs carry nodes fx cannot tell are needed, and aot_autograd re-traces anyway.
    graph.lint()
    gm.recompile()
    return gm
