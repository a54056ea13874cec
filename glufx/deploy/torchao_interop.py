"""A glufx plan as a torchao `FqnToConfig`, for users of torchao's kernels.

Mapping (weights per output channel, symmetric, in every case):
  per_token            -> Int8DynamicActivationInt8WeightConfig(granularity=[PerRow(), PerRow()])
  per_sequence, per_tensor
                       -> Int8DynamicActivationInt8WeightConfig(granularity=[PerTensor(), PerRow()])
                          (torchao's per-tensor scale spans the whole call, not each sequence)
  static               -> Int8StaticActivationInt8WeightConfig(act_quant_scale=<plan's x_scale>,
                                                               granularity=[PerTensor(), PerRow()])
  kept in FP (QFeM, head, router, experts) -> None
`set_inductor_config=False` throughout: glufx never changes global Inductor settings.
torchao has no online rotation: a plan that rotates inputs is refused (calibrate with
GlufxConfig(rotation="off") for torchao). A plan's equivalence transforms are FP edits torchao does not
know either: quantize `glufx.prefixed(model, plan)` (the transformed FP model), not the original.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..plan import Plan


def to_fqn_to_config(plan: Plan):
    from torchao.quantization import FqnToConfig
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_api import (Int8DynamicActivationInt8WeightConfig,
                                                Int8StaticActivationInt8WeightConfig)

    rotated = [f for f, m in plan.modules.items() if m.action == "int8" and m.rotation]
    if rotated:
        raise ValueError(f"glufx.to_torchao: the plan rotates the inputs of {len(rotated)} modules (e.g. {rotated[0]}) "
                         "inside glufx's ops; torchao has no such kernel. Calibrate with "
                         "GlufxConfig(rotation='off') for a torchao config")
    configs: OrderedDict = OrderedDict()
    for fqn, mp in plan.modules.items():
        if mp.kind != "linear":
            continue
        if mp.action != "int8":
            configs[fqn] = None
        elif mp.granularity == "per_token":
            configs[fqn] = Int8DynamicActivationInt8WeightConfig(granularity=[PerRow(), PerRow()],
                                                                 set_inductor_config=False)
        elif mp.granularity == "static":
            configs[fqn] = Int8StaticActivationInt8WeightConfig(
                act_quant_scale=torch.tensor([mp.x_scale]), granularity=[PerTensor(), PerRow()],
                set_inductor_config=False)
        else:
            configs[fqn] = Int8DynamicActivationInt8WeightConfig(granularity=[PerTensor(), PerRow()],
                                                                 set_inductor_config=False)
    return FqnToConfig(fqn_to_config=configs)
