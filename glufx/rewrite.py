"""Rewrite: apply a plan to an eager model by swapping nn.Linear for Int8Linear.

The pattern is a module (nn.Linear planned "int8"), the validity check a separate predicate
(`quantizable`), the replacement `Int8Linear.from_linear`; every rewrite bumps `counters`.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

import torch
from torch import nn

from .nn import Int8GLU, Int8Linear
from .plan import Plan

counters: Counter = Counter()


def quantizable(module: nn.Module) -> Optional[str]:
    """None if glufx can quantize `module`, else why not."""
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear"
    if module.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"weight dtype {module.weight.dtype} has no INT8 path"
    return None


class Rewriter:
    """Quantizes each candidate linear once and swaps the INT8 or the original module in on demand
    (QFeM's search evaluates many exclusion sets on one model)."""

    def __init__(self, model: nn.Module, fqns: Iterable[str], granularity: str,
                 x_scales: Optional[dict[str, float]] = None):
        self.model = model
        self.original: dict[str, nn.Module] = {}
        self.int8: dict[str, Int8Linear] = {}
        for fqn in fqns:
            mod = model.get_submodule(fqn)
            why = quantizable(mod)
            if why is not None:
                raise TypeError(f"glufx: cannot quantize {fqn}: {why}")
            self.original[fqn] = mod
            self.int8[fqn] = Int8Linear.from_linear(mod, granularity, (x_scales or {}).get(fqn))

    def apply(self, int8_fqns: Iterable[str]) -> int:
        chosen = set(int8_fqns)
        for fqn in self.original:
            self.model.set_submodule(fqn, self.int8[fqn] if fqn in chosen else self.original[fqn])
        return len(chosen & set(self.original))


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Swap every module the plan marks int8 for an Int8Linear, in place."""
    for fqn, mp in plan.modules.items():
        if mp.action != "int8":
            continue
        mod = model.get_submodule(fqn)
        if isinstance(mod, Int8Linear):
            continue
        why = quantizable(mod)
        if why is not None:
            raise TypeError(f"glufx: the plan quantizes {fqn} but {why}")
        model.set_submodule(fqn, Int8Linear.from_linear(mod, mp.granularity, mp.x_scale))
        counters["int8_linear"] += 1
        counters[f"int8_linear.{mp.role}"] += 1
    if plan.config.get("fuse_glu"):
        fuse_glu_blocks(model, plan)
    return model


def glu_fusable(model: nn.Module, plan: Plan, block: dict) -> Optional[str]:
    """None if the block's module can become an Int8GLU, else why not."""
    if not block.get("module"):
        return "its module computes more than the GLU (or gate and up are one fused projection)"
    g, u = plan.modules.get(block["gate"]), plan.modules.get(block["up"])
    if g is None or u is None or g.action != "int8" or u.action != "int8":
        return "gate or up stays in floating point"
    if (g.granularity, g.x_scale) != (u.granularity, u.x_scale):
        return "gate and up quantize their shared input differently"
    gate, up = model.get_submodule(block["gate"]), model.get_submodule(block["up"])
    if not (isinstance(gate, Int8Linear) and isinstance(up, Int8Linear)) or gate.bias is not None or up.bias is not None:
        return "gate or up is not a bias-free Int8Linear"
    return None


def fuse_glu_blocks(model: nn.Module, plan: Plan) -> int:
    """Replace each fusable GLU module by an Int8GLU (one op for gate, up, activation and product)."""
    n = 0
    for block in plan.glu_blocks:
        if glu_fusable(model, plan, block) is not None:
            counters["glu_not_fused"] += 1
            continue
        gate, up = model.get_submodule(block["gate"]), model.get_submodule(block["up"])
        model.set_submodule(block["module"], Int8GLU.from_int8(gate, up, model.get_submodule(block["down"]), block["act"]))
        counters["glu_fused"] += 1
        n += 1
    return n
