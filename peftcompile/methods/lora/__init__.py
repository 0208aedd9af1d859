"""LoRA: the method's registration -- math (``math.py``), backend lowering, ONNX rank axes, PEFT format."""

from __future__ import annotations

import operator

import torch

from ..registry import Lowering, Method, PeftFormat, register_method, shapes_check
from .math import LoRA, lora_as_lora, lora_delta, lora_delta_weight, lora_init, lora_shapes

__all__ = ["LoRA", "lora_delta", "lora_delta_weight"]


def _lower(emit, x, w, b, p, cfg: LoRA, xa=None):
    # y = x W^T + b + s (xa A^T) B^T
    return emit(torch.ops.peftcompile.lowrank_linear.default, x, w, b, p["lora_A"], p["lora_B"], None,
                float(cfg.scaling), xa)


def _stack(emit, x, w, b, pcs):
    # sum_a s_a (x A_a^T) B_a^T = (x [A_1; A_2; ...]^T) [s_1 B_1, s_2 B_2, ...]^T
    A = emit(torch.cat, [p["lora_A"] for p, _ in pcs], 0)
    B = emit(torch.cat, [emit(operator.mul, p["lora_B"], float(c.scaling)) for p, c in pcs], 1)
    return emit(torch.ops.peftcompile.lowrank_linear.default, x, w, b, A, B, None, 1.0, None)


def _from_peft(c: dict) -> LoRA:
    return LoRA(r=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)))


register_method(
    Method(
        name="lora",
        config_cls=LoRA,
        shapes=lora_shapes,
        init=lora_init,
        delta=lora_delta,
        delta_weight=lora_delta_weight,
        check_site=lambda cfg, in_f, out_f: None,
        lowering=Lowering(shapes_check(lora_shapes), _lower, _stack),
        rank_axes={"lora_A": (0,), "lora_B": (1,)},
        peft=PeftFormat("LORA", {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B"}, _from_peft),
        as_lora=lora_as_lora,
    )
)
