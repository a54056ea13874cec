"""QFeP injection: the prefixed model equals the FP model run on prefix + input, eager and exported."""
import subprocess
import sys
import textwrap

import pytest
import torch

import glufx
from glufx.deploy import export
from glufx.prefix import PrefixedLM, PrefixKV, compute_prefix_kv

from conftest import CFG, tiny_model

PREFIX = [1, 17, 5]


def _left_padded(batch=2, T=30, pad=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, T), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
def test_prefixed_equals_fp_on_prefix_plus_input(family):
    model = tiny_model(family)
    wrapped = PrefixedLM(model, compute_prefix_kv(model, PREFIX))
    ids, mask = _left_padded()  # 3 + 30 tokens: past the sliding window (16) of mistral / gemma3
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask).logits
        full = torch.cat([torch.tensor(PREFIX).expand(2, -1), ids], 1)
        full_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1)
        ref = model(input_ids=full, attention_mask=full_mask).logits[:, 3:]
        without = model(input_ids=ids, attention_mask=mask).logits
    assert out.shape == ids.shape + (96,)
    valid = mask.bool()
    assert (out - ref)[valid].abs().max() <= 1e-4
    assert (out - without)[valid].abs().max() > 1e-2  # the prefix really changes the outputs
    # the stored prefix is never mutated by a call
    assert torch.equal(wrapped.prefix_k0, compute_prefix_kv(model, PREFIX).keys[0])


def test_generate_through_prefix_matches_fp():
    model = tiny_model("llama")
    wrapped = PrefixedLM(model, compute_prefix_kv(model, PREFIX))
    g = torch.Generator().manual_seed(1)
    for i in range(10):
        prompt = torch.randint(3, 96, (1, 3 + i), generator=g)
        got = wrapped.generate(prompt, max_new_tokens=6, do_sample=False)
        ref = model.generate(torch.cat([torch.tensor([PREFIX]), prompt], 1), max_new_tokens=6, do_sample=False)
        assert torch.equal(got, ref[:, 3:]), i
        assert torch.equal(got[:, : prompt.shape[1]], prompt)


def test_user_bos_is_not_added_twice():
    model = tiny_model("llama")
    wrapped = PrefixedLM(model, compute_prefix_kv(model, PREFIX))
    ids = torch.randint(3, 96, (2, 12))
    with torch.no_grad():
        plain = wrapped(input_ids=ids).logits
        with_bos = wrapped(input_ids=torch.cat([torch.ones(2, 1, dtype=torch.long), ids], 1)).logits
    assert torch.allclose(plain, with_bos, atol=1e-6)


def test_prefix_kv_roundtrip(tmp_path):
    kv = compute_prefix_kv(tiny_model("gemma3"), PREFIX)
    kv.save(tmp_path / "p.safetensors")
    back = PrefixKV.load(tmp_path / "p.safetensors")
    assert back.token_ids == PREFIX and all(torch.equal(a, b) for a, b in zip(kv.keys + kv.values, back.keys + back.values))




@pytest.mark.parametrize("method", ["paper", "prefixquant"])
def test_compile_with_qfep(method, calib_ids):
    model = tiny_model("llama")
    q = glufx.compile(model, calib_ids, glufx.GlufxConfig(**CFG, qfep=method))
    plan = q.glufx_plan
    assert isinstance(q, PrefixedLM) and plan.calibration["qfep_active"]
    assert plan.qfep["method"] == method and plan.qfep["target"] == "model.layers.0.mlp.down_proj"
    if method == "paper":
        assert plan.qfep["token_ids"][0] == 1 and len(plan.qfep["token_ids"]) == 3
        assert plan.qfep["candidates"][0]["token_id"] == 5  # the planted spike token
    else:
        assert plan.qfep["token_ids"][-1] == 1  # BOS last
    # statistics were gathered with the prefix cached: the plan replays to the same model
    again = glufx.compile(tiny_model("llama"), plan=glufx.Plan.from_json(plan.to_json(), plan.tensors))
    ids = calib_ids[:2, 1:]
    with torch.no_grad():
        assert torch.equal(q(input_ids=ids).logits, again(input_ids=ids).logits)


def test_qfep_without_bos(calib_ids):
    # Qwen-style: no BOS in the tokenizer; the prefix is [c*, s*]
    model = tiny_model("qwen2")
    ids = calib_ids[:, 1:]
    plan = glufx.calibrate(model, ids, glufx.GlufxConfig(**CFG, qfep="paper"))
    assert plan.calibration["bos_token_id"] == 1  # config BOS, as no tokenizer says otherwise
    from glufx.calibdata import CalibrationSet, pad_batches
    from glufx.decide.qfep import search_paper
    from glufx.observe import InputStats

    st = InputStats(fqns=["x"], in_features=64, seq_top=[[(50.0, 3, 5), (40.0, 9, 7)]])
    cal = CalibrationSet(pad_batches(list(ids[:4]), 4, 0), bos_token_id=None)
    res = search_paper(model, "model.layers.0.mlp.down_proj", st, cal, bos=None, n_contexts=10)
    assert len(res["token_ids"]) == 2 and res["token_ids"][1] in (5, 7)


def test_export_with_prefix_save_load_fresh_process(calib_ids, tmp_path):
    model = tiny_model("gemma3")
    q = glufx.compile(model, calib_ids, glufx.GlufxConfig(**CFG, qfep="paper"))
    ep = export(q)
    assert sum("glufx.int8_linear" in str(n.target) for n in ep.graph.nodes) == len(q.glufx_plan.quantized())
    x, mask = _left_padded(batch=3, T=9)
    with torch.no_grad():
        eager = q(input_ids=x, attention_mask=mask).logits
        assert torch.equal(ep.module()(x, mask), eager)
    torch.export.save(ep, tmp_path / "m.pt2")
    torch.save({"x": x, "mask": mask, "eager": eager}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        assert "transformers" not in sys.modules
        import glufx
        ep = torch.export.load({str(tmp_path / 'm.pt2')!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        out = ep.module()(io["x"], io["mask"])
        print("maxdiff", float((out - io["eager"]).abs().max()))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "maxdiff 0.0" in res.stdout


def test_qfep_records_its_fp_effect_and_starts_no_bos_models_at_the_document_separator(calib_ids):
    # a tokenizer without BOS (Qwen2.5): the prefix starts from EOS, what such a model sees between documents
    model = tiny_model("qwen2")
    model.config.bos_token_id = None
    ids = calib_ids[:, 1:]
    plan = glufx.calibrate(model, ids, glufx.GlufxConfig(**CFG, qfep="paper", qfem="off"))
    assert plan.qfep["start"] == "document separator" and plan.qfep["token_ids"][0] == model.config.eos_token_id
    effect = plan.qfep["fp_kl"]
    assert 0 < effect <= plan.qfep["max_fp_kl"]
    # the FP model with the prefix vs without, measured by hand on all the sequences: the same effect
    # (calibration measured it on its held-out sample of them)
    from glufx.calibdata import pad_batches
    from glufx.decide.qfep import prefix_fp_effect

    fresh = tiny_model("qwen2")
    fresh.config.bos_token_id = None
    fp_prefixed = glufx.prefixed(fresh, plan)  # the plan's transforms and prefix on the FP model
    # the plain side as calibration measured it: transformed, no prefix
    model = glufx.prefixed(model, glufx.Plan.from_dict({**plan.to_dict(), "qfep": None}, plan.tensors))
    by_hand = prefix_fp_effect(model, fp_prefixed, pad_batches(list(ids), 4, 0), None)
    assert 0.5 * effect < by_hand < 2 * effect


def test_qfep_declines_a_prefix_that_changes_the_fp_model(calib_ids):
    from glufx import DecideGranularity, DecideQFeP, Observe, Recipe

    model = tiny_model("llama")
    recipe = Recipe([Observe(), DecideQFeP("paper", max_fp_kl=0.0), DecideGranularity("per_token")])
    with pytest.warns(UserWarning, match="QFeP declined"):
        plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG), recipe=recipe)
    assert plan.qfep is None and plan.calibration["qfep_declined"]["fp_kl"] > 0
    assert not isinstance(glufx.compile(model, plan=plan), PrefixedLM)
