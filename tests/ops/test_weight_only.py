"""glufx::int8_weight_linear (weight-only INT8, floating-point activations): opcheck, agreement with the
reference under every kernel variant, thread-count independence, named errors."""
import pytest
import torch

import glufx  # noqa: F401  (registers torch.ops.glufx)
from glufx.ops import NATIVE, cpu_kernel, reference

ops = torch.ops.glufx
KERNELS = ["generic", "avx2", "vnni"]  # a variant the CPU lacks falls back to the best it has


def _layer(N, K, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_q, w_s = ops.quantize_weight(torch.randn(N, K, generator=g))
    return w_q, w_s, torch.randn(N, generator=g) if bias else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_opcheck(dtype, rows):
    w_q, w_s, b = _layer(24, 40)
    torch.library.opcheck(ops.int8_weight_linear, (torch.randn(2, rows, 40).to(dtype), w_q, w_s, b.to(dtype)))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("M", [0, 1, 2, 3, 4, 5, 33])  # <= 4 rows: the weight-streaming loop; more: dequantize + GEMM
@pytest.mark.parametrize("N,K,bias", [(1, 16, True), (7, 100, False), (64, 640, True), (130, 2048, False)])
def test_equals_the_reference(kernel, M, N, K, bias):
    """The same sum as F.linear on the dequantized weight, in another float order: within a few ulps of the
    output's scale (K tails of 100 and 1 of each AVX-512 / AVX2 step included)."""
    w_q, w_s, b = _layer(N, K, bias)
    x = torch.randn(M, K)
    ref = reference.int8_weight_linear(x, w_q, w_s, b)
    with cpu_kernel(kernel):
        out = ops.int8_weight_linear(x, w_q, w_s, b)
    assert out.shape == (M, N) and out.dtype == torch.float32
    scale = float(ref.abs().max()) if M else 1.0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * scale)


def test_batched_bfloat16_input_keeps_its_shape_and_dtype():
    w_q, w_s, b = _layer(48, 64)
    x = torch.randn(2, 2, 64).to(torch.bfloat16)
    out = ops.int8_weight_linear(x, w_q, w_s, b.to(torch.bfloat16))
    assert out.shape == (2, 2, 48) and out.dtype == torch.bfloat16
    ref = reference.int8_weight_linear(x, w_q, w_s, b.to(torch.bfloat16))
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.skipif(not NATIVE, reason="the reference library has one thread's arithmetic by construction")
def test_result_does_not_depend_on_threads():
    """Each output channel is summed by one thread in one fixed order: 1 and 2 threads give the same bits."""
    w_q, w_s, b = _layer(4096, 640)
    x = torch.randn(1, 640)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.int8_weight_linear(x, w_q, w_s, b)
        torch.set_num_threads(2)
        two = ops.int8_weight_linear(x, w_q, w_s, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_errors_name_the_problem():
    w_q, w_s, b = _layer(8, 16)
    with pytest.raises(RuntimeError, match="features"):
        ops.int8_weight_linear(torch.randn(2, 15), w_q, w_s, b)
    with pytest.raises(RuntimeError, match="int8"):
        ops.int8_weight_linear(torch.randn(2, 16), w_q.int(), w_s, b)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.int8_weight_linear(torch.randn(2, 16).double(), w_q, w_s, b)
