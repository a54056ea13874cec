"""Transforms: edits of the floating-point model that leave its function unchanged (docs/method.md §6).

A transform is recorded in the plan as plain data (kind, seam, the modules it touches, fingerprints
of their weights before and after) with its vectors in the plan's tensor sidecar, so `glufx.lower`
can replay it on a fresh copy of the model, and knows when a model already carries it.

Seams, both read off the matched graph, never from module names:
* norm -> its sibling linears (match.NormSeam): the group's input is `y * g` with g = a * w + c from
  one norm parameter w (RMSNorm: g = w; Gemma: g = 1 + w; LayerNorm: g = w, with bias b) and nothing
  but the group reads it. g_j / s_j (and b_j / s_j), the linears' input column j * s_j: exact.
* up -> down across a GLU block. `h = act(gate(x)) * up(x)` is linear in `up(x)`
channel by channel, so dividing up's output row j (and bias) by s_j and multiplying down's input
column j by s_j is exact. The gate cannot carry it (the activation is not homogeneous). The seam is
read off the matched graph (a GLUBlock with its own up projection), never from module names.
* v -> o across attention (match.ValueSeam): attention mixes tokens, never channels, so v's output
channel c / s_c and every o input column reading c (one per query head sharing c's key-value head
under GQA: `channel_map`) * s_c is exact. The same seam carries a rotation offline (`rotate_v_o`): v's
outputs rotated by a block Hadamard R, o's columns by R^T, so o's input arrives rotated with no op at run time.
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


@torch.no_grad()
def scale_norm(model: nn.Module, weight: str, bias: Optional[str], a: float, c: float, consumers: list[str],
               s: torch.Tensor) -> None:
    """g = a * w + c -> g / s (and the bias / s); every consumer's input column j * s_j."""
    w = model.get_parameter(weight)
    g = w.double() * a + c
    w.copy_(((g / s.double() - c) / a).to(w.dtype))
    if bias is not None:
        b = model.get_parameter(bias)
        b.copy_((b.double() / s.double()).to(b.dtype))
    for f in consumers:
        lin = model.get_submodule(f)
        lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


@torch.no_grad()
def scale_v_o(producer: nn.Linear, consumer: nn.Linear, s: torch.Tensor, channel_map: torch.Tensor) -> None:
    """producer's output channel c / s_c, consumer's input column j * s[channel_map[j]]."""
    producer.weight.div_(s.to(producer.weight.dtype)[:, None])
    if producer.bias is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    consumer.weight.mul_(s[channel_map.long()].to(consumer.weight.dtype)[None, :])


def value_rotation_block(channel_map: torch.Tensor, n_channels: int, max_block: int) -> int:
    """The largest power-of-two b <= max_block for which a block-Hadamard rotation of the producer's
    channels is a block-Hadamard rotation of the consumer's columns too: every aligned run of b columns
    reads an aligned run of b consecutive channels (one head's, or part of it). 0 when there is none."""
    from .rotate import hadamard_block

    cmap = channel_map.long()
    j = torch.arange(cmap.numel())
    b = min(hadamard_block(cmap.numel(), max_block), hadamard_block(n_channels, max_block))
    while b > 1:
        start = cmap[j - j % b]
        if bool(((cmap == start + j % b) & (start % b == 0)).all()):
            return b
        b //= 2
    return 0


@torch.no_grad()
def rotate_v_o(producer: nn.Linear, consumer: nn.Linear, block: int, signs: torch.Tensor,
               channel_map: torch.Tensor) -> None:
    """Offline rotation across a value seam: the producer's outputs by R = H_b D (its rows and bias), the
    consumer's input columns by the same R, channel by channel through the map (W_o R^T): exact, and the
    consumer's input arrives rotated, as the online rotation would make it, for free."""
    from .rotate import fold

    def rotate_rows(t: torch.Tensor) -> torch.Tensor:  # R t for t: [C, ...] over the producer's channels
        flat = t.detach().float().reshape(t.shape[0], -1).t().contiguous()
        return torch.ops.glufx.hadamard(flat, block, signs.float()).t().reshape(t.shape).to(t.dtype)

    producer.weight.copy_(rotate_rows(producer.weight))
    if producer.bias is not None:
        producer.bias.copy_(rotate_rows(producer.bias))
    consumer.weight.copy_(fold(consumer.weight, block, signs.float()[channel_map.long()]).to(consumer.weight.dtype))


def weight_of(model: nn.Module, fqn: str) -> torch.Tensor:
    """A transform's touched tensor: a module's weight, or a parameter named by its FQN (a norm's)."""
    try:
        return model.get_submodule(fqn).weight
    except AttributeError:
        return model.get_parameter(fqn)


def record(plan: Plan, kind: str, producer: str, consumer, s: torch.Tensor, before: list[float],
           after: list[float], **measured) -> dict:
    key = f"transform.{len(plan.transforms)}.scale"
    plan.tensors[key] = s.detach().float().contiguous()
    consumers = [consumer] if isinstance(consumer, str) else list(consumer)
    entry = {"kind": kind, "producer": producer, "consumers": consumers, "tensor": key,
             "fingerprint_before": before, "fingerprint_after": after, **measured}
    plan.transforms.append(entry)
    return entry


def plan_transform_state(transforms: list[dict], weight_of: Callable[[str], Optional[torch.Tensor]]) -> str:
    """'before' (no transform applied), 'after' (all applied) or 'other', over every tensor the plan's
    transforms touch (one tensor may be touched by several: a norm seam scales up's columns, the up ->
    down seam its rows); tensors `weight_of` returns None for are not checked (a graph lacking them)."""
    first, last = {}, {}
    for e in transforms:
        for name, b, a in zip([e["producer"], *e["consumers"]], e["fingerprint_before"], e["fingerprint_after"]):
            first.setdefault(name, b)
            last[name] = a
    values = {n: weight_of(n) for n in first}
    names = [n for n, v in values.items() if v is not None]
    fp = {n: fingerprint(values[n])[0] for n in names}
    if _same([fp[n] for n in names], [last[n] for n in names]):
        return "after"
    if _same([fp[n] for n in names], [first[n] for n in names]):
        return "before"
    return "other"


def apply_transforms(model: nn.Module, plan: Plan) -> int:
    """Replay the plan's transforms on `model` unless it carries them all already; returns how many ran."""
    if not plan.transforms:
        return 0
    state = plan_transform_state(plan.transforms, lambda fqn: weight_of(model, fqn))
    if state == "after":
        return 0
    if state == "other":
        raise ValueError(
            "glufx: the weights the plan's equivalence transforms touch are neither those the plan was calibrated on "
            "nor their transformed form: the plan belongs to another model (or the weights were changed since); "
            "calibrate this model")
    n = 0
    for entry in plan.transforms:
        if entry["kind"] == "scale_up_down":
            scale_up_down(model.get_submodule(entry["producer"]), model.get_submodule(entry["consumers"][0]),
                          plan.tensors[entry["tensor"]])
        elif entry["kind"] == "scale_v_o":
            scale_v_o(model.get_submodule(entry["producer"]), model.get_submodule(entry["consumers"][0]),
                      plan.tensors[entry["tensor"]], plan.tensors[entry["channel_map"]])
        elif entry["kind"] == "rotate_v_o":
            rotate_v_o(model.get_submodule(entry["producer"]), model.get_submodule(entry["consumers"][0]),
                       entry["block"], plan.tensors[entry["tensor"]], plan.tensors[entry["channel_map"]])
        elif entry["kind"] == "scale_norm":
            scale_norm(model, entry["producer"], entry.get("bias"), entry["norm_scale"], entry["norm_offset"],
                       entry["consumers"], plan.tensors[entry["tensor"]])
        else:
            raise ValueError(f"glufx: unknown transform {entry['kind']!r} in the plan (written by a newer glufx?)")
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


# ---- strength search (AWQ-style: measured output error, one choice per seam) -----------------------

ALPHAS = (0.2, 0.35, 0.5, 0.65, 0.8)
SEARCH_CLIPS = (1.0, 0.8, 0.6, 0.45, 0.3)


def _quant_rows(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """Fake-quantized activations x [T, K] as glufx's ops would quantize them (static: the best of a
    coarse clip grid, as DecideScales' search refines later)."""
    from .ops.reference import QMAX, fake_quantize

    if granularity == "per_token":
        return [fake_quantize(x, (x.abs().amax(dim=1, keepdim=True) / QMAX).clamp_min(1e-12))]
    amax = float(x.abs().max()) or 1.0
    clips = SEARCH_CLIPS if granularity == "static" else (1.0,)
    return [fake_quantize(x, c * amax / QMAX) for c in clips]


def seam_error(x: torch.Tensor, w: torch.Tensor, s: Optional[torch.Tensor], granularity: str,
               rot_block: int = 0) -> float:
    """Relative squared error of the consumers' outputs, ||Q(x / s) Q(w s)^T - x w^T||^2 / ||x w^T||^2,
    with x [T, K] sampled inputs, w [N, K] the consumers' weights, the inputs rotated first when the
    modules will be (rot_block > 0)."""
    from .ops import reference as R

    ref = x @ w.T
    xs, ws = (x, w) if s is None else (x / s, w * s)
    if rot_block:
        xs, ws = R.hadamard(xs, rot_block), R.hadamard(ws, rot_block)
    wd = R.dequantized_weight(ws)
    denom = float(ref.square().sum()) or 1.0
    return min(float((xq @ wd.T - ref).square().sum()) / denom for xq in _quant_rows(xs, granularity))


def search_scales(x: torch.Tensor, w: torch.Tensor, granularity: str, rot_block: int = 0,
                  alphas: tuple = ALPHAS, channel_map: Optional[torch.Tensor] = None
                  ) -> tuple[Optional[float], Optional[torch.Tensor], dict]:
    """(alpha, s, {alpha: error}) of the lowest output error; alpha None (no transform) when none helps.
    With `channel_map` (a value seam: column j of x and w carries producer channel channel_map[j]), s
    is one scale per producer channel, every column of a channel scaled alike."""
    x_absmax, w_absmax = x.abs().amax(dim=0), w.abs().amax(dim=0)
    if channel_map is not None:
        idx, n = channel_map.long(), int(channel_map.max()) + 1
        x_absmax = torch.zeros(n).scatter_reduce(0, idx, x_absmax, "amax")
        w_absmax = torch.zeros(n).scatter_reduce(0, idx, w_absmax, "amax")
    errors = {"none": seam_error(x, w, None, granularity, rot_block)}
    best, best_s = None, None
    for a in alphas:
        s = smooth_scales(x_absmax, w_absmax, a)
        s = s / s.log().mean().exp()  # geometric mean 1: the weights' and activations' ranges move, not their product
        s = s.clamp(*SCALE_CLAMP)
        errors[a] = seam_error(x, w, s if channel_map is None else s[idx], granularity, rot_block)
        if errors[a] < errors["none"] and (best is None or errors[a] < errors[best]):
            best, best_s = a, s
    return best, best_s, errors
