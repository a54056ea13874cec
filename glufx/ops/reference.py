"""Pure PyTorch reference of every glufx op: the specification the C++ kernels are tested against.

Same float operations in the same order as csrc/cpu/int8_ops.cpp, so results agree bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .schema import PACK_KQ, PACK_NR, PER_SEQUENCE, PER_TENSOR, PER_TOKEN, STATIC

QMAX = 127.0


def _scale_from_absmax(amax: torch.Tensor) -> torch.Tensor:
    s = amax / QMAX
    return torch.where(s == 0, torch.ones_like(s), s)


def _quantize(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / s), -QMAX, QMAX).to(torch.int8)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [N, K] -> (int8 [N, K], float32 [N])
    w = w.float()
    s = _scale_from_absmax(w.abs().amax(dim=1))
    return _quantize(w, s[:, None]), s


def fake_quantize(x: torch.Tensor, scale) -> torch.Tensor:
    """x rounded onto the INT8 grid of `scale` (a number, or a tensor broadcasting against x) and
    back: what the ops compute before the integer GEMM, in float (calibration searches use it)."""
    return torch.clamp(torch.round(x / scale), -QMAX, QMAX) * scale


def dequantized_weight(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] as glufx's per-channel INT8 weight represents it, in float32."""
    w_q, w_s = quantize_weight(w)
    return w_q.float() * w_s[:, None]


def row_scales(x2d: torch.Tensor, rows_per_sequence: int, granularity: int,
               x_scale: Optional[torch.Tensor]) -> torch.Tensor:
    # x2d: [M, K] float32 -> scales [M]
    M = x2d.shape[0]
    if granularity == STATIC:
        return x_scale.float().reshape(1).expand(M).contiguous()
    if not torch.isfinite(x2d).all():
        raise RuntimeError("glufx reference: input has NaN or Inf; INT8 cannot represent it")
    amax = x2d.abs().amax(dim=1) if x2d.shape[1] else x2d.new_zeros(M)
    if granularity == PER_TOKEN:
        return _scale_from_absmax(amax)
    group = max(M, 1) if granularity == PER_TENSOR else rows_per_sequence
    if M == 0:
        return amax
    per_group = amax.view(-1, group).amax(dim=1)
    return _scale_from_absmax(per_group).repeat_interleave(group)


def _flatten(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    x2d = x.reshape(-1, x.shape[-1]).float()
    M = x2d.shape[0]
    rows = M // x.shape[0] if x.dim() >= 3 and x.shape[0] > 0 else max(M, 1)
    return x2d, max(rows, 1)


def quantize_activation(x: torch.Tensor, granularity: int, x_scale: Optional[torch.Tensor] = None):
    x2d, rows = _flatten(x)
    s = row_scales(x2d, rows, granularity, x_scale)
    return _quantize(x2d, s[:, None]).view(x.shape), s


def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # a: [M, K] int8, b: [N, K] int8 -> [M, N] int32, exact (int64 accumulation cannot overflow here)
    return (a.to(torch.int64) @ b.to(torch.int64).T).to(torch.int32)


def _check_rotation(K: int, block: int, signs: Optional[torch.Tensor]) -> None:
    if block < 0 or (block and (block & (block - 1) or K % block)):
        raise RuntimeError(f"glufx: rotation block {block} must be a power of two dividing the {K} input features")
    if signs is not None and (block == 0 or signs.dtype != torch.float32 or signs.numel() != K):
        raise RuntimeError(f"glufx: rotation signs must be float32 with one value per input feature ({K}), "
                           "and need a rotation block")


def _rotate_rows(x2d: torch.Tensor, block: int, signs: Optional[torch.Tensor]) -> torch.Tensor:
    # x2d: [M, K] float32 -> H_b (signs * x) per row; butterflies h = 1, 2, 4, ... (a + b, a - b), then 1/sqrt(b)
    M, K = x2d.shape
    y = x2d * signs.view(1, K) if signs is not None else x2d.clone()
    h = 1
    while h < block:
        y = y.view(M, K // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2).view(M, K)
        h *= 2
    return y * torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32)


def hadamard(x: torch.Tensor, block: int, signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    # x: [..., K] -> [..., K] in x.dtype
    _check_rotation(x.shape[-1], block, signs)
    if block == 0:
        raise RuntimeError("glufx::hadamard: block must be > 0")
    x2d, _ = _flatten(x)
    return _rotate_rows(x2d, block, signs).to(x.dtype).view(x.shape)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                x_scale: Optional[torch.Tensor] = None, granularity: int = PER_SEQUENCE,
                rot_signs: Optional[torch.Tensor] = None, rot_block: int = 0) -> torch.Tensor:
    # x: [..., K], w_q: [N, K] -> [..., N] in x.dtype
    _check_rotation(x.shape[-1], rot_block, rot_signs)
    x2d, rows = _flatten(x)
    if rot_block:
        x2d = _rotate_rows(x2d, rot_block, rot_signs)
    s_x = row_scales(x2d, rows, granularity, x_scale)
    acc = int8_mm(_quantize(x2d, s_x[:, None]), w_q)
    y = acc.float() * s_x[:, None]
    y = y * w_scale[None, :]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(x.dtype).view(*x.shape[:-1], w_q.shape[0])


def int8_weight_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    # x: [..., K] floating point, w_q: [N, K] -> [..., N] in x.dtype; the native kernel sums in another order
    y = torch.nn.functional.linear(x.float(), w_q.float() * w_scale[:, None], None if bias is None else bias.float())
    return y.to(x.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                     scale: float) -> torch.Tensor:
    # q: [B, H_kv, R, D], k, v: [B, H_kv, S, D]; mask: bool (True attends) or additive float, broadcastable to
    # [B, H_kv, R, S]. A row with nothing to attend is zeros (the native kernel's convention).
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H_kv, R, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    live = scores.amax(-1, keepdim=True) > float("-inf")
    probs = torch.where(live, scores, 0.0).softmax(-1) * live
    return (probs @ v.float()).to(q.dtype)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                      is_causal: bool, scale: float) -> torch.Tensor:
    # q: [B, H, T, D], k, v: [B, H_kv, S, D] -> [B, T, H, D]. mask: as decode_attention's, broadcastable to
    # [B, H, T, S]; is_causal: query i attends keys 0..i (SDPA's). A row with nothing to attend is zeros.
    if is_causal and mask is not None:
        raise RuntimeError("glufx::prefill_attention: pass either a mask or is_causal=True, not both")
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    if is_causal:
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    return decode_attention(q, k, v, mask, scale).transpose(1, 2).contiguous()


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def pack_weight(w_q: torch.Tensor) -> torch.Tensor:
    # [N, K] int8 -> [N/16, K/4, 16, 4]: per block of 16 channels, quads of input channels interleaved
    N, K = w_q.shape
    padded = torch.zeros(_round_up(N, PACK_NR), _round_up(K, PACK_KQ), dtype=torch.int8)
    padded[:N, :K] = w_q
    return padded.view(padded.shape[0] // PACK_NR, PACK_NR, -1, PACK_KQ).permute(0, 2, 1, 3).contiguous()


def unpack_weight(w_packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    Np, Kp = w_packed.shape[0] * PACK_NR, w_packed.shape[1] * PACK_KQ
    return w_packed.permute(0, 2, 1, 3).reshape(Np, Kp)[:N, :K].contiguous()


def int8_linear_packed(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
                       bias: Optional[torch.Tensor] = None, x_scale: Optional[torch.Tensor] = None,
                       granularity: int = PER_SEQUENCE) -> torch.Tensor:
    w_q = unpack_weight(w_packed, w_scale.numel(), x.shape[-1])
    return int8_linear(x, w_q, w_scale, bias, x_scale, granularity)


def int8_glu_packed(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor, hidden: int, activation: str,
                    x_scale: Optional[torch.Tensor] = None, granularity: int = PER_SEQUENCE) -> torch.Tensor:
    # w_packed: gate and up 16-channel blocks interleaved -> [hidden_padded / 16, 2, 16, K]
    K = x.shape[-1]
    w = unpack_weight(w_packed, w_scale.numel(), K).view(-1, 2, PACK_NR, K)
    s = w_scale.view(-1, 2, PACK_NR)
    return int8_glu(x, w[:, 0].reshape(-1, K)[:hidden], s[:, 0].reshape(-1)[:hidden],
                    w[:, 1].reshape(-1, K)[:hidden], s[:, 1].reshape(-1)[:hidden], activation, x_scale, granularity)


def int8_glu(x: torch.Tensor, w_gate: torch.Tensor, s_gate: torch.Tensor, w_up: torch.Tensor, s_up: torch.Tensor,
             activation: str, x_scale: Optional[torch.Tensor] = None, granularity: int = PER_SEQUENCE,
             rot_signs: Optional[torch.Tensor] = None, rot_block: int = 0) -> torch.Tensor:
    gate = int8_linear(x, w_gate, s_gate, None, x_scale, granularity, rot_signs, rot_block)
    up = int8_linear(x, w_up, s_up, None, x_scale, granularity, rot_signs, rot_block)
    if activation == "silu":
        return F.silu(gate) * up
    return F.gelu(gate, approximate="tanh" if activation == "gelu_tanh" else "none") * up


def set_cpu_kernel(name: str) -> str:
    if name not in ("generic", "avx2", "vnni", "auto"):
        raise RuntimeError(f"glufx: unknown CPU kernel '{name}'; choose generic, avx2, vnni or auto")
    return "reference"


def prepared_weights() -> int:
    return 0


def set_huge_pages(enabled: bool) -> bool:
    return False
