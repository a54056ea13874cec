"""Public entry points: glufx.calibrate (run the recipe: observe -> transform -> decide -> Plan) and
glufx.compile (calibrate, then lower the plan into the model)."""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch import nn

from .calibdata import is_causal_lm, prepare
from .config import GlufxConfig
from .lower import check_plan, lower
from .nn import SUPPORTED_DEVICES
from .plan import Plan
from .prefix import PrefixedLM, compute_prefix_kv
from .recipe import Context, DecideQFeM, DecideTarget, NoGLUError, Recipe
from .transforms import WeightBackup, apply_transforms

__all__ = ["calibrate", "compile", "prefixed", "check_model", "NoGLUError"]


def check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"glufx: expected a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise ValueError("glufx: the model has no parameters to quantize")
    devices = {p.device.type for p in params}
    if devices - set(SUPPORTED_DEVICES):
        raise NotImplementedError(
            f"glufx: model parameters on {sorted(devices)}, but this build has INT8 kernels for "
            f"{list(SUPPORTED_DEVICES)} only; call model.to('cpu') first")
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    bad = dtypes - {torch.float32, torch.bfloat16, torch.float16}
    if bad:
        raise TypeError(f"glufx: parameters of dtype {sorted(map(str, bad))} have no INT8 path; "
                        "use model.float() or model.to(torch.bfloat16)")


def calibrate(model: nn.Module, calib_data: Any, config: Optional[GlufxConfig] = None, *, tokenizer=None,
              recipe: Optional[Recipe] = None, return_stats: bool = False):
    """Run the recipe (by default `config.recipe()`) on `model` and return the Plan (and the final
    calibration statistics if asked; they are also at `plan.stats`, every observation at
    `plan.observations`). The model is left as it was: transforms are recorded in the plan and
    applied by `glufx.compile` / `glufx.lower`."""
    config = config or GlufxConfig()
    if not isinstance(config, GlufxConfig):
        raise TypeError(f"glufx: config must be a glufx.GlufxConfig, got {type(config).__name__}")
    recipe = recipe or config.recipe(causal_lm=is_causal_lm(model))
    check_model(model)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    backup = WeightBackup(model)
    try:
        needs_heldout = any((isinstance(s, DecideQFeM) and s.mode == "auto") or isinstance(s, DecideTarget)
                            for s in recipe.stages)
        calib = prepare(model, calib_data, tokenizer, seq_len=config.seq_len, num_samples=config.num_samples,
                        batch_size=config.batch_size, heldout_samples=config.heldout_samples if needs_heldout else 0)
        ctx = Context(model=model, calib=calib, plan=Plan(modules={}), quantize_lm_head=config.quantize_lm_head,
                      require_glu=config.require_glu, progress=config.progress, backup=backup)
        plan = recipe.run(ctx)
    finally:
        backup.restore()  # the user's FP weights, exactly; the plan replays the transforms
        model.train(was_training)
    plan.config = {**config.to_dict(), "recipe": recipe.to_dict()}
    plan.stats, plan.observations = ctx.stats, ctx.observations
    plan.calibration = {
        **plan.calibration,  # what stages recorded (a declined QFeP prefix)
        "sequences": ctx.calib.n_sequences, "tokens": ctx.calib.n_tokens, "heldout_sequences": len(ctx.calib.heldout),
        "bos_token_id": ctx.calib.bos_token_id, "qfep_active": plan.qfep is not None, "match": ctx.match.counts(),
        "observations": len(ctx.observations), "seconds": time.perf_counter() - t0,
    }
    return (plan, ctx.stats) if return_stats else plan


def prefixed(model: nn.Module, plan: Plan) -> nn.Module:
    """The floating-point `model` as the plan sees it, unquantized: its equivalence transforms applied
    (in place; FP outputs unchanged) and its QFeP prefix in front (a PrefixedLM). What
    `torch.compile(..., backend="glufx", options={"plan": plan})` compiles for such a plan."""
    check_model(model)
    check_plan(model, plan)
    apply_transforms(model, plan)
    if not plan.qfep:
        return model
    return PrefixedLM(model, compute_prefix_kv(model, plan.qfep["token_ids"]))


def compile(model: nn.Module, calib_data: Any = None, config: Optional[GlufxConfig] = None, *, tokenizer=None,
            plan: Optional[Plan] = None, recipe: Optional[Recipe] = None) -> nn.Module:
    """Calibrate (unless a plan is given) and lower the plan into `model` in place; returns it (wrapped
    in a PrefixedLM when the plan has a QFeP prefix), the plan at `.glufx_plan`."""
    if plan is None:
        if calib_data is None:
            raise ValueError("glufx.compile: calibration data is None: pass calibration data (token ids, strings with tokenizer=, a .txt / "
                             ".jsonl path) or a plan: glufx.compile(model, plan=glufx.Plan.load(path))")
        plan = calibrate(model, calib_data, config, tokenizer=tokenizer, recipe=recipe)
    else:
        given = [n for n, v in (("calib_data", calib_data), ("config", config), ("recipe", recipe)) if v is not None]
        if given:
            raise ValueError(f"glufx.compile: a plan is given, so {', '.join(given)} would be ignored: the plan "
                             "already holds every decision. Pass either a plan or calibration inputs")
        if not isinstance(plan, Plan):
            raise TypeError(f"glufx.compile: plan must be a glufx.Plan (glufx.Plan.load(path)), got {type(plan).__name__}")
        check_model(model)
    check_plan(model, plan)
    # The prefix KV comes from the floating-point model as calibration saw it (transformed, FP):
    # compute it after the transforms, before lowering (glufx.prefixed does the same).
    apply_transforms(model, plan)
    prefix = compute_prefix_kv(model, plan.qfep["token_ids"]) if plan.qfep else None
    lower(model, plan)
    if prefix is not None:
        model = PrefixedLM(model, prefix)
    model.glufx_plan = plan
    return model
