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


def _value_seams(model):
    ids = torch.randint(3, 96, (2, 9))
    return match_graph(capture(model, ((), {"input_ids": ids})).module().graph).value_seams


@pytest.mark.parametrize("family", FAMILIES)
def test_value_seams_found_by_structure(family):
    """v -> o across attention, GQA-aware: o's input column j reads v's channel of the key-value head its
    query head shares (tiny models: 4 query heads, 2 key-value heads)."""
    seams = _value_seams(tiny_model(family))
    if family == "phi3":  # one fused qkv projection: v is a slice of it, not a linear of its own
        assert seams == []
        return
    assert [(s.producer, s.consumer) for s in seams] == [
        (f"model.layers.{i}.self_attn.v_proj", f"model.layers.{i}.self_attn.o_proj") for i in range(2)]
    head_dim = 16
    expected = [(j // head_dim // 2) * head_dim + j % head_dim for j in range(4 * head_dim)]
    assert all(s.channel_map == expected for s in seams)


class _Attention(torch.nn.Module):
    def __init__(self, between):
        super().__init__()
        self.v, self.o = torch.nn.Linear(16, 16, bias=False), torch.nn.Linear(16, 16, bias=False)
        self.between = between

    def forward(self, x):  # x: [B, T, 16], two heads of 8
        b, t, _ = x.shape
        v = self.v(x).view(b, t, 2, 8).transpose(1, 2)
        q = x.view(b, t, 2, 8).transpose(1, 2)
        if self.between == "value":
            a = F.scaled_dot_product_attention(q, q, v, is_causal=True)
        elif self.between == "query":  # v as the query: its channels are mixed into scores
            a = F.scaled_dot_product_attention(v, q, q, is_causal=True)
        elif self.between == "nonlinear":
            a = F.scaled_dot_product_attention(q, q, F.gelu(v), is_causal=True)
        else:  # v also reaches the output past o
            a = F.scaled_dot_product_attention(q, q, v, is_causal=True) + v
        return self.o(a.transpose(1, 2).reshape(b, t, 16)) + (0 if self.between != "residual" else v.sum())


@pytest.mark.parametrize("between,proven", [("value", True), ("query", False), ("nonlinear", False),
                                            ("residual", False)])
def test_value_seam_only_where_attention_moves_values(between, proven):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
    ep = torch.export.export(_Attention(between).eval(), (torch.randn(2, 5, 16),),
                             dynamic_shapes=({0: batch, 1: seq},))
    seams = match_graph(ep.module().graph).value_seams
    assert bool(seams) == proven
    if proven:
        assert (seams[0].producer, seams[0].consumer, seams[0].channel_map) == ("v", "o", list(range(16)))


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


def _plant_channel_outliers(model, factor: float = 30.0):
    """FP-equivalent edits that give every seam a channel outlier on every token, as real models have
    (a random tiny model has none): channel 3 of each norm's output, of each up -> down and each v -> o
    product made `factor` times larger, the consumers' columns `factor` times smaller."""
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            layer.input_layernorm.weight[3] *= factor
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
                lin.weight[:, 3] /= factor
            layer.post_attention_layernorm.weight[3] *= factor
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight[:, 3] /= factor
            mlp.up_proj.weight[3] *= factor
            mlp.down_proj.weight[:, 3] /= factor
            attn.v_proj.weight[3] *= factor
            if attn.v_proj.bias is not None:
                attn.v_proj.bias[3] *= factor
            cfg = model.config
            head_dim, rep = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
            for h in range(rep):  # the query heads that read key-value head 0, channel 3 of each
                attn.o_proj.weight[:, h * head_dim + 3] /= factor
    return model


def test_smooth_lowers_static_error(calib_ids):
    model = _plant_channel_outliers(tiny_model("qwen2", spike=False))
    kls = {}
    for t in ("identity", "smooth"):
        plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG, granularity="static", transform=t,
                                                                   qfem="off", qfep="off"))
        kls[t] = _kl(model, glufx.compile(copy.deepcopy(model), plan=plan), calib_ids[8:])
    assert kls["smooth"] < 0.5 * kls["identity"], kls


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mixtral"])
def test_value_seams_rotate_offline_for_dynamic_scales(family, calib_ids):
    """per-token recipe: o_proj's input is rotated across its v -> o seam in the weights (no op at run
    time), the FP model is unchanged, and the Rotate stage leaves o_proj to it."""
    model = tiny_model(family)
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG, granularity="per_token", qfem="off"))
    summary = next(s for s in plan.stages if s["stage"] == "Transform")["summary"]
    assert summary["by_kind"]["rotate_v_o"] == 2 and summary["max_fp_change"] <= 1e-5
    for layer in range(2):
        o = plan.modules[f"model.layers.{layer}.self_attn.o_proj"]
        assert o.rotation is None and o.decisions["offline_rotation"]["block"] == 16  # head_dim 16
        assert plan.modules[f"model.layers.{layer}.self_attn.q_proj"].rotation is not None  # the rest: online
    transformed = glufx.prefixed(copy.deepcopy(model), plan)
    with torch.no_grad():
        a, b = model(input_ids=calib_ids[:4]).logits, transformed(input_ids=calib_ids[:4]).logits
    assert float((a - b).norm() / a.norm()) <= 1e-5
    # the offline rotation serves quantization as the online one does: o_proj's quantized output error
    from conftest import sqnr
    from glufx.ops.reference import fake_quantize, dequantized_weight, hadamard

    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    x[:, 5] *= 40  # o's input with a channel outlier on every token
    w = model.model.layers[0].self_attn.o_proj.weight.detach()
    per_token = lambda v: fake_quantize(v, v.abs().amax(1, keepdim=True) / 127)  # noqa: E731
    plain = sqnr(x @ w.T, per_token(x) @ dequantized_weight(w).T)
    rotated = sqnr(x @ w.T, per_token(hadamard(x, 16)) @ dequantized_weight(hadamard(w, 16)).T)
    assert rotated > plain + 3


def test_value_rotation_block_needs_aligned_runs():
    from glufx.transforms import value_rotation_block

    gqa = torch.tensor([(j // 16 // 2) * 16 + j % 16 for j in range(64)])  # 4 query heads on 2 kv heads of 16
    assert value_rotation_block(gqa, 32, 128) == 16
    assert value_rotation_block(gqa, 32, 8) == 8
    shuffled = gqa.clone()
    shuffled[[0, 1]] = shuffled[[1, 0]]  # two columns read each other's channel: no block works
    assert value_rotation_block(shuffled, 32, 128) == 0
