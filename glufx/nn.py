"""Modules that run the glufx ops."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.glufx)
from .ops.schema import GRANULARITIES, PACK_NR

SUPPORTED_DEVICES = ("cpu",)


class Int8Linear(nn.Module):
    """W8A8 linear: per-channel INT8 weight, packed once into the kernel's layout (glufx::pack_weight);
    activations quantized inside the op with the plan's granularity."""

    def __init__(self, in_features: int, out_features: int, bias: bool, granularity: str = "per_sequence",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.granularity = granularity
        self.register_buffer("w_packed", torch.ops.glufx.pack_weight(torch.zeros(out_features, in_features,
                                                                                 dtype=torch.int8)))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self.register_buffer("x_scale", torch.ones(1, dtype=torch.float32) if granularity == "static" else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, granularity: str, x_scale: Optional[float] = None) -> "Int8Linear":
        w = linear.weight
        if w.device.type not in SUPPORTED_DEVICES:
            raise NotImplementedError(
                f"glufx: no INT8 kernel for device {w.device.type!r} in this build (kernels: {SUPPORTED_DEVICES}); "
                "move the model to CPU before glufx.compile")
        if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"glufx: cannot quantize a {w.dtype} linear; glufx takes float32, bfloat16 or float16 models")
        if granularity == "static" and (x_scale is None or not x_scale > 0):
            raise ValueError("glufx: static activation quantization needs a calibrated scale > 0")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, granularity, w.dtype)
        w_q, m.w_scale = torch.ops.glufx.quantize_weight(w)
        m.w_packed = torch.ops.glufx.pack_weight(w_q)
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        if granularity == "static":
            m.x_scale = torch.tensor([x_scale], dtype=torch.float32)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        return torch.ops.glufx.int8_linear_packed(x, self.w_packed, self.w_scale, self.bias, self.x_scale,
                                                  GRANULARITIES[self.granularity])

    @property
    def w_q(self) -> torch.Tensor:
        return torch.ops.glufx.unpack_weight(self.w_packed, self.out_features, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.w_q.float() * self.w_scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"act={self.granularity}"


def _padded(channels: int) -> int:
    return -(-channels // PACK_NR) * PACK_NR


def pack_glu(gate: Int8Linear, up: Int8Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """gate's and up's INT8 weights as one packed weight whose 16-channel blocks alternate gate, up
    (the layout glufx::int8_glu_packed reads: one kernel tile yields a gate block and its up block)."""
    hidden, K = gate.out_features, gate.in_features
    padded = _padded(hidden)

    def blocks(w_q: torch.Tensor, fill: float) -> torch.Tensor:
        return torch.nn.functional.pad(w_q, (0, 0, 0, padded - hidden), value=fill).view(padded // PACK_NR, PACK_NR, -1)

    w = torch.stack([blocks(gate.w_q, 0), blocks(up.w_q, 0)], dim=1).reshape(2 * padded, K)
    s = torch.stack([blocks(gate.w_scale[:, None], 1.0), blocks(up.w_scale[:, None], 1.0)], dim=1).reshape(-1)
    return torch.ops.glufx.pack_weight(w), s.contiguous()


class Int8GLU(nn.Module):
    """A GLU feed-forward block, down(act(gate(x)) * up(x)), with gate and up in one INT8 op
    (glufx::int8_glu_packed: x quantized once, both projections in one pass, the activation and the
    product in the op) and `down_proj` as the plan has it (Int8Linear or the original nn.Linear).
    Replaces a module whose forward is exactly that block; its outputs equal the unfused ones."""

    def __init__(self, in_features: int, hidden: int, activation: str, granularity: str, down_proj: nn.Module):
        super().__init__()
        self.in_features, self.hidden, self.activation, self.granularity = in_features, hidden, activation, granularity
        padded = _padded(hidden)
        self.register_buffer("w_packed", torch.ops.glufx.pack_weight(torch.zeros(2 * padded, in_features,
                                                                                 dtype=torch.int8)))
        self.register_buffer("w_scale", torch.ones(2 * padded, dtype=torch.float32))
        self.register_buffer("x_scale", torch.ones(1, dtype=torch.float32) if granularity == "static" else None)
        self.down_proj = down_proj

    @classmethod
    @torch.no_grad()
    def from_int8(cls, gate: Int8Linear, up: Int8Linear, down_proj: nn.Module, activation: str) -> "Int8GLU":
        m = cls(gate.in_features, gate.out_features, activation, gate.granularity, down_proj)
        m.w_packed, m.w_scale = pack_glu(gate, up)
        if gate.granularity == "static":
            m.x_scale = gate.x_scale.clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> h: [..., hidden] -> [..., K_out]
        h = torch.ops.glufx.int8_glu_packed(x, self.w_packed, self.w_scale, self.hidden, self.activation,
                                            self.x_scale, GRANULARITIES[self.granularity])
        return self.down_proj(h)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden={self.hidden}, activation={self.activation}, " \
               f"act={self.granularity}"
