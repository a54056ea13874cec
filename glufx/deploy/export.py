"""Deployment export: a glufx model (QFeP prefix included) as a torch.export program with plain-tensor I/O.

Loading the program needs `import glufx` (which registers the glufx ops), not transformers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.export import Dim

from ..prefix import PrefixedLM


class LogitsProgram(nn.Module):
    """(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]; inputs carry no BOS when a
    QFeP prefix is inside (it holds BOS), as the exported graph cannot branch on token values."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, PrefixedLM):
            model = PrefixedLM(model.model, model.prefix(), drop_bos=False)
        self.lm = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export(model: nn.Module, example_inputs: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
           dynamic: bool = True) -> torch.export.ExportedProgram:
    """torch.export of a (glufx-compiled) causal LM as `LogitsProgram`, batch and sequence dynamic."""
    if example_inputs is None:
        ids = torch.randint(3, 100, (2, 8))
        example_inputs = (ids, torch.ones_like(ids))
    if dynamic and min(example_inputs[0].shape) < 2:
        raise ValueError(f"glufx.export: example inputs of shape {tuple(example_inputs[0].shape)}: torch.export "
                         "specialises dimensions of size 0 or 1, so give batch and sequence >= 2 "
                         "(or dynamic=False for a fixed-shape program)")
    # Views (ids[:, 1:]) make export guard on their base tensor, which an input loaded elsewhere
    # lacks: the reloaded program's input check then fails ('NoneType' has no attribute 'size').
    example_inputs = tuple(t.clone() for t in example_inputs)
    program = LogitsProgram(model).eval()
    shapes = None
    if dynamic:
        spec = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
        shapes = (spec, spec)
    with torch.no_grad():
        return torch.export.export(program, tuple(example_inputs), dynamic_shapes=shapes, strict=False)
