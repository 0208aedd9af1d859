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
outside tensor inputs are x, the adapter parameters (named by their dynamo source), the
site's on/off gate (``SiteAdapterSet``'s ``peftcompile_gate`` buffer, multiplied into the
method's ``scale_params`` or into the adapter input) and the base output y. If y is a base linear of that same x with a frozen weight, and the
method has a lowering, the region is replaced; otherwise it stays (it is correct
reference math) and is counted as skipped, with the reason logged at debug level.

Counters (``torch._dynamo.utils.counters["peftcompile"]``): ``fused_<method>`` per
replaced region, ``skipped_<method>`` per region left as is (an ``nn.Embedding`` or ``nn.Conv1d/2d/3d``
site's region always is: its delta is a lookup / two convolutions, kept as reference math; so is a
parameter site's W + dW).
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
from ..modules import ANNOTATION_KEY, GATE, ROLE_KEY

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
_ADDS = {operator.add, torch.add}
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


_MATMULS = {operator.matmul, torch.matmul}


def _transposed_weight(t: Any) -> Node | None:
    """W for a node computing ``W.T`` / ``W.t()`` / ``torch.t(W)`` / ``W.transpose(0, 1)``."""
    if not isinstance(t, Node):
        return None
    if t.op == "call_function" and t.target is getattr and len(t.args) == 2 and t.args[1] in ("T", "mT"):
        w = t.args[0]
    elif (t.op == "call_method" and t.target == "t" and len(t.args) == 1) or \
            (t.op == "call_function" and t.target is torch.t and len(t.args) == 1):
        w = t.args[0]
    elif t.op == "call_method" and t.target == "transpose" and tuple(t.args[1:]) in ((0, 1), (1, 0), (-1, -2),
                                                                                     (-2, -1)):
        w = t.args[0]
    else:
        return None
    return w if isinstance(w, Node) else None


def _match_matmul(y: Node, x: Node) -> BaseMatch | None:
    """Matches ``y = x @ W.T`` (or ``torch.matmul(x, W.t())``), optionally ``+ b``: linears written
    as a matmul (Falcon's FalconLinear, hand-written modules)."""
    bias, nodes = None, []
    if y.op == "call_function" and y.target in _ADDS and len(y.args) == 2 and not y.kwargs:
        mm, bias = y.args
        if not isinstance(mm, Node) or len(mm.users) != 1:
            return None
        nodes.append(y)
        y = mm
    if not (y.op == "call_function" and y.target in _MATMULS and len(y.args) == 2 and not y.kwargs):
        return None
    xin, t = y.args
    w = _transposed_weight(t)
    if xin is not x or w is None:
        return None
    if bias is not None:
        bv = _val(bias)
        if not isinstance(bias, Node) or not isinstance(bv, torch.Tensor) or bv.dim() != 1:
            return None
    return BaseMatch(w, bias, False, [t, y, *nodes])


#: Tried in order; the first that accepts (y, x) wins.
BASE_PATTERNS: list[Callable[[Node, Node], "BaseMatch | None"]] = [_match_linear, _match_conv1d, _match_matmul]


# ---------------------------------------------------------------- regions
_PARAM_SOURCE = re.compile(r"_(?:parameters|buffers)\[['\"](\w+)['\"]\]$")
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
    return tag.get("site"), tag.get("slot")


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
    if n.op == "placeholder" and SUBGRAPH_PARAM in n.meta:  # an input of a HOP body (see lower_adapters_)
        return n.meta[SUBGRAPH_PARAM]
    if n.op == "placeholder":
        ga = n.meta.get("grapharg")
        src = getattr(getattr(ga, "source", None), "name", None)
        src = src() if callable(src) else src
        m = _PARAM_SOURCE.search(src or "")
        return m.group(1) if m else None
    return None


_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type"}
_MULS = {operator.mul, torch.mul}


def _is_cast(n: Node) -> bool:
    return (n.op == "call_method" and n.target in _CAST_METHODS) or \
        (n.op == "call_function" and n.target is torch.Tensor.to)


def _dropout_active(n: Node) -> bool | None:
    """None if ``n`` is no dropout; else whether it drops anything."""
    if n.op != "call_function" or n.target not in _DROPOUTS:
        return None
    p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
    training = n.args[2] if len(n.args) > 2 else n.kwargs.get("training", True)
    return bool(training) and p != 0  # a symbolic p counts as active


def _gates(n: Node, gate: Node | None) -> bool:
    """Whether ``n`` multiplies its first input by the site's gate."""
    return gate is not None and n.op == "call_function" and n.target in _MULS and len(n.args) == 2 \
        and n.args[1] is gate


def _adapter_input(x: Node, inside: set[Node], gate: Node | None = None) -> tuple[Node, bool, bool]:
    """Follow x through the adapter's own casts, dropout and gate (``dropout(x.to(dtype)) * gate``
    for methods without ``scale_params``): the node the adapter's math reads, whether it
    differs from x (an active dropout or the gate on the way), and whether the gate is in it."""
    cur, differs, gated = x, False, False
    while True:
        users = [u for u in cur.users if u in inside]
        if len(users) != 1 or not users[0].args or users[0].args[0] is not cur:
            return cur, differs, gated
        u = users[0]
        on = _dropout_active(u)
        if _gates(u, gate):
            gated = True
        elif on is None and not _is_cast(u):
            return cur, differs, gated
        differs = differs or bool(on) or gated
        cur = u


@dataclass
class Plan:
    """A checked region, ready to replace."""

    region: Region
    cfg: MethodConfig
    lowering: Lowering
    x: Node
    y: Node
    params: dict[str, Node]
    xa: Node | None  # the adapter's input when it is not x itself (an active dropout's output)
    compute_dtype: torch.dtype  # what the delta is computed in (autocast: its dtype, not the params')
    base: BaseMatch | None = None  # None: y is not a base linear (e.g. an earlier adapter's add)
    gate: Node | None = None  # the site's gate, to multiply into the method's scale_params again
    scale_params: tuple[str, ...] = ()


def _plan(region: Region) -> Plan:
    """Identify x, y, the parameters and the adapter input of a region; raise Skip if anything is off."""
    tag = region.tag
    method = get_method(tag["method"])
    lowering = method.lowering
    if tag.get("embedding"):
        raise Skip("nn.Embedding site: its delta (an embedding lookup) stays reference math")
    if tag.get("conv"):
        raise Skip("nn.Conv1d/2d/3d site: its delta (two convolutions) stays reference math")
    if tag.get("param"):
        raise Skip("parameter site: W + dW is read by the module's own forward, it stays reference math")
    if lowering is None:
        raise Skip(f"method {tag['method']!r} registers no lowering")
    cfg = config_from_dict(json.loads(tag["config"]))
    param_names = method.param_names(cfg)
    inside = set(region.nodes)
    for n in region.nodes[:-1]:
        if any(u not in inside for u in n.users):
            raise Skip(f"{n.name} (inside the delta) is also used outside it")
    xs, ys, params, gates = set(), set(), {}, set()
    for n in region.nodes:
        _, role = _tag(n)
        for i in _inputs(n):
            if i in inside or not isinstance(_val(i), torch.Tensor):
                continue  # region-internal, or a SymInt size under dynamic shapes
            name = _param_name(i)
            if role == "add":
                ys.add(i)
            elif name == GATE:
                gates.add(i)
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
    if len(gates) > 1:
        raise Skip(f"several gate inputs {sorted(map(str, gates))}")
    gate = next(iter(gates), None)
    end, differs, in_input = _adapter_input(x, inside, gate)
    xa = end if differs else None
    # the gate the region multiplies into its scale params (the op gets the raw ones: multiply again)
    scaled = tuple(k for k in method.scale_params if k in params) if gate is not None and not in_input else ()
    if gate is not None and not in_input and not scaled:
        raise Skip("the site's gate is neither on the adapter input nor on the method's scale_params")
    if xa is not None and not same_shape(_val(xa).shape, _val(x).shape):
        raise Skip(f"the adapter input {xa.name} does not have x's shape")
    # the delta's dtype: what ``delta.to(y.dtype)`` in the add casts from
    d = next(a for a in region.add.args if isinstance(a, Node) and a is not y)
    if _is_cast(d) and d in inside:
        d = d.args[0]
    dv = _val(d)
    if not isinstance(dv, torch.Tensor):
        raise Skip("missing example value on the delta")
    plan = Plan(region, cfg, lowering, x, y, params, xa, dv.dtype, gate=gate if scaled else None,
                scale_params=scaled)
    plan.base = next((m for m in (p(y, x) for p in BASE_PATTERNS) if m is not None), None)
    return plan


def _check_meta(plan: Plan) -> None:
    x, y, base, params = plan.x, plan.y, plan.base, plan.params
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
    floats = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    dtypes = {k: t.dtype for k, t in tensors.items()}
    if any(dt not in floats for dt in dtypes.values()) or plan.compute_dtype not in floats:
        raise Skip(f"non-float dtypes {dtypes}")
    adapter = {dtypes[k] for k in params}
    if len(adapter) != 1:
        raise Skip(f"the adapter's parameters have several dtypes {dtypes}")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise Skip(f"tensors on several devices {sorted(map(str, devices))}")
    why = plan.lowering.check(plan.cfg, {k: _val(v).shape for k, v in params.items()}, in_f, out_f)
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


def _cast(emit: Callable[..., Node], n: Node | None, dtype: torch.dtype) -> Node | None:
    if n is None or _val(n).dtype == dtype:
        return n
    return emit(torch.Tensor.to, n, dtype)


def _gated(emit: Callable[..., Node], n: Node, gate: Node | None) -> Node:
    return n if gate is None else emit(operator.mul, n, gate)


def _apply_(graph: fx.Graph, plans: list[Plan], order: dict[Node, int], replaced: dict[Node, Node]) -> None:
    """Replace the chain of regions ``plans`` (one site: the first on the base linear, each next
    one on the previous add) by one fused op. ``replaced`` maps the add nodes of regions
    replaced earlier to their ops: a region planned before may read one as its x."""
    head, last = plans[0], plans[-1]
    while head.x in replaced:
        head.x = replaced[head.x]
    add = last.region.add
    # The example values' own mode: the backend's tracing context may hold another one.
    fake_mode = getattr(_val(head.x), "fake_mode", None)
    if fake_mode is None:
        raise Skip("no fake mode on the example values")
    emitted: list[Node] = []
    with graph.inserting_before(add):
        emit = _emitter(graph, add, fake_mode, emitted)
        try:
            # Under autocast the base linear computes in y's dtype from x and W of another one:
            # the casts autocast would make, made explicit.
            bd = _val(head.y).dtype
            x = _cast(emit, head.x, bd)
            w = _cast(emit, head.base.weight, bd)
            b = _cast(emit, head.base.bias, bd)
            if head.base.transposed:
                w = emit(torch.t, w)
            # The adapter's tensors in the dtype its math runs in (autocast: the autocast dtype).
            cd = head.compute_dtype
            xa = _cast(emit, head.xa, cd)
            ps = [{k: _gated(emit, _cast(emit, v, cd), pl.gate if k in pl.scale_params else None)
                   for k, v in pl.params.items()} for pl in plans]
            if len(plans) == 1:
                fused = head.lowering.replace(emit, x, w, b, ps[0], head.cfg, xa)
            else:
                fused = head.lowering.stack(emit, x, w, b, list(zip(ps, [pl.cfg for pl in plans])))
                if isinstance(fused, str):
                    raise Skip(fused)
        except Exception as e:  # a lowering that cannot build its op leaves the graph as it was
            for n in reversed(emitted):
                graph.erase_node(n)
            if isinstance(e, Skip):
                raise
            raise Skip(f"building the fused op failed: {type(e).__name__}: {e}") from e
    add.replace_all_uses_with(fused)
    replaced[add] = fused
    nodes = [n for pl in plans for n in pl.region.nodes] + head.base.nodes
    for n in sorted(set(nodes), key=order.__getitem__, reverse=True):
        if not n.users:
            graph.erase_node(n)


def _chains(graph: fx.Graph, regions: list[Region]) -> list[tuple[list[Region], dict]]:
    """Group regions into per-site chains (several active adapters add up one after the other:
    ``((y + d_a) + d_b)``); each chain with its plans or the reason a region cannot be planned."""
    plans: dict[int, Plan | Skip] = {}
    for i, r in enumerate(regions):
        try:
            try:
                plans[i] = _plan(r)
            except Skip:
                raise
            except Exception as e:  # a malformed tag must not fail the whole compile
                raise Skip(f"unexpected {type(e).__name__} while matching: {e}") from e
        except Skip as why:
            plans[i] = why
    by_add = {r.add: i for i, r in enumerate(regions)}
    nxt: dict[int, int] = {}
    for i, p in plans.items():
        if isinstance(p, Plan) and p.base is None and p.y in by_add:
            j = by_add[p.y]
            q = plans[j]
            if isinstance(q, Plan) and q.x is p.x and regions[j].tag.get("site") == regions[i].tag.get("site"):
                nxt[j] = i
    followers = set(nxt.values())
    out = []
    for i in range(len(regions)):
        if i in followers:
            continue
        chain = [i]
        while chain[-1] in nxt:
            chain.append(nxt[chain[-1]])
        out.append(([regions[j] for j in chain], {regions[j].add: plans[j] for j in chain}))
    return out


def _stack_blocker(plans: list[Plan]) -> str | None:
    """Why the adapters of one site cannot share one op (None: they can)."""
    methods = {pl.region.tag.get("method") for pl in plans}
    if len(methods) > 1:
        return f"several active adapters of different methods {sorted(methods)} on one site"
    if plans[0].lowering.stack is None:
        return f"method {plans[0].region.tag.get('method')!r} cannot stack several adapters in one op"
    if any(pl.xa is not None for pl in plans):
        return "several active adapters with active dropout on one site: each draws its own mask"
    if len({pl.compute_dtype for pl in plans}) > 1 or len({_val(n).dtype for pl in plans for n in pl.params.values()}) > 1:
        return "several active adapters in different dtypes on one site"
    return None


def _count(ok: bool, plan_or_region, why: str = "") -> None:
    tag = plan_or_region.region.tag if isinstance(plan_or_region, Plan) else plan_or_region.tag
    method = tag.get("method")
    if ok:
        counters[COUNTER][f"fused_{method}"] += 1
    else:
        counters[COUNTER][f"skipped_{method}"] += 1
        log.debug("peftcompile: %s (running adapter #%s, %s) left as reference math: %s",
                  tag.get("site"), tag.get("slot"), method, why)


#: meta key on a HOP body's placeholder: the parameter name of the outer graph's operand it receives
SUBGRAPH_PARAM = "peftcompile_param"


def _lower_bodies_(gm: fx.GraphModule) -> None:
    """Lower the bodies of higher-order ops (activation checkpointing's ``tag_activation_checkpoint``
    wraps each checkpointed layer, adapters included, in a body subgraph): their placeholders are
    the HOP's operands, so each learns the outer operand's parameter name first."""
    for n in gm.graph.nodes:
        if n.op != "call_function" or not n.args or not isinstance(n.args[0], Node) or n.args[0].op != "get_attr":
            continue
        body = getattr(gm, n.args[0].target, None)
        if not isinstance(body, fx.GraphModule):
            continue
        placeholders = [p for p in body.graph.nodes if p.op == "placeholder"]
        for p, operand in zip(placeholders, n.args[1:]):
            name = _param_name(operand) if isinstance(operand, Node) else None
            if name is not None:
                p.meta[SUBGRAPH_PARAM] = name
        lower_adapters_(body)


def lower_adapters_(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every fusable adapter region of ``gm`` by a fused op (in place); returns gm.

    Several active adapters of one method on one site become one op (their factors
    concatenated along the rank, see :attr:`Lowering.stack`; counted ``stacked_sites``);
    where they cannot, the first is fused and the others stay reference math. The bodies
    of higher-order ops (gradient checkpointing) are lowered the same way.
    """
    _lower_bodies_(gm)
    graph = gm.graph
    regions = _regions(graph)
    if not regions:
        return gm
    order = {n: i for i, n in enumerate(graph.nodes)}
    replaced: dict[Node, Node] = {}
    for chain, plans in _chains(graph, regions):
        head = plans[chain[0].add]
        try:
            if isinstance(head, Skip):
                raise head
            if head.base is None:
                y = head.y
                raise Skip(f"the base output {y.name} ({y.op} {y.target}) is not a linear of the adapter's input "
                           f"{head.x.name}")
            _check_meta(head)
            rest = [plans[r.add] for r in chain[1:]]
            blocker = None
            if rest:
                blocker = next((f"running adapter #{r.tag.get('slot')}: {p}" for r, p in zip(chain[1:], rest)
                                if isinstance(p, Skip)), None) or _stack_blocker([head, *rest])
            if rest and blocker is None:
                try:
                    for p in rest:
                        p.base = head.base
                        _check_meta(p)
                    _apply_(graph, [head, *rest], order, replaced)
                except Skip as why:
                    blocker = str(why)
                else:
                    for p in [head, *rest]:
                        _count(True, p)
                    counters[COUNTER]["stacked_sites"] += 1
                    continue
                finally:
                    for p in rest:
                        if isinstance(p, Plan):
                            p.base = None
            _apply_(graph, [head], order, replaced)
        except Skip as why:
            for r in chain:
                _count(False, r, str(why))
            continue
        _count(True, head)
        for r in chain[1:]:
            _count(False, r, f"stays on top of the fused op of running adapter #{chain[0].tag.get('slot')}: {blocker}")
    # Only the replaced nodes are erased (in _apply_); no eliminate_dead_code() here, since
    # dynamo graphs carry nodes fx cannot tell are needed, and aot_autograd re-traces anyway.
    graph.lint()
    gm.recompile()
    return gm
