"""torch.compile(model, backend="glufx"): entry point, rewrite counts, equality, no graph breaks."""
import copy
from importlib.metadata import entry_points

import pytest
import torch

import glufx
from glufx.deploy import backend as glufx_backend

from conftest import tiny_model

CFG = dict(seq_len=48, batch_size=4, progress=False, num_samples=8, heldout_samples=4, max_fp_param_share=0.25)


def test_registered_through_entry_point():
    eps = {e.name: e.value for e in entry_points(group="torch_dynamo_backends")}
    assert eps.get("glufx") == "glufx.deploy.backend:glufx_backend"
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("glufx") is glufx_backend.glufx_backend


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_backend_equals_glufx_compile(family, calib_ids):
    model = tiny_model(family)
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG))
    eager = glufx.compile(copy.deepcopy(model), plan=plan)
    torch._dynamo.reset()
    before = dict(glufx_backend.counters)
    # inductor=False: the rewritten graph itself, which must equal the eager rewrite exactly
    compiled = torch.compile(model, backend="glufx", options={"plan": plan, "inductor": False}, dynamic=True)
    with torch.no_grad():
        for T in (9, 17, 30):
            x = calib_ids[:2, :T]
            assert torch.equal(compiled(input_ids=x, use_cache=False).logits, eager(input_ids=x, use_cache=False).logits)
    assert glufx_backend.counters["graphs"] - before.get("graphs", 0) == 1  # no recompile per length
    assert glufx_backend.counters["int8_linear"] - before.get("int8_linear", 0) == len(plan.quantized())
    explain = torch._dynamo.explain(tiny_model(family))(input_ids=calib_ids[:2, :9], use_cache=False)
    assert explain.graph_break_count == 0


def test_backend_through_inductor(calib_ids):
    model = tiny_model("qwen2", spike=False)
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG))
    eager = glufx.compile(copy.deepcopy(model), plan=plan)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="glufx", options={"plan": plan})
    with torch.no_grad():
        a = compiled(input_ids=calib_ids[:2, :12], use_cache=False).logits
        b = eager(input_ids=calib_ids[:2, :12], use_cache=False).logits
    # Inductor reorders float reductions (norms), which can move an activation across an INT8
    # rounding boundary: close, not bit-equal
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_backend_needs_a_plan():
    torch._dynamo.reset()
    m = torch.compile(torch.nn.Linear(4, 4), backend="glufx")
    with pytest.raises(Exception, match="pass the plan"):
        m(torch.randn(2, 4))
