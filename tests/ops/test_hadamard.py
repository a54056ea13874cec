"""Online rotation: glufx::hadamard and the rot_signs / rot_block arguments of int8_linear and int8_glu
(csrc/cpu/hadamard.cpp) against the reference, orthogonality, and the folded weight (glufx/rotate.py)."""
import math

import pytest
import torch

import glufx
from glufx.nn import Int8Linear
from glufx.ops import GRANULARITIES, cpu_kernel, reference
from glufx.rotate import fold, hadamard_block, random_signs

ops = torch.ops.glufx


def _dense_hadamard(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


# the rotation follows the CPU kernel variant: generic (scalar), avx2 (butterflies on ymm, blocks >= 8), vnni
# (AVX-512: blocks of 16..128 wholly in zmm registers); each must give the reference's bits
KERNELS = ["generic", "avx2", "vnni"]


@pytest.mark.parametrize("K,block", [(640, 128), (2048, 128), (64, 64), (96, 32), (48, 16), (24, 8), (12, 4), (6, 2),
                                     (40, 8), (512, 256)])
@pytest.mark.parametrize("with_signs", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_hadamard_matches_reference_and_dense_matrix(K, block, with_signs, kernel):
    x = torch.randn(3, 5, K, dtype=torch.float32) * 4
    signs = random_signs(K, 1) if with_signs else None
    with cpu_kernel(kernel):
        y = ops.hadamard(x, block, signs)
    assert torch.equal(y, reference.hadamard(x, block, signs))
    d = signs.double() if with_signs else torch.ones(K, dtype=torch.float64)
    dense = torch.block_diag(*[_dense_hadamard(block)] * (K // block))
    torch.testing.assert_close(y.double(), (x.double() * d) @ dense.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("granularity", sorted(GRANULARITIES.values()))
def test_rotated_int8_linear_and_glu_match_reference(granularity):
    K, N = 96, 40
    x = torch.randn(2, 7, K) * 2
    x[..., 5] *= 30  # a channel outlier on every token
    signs = random_signs(K, 0)
    wq, ws = ops.quantize_weight(torch.randn(N, K))
    wq2, ws2 = ops.quantize_weight(torch.randn(N, K))
    xs = torch.tensor([0.5]) if granularity == GRANULARITIES["static"] else None
    y = ops.int8_linear(x, wq, ws, None, xs, granularity, signs, 32)
    assert torch.equal(y, reference.int8_linear(x, wq, ws, None, xs, granularity, signs, 32))
    g = ops.int8_glu(x, wq, ws, wq2, ws2, "silu", xs, granularity, signs, 32)
    assert torch.equal(g, reference.int8_glu(x, wq, ws, wq2, ws2, "silu", xs, granularity, signs, 32))


@pytest.mark.parametrize("granularity", ["per_token", "static"])
@pytest.mark.parametrize("block,dtype", [(4, torch.float32), (64, torch.float32), (64, torch.bfloat16),
                                         (128, torch.float32)])
@pytest.mark.parametrize("kernel", KERNELS)
def test_fused_rotation_is_bit_equal_to_rotating_first(granularity, block, dtype, kernel):
    # per-token and static linears rotate each row inside the quantization loop (one pass); the result must be
    # the bits of rotating the whole input first, then quantizing it unrotated
    g = GRANULARITIES[granularity]
    K, N = 256, 48
    x = (torch.randn(3, 9, K) * 3).to(dtype)
    x[..., 17] *= 40
    signs = random_signs(K, 3)
    wq, ws = ops.quantize_weight(torch.randn(N, K))
    xs = torch.tensor([0.2]) if granularity == "static" else None
    with cpu_kernel(kernel):
        _fused_vs_rotating_first(x, wq, ws, xs, g, signs, block, dtype)
    fused = ops.int8_linear(x, wq, ws, None, xs, g, signs, block)
    assert torch.equal(fused, reference.int8_linear(x, wq, ws, None, xs, g, signs, block))


def _fused_vs_rotating_first(x, wq, ws, xs, g, signs, block, dtype):
    fused = ops.int8_linear(x, wq, ws, None, xs, g, signs, block)
    rotated_first = ops.int8_linear(ops.hadamard(x.float(), block, signs), wq, ws, None, xs, g).to(dtype)
    assert torch.equal(fused, rotated_first)
    # the GLU's activation and product run in x's dtype, so compare in float32 where rounding the rotated
    # input to bf16 cannot enter
    if dtype == torch.float32:
        glu = ops.int8_glu(x, wq, ws, wq, ws, "gelu_tanh", xs, g, signs, block)
        glu_first = ops.int8_glu(ops.hadamard(x, block, signs), wq, ws, wq, ws, "gelu_tanh", xs, g)
        assert torch.equal(glu, glu_first)


@pytest.mark.parametrize("granularity,shape", [("per_sequence", (4, 1, 256)), ("per_tensor", (1, 256)),
                                               ("per_sequence", (1, 256))])
@pytest.mark.parametrize("block", [0, 128])
def test_one_row_groups_take_the_per_token_path_with_the_same_bits(granularity, shape, block):
    # a decode step quantizes one row per sequence: its per-sequence scale is the row's own, so the op runs the
    # per-token loop (rotation fused); the result must be the reference's bits for the plan's granularity
    g = GRANULARITIES[granularity]
    x = torch.randn(*shape) * 3
    x[..., 17] *= 40
    signs = random_signs(256, 5) if block else None
    wq, ws = ops.quantize_weight(torch.randn(48, 256))
    for kernel in KERNELS:
        with cpu_kernel(kernel):
            out = ops.int8_linear(x, wq, ws, None, None, g, signs, block)
            assert torch.equal(out, reference.int8_linear(x, wq, ws, None, None, g, signs, block))
            assert torch.equal(out, ops.int8_linear(x, wq, ws, None, None, GRANULARITIES["per_token"], signs, block))
            glu = ops.int8_glu(x, wq, ws, wq, ws, "silu", None, g, signs, block)
            assert torch.equal(glu, reference.int8_glu(x, wq, ws, wq, ws, "silu", None, g, signs, block))


def test_fused_rotation_names_a_nan_row():
    K = 64
    x = torch.randn(5, K)
    x[3, 10] = float("nan")
    wq, ws = ops.quantize_weight(torch.randn(16, K))
    with pytest.raises(RuntimeError, match="NaN or Inf at row 3"):
        ops.int8_linear(x, wq, ws, None, None, GRANULARITIES["per_token"], random_signs(K, 0), 32)


def test_opcheck_rotated_ops():
    K = 48
    signs = random_signs(K, 0)
    wq, ws = ops.quantize_weight(torch.randn(24, K))
    torch.library.opcheck(ops.hadamard, (torch.randn(3, K), 16, signs))
    torch.library.opcheck(ops.int8_linear, (torch.randn(2, 5, K), wq, ws, None, None, 1, signs, 16))
    torch.library.opcheck(ops.int8_glu, (torch.randn(2, 5, K), wq, ws, wq, ws, "gelu_tanh", None, 1, signs, 16))


def test_bad_rotation_is_named():
    x, (wq, ws) = torch.randn(2, 24), ops.quantize_weight(torch.randn(8, 24))
    with pytest.raises(RuntimeError, match="power of two dividing"):
        ops.int8_linear(x, wq, ws, None, None, 1, None, 16)
    with pytest.raises(RuntimeError, match="one value per input feature"):
        ops.int8_linear(x, wq, ws, None, None, 1, torch.ones(12), 8)
    with pytest.raises(RuntimeError, match="without a rotation block"):
        ops.int8_linear(x, wq, ws, None, None, 1, torch.ones(24), 0)


def test_block_choice():
    assert [hadamard_block(k) for k in (640, 2048, 1152, 11008, 96, 7, 6)] == [128, 128, 128, 128, 32, 0, 2]
    assert hadamard_block(2048, max_block=2048) == 2048


def test_folded_weight_gives_the_float_linear_and_beats_plain_rounding_on_outliers():
    torch.manual_seed(0)
    K, N = 256, 64
    lin = torch.nn.Linear(K, N)
    x = torch.randn(64, K)
    x[:, [3, 77, 200]] *= 50  # channel outliers on every token, as GLU models have
    signs = random_signs(K, 0)
    # the fold is exact in float: (W D H)(H D x) = W x
    torch.testing.assert_close(fold(lin.weight, 128, signs) @ ops.hadamard(x, 128, signs).T, lin.weight @ x.T,
                               rtol=1e-4, atol=1e-3)
    ref = lin(x).detach()
    plain = Int8Linear.from_float(lin.weight, lin.bias, "per_token")
    rotated = Int8Linear.from_float(lin.weight, lin.bias, "per_token", rotation=(128, signs))
    torch.testing.assert_close(rotated.dequantized_weight(), lin.weight.detach(), rtol=0, atol=0.02)

    def sqnr(y):
        return float(10 * torch.log10(ref.square().sum() / (y - ref).square().sum()))

    assert sqnr(rotated(x)) > sqnr(plain(x)) + 10, (sqnr(rotated(x)), sqnr(plain(x)))
