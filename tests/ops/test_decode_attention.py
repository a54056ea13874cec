"""glufx::decode_attention (a decode step's attention over a KV cache): opcheck, agreement with the reference
and with F.scaled_dot_product_attention under every kernel variant, masks (bool, additive, broadcast, fully
masked rows and chunks), thread-count independence, named errors."""
import pytest
import torch
import torch.nn.functional as F

import glufx  # noqa: F401  (registers torch.ops.glufx)
from glufx.ops import NATIVE, cpu_kernel, reference

ops = torch.ops.glufx
KERNELS = ["generic", "avx2", "vnni"]  # a variant the CPU lacks falls back to the best it has


def _qkv(B, G, R, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, G, R, D, generator=g), torch.randn(B, G, S, D, generator=g) * 2,
            torch.randn(B, G, S, D, generator=g))


def _masks(B, G, R, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, 1, 1, S, generator=g) > 0.3
    keep[..., 0] = True
    return {"none": None, "bool": keep, "bool_per_row": torch.rand(B, G, R, S, generator=g) > 0.5,
            "additive": torch.randn(1, G, R, S, generator=g) * 3,
            "additive_inf": torch.where(keep, 0.0, float("-inf")).expand(B, 1, 1, S)}


@pytest.mark.parametrize("mask_kind", ["none", "bool", "bool_per_row", "additive", "additive_inf"])
def test_opcheck(mask_kind):
    q, k, v = _qkv(2, 2, 3, 40, 24)
    torch.library.opcheck(ops.decode_attention, (q, k, v, _masks(2, 2, 3, 40)[mask_kind], 0.2))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "bool_per_row", "additive", "additive_inf"])
@pytest.mark.parametrize("B,G,R,S,D", [(1, 1, 4, 546, 256), (2, 3, 2, 130, 100), (1, 2, 1, 7, 64),
                                       (1, 1, 16, 300, 17), (1, 1, 5, 128, 48)])
def test_equals_sdpa(kernel, mask_kind, B, G, R, S, D):
    """SDPA's arithmetic in another order (chunks of 128 positions merged, a polynomial exp, 256-term dot
    products summed in another order): within 1e-5 of outputs of order 1. Head sizes that are not multiples of 16 or 8 and several chunks (546 positions) included."""
    q, k, v = _qkv(B, G, R, S, D)
    mask = _masks(B, G, R, S)[mask_kind]
    if mask_kind == "bool_per_row":
        mask[..., 0] = True  # SDPA gives NaN for a row with nothing to attend; the convention is tested apart
    with cpu_kernel(kernel):
        out = ops.decode_attention(q, k, v, mask, D ** -0.5)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5)
    assert out.shape == (B, G, R, D) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference.decode_attention(q, k, v, mask, D ** -0.5), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_with_nothing_to_attend_is_zeros(kernel):
    """Rows whose positions are all masked get zeros (SDPA gives NaN), and a chunk of 128 masked positions
    inside a live row adds nothing (its exponentials are exact zeros, not exp(-87))."""
    q, k, v = _qkv(1, 1, 3, 300, 32)
    keep = torch.ones(1, 1, 3, 300, dtype=torch.bool)
    keep[0, 0, 1] = False  # row 1: nothing
    keep[0, 0, 2, :256] = False  # row 2: only the last chunk
    v[..., :256, :] = 1e30  # would show through any weight that is not exactly zero
    with cpu_kernel(kernel):
        out = ops.decode_attention(q, k, v, keep, 0.1)
    assert torch.equal(out[0, 0, 1], torch.zeros(32))
    ref = F.scaled_dot_product_attention(q[:, :, 2:], k[:, :, 256:], v[:, :, 256:], scale=0.1)
    torch.testing.assert_close(out[:, :, 2:], ref, rtol=0, atol=2e-6)
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not NATIVE, reason="the native library is not built")
def test_result_does_not_depend_on_threads():
    q, k, v = _qkv(1, 2, 4, 1000, 64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.decode_attention(q, k, v, None, 0.125)
        torch.set_num_threads(2)
        two = ops.decode_attention(q, k, v, None, 0.125)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_strided_cache_equals_contiguous():
    """A cache viewed with strides (a slice of a larger buffer) reads the same values."""
    q, k, v = _qkv(1, 2, 2, 90, 32)
    big_k, big_v = torch.zeros(1, 2, 200, 64), torch.zeros(1, 2, 200, 64)
    big_k[:, :, 10:100, 16:48], big_v[:, :, 10:100, 16:48] = k, v
    strided = ops.decode_attention(q, big_k[:, :, 10:100, 16:48], big_v[:, :, 10:100, 16:48], None, 0.2)
    assert torch.equal(strided, ops.decode_attention(q, k, v, None, 0.2))


@pytest.mark.skipif(not NATIVE, reason="the reference library does not check shapes")
@pytest.mark.parametrize("args,match", [
    (lambda q, k, v: (q.double(), k, v, None, 1.0), "float32"),
    (lambda q, k, v: (q, k[:, :, :, :8], v, None, 1.0), "do not agree"),
    (lambda q, k, v: (torch.randn(1, 1, 17, 16), torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16), None, 1.0),
     "at most 16"),
    (lambda q, k, v: (q, k, v, torch.zeros(1, 1, 1, 5, dtype=torch.int64), 1.0), "bool .* or float32"),
])
def test_errors_name_the_problem(args, match):
    q, k, v = _qkv(1, 1, 2, 5, 16)
    with pytest.raises(RuntimeError, match=match):
        ops.decode_attention(*args(q, k, v))
