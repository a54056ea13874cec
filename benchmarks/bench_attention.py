"""Attention: glufx's kernels against ATen's scaled_dot_product_attention, in one process.

    python -m pytest benchmarks/bench_attention.py -q        # a table at the end

Decode (test_decode_attention): one query token over a KV cache of S positions, its query heads packed onto their
key-value heads (as glufx.compile_decode runs attention: `glufx_sdpa`), float32, a boolean mask over the cache as
transformers' static cache passes it. Both take the same packed inputs; SDPA is the call PyTorch recommends, which picks its CPU
flash kernel here. Each round calls every layer's cache once, and there are enough layers for the caches to total
256 MiB: as in a decode step, where the weights streamed between two attention calls evict the cache from L3,
every call reads its keys and values from memory. Both implementations run in each round (this VM's bandwidth
drifts between minutes); medians per layer.

Prefill (test_prefill_attention): a prompt of T tokens attending to itself, as a model's attention block calls
it: transformers' `sdpa_attention_forward` (SDPA with is_causal for a causal layer, a boolean mask and repeated
key-value heads for a sliding-window layer, as transformers passes them) against glufx's `glufx_sdpa`
(glufx::prefill_attention), same module, inputs and masks; compute-bound, so one layer's tensors, in cache.
"""
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import glufx  # noqa: F401  (registers torch.ops.glufx)

MODELS = {"gemma3-270m": (4, 1, 256), "llama3-8b": (32, 8, 128)}  # query heads, key-value heads, head size
POSITIONS = (64, 512, 2048)
TOTAL_BYTES = 256 * 2**20
ROUNDS = 7


def _layers(heads, kv_heads, head_dim, S):
    g = torch.Generator().manual_seed(0)
    n = max(1, min(2000, TOTAL_BYTES // (2 * kv_heads * S * head_dim * 4)))
    q = torch.randn(1, kv_heads, heads // kv_heads, head_dim, generator=g)  # packed: [B, H_kv, groups, D]
    caches = [(torch.randn(1, kv_heads, S, head_dim, generator=g), torch.randn(1, kv_heads, S, head_dim, generator=g))
              for _ in range(n)]
    mask = torch.ones(1, 1, 1, S, dtype=torch.bool)
    mask[..., S - S // 8:] = False  # the static cache's unfilled tail
    return q, caches, mask


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("S", POSITIONS)
@pytest.mark.parametrize("model", list(MODELS))
def test_decode_attention(benchmark, model, S, threads):
    heads, kv_heads, head_dim = MODELS[model]
    q, caches, mask = _layers(heads, kv_heads, head_dim, S)
    scale = head_dim ** -0.5
    impls = {
        "sdpa": lambda k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
        "glufx": lambda k, v: torch.ops.glufx.decode_attention(q, k, v, mask, scale),
    }
    k0, v0 = caches[0]
    torch.testing.assert_close(impls["glufx"](k0, v0), impls["sdpa"](k0, v0), rtol=0, atol=1e-5)
    times = {name: [] for name in impls}

    def one_round():
        for name, fn in impls.items():
            t0 = time.perf_counter()
            for k, v in caches:
                fn(k, v)
            times[name].append((time.perf_counter() - t0) / len(caches))

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            benchmark.group = f"decode attention {model} S={S} threads={threads}"
            benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1)
    finally:
        torch.set_num_threads(old)
    kv_bytes = 2 * kv_heads * S * head_dim * 4
    benchmark.extra_info.update(attention=dict(model=model, S=S, threads=threads, kv_bytes=kv_bytes, us={
        name: 1e6 * statistics.median(t[1:]) for name, t in times.items()}))


PREFILL = [("gemma3-270m", 512), ("gemma3-270m", 2048), ("llama3-8b", 512)]
WINDOW = 512  # Gemma 3's sliding window (Mistral's 4096 would cover these prompts whole)


@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("layer", ["causal", "sliding"])
@pytest.mark.parametrize("model,T", PREFILL)
def test_prefill_attention(benchmark, model, T, layer, threads):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from glufx.deploy.decode import glufx_sdpa

    heads, kv_heads, head_dim = MODELS[model]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, heads, head_dim, generator=g).transpose(1, 2)  # [B, H, T, D] as the projection's view
    k, v = (torch.randn(1, kv_heads, T, head_dim, generator=g) for _ in range(2))
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = None if layer == "causal" else ((j <= i) & (i - j < WINDOW))[None, None]
    scale = head_dim ** -0.5
    impls = {"sdpa": lambda: sdpa_attention_forward(module, q, k, v, mask, scaling=scale)[0],
             "glufx": lambda: glufx_sdpa(module, q, k, v, mask, scaling=scale)[0]}
    torch.testing.assert_close(impls["glufx"](), impls["sdpa"](), rtol=0, atol=1e-5)
    times = {name: [] for name in impls}

    def one_round():
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            benchmark.group = f"prefill attention {model} T={T} {layer} threads={threads}"
            benchmark.pedantic(one_round, rounds=5, warmup_rounds=1)
    finally:
        torch.set_num_threads(old)
    benchmark.extra_info.update(prefill_attention=dict(model=model, T=T, layer=layer, threads=threads, ms={
        name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}))
