"""Modules that run the glufx ops."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.glufx)
from .ops.schema import GRANULARITIES

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
