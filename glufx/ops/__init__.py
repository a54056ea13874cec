"""The glufx op library: `torch.ops.glufx.*`, native kernels from csrc/ plus fake kernels.

Importing glufx loads the native library (needed before `torch.export.load` of a program that
calls these ops). When glufx was installed with GLUFX_SKIP_NATIVE=1 the same schemas are defined
here with the reference implementation as CPU kernel, and a warning says so.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

from . import reference
from .schema import CONTROL_SCHEMAS, GRANULARITIES, PACK_KQ, PACK_NR, PER_SEQUENCE, PER_TENSOR, PER_TOKEN, SCHEMAS, STATIC

__all__ = ["GRANULARITIES", "PER_SEQUENCE", "PER_TENSOR", "PER_TOKEN", "STATIC", "NATIVE", "native_library_path",
           "cpu_kernel", "prepared_weights"]


def native_library_path() -> str | None:
    spec = importlib.util.find_spec("glufx._C")
    return spec.origin if spec is not None else None


def _load() -> bool:
    path = native_library_path()
    if path is not None:
        torch.ops.load_library(path)
        return True
    warnings.warn(
        "glufx: the native op library glufx._C is not built (installed with GLUFX_SKIP_NATIVE=1?); "
        "using the slow pure-PyTorch reference kernels. Reinstall without GLUFX_SKIP_NATIVE for C++ kernels.",
        stacklevel=3,
    )
    lib = torch.library.Library("glufx", "DEF")
    for name, schema in SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, getattr(reference, name), "CPU")
    for name, schema in CONTROL_SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, getattr(reference, name), "CompositeExplicitAutograd")
    _load.lib = lib  # keep the registration alive
    return False


NATIVE = _load()


class cpu_kernel:
    """`with glufx.ops.cpu_kernel("generic"): ...` runs the CPU kernel variant named (generic, avx2,
    vnni, auto; one the CPU lacks falls back to the best it has). GLUFX_CPU_KERNEL sets the default
    when the library loads. Every variant reads the same prepared weights and gives the same bits."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.previous = torch.ops.glufx.set_cpu_kernel(self.name)
        return self

    def __exit__(self, *exc):
        torch.ops.glufx.set_cpu_kernel(self.previous if self.previous != "reference" else "auto")


def prepared_weights() -> int:
    """Live prepared (kernel-layout) weights cached by the CPU ops; entries die with their weights."""
    return int(torch.ops.glufx.prepared_weights())


@torch.library.register_fake("glufx::quantize_weight")
def _(w):
    torch._check(w.dim() == 2, lambda: "glufx::quantize_weight expects a 2-D weight")
    return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[0], dtype=torch.float32)


def _rows(x):
    rows = 1
    for d in x.shape[:-1]:
        rows = rows * d
    return rows


@torch.library.register_fake("glufx::quantize_activation")
def _(x, granularity, x_scale=None):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(_rows(x), dtype=torch.float32)


@torch.library.register_fake("glufx::int8_mm")
def _(a, b):
    torch._check(a.shape[1] == b.shape[1], lambda: "glufx::int8_mm: inner dimensions differ")
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@torch.library.register_fake("glufx::int8_linear")
def _(x, w_q, w_scale, bias=None, x_scale=None, granularity=PER_SEQUENCE, rot_signs=None, rot_block=0):
    torch._check(x.shape[-1] == w_q.shape[1], lambda: "glufx::int8_linear: feature size differs from the weight's")
    torch._check(w_scale.shape[0] == w_q.shape[0], lambda: "glufx::int8_linear: one weight scale per output channel")
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.register_fake("glufx::int8_weight_linear")
def _(x, w_q, w_scale, bias=None):
    torch._check(x.shape[-1] == w_q.shape[1], lambda: "glufx::int8_weight_linear: feature size differs from the weight's")
    torch._check(w_scale.shape[0] == w_q.shape[0], lambda: "glufx::int8_weight_linear: one weight scale per output channel")
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.register_fake("glufx::decode_attention")
def _(q, k, v, mask, scale):
    torch._check(q.dim() == 4 and k.shape == v.shape and k.shape[:2] == q.shape[:2] and k.shape[3] == q.shape[3],
                 lambda: "glufx::decode_attention: expects q [B, H_kv, R, D], k and v [B, H_kv, S, D]")
    return q.new_empty(q.shape)


@torch.library.register_fake("glufx::prefill_attention")
def _(q, k, v, mask, is_causal, scale):
    torch._check(q.dim() == 4 and k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[3] == q.shape[3]
                 and q.shape[1] % k.shape[1] == 0,
                 lambda: "glufx::prefill_attention: expects q [B, H, T, D], k and v [B, H_kv, S, D], H a multiple of H_kv")
    torch._check(not (is_causal and mask is not None),
                 lambda: "glufx::prefill_attention: pass either a mask or is_causal=True, not both")
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D))


@torch.library.register_fake("glufx::hadamard")
def _(x, block, signs=None):
    return torch.empty_like(x)


@torch.library.register_fake("glufx::pack_weight")
def _(w_q):
    N, K = w_q.shape
    return w_q.new_empty(((N + PACK_NR - 1) // PACK_NR, (K + PACK_KQ - 1) // PACK_KQ, PACK_NR, PACK_KQ))


@torch.library.register_fake("glufx::unpack_weight")
def _(w_packed, N, K):
    return w_packed.new_empty((N, K))


@torch.library.register_fake("glufx::int8_linear_packed")
def _(x, w_packed, w_scale, bias=None, x_scale=None, granularity=PER_SEQUENCE):
    N, K = w_scale.shape[0], x.shape[-1]
    torch._check(w_packed.dim() == 4 and w_packed.shape[2] == PACK_NR and w_packed.shape[3] == PACK_KQ,
                 lambda: "glufx::int8_linear_packed: w_packed must come from glufx::pack_weight")
    torch._check(w_packed.shape[0] == (N + PACK_NR - 1) // PACK_NR and
                 w_packed.shape[1] == (K + PACK_KQ - 1) // PACK_KQ,
                 lambda: f"glufx::int8_linear_packed: packed weight does not fit {N} channels of {K} features")
    return x.new_empty((*x.shape[:-1], N))


@torch.library.register_fake("glufx::int8_glu")
def _(x, w_gate, s_gate, w_up, s_up, activation, x_scale=None, granularity=PER_SEQUENCE, rot_signs=None, rot_block=0):
    for w, s in ((w_gate, s_gate), (w_up, s_up)):
        torch._check(w.dim() == 2 and w.shape[1] == x.shape[-1],
                     lambda: "glufx::int8_glu: the weights' feature size differs from the input's")
        torch._check(s.shape[0] == w.shape[0], lambda: "glufx::int8_glu: one scale per output channel")
    torch._check(w_gate.shape[0] == w_up.shape[0], lambda: "glufx::int8_glu: gate and up differ in channels")
    return x.new_empty((*x.shape[:-1], w_gate.shape[0]))


@torch.library.register_fake("glufx::int8_glu_packed")
def _(x, w_packed, w_scale, hidden, activation, x_scale=None, granularity=PER_SEQUENCE):
    return x.new_empty((*x.shape[:-1], hidden))
