"""Calibration statistics as an artifact: saved beside the plan, read by reports and later decisions
without recalibrating.

Per observed linear input (sibling linears share one): per sequence the max and median of the
token-wise absmax, the global absmax, the per-channel absmax, the largest tokens with their sequence,
position and token id, the per-sequence top positions and outliers. JSON for the scalars and lists,
safetensors for the per-channel vectors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .observe import InputStats

STATS_VERSION = 1
JSON_FILE, TENSOR_FILE = "glufx_stats.json", "glufx_stats.safetensors"


@dataclass
class Statistics:
    inputs: list[InputStats]
    meta: dict = field(default_factory=dict)  # which observation (stage index, prefix active), token counts

    def by_fqn(self) -> dict[str, InputStats]:
        return {f: st for st in self.inputs for f in st.fqns}

    # a mapping FQN -> InputStats, read-only
    def __getitem__(self, fqn: str) -> InputStats:
        return self.by_fqn()[fqn]

    def __contains__(self, fqn: str) -> bool:
        return fqn in self.by_fqn()

    def items(self):
        return self.by_fqn().items()

    def keys(self):
        return self.by_fqn().keys()

    def values(self):
        return self.by_fqn().values()

    def scores(self) -> dict[str, float]:
        return {f: st.score for f, st in self.by_fqn().items()}

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rows, tensors = [], {}
        for i, st in enumerate(self.inputs):
            rows.append({"fqns": st.fqns, "in_features": st.in_features, "seq_max": st.seq_max,
                         "seq_median": st.seq_median, "absmax": st.absmax, "n_tokens": st.n_tokens,
                         "top": [list(t) for t in st.top], "seq_top": [[list(t) for t in s] for s in st.seq_top],
                         "seq_outliers": [[list(t) for t in s] for s in st.seq_outliers], "score": st.score,
                         "trace": st.trace, "trace_tokens": st.trace_tokens})
            if st.channel_absmax is not None:
                tensors[f"channel_absmax.{i}"] = st.channel_absmax.float().contiguous()
        (directory / JSON_FILE).write_text(json.dumps({"version": STATS_VERSION, "meta": self.meta, "inputs": rows}))
        if tensors:
            save_file(tensors, str(directory / TENSOR_FILE))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "Statistics":
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / JSON_FILE).exists():
            raise FileNotFoundError(f"glufx: {directory} holds no calibration statistics ({JSON_FILE}); "
                                    "glufx.save writes them for models calibrated by this glufx")
        d = json.loads((directory / JSON_FILE).read_text())
        if d.get("version") != STATS_VERSION:
            raise ValueError(f"glufx statistics version {d.get('version')} is not supported (reads {STATS_VERSION})")
        tensors = load_file(str(directory / TENSOR_FILE)) if (directory / TENSOR_FILE).exists() else {}
        inputs = []
        for i, r in enumerate(d["inputs"]):
            inputs.append(InputStats(
                fqns=r["fqns"], in_features=r["in_features"], seq_max=r["seq_max"], seq_median=r["seq_median"],
                absmax=r["absmax"], channel_absmax=tensors.get(f"channel_absmax.{i}"),
                top=[tuple(t) for t in r["top"]], seq_top=[[tuple(t) for t in s] for s in r["seq_top"]],
                seq_outliers=[[tuple(t) for t in s] for s in r["seq_outliers"]], n_tokens=r["n_tokens"],
                trace=r.get("trace", []), trace_tokens=r.get("trace_tokens", [])))
        return cls(inputs, d.get("meta", {}))


def from_observer(observer, meta: Optional[dict] = None) -> Statistics:
    return Statistics(list(observer.stats.values()), dict(meta or {}))
