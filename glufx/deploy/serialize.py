"""Save and load a glufx-quantized HF causal LM without recalibration.

A directory holding the HF `config.json`, `model.safetensors` (canonical INT8 weights `[N, K]` and
scales, the FP weights of kept modules: no kernel layout, so it loads under every kernel), the plan
(`glufx_plan.json` and its tensor sidecar), the calibration statistics (`glufx_stats.*`, and every
observation of the recipe under `observations/<i>/`: the first is the plain FP model's, for reports
without recalibrating), and `prefix.safetensors` when QFeP is on. config.json names glufx as its quant_method, so that after `import glufx`
transformers' `AutoModelForCausalLM.from_pretrained(dir)` loads it too (glufx/deploy/hf_quantizer.py).
`save_pretrained(..., format="compressed-tensors")` writes the engine format instead
(glufx/deploy/compressed_tensors.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..lower import lower
from ..plan import Plan
from ..prefix import PrefixedLM, PrefixKV
from ..stats import JSON_FILE as STATS_FILE
from ..stats import Statistics
from .hf_quantizer import add_quantization_config

PLAN_FILE, WEIGHTS_FILE, PREFIX_FILE = "glufx_plan.json", "model.safetensors", "prefix.safetensors"
OBSERVATIONS_DIR = "observations"


def save(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    from safetensors.torch import save_model

    plan = getattr(model, "glufx_plan", None)
    if plan is None:
        raise ValueError("glufx.save: the model carries no glufx plan; save what glufx.compile returned")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    inner = model.model if isinstance(model, PrefixedLM) else model
    inner.config.save_pretrained(path)
    add_quantization_config(path / "config.json")
    save_model(inner, str(path / WEIGHTS_FILE))  # de-duplicates tied weights (Gemma's lm_head)
    plan.save(path / PLAN_FILE)
    if plan.stats is not None:
        plan.stats.save(path)
    for i, observation in enumerate(getattr(plan, "observations", None) or []):  # every re-observation, for reports
        observation.save(path / OBSERVATIONS_DIR / str(i))
    if isinstance(model, PrefixedLM):
        model.prefix().save(path / PREFIX_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / PLAN_FILE).exists():
        raise FileNotFoundError(f"glufx.load: {path} has no {PLAN_FILE}; it was not written by glufx.save")
    plan = Plan.load(path / PLAN_FILE)
    config = AutoConfig.from_pretrained(path)
    config.quantization_config = None  # glufx builds the quantized modules itself (from_config would not)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    model.eval()
    lower(model, plan, skeleton=True)  # the quantized modules, empty; the file holds their state
    load_model(model, str(path / WEIGHTS_FILE), strict=True)
    attach_saved_statistics(plan, path)
    if (path / PREFIX_FILE).exists():
        model = PrefixedLM(model, PrefixKV.load(path / PREFIX_FILE))
    model.glufx_plan = plan
    return model


def attach_saved_statistics(plan: Plan, path: str | Path) -> None:
    """The calibration statistics and observations saved beside a plan, for reports without recalibrating."""
    path = Path(path)
    if (path / STATS_FILE).exists():
        plan.stats = Statistics.load(path)
    if (path / OBSERVATIONS_DIR).exists():
        plan.observations = load_observations(path)


def save_pretrained(model: nn.Module, path: str | Path, tokenizer=None, *, format: str = "glufx",
                    drop_prefix: bool = False) -> Path:
    """Save a glufx model as `format`: "glufx" (glufx.save: glufx.load and transformers' from_pretrained read it,
    every plan exact) or "compressed-tensors" (what vLLM and transformers' compressed-tensors loader read; a plan
    the format cannot carry is refused, naming the nearest choice it can; `drop_prefix` exports a QFeP model
    without its prefix)."""
    from .compressed_tensors import FORMAT, export_compressed_tensors

    if format == "glufx":
        if drop_prefix:
            raise ValueError("glufx.save_pretrained: drop_prefix applies to format='compressed-tensors'; the glufx "
                             "format keeps the prefix")
        return save(model, path, tokenizer)
    if format == FORMAT:
        return export_compressed_tensors(model, path, tokenizer, drop_prefix=drop_prefix)
    raise ValueError(f"glufx.save_pretrained: unknown format {format!r}; choose 'glufx' or {FORMAT!r}")


def load_observations(path: str | Path) -> list[Statistics]:
    """Every observation glufx.save wrote under `observations/<i>/`, in recipe order ([] when none)."""
    d = Path(path) / OBSERVATIONS_DIR
    return [Statistics.load(p) for p in sorted(d.iterdir(), key=lambda p: int(p.name))] if d.exists() else []
