"""Online Hadamard rotation of quantized linears' inputs (docs/method.md §7).

For an orthogonal R, `W x = (W R^T)(R x)`. glufx uses R = H_b D: D a diagonal of random signs, H_b the
block-diagonal Walsh-Hadamard transform with blocks of b features (b the largest power of two dividing
the input size, at most `max_block`). The weight carries `W R^T = W D H_b` offline (folded before its
per-channel quantization); the activation is rotated inside the glufx op, right before its
quantization (csrc/cpu/hadamard.cpp). A channel outlier present on every token is spread over its
block, so one per-token scale fits every channel: on Gemma 3 270M, per-token W8A8 goes from +3.7 % to
+0.15 % perplexity with b = 128 and signs (b = 64: +0.7 %, b = 256: +0.4 %, b = whole input: +0.5 %,
without signs +0.3 %; fake quantization, docs/method.md §7).

It is applied to any linear, whatever the graph around it, because it lives inside the op: it needs
no seam. It is not applied to static scales: once the outliers are spread out, a static scale is set
by the tokens of largest norm, which measured ruinous (docs/method.md §7).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops  # noqa: F401  (registers torch.ops.glufx)

MAX_BLOCK = 128


def hadamard_block(in_features: int, max_block: int = MAX_BLOCK) -> int:
    """The largest power of two dividing `in_features`, at most `max_block`; 0 when that is 1 (odd sizes)."""
    b = in_features & -in_features
    b = min(b, max_block)
    return b if b > 1 else 0


def random_signs(in_features: int, seed: int) -> torch.Tensor:
    """A fixed ±1 vector per (input size, seed): sibling linears of one input share it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + in_features)
    return (torch.randint(0, 2, (in_features,), generator=g) * 2 - 1).float()


def signs_key(in_features: int, seed: int) -> str:
    return f"rotation.signs.{in_features}.{seed}"


@torch.no_grad()
def fold(weight: torch.Tensor, block: int, signs: Optional[torch.Tensor]) -> torch.Tensor:
    """`W D H_b` in float32: the weight that, fed the rotated input, gives W x."""
    # W: [N, K]; each row w -> H_b (d * w) (H_b is symmetric)
    return torch.ops.glufx.hadamard(weight.detach().float().contiguous(), block, signs)


def rotation_of(mp, tensors: dict) -> Optional[tuple[int, Optional[torch.Tensor]]]:
    """(block, signs) of a module plan's rotation, or None."""
    r = getattr(mp, "rotation", None)
    if not r:
        return None
    if r.get("kind") != "hadamard":
        raise ValueError(f"glufx: unknown rotation {r.get('kind')!r} for {mp.fqn} (written by a newer glufx?)")
    key = r.get("signs")
    if key is not None and key not in tensors:
        raise ValueError(f"glufx: the plan's rotation of {mp.fqn} names tensor {key!r}, which the plan lacks "
                         "(load the plan with its .safetensors sidecar)")
    return int(r["block"]), (tensors[key] if key is not None else None)
