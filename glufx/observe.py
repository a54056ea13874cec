"""Observe: observer nodes in the captured graph record streaming statistics of every projection input.

Per observed input (a sibling group shares one), per calibration sequence: the token-wise absmax
a[t] = max_j |X[t, j]| reduced to its max and median (QFeM's score needs nothing more), plus the global
max, per-channel absmax, and the largest token absmaxes with their token id and position. Memory is
O(sequences + channels) per input, independent of the number of tokens. Padding never enters.

The observers are plain Python call_function nodes: they run when the captured GraphModule runs
eagerly, which is how calibration runs (docs/design.md: under torch.compile such a node would
record only once, on fake tensors).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx
from tqdm.auto import tqdm

from .calibdata import CalibrationSet
from .match import MatchResult

TOP_K = 16
SEQ_TOP = 3  # per-sequence top positions kept for QFeP's candidate search (docs/method.md §4)
OUTLIER_ETA = 64.0  # PrefixQuant: a token is an outlier when a[t] > eta * median_t a


class CalibrationError(ValueError):
    pass


@dataclass
class InputStats:
    """Statistics of one linear input tensor, shared by its sibling linears."""

    fqns: list[str]
    in_features: int
    seq_max: list[float] = field(default_factory=list)  # per sequence: max_t a[t]
    seq_median: list[float] = field(default_factory=list)  # per sequence: median_t a[t]
    absmax: float = 0.0
    channel_absmax: Optional[torch.Tensor] = None  # [K]
    top: list[tuple[float, int, int, int]] = field(default_factory=list)  # (a, sequence, position, token id)
    seq_top: list[list[tuple[float, int, int]]] = field(default_factory=list)  # per sequence: (a, position, token id)
    seq_outliers: list[list[tuple[int, int]]] = field(default_factory=list)  # per sequence: (position, token id)
    n_tokens: int = 0
    # the first calibration sequence's token-wise absmax a[t] and token ids, position by position: what a
    # report plots to show where the spikes sit (the paper's figure), without recalibrating
    trace: list[float] = field(default_factory=list)
    trace_tokens: list[int] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [m / max(md, 1e-12) for m, md in zip(self.seq_max, self.seq_median)]

    @property
    def score(self) -> float:
        """docs/method.md §3: r = mean over sequences of max_t a[t] / median_t a[t]."""
        r = self.ratios
        return sum(r) / len(r) if r else 0.0

    def top_tokens(self) -> list[dict]:
        return [{"value": v, "sequence": s, "position": p, "token_id": t} for v, s, p, t in sorted(self.top, reverse=True)]

    def to_dict(self) -> dict:
        return {
            "fqns": self.fqns, "in_features": self.in_features, "score": self.score, "absmax": self.absmax,
            "n_tokens": self.n_tokens, "seq_max": self.seq_max, "seq_median": self.seq_median,
            "top": self.top_tokens(),
            "channel_absmax": self.channel_absmax.tolist() if self.channel_absmax is not None else None,
        }


class Observer:
    """Holds the statistics and the context (mask, token ids) of the batch being run."""

    def __init__(self, match: MatchResult):
        self.stats: dict[int, InputStats] = {}
        for gid, members in enumerate(match.groups):
            ps = [match.projections[f] for f in members]
            if any(p.kind == "linear" for p in ps):
                self.stats[gid] = InputStats(fqns=members, in_features=ps[0].in_features)
        self.mask: Optional[torch.Tensor] = None
        self.token_ids: Optional[torch.Tensor] = None
        self.seq_offset = 0

    def by_fqn(self) -> dict[str, InputStats]:
        """Statistics per linear FQN (sibling linears share one InputStats)."""
        return {f: st for st in self.stats.values() for f in st.fqns}

    def record(self, x: torch.Tensor, gid: int) -> None:
        st = self.stats[gid]
        x = x.detach()
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"glufx: calibration activations entering {', '.join(st.fqns)} contain NaN or Inf: the "
                "floating-point model itself overflows on this data (float16? run calibration in float32 or "
                "bfloat16, and check the calibration inputs)")
        x = x.float()
        mask = self.mask
        if mask is not None and x.dim() == 2 and x.shape[0] == mask.numel():
            x = x.view(*mask.shape, x.shape[-1])
        if x.dim() < 2:
            return
        if mask is None or tuple(x.shape[:-1]) != tuple(mask.shape):
            x = x.reshape(-1, x.shape[-2], x.shape[-1])  # [B, T, K], every position valid
            mask = torch.ones(x.shape[:2], dtype=torch.bool)
            ids = None
        else:
            x = x.reshape(-1, x.shape[-2], x.shape[-1])
            mask = mask.reshape(x.shape[:2])
            ids = self.token_ids.reshape(x.shape[:2]) if self.token_ids is not None else None
        a = x.abs()
        tok = a.amax(dim=-1)  # [B, T] token-wise absmax
        valid = a[mask]  # [n_valid, K]
        if valid.numel():
            ch = valid.amax(dim=0)
            st.channel_absmax = ch if st.channel_absmax is None else torch.maximum(st.channel_absmax, ch)
            st.absmax = max(st.absmax, float(ch.max()))
        for b in range(tok.shape[0]):
            t_valid = tok[b][mask[b]]
            if t_valid.numel() == 0:
                continue
            median = float(t_valid.median())
            st.seq_max.append(float(t_valid.max()))
            st.seq_median.append(median)
            st.n_tokens += int(t_valid.numel())
            positions = mask[b].nonzero().squeeze(1)
            token = (lambda pos: int(ids[b, pos])) if ids is not None else (lambda pos: -1)
            if self.seq_offset + b == 0 and not st.trace:
                st.trace = t_valid.tolist()
                st.trace_tokens = ids[b][mask[b]].tolist() if ids is not None else []
            vals, idx = t_valid.topk(min(TOP_K, t_valid.numel()))
            seq_top = []
            for v, i in zip(vals.tolist(), idx.tolist()):
                pos = int(positions[i])
                item = (v, self.seq_offset + b, pos, token(pos))
                if len(seq_top) < SEQ_TOP:
                    seq_top.append((v, pos, item[3]))
                if len(st.top) < TOP_K:
                    heapq.heappush(st.top, item)
                elif item > st.top[0]:
                    heapq.heapreplace(st.top, item)
            st.seq_top.append(seq_top)
            out_idx = (t_valid > OUTLIER_ETA * median).nonzero().squeeze(1).tolist()
            st.seq_outliers.append([(int(positions[i]), token(int(positions[i]))) for i in out_idx])


def instrument(gm: fx.GraphModule, match: MatchResult, observer: Observer) -> int:
    """Insert one observer node per observed input; returns the number inserted."""
    nodes = {n.name: n for n in gm.graph.nodes}
    inserted = 0
    for gid in observer.stats:
        producer = nodes[match.projections[match.groups[gid][0]].input_node]
        with gm.graph.inserting_after(producer):
            gm.graph.call_function(observer.record, (producer, gid))
        inserted += 1
    gm.recompile()
    return inserted


@torch.no_grad()
def run_calibration(gm: fx.GraphModule, observer: Observer, calib: CalibrationSet, extra_kwargs: Optional[dict] = None,
                    progress: bool = True) -> None:
    for batch in tqdm(calib.batches, desc="glufx calibrate", unit="batch", disable=not progress):
        observer.mask, observer.token_ids = batch.mask, batch.token_ids
        gm(*batch.args, **batch.kwargs, **(extra_kwargs or {}))
        observer.seq_offset += batch.n_sequences
    observer.mask = observer.token_ids = None
