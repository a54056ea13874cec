"""decide/qfem: the auto search walked by measured sensitivity instead of spike score."""
import pytest

import glufx

from conftest import CFG, tiny_model


def test_sensitivity_order_walks_measured_gains(calib_ids):
    model = tiny_model("llama")
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG, granularity="static", qfem_order="sensitivity"))
    search = plan.search
    assert search["order"] == "sensitivity"
    groups = {m.group for m in plan.modules.values() if m.role != "head"}
    assert len(search["gain"]) == len(groups)  # one measurement per sibling group
    per_param = [search["gain"][g[0]] / sum(plan.modules[f].n_params for f in g) for g in search["candidates"]]
    assert per_param == sorted(per_param, reverse=True) and all(v > 0 for v in per_param)
    # gains are measured on the final hidden states (no head GEMM); the walk then measures held-out KL
    # and its choice is no worse than quantizing everything
    assert search["sensitivity_metric"] == "HiddenStateError" and search["all_int8_proxy"] > 0
    assert search["metrics"][search["chosen_steps"]] <= search["metrics"][0]
    kept = {f for f in plan.kept_fp()}
    walked = {f for g in search["candidates"][: search["chosen_steps"]] for f in g}
    assert kept == walked


def test_sensitivity_order_needs_auto():
    with pytest.raises(ValueError, match="qfem='auto'"):
        glufx.GlufxConfig(qfem="budget", qfem_order="sensitivity")
    with pytest.raises(ValueError, match="choose one of"):
        glufx.GlufxConfig(qfem_order="random")
