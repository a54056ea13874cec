"""INT8 linear vs FP32 and every INT8 path PyTorch offers here, same process, same inputs.

    python -m pytest benchmarks/bench_linear.py -q            # the full grid, then a ratio table
    python -m pytest benchmarks/bench_linear.py -q -k "2048x640"

glufx runs with per-token dynamic activations (the finest granularity its plans use; per-sequence
and static skip the per-row reduction and are at least as fast). Baselines, each run the way its
authors recommend: FP32 F.linear and numpy/OpenBLAS; fbgemm's dynamic quantized Linear; torchao's
Int8DynamicActivationInt8WeightConfig under torch.compile; PT2E with X86InductorQuantizer (static
W8A8) compiled with Inductor freezing (oneDNN). `glufx_rotated` is glufx with the online Hadamard
rotation its per-token recipe uses (glufx/rotate.py), to measure what the rotation costs. `-k "not pt2e and not torchao"` skips the compiled
baselines (each compiles once per case).
"""
import os

import pytest
import torch
from threadpoolctl import threadpool_limits

import glufx  # noqa: F401
from glufx.ops import PER_TOKEN

SHAPES = [(640, 2048), (2048, 640), (896, 4864), (4864, 896), (4096, 11008), (11008, 4096)]
MS = [1, 16, 128, 512]
THREADS = [1, 2]
# A smaller grid for a quick table: GLUFX_BENCH_SHAPES="2048x640,4096x11008" GLUFX_BENCH_MS="1,128"
if os.environ.get("GLUFX_BENCH_SHAPES"):
    SHAPES = [tuple(map(int, s.split("x"))) for s in os.environ["GLUFX_BENCH_SHAPES"].split(",")]
if os.environ.get("GLUFX_BENCH_MS"):
    MS = [int(m) for m in os.environ["GLUFX_BENCH_MS"].split(",")]
IMPLS = ["fp32_linear", "fp32_numpy", "fbgemm_dynamic", "torchao_int8", "pt2e_x86", "glufx", "glufx_rotated"]


def _torchao_compiled(lin: torch.nn.Linear):
    """torchao as its README recommends: quantize_ (which sets its Inductor options), then torch.compile."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(lin, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(lin)


def _pt2e_x86(lin: torch.nn.Linear, x: torch.Tensor):
    """PyTorch's static INT8 CPU path as documented: torch.export, X86InductorQuantizer (static per-tensor
    activations, per-channel weights), calibrate, convert, then torch.compile with Inductor freezing
    (oneDNN kernels)."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:  # older torch kept PT2E under torch.ao
        from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torch.ao.quantization.quantizer import x86_inductor_quantizer as xiq

    m = torch.export.export(torch.nn.Sequential(lin).eval(), (x,)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    m = prepare_pt2e(m, quantizer)
    m(x)
    m = convert_pt2e(m)
    with torch._inductor.config.patch(freezing=True):
        compiled = torch.compile(m)
        compiled(x)  # compile under freezing
    return compiled


def _linear(w: torch.Tensor) -> torch.nn.Linear:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


def _make(impl: str, w: torch.Tensor, x: torch.Tensor):
    if impl == "fp32_linear":
        return lambda x: torch.nn.functional.linear(x, w)
    if impl == "fp32_numpy":
        wt = w.numpy().T.copy()
        return lambda x: x.numpy() @ wt
    if impl == "fbgemm_dynamic":
        return torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(_linear(w)), {torch.nn.Linear},
                                                      dtype=torch.qint8)
    if impl == "torchao_int8":
        return _torchao_compiled(_linear(w))
    if impl == "pt2e_x86":
        return _pt2e_x86(_linear(w), x)
    # what an Int8Linear runs: canonical INT8 weight, packed once on first use (prepared form)
    if impl == "glufx_rotated":  # + the online block-Hadamard rotation (with signs) fused before quantization
        from glufx.rotate import fold, hadamard_block, random_signs

        block, signs = hadamard_block(w.shape[1]), random_signs(w.shape[1], 0)
        w_q, w_s = torch.ops.glufx.quantize_weight(fold(w, block, signs))
        return lambda x: torch.ops.glufx.int8_linear(x, w_q, w_s, None, None, PER_TOKEN, signs, block)
    w_q, w_s = torch.ops.glufx.quantize_weight(w)
    return lambda x: torch.ops.glufx.int8_linear(x, w_q, w_s, None, None, PER_TOKEN)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("shape", [f"{k}x{n}" for k, n in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear(benchmark, impl, shape, M, threads):
    K, N = map(int, shape.split("x"))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    x = torch.randn(M, K, generator=g)
    with torch.no_grad():
        fn = _make(impl, w, x)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads), torch.no_grad():
            benchmark.group = f"{shape} M={M} threads={threads}"
            benchmark.extra_info.update(impl=impl)
            # a call at M = 1 takes microseconds: time many per round, or the timer's own cost and
            # scheduling noise decide the ratio (the rotation's cost at M = 1 read +50 % or -27 % at 1 call)
            iterations = {1: 200, 16: 20}.get(M, 1)
            benchmark.pedantic(fn, args=(x,), rounds=7 if M <= 16 else 5, iterations=iterations, warmup_rounds=1)
    finally:
        torch.set_num_threads(old)
