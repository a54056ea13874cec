"""Static activation scales (docs/method.md §8).

`absmax`: the calibration inputs' absolute maximum / 127 (nothing clipped). `clip_search`: for every
group of static INT8 linears that read one input (q/k/v, gate/up, ...), the clipping ratio c of
`s = c * absmax / 127` that minimises the squared error of the group's outputs, sum_i ||Q(X) Q(W_i)^T
- X W_i^T||^2 over sampled calibration tokens, from a grid. The error is that of what the input feeds
(all its consumers, their quantized weights included), not of the input tensor: clipping a few large
values costs little when the weights that read them are small. `block_search`: starting from those
clips, each repeated block (a decoder layer: the outermost `nn.ModuleList` element holding the linears)
runs on its own calibration inputs with its static linears quantized, and each group's clip in turn is
the one that minimises the error of the block's output (per token, relative to the FP output's norm,
as the next layer's norm sees it): what the quantized attention and GLU do with the clipped input is
measured, not modelled. Positions a QFeP prefix holds are never quantized and never sampled (the
calibration runs through the prefixed model, whose prefix is KV).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibdata import is_causal_lm
from ..lower import Lowering
from ..ops import reference as R
from .qfem import _first_tensor

CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(17))  # 1.0, 0.95, ..., 0.2


@torch.no_grad()
def sample_inputs(ctx, fqns: list[str], max_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Up to `max_tokens` calibration input rows [T, K] (float32) of each named linear, spread evenly
    over the calibration batches, padding excluded."""
    runner = ctx.runner or ctx.model
    batches = ctx.calib.batches
    per_batch = -(-max_tokens // max(len(batches), 1))
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list[torch.Tensor]] = defaultdict(list)
    state = {}

    def hook(fqn):
        def pre(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # x: [B*T, K]
            if state.get("keep") is None or state["rows"] != x.shape[0]:  # one draw per batch, shared by all
                valid = state["valid"] if state["valid"] is not None and state["valid"].numel() == x.shape[0] \
                    else torch.ones(x.shape[0], dtype=torch.bool)
                idx = valid.nonzero().flatten()
                state["keep"], state["rows"] = idx[torch.randperm(len(idx), generator=g)[:per_batch]].sort().values, x.shape[0]
            rows[fqn].append(x[state["keep"]])
        return pre

    handles = [ctx.model.get_submodule(f).register_forward_pre_hook(hook(f)) for f in fqns]
    extra = {"logits_to_keep": 1} if is_causal_lm(runner) else {}
    try:
        for b in tqdm(batches, desc="glufx sample inputs", unit="batch", disable=not ctx.progress):
            state.update(keep=None, valid=b.mask.reshape(-1).bool() if b.mask is not None else None)
            runner(*b.args, **b.kwargs, **extra)
    finally:
        for h in handles:
            h.remove()
    return {f: torch.cat(v)[:max_tokens] for f, v in rows.items()}


@torch.no_grad()
def clip_search(ctx, grid: tuple = CLIP_GRID, max_tokens: int = 1024) -> dict[str, dict]:
    """fqn -> {"clip": c, "x_scale": s, "error": {c: relative output error}} for every static INT8 target."""
    by_fqn = ctx.stats.by_fqn()
    groups: dict[int, list[str]] = defaultdict(list)
    for f in ctx.targets():
        mp = ctx.plan.modules[f]
        if mp.action == "int8" and mp.granularity == "static" and f in by_fqn and by_fqn[f].absmax > 0:
            groups[mp.group].append(f)
    if not groups:
        return {}
    samples = sample_inputs(ctx, [fs[0] for fs in groups.values()], max_tokens)
    out = {}
    for fs in tqdm(groups.values(), desc="glufx clip search", unit="group", disable=not ctx.progress):
        x = samples[fs[0]]  # x: [T, K], the group's shared input
        absmax = max(by_fqn[f].absmax for f in fs)
        weights = torch.cat([ctx.model.get_submodule(f).weight.detach().float() for f in fs])  # [sum N, K]
        w_deq = R.dequantized_weight(weights)
        ref = x @ weights.T
        denom = float(ref.square().sum()) or 1.0
        errors = {c: float((R.fake_quantize(x, c * absmax / R.QMAX) @ w_deq.T - ref).square().sum()) / denom
                  for c in grid}
        best = min(errors, key=errors.get)
        for f in fs:
            out[f] = {"clip": best, "x_scale": best * absmax / R.QMAX, "absmax": absmax,
                      "error": errors[best], "error_unclipped": errors.get(1.0), "tokens": int(x.shape[0])}
    return out


def repeated_block(model: nn.Module, fqn: str) -> Optional[str]:
    """The outermost `nn.ModuleList` element holding `fqn` ("model.layers.3"): the block the model
    repeats, whose output the next block's norm reads. None outside any module list."""
    parts = fqn.split(".")
    mod = model
    for i, name in enumerate(parts[:-1]):
        if isinstance(mod, nn.ModuleList):
            return ".".join(parts[:i + 1])
        mod = mod.get_submodule(name)
    return None


class _Stop(Exception):
    """Ends a calibration forward once the block under search has its inputs."""


def _is_cache(v) -> bool:  # a transformers Cache, or anything a layer updates in place the same way
    return hasattr(v, "update") and hasattr(v, "get_seq_length")


def _fresh(kwargs: dict) -> dict:
    # A layer appends its keys to the cache it is given: every run of the block gets its own copy of the
    # cache as it stood when the block was called (a QFeP prefix's KV, the earlier layers' entries).
    return {k: copy.deepcopy(v) if _is_cache(v) else v for k, v in kwargs.items()}


@torch.no_grad()
def block_calls(ctx, block_fqn: str, batches: list) -> list[tuple]:
    """(args, kwargs, valid rows [B, T] or None) of the block's call in each batch's forward, which
    stops there."""
    runner = ctx.runner or ctx.model
    calls: list[tuple] = []

    def pre(_mod, args, kwargs):
        calls.append((args, _fresh(kwargs)))
        raise _Stop

    handle = ctx.model.get_submodule(block_fqn).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for b in batches:
            try:
                runner(*b.args, **b.kwargs)
            except _Stop:
                pass
            else:
                raise RuntimeError(f"glufx: {block_fqn} was not called by the calibration forward; its clip "
                                   "search has nothing to measure (use DecideScales('clip_search'))")
    finally:
        handle.remove()
    return [(a, kw, b.mask.bool() if b.mask is not None else None) for (a, kw), b in zip(calls, batches)]


@torch.no_grad()
def _block_output(block: nn.Module, call) -> torch.Tensor:
    args, kwargs, valid = call
    out = _first_tensor(block(*args, **_fresh(kwargs))).float()  # out: [B, T, D]
    return out[valid] if valid is not None and valid.shape == out.shape[:2] else out.reshape(-1, out.shape[-1])


def block_error(block: nn.Module, calls: list[tuple], refs: list[torch.Tensor]) -> float:
    """Mean over positions of ||y_q - y||^2 / ||y||^2: the block (as it now is) run on `calls` against
    the FP outputs `refs`."""
    outs = [_block_output(block, c) for c in calls]
    num = torch.cat([(o - r).square().sum(-1) / r.square().sum(-1).clamp_min(1e-30) for o, r in zip(outs, refs)])
    return float(num.mean())


@torch.no_grad()
def block_clip_search(ctx, grid: tuple = CLIP_GRID, max_tokens: int = 1024, block_tokens: int = 2048,
                      passes: int = 1) -> dict[str, dict]:
    """clip_search's result, with each group inside a repeated block re-chosen by the error of the
    block's output over at least `block_tokens` calibration positions (whole batches), the block's other
    static linears quantized at their current clips; `passes` rounds of this coordinate search. Every
    block reads its FP inputs (a variant feeding each block its quantized predecessors' output measured
    worse on Gemma 3 270M: docs/method.md §8)."""
    out = clip_search(ctx, grid, max_tokens)
    blocks: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for f in out:
        blk = repeated_block(ctx.model, f)
        if blk is not None:
            blocks[blk][ctx.plan.modules[f].group].append(f)
    if not blocks:
        return out
    batches, n = [], 0
    for b in ctx.calib.batches:
        if n >= block_tokens:
            break
        batches.append(b)
        n += int(b.mask.sum()) if b.mask is not None else int(b.args[0].numel())
    for f in out:
        out[f]["group_search"] = {k: out[f][k] for k in ("clip", "error", "error_unclipped")}
    saved = {f: ctx.plan.modules[f].x_scale for f in out}
    try:
        for blk, groups in tqdm(blocks.items(), desc="glufx block clip search", unit="block",
                                disable=not ctx.progress):
            _search_block(ctx, blk, groups, batches, grid, passes, out)
    finally:
        for f, s in saved.items():
            ctx.plan.modules[f].x_scale = s
    return out


def _search_block(ctx, blk: str, groups: dict, batches: list, grid: tuple, passes: int, out: dict) -> None:
    block = ctx.model.get_submodule(blk)
    calls = block_calls(ctx, blk, batches)
    refs = [_block_output(block, c) for c in calls]  # the FP block's output: what each candidate is held to
    tokens = sum(int(r.shape[0]) for r in refs)
    fqns = [f for fs in groups.values() for f in fs]
    for f in fqns:  # Lowering quantizes with the plan's scale
        ctx.plan.modules[f].x_scale = out[f]["x_scale"]
    lowering = Lowering(ctx.model, ctx.plan, fqns)
    try:
        lowering.apply(fqns)
        for _ in range(passes):
            for fs in groups.values():
                absmax = out[fs[0]]["absmax"]
                errors = {}
                for c in grid:
                    for f in fs:
                        lowering.int8[f].x_scale.fill_(c * absmax / R.QMAX)
                    errors[c] = block_error(block, calls, refs)
                best = min(errors, key=errors.get)
                scale = best * absmax / R.QMAX
                for f in fs:
                    lowering.int8[f].x_scale.fill_(scale)
                    out[f].update(clip=best, x_scale=scale, error=errors[best], error_unclipped=errors.get(1.0),
                                  block=blk, tokens=tokens)
    finally:
        lowering.apply([])
