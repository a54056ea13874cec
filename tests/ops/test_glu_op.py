"""glufx::int8_glu (canonical weights, prepared on first use) and glufx::int8_glu_packed: opcheck, the reference, the unfused linears, every kernel variant."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import glufx  # noqa: F401
from glufx.nn import Int8GLU, Int8Linear
from glufx.ops import GRANULARITIES, STATIC, reference

from glufx.ops import cpu_kernel
from test_int8_ops import KERNELS

ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def _glu(K, hidden, granularity="per_sequence", seed=0):
    torch.manual_seed(seed)
    gate, up = torch.nn.Linear(K, hidden, bias=False), torch.nn.Linear(K, hidden, bias=False)
    xs = 0.02 if granularity == "static" else None
    return Int8Linear.from_linear(gate, granularity, xs), Int8Linear.from_linear(up, granularity, xs)


@pytest.mark.parametrize("activation", sorted(ACTS))
@pytest.mark.parametrize("granularity", sorted(GRANULARITIES))
def test_opcheck_and_reference(activation, granularity):
    gate, up = _glu(40, 24, granularity)
    x = torch.randn(2, 5, 40)
    args = (x, gate.w_q, gate.w_scale, up.w_q, up.w_scale, activation, gate.x_scale, GRANULARITIES[granularity])
    torch.library.opcheck(torch.ops.glufx.int8_glu, args)
    assert torch.equal(torch.ops.glufx.int8_glu(*args), reference.int8_glu(*args))


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=25, deadline=None)
@given(K=st.integers(1, 150), hidden=st.integers(1, 70), M=st.integers(0, 30), act=st.sampled_from(sorted(ACTS)),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_equals_the_unfused_linears(kernel, K, hidden, M, act, dtype):
    """Fusing changes no bit: act(gate(x)) * up(x) with the two Int8Linear ops, in x's dtype."""
    gate, up = _glu(K, hidden)
    fused = Int8GLU.from_int8(gate, up, torch.nn.Identity(), act)
    x = (torch.randn(2, M, K) * 3).to(dtype)
    with cpu_kernel(kernel):
        assert torch.equal(fused(x), ACTS[act](gate(x)) * up(x))


def test_bad_inputs_named():
    gate, up = _glu(16, 20)
    x = torch.randn(3, 16)
    g, u = (gate.w_q, gate.w_scale), (up.w_q, up.w_scale)
    with pytest.raises(RuntimeError, match="silu, gelu or gelu_tanh"):
        torch.ops.glufx.int8_glu(x, *g, *u, "relu", None, 0)
    with pytest.raises(RuntimeError, match="input has 15 features"):
        torch.ops.glufx.int8_glu(x[:, :15], *g, *u, "silu", None, 0)
    with pytest.raises(RuntimeError, match="gate has 20 channels, up 19"):
        torch.ops.glufx.int8_glu(x, *g, up.w_q[:19], up.w_scale[:19], "silu", None, 0)
    with pytest.raises(RuntimeError, match="static"):
        torch.ops.glufx.int8_glu(x, *g, *u, "silu", None, STATIC)
