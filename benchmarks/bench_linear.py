"""INT8 linear vs FP32 and every INT8 path PyTorch offers here, same process, same inputs.

    python -m pytest benchmarks/bench_linear.py -q            # the full grid, then a ratio table
    python -m pytest benchmarks/bench_linear.py -q -k "2048x640"

glufx runs with per-token dynamic activations (the finest granularity its plans use; per-sequence
and static skip the per-row reduction and are at least as fast).
"""
import pytest
import torch
from threadpoolctl import threadpool_limits

import glufx  # noqa: F401
from glufx.ops import PER_TOKEN

SHAPES = [(640, 2048), (2048, 640), (896, 4864), (4864, 896), (4096, 11008), (11008, 4096)]
MS = [1, 16, 128, 512]
THREADS = [1, 2]
IMPLS = ["fp32_linear", "fp32_numpy", "fbgemm_dynamic", "torchao_int8", "glufx"]


def _make(impl: str, w: torch.Tensor):
    N, K = w.shape
    if impl == "fp32_linear":
        return lambda x: torch.nn.functional.linear(x, w)
    if impl == "fp32_numpy":
        wt = w.numpy().T.copy()
        return lambda x: x.numpy() @ wt
    if impl == "fbgemm_dynamic":
        lin = torch.nn.Linear(K, N, bias=False)
        lin.weight.data.copy_(w)
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        return q
    if impl == "torchao_int8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        lin = torch.nn.Linear(K, N, bias=False)
        lin.weight.data.copy_(w)
        quantize_(lin, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        return lin
    w_q, w_s = torch.ops.glufx.quantize_weight(w)
    packed = torch.ops.glufx.pack_weight(w_q)
    return lambda x: torch.ops.glufx.int8_linear_packed(x, packed, w_s, None, None, PER_TOKEN)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", [f"{k}x{n}" for k, n in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear(benchmark, impl, shape, M, threads):
    K, N = map(int, shape.split("x"))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    x = torch.randn(M, K, generator=g)
    fn = _make(impl, w)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads), torch.no_grad():
            benchmark.group = f"{shape} M={M} threads={threads}"
            benchmark.extra_info.update(impl=impl)
            benchmark.pedantic(fn, args=(x,), rounds=5, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(old)
