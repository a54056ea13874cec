"""A decode step's attention: glufx::decode_attention against ATen's scaled_dot_product_attention, in one process.

    python -m pytest benchmarks/bench_attention.py -q        # a table at the end

One query token over a KV cache of S positions, its query heads packed onto their key-value heads (as
glufx.compile_decode runs attention: `packed_gqa_sdpa`), float32, a boolean mask over the cache as transformers'
static cache passes it. Both take the same packed inputs; SDPA is the call PyTorch recommends, which picks its CPU
flash kernel here. Each round calls every layer's cache once, and there are enough layers for the caches to total
256 MiB: as in a decode step, where the weights streamed between two attention calls evict the cache from L3,
every call reads its keys and values from memory. Both implementations run in each round (this VM's bandwidth
drifts between minutes); medians per layer.
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
