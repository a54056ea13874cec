"""recipe: stages as versioned configs, structured decisions, the re-observation rule, and an
output-preserving equivalence transform (FP outputs unchanged, statistics observed again)."""
import copy

import pytest
import torch

import glufx
from glufx import DecideGranularity, DecideQFeM, DecideScales, Observe, Recipe, Transform
from glufx.transforms import apply_transforms

from conftest import CFG, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_stage_configs_are_validated():
    with pytest.raises(ValueError, match="choose one of"):
        Transform("rotate_everything")
    with pytest.raises(ValueError, match="alpha > 0"):
        DecideQFeM(mode="alpha")
    with pytest.raises(ValueError, match="version 7"):
        Observe(version=7)
    with pytest.raises(ValueError, match="granularity stage before it"):
        Recipe([Observe(), DecideQFeM(mode="off")])
    with pytest.raises(ValueError, match="before DecideQFeM"):
        Recipe([Observe(), DecideGranularity(), DecideQFeM(mode="off"), DecideScales()])


def test_default_recipe_records_structured_decisions(calib_ids):
    model = tiny_model("llama")
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG))
    # the transform changes the FP model: statistics are observed again before the first stage reading them
    assert [s["stage"] for s in plan.stages] == ["Observe", "Transform", "DecideGranularity", "Rotate", "Observe",
                                                 "DecideScales", "DecideQFeM"]
    rotated = [m for m in plan.modules.values() if m.rotation]
    assert rotated and all(m.decisions["rotation"]["rotated"] for m in rotated)
    assert all(m.rotation["signs"] in plan.tensors for m in rotated)
    kept = [m for m in plan.modules.values() if m.kept_by_qfem]
    assert kept and all(m.action == "fp" and m.decisions["qfem"]["step"] >= 1 for m in kept)
    assert all(m.rotation is None and m.x_scale is None for m in kept)  # an FP module rotates nothing
    naive = plan.without_qfem()  # reads the QFeM decision, not the reason text
    assert all(naive.modules[m.fqn].rotation == m.decisions["qfem"]["rotation"] is not None for m in kept)
    assert all(naive.modules[m.fqn].action == "int8" and naive.modules[m.fqn].granularity == "per_sequence"
               for m in kept)
    int8 = [m for m in plan.modules.values() if m.action == "int8"]
    assert all(m.decisions["granularity"]["granularity"] == "per_sequence" for m in int8)
    assert plan.calibration["observations"] == 2  # the transform changed the FP model: observed again


def test_per_module_granularity(calib_ids):
    model = tiny_model("llama")
    target = "model.layers.1.mlp.down_proj"
    recipe = Recipe([Observe(), DecideGranularity("per_token", per_module={target: "static"}), DecideScales(),
                     DecideQFeM(mode="off")])
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG), recipe=recipe)
    assert plan.modules[target].granularity == "static" and plan.modules[target].x_scale > 0
    assert {m.granularity for f, m in plan.modules.items() if m.action == "int8" and f != target} == {"per_token"}
    q = glufx.compile(copy.deepcopy(model), plan=plan)
    assert q.get_submodule(target).x_scale is not None


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_equivalence_transform_keeps_fp_outputs_and_reobserves(family, calib_ids):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe([Observe(), Transform("smooth_up_down", alpha=0.5), DecideGranularity("per_token"),
                     DecideScales(), DecideQFeM(mode="off")])
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG), recipe=recipe)

    # calibrate left the user's model exactly as it was; the plan holds the transform
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert len(plan.transforms) == 2 and set(plan.tensors) == {t["tensor"] for t in plan.transforms}

    # FP outputs unchanged (1e-5 relative) when the transform alone is applied
    transformed = copy.deepcopy(model)
    assert apply_transforms(transformed, plan) == 2
    assert apply_transforms(transformed, plan) == 0  # already carried: not applied twice
    ids = calib_ids[:3, :30]
    ref, out = _logits(model, ids), _logits(transformed, ids)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()

    # the rule: a second observation ran after the transform, and it saw other statistics
    assert plan.calibration["observations"] == 2
    # inserted before the first stage that reads statistics after the transform (DecideScales, stage 3)
    assert [s["index"] for s in plan.stages if s["index"].endswith(":auto")] == ["3:auto"]
    first, second = (o.by_fqn() for o in plan.observations)
    down = plan.transforms[0]["consumers"][0]
    assert not torch.equal(first[down].channel_absmax, second[down].channel_absmax)
    assert second[down].channel_absmax.max() < first[down].channel_absmax.max()
    # the gate/up input (before the seam) is untouched by it
    up = plan.transforms[0]["producer"]
    assert torch.equal(first[up].channel_absmax, second[up].channel_absmax)


def test_transform_plan_round_trips_with_its_sidecar(calib_ids, tmp_path):
    model = tiny_model("llama")
    recipe = Recipe([Observe(), Transform("smooth_up_down"), DecideGranularity("per_token"), DecideScales(),
                     DecideQFeM(mode="off")])
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG), recipe=recipe)
    plan.save(tmp_path / "plan.json")
    assert (tmp_path / "plan.safetensors").exists()
    again = glufx.Plan.load(tmp_path / "plan.json")
    assert again.transforms == plan.transforms
    assert all(torch.equal(again.tensors[k], v) for k, v in plan.tensors.items())
    a = glufx.compile(copy.deepcopy(model), plan=plan)
    b = glufx.compile(copy.deepcopy(model), plan=again)
    ids = calib_ids[:2, :20]
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    (tmp_path / "plan.safetensors").unlink()
    with pytest.raises(ValueError, match="sidecar"):
        glufx.Plan.load(tmp_path / "plan.json")


def test_transform_refuses_a_model_it_does_not_describe(calib_ids):
    model = tiny_model("llama")
    recipe = Recipe([Observe(), Transform("smooth_up_down"), DecideGranularity("per_token"), DecideScales(),
                     DecideQFeM(mode="off")])
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG), recipe=recipe)
    other = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="belongs to another model"):
        glufx.compile(other, plan=plan)


def test_smoothing_helps_per_token_w8a8_on_a_channel_outlier(calib_ids):
    """An outlier channel of down_proj's input on every token: scaling it into up_proj lowers the
    quantized model's error against FP (the reason the transform exists)."""
    model = tiny_model("llama", spike=False)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3] *= 60  # channel 3 of down's input, every token
    cfg = glufx.GlufxConfig(**CFG)

    def err(transform):
        recipe = Recipe([Observe(), Transform(transform), DecideGranularity("per_token"), DecideScales(),
                         DecideQFeM(mode="off")])
        q = glufx.compile(copy.deepcopy(model), plan=glufx.calibrate(model, calib_ids, cfg, recipe=recipe))
        ids = calib_ids[:4]
        ref = torch.log_softmax(_logits(model, ids), -1)
        return float(torch.nn.functional.kl_div(torch.log_softmax(_logits(q, ids), -1), ref, log_target=True,
                                                reduction="batchmean"))

    assert err("smooth_up_down") < 0.7 * err("identity")


def test_calibrate_restores_train_mode_when_a_stage_raises(calib_ids):
    model = tiny_model("llama").train()
    with pytest.raises(ValueError):
        glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG),
                        recipe=Recipe([Observe(), DecideGranularity("per_token",
                                                                    per_module={"model.nope": "static"})]))
    assert model.training
