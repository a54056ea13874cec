"""glufx::prefill_attention (a prompt's attention, only the keys a block of queries can attend): opcheck,
agreement with the reference and with F.scaled_dot_product_attention under every kernel variant (causal, bool,
additive, sliding-window, padding and per-head masks, grouped-query heads), rows with nothing to attend,
thread-count independence, named errors."""
import pytest
import torch
import torch.nn.functional as F

import glufx  # noqa: F401  (registers torch.ops.glufx)
from glufx.ops import NATIVE, cpu_kernel, reference

ops = torch.ops.glufx
KERNELS = ["generic", "avx2", "vnni"]  # a variant the CPU lacks falls back to the best it has


def _qkv(B, H, H_kv, T, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)  # [B, H, T, D] as attention blocks view it
    return q, torch.randn(B, H_kv, S, D, generator=g) * 2, torch.randn(B, H_kv, S, D, generator=g)


def _mask(kind, B, H, T, S, seed=1):
    """-> (mask, is_causal). Queries are the last T of S positions (a prompt after cached ones)."""
    g = torch.Generator().manual_seed(seed)
    i, j = torch.arange(S - T, S)[:, None], torch.arange(S)[None, :]
    causal = j <= i  # [T, S]
    if kind == "causal":
        return None, True
    if kind == "none":
        return None, False
    if kind == "bool":
        return causal[None, None], False
    if kind == "additive":
        return torch.zeros(T, S).masked_fill(~causal, float("-inf")), False
    if kind == "additive_finite":  # a float bias everywhere: no key can be skipped
        return torch.randn(1, H, T, S, generator=g) * 3, False
    if kind == "sliding":
        return (causal & (i - j < 33))[None, None].expand(B, 1, T, S), False
    if kind == "padded":  # batch row 0 has 5 padding positions first; every query keeps a live key
        live = torch.ones(B, S, dtype=torch.bool)
        live[0, :5] = False
        return (causal | (j == S - 1))[None, None] & live[:, None, None, :] | (j == S - 1), False
    if kind == "per_head":
        m = torch.rand(B, H, T, S, generator=g) > 0.5
        m[..., -1] = True
        return m, False
    raise ValueError(kind)


MASKS = ["causal", "none", "bool", "additive", "additive_finite", "sliding", "padded", "per_head"]


@pytest.mark.parametrize("mask_kind", MASKS)
def test_opcheck(mask_kind):
    q, k, v = _qkv(2, 4, 2, 9, 9, 16)
    mask, causal = _mask(mask_kind, 2, 4, 9, 9)
    torch.library.opcheck(ops.prefill_attention, (q, k, v, mask, causal, 0.2))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("B,H,H_kv,T,S,D", [(1, 4, 1, 200, 200, 256), (2, 6, 2, 70, 70, 17), (1, 3, 3, 130, 130, 48),
                                            (1, 8, 2, 65, 100, 32)])
def test_equals_sdpa(kernel, mask_kind, B, H, H_kv, T, S, D):
    """SDPA's arithmetic with the masked keys left out (a polynomial exp, dot products summed in another order):
    within 1e-5 of outputs of order 1. Several query blocks, blocks cut short, head sizes that are not multiples
    of 16 or 8, queries after cached keys (T < S), multi-head and grouped-query heads."""
    if mask_kind == "causal" and T != S:
        pytest.skip("is_causal is SDPA's top-left causal mask: for a prompt without cached keys")
    q, k, v = _qkv(B, H, H_kv, T, S, D)
    mask, causal = _mask(mask_kind, B, H, T, S)
    with cpu_kernel(kernel):
        out = ops.prefill_attention(q, k, v, mask, causal, D ** -0.5)
    G = H // H_kv
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask,
                                         is_causal=causal, scale=D ** -0.5).transpose(1, 2)
    assert out.shape == (B, T, H, D) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference.prefill_attention(q, k, v, mask, causal, D ** -0.5), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_row_with_nothing_to_attend_is_zeros(kernel):
    """Query rows whose keys are all masked get zeros (SDPA gives NaN), as do whole blocks of them; masked keys
    inside a live row weigh exactly zero (values of 1e30 behind the mask must not show)."""
    q, k, v = _qkv(1, 2, 1, 150, 150, 32)
    keep = torch.ones(1, 1, 150, 150, dtype=torch.bool).tril()
    keep[..., :70, :] = False  # the first block and some of the second: nothing to attend
    keep[..., 100, :] = False
    keep[..., 120:, :60] = False
    v[..., :60, :] = 1e30
    keep[..., 70:120, :60] = False
    with cpu_kernel(kernel):
        out = ops.prefill_attention(q, k, v, keep, False, 0.1)
    assert torch.equal(out[0, :70], torch.zeros(70, 2, 32)) and torch.equal(out[0, 100], torch.zeros(2, 32))
    rows = [r for r in range(70, 150) if r != 100]
    ref = F.scaled_dot_product_attention(q[:, :, rows], k[:, :, 60:].expand(1, 2, 90, 32),
                                         v[:, :, 60:].expand(1, 2, 90, 32), attn_mask=keep[..., rows, 60:],
                                         scale=0.1).transpose(1, 2)
    torch.testing.assert_close(out[:, rows], ref, rtol=0, atol=2e-6)
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not NATIVE, reason="the native library is not built")
@pytest.mark.parametrize("mask_kind", ["causal", "sliding"])
def test_result_does_not_depend_on_threads(mask_kind):
    q, k, v = _qkv(1, 4, 2, 300, 300, 64)
    mask, causal = _mask(mask_kind, 1, 4, 300, 300)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.prefill_attention(q, k, v, mask, causal, 0.125)
        torch.set_num_threads(2)
        two = ops.prefill_attention(q, k, v, mask, causal, 0.125)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_strided_inputs_equal_contiguous():
    """Keys and values viewed with strides (a slice of a larger cache) and a non-contiguous mask read the same."""
    q, k, v = _qkv(1, 2, 2, 40, 90, 32)
    big_k, big_v = torch.zeros(1, 2, 200, 64), torch.zeros(1, 2, 200, 64)
    big_k[:, :, 10:100, 16:48], big_v[:, :, 10:100, 16:48] = k, v
    mask, _ = _mask("sliding", 1, 2, 40, 90)
    strided_mask = mask.transpose(-1, -2).contiguous().transpose(-1, -2)
    strided = ops.prefill_attention(q, big_k[:, :, 10:100, 16:48], big_v[:, :, 10:100, 16:48], strided_mask, False,
                                    0.2)
    torch.testing.assert_close(strided, ops.prefill_attention(q, k, v, mask, False, 0.2), rtol=0, atol=1e-6)


@pytest.mark.skipif(not NATIVE, reason="the reference library does not check shapes")
@pytest.mark.parametrize("args,match", [
    (lambda q, k, v: (q.double(), k, v, None, True, 1.0), "float32"),
    (lambda q, k, v: (q, k[:, :, :, :8], v, None, True, 1.0), "do not agree"),
    (lambda q, k, v: (q[:, :3], k, v, None, True, 1.0), "multiple of key-value heads"),
    (lambda q, k, v: (q, k, v, torch.ones(1, 1, 5, 5, dtype=torch.bool), True, 1.0), "not both"),
    (lambda q, k, v: (q, k, v, torch.zeros(1, 1, 5, 5, dtype=torch.int64), False, 1.0), "bool .* or float32"),
])
def test_errors_name_the_problem(args, match):
    q, k, v = _qkv(1, 4, 2, 5, 5, 16)
    with pytest.raises(RuntimeError, match=match):
        ops.prefill_attention(*args(q, k, v))
