"""Equivalence transforms (glufx/transforms.py): seams proven on the graph (match.NormSeam, GLU up -> down),
the strength search, FP equivalence on every family, refusal, and seams the graph does not prove."""
import copy

import pytest
import torch
import torch.nn.functional as F

import glufx
from glufx.capture import capture
from glufx.match import match_graph
from glufx.transforms import search_scales

from conftest import CFG, FAMILIES, tiny_model

# the norm whose output the linears read: Gemma 2/3 feed the MLP from pre_feedforward_layernorm (their
# post_attention_layernorm sits on the attention output, before the residual add)
MLP_NORM = {f: "post_attention_layernorm" for f in FAMILIES}
MLP_NORM.update(gemma2="pre_feedforward_layernorm", gemma3="pre_feedforward_layernorm")


def _seams(model):
    ids = torch.randint(3, 96, (2, 9))
    return match_graph(capture(model, ((), {"input_ids": ids})).module().graph).norm_seams


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_seams_found_by_structure(family):
    seams = {s.weight: s for s in _seams(tiny_model(family))}
    for layer in range(2):
        attn = seams[f"model.layers.{layer}.input_layernorm.weight"]
        assert all(".self_attn." in c for c in attn.consumers) and len(attn.consumers) == (1 if family == "phi3" else 3)
        # Gemma's norms compute x * (1 + w): the seam knows the offset
        assert (attn.scale, attn.offset) == (1.0, 1.0 if family.startswith("gemma") else 0.0)
        mlp = f"model.layers.{layer}.{MLP_NORM[family]}.weight"
        if family == "mixtral":  # its MLP norm also feeds the router and a 3-D expert bank
            assert mlp not in seams
        else:
            assert all(".mlp." in c for c in seams[mlp].consumers)
    assert len(seams) == (2 if family == "mixtral" else 4)


class _Block(torch.nn.Module):
    def __init__(self, residual_reads_norm: bool, shared_weight: bool):
        super().__init__()
        self.norm = torch.nn.RMSNorm(16)
        self.q, self.k = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False)
        self.residual_reads_norm, self.shared_weight = residual_reads_norm, shared_weight

    def forward(self, x):
        h = self.norm(x)
        y = self.q(h) + self.k(h)
        if self.residual_reads_norm:
            y = y + h  # the normed value also reaches the residual: scaling it would change the output
        if self.shared_weight:
            y = y * self.norm.weight  # the norm's weight is used elsewhere too
        return y


@pytest.mark.parametrize("residual,shared,proven", [(False, False, True), (True, False, False), (False, True, False)])
def test_unproven_seams_are_not_found(residual, shared, proven):
    ep = torch.export.export(_Block(residual, shared).eval(), (torch.randn(2, 5, 16),))
    seams = match_graph(ep.module().graph).norm_seams
    assert bool(seams) == proven
    if proven:
        assert seams[0].weight == "norm.weight" and sorted(seams[0].consumers) == ["k", "q"]


def test_layer_norm_seam_carries_the_bias():
    class LN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.q = torch.nn.LayerNorm(16), torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.q(self.norm(x))

    ep = torch.export.export(LN().eval(), (torch.randn(2, 5, 16),))
    (seam,) = match_graph(ep.module().graph).norm_seams
    assert (seam.weight, seam.bias, seam.consumers) == ("norm.weight", "norm.bias", ["q"])


def _kl(ref, model, ids):
    with torch.no_grad():
        p = F.log_softmax(ref(input_ids=ids).logits.float(), -1)
        q = F.log_softmax(model(input_ids=ids).logits.float(), -1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("family", FAMILIES)
def test_smooth_is_fp_equivalent_and_leaves_the_user_model_alone(family, calib_ids):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG, granularity="static", transform="smooth",
                                                               qfem="off", qfep="off"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    summary = next(s for s in plan.stages if s["stage"] == "Transform")["summary"]
    assert summary["seams"] >= 2 and summary["max_fp_change"] <= 1e-5
    assert len(plan.transforms) == summary["applied"]
    transformed = glufx.prefixed(copy.deepcopy(model), plan)  # replays the plan's transforms
    with torch.no_grad():
        a, b = model(input_ids=calib_ids[:4]).logits, transformed(input_ids=calib_ids[:4]).logits
    assert float((a - b).norm() / a.norm()) <= 1e-5


def test_a_seam_that_moves_the_fp_model_is_refused(calib_ids):
    from glufx import DecideGranularity, Observe, Recipe, Transform

    model = tiny_model("llama")
    recipe = Recipe([Observe(), Transform("smooth", granularity="static", tolerance=0.0),
                     DecideGranularity("static")])
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG), recipe=recipe)
    summary = next(s for s in plan.stages if s["stage"] == "Transform")["summary"]
    assert summary["applied"] == 0 and not plan.transforms
    assert any("refused" in why for why in summary["skipped"].values())


def test_strength_search_finds_the_outlier_channel_and_never_loses():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    x[:, 3] *= 60  # a channel outlier on every token
    w = torch.randn(32, 64) * 0.1
    alpha, s, errors = search_scales(x, w, "static")
    assert alpha is not None and errors[alpha] < 0.5 * errors["none"]
    assert int(s.argmax()) == 3
    # an input without outliers: nothing beats leaving it alone, or what wins is recorded
    alpha, s, errors = search_scales(torch.randn(256, 64), w, "per_token")
    assert alpha is None or errors[alpha] < errors["none"]


def test_smooth_lowers_static_error(calib_ids):
    model = tiny_model("qwen2")
    kls = {}
    for t in ("identity", "smooth"):
        plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG, granularity="static", transform=t,
                                                                   qfem="off", qfep="off"))
        kls[t] = _kl(model, glufx.compile(copy.deepcopy(model), plan=plan), calib_ids[8:])
    assert kls["smooth"] < kls["identity"], kls
