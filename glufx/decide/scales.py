"""Static activation scales (docs/method.md §8).

`absmax`: the calibration inputs' absolute maximum / 127 (nothing clipped). `clip_search`: for every
group of static INT8 linears that read one input (q/k/v, gate/up, ...), the clipping ratio c of
`s = c * absmax / 127` that minimises the squared error of the group's outputs, sum_i ||Q(X) Q(W_i)^T
- X W_i^T||^2 over sampled calibration tokens, from a grid. The error is that of what the input feeds
(all its consumers, their quantized weights included), not of the input tensor: clipping a few large
values costs little when the weights that read them are small. Positions a QFeP prefix holds are never
quantized and never sampled (the calibration runs through the prefixed model, whose prefix is KV).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm

from ..calibdata import is_causal_lm
from ..ops import reference as R

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
