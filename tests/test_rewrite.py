"""rewrite: fusing GLU modules into Int8GLU (GlufxConfig(fuse_glu=True)) changes no output."""
import copy

import pytest
import torch

import glufx
from glufx.rewrite import counters

from conftest import tiny_model

CFG = dict(seq_len=48, batch_size=4, progress=False, num_samples=8, heldout_samples=4, max_fp_param_share=0.25)


def _plans(model, ids, **kw):
    fused = glufx.calibrate(model, ids, glufx.GlufxConfig(**CFG, fuse_glu=True, **kw))
    unfused = glufx.Plan.from_dict({**fused.to_dict(), "config": {**fused.config, "fuse_glu": False}})
    return fused, unfused


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral"])
def test_fused_glu_equals_unfused(family, calib_ids):
    model = tiny_model(family)
    fused_plan, plan = _plans(model, calib_ids)
    expected = sum(glufx.rewrite.glu_fusable(glufx.compile(copy.deepcopy(model), plan=plan), plan, b) is None
                   for b in plan.glu_blocks)
    assert expected >= 1
    before = counters["glu_fused"]
    fused = glufx.compile(copy.deepcopy(model), plan=fused_plan)
    assert counters["glu_fused"] - before == expected
    assert sum(isinstance(m, glufx.Int8GLU) for m in fused.modules()) == expected
    unfused = glufx.compile(copy.deepcopy(model), plan=plan)
    x = calib_ids[:3, :21]
    with torch.no_grad():
        assert torch.equal(fused(input_ids=x).logits, unfused(input_ids=x).logits)


def test_unfusable_blocks_stay_unfused(calib_ids):
    # Phi-3 projects gate and up with one fused linear; Mixtral's experts are banks: neither is a plain GLU module
    for family in ("phi3", "mixtral"):
        model = tiny_model(family)
        plan, _ = _plans(model, calib_ids)
        assert all(b["module"] is None for b in plan.glu_blocks)
        assert not any(isinstance(m, glufx.Int8GLU) for m in glufx.compile(model, plan=plan).modules())


def test_fused_model_exports_and_saves(calib_ids, tmp_path):
    model = tiny_model("llama")
    plan, _ = _plans(model, calib_ids, qfep="paper")
    q = glufx.compile(model, plan=plan)
    x = calib_ids[:2, 1:15].clone()
    m = torch.ones_like(x)
    with torch.no_grad():
        ref = q(input_ids=x, attention_mask=m).logits
    ep = glufx.export(q, (x, m))
    assert sum("int8_glu_packed" in str(n.target) for n in ep.graph.nodes) == len(plan.glu_blocks)
    with torch.no_grad():
        assert torch.equal(ep.module()(x, m), ref)
    glufx.save(q, tmp_path / "q")
    loaded = glufx.load(tmp_path / "q")
    assert sum(isinstance(mod, glufx.Int8GLU) for mod in loaded.modules()) == len(plan.glu_blocks)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x, attention_mask=m).logits, ref)
