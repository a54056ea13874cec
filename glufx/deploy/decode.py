"""Decoding with a compiled step: a static KV cache and one compiled graph for every position.

    model = glufx.compile_decode(glufx.load(dir))      # or any HF causal LM, glufx or floating point
    out = model.generate(input_ids, max_new_tokens=64)  # prefill eager, every later step compiled

Why: an eager decode step of a small model is hundreds of small ATen calls around a few INT8 GEMMs;
the GEMMs stream the weights at memory speed, the calls around them cost as much again. Compiling the
single-token step with a static cache (fixed shapes, in-place KV writes) removes the Python and
dispatcher work and fuses the elementwise arithmetic around glufx's ops.

How: transformers' `generate()` already compiles its decode forward when the cache is static and the
model's `generation_config.compile_config` says so; on CPU it must be told (`_compile_all_devices`).
The step goes through glufx's own torch.compile backend: in `exact` mode Inductor keeps eager's float
math (deploy/inductor.py), so each step's logits equal the traced graph's bit for bit; `exact=False` lets
Inductor generate every float op (faster norms, another valid W8A8 result). The traced step is not eager's
step, though: under tracing transformers attends with an explicit mask over the whole static cache, so
float sums run in another order and INT8 codes can flip (docs/decode.md measures it; on Gemma 3 270M greedy
tokens matched eager glufx's for 32 of 32, which is not guaranteed). A floating-point model
takes plain Inductor. Positions are not specialised: transformers keeps a sliding-window layer's length
as a Python int, which the first decode step specialises and the second makes dynamic; a window that
fills takes its other branch once more. So a generation compiles two or three graphs, and later positions
and calls with the same batch size and cache length reuse them.

A QFeP model (glufx.prefixed, glufx.load of a plan with a prefix) starts each generation from a static
cache that already holds the prefix's floating-point keys and values (prefix.py).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..nn import Int8GLU, Int8Linear
from ..prefix import as_prefixed


def language_model(model: nn.Module) -> nn.Module:
    """The HF causal LM that runs `model` (inside a QFeP wrapper or torch.compile), checked for generate()."""
    prefixed = as_prefixed(model)
    lm = prefixed.model if prefixed is not None else getattr(model, "_orig_mod", model)
    if not hasattr(lm, "generation_config") or not hasattr(lm, "generate"):
        raise TypeError(f"glufx.compile_decode: {type(lm).__name__} is not a transformers causal LM (it has no "
                        "generate()); pass the model glufx.compile / glufx.load returned, or an AutoModelForCausalLM")
    return lm


def compile_decode(model: nn.Module, *, max_cache_len: Optional[int] = None, exact: bool = True,
                   backend: Optional[str] = None, skip_module_guards: bool = False) -> nn.Module:
    """Make `model.generate()` decode with a static KV cache and a compiled single-token step; returns `model`.

    `max_cache_len`: positions the static cache holds (prompt, QFeP prefix and new tokens). Every
    generation that fits reuses one compiled step; a longer one grows the cache and compiles once more
    (transformers keeps the largest length seen). Unset, the first generation sets it. Each step attends
    over the whole static cache (masked), so a much larger cache than needed costs attention time.
    `exact` (glufx models): Inductor keeps eager's float math (deploy/inductor.py). `backend`: "glufx"
    (default for a model holding glufx ops) or "inductor" (default for a floating-point model).
    `skip_module_guards`: before each step dynamo re-checks every module attribute and buffer the graph
    read (1.3-1.6 ms of a ~30 ms Gemma 3 270M step at one thread, profiled); True drops those checks
    (`torch.compiler.skip_guard_on_all_nn_modules_unsafe`), which is right only while the model is left
    as it is after this call: no `.to()`, no swapped modules or reassigned buffers.
    """
    from transformers.generation.configuration_utils import CompileConfig

    lm = language_model(model)
    if next(lm.parameters()).device.type != "cpu":
        raise NotImplementedError("glufx.compile_decode: glufx's kernels run on CPU in this build; move the model "
                                  "to CPU first")
    quantized = any(isinstance(m, (Int8Linear, Int8GLU)) for m in lm.modules())
    backend = backend or ("glufx" if quantized else "inductor")
    if backend not in ("glufx", "inductor"):
        raise ValueError(f"glufx.compile_decode: backend must be 'glufx' or 'inductor', got {backend!r}")
    if backend == "glufx" and not quantized:
        raise ValueError("glufx.compile_decode: backend='glufx' needs a model glufx.compile / glufx.load lowered; "
                         "a floating-point model takes backend='inductor'")
    options = {"exact": exact} if backend == "glufx" else {}
    if skip_module_guards:
        import torch

        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    config = CompileConfig(fullgraph=True, dynamic=None, backend=backend, mode=None, options=options or None)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    if max_cache_len is not None:
        if max_cache_len < 2:
            raise ValueError(f"glufx.compile_decode: max_cache_len must hold a prompt and a new token, got {max_cache_len}")
        lm._previous_max_cache_length = max_cache_len  # transformers' own record of the largest static cache
    lm.generation_config.cache_implementation = "static"
    lm.generation_config.compile_config = config
    return model


def static_cache_length(lm: nn.Module, needed: int) -> int:
    """The static cache size for a generation needing `needed` positions: the largest seen so far, as
    transformers sizes its own static caches, so the compiled step keeps its shapes."""
    length = max(needed, getattr(lm, "_previous_max_cache_length", -1))
    lm._previous_max_cache_length = length
    return length
