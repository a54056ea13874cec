"""torch.compile(model, backend="glufx"): entry point, rewrite counts, equality, no graph breaks."""
import copy
from importlib.metadata import entry_points

import pytest
import torch

import glufx
from glufx.deploy import backend as glufx_backend

from conftest import CFG, tiny_model



def test_registered_through_entry_point():
    eps = {e.name: e.value for e in entry_points(group="torch_dynamo_backends")}
    assert eps.get("glufx") == "glufx.deploy.backend:glufx_backend"
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("glufx") is glufx_backend.glufx_backend


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("options", [{"inductor": False}, {}], ids=["graph", "inductor"])
def test_backend_equals_glufx_compile(family, options, calib_ids):
    model = tiny_model(family)
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG))
    eager = glufx.compile(copy.deepcopy(model), plan=plan)
    torch._dynamo.reset()
    before = dict(glufx_backend.counters)
    # the rewritten graph as is, and through Inductor with eager's float math: both bit-equal (prefixed
    # applies the plan's equivalence transforms to the FP model, as the backend requires)
    compiled = torch.compile(glufx.prefixed(model, plan), backend="glufx", options={"plan": plan, **options}, dynamic=True)
    with torch.no_grad():
        for T in (9, 17, 30):
            x = calib_ids[:2, :T]
            assert torch.equal(compiled(input_ids=x, use_cache=False).logits, eager(input_ids=x, use_cache=False).logits)
            if T == 9:
                after_first = dict(glufx_backend.counters)
    # no recompile per length (dynamo may restart its first analysis once: Inductor's scalar
    # tensorification pass), and each graph rewrites every planned linear
    assert glufx_backend.counters == after_first
    graphs = after_first["graphs"] - before.get("graphs", 0)
    assert graphs in (1, 2)
    assert after_first["int8_linear"] - before.get("int8_linear", 0) == graphs * len(plan.quantized())
    explain = torch._dynamo.explain(tiny_model(family))(input_ids=calib_ids[:2, :9], use_cache=False)
    assert explain.graph_break_count == 0


def test_inductor_exact_with_kept_biased_linears(calib_ids):
    """Qwen2's q/k/v carry biases: kept in floating point they run as addmm, which Inductor's
    pattern passes would split into mm + a fused add (another rounding)."""
    model = tiny_model("qwen2")
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG))
    for fqn, mp in plan.modules.items():
        if fqn.endswith(("q_proj", "k_proj", "v_proj")) and ".layers.0." in fqn:
            mp.action, mp.reason = "fp", "kept by the test"
    eager = glufx.compile(copy.deepcopy(model), plan=plan)
    torch._dynamo.reset()
    compiled = torch.compile(glufx.prefixed(model, plan), backend="glufx", options={"plan": plan})
    x = calib_ids[:3, :21]
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=x, use_cache=False).logits, eager(input_ids=x, use_cache=False).logits)


def test_inductor_free_float_math_stays_close(calib_ids):
    model = tiny_model("qwen2", spike=False)
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG))
    eager = glufx.compile(copy.deepcopy(model), plan=plan)
    torch._dynamo.reset()
    compiled = torch.compile(glufx.prefixed(model, plan), backend="glufx", options={"plan": plan, "exact": False})
    with torch.no_grad():
        a = compiled(input_ids=calib_ids[:2, :12], use_cache=False).logits
        b = eager(input_ids=calib_ids[:2, :12], use_cache=False).logits
    # Inductor's own reductions can move an activation across an INT8 rounding boundary
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()


def test_exact_mode_restores_inductor_tables():
    from torch._inductor import decomposition, lowering

    from glufx.deploy.inductor import EAGER_FLOAT_OPS, eager_float_ops

    rsqrt = torch.ops.aten.rsqrt.default
    before = (dict(lowering.lowerings), dict(decomposition.select_decomp_table()), dict(torch._decomp.decomposition_table))
    with eager_float_ops():
        assert rsqrt not in lowering.lowerings  # Inductor falls back to the ATen kernel
        assert not any(getattr(k, "overloadpacket", None) in EAGER_FLOAT_OPS for k in decomposition.select_decomp_table())
    after = (dict(lowering.lowerings), dict(decomposition.select_decomp_table()), dict(torch._decomp.decomposition_table))
    assert after == before


def test_backend_rejects_unknown_options():
    torch._dynamo.reset()
    m = torch.compile(torch.nn.Linear(4, 4), backend="glufx", options={"plan": "p.json", "exakt": True})
    with pytest.raises(Exception, match="unknown option"):
        m(torch.randn(2, 4))


def test_backend_passes_inductor_configs_to_inductor(calib_ids):
    """options["inductor_configs"] reach Inductor's config for this compilation only: a setting Inductor does not
    have is its error, and a real one changes no output in exact mode."""
    model = glufx.compile(tiny_model("llama"), plan=glufx.calibrate(tiny_model("llama"), calib_ids, glufx.GlufxConfig(**CFG)))
    ids = calib_ids[:1, :9]
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        torch._dynamo.reset()
        bad = torch.compile(model, backend="glufx", options={"inductor_configs": {"no_such_setting": 1}})
        with pytest.raises(Exception, match="no_such_setting"):
            bad(input_ids=ids, use_cache=False)
        torch._dynamo.reset()
        ok = torch.compile(model, backend="glufx", options={"inductor_configs": {"realize_reads_threshold": 1}})
        assert torch.equal(ok(input_ids=ids, use_cache=False).logits, ref)
    torch._dynamo.reset()


def test_quantized_weights_cached_across_recompiles(calib_ids):
    model = tiny_model("llama")
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG))
    eager = glufx.compile(copy.deepcopy(model), plan=plan)
    torch._dynamo.reset()
    compiled = torch.compile(glufx.prefixed(model, plan), backend="glufx", options={"plan": plan, "inductor": False}, dynamic=False)
    with torch.no_grad():
        compiled(input_ids=calib_ids[:2, :9], use_cache=False)
        before = dict(glufx_backend.counters)
        out = compiled(input_ids=calib_ids[:2, :13], use_cache=False).logits  # static shapes: a recompile
        assert torch.equal(out, eager(input_ids=calib_ids[:2, :13], use_cache=False).logits)
    assert glufx_backend.counters["graphs"] == before["graphs"] + 1
    assert glufx_backend.counters["weights_quantized"] == before["weights_quantized"]
    assert glufx_backend.counters["weights_cache_hits"] - before.get("weights_cache_hits", 0) == len(plan.quantized())
    # a new model whose weights reuse the freed storage of this one must not hit the cache
    del compiled, model
    torch._dynamo.reset()
    other = tiny_model("llama", seed=1)
    plan1 = glufx.calibrate(other, calib_ids, glufx.GlufxConfig(**CFG))
    ref = glufx.compile(copy.deepcopy(other), plan=plan1)
    compiled = torch.compile(glufx.prefixed(other, plan1), backend="glufx", options={"plan": plan1, "inductor": False})
    with torch.no_grad():
        x = calib_ids[:2, :9]
        assert torch.equal(compiled(input_ids=x, use_cache=False).logits, ref(input_ids=x, use_cache=False).logits)


def test_backend_with_qfep_prefix(calib_ids):
    model = tiny_model("llama")
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG, qfep="paper"))
    assert plan.qfep
    eager = glufx.compile(copy.deepcopy(model), plan=plan)
    torch._dynamo.reset()
    compiled = torch.compile(glufx.prefixed(model, plan), backend="glufx", options={"plan": plan})
    x = calib_ids[:2, :14]
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=x).logits, eager(input_ids=x).logits)
    torch._dynamo.reset()
    bare = torch.compile(model, backend="glufx", options={"plan": plan})
    with pytest.raises(Exception, match="QFeP prefix"):
        bare(input_ids=x, use_cache=False)


def test_backend_needs_a_plan():
    torch._dynamo.reset()
    m = torch.compile(torch.nn.Linear(4, 4), backend="glufx")
    with pytest.raises(Exception, match="pass the plan"):
        m(torch.randn(2, 4))


def test_backend_fuses_glus_as_lower_does(calib_ids):
    model = tiny_model("llama")
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG, fuse_glu=True))
    eager = glufx.compile(copy.deepcopy(model), plan=plan)
    n_glu = sum(isinstance(m, glufx.Int8GLU) for m in eager.modules())
    assert n_glu == 2
    torch._dynamo.reset()
    before = glufx_backend.counters["glu_fused"]
    compiled = torch.compile(glufx.prefixed(model, plan), backend="glufx", options={"plan": plan, "inductor": False})
    with torch.no_grad():
        a = compiled(input_ids=calib_ids[:2, :13], use_cache=False).logits
        b = eager(input_ids=calib_ids[:2, :13], use_cache=False).logits
    fused = glufx_backend.counters["glu_fused"] - before
    assert fused > 0 and fused % n_glu == 0  # every fusable block, in each graph dynamo compiled
    assert torch.equal(a, b)


def test_backend_compiles_an_already_lowered_model(calib_ids):
    model = tiny_model("qwen2")
    q = glufx.compile(model, calib_ids, glufx.GlufxConfig(**CFG))
    torch._dynamo.reset()
    compiled = torch.compile(q, backend="glufx")  # no plan: the graph already holds glufx ops
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=calib_ids[:2, :11], use_cache=False).logits,
                           q(input_ids=calib_ids[:2, :11], use_cache=False).logits)
