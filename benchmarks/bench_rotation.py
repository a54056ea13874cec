"""What the online Hadamard rotation costs the INT8 linear at decode sizes, in one process.

    python -m pytest benchmarks/bench_rotation.py -q        # a table of rotation costs at the end

Three variants per shape, timed back to back: `plain` (glufx's per-token linear), `fused` (the same op with
rot_signs / rot_block: each row rotated in an L1 buffer inside the quantization loop), `separate` (the
rotation as its own op, glufx::hadamard, before the plain linear: the unfused form). Shapes: Gemma 3 270M's
linears (K x N) and a 7B MLP's; the weight carries the folded rotation, as glufx/lower.py builds it.

At 15-30 us a call, this VM's drift over the seconds between two tests is as large as the effect, so each
rotated variant is also timed *paired* with the plain linear: rounds alternate a batch of plain calls and a
batch of rotated calls, and the cost is the median of the per-round ratios (`paired` in the table), which
drift cancels out of.
"""
import os
import statistics
import time

import pytest
import torch

import glufx  # noqa: F401
from glufx.ops import PER_TOKEN
from glufx.rotate import fold, hadamard_block, random_signs

SHAPES = [(640, 2048), (2048, 640), (1024, 640), (640, 1024), (4096, 11008)]
if os.environ.get("GLUFX_BENCH_SHAPES"):
    SHAPES = [tuple(map(int, s.split("x"))) for s in os.environ["GLUFX_BENCH_SHAPES"].split(",")]
MS = [1, 16, 512]
VARIANTS = ["plain", "fused", "separate"]
CASES = [(f"{k}x{n}", m, t, v) for k, n in SHAPES for m in MS for t in (1, 2) for v in VARIANTS]


def _fn(variant, K, N):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    block, signs = hadamard_block(K), random_signs(K, 0)
    ops = torch.ops.glufx
    if variant == "plain":
        w_q, w_s = ops.quantize_weight(w)
        return lambda x: ops.int8_linear(x, w_q, w_s, None, None, PER_TOKEN)
    w_q, w_s = ops.quantize_weight(fold(w, block, signs))
    if variant == "fused":
        return lambda x: ops.int8_linear(x, w_q, w_s, None, None, PER_TOKEN, signs, block)
    return lambda x: ops.int8_linear(ops.hadamard(x, block, signs), w_q, w_s, None, None, PER_TOKEN)


def _paired_cost(fn, plain, x, calls, rounds=21):
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            plain(x)
        t1 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        ratios.append((time.perf_counter() - t1) / (t1 - t0))
    return statistics.median(ratios) - 1


@pytest.mark.parametrize("shape,M,threads,variant", CASES, ids=[f"{s}-M{m}-t{t}-{v}" for s, m, t, v in CASES])
def test_rotation(benchmark, shape, M, threads, variant):
    K, N = map(int, shape.split("x"))
    fn = _fn(variant, K, N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            benchmark.group = f"rotation {shape} M={M} threads={threads}"
            benchmark.extra_info.update(variant=variant)
            iterations = {1: 500, 16: 50}.get(M, 2)
            benchmark.pedantic(fn, args=(x,), rounds=15 if M <= 16 else 5, iterations=iterations, warmup_rounds=2)
            if variant != "plain":
                plain = _fn("plain", K, N)
                benchmark.extra_info["paired_cost"] = _paired_cost(fn, plain, x, iterations, 21 if M <= 16 else 7)
    finally:
        torch.set_num_threads(old)
