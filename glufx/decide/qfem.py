"""QFeM (docs/method.md §3): score every projection input by its spike ratio and keep the worst in floating point.

Modes: `auto` walks the score-sorted sibling groups, measuring held-out loss after each exclusion,
and keeps the smallest set within `tolerance` of the best gain; `alpha` keeps r_m > alpha; `budget`
keeps the top scores up to `max_fp_param_share`; `off` quantizes every decoder linear.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibdata import Batch, is_causal_lm
from ..lower import Lowering


class HeldoutMetric:
    """Divergence of a (partly) quantized model from the floating-point one on held-out sequences.

    Causal LMs: mean KL(P_fp || P_q) of the next-token distributions at up to `positions` sampled
    positions per sequence; only those positions go through the head (`logits_to_keep`), and the FP
    log-probs are stored once (positions x vocab floats per sequence). KL is used rather than NLL
    because quantization noise can lower the NLL of a poorly calibrated model by chance; KL to the
    model being quantized cannot. Other modules: relative MSE of the first output tensor.
    """

    def __init__(self, model: nn.Module, batches: list[Batch], positions: int = 128, seed: int = 0):
        self.model, self.batches, self.lm = model, batches, is_causal_lm(model)
        self.keeps_logits = self.lm and accepts_kwarg(model, "logits_to_keep")
        g = torch.Generator().manual_seed(seed)
        self.keep: list[Optional[torch.Tensor]] = []
        for b in batches:
            if not self.lm:
                self.keep.append(None)
                continue
            valid = b.mask[0].nonzero().squeeze(1)
            pick = valid[torch.randperm(len(valid), generator=g)[:positions]].sort().values
            self.keep.append(pick)
        self.reference = [self._outputs(i) for i in range(len(batches))]

    @torch.no_grad()
    def _outputs(self, i: int) -> torch.Tensor:
        b = self.batches[i]
        if not self.lm:
            return _first_tensor(self.model(*b.args, **b.kwargs)).float()
        if self.keeps_logits:
            logits = self.model(*b.args, **b.kwargs, logits_to_keep=self.keep[i]).logits[0]
        else:  # a model without logits_to_keep: full head, then select
            logits = self.model(*b.args, **b.kwargs).logits[0, self.keep[i]]
        return torch.log_softmax(logits.float(), dim=-1)  # [P, V]

    @torch.no_grad()
    def __call__(self) -> float:
        total = 0.0
        for i, ref in enumerate(self.reference):
            out = self._outputs(i)
            if self.lm:
                total += float(F.kl_div(out, ref, log_target=True, reduction="sum")) / max(len(ref), 1)
            else:
                total += float((out - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
        return total / max(len(self.reference), 1)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise TypeError("glufx: the model returned no tensor to compare")
    return leaves[0]


def accepts_kwarg(model: nn.Module, name: str) -> bool:
    """Whether model.forward takes `name` (a wrapper forwarding **kwargs is asked about its inner model)."""
    params = inspect.signature(model.forward).parameters
    if name in params:
        return True
    inner = getattr(model, "model", None)
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return has_var_kw and isinstance(inner, nn.Module) and accepts_kwarg(inner, name)


def candidate_groups(ctx, cfg) -> tuple[list[list[str]], list[list[str]]]:
    """(all target sibling groups worst score first, the candidates: those scoring >= min_score that fit
    in max_fp_param_share)."""
    match, scores = ctx.match, ctx.stats.scores()
    quant_targets = ctx.targets()
    decoder_params = sum(match.projections[f].n_params for f in quant_targets if match.projections[f].role != "head")
    groups: dict[int, list[str]] = {}
    for f in quant_targets:
        groups.setdefault(match.projections[f].group, []).append(f)
    ranked = sorted(groups.values(), key=lambda g: -scores.get(g[0], 0.0))
    candidates, share = [], 0.0
    for g in ranked:
        if scores.get(g[0], 0.0) < cfg.min_score:
            break
        share += sum(match.projections[f].n_params for f in g) / max(decoder_params, 1)
        if share > cfg.max_fp_param_share + 1e-12:
            break
        candidates.append(g)
    return ranked, candidates


def decide_qfem(ctx, cfg) -> dict:
    """The QFeM stage: marks the chosen sibling groups "fp" in ctx.plan with the measurement behind it."""
    scores = ctx.stats.scores()
    ranked, candidates = candidate_groups(ctx, cfg)
    search: dict = {"mode": cfg.mode, "candidates": candidates}
    if cfg.mode == "off":
        excluded: list[list[str]] = []
    elif cfg.mode == "alpha":
        excluded = [g for g in ranked if scores.get(g[0], 0.0) > cfg.alpha]
        search["alpha"] = cfg.alpha
    elif cfg.mode == "budget":
        excluded = candidates
    else:
        excluded = _auto_search(ctx, candidates, cfg, search)
    step = {f: k + 1 for k, g in enumerate(excluded) for f in g}
    for f in ctx.targets():
        mp = ctx.plan.modules[f]
        kept = f in step
        mp.decisions["qfem"] = {"kept_fp": kept, "score": scores.get(f, 0.0), "mode": cfg.mode,
                                "step": step.get(f), "granularity": mp.decisions.get("granularity", {}).get("granularity")}
        if kept:
            mp.action, mp.granularity = "fp", None
            mp.reason = f"QFeM: score {scores.get(f, 0.0):.1f} ({cfg.mode}, step {step[f]})"
    ctx.plan.search = search
    return {"kept_fp": sorted(step), "mode": cfg.mode}


def _auto_search(ctx, candidates, cfg, search) -> list[list[str]]:
    heldout = ctx.calib.heldout
    if not heldout:
        raise ValueError("glufx: QFeM auto needs held-out calibration sequences (heldout_samples > 0 and at "
                         "least two calibration sequences); or use GlufxConfig(qfem='alpha', alpha=...)")
    steps = candidates[: cfg.max_search_steps]
    if not steps:
        search.update({"metrics": [], "chosen_steps": 0})
        return []
    quant_targets = [f for f in ctx.targets() if ctx.plan.modules[f].action == "int8"]
    metric = HeldoutMetric(ctx.runner or ctx.model, heldout)  # FP reference first: the model is unquantized
    rw = Lowering(ctx.model, ctx.plan, quant_targets)
    metrics = []
    try:
        for k in tqdm(range(len(steps) + 1), desc="glufx QFeM search", disable=not ctx.progress):
            fp = {f for g in steps[:k] for f in g}
            rw.apply([f for f in quant_targets if f not in fp])
            metrics.append(metric())
    finally:
        rw.apply([])  # the model leaves the search unquantized; lower() rewrites it
    best = min(metrics)
    bound = best + cfg.tolerance * (metrics[0] - best)
    k_star = next(k for k, m in enumerate(metrics) if m <= bound + 1e-12)
    search.update({"metric": "kl" if metric.lm else "relative_mse", "metrics": metrics,
                   "chosen_steps": k_star, "tolerance": cfg.tolerance})
    return steps[:k_star]
