"""Weight rounding (glufx/decide/weights.py): GPTQ's codes are round-to-nearest where the inputs are
uncorrelated, lower the output error where they are not, are kept only where held-out tokens say they help,
and are plan data: a replayed or reloaded plan lowers to the same integers."""
import pytest
import torch

import glufx
from glufx.decide.weights import _output_error, codes_key, gptq_codes
from glufx.nn import Int8Linear
from glufx.ops import reference as R

from conftest import CFG, sqnr, tiny_model


def _rtn(w):
    _, s = torch.ops.glufx.quantize_weight(w)
    return R._quantize(w, s[:, None]), s


def test_gptq_is_round_to_nearest_under_uncorrelated_inputs():
    torch.manual_seed(0)
    w = torch.randn(48, 160)
    rtn, s = _rtn(w)
    # a diagonal H: no column's error can be moved onto another
    assert torch.equal(gptq_codes(w, torch.diag(torch.rand(160) + 0.1), s, block_size=32), rtn)


def test_gptq_lowers_held_out_output_error_on_correlated_inputs():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = torch.randn(4096, 256) @ torch.randn(256, 256) * 0.3 + torch.randn(4096, 256)
    x[:, 3] = 0  # an input channel calibration never feeds: no NaN, its weights rounded to nearest
    rtn, s = _rtn(w)
    fit, judge = x[0::2], x[1::2]
    codes = gptq_codes(w, fit.T @ fit, s, block_size=64)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert torch.equal(codes[:, 3], rtn[:, 3])
    assert _output_error(judge, w, codes, s) < 0.75 * _output_error(judge, w, rtn, s)


@pytest.mark.parametrize("granularity", ["per_token", "static"])
def test_gptq_stage_writes_codes_the_lowering_uses(calib_ids, tmp_path, granularity):
    cfg = dict(CFG, granularity=granularity, qfep="off")
    fp = tiny_model("llama")
    model = glufx.compile(tiny_model("llama"), calib_ids, glufx.GlufxConfig(**cfg, weights="gptq"))
    rtn_model = glufx.compile(tiny_model("llama"), calib_ids, glufx.GlufxConfig(**cfg))
    plan = model.glufx_plan
    stage = next(s for s in plan.stages if s["stage"] == "RoundWeights")
    assert stage["summary"]["linears"] == len([m for m in plan.modules.values()
                                               if m.decisions.get("weights")]) > 0
    kept = [f for f, m in plan.modules.items() if m.weights]
    assert kept and stage["summary"]["gptq_kept"] == len(kept)
    for f, m in plan.modules.items():
        d = m.decisions.get("weights")
        if d is None:
            continue
        # GPTQ's codes only where held-out tokens measured them better
        assert (m.weights is not None) == (d["error_gptq"] < d["error_rtn"]) == (d["method"] == "gptq")
        if m.weights and m.action == "int8":
            mod = model.get_submodule(f)
            assert isinstance(mod, Int8Linear) and torch.equal(mod.w_q, plan.tensors[codes_key(f)])
    x = calib_ids[:4, 1:40]
    with torch.no_grad():
        ref, out, base = (m(input_ids=x).logits for m in (fp, model, rtn_model))
        assert sqnr(ref, out) >= sqnr(ref, base) - 0.5  # never measurably worse than round-to-nearest
        # plan data: replayed on a fresh copy of the model, and through save / load, the same integers
        replay = glufx.compile(tiny_model("llama"), plan=plan)
        assert torch.equal(replay(input_ids=x).logits, out)
        glufx.save(model, tmp_path / "m")
        assert torch.equal(glufx.load(tmp_path / "m")(input_ids=x).logits, out)


def test_gptq_with_rotation_runs_on_the_rotated_weight(calib_ids):
    cfg = dict(CFG, granularity="per_token", qfem="off")
    model = glufx.compile(tiny_model("llama"), calib_ids, glufx.GlufxConfig(**cfg, weights="gptq"))
    rtn_model = glufx.compile(tiny_model("llama"), calib_ids, glufx.GlufxConfig(**cfg))
    rotated = [f for f, m in model.glufx_plan.modules.items() if m.rotation and m.weights]
    assert rotated
    for f in rotated:
        mod, rtn = model.get_submodule(f), rtn_model.get_submodule(f)
        # same rotated grid (scales), other integers; rotated back, both are the same weight to 8 bits
        assert mod.rot_block == rtn.rot_block and torch.equal(mod.w_scale, rtn.w_scale)
        assert not torch.equal(mod.w_q, rtn.w_q)
        assert sqnr(rtn.dequantized_weight(), mod.dequantized_weight()) > 30


def test_bad_weight_options_name_the_fix():
    with pytest.raises(ValueError, match="weights="):
        glufx.GlufxConfig(weights="awq")
    with pytest.raises(ValueError, match="weights='rtn'"):
        glufx.GlufxConfig(target=0.01, weights="gptq")
    with pytest.raises(ValueError, match="after every Transform"):
        glufx.Recipe([glufx.Observe(), glufx.DecideGranularity("per_token"), glufx.RoundWeights(),
                      glufx.Rotate("hadamard")])
    with pytest.raises(ValueError, match="before DecideQFeM"):
        glufx.Recipe([glufx.Observe(), glufx.DecideGranularity("per_token"), glufx.DecideQFeM(),
                      glufx.RoundWeights()])
    with pytest.raises(ValueError, match="damp"):
        glufx.RoundWeights(damp=0.0)
