"""Modules that run the glufx ops, holding the canonical quantized state.

State is device- and kernel-neutral: INT8 weights `[N, K]`, float32 per-channel scales, the bias, and
the static activation scale when there is one. That is what `glufx.save`, `glufx.export` and other
engines' exporters read. The kernels' packed layout is a prepared form the CPU op makes from `w_q`
on first use and caches (csrc/cpu/packed_linear.cpp), so no saved or exported artifact carries it
(docs/design.md, "Canonical state").
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.glufx)
from .ops.schema import GRANULARITIES

SUPPORTED_DEVICES = ("cpu",)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_weight(w: torch.Tensor, what: str) -> None:
    if w.device.type not in SUPPORTED_DEVICES:
        raise NotImplementedError(
            f"glufx: no INT8 kernel for device {w.device.type!r} in this build (kernels: {SUPPORTED_DEVICES}); "
            f"move the model to CPU before glufx.compile ({what})")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"glufx: cannot quantize {what} of dtype {w.dtype}; glufx takes float32, bfloat16 or "
                        "float16 models")


def _static_scale(granularity: str, x_scale: Optional[float]) -> Optional[torch.Tensor]:
    if granularity not in GRANULARITIES:
        raise ValueError(f"glufx: unknown activation granularity {granularity!r}; choose one of {sorted(GRANULARITIES)}")
    if granularity != "static":
        return None
    if x_scale is None or not x_scale > 0:
        raise ValueError("glufx: static activation quantization needs a calibrated scale > 0 (the plan has none: "
                         "calibrate with GlufxConfig(granularity='static'))")
    return torch.tensor([x_scale], dtype=torch.float32)


class Int8Linear(nn.Module):
    """W8A8 linear: per-channel symmetric INT8 weight `w_q` [N, K] with scales `w_scale` [N];
    activations quantized inside the op with the plan's granularity (`x_scale` [1] when static)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, granularity: str = "per_sequence",
                 dtype: torch.dtype = torch.float32, rot_block: int = 0, rot_signs: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.granularity = granularity
        # online rotation of the input (glufx/rotate.py): w_q holds the rotated weight W D H_b
        self.rot_block = rot_block
        self.register_buffer("rot_signs", torch.ones(in_features, dtype=torch.float32) if rot_signs else None)
        self.register_buffer("w_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.register_buffer("x_scale", torch.ones(1, dtype=torch.float32) if granularity == "static" else None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], granularity: str,
                   x_scale: Optional[float] = None, what: str = "a linear",
                   rotation: Optional[tuple[int, Optional[torch.Tensor]]] = None,
                   codes: Optional[torch.Tensor] = None) -> "Int8Linear":
        """`rotation`: (block, signs) of an online Hadamard rotation (glufx/rotate.py), folded into w_q.
        `codes`: the INT8 weight [N, K] on the per-channel grid of the (rotated) weight, from a rounding other
        than round-to-nearest (glufx/decide/weights.py); the scales stay round-to-nearest's."""
        _check_weight(weight, what)
        xs = _static_scale(granularity, x_scale)
        block, signs = rotation or (0, None)
        m = cls(weight.shape[1], weight.shape[0], bias is not None, granularity, weight.dtype, block, signs is not None)
        if block:
            from .rotate import fold

            weight = fold(weight, block, signs)
            if signs is not None:
                m.rot_signs = signs.detach().float().clone()
        m.w_q, m.w_scale = torch.ops.glufx.quantize_weight(weight.detach())
        if codes is not None:
            if codes.shape != m.w_q.shape or codes.dtype != torch.int8:
                raise ValueError(f"glufx: the plan's weight codes for {what} are {codes.dtype} {tuple(codes.shape)}, "
                                 f"the linear needs int8 {tuple(m.w_q.shape)} (a plan for another model?)")
            m.w_q = codes.detach().clone()
        if bias is not None:
            m.bias = bias.detach().clone()
        if xs is not None:
            m.x_scale = xs
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str, x_scale: Optional[float] = None) -> "Int8Linear":
        return cls.from_float(linear.weight, linear.bias, granularity, x_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        return torch.ops.glufx.int8_linear(x, self.w_q, self.w_scale, self.bias, self.x_scale,
                                           GRANULARITIES[self.granularity], self.rot_signs, self.rot_block)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this module applies to its unrotated input, [N, K] float32."""
        w = self.w_q.float() * self.w_scale[:, None]
        if self.rot_block:  # (W D H) H D = W: H_b and D are their own inverses
            w = torch.ops.glufx.hadamard(w, self.rot_block, None)
            w = w * self.rot_signs if self.rot_signs is not None else w
        return w

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"act={self.granularity}" + (f", rotation=hadamard({self.rot_block})" if self.rot_block else "")


class Int8WeightLinear(nn.Module):
    """Weight-only INT8 linear: per-channel symmetric INT8 weight `w_q` [N, K] with scales `w_scale` [N], the
    input kept in floating point (glufx::int8_weight_linear). For the linears whose activations stay FP
    (QFeM's), with GlufxConfig(fp_weights="int8"): their weights are ordinary, their inputs spike."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("w_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], what: str = "a linear") -> "Int8WeightLinear":
        _check_weight(weight, what)
        m = cls(weight.shape[1], weight.shape[0], bias is not None, weight.dtype)
        m.w_q, m.w_scale = torch.ops.glufx.quantize_weight(weight.detach())
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        return torch.ops.glufx.int8_weight_linear(x, self.w_q, self.w_scale, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        return self.w_q.float() * self.w_scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               "act=fp (weight-only INT8)"


class Int8GLU(nn.Module):
    """A GLU feed-forward block, down(act(gate(x)) * up(x)), with gate and up in one INT8 op
    (glufx::int8_glu: x quantized once, both projections in one pass, the activation and the product
    in the op) and `down_proj` as the plan has it (Int8Linear or the original nn.Linear).
    Replaces a module whose forward is exactly that block; its outputs equal the unfused ones."""

    def __init__(self, in_features: int, hidden: int, activation: str, granularity: str, down_proj: nn.Module,
                 rot_block: int = 0, rot_signs: bool = False):
        super().__init__()
        self.in_features, self.hidden, self.activation, self.granularity = in_features, hidden, activation, granularity
        self.rot_block = rot_block
        self.register_buffer("rot_signs", torch.ones(in_features, dtype=torch.float32) if rot_signs else None)
        for name in ("gate", "up"):
            self.register_buffer(f"{name}_w_q", torch.zeros(hidden, in_features, dtype=torch.int8))
            self.register_buffer(f"{name}_w_scale", torch.ones(hidden, dtype=torch.float32))
        self.register_buffer("x_scale", torch.ones(1, dtype=torch.float32) if granularity == "static" else None)
        self.down_proj = down_proj

    @classmethod
    @torch.no_grad()
    def from_int8(cls, gate: Int8Linear, up: Int8Linear, down_proj: nn.Module, activation: str) -> "Int8GLU":
        m = cls(gate.in_features, gate.out_features, activation, gate.granularity, down_proj, gate.rot_block,
                gate.rot_signs is not None)
        m.gate_w_q, m.gate_w_scale, m.up_w_q, m.up_w_scale = gate.w_q, gate.w_scale, up.w_q, up.w_scale
        if gate.rot_signs is not None:
            m.rot_signs = gate.rot_signs
        if gate.granularity == "static":
            m.x_scale = gate.x_scale.clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> h: [..., hidden] -> [..., K_out]
        h = torch.ops.glufx.int8_glu(x, self.gate_w_q, self.gate_w_scale, self.up_w_q, self.up_w_scale,
                                     self.activation, self.x_scale, GRANULARITIES[self.granularity],
                                     self.rot_signs, self.rot_block)
        return self.down_proj(h)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden={self.hidden}, activation={self.activation}, " \
               f"act={self.granularity}"


# Every module glufx lowers a linear (or a gate/up pair) to: what "this model holds glufx ops" means.
LOWERED_MODULES = (Int8Linear, Int8GLU, Int8WeightLinear)
