"""Capture: a model and one example input -> a torch.export program, the graph every later pass reads."""
from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from torch.export import Dim

from .calibdata import is_causal_lm


def _dynamic(value: Any):
    # Every tensor dimension AUTO: export keeps it symbolic unless the model specializes it, so one
    # capture serves calibration batches of any batch size and length.
    if isinstance(value, torch.Tensor):
        return {i: Dim.AUTO for i in range(value.dim())}
    if isinstance(value, (list, tuple)):
        return type(value)(_dynamic(v) for v in value)
    if isinstance(value, dict):
        return {k: _dynamic(v) for k, v in value.items()}
    return None


def capture(model: torch.nn.Module, example: tuple[tuple, dict]) -> torch.export.ExportedProgram:
    """torch.export (non-strict) of `model` on `example = (args, kwargs)`.

    HF causal LMs are captured with `use_cache=False`: the analysis graph needs linears and their
    inputs, not a cache pytree (which export cannot flatten without extra registration).
    """
    args, kwargs = example
    if is_causal_lm(model):
        kwargs = {**kwargs, "use_cache": False}
    # dynamic_shapes keyed by forward()'s parameter names (a **kwargs parameter takes a dict)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    dynamic = {name: _dynamic(value) for name, value in bound.arguments.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.export.export(
                model, tuple(args), dict(kwargs), dynamic_shapes=dynamic,
                strict=False,
            )
        except Exception as e:  # torch.export raises many types; all mean "not capturable as is"
            raise RuntimeError(
                f"glufx: torch.export could not capture {type(model).__name__}: {type(e).__name__}: {e}\n"
                "glufx needs a model that torch.export (strict=False) can trace; remove data-dependent Python "
                "control flow from forward() or pass example inputs that exercise the path you deploy."
            ) from e
