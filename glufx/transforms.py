"""Transforms: edits of the floating-point model that leave its function unchanged (docs/method.md §6).

A transform is recorded in the plan as plain data (kind, seam, the modules it touches, fingerprints
of their weights before and after) with its vectors in the plan's tensor sidecar, so `glufx.lower`
can replay it on a fresh copy of the model, and knows when a model already carries it.

Implemented seam: up -> down across a GLU block. `h = act(gate(x)) * up(x)` is linear in `up(x)`
channel by channel, so dividing up's output row j (and bias) by s_j and multiplying down's input
column j by s_j is exact. The gate cannot carry it (the activation is not homogeneous). The seam is
read off the matched graph (a GLUBlock with its own up projection), never from module names.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from .plan import Plan

SCALE_CLAMP = (1e-4, 1e4)


def fingerprint(*weights: torch.Tensor) -> list[float]:
    """Float64 sums of each weight: identify a weight's values to ~1e-12 relative, cheaply."""
    return [float(w.detach().double().sum()) for w in weights]


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9) for x, y in zip(a, b))


def smooth_scales(x_absmax: torch.Tensor, w_col_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), 1 where a channel is silent."""
    x, w = x_absmax.double(), w_col_absmax.double()
    s = x.clamp_min(1e-12).pow(alpha) / w.clamp_min(1e-12).pow(1 - alpha)
    s = torch.where((x > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(*SCALE_CLAMP).float()


@torch.no_grad()
def scale_up_down(up: nn.Linear, down: nn.Linear, s: torch.Tensor) -> None:
    """up's output channel j / s_j, down's input column j * s_j: the block's output is unchanged."""
    s_w = s.to(up.weight.dtype)
    up.weight.div_(s_w[:, None])
    if up.bias is not None:
        up.bias.div_(s.to(up.bias.dtype))
    down.weight.mul_(s.to(down.weight.dtype)[None, :])


def record(plan: Plan, kind: str, producer: str, consumer: str, s: torch.Tensor, before: list[float],
           after: list[float], **measured) -> dict:
    key = f"transform.{len(plan.transforms)}.scale"
    plan.tensors[key] = s.detach().float().contiguous()
    entry = {"kind": kind, "producer": producer, "consumers": [consumer], "tensor": key,
             "fingerprint_before": before, "fingerprint_after": after, **measured}
    plan.transforms.append(entry)
    return entry


def transform_state(entry: dict, weight_of: Callable[[str], torch.Tensor]) -> str:
    """'before', 'after' (the weights already carry it) or 'other' (weights this plan does not describe);
    `weight_of(fqn)` gives a touched module's weight (from a model, or a dynamo graph's inputs)."""
    fp = fingerprint(*(weight_of(f) for f in (entry["producer"], *entry["consumers"])))
    if _same(fp, entry["fingerprint_after"]):
        return "after"
    if _same(fp, entry["fingerprint_before"]):
        return "before"
    return "other"


def apply_transforms(model: nn.Module, plan: Plan) -> int:
    """Replay the plan's transforms on `model` (skipping those it already carries); returns how many ran."""
    n = 0
    for entry in plan.transforms:
        state = transform_state(entry, lambda fqn: model.get_submodule(fqn).weight)
        if state == "after":
            continue
        if state == "other":
            raise ValueError(
                f"glufx: the weights of {entry['producer']} / {entry['consumers']} are neither those the plan was "
                "calibrated on nor their transformed form: the plan belongs to another model (or the weights were "
                "changed since); calibrate this model")
        if entry["kind"] != "scale_up_down":
            raise ValueError(f"glufx: unknown transform {entry['kind']!r} in the plan (written by a newer glufx?)")
        scale_up_down(model.get_submodule(entry["producer"]), model.get_submodule(entry["consumers"][0]),
                      plan.tensors[entry["tensor"]])
        n += 1
    return n


class WeightBackup:
    """Original floating-point weights of the modules a transform touches, restored exactly on exit
    (glufx.calibrate leaves the user's model as it found it; the plan replays the transform)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.saved: dict[str, dict[str, torch.Tensor]] = {}

    def save(self, fqn: str) -> None:
        if fqn not in self.saved:
            mod = self.model.get_submodule(fqn)
            self.saved[fqn] = {k: v.detach().clone() for k, v in mod.named_parameters(recurse=False)}

    @torch.no_grad()
    def restore(self) -> None:
        for fqn, params in self.saved.items():
            mod = self.model.get_submodule(fqn)
            for k, v in params.items():
                getattr(mod, k).copy_(v)
        self.saved.clear()


def up_down_seams(glu_blocks: list[dict], model: nn.Module) -> list[tuple[str, str, Optional[str]]]:
    """(up, down, why not) for every GLU block: the seam exists when up is its own nn.Linear."""
    out = []
    for b in glu_blocks:
        why = None
        if b.get("moe"):
            why = "MoE expert bank"
        elif b.get("fused") or b["gate"] == b["up"]:
            why = "gate and up are one fused projection"
        elif not (isinstance(model.get_submodule(b["up"]), nn.Linear) and
                  isinstance(model.get_submodule(b["down"]), nn.Linear)):
            why = "up or down is not an nn.Linear"
        out.append((b["up"], b["down"], why))
    return out
