"""The plan: what glufx quantizes and why, as plain data keyed by module FQN (JSON round-trippable).

Every front end (eager module swap, the torch.compile backend, export) applies the same plan.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

PLAN_VERSION = 1


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


@dataclass
class Plan:
    modules: dict[str, ModulePlan]
    glu_blocks: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)  # QFeM decision trace: mode, candidates, metric per step
    calibration: dict = field(default_factory=dict)  # sequences, tokens, qfep_active
    qfep: Optional[dict] = None  # the QFeP prefix: token ids, method, score, candidates (KV recomputed from FP)
    version: int = PLAN_VERSION

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
        gran = self.config.get("granularity", "per_sequence")
        for m in d["modules"].values():
            if m["action"] == "fp" and m["reason"].startswith("QFeM"):
                m.update(action="int8", granularity=gran, reason="W8A8 (QFeM off)")
        d["search"] = {"mode": "off"}
        return Plan.from_dict(d)

    def to_torchao(self):
        """This plan as a torchao FqnToConfig (kept modules -> None); see glufx/deploy/torchao_interop.py."""
        from .deploy.torchao_interop import to_fqn_to_config

        return to_fqn_to_config(self)

    # ---- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": self.version, "config": self.config, "calibration": self.calibration,
                "search": self.search, "glu_blocks": self.glu_blocks, "qfep": self.qfep,
                "modules": {f: asdict(m) for f, m in self.modules.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"glufx plan version {d.get('version')} is not supported (this glufx reads {PLAN_VERSION})")
        return cls(modules={f: ModulePlan(**m) for f, m in d["modules"].items()}, glu_blocks=d.get("glu_blocks", []),
                   config=d.get("config", {}), search=d.get("search", {}), calibration=d.get("calibration", {}),
                   qfep=d.get("qfep"))

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, s: str) -> "Plan":
        return cls.from_dict(json.loads(s))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_json(Path(path).read_text())

    # ---- report ------------------------------------------------------------------------------
    def table(self, top: Optional[int] = 12, only_fp: bool = False) -> str:
        rows = [m for m in self.ranked() if not only_fp or m.action == "fp"]
        rows = rows[:top] if top else rows
        w = max([len(m.fqn) for m in rows] + [6])
        out = [f"{'module':<{w}}  {'role':<7} {'score':>8}  {'action':<5} {'act':<12} reason"]
        for m in rows:
            out.append(f"{m.fqn:<{w}}  {m.role:<7} {m.score:8.2f}  {m.action:<5} {m.granularity or '-':<12} {m.reason}")
        if self.qfep:
            out.append(f"QFeP prefix ({self.qfep['method']}): token ids {self.qfep['token_ids']}")
        out.append(f"decoder-linear parameters in INT8: {100 * self.int8_param_share():.1f} %  "
                   f"({len(self.quantized())} INT8 modules, {len(self.kept_fp())} decoder modules kept in FP)")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def _decoder(m: ModulePlan) -> bool:
    return m.kind == "linear" and m.role not in ("head", "router")
