"""RaSA: the method's registration -- math (``math.py``), grouping, backend lowering, ONNX rank axes."""

from __future__ import annotations

import torch

from ..registry import Lowering, Method, register_method, shape_mismatch
from .math import (RaSA, rasa_as_lora, rasa_conv, rasa_delta, rasa_delta_weight, rasa_embed, rasa_group_key, rasa_init,
                   rasa_shapes, rasa_shared_init, rasa_shared_shapes, rasa_shrink_group)

__all__ = ["RaSA", "rasa_delta", "rasa_delta_weight", "rasa_group_key"]


def _check(cfg: RaSA, shapes, in_f: int, out_f: int) -> str | None:
    n, rem = divmod(shapes["rasa_A_shared"][0], cfg.k)
    if rem or n < 1:
        return f"rasa_A_shared has {shapes['rasa_A_shared'][0]} rows, not a multiple of k={cfg.k}"
    return shape_mismatch({**rasa_shapes(cfg, in_f, out_f, n), **rasa_shared_shapes(cfg, in_f, out_f, n)}, shapes)


def _lower(emit, x, w, b, p, cfg: RaSA, xa=None):
    # a LoRA of rank e = (r-k) + L*k with A = [A_l; A_S], B = [B_l, B_S], diagonal D, scaling 1
    return _stack(emit, x, w, b, [(p, cfg)], xa)


def _stack(emit, x, w, b, pcs, xa=None):
    # several RaSA adapters: one LoRA with diagonal of rank sum(e), [A_l; A_S] and D concatenated
    A = emit(torch.cat, [t for p, _ in pcs for t in (p["rasa_A"], p["rasa_A_shared"])], 0)  # [e, in]
    B = emit(torch.cat, [t for p, _ in pcs for t in (p["rasa_B"], p["rasa_B_shared"])], 1)  # [out, e]
    D = pcs[0][0]["rasa_D"] if len(pcs) == 1 else emit(torch.cat, [p["rasa_D"] for p, _ in pcs], 0)  # [e]
    return emit(torch.ops.peftcompile.lowrank_linear.default, x, w, b, A, B, D, 1.0, xa)


register_method(
    Method(
        name="rasa",
        config_cls=RaSA,
        shapes=rasa_shapes,
        init=rasa_init,
        delta=rasa_delta,
        delta_weight=rasa_delta_weight,
        check_site=lambda cfg, in_f, out_f: None,
        group_key=rasa_group_key,
        shared_shapes=rasa_shared_shapes,
        shared_init=rasa_shared_init,
        shrink_group=rasa_shrink_group,
        lowering=Lowering(_check, _lower, _stack),
        rank_axes={"rasa_A": (0,), "rasa_B": (1,), "rasa_D": (0,), "rasa_A_shared": (0,), "rasa_B_shared": (1,)},
        as_lora=rasa_as_lora,
        scale_params=("rasa_D",),
        embed=rasa_embed,  # embed_init None: the linear init (B_l = B_S = 0) starts the delta at 0
        conv=rasa_conv,
    )
)
