"""QFeP (docs/method.md §4): choose the quantization-free prefix whose cached KV absorbs the activation spikes.

`paper`: target module m* = argmax score; candidate spike tokens s from m*'s per-sequence top-3
positions (BOS dropped); contexts c = the most frequent calibration tokens; pick the (c, s) whose
spike on the first occurrence of s in [BOS, c, s, c, s] is largest relative to the second:
rho = a(pos 2) / a(pos 4). Prefix [BOS, c*, s*].
`prefixquant` (arXiv 2410.05265): length = mean number of tokens per sequence whose down_proj input
exceeds eta x the median, tokens = the most frequent such tokens, BOS last.
Models whose tokenizer adds no BOS (Qwen) start from what they see at a document start instead, their
document separator (EOS, e.g. `<|endoftext|>`): [EOS, c*, s*]; with neither, [c*, s*].

A prefix changes the model it protects as well: `prefix_fp_effect` measures the FP model with the
prefix against the plain FP model (KL per token on held-out calibration sequences), and DecideQFeP
declines a prefix whose effect exceeds its bound (docs/method.md §4).
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import nn

import torch.nn.functional as F

from ..calibdata import Batch, CalibrationSet
from ..observe import OUTLIER_ETA, InputStats


def token_frequencies(calib: CalibrationSet, bos: Optional[int]) -> Counter:
    counts: Counter = Counter()
    for b in calib.batches:
        if b.token_ids is None:
            continue
        keep = b.mask.clone()
        if bos is not None:
            keep[:, 0] &= b.token_ids[:, 0] != bos  # the BOS column never counts as context
        counts.update(b.token_ids[keep].tolist())
    if bos is not None:
        counts.pop(bos, None)
    return counts


@torch.no_grad()
def module_input_absmax(model: nn.Module, fqn: str, ids: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Token-wise absmax of `fqn`'s input for every row of `ids` [R, T] -> [R, T] (FP model, no cache)."""
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(fqn).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().abs().amax(-1)))
    try:
        for i in range(0, len(ids), batch):
            model(input_ids=ids[i:i + batch], use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return torch.cat([s.float().reshape(-1, ids.shape[1]) for s in seen])


def search_paper(model: nn.Module, target: str, stats: InputStats, calib: CalibrationSet, bos: Optional[int],
                 n_candidates: int = 3, n_contexts: int = 200) -> dict:
    best: dict[int, float] = {}
    for seq in stats.seq_top:
        for v, pos, tok in seq:
            if tok < 0 or (bos is not None and tok == bos) or (pos == 0 and bos is not None):
                continue
            best[tok] = max(best.get(tok, 0.0), v)
    candidates = sorted(best, key=best.get, reverse=True)[:n_candidates]
    if not candidates:
        raise ValueError(f"glufx QFeP: no spike token found in the input of {target} (besides BOS); "
                         "calibrate on more text or disable QFeP")
    contexts = [t for t, _ in token_frequencies(calib, bos).most_common(n_contexts)]
    head = [bos] if bos is not None else []
    rows, pairs = [], []
    for s in candidates:
        for c in contexts:
            rows.append(head + [c, s, c, s])
            pairs.append((c, s))
    a = module_input_absmax(model, target, torch.tensor(rows))
    first, second = len(head) + 1, len(head) + 3
    rho = a[:, first] / a[:, second].clamp_min(1e-12)
    i = int(rho.argmax())
    c_star, s_star = pairs[i]
    return {"method": "paper", "target": target, "token_ids": head + [c_star, s_star], "rho": float(rho[i]),
            "spike": float(a[i, first]),
            "candidates": [{"token_id": t, "value": best[t]} for t in candidates], "n_contexts": len(contexts)}


def search_prefixquant(target: str, down_stats: list[InputStats], bos: Optional[int], max_len: int = 4) -> dict:
    n_seq = max(len(down_stats[0].seq_outliers), 1)
    per_seq: list[set[tuple[int, int]]] = [set() for _ in range(n_seq)]
    for st in down_stats:
        for i, outs in enumerate(st.seq_outliers):
            per_seq[i].update(outs)
    counts: Counter = Counter(tok for s in per_seq for _, tok in s if tok >= 0)
    mean_len = sum(len(s) for s in per_seq) / n_seq
    length = max(1, min(max_len, round(mean_len)))
    n_tokens = length - (bos is not None)
    if bos is not None:
        counts.pop(bos, None)
    tokens = [t for t, _ in counts.most_common(n_tokens)]
    if n_tokens > 0 and not tokens:
        raise ValueError(f"glufx QFeP (prefixquant): no token exceeds {OUTLIER_ETA:g}x the median in any down_proj "
                         "input; there are no spikes to absorb (use QFeM alone) or choose method='paper'")
    return {"method": "prefixquant", "target": target, "token_ids": tokens + ([bos] if bos is not None else []),
            "eta": OUTLIER_ETA, "mean_outliers_per_sequence": mean_len,
            "candidates": [{"token_id": t, "count": c} for t, c in counts.most_common(8)]}


def document_start_token(model: nn.Module, bos: Optional[int]) -> Optional[int]:
    """What the model sees before a document: BOS, else its document separator (the first EOS id)."""
    if bos is not None:
        return bos
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos


@torch.no_grad()
def prefix_fp_effect(model: nn.Module, prefixed: nn.Module, batches: list[Batch], bos: Optional[int]) -> float:
    """Mean KL(P_plain || P_prefixed) per token of the FP model without and with the prefix, on the
    user's tokens from the second on (the first has no context in the plain model)."""
    total, count = 0.0, 0
    for b in batches:
        ids = b.token_ids
        if ids is None:
            continue
        has_bos = bos is not None and bool((ids[:, 0] == bos).all())
        user = ids[:, 1:] if has_bos else ids
        plain = model(input_ids=ids, use_cache=False).logits.float()
        plain = plain[:, 1:] if has_bos else plain  # plain[:, i] and pref[:, i] predict user[:, i + 1]
        pref = prefixed(input_ids=user).logits.float()
        p, q = F.log_softmax(plain[:, 1:-1], -1), F.log_softmax(pref[:, 1:-1], -1)
        mask = b.mask[:, -user.shape[1]:][:, 1:-1] if b.mask is not None else torch.ones(p.shape[:2], dtype=torch.bool)
        kl = (p.exp() * (p - q)).sum(-1)
        total += float(kl[mask].sum())
        count += int(mask.sum())
    return total / max(count, 1)
