"""Lower: the one place a plan becomes quantized modules.

`lower(model, plan)` checks the plan against the model (every module exists, with the plan's shapes)
before changing anything, applies the plan's equivalence transforms (glufx/transforms.py), swaps each
linear planned "int8" for an `Int8Linear` (and, with `fp_weights="int8"`, each planned "fp" for an
`Int8WeightLinear`) and, with `fuse_glu`, each fusable GLU module for an
`Int8GLU`. `glufx.compile`, `glufx.load` (skeleton modules whose state the file fills), QFeM's search
(`Lowering`, which quantizes each candidate once and swaps modules in and out) and the torch.compile
backend (`lower_weights`, the same per-module lowering on a graph's weight tensors) all go through it.

The pattern is a module (nn.Linear planned "int8"), the validity check a separate predicate
(`quantizable`), the replacement `Int8Linear.from_float`; every rewrite bumps `counters`.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

import torch
from torch import nn

from .nn import FLOAT_DTYPES, Int8GLU, Int8Linear, Int8WeightLinear
from .plan import ModulePlan, Plan
from .rotate import rotation_of
from .transforms import apply_transforms

counters: Counter = Counter()


class PlanMismatchError(ValueError):
    """The plan does not describe this model (another model's plan, or a model changed since)."""


def quantizable(module: nn.Module) -> Optional[str]:
    """None if glufx can quantize `module`, else why not."""
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not an nn.Linear"
    if module.weight.dtype not in FLOAT_DTYPES:
        return f"weight dtype {module.weight.dtype} has no INT8 path"
    return None


def _submodule(model: nn.Module, fqn: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        return None


def _has_parameter(model: nn.Module, fqn: str) -> bool:
    try:
        model.get_parameter(fqn)
        return True
    except AttributeError:
        return False


def check_plan(model: nn.Module, plan: Plan) -> None:
    """Raise PlanMismatchError naming every planned module the model lacks or holds with other shapes."""
    problems = []
    for fqn, mp in plan.modules.items():
        if mp.kind != "linear":  # an expert bank is a 3-D parameter of its experts module
            if _submodule(model, fqn) is None and not _has_parameter(model, fqn):
                problems.append(f"{fqn}: no such module or parameter")
            continue
        mod = _submodule(model, fqn)
        if mod is None:
            problems.append(f"{fqn}: no such module")
            continue
        if isinstance(mod, (nn.Linear, Int8Linear)):
            shape = (mod.in_features, mod.out_features)
        else:
            if mp.action == "int8":
                problems.append(f"{fqn}: planned int8 but the model has a {type(mod).__name__} there")
            continue
        if shape != (mp.in_features, mp.out_features):
            problems.append(f"{fqn}: the model's linear is {shape[0]} -> {shape[1]}, the plan's "
                            f"{mp.in_features} -> {mp.out_features}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise PlanMismatchError(
            f"glufx: the plan does not fit this {type(model).__name__}: {shown}. A plan belongs to the model it was "
            "calibrated on: run glufx.calibrate on this model (or load the plan saved with it)")


def lower_weights(weight: torch.Tensor, bias: Optional[torch.Tensor], mp: ModulePlan, tensors: dict,
                  skeleton: bool = False) -> Int8Linear:
    """The Int8Linear for one planned linear's floating-point weight and bias; `tensors` is the plan's
    sidecar (rotation signs). `skeleton`: shapes only, for state loaded from a file."""
    rotation = rotation_of(mp, tensors)
    if skeleton:
        block, signs = rotation or (0, None)
        return Int8Linear(weight.shape[1], weight.shape[0], bias is not None, mp.granularity, weight.dtype, block,
                          signs is not None)
    return Int8Linear.from_float(weight, bias, mp.granularity, mp.x_scale, what=mp.fqn, rotation=rotation,
                                 codes=weight_codes(mp, tensors))


def weight_codes(mp: ModulePlan, tensors: dict) -> Optional[torch.Tensor]:
    """The plan's INT8 codes for this module's weight (GPTQ), or None for round-to-nearest."""
    if not mp.weights:
        return None
    if mp.weights.get("method") != "gptq":
        raise ValueError(f"glufx: unknown weight rounding {mp.weights.get('method')!r} for {mp.fqn} (written by a "
                         "newer glufx?)")
    key = mp.weights["codes"]
    if key not in tensors:
        raise ValueError(f"glufx: the plan's weight codes of {mp.fqn} ({key!r}) are missing; load the plan with its "
                         ".safetensors sidecar")
    return tensors[key]


def _lower_module(mod: nn.Module, mp: ModulePlan, tensors: dict, skeleton: bool) -> Int8Linear:
    why = quantizable(mod)
    if why is not None:
        raise TypeError(f"glufx: the plan quantizes {mp.fqn} but {why}")
    return lower_weights(mod.weight, mod.bias, mp, tensors, skeleton)


def lower(model: nn.Module, plan: Plan, *, skeleton: bool = False) -> nn.Module:
    """Quantize `model` in place as `plan` says; returns it. `skeleton=True` builds the quantized modules
    with empty state and applies no transform (glufx.load fills them from the saved, transformed state)."""
    check_plan(model, plan)
    if not skeleton:
        apply_transforms(model, plan)
    for fqn, mp in plan.modules.items():
        if mp.action != "int8":
            continue
        mod = model.get_submodule(fqn)
        if isinstance(mod, Int8Linear):
            continue
        model.set_submodule(fqn, _lower_module(mod, mp, plan.tensors, skeleton))
        counters["int8_linear"] += 1
        counters[f"int8_linear.{mp.role}"] += 1
    if plan.config.get("fp_weights", "fp") == "int8":
        lower_fp_weights(model, plan, skeleton)
    if plan.config.get("fuse_glu"):
        fuse_glu_blocks(model, plan)
    return model


def lower_fp_weights(model: nn.Module, plan: Plan, skeleton: bool = False) -> None:
    """GlufxConfig(fp_weights="int8"): each linear the plan keeps in floating point ("fp") gets per-channel INT8
    weights, its activations staying FP (Int8WeightLinear); counted in `counters["int8_weight_linear"]`."""
    for fqn, mp in plan.modules.items():
        mod = model.get_submodule(fqn)
        if mp.action != "fp" or isinstance(mod, Int8WeightLinear):
            continue
        why = quantizable(mod)
        if why is not None:
            counters["fp_weights_kept"] += 1  # an expert bank or another non-linear module stays as it is
            continue
        if skeleton:
            new = Int8WeightLinear(mod.in_features, mod.out_features, mod.bias is not None, mod.weight.dtype)
        else:
            new = Int8WeightLinear.from_float(mod.weight, mod.bias, what=fqn)
        model.set_submodule(fqn, new)
        counters["int8_weight_linear"] += 1


class Lowering:
    """Quantizes each candidate linear once and swaps the INT8 or the original module in on demand
    (QFeM's search evaluates many exclusion sets on one model)."""

    def __init__(self, model: nn.Module, plan: Plan, fqns: Iterable[str]):
        self.model = model
        self.original: dict[str, nn.Module] = {}
        self.int8: dict[str, Int8Linear] = {}
        for fqn in fqns:
            mod = model.get_submodule(fqn)
            self.original[fqn] = mod
            self.int8[fqn] = _lower_module(mod, plan.modules[fqn], plan.tensors, skeleton=False)

    def apply(self, int8_fqns: Iterable[str]) -> int:
        chosen = set(int8_fqns)
        for fqn in self.original:
            self.model.set_submodule(fqn, self.int8[fqn] if fqn in chosen else self.original[fqn])
        return len(chosen & set(self.original))


def glu_fusable(model: nn.Module, plan: Plan, block: dict) -> Optional[str]:
    """None if the block's module can become an Int8GLU, else why not."""
    if not block.get("module"):
        return "its module computes more than the GLU (or gate and up are one fused projection)"
    return gate_up_fusable(plan, block, _submodule(model, block["gate"]), _submodule(model, block["up"]))


def gate_up_fusable(plan: Plan, block: dict, gate: Optional[nn.Module], up: Optional[nn.Module]) -> Optional[str]:
    """None if the lowered `gate` and `up` of a plain GLU block can run as one int8_glu, else why not
    (glufx.lower and the torch.compile backend both ask this)."""
    g, u = plan.modules.get(block["gate"]), plan.modules.get(block["up"])
    if g is None or u is None or g.action != "int8" or u.action != "int8":
        return "gate or up stays in floating point"
    if (g.granularity, g.x_scale, g.rotation) != (u.granularity, u.x_scale, u.rotation):
        return "gate and up quantize (or rotate) their shared input differently"
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
