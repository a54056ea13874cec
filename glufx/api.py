"""Public entry points: glufx.calibrate (capture -> match -> observe -> decide) and glufx.compile (+ rewrite)."""
from __future__ import annotations

import time
from typing import Any, Optional

import torch
from torch import nn

from .capture import capture
from .config import GlufxConfig
from .data import CalibrationSet, is_causal_lm, prepare
from .decide.qfem import decide, targets
from .decide.qfep import search_paper, search_prefixquant
from .match import MatchResult, match_graph
from .nn import SUPPORTED_DEVICES
from .observe import InputStats, Observer, instrument, run_calibration
from .plan import Plan
from .prefix import PrefixedLM, compute_prefix_kv
from .rewrite import apply_plan


class NoGLUError(ValueError):
    pass


def check_model(model: nn.Module) -> None:
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


def check_glu(model: nn.Module, match: MatchResult, config: GlufxConfig) -> None:
    if match.glu_blocks or not config.require_glu:
        return
    raise NoGLUError(
        f"glufx: no GLU block found in {type(model).__name__} (looked for two projections of one input, "
        "SiLU/GELU on one, their product feeding a third projection). QFeM and QFeP target GLU models "
        "(Llama, Mistral, Qwen, Gemma, Phi-3, Mixtral). To W8A8-quantize this model's linears anyway, pass "
        "GlufxConfig(require_glu=False).")


def _observe(runner: nn.Module, calib: CalibrationSet, config: GlufxConfig, root: str = "") -> tuple[MatchResult, Observer]:
    """capture -> match -> instrument -> run: statistics of every projection input of `runner`."""
    first = calib.batches[0]
    # Calibration never reads the logits: an LM computes the head for one position only, unless
    # the head itself is a quantization target and needs its input statistics.
    extra = {"logits_to_keep": 1} if is_causal_lm(runner) and not config.quantize_lm_head else {}
    ep = capture(runner, (first.args, {**first.kwargs, **extra}))
    gm = ep.module()
    match = match_graph(gm.graph, strip_root=root)
    observer = Observer(match)
    instrument(gm, match, observer)
    run_calibration(gm, observer, calib, extra, progress=config.progress)
    return match, observer


def calibrate(model: nn.Module, calib_data: Any, config: Optional[GlufxConfig] = None, *, tokenizer=None,
              return_stats: bool = False):
    """Capture, match, calibrate and decide: returns the Plan (and per-input statistics if asked).

    With QFeP on, a first pass finds the prefix, and a second pass (prefix cached, its positions
    excluded) produces the statistics that QFeM and static scales use. The model is not modified.
    """
    config = config or GlufxConfig()
    check_model(model)
    was_training = model.training
    model.eval()
    timings = {}
    t0 = time.perf_counter()
    calib = prepare(model, calib_data, tokenizer, seq_len=config.seq_len, num_samples=config.num_samples,
                    batch_size=config.batch_size, heldout_samples=config.heldout_samples if config.qfem == "auto" else 0)
    match, observer = _observe(model, calib, config)
    check_glu(model, match, config)
    timings["calibrate_s"] = time.perf_counter() - t0

    runner, qfep = model, None
    if config.qfep != "off":
        t0 = time.perf_counter()
        qfep = _search_prefix(model, match, observer, calib, config)
        runner = PrefixedLM(model, compute_prefix_kv(model, qfep["token_ids"]), drop_bos=False)
        calib = calib.without_bos()  # the prefix holds BOS: the user's tokens follow it
        match, observer = _observe(runner, calib, config, root="model.")
        timings["qfep_s"] = time.perf_counter() - t0

    stats = observer.by_fqn()
    x_scales = {f: st.absmax / 127.0 for f, st in stats.items() if st.absmax > 0}
    t0 = time.perf_counter()
    plan = decide(model, match, observer, calib.heldout, config, x_scales, runner=runner)
    timings["decide_s"] = time.perf_counter() - t0
    plan.qfep = qfep
    plan.calibration = {
        "sequences": calib.n_sequences, "tokens": calib.n_tokens, "heldout_sequences": len(calib.heldout),
        "bos_token_id": calib.bos_token_id, "qfep_active": qfep is not None, "match": match.counts(),
        "timings": timings, "inputs": [_summary(st) for st in observer.stats.values()],
    }
    model.train(was_training)
    return (plan, stats) if return_stats else plan


def _search_prefix(model, match: MatchResult, observer: Observer, calib: CalibrationSet, config: GlufxConfig) -> dict:
    if not is_causal_lm(model):
        raise ValueError("glufx: QFeP needs a causal language model (a KV cache to hold the prefix); "
                         "use GlufxConfig(qfep='off') for other modules")
    by_fqn = observer.by_fqn()
    scored = [f for f in targets(match, config) if f in by_fqn]
    target = max(scored, key=lambda f: by_fqn[f].score)
    bos = calib.bos_token_id
    if config.qfep == "paper":
        return search_paper(model, target, by_fqn[target], calib, bos)
    downs = [by_fqn[f] for f in scored if match.projections[f].role == "down"] or [by_fqn[target]]
    return search_prefixquant(target, downs, bos)


def _summary(st: InputStats) -> dict:
    return {"fqns": st.fqns, "score": st.score, "absmax": st.absmax, "n_tokens": st.n_tokens,
            "top": st.top_tokens()[:5]}


def prefixed(model: nn.Module, plan: Plan) -> nn.Module:
    """The floating-point `model` with the plan's QFeP prefix in front (a PrefixedLM), unquantized:
    what `torch.compile(..., backend="glufx", options={"plan": plan})` compiles for a QFeP plan."""
    if not plan.qfep:
        return model
    check_model(model)
    return PrefixedLM(model, compute_prefix_kv(model, plan.qfep["token_ids"]))


def compile(model: nn.Module, calib_data: Any = None, config: Optional[GlufxConfig] = None, *, tokenizer=None,
            plan: Optional[Plan] = None) -> nn.Module:
    """Calibrate (unless a plan is given) and rewrite `model` in place; returns it (wrapped in a PrefixedLM
    when the plan has a QFeP prefix), the plan at `.glufx_plan`."""
    if plan is None:
        plan = calibrate(model, calib_data, config, tokenizer=tokenizer)
    else:
        check_model(model)
    # The prefix KV must come from the floating-point model: compute it before the rewrite.
    prefix = compute_prefix_kv(model, plan.qfep["token_ids"]) if plan.qfep else None
    apply_plan(model, plan)
    if prefix is not None:
        model = PrefixedLM(model, prefix)
    model.glufx_plan = plan
    return model
