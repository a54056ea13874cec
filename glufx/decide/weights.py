"""Weight rounding (docs/method.md §11): round-to-nearest, or GPTQ's error-compensating rounding.

Round-to-nearest puts every weight on its row's grid (per-channel scale absmax / 127) independently.
GPTQ (Frantar et al. 2022) rounds one input column at a time and moves the rounding error onto the columns
not yet rounded, weighted by the inverse of the input's second moments H = X^T X, so the error of the
*output* X W^T, not of each weight, is what gets minimised. glufx keeps round-to-nearest's per-channel scale
(the kernels, the exports and the engines read one scale per output channel either way) and only changes
which integer each weight takes.

The rotation a module's input gets online is part of what it multiplies: H is measured on the rotated
input and GPTQ runs on the rotated weight W D H_b, the weight the INT8 codes hold. Each module keeps GPTQ's
codes only where they lower the output error on held-out calibration tokens (half the sampled tokens fit H,
the other half judge), so the rounding never makes a module measurably worse than round-to-nearest. The
codes are the plan's data (a tensor in its sidecar per module), so a plan replayed on a fresh copy of the
model lowers to the same integers.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from tqdm.auto import tqdm

from ..ops import reference as R
from ..rotate import rotation_of
from .scales import sample_inputs

WEIGHT_METHODS = ("rtn", "gptq")
# inputs sampled at once: one calibration pass per this many bytes of [T, K] float32 rows
SAMPLE_BYTES = 2 << 30


def codes_key(fqn: str) -> str:
    return f"weights.gptq.{fqn}"


@torch.no_grad()
def gptq_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, damp: float = 0.01,
               block_size: int = 128) -> torch.Tensor:
    """INT8 codes [N, K] of `w` [N, K] on the per-channel grid `scale` [N], minimising the output error
    under the input second moments `h` [K, K]. With a diagonal `h` this is round-to-nearest exactly."""
    w = w.detach().float().clone()
    h = h.detach().double().clone()  # a Cholesky of a near-singular H in float32 loses the columns' order
    n, k = w.shape
    dead = h.diagonal() == 0  # an input channel calibration never fed: nothing to compensate, no row to use
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads over columns i.. (GPTQ eq. 4)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    s = scale.float()[:, None]  # [N, 1]
    q = torch.empty(n, k, dtype=torch.int8)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        wb, hb = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]  # wb: [N, b]
        err = torch.zeros_like(wb)
        for i in range(i2 - i1):
            qi = R._quantize(wb[:, i:i + 1], s)  # [N, 1]
            q[:, i1 + i] = qi[:, 0]
            e = (wb[:, i] - qi[:, 0].float() * s[:, 0]) / hb[i, i]
            wb[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q


def _output_error(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> float:
    """||X W^T - X (s * codes)^T||^2 / ||X W^T||^2."""
    ref = x @ w.T
    return float((x @ (codes.float() * scale[:, None]).T - ref).square().sum()) / (float(ref.square().sum()) or 1.0)


def _chunks(groups: dict[int, list[str]], k_of: dict[str, int], max_tokens: int) -> list[list[int]]:
    """Groups in runs whose sampled inputs fit SAMPLE_BYTES (one calibration pass each)."""
    out, cur, size = [], [], 0
    for g, fs in groups.items():
        need = 4 * max_tokens * k_of[fs[0]]
        if cur and size + need > SAMPLE_BYTES:
            out.append(cur)
            cur, size = [], 0
        cur.append(g)
        size += need
    return out + ([cur] if cur else [])


@torch.no_grad()
def round_weights(ctx, max_tokens: int = 4096, damp: float = 0.01, block_size: int = 128) -> dict:
    """GPTQ codes for every INT8 target, kept where they beat round-to-nearest on held-out tokens; writes
    `ModulePlan.weights`, the codes into the plan's tensors and `decisions["weights"]`. Returns a summary."""
    plan = ctx.plan
    groups: dict[int, list[str]] = defaultdict(list)
    for f in ctx.targets():
        mp = plan.modules[f]
        mp.weights = None
        plan.tensors.pop(codes_key(f), None)
        if mp.action == "int8" and mp.kind == "linear":
            groups[mp.group].append(f)
    k_of = {f: plan.modules[f].in_features for fs in groups.values() for f in fs}
    kept, n, gains = 0, 0, []
    bar = tqdm(total=sum(map(len, groups.values())), desc="glufx GPTQ", unit="linear", disable=not ctx.progress)
    for chunk in _chunks(groups, k_of, max_tokens):
        samples = sample_inputs(ctx, [groups[g][0] for g in chunk], max_tokens)
        for g in chunk:
            x_all = samples[groups[g][0]]  # x: [T, K], the group's shared input
            for f in groups[g]:
                mp = plan.modules[f]
                w = ctx.model.get_submodule(f).weight.detach().float()
                x = x_all
                rotation = rotation_of(mp, plan.tensors)
                if rotation is not None:  # what the codes multiply: the rotated input and weight
                    block, signs = rotation
                    x = torch.ops.glufx.hadamard(x.contiguous(), block, signs)
                    w = torch.ops.glufx.hadamard(w.contiguous(), block, signs)
                fit, judge = x[0::2], x[1::2]
                _, scale = torch.ops.glufx.quantize_weight(w)
                rtn = R._quantize(w, scale[:, None])
                codes = gptq_codes(w, fit.T @ fit, scale, damp, block_size)
                e_rtn, e_gptq = _output_error(judge, w, rtn, scale), _output_error(judge, w, codes, scale)
                use = e_gptq < e_rtn
                if use:
                    plan.tensors[codes_key(f)] = codes
                    mp.weights = {"method": "gptq", "codes": codes_key(f)}
                    kept += 1
                mp.decisions["weights"] = {"method": "gptq" if use else "rtn", "error_rtn": e_rtn,
                                           "error_gptq": e_gptq, "tokens_fit": fit.shape[0],
                                           "tokens_judged": judge.shape[0]}
                gains.append(e_gptq / e_rtn if e_rtn > 0 else 1.0)
                n += 1
                bar.update(1)
        del samples
    bar.close()
    gains.sort()
    return {"linears": n, "gptq_kept": kept,
            **({"median_error_ratio": gains[len(gains) // 2]} if gains else {})}
