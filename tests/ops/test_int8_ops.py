"""glufx ops: opcheck, exact agreement with the reference (glufx/ops/reference.py), fuzzing."""
import gc
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import glufx  # noqa: F401  (registers torch.ops.glufx)
from glufx.ops import cpu_kernel, prepared_weights
from glufx.ops import GRANULARITIES, NATIVE, PER_SEQUENCE, PER_TENSOR, PER_TOKEN, STATIC, reference
from glufx.ops.schema import SCHEMAS

ops = torch.ops.glufx


def _weights(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, generator=g), torch.randn(N, generator=g)


def test_native_library_is_loaded():
    assert NATIVE, "glufx._C did not build or load; the C++ kernels are not under test"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_native_schema_matches_python_mirror(name):
    native = str(getattr(ops, name).default._schema)
    assert native == "glufx::" + SCHEMAS[name]


@pytest.mark.parametrize("granularity", sorted(GRANULARITIES.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_int8_linear(granularity, dtype):
    w, b = _weights(24, 40)
    w_q, w_s = ops.quantize_weight(w)
    x = torch.randn(2, 5, 40).to(dtype)
    xs = torch.tensor([0.02]) if granularity == STATIC else None
    torch.library.opcheck(ops.int8_linear, (x, w_q, w_s, b.to(dtype), xs, granularity))


def test_opcheck_other_ops():
    w, _ = _weights(8, 16)
    torch.library.opcheck(ops.quantize_weight, (w,))
    torch.library.opcheck(ops.quantize_activation, (torch.randn(3, 4, 16), PER_TOKEN, None))
    torch.library.opcheck(ops.quantize_activation, (torch.randn(3, 16), STATIC, torch.tensor([0.1])))
    a = torch.randint(-127, 128, (5, 33), dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 33), dtype=torch.int8)
    torch.library.opcheck(ops.int8_mm, (a, b))


def test_weight_quantization_formula():
    w, _ = _weights(16, 64)
    q, s = ops.quantize_weight(w)
    assert torch.allclose(s, w.abs().amax(1) / 127)
    assert torch.equal(q, torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8))
    assert q.abs().max() == 127


def test_int8_mm_exact_at_extremes():
    # -127 * -127 summed over a long K: the largest accumulation a clamped INT8 GEMM can produce
    a = torch.full((3, 4099), -127, dtype=torch.int8)
    b = torch.full((5, 4099), -127, dtype=torch.int8)
    assert torch.equal(ops.int8_mm(a, b), torch.full((3, 5), 127 * 127 * 4099, dtype=torch.int32))


def test_static_scale_clamps_instead_of_wrapping():
    # The reference code casts without a clamp; 300 / 1.0 must saturate at 127, not wrap to 44.
    q, _ = ops.quantize_activation(torch.tensor([[300.0, -300.0, 1.4]]), STATIC, torch.tensor([1.0]))
    assert q.tolist() == [[127, -127, 1]]


def test_per_sequence_scales_ignore_batch_mates():
    w, b = _weights(16, 32)
    w_q, w_s = ops.quantize_weight(w)
    x = torch.randn(2, 6, 32)
    y_alone = ops.int8_linear(x[:1], w_q, w_s, b, None, PER_SEQUENCE)
    x_spiky = x.clone()
    x_spiky[1, 0, 0] = 1e4
    assert torch.equal(ops.int8_linear(x_spiky, w_q, w_s, b, None, PER_SEQUENCE)[:1], y_alone)
    assert not torch.equal(ops.int8_linear(x_spiky, w_q, w_s, b, None, PER_TENSOR)[:1], y_alone)


def test_nan_input_is_an_error():
    w_q, w_s = ops.quantize_weight(torch.randn(4, 8))
    x = torch.randn(2, 8)
    x[1, 3] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        ops.int8_linear(x, w_q, w_s, None, None, PER_TOKEN)


def test_unsupported_dtype_names_the_fix():
    w_q, w_s = ops.quantize_weight(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        ops.int8_linear(torch.randn(2, 8, dtype=torch.float64), w_q, w_s, None, None, PER_TOKEN)


def test_close_to_float_linear():
    w, b = _weights(256, 512)
    w_q, w_s = ops.quantize_weight(w)
    x = torch.randn(4, 16, 512)
    ref = torch.nn.functional.linear(x, w, b)
    y = ops.int8_linear(x, w_q, w_s, b, None, PER_TOKEN)
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean())
    assert sqnr > 30, f"W8A8 per-token SQNR {sqnr:.1f} dB is far below the ~35 dB 8-bit rounding allows"


@st.composite
def linear_case(draw):
    M = draw(st.sampled_from([0, 1, 2, 3, 7, 17, 64]))
    K = draw(st.integers(1, 97))
    N = draw(st.integers(1, 37))
    lead = draw(st.sampled_from(["2d", "3d"]))
    granularity = draw(st.sampled_from(sorted(GRANULARITIES.values())))
    kind = draw(st.sampled_from(["normal", "zeros", "huge", "tiny", "zero_rows"]))
    noncontig = draw(st.booleans())
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return M, K, N, lead, granularity, kind, noncontig, bias, seed


def _activations(M, K, lead, kind, noncontig, g, batch=2):
    shape = (M, K) if lead == "2d" else (batch, M, K)
    x = torch.randn(*shape[:-1], 2 * K if noncontig else K, generator=g)
    x = x[..., ::2] if noncontig else x  # a strided view
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "huge":
        return x * 1e30
    if kind == "tiny":
        return x * 1e-30
    if kind == "zero_rows" and x.shape[-2] > 1:
        x = x.clone()
        x[..., ::2, :] = 0
    return x


@settings(max_examples=150, deadline=None)
@given(linear_case())
def test_int8_linear_matches_reference(case):
    M, K, N, lead, granularity, kind, noncontig, bias, seed = case
    g = torch.Generator().manual_seed(seed)
    x = _activations(M, K, lead, kind, noncontig, g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    w_q, w_s = ops.quantize_weight(w)
    rq, rs = reference.quantize_weight(w)
    assert torch.equal(w_q, rq) and torch.equal(w_s, rs)
    xs = torch.tensor([(float(x.abs().max()) / 127 if x.numel() else 0.0) or 1.0]) if granularity == STATIC else None
    y = ops.int8_linear(x, w_q, w_s, b, xs, granularity)
    y_ref = reference.int8_linear(x, w_q, w_s, b, xs, granularity)
    assert y.shape == (*x.shape[:-1], N)
    assert torch.equal(y, y_ref), f"max abs diff {(y - y_ref).abs().max()}"
    q, s = ops.quantize_activation(x, granularity, xs)
    q_ref, s_ref = reference.quantize_activation(x, granularity, xs)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 9), st.integers(1, 300), st.integers(1, 40), st.integers(0, 2**16))
def test_int8_mm_matches_reference(M, K, N, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    assert torch.equal(ops.int8_mm(a, b), reference.int8_mm(a, b))
    assert torch.equal(ops.int8_mm(a.T.contiguous().T, b), reference.int8_mm(a, b))


# ---- packed-weight kernels ---------------------------------------------------------------

def _cpu_flags() -> set:
    try:
        return set(open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return set()


# GLUFX_CPU_KERNEL forces a kernel variant; test those this CPU can run
KERNELS = ["generic"] + (["avx2"] if "avx2" in _cpu_flags() else []) + (
    ["vnni"] if {"avx512f", "avx512bw", "avx512_vnni"} <= _cpu_flags() else [])


@pytest.mark.parametrize("granularity", sorted(GRANULARITIES.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_packed(granularity, dtype):
    w, b = _weights(19, 41)
    w_q, w_s = ops.quantize_weight(w)
    packed = ops.pack_weight(w_q)
    xs = torch.tensor([0.02]) if granularity == STATIC else None
    with pytest.raises(Exception, match="does not fit"):  # the fake kernel checks shapes as the real one does
        with torch._subclasses.fake_tensor.FakeTensorMode():
            ops.int8_linear_packed(torch.empty(2, 40), torch.empty(packed.shape, dtype=torch.int8),
                                   torch.empty(19), None, None, granularity)
    torch.library.opcheck(ops.int8_linear_packed, (torch.randn(2, 5, 41).to(dtype), packed, w_s, b.to(dtype), xs,
                                                   granularity))
    torch.library.opcheck(ops.pack_weight, (w_q,))
    torch.library.opcheck(ops.unpack_weight, (packed, 19, 41))


@settings(max_examples=150, deadline=None)
@given(linear_case())
def test_packed_linear_matches_reference(case):
    M, K, N, lead, granularity, kind, noncontig, bias, seed = case
    g = torch.Generator().manual_seed(seed)
    x = _activations(M, K, lead, kind, noncontig, g, batch=3)
    w_q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    if kind == "tiny":  # the extremes: every product -127 * -127
        w_q, x = torch.full_like(w_q, -127), -torch.ones_like(x)
    w_s = torch.rand(N, generator=g) + 0.01
    b = torch.randn(N, generator=g) if bias else None
    packed = ops.pack_weight(w_q)
    assert torch.equal(packed, reference.pack_weight(w_q))
    assert torch.equal(ops.unpack_weight(packed, N, K), w_q)
    xs = torch.tensor([(float(x.abs().max()) / 127 if x.numel() else 0.0) or 1.0]) if granularity == STATIC else None
    y_ref = reference.int8_linear_packed(x, packed, w_s, b, xs, granularity)
    for kernel in KERNELS:  # every variant this CPU can run (VNNI, AVX2, generic)
        with cpu_kernel(kernel):
            y = ops.int8_linear_packed(x, packed, w_s, b, xs, granularity)
            y_canonical = ops.int8_linear(x, w_q, w_s, b, xs, granularity)  # prepared from w_q on first use
        assert torch.equal(y, y_ref), f"{kernel}: max abs diff {(y - y_ref).abs().max()}"
        assert torch.equal(y_canonical, y_ref), f"{kernel} (canonical op)"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threads", [1, 2])
def test_packed_linear_thread_count_invariant(threads, kernel):
    w_q = torch.randint(-127, 128, (1000, 517), dtype=torch.int8)
    w_s = torch.rand(1000) + 0.01
    packed = ops.pack_weight(w_q)
    x = torch.randn(37, 517)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with cpu_kernel(kernel):
            y = ops.int8_linear_packed(x, packed, w_s, None, None, PER_TOKEN)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y, reference.int8_linear_packed(x, packed, w_s, None, None, PER_TOKEN))


@pytest.mark.skipif(not NATIVE, reason="the reference library prepares nothing")
def test_prepared_weight_is_made_once_and_dies_with_its_weight():
    w_q = torch.randint(-127, 128, (48, 40), dtype=torch.int8)
    w_s = torch.rand(48) + 0.01
    x = torch.randn(5, 40)
    gc.collect()
    before = prepared_weights()
    y = ops.int8_linear(x, w_q, w_s, None, None, PER_TOKEN)
    assert prepared_weights() == before + 1
    ops.int8_linear(x, w_q, w_s, None, None, PER_TOKEN)  # cache hit: no second entry
    assert prepared_weights() == before + 1
    assert torch.equal(y, reference.int8_linear(x, w_q, w_s, None, None, PER_TOKEN))
    del w_q
    gc.collect()
    assert prepared_weights() == before


@pytest.mark.skipif(not NATIVE, reason="the reference library prepares nothing")
def test_in_place_write_to_a_weight_repacks_it():
    """A stale packed form would silently compute with the old weights."""
    w_q = torch.randint(-127, 128, (20, 33), dtype=torch.int8)
    w_s = torch.rand(20) + 0.01
    x = torch.randn(4, 33)
    ops.int8_linear(x, w_q, w_s, None, None, PER_TOKEN)
    w_q[3].neg_()
    assert torch.equal(ops.int8_linear(x, w_q, w_s, None, None, PER_TOKEN),
                       reference.int8_linear(x, w_q, w_s, None, None, PER_TOKEN))


def test_unknown_kernel_is_named():
    with pytest.raises(RuntimeError, match="generic, avx2, vnni or auto"):
        torch.ops.glufx.set_cpu_kernel("sse9")


@pytest.mark.skipif(not NATIVE, reason="native kernels only")
def test_env_kernel_is_read_once_at_load():
    """GLUFX_CPU_KERNEL chooses the default when the library loads; changing it later does nothing
    (glufx.ops.cpu_kernel switches at run time)."""
    code = ("import os, torch, glufx; k = torch.ops.glufx.set_cpu_kernel; print(k('auto')); print(k('auto')); "
            "os.environ['GLUFX_CPU_KERNEL'] = 'generic' if k('auto') != 'generic' else 'avx2'; "
            "torch.ops.glufx.int8_linear(torch.randn(2, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(4)); "
            "print(k('auto'))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "GLUFX_CPU_KERNEL": "generic"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "generic"  # the environment chose the kernel at load
    assert out[1] == out[2]  # and is not read again per call


@pytest.mark.skipif(not NATIVE, reason="the reference library prepares nothing")
def test_views_at_one_address_keep_their_own_prepared_forms():
    """A slice of a weight starts at the weight's address: neither may evict the other's packed form
    (each call would repack otherwise)."""
    w_q = torch.randint(-127, 128, (40, 33), dtype=torch.int8)
    head = w_q[:20]
    x = torch.randn(3, 33)
    gc.collect()
    before = prepared_weights()
    for w in (w_q, head, w_q, head):
        y = ops.int8_linear(x, w, torch.ones(w.shape[0]), None, None, PER_TOKEN)
        assert torch.equal(y, reference.int8_linear(x, w, torch.ones(w.shape[0]), None, None, PER_TOKEN))
    assert prepared_weights() == before + 2
