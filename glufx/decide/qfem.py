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


class _CaptureHead(nn.Module):
    """Stands in for the output head: records its input (the final hidden states) and returns one
    logit per position, so a measurement skips the vocabulary-sized GEMM."""

    def __init__(self):
        super().__init__()
        self.seen: Optional[torch.Tensor] = None

    def forward(self, h):
        self.seen = h.detach()
        return h[..., :1]


class HiddenStateError:
    """Relative squared error of the final hidden states (the head's input) against the FP model's on
    held-out sequences, padding excluded: a cheap proxy for the held-out KL (no head GEMM, which on a
    262k-vocabulary model costs more than the decoder), for ranking many candidate plans."""

    def __init__(self, runner: nn.Module, model: nn.Module, head_fqn: str, batches: list[Batch]):
        # runner: what is called (the model, or a PrefixedLM around it); model: where the head lives
        self.runner, self.model, self.head_fqn, self.batches = runner, model, head_fqn, batches
        self.head = model.get_submodule(head_fqn)
        self.capture = _CaptureHead()
        self.reference = [self._hidden(b) for b in batches]

    @torch.no_grad()
    def _hidden(self, b: Batch) -> torch.Tensor:
        self.model.set_submodule(self.head_fqn, self.capture)
        try:
            self.runner(*b.args, **b.kwargs)
        finally:
            self.model.set_submodule(self.head_fqn, self.head)
        h = self.capture.seen.float()  # h: [B, T, D]
        return h[b.mask.bool()] if b.mask is not None and b.mask.shape == h.shape[:2] else h.reshape(-1, h.shape[-1])

    def __call__(self) -> float:
        err = sum(float((self._hidden(b) - r).square().sum()) for b, r in zip(self.batches, self.reference))
        return err / max(sum(float(r.square().sum()) for r in self.reference), 1e-30)


def proxy_metric(ctx, batches):
    """HiddenStateError for a causal LM with a matched head, else the full HeldoutMetric."""
    heads = [f for f, p in ctx.match.projections.items() if p.role == "head"]
    runner = ctx.runner or ctx.model
    if is_causal_lm(ctx.model) and len(heads) == 1:
        return HiddenStateError(runner, ctx.model, heads[0], batches)
    return HeldoutMetric(runner, batches)


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
    search: dict = {"mode": cfg.mode, "order": cfg.order, "candidates": candidates}
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
        if kept:  # what it would have run with stays in the decision (Plan.without_qfem restores it)
            mp.decisions["qfem"].update(rotation=mp.rotation, x_scale=mp.x_scale)
            mp.action, mp.granularity, mp.rotation, mp.x_scale = "fp", None, None, None
            mp.reason = f"QFeM: score {scores.get(f, 0.0):.1f} ({cfg.mode}, step {step[f]})"
    ctx.plan.search = search
    return {"kept_fp": sorted(step), "mode": cfg.mode}


def _auto_search(ctx, candidates, cfg, search) -> list[list[str]]:
    heldout = ctx.calib.heldout
    if not heldout:
        raise ValueError("glufx: QFeM auto needs held-out calibration sequences (heldout_samples > 0 and at "
                         "least two calibration sequences); or use GlufxConfig(qfem='alpha', alpha=...)")
    quant_targets = [f for f in ctx.targets() if ctx.plan.modules[f].action == "int8"]
    if cfg.order == "sensitivity" and quant_targets:
        rw = Lowering(ctx.model, ctx.plan, quant_targets)
        try:
            candidates = _by_sensitivity(ctx, cfg, rw, proxy_metric(ctx, heldout), quant_targets, search)
            search["candidates"] = candidates
        except BaseException:
            rw.apply([])
            raise
    steps = candidates[: cfg.max_search_steps]
    if not steps:
        search.update({"metrics": [], "chosen_steps": 0})
        return []
    if cfg.order != "sensitivity":
        rw = Lowering(ctx.model, ctx.plan, quant_targets)
    rw.apply([])
    metric = HeldoutMetric(ctx.runner or ctx.model, heldout)  # FP reference first: the model is unquantized
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


def _by_sensitivity(ctx, cfg, rw, metric, quant_targets, search) -> list[list[str]]:
    """Sibling groups ordered by the held-out gain of keeping each one alone in FP (everything else
    quantized; measured as HiddenStateError, the final hidden states' error), per parameter, best first; only groups whose gain is positive, within
    max_fp_param_share. Measures what the spike score predicts: on models whose damage comes from
    channel outliers more than from token spikes the two orders differ."""
    match = ctx.match
    decoder_params = sum(match.projections[f].n_params for f in ctx.targets() if match.projections[f].role != "head")
    groups: dict[int, list[str]] = {}
    for f in quant_targets:
        groups.setdefault(match.projections[f].group, []).append(f)
    rw.apply(quant_targets)
    base = metric()
    gain = {}
    for g, fs in tqdm(groups.items(), desc="glufx QFeM sensitivity", unit="group", disable=not ctx.progress):
        rw.apply([f for f in quant_targets if f not in fs])
        gain[g] = base - metric()
    params = {g: sum(match.projections[f].n_params for f in fs) for g, fs in groups.items()}
    ordered, share = [], 0.0
    for g in sorted(groups, key=lambda g: -gain[g] / params[g]):
        share += params[g] / max(decoder_params, 1)
        if gain[g] <= 0 or share > cfg.max_fp_param_share + 1e-12:
            break
        ordered.append(groups[g])
    search.update({"order": "sensitivity", "sensitivity_metric": type(metric).__name__, "all_int8_proxy": base,
                   "gain": {groups[g][0]: gain[g] for g in groups}})
    return ordered
