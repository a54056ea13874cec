"""decide/target: a granularity plan to a quality budget. The budget holds when the lowered model is
measured independently, a looser budget buys more static parameters, and every module says why."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import glufx
from glufx import DecideGranularity, DecideScales, DecideTarget, Observe, Recipe, Rotate

from conftest import CFG, tiny_model

TARGET_CFG = {**CFG, "qfep": "off"}


def _heldout_ppl_increase(fp, q, ids) -> float:
    """exp(mean NLL_q - mean NLL_fp) - 1 over every next-token position of `ids`, computed here."""
    def nll(m):
        with torch.no_grad():
            logits = m(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none").double()
    return math.expm1(float((nll(q) - nll(fp)).mean()))


def test_target_options_are_validated():
    with pytest.raises(ValueError, match="positive number"):
        glufx.GlufxConfig(target=-0.01)
    with pytest.raises(ValueError, match="drop it"):
        glufx.GlufxConfig(target=0.01, granularity="per_token")
    with pytest.raises(ValueError, match="drop qfem"):
        glufx.GlufxConfig(target=0.01, qfem="alpha", alpha=3.0)
    with pytest.raises(ValueError, match="choose one of"):
        glufx.GlufxConfig(target=0.01, target_metric="bleu")
    with pytest.raises(ValueError, match="positive number"):
        DecideTarget(budget=0.0)
    with pytest.raises(ValueError, match="drop \\['rotation'\\]"):
        Recipe([Observe(), DecideGranularity("static"), Rotate(), DecideScales(), DecideTarget()])
    with pytest.raises(ValueError, match="needs DecideScales"):
        Recipe([Observe(), DecideGranularity("static"), DecideTarget()])
    cfg = glufx.GlufxConfig(target=0.02)
    assert cfg.granularity == "static"  # the cheapest rung
    assert [s["stage"] for s in cfg.recipe().to_dict()][-1] == "DecideTarget"


def test_budget_holds_on_the_lowered_model(calib_ids):
    model = tiny_model("llama")
    budget = 0.002
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**TARGET_CFG, target=budget))
    summary = plan.search["target"]
    assert summary["within_budget"] and summary["final_metric"] <= budget
    # measured again, outside the stage, on the held-out sequences (the last heldout_samples of the data)
    q = glufx.compile(copy.deepcopy(model), plan=plan)
    again = _heldout_ppl_increase(glufx.prefixed(copy.deepcopy(model), plan), q, calib_ids[-CFG["heldout_samples"]:])
    assert again == pytest.approx(summary["final_metric"], abs=1e-6)
    int8 = [m for m in plan.modules.values() if m.action == "int8"]
    assert int8 and all(m.decisions["target"]["rung"] == m.granularity for m in int8)
    assert all((m.rotation is not None) == (m.granularity == "per_token") for m in int8)
    assert all((m.x_scale is not None) == (m.granularity == "static") for m in int8)
    groups = {m.group for m in int8}
    assert all(plan.modules[f].decisions["target"]["static_sensitivity"] is not None for f in plan.quantized())
    assert summary["curve"][0]["static_groups"] == 0 and len(groups) >= 2


def test_looser_budget_buys_more_static(calib_ids):
    model = tiny_model("llama")
    shares = {}
    for budget in (1e-4, 10.0):
        with pytest.warns(UserWarning, match="not reachable") if budget < 1e-3 else _no_warning():
            plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**TARGET_CFG, target=budget))
        shares[budget] = plan.search["target"]["static_share"]
        if budget == 10.0:  # nothing misses a budget of +1000 %: every group static, nothing kept in FP
            assert plan.search["target"]["fp_share"] == 0.0
            assert {m.granularity for m in plan.modules.values() if m.action == "int8"} == {"static"}
        else:  # per-token misses +0.01 % here: the FP rung is used up to max_fp_param_share
            assert plan.search["target"]["fp_share"] > 0 and plan.kept_fp()
            assert all(plan.modules[f].decisions["target"]["rung"] == "fp" for f in plan.kept_fp())
    assert shares[10.0] == pytest.approx(1.0) and shares[1e-4] == 0.0


class _no_warning:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
