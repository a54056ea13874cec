"""QFeM (SPEC §3): score every projection input by its spike ratio and keep the worst in floating point.

Modes: `auto` walks the score-sorted sibling groups, measuring held-out loss after each exclusion,
and keeps the smallest set within `tolerance` of the best gain; `alpha` keeps r_m > alpha; `budget`
keeps the top scores up to `max_fp_param_share`; `off` quantizes every decoder linear.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import GlufxConfig
from ..data import Batch, is_causal_lm
from ..match import MatchResult
from ..observe import Observer
from ..plan import ModulePlan, Plan
from ..rewrite import Rewriter

TARGET_ROLES = ("gate", "up", "gate_up", "down", "other")


def targets(match: MatchResult, config: GlufxConfig) -> list[str]:
    """Linears glufx may quantize: decoder linears, plus the head if asked; never routers."""
    roles = TARGET_ROLES + (("head",) if config.quantize_lm_head else ())
    return [f for f, p in match.projections.items() if p.kind == "linear" and p.role in roles]


def module_scores(match: MatchResult, observer: Observer) -> dict[str, float]:
    scores = {}
    for st in observer.stats.values():
        for f in st.fqns:
            scores[f] = st.score
    return scores


@torch.no_grad()
def heldout_metric(model: nn.Module, batches: list[Batch], reference: Optional[list] = None) -> float:
    """Mean next-token NLL for causal LMs; relative output MSE against `reference` otherwise."""
    total, count = 0.0, 0
    for i, b in enumerate(batches):
        out = model(*b.args, **b.kwargs)
        if is_causal_lm(model):
            logits = out.logits[:, :-1].float()
            labels = b.token_ids[:, 1:]
            keep = b.mask[:, 1:] & b.mask[:, :-1]
            nll = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
            total, count = total + float(nll), count + int(keep.sum())
        else:
            y, ref = _first_tensor(out).float(), reference[i]
            total += float((y - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30))
            count += 1
    return total / max(count, 1)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise TypeError("glufx: the model returned no tensor to compare")
    return leaves[0]


def decide(model: nn.Module, match: MatchResult, observer: Observer, heldout: list[Batch],
           config: GlufxConfig, x_scales: dict[str, float]) -> Plan:
    quant_targets = targets(match, config)
    scores = module_scores(match, observer)
    decoder_params = sum(match.projections[f].n_params for f in quant_targets if match.projections[f].role != "head")
    # Candidate groups: sibling groups of target linears, worst spikes first.
    groups: dict[int, list[str]] = {}
    for f in quant_targets:
        groups.setdefault(match.projections[f].group, []).append(f)
    ranked = sorted(groups.values(), key=lambda g: -scores.get(g[0], 0.0))
    candidates, share = [], 0.0
    for g in ranked:
        if scores.get(g[0], 0.0) < config.min_score:
            break
        share += sum(match.projections[f].n_params for f in g) / max(decoder_params, 1)
        if share > config.max_fp_param_share + 1e-12:
            break
        candidates.append(g)

    search: dict = {"mode": config.qfem, "candidates": [g for g in candidates]}
    if config.qfem == "off":
        excluded: list[list[str]] = []
    elif config.qfem == "alpha":
        excluded = [g for g in ranked if scores.get(g[0], 0.0) > config.alpha]
        search["alpha"] = config.alpha
    elif config.qfem == "budget":
        excluded = candidates
    else:
        excluded = _auto_search(model, quant_targets, candidates, heldout, config, x_scales, search)

    fp = {f for g in excluded for f in g}
    reasons = {f: f"QFeM: score {scores.get(f, 0.0):.1f} ({config.qfem})" for f in fp}
    modules = {}
    for f, p in match.projections.items():
        if f in quant_targets and f not in fp:
            action, reason = "int8", "W8A8"
        elif f in fp:
            action, reason = "fp", reasons[f]
        else:
            action = "fp"
            reason = {"head": "output head (kept FP; quantize_lm_head=True to change)", "router": "MoE router",
                      "experts": "MoE expert bank (3-D weights: no INT8 kernel yet)"}.get(p.role, "not a target")
        modules[f] = ModulePlan(
            fqn=f, action=action, role=p.role, granularity=config.granularity if action == "int8" else None,
            score=scores.get(f, 0.0), reason=reason, group=p.group, in_features=p.in_features,
            out_features=p.out_features, n_params=p.n_params, kind=p.kind,
            x_scale=x_scales.get(f) if f in quant_targets and config.granularity == "static" else None)
    return Plan(modules=modules, config=config.to_dict(), search=search,
                glu_blocks=[vars(b) for b in match.glu_blocks])


def _auto_search(model, quant_targets, candidates, heldout, config, x_scales, search) -> list[list[str]]:
    if not heldout:
        raise ValueError("glufx: QFeM auto needs held-out calibration sequences (heldout_samples > 0 and at "
                         "least two calibration sequences); or use GlufxConfig(qfem='alpha', alpha=...)")
    steps = candidates[: config.max_search_steps]
    lm = is_causal_lm(model)
    reference = None if lm else [_first_tensor(model(*b.args, **b.kwargs)).float() for b in heldout]
    fp_metric = heldout_metric(model, heldout, reference) if lm else 0.0
    rw = Rewriter(model, quant_targets, config.granularity, x_scales)
    metrics = []
    try:
        for k in tqdm(range(len(steps) + 1), desc="glufx QFeM search", disable=not config.progress):
            fp = {f for g in steps[:k] for f in g}
            rw.apply([f for f in quant_targets if f not in fp])
            metrics.append(heldout_metric(model, heldout, reference))
    finally:
        rw.apply([])  # the model leaves the search unquantized; apply_plan rewrites it
    gaps = [m - fp_metric for m in metrics]
    best = min(gaps)
    bound = best + config.tolerance * (gaps[0] - best)
    k_star = next(k for k, g in enumerate(gaps) if g <= bound + 1e-12)
    search.update({"fp_metric": fp_metric, "metric": "nll" if lm else "relative_mse", "metrics": metrics,
                   "chosen_steps": k_star, "tolerance": config.tolerance})
    return steps[:k_star]
