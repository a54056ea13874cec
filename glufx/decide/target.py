"""A granularity plan to a quality target (docs/method.md §10).

Each sibling group of INT8 targets (q/k/v, gate/up, ...) takes the cheapest rung of the ladder
static per-tensor -> per-token dynamic (online-rotated) -> floating point that a budget allows. The
budget is a perplexity increase (`metric="ppl"`: exp(mean NLL_q - mean NLL_ref) - 1 over every
scored token of the held-out calibration sequences) or a KL per token to the reference (`"kl"`),
where the reference is the floating-point model as calibration runs it (its QFeP prefix included:
the prefix's own effect is measured by the QFeP stage and recorded apart).

1. Everything per-token. Over budget: sibling groups go to floating point in QFeM's order (spike
   score, within `max_fp_param_share`), measured one step at a time, until the budget holds.
2. Sensitivity: each remaining group made static alone, the others per-token; the change of the
   final hidden states' error (`HiddenStateError`: no vocabulary-sized head GEMM, which on Gemma's
   262k vocabulary costs more than the decoder; one evaluation per group).
3. Groups sorted by sensitivity per parameter (cheapest static parameters first); the longest prefix
   of that order that fits the budget, measured on the budget's own metric, is made static, found by
   bisection.

Every measurement is recorded: per module its rung, sensitivity and rank (`decisions["target"]`),
the measured curve of static share against the metric (`plan.search["target"]["curve"]`), and an
estimate of the speed cost (`speed`: time relative to all-static, from the per-rung costs below).
"""
from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibdata import is_causal_lm
from ..lower import lower_weights
from ..rotate import hadamard_block, random_signs, signs_key
from .qfem import HeldoutMetric, candidate_groups, proxy_metric

RUNGS = ("static", "per_token", "fp")
# Time of a decoder linear per rung relative to static INT8, for the plan's speed estimate: the
# per-token rung adds a per-row absmax pass and the online rotation (benchmarks/bench_linear.py,
# glufx_rotated vs glufx: +1..+50 % with M; 1.25 taken), floating point runs FP32 GEMMs (3-5x INT8
# there; 4 taken). An estimate, not a measurement of this machine.
RUNG_COST = {"static": 1.0, "per_token": 1.25, "fp": 4.0}


class PerplexityMetric:
    """Relative perplexity increase of the (partly) quantized model over the reference it was
    built from, on held-out sequences: every position with a next token scored, paired with the
    reference's NLL at the same position (stored once)."""

    def __init__(self, model, batches):
        if not is_causal_lm(model):
            raise ValueError("glufx: a perplexity target needs a causal language model; use "
                             "GlufxConfig(target_metric='kl') (relative output error for other modules)")
        self.model, self.batches = model, batches
        self.reference = torch.cat([self._nll(b) for b in batches])

    @torch.no_grad()
    def _nll(self, b) -> torch.Tensor:
        logits = self.model(*b.args, **b.kwargs).logits  # logits: [1, T, V]
        ids, mask = b.token_ids, b.mask
        keep = mask[:, 1:].bool() & mask[:, :-1].bool()  # a scored position predicts a real next token
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")  # [1, T-1]
        return nll[keep].double()

    def __call__(self) -> float:
        delta = torch.cat([self._nll(b) for b in self.batches]) - self.reference
        return math.expm1(float(delta.mean()))


class Ladder:
    """Each candidate linear lowered once per rung (static, per-token) and swapped in on demand."""

    def __init__(self, model, plan, fqns: list[str], rotation: str, max_block: int, seed: int = 0,
                 progress: bool = False):
        self.model, self.plan = model, plan
        self.original = {f: model.get_submodule(f) for f in fqns}
        self.modules: dict[str, dict] = {}
        self.variants: dict[str, dict] = {}
        for f in tqdm(fqns, desc="glufx target: lower both rungs", unit="linear", disable=not progress):
            mp = plan.modules[f]
            per_token = copy.deepcopy(mp)
            per_token.granularity, per_token.x_scale, per_token.rotation = "per_token", None, None
            block = hadamard_block(mp.in_features, max_block) if rotation != "off" else 0
            if block:
                key = signs_key(mp.in_features, seed)
                plan.tensors.setdefault(key, random_signs(mp.in_features, seed))
                per_token.rotation = {"kind": rotation, "block": block, "signs": key}
            static = copy.deepcopy(mp)
            static.granularity, static.rotation = "static", None
            self.variants[f] = {"static": static, "per_token": per_token}
            mod = self.original[f]
            self.modules[f] = {r: lower_weights(mod.weight, mod.bias, v, plan.tensors) for r, v in self.variants[f].items()}
            self.modules[f]["fp"] = mod

    def apply(self, rungs: dict[str, str]) -> None:
        for f, r in rungs.items():
            self.model.set_submodule(f, self.modules[f][r])

    def restore(self) -> None:
        for f, mod in self.original.items():
            self.model.set_submodule(f, mod)


def decide_target(ctx, cfg) -> dict:
    """The target stage: every INT8 target gets a rung; the plan records why."""
    heldout = ctx.calib.heldout
    if not heldout:
        raise ValueError("glufx: a quality target needs held-out calibration sequences (heldout_samples > 0 and "
                         "at least two calibration sequences) to measure the budget on")
    plan = ctx.plan
    targets = [f for f in ctx.targets() if plan.modules[f].action == "int8"]
    missing = [f for f in targets if plan.modules[f].x_scale is None]
    if missing:
        raise ValueError(f"glufx: DecideTarget needs a static scale for every candidate ({missing[0]} has none): put "
                         "DecideGranularity('static') and DecideScales() before it")
    runner = ctx.runner or ctx.model
    metric = PerplexityMetric(runner, heldout) if cfg.metric == "ppl" else HeldoutMetric(runner, heldout)
    groups: dict[int, list[str]] = {}
    for f in targets:
        groups.setdefault(plan.modules[f].group, []).append(f)
    params = {g: sum(plan.modules[f].n_params for f in fs) for g, fs in groups.items()}
    total = sum(params.values()) or 1
    ladder = Ladder(ctx.model, plan, targets, cfg.rotation, cfg.max_block, progress=ctx.progress)
    rung = {g: "per_token" for g in groups}
    measured: list[dict] = []

    def measure(assign: dict, what: str) -> float:
        ladder.apply({f: assign[g] for g, fs in groups.items() for f in fs})
        m = metric()
        if not math.isfinite(m):
            raise FloatingPointError(f"glufx: the {what} model's held-out {cfg.metric} is {m}: NaN or inf "
                                     "activations; check the calibration data and the model's dtype")
        return m

    def share(assign: dict, which: str) -> float:
        return sum(params[g] for g, r in assign.items() if r == which) / total

    try:
        base = measure(rung, "per-token")
        measured.append({"step": "per_token", "static_share": 0.0, "fp_share": 0.0, "metric": base})
        # 1. the floating-point rung, while even per-token misses the budget
        fp_steps = []
        if base > cfg.budget:
            _, candidates = candidate_groups(ctx, cfg)
            gid = {f: g for g, fs in groups.items() for f in fs}
            for cand in tqdm(candidates, desc="glufx target: FP rung", disable=not ctx.progress):
                g = gid.get(cand[0])
                if g is None:
                    continue
                rung[g] = "fp"
                base = measure(rung, "FP-rung")
                fp_steps.append(g)
                measured.append({"step": f"fp {len(fp_steps)}", "static_share": 0.0, "fp_share": share(rung, "fp"),
                                 "metric": base})
                if base <= cfg.budget:
                    break
        free = [g for g in groups if rung[g] == "per_token"]
        # 2. sensitivity of each group's static rung, alone: the final hidden states' error (a proxy
        # without the head GEMM, one evaluation per group; the budget itself is checked on `metric`)
        proxy = proxy_metric(ctx, heldout)
        ladder.apply({f: rung[g] for g, fs in groups.items() for f in fs})
        proxy_base = proxy()
        sensitivity = {}
        for g in tqdm(free, desc="glufx target: static sensitivity", unit="group", disable=not ctx.progress):
            ladder.apply({f: "static" for f in groups[g]})
            sensitivity[g] = proxy() - proxy_base
            ladder.apply({f: "per_token" for f in groups[g]})
        order = sorted(free, key=lambda g: sensitivity[g] / params[g])
        # 3. the longest prefix of that order within budget: bisection over measured prefixes
        curve = {0: base}

        def at(k: int) -> float:
            if k not in curve:
                curve[k] = measure({**rung, **{g: "static" for g in order[:k]}}, f"{k}-static-groups")
                measured.append({"step": f"static {k}", "static_share": sum(params[g] for g in order[:k]) / total,
                                 "fp_share": share(rung, "fp"), "metric": curve[k]})
            return curve[k]

        lo, hi = 0, len(order) + 1  # at(lo) within budget (lo=0 when base is); hi: first known over budget
        if base > cfg.budget:
            hi = 1
        with tqdm(desc="glufx target: static prefix", disable=not ctx.progress) as bar:
            while hi - lo > 1:
                probe = (lo + hi) // 2
                if at(probe) <= cfg.budget:
                    lo = probe
                else:
                    hi = probe
                bar.update()
        k_star = lo
        for g in order[:k_star]:
            rung[g] = "static"
        final = at(k_star) if k_star else base
    finally:
        ladder.restore()  # the model leaves the stage unquantized; lower() rewrites it

    if final > cfg.budget:
        warnings.warn(f"glufx: the {cfg.metric} budget {cfg.budget} is not reachable within max_fp_param_share="
                      f"{cfg.max_fp_param_share} (best measured: {final:.4g} with every candidate group per-token or "
                      "FP); the plan keeps that best. Raise the budget or max_fp_param_share", stacklevel=2)
    rank = {g: i for i, g in enumerate(order)}
    for g, fs in groups.items():
        r = rung[g]
        for f in fs:
            mp, v = plan.modules[f], ladder.variants[f]
            if r == "fp":
                mp.action, mp.granularity, mp.x_scale, mp.rotation = "fp", None, None, None
                mp.reason = f"target: FP rung (score {mp.score:.1f}, per-token missed the {cfg.metric} budget)"
            else:
                mp.granularity, mp.x_scale, mp.rotation = r, v[r].x_scale, v[r].rotation
                mp.reason = (f"target: {r} (static sensitivity {sensitivity.get(g, float('nan')):+.2e} hidden-state "
                             f"error, rank {rank.get(g, -1) + 1}/{len(order)})")
            mp.decisions["target"] = {"rung": r, "metric": cfg.metric, "budget": cfg.budget,
                                      "static_sensitivity": sensitivity.get(g), "rank": rank.get(g),
                                      "group_params": params[g]}
            mp.decisions["granularity"] = {"granularity": mp.granularity, "source": "target"}
            if "scales" in mp.decisions:
                mp.decisions["scales"]["applied"] = r == "static"
            if "rotation" in mp.decisions or r == "per_token":
                mp.decisions["rotation"] = ({"rotated": True, "block": mp.rotation["block"], "signs": True}
                                            if mp.rotation else {"rotated": False, "why": f"{r} rung"})
    speed = sum(params[g] * RUNG_COST[rung[g]] for g in groups) / total
    summary = {"metric": cfg.metric, "budget": cfg.budget, "sensitivity_metric": type(proxy).__name__,
               "per_token_metric": measured[0]["metric"],
               "final_metric": final, "within_budget": final <= cfg.budget,
               "static_share": share(rung, "static"), "per_token_share": share(rung, "per_token"),
               "fp_share": share(rung, "fp"), "speed_vs_all_static": speed, "rung_cost": RUNG_COST,
               "evaluations": len(measured) + len(sensitivity),
               "curve": sorted(({"static_groups": k, "static_share": sum(params[g] for g in order[:k]) / total,
                                 "metric": m} for k, m in curve.items()), key=lambda r: r["static_groups"]),
               "steps": measured}
    plan.search["target"] = summary
    return {k: v for k, v in summary.items() if k not in ("curve", "steps")}
