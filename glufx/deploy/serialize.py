"""Save and load a glufx-quantized HF causal LM without recalibration.

A directory holding the HF `config.json`, `model.safetensors` (INT8 weights and scales, original
FP weights of kept modules), `glufx_plan.json`, and `prefix.safetensors` when QFeP is on.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..nn import Int8Linear
from ..plan import Plan
from ..prefix import PrefixedLM, PrefixKV
from ..rewrite import fuse_glu_blocks

PLAN_FILE, WEIGHTS_FILE, PREFIX_FILE = "glufx_plan.json", "model.safetensors", "prefix.safetensors"


def save(model: nn.Module, path: str | Path, tokenizer=None) -> Path:
    from safetensors.torch import save_model

    plan = getattr(model, "glufx_plan", None)
    if plan is None:
        raise ValueError("glufx.save: the model carries no glufx plan; save what glufx.compile returned")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    inner = model.model if isinstance(model, PrefixedLM) else model
    inner.config.save_pretrained(path)
    save_model(inner, str(path / WEIGHTS_FILE))  # de-duplicates tied weights (Gemma's lm_head)
    plan.save(path / PLAN_FILE)
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
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32)
    model.eval()
    for fqn, mp in plan.modules.items():
        if mp.action == "int8":
            old = model.get_submodule(fqn)
            model.set_submodule(fqn, Int8Linear(mp.in_features, mp.out_features, old.bias is not None, mp.granularity,
                                                old.weight.dtype))
    if plan.config.get("fuse_glu"):
        fuse_glu_blocks(model, plan)  # the Int8GLU skeletons whose buffers the file holds
    load_model(model, str(path / WEIGHTS_FILE), strict=True)
    if (path / PREFIX_FILE).exists():
        model = PrefixedLM(model, PrefixKV.load(path / PREFIX_FILE))
    model.glufx_plan = plan
    return model
