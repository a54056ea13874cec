"""QFeM (SPEC §3): score every projection input by its spike ratio and keep the worst in floating point.

Modes: `auto` walks the score-sorted sibling groups, measuring held-out loss after each exclusion,
and keeps the smallest set within `tolerance` of the best gain; `alpha` keeps r_m > alpha; `budget`
keeps the top scores up to `max_fp_param_share`; `off` quantizes every decoder linear.
"""
from __future__ import annotations

from typing import Optional

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


def module_scores(observer: Observer) -> dict[str, float]:
    return {f: st.score for f, st in observer.by_fqn().items()}


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
        try:
            logits = self.model(*b.args, **b.kwargs, logits_to_keep=self.keep[i]).logits[0]
        except TypeError:  # a model without logits_to_keep: full head, then select
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


def decide(model: nn.Module, match: MatchResult, observer: Observer, heldout: list[Batch],
           config: GlufxConfig, x_scales: dict[str, float], runner: Optional[nn.Module] = None) -> Plan:
    """`runner` runs the held-out metric (the QFeP wrapper when a prefix is active); `model` is rewritten."""
    quant_targets = targets(match, config)
    scores = module_scores(observer)
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
        excluded = _auto_search(model, runner or model, quant_targets, candidates, heldout, config, x_scales, search)

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


def _auto_search(model, runner, quant_targets, candidates, heldout, config, x_scales, search) -> list[list[str]]:
    if not heldout:
        raise ValueError("glufx: QFeM auto needs held-out calibration sequences (heldout_samples > 0 and at "
                         "least two calibration sequences); or use GlufxConfig(qfem='alpha', alpha=...)")
    steps = candidates[: config.max_search_steps]
    if not steps:
        search.update({"metrics": [], "chosen_steps": 0})
        return []
    metric = HeldoutMetric(runner, heldout)  # FP reference first: the model is still unquantized here
    rw = Rewriter(model, quant_targets, config.granularity, x_scales)
    metrics = []
    try:
        for k in tqdm(range(len(steps) + 1), desc="glufx QFeM search", disable=not config.progress):
            fp = {f for g in steps[:k] for f in g}
            rw.apply([f for f in quant_targets if f not in fp])
            metrics.append(metric())
    finally:
        rw.apply([])  # the model leaves the search unquantized; apply_plan rewrites it
    best = min(metrics)
    bound = best + config.tolerance * (metrics[0] - best)
    k_star = next(k for k, m in enumerate(metrics) if m <= bound + 1e-12)
    search.update({"metric": "kl" if metric.lm else "relative_mse", "metrics": metrics,
                   "chosen_steps": k_star, "tolerance": config.tolerance})
    return steps[:k_star]
