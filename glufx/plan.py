"""The plan: what glufx quantizes and why, as plain data keyed by module FQN.

A JSON file you can read, plus a tensor sidecar (safetensors beside it) for vectors: the scales of
equivalence transforms. Each recipe stage records what it decided per module as structured fields
(`ModulePlan.decisions[stage]`) with the measurement behind it, and a summary in `Plan.stages`.
Every front end applies a plan through one function, `glufx.lower.lower`. The plan imports no
deploy adapter (the torchao mapping lives in glufx/deploy/torchao_interop.py and imports the plan).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

PLAN_VERSION = 2  # 2: canonical INT8 state (no packed layout), stage decisions, transforms + tensor sidecar


@dataclass
class ModulePlan:
    fqn: str
    action: str  # "int8" (W8A8) | "fp" (original floating-point weights and activations)
    role: str  # gate | up | gate_up | down | router | head | experts | other
    granularity: Optional[str]  # activation granularity when int8
    score: float  # QFeM spike ratio of the module's input (shared by its sibling group)
    reason: str
    group: int
    in_features: int
    out_features: int
    n_params: int
    x_scale: Optional[float] = None  # static per-tensor activation scale (absmax / 127)
    kind: str = "linear"
    # online input rotation: {"kind": "hadamard", "block": b, "signs": sidecar key} (glufx/rotate.py)
    rotation: Optional[dict] = None
    # weight rounding other than round-to-nearest: {"method": "gptq", "codes": sidecar key of the INT8 codes
    # [N, K] of the (rotated) weight} (glufx/decide/weights.py); None = round to nearest
    weights: Optional[dict] = None
    # stage name -> what it decided for this module and the measurement behind it, e.g.
    # {"qfem": {"kept_fp": True, "score": 11.1, "mode": "auto", "step": 1}, "scales": {"absmax": 2.3}}
    decisions: dict = field(default_factory=dict)

    @property
    def kept_by_qfem(self) -> bool:
        return bool(self.decisions.get("qfem", {}).get("kept_fp"))


@dataclass
class Plan:
    modules: dict[str, ModulePlan]
    glu_blocks: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)  # QFeM decision trace: mode, candidates, metric per step
    calibration: dict = field(default_factory=dict)  # sequences, tokens, qfep_active
    qfep: Optional[dict] = None  # the QFeP prefix: token ids, method, score, candidates (KV recomputed from FP)
    stages: list[dict] = field(default_factory=list)  # per recipe stage: its config, seconds, summary
    transforms: list[dict] = field(default_factory=list)  # FP-equivalent edits, replayed by lower()
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # sidecar: vectors the JSON refers to
    version: int = PLAN_VERSION
    stats: Optional[object] = field(default=None, repr=False, compare=False)  # glufx.stats.Statistics, saved apart

    # ---- queries -------------------------------------------------------------------------
    def quantized(self) -> list[str]:
        return [f for f, m in self.modules.items() if m.action == "int8"]

    def kept_fp(self, decoder_only: bool = True) -> list[str]:
        return [f for f, m in self.modules.items() if m.action == "fp" and (not decoder_only or _decoder(m))]

    def ranked(self) -> list[ModulePlan]:
        return sorted((m for m in self.modules.values() if m.kind == "linear"), key=lambda m: -m.score)

    def int8_param_share(self) -> float:
        """Share of decoder-linear parameters (no head, router or expert bank) held in INT8."""
        dec = [m for m in self.modules.values() if _decoder(m)]
        total = sum(m.n_params for m in dec)
        return sum(m.n_params for m in dec if m.action == "int8") / total if total else 0.0

    def without_qfem(self) -> "Plan":
        """The same plan with every QFeM exclusion quantized: naive W8A8, for ablations."""
        d = self.to_dict()
        for f, m in d["modules"].items():
            if self.modules[f].kept_by_qfem:
                gran = m["decisions"]["qfem"].get("granularity") or self.config.get("granularity", "per_sequence")
                q = m["decisions"]["qfem"]
                m.update(action="int8", granularity=gran, reason="W8A8 (QFeM off)", rotation=q.get("rotation"),
                         x_scale=q.get("x_scale", m["x_scale"]))
                m["decisions"]["qfem"] = {**m["decisions"]["qfem"], "kept_fp": False, "ablated": True}
        d["search"] = {"mode": "off"}
        return Plan.from_dict(d, tensors=self.tensors)

    # ---- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Everything but the tensors (the sidecar) and the statistics (saved apart)."""
        return {"version": self.version, "config": self.config, "calibration": self.calibration,
                "search": self.search, "stages": self.stages, "transforms": self.transforms,
                "tensors": sorted(self.tensors), "glu_blocks": self.glu_blocks, "qfep": self.qfep,
                "modules": {f: asdict(m) for f, m in self.modules.items()}}

    @classmethod
    def from_dict(cls, d: dict, tensors: Optional[dict] = None) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            older = isinstance(d.get("version"), int) and d["version"] < PLAN_VERSION
            raise ValueError(
                f"glufx plan version {d.get('version')} is not supported (this glufx reads {PLAN_VERSION})"
                + ("; it was written by an older glufx whose saved models hold the CPU kernel's packed layout: "
                   "recalibrate with this glufx (glufx.calibrate / glufx.compile) and save again" if older else ""))
        tensors = dict(tensors or {})
        missing = [k for k in d.get("tensors", []) if k not in tensors]
        if missing:
            raise ValueError(f"glufx plan: tensors {missing[:3]} are missing: load the plan with its sidecar "
                             "(Plan.load(path) reads path's .safetensors beside it)")
        return cls(modules={f: ModulePlan(**m) for f, m in d["modules"].items()}, glu_blocks=d.get("glu_blocks", []),
                   config=d.get("config", {}), search=d.get("search", {}), calibration=d.get("calibration", {}),
                   qfep=d.get("qfep"), stages=d.get("stages", []), transforms=d.get("transforms", []),
                   tensors=tensors)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, s: str, tensors: Optional[dict] = None) -> "Plan":
        return cls.from_dict(json.loads(s), tensors)

    @staticmethod
    def sidecar(path: str | Path) -> Path:
        return Path(path).with_suffix(".safetensors")

    def save(self, path: str | Path) -> None:
        """`path` (JSON) and, when the plan holds tensors, `path` with suffix .safetensors beside it."""
        from safetensors.torch import save_file

        Path(path).write_text(self.to_json(indent=1))
        if self.tensors:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(self.sidecar(path)))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        from safetensors.torch import load_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"glufx: plan file {path} does not exist")
        side = cls.sidecar(path)
        return cls.from_json(path.read_text(), load_file(str(side)) if side.exists() else None)

    # ---- report ------------------------------------------------------------------------------
    def table(self, top: Optional[int] = 12, only_fp: bool = False) -> str:
        rows = [m for m in self.ranked() if not only_fp or m.action == "fp"]
        rows = rows[:top] if top else rows
        w = max([len(m.fqn) for m in rows] + [6])
        out = [f"{'module':<{w}}  {'role':<7} {'score':>8}  {'action':<5} {'act':<12} reason"]
        for m in rows:
            out.append(f"{m.fqn:<{w}}  {m.role:<7} {m.score:8.2f}  {m.action:<5} {m.granularity or '-':<12} {m.reason}")
        if self.transforms:
            out.append(f"equivalence transforms: {len(self.transforms)} ({', '.join(sorted({t['kind'] for t in self.transforms}))})")
        if self.qfep:
            out.append(f"QFeP prefix ({self.qfep['method']}): token ids {self.qfep['token_ids']}")
        out.append(f"decoder-linear parameters in INT8: {100 * self.int8_param_share():.1f} %  "
                   f"({len(self.quantized())} INT8 modules, {len(self.kept_fp())} decoder modules kept in FP)")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _decoder(m: ModulePlan) -> bool:
    return m.kind == "linear" and m.role not in ("head", "router")
