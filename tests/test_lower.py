"""lower: fusing GLU modules into Int8GLU (GlufxConfig(fuse_glu=True)) changes no output."""
import copy

import pytest
import torch

import glufx
from glufx.lower import counters

from conftest import CFG, tiny_model



def _plans(model, ids, **kw):
    fused = glufx.calibrate(model, ids, glufx.GlufxConfig(**CFG, fuse_glu=True, **kw))
    unfused = glufx.Plan.from_dict({**fused.to_dict(), "config": {**fused.config, "fuse_glu": False}}, fused.tensors)
    return fused, unfused


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral"])
def test_fused_glu_equals_unfused(family, calib_ids):
    model = tiny_model(family)
    fused_plan, plan = _plans(model, calib_ids)
    # every tiny family here has plain GLU modules; the spiky layer-0 down_proj may stay FP, gate/up do not
    expected = sum(1 for b in plan.glu_blocks if plan.modules[b["gate"]].action == "int8"
                   and plan.modules[b["up"]].action == "int8")
    assert expected == len(plan.glu_blocks) == 2
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
    assert sum("glufx.int8_glu" in str(n.target) for n in ep.graph.nodes) == len(plan.glu_blocks)
    with torch.no_grad():
        assert torch.equal(ep.module()(x, m), ref)
    glufx.save(q, tmp_path / "q")
    loaded = glufx.load(tmp_path / "q")
    assert sum(isinstance(mod, glufx.Int8GLU) for mod in loaded.modules()) == len(plan.glu_blocks)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x, attention_mask=m).logits, ref)


# ---- one lowering, checked plans, canonical state ------------------------------------------------

def test_plan_for_other_shapes_is_refused(calib_ids):
    import transformers as tf

    from conftest import TINY

    plan = glufx.calibrate(tiny_model("llama"), calib_ids, glufx.GlufxConfig(**CFG))
    wider = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**TINY, "intermediate_size": 96})).eval()
    with pytest.raises(glufx.PlanMismatchError, match="down_proj: the model's linear is 96 -> 64"):
        glufx.compile(wider, plan=plan)
    assert not any(isinstance(m, glufx.Int8Linear) for m in wider.modules())  # checked before any change


def test_plan_naming_a_missing_module_is_refused(calib_ids):
    import transformers as tf

    from conftest import TINY

    plan = glufx.calibrate(tiny_model("llama"), calib_ids, glufx.GlufxConfig(**CFG))
    shallow = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**TINY, "num_hidden_layers": 1})).eval()
    with pytest.raises(glufx.PlanMismatchError, match="model.layers.1.self_attn.q_proj: no such module.*and 2 more"):
        glufx.compile(shallow, plan=plan)


def test_compile_with_a_plan_refuses_ignored_arguments(calib_ids):
    model = tiny_model("llama")
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG))
    with pytest.raises(ValueError, match="calib_data, config would be ignored"):
        glufx.compile(model, calib_ids, glufx.GlufxConfig(**CFG), plan=plan)


def test_saved_state_is_canonical_and_reloads_bit_equal_under_every_kernel(calib_ids, tmp_path):
    from safetensors import safe_open

    from glufx.ops import cpu_kernel

    from ops.test_int8_ops import KERNELS

    model = tiny_model("gemma3")
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG, fuse_glu=True))
    x = calib_ids[:2, :17].clone()
    with cpu_kernel(KERNELS[-1]):
        q = glufx.compile(model, plan=plan)
        with torch.no_grad():
            ref = q(input_ids=x).logits
        glufx.save(q, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not any("packed" in k for k in keys)
        for k in keys:
            if k.endswith("w_q"):
                t = f.get_tensor(k)
                assert t.dtype == torch.int8 and t.dim() == 2  # [N, K], not the kernel's 4-D layout
    for kernel in KERNELS:
        with cpu_kernel(kernel):
            loaded = glufx.load(tmp_path / "q")
            with torch.no_grad():
                assert torch.equal(loaded(input_ids=x).logits, ref), kernel
    assert loaded.glufx_plan.stats is not None  # statistics saved beside the model


def test_exported_program_holds_no_packed_weight(calib_ids):
    model = tiny_model("llama")
    q = glufx.compile(model, calib_ids, glufx.GlufxConfig(**CFG))
    x = calib_ids[:2, 1:12].clone()
    ep = glufx.export(q, (x, torch.ones_like(x)))
    tensors = {**ep.state_dict, **ep.constants}
    assert not any(t.dim() == 4 and t.dtype == torch.int8 for t in tensors.values())
    assert not any("packed" in str(n.target) for n in ep.graph.nodes)
    assert sum("glufx.int8_linear" in str(n.target) for n in ep.graph.nodes) == len(q.glufx_plan.quantized())


def test_old_format_directory_is_named(calib_ids, tmp_path):
    import json

    q = glufx.compile(tiny_model("llama"), calib_ids, glufx.GlufxConfig(**CFG))
    glufx.save(q, tmp_path / "q")
    p = tmp_path / "q" / "glufx_plan.json"
    d = json.loads(p.read_text())
    d["version"] = 1
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="older glufx.*recalibrate"):
        glufx.load(tmp_path / "q")


# ---- fp_weights="int8": weight-only INT8 for the linears kept in floating point --------------------------------

def _fp_weight_plans(model, ids, **kw):
    int8 = glufx.calibrate(model, ids, glufx.GlufxConfig(**CFG, fp_weights="int8", **kw))
    fp = glufx.Plan.from_dict({**int8.to_dict(), "config": {**int8.config, "fp_weights": "fp"}}, int8.tensors)
    return int8, fp


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_fp_weights_int8_lowers_every_kept_linear(family, calib_ids):
    """Each linear the plan keeps in FP becomes an Int8WeightLinear holding the per-channel INT8 weight of the
    (transformed) FP weight, and the model computes what the FP-weight plan computes with those weights rounded
    (its quality on a real model: docs/decode.md)."""
    model = tiny_model(family)
    plan, fp_plan = _fp_weight_plans(model, calib_ids)
    kept = plan.kept_fp(decoder_only=False)
    assert kept, "the tiny model's plan keeps no linear in FP: nothing under test"
    before = counters["int8_weight_linear"]
    q = glufx.compile(copy.deepcopy(model), plan=plan)
    assert counters["int8_weight_linear"] - before == len(kept)
    assert sorted(n for n, m in q.named_modules() if isinstance(m, glufx.Int8WeightLinear)) == sorted(kept)
    ref = glufx.compile(copy.deepcopy(model), plan=fp_plan)
    with torch.no_grad():
        for fqn in kept:  # the FP-weight plan with those weights rounded to their INT8 grid (a new linear: a
            linear, mod = ref.get_submodule(fqn), q.get_submodule(fqn)  # tied lm_head shares the embedding's weight)
            assert torch.equal(mod.w_q, torch.ops.glufx.quantize_weight(linear.weight)[0])
            rounded = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
            rounded.weight.copy_(mod.dequantized_weight())
            if linear.bias is not None:
                rounded.bias.copy_(linear.bias)
            ref.set_submodule(fqn, rounded)
        x = calib_ids[:3, :21]
        a, b = q(input_ids=x).logits, ref(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()))


def test_fp_weights_int8_saves_compiles_and_is_refused_by_compressed_tensors(calib_ids, tmp_path):
    from glufx.deploy.compressed_tensors import ExportError, export_compressed_tensors

    model = tiny_model("llama")
    plan, _ = _fp_weight_plans(model, calib_ids)
    q = glufx.compile(copy.deepcopy(model), plan=plan)
    x = calib_ids[:2, :17]
    with torch.no_grad():
        ref = q(input_ids=x, use_cache=False).logits
    glufx.save(q, tmp_path / "q")
    loaded = glufx.load(tmp_path / "q")
    assert sum(isinstance(m, glufx.Int8WeightLinear) for m in loaded.modules()) == len(plan.kept_fp(decoder_only=False))
    torch._dynamo.reset()
    graph = torch.compile(glufx.prefixed(model, plan), backend="glufx", options={"plan": plan, "inductor": False})
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x, use_cache=False).logits, ref)
        assert torch.equal(graph(input_ids=x, use_cache=False).logits, ref)  # the backend lowers them the same way
    with pytest.raises(ExportError, match=r"fp_weights='fp'"):
        export_compressed_tensors(q, tmp_path / "ct")
    with pytest.raises(ValueError, match="fp_weights"):
        glufx.GlufxConfig(fp_weights="int4")
