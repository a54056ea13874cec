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
from .schema import PACK_KQ, PACK_NR, GRANULARITIES, PER_SEQUENCE, PER_TENSOR, PER_TOKEN, SCHEMAS, STATIC

__all__ = ["GRANULARITIES", "PER_SEQUENCE", "PER_TENSOR", "PER_TOKEN", "STATIC", "NATIVE", "native_library_path"]


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
    _load.lib = lib  # keep the registration alive
    return False


NATIVE = _load()


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
def _(x, w_q, w_scale, bias=None, x_scale=None, granularity=PER_SEQUENCE):
    torch._check(x.shape[-1] == w_q.shape[1], lambda: "glufx::int8_linear: feature size differs from the weight's")
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


@torch.library.register_fake("glufx::pack_weight")
def _(w_q):
    N, K = w_q.shape
    return w_q.new_empty(((N + PACK_NR - 1) // PACK_NR, (K + PACK_KQ - 1) // PACK_KQ, PACK_NR, PACK_KQ))


@torch.library.register_fake("glufx::unpack_weight")
def _(w_packed, N, K):
    return w_packed.new_empty((N, K))


@torch.library.register_fake("glufx::int8_linear_packed")
def _(x, w_packed, w_scale, bias=None, x_scale=None, granularity=PER_SEQUENCE):
    return x.new_empty((*x.shape[:-1], w_scale.shape[0]))


@torch.library.register_fake("glufx::int8_glu_packed")
def _(x, w_packed, w_scale, hidden, activation, x_scale=None, granularity=PER_SEQUENCE):
    return x.new_empty((*x.shape[:-1], hidden))
