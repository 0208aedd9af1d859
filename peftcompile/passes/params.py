"""Parameter sites: parameters a module uses itself, targeted by name (PEFT's ``target_parameters``).

Transformers-5 MoE layers keep their experts as one stacked tensor (Mixtral's
``experts.gate_up_proj`` [experts, 2*inter, hidden], ``experts.down_proj`` [experts, hidden,
inter]) and routers read a 2-D ``weight`` with ``F.linear`` inside a forward that cannot be
traced. There is no linear call to rewrite: the adapter changes the weight the module reads
(``W + dW``, see :class:`~peftcompile.modules.ParamAdapterSet`), as PEFT's ``ParamWrapper`` does.

Names follow PEFT's rule (``tuners_utils.BaseTuner._inject_parameters``): the key
``<module>.<param>`` of a parameter registered on the module itself is selected when it equals
a target or ends with ``.<target>``. Layout as PEFT's ``ParamWrapper._get_in_out_features``:
a 2-D W is [out, in]; a 3-D W is [experts, out, in], or [experts, in, out] when the module says
``is_transposed``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from ..spec import param_targeted
from .match import HOST_ATTR, Site

__all__ = ["param_layout", "match_parameters", "parameter_keys", "param_host_attr", "stacked_parameters",
           "builtin_layer"]


def param_host_attr(param: str) -> str:
    """Attribute of the host under which a parameter site's adapters hang."""
    return f"{HOST_ATTR}_{param}"


def param_layout(host: nn.Module, w: torch.Tensor) -> dict:
    """{"experts", "ndim", "transposed", "in", "out"} of W as PEFT reads it."""
    if w.dim() == 2:
        return {"experts": 1, "ndim": 2, "transposed": False, "in": w.shape[1], "out": w.shape[0]}
    transposed = bool(getattr(host, "is_transposed", False))
    e, a, b = w.shape
    return {"experts": e, "ndim": 3, "transposed": transposed, "in": a if transposed else b,
            "out": b if transposed else a}


def _ours(name: str) -> bool:
    """A module or parameter of peftcompile's own containers (never a target)."""
    return any(part.startswith(HOST_ATTR) for part in name.split("."))


def parameter_keys(model: nn.Module) -> Iterable[tuple[str, str, str, nn.Parameter]]:
    """(key, module path, param name, param) of every parameter registered directly on a module,
    in registration order (PEFT nests wrappers of one module in this order)."""
    for path, m in model.named_modules():
        if _ours(path):
            continue
        for pname, p in m._parameters.items():
            if p is None:
                continue
            yield (f"{path}.{pname}" if path else pname), path, pname, p


def match_parameters(model: nn.Module, targets: Sequence[str]) -> list[Site]:
    """The parameter sites ``targets`` select (kind "param"; no graph: unit None). Only reads the
    model; the checks (dimensions, owners) are the caller's."""
    out = []
    for key, path, pname, p in parameter_keys(model):
        if not param_targeted(key, targets):
            continue
        host = model.get_submodule(path)
        lay = param_layout(host, p) if p.dim() in (2, 3) else {"in": 0, "out": 0}
        out.append(Site(key, "param", lay["in"], lay["out"], None, "", "", path, pname, param_host_attr(pname)))
    return out


def builtin_layer(m: nn.Module) -> bool:
    """A torch.nn layer (Conv1d, LayerNorm, ...): its parameters are its own layer's, not experts."""
    return type(m).__module__.startswith("torch.nn")


def stacked_parameters(model: nn.Module) -> list[str]:
    """Keys of the 3-D (stacked expert) parameters of ``model`` (not a torch.nn layer's, e.g. Conv1d's)."""
    return [k for k, path, _, p in parameter_keys(model) if p.dim() == 3 and not builtin_layer(model.get_submodule(path))]
