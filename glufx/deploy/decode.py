"""Decoding with a compiled step: a static KV cache and one compiled graph for every position.

    model = glufx.compile_decode(glufx.load(dir))      # or any HF causal LM, glufx or floating point
    out = model.generate(input_ids, max_new_tokens=64)  # prompt and every later step compiled
    out = glufx.generate(model, input_ids, max_new_tokens=64)  # the same greedy tokens, in glufx's own token loop

Why: an eager decode step of a small model is hundreds of small ATen calls around a few INT8 GEMMs;
the GEMMs stream the weights at memory speed, the calls around them cost as much again. Compiling the
single-token step with a static cache (fixed shapes, in-place KV writes) removes the Python and
dispatcher work and fuses the elementwise arithmetic around glufx's ops.

How: transformers' `generate()` already compiles its decode forward when the cache is static and the
model's `generation_config.compile_config` says so; on CPU it must be told (`_compile_all_devices`).
The step goes through glufx's own torch.compile backend, with Inductor's wrapper (the code calling the
step's few hundred kernels) compiled to C++ (`cpp_wrapper`). Five things transformers' compiled decoding does
that cost more than the arithmetic, and what glufx does instead:
- a full sliding window is rolled by one slot per step (two window-sized copies per layer): glufx's
  static caches keep a full window as a ring (RingSlidingWindowLayer);
- grouped-query attention repeats each key-value head for its query heads under compile (a copy of the
  cache per layer): glufx packs a single query's heads onto their key-value head instead, as transformers
  does eagerly, and runs glufx::decode_attention on them, which reads each cached key and value once for all
  of the head's query rows (glufx_sdpa, the "glufx_sdpa" attention implementation of a compiled "sdpa"
  model; ATen's flash kernel took 2-4x as long at these shapes, benchmarks/bench_attention.py). The prompt
  step (compiled too, `compile_prompt`) runs glufx::prefill_attention through the same implementation: only
  the keys its mask can attend, about half of ATen's time on a causal prompt;
- by default the backend's `exact` mode keeps eager's float math (ATen calls for norms and
  transcendentals, deploy/inductor.py); here `exact=False` is the default and Inductor generates and
  fuses them. Bit-exactness to the traced graph buys a decode user nothing they can see: the traced
  step is not eager's step either (attention runs over the static cache with an explicit mask, so float
  sums run in another order and INT8 codes can flip), and both are valid W8A8 results; docs/decode.md
  measures how far each lands from eager glufx. `exact=True` keeps each step's logits equal to the traced
  graph run without Inductor, bit for bit.
- generate() builds each layer type's attention mask eagerly before every step, for a static cache, and
  passes them in: glufx gives it the padding mask instead, and the compiled step builds the same masks with
  the same functions, fused (`padding_mask_for_step`);
- dynamo checks its guards before every step, most of them on the model's modules and tensors (1.3 ms
  of a 10 ms Gemma 3 270M step): glufx skips those and checks the same things once per generate() call
  (`_compiled_step`, `model_fingerprint`), in a step function of this model's own.
A floating-point model takes plain Inductor. Positions are not specialised: transformers keeps a
sliding-window layer's length as a Python int, which the first decode step specialises and the second
makes dynamic; a window that fills takes its other branch once more. So a generation compiles two or
three graphs, and later positions and calls with the same batch size and cache length reuse them.

A QFeP model (glufx.prefixed, glufx.load of a plan with a prefix) starts each generation from a static
cache that already holds the prefix's floating-point keys and values (prefix.py).
"""
from __future__ import annotations

import collections
import functools
import itertools
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import StaticCache, StaticSlidingWindowLayer

from ..nn import LOWERED_MODULES
from ..prefix import as_prefixed

GLUFX_SDPA = "glufx_sdpa"  # the attention implementation compile_decode switches an "sdpa" model to


class RingSlidingWindowLayer(StaticSlidingWindowLayer):
    """transformers' static sliding-window cache layer, except that a full window is a ring.

    Why: transformers keeps a sliding window's slots in position order, so once the window is full every
    single-token step rolls the keys and the values by one slot: two copies of the whole window per layer
    and step. On Gemma 3 270M after a 512-token prompt (15 sliding layers of 512 slots) that was two
    thirds of the compiled step's own time. Attention does not need the order: keys are cached after the
    rotary embedding, and once the window is full a single query attends to every slot (the sliding mask
    transformers builds for it, `kv > q - window` over the window's positions, is all true). So here a full
    window's new key and value overwrite the oldest slot in place, at `next_slot`, a tensor the compiled
    step reads and advances (an int would specialise the graph). Anything that needs position order
    (several tokens on a full window: a chunked prefill, a continued chat) first puts the ring back in
    order, then takes transformers' own path.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.next_slot = torch.zeros(1, dtype=torch.long, device=self.device)  # the oldest slot of a full ring
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.next_slot)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # key_states: [B, H_kv, T, D]
        if key_states.shape[-2] == 1 and self.cumulative_length_int >= self.max_cache_len:
            self.cumulative_length_int += 1
            self.keys.index_copy_(2, self.next_slot, key_states)
            self.values.index_copy_(2, self.next_slot, value_states)
            self.next_slot.add_(1).remainder_(self.max_cache_len)
            return self.keys, self.values
        self._unroll()
        return super().update(key_states, value_states, *args, **kwargs)

    def _unroll(self) -> None:
        """Put a ring back in position order (oldest slot first); tensor ops only, so it also traces."""
        order = (torch.arange(self.max_cache_len, device=self.device) + self.next_slot) % self.max_cache_len
        self.keys.copy_(self.keys.index_select(2, order))
        self.values.copy_(self.values.index_select(2, order))
        self.next_slot.zero_()

    def reset(self) -> None:
        super().reset()
        if self.is_initialized:
            self.next_slot.zero_()


def ring_sliding_windows(cache: StaticCache, config) -> StaticCache:
    """Swap a fresh static cache's sliding-window layers for ring layers (RingSlidingWindowLayer), in place.
    For generations without padding (`unpadded`): the padding mask addresses slots in position order.

    Only layers of type "sliding_attention" whose window is smaller than the cache: a chunked-attention
    layer (also a StaticSlidingWindowLayer in transformers) masks by chunk, which a ring would scramble,
    and a window that never fills never rolls."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    if len(layer_types) != len(cache.layers):
        return cache
    for i, (kind, layer) in enumerate(zip(layer_types, cache.layers)):
        if kind == "sliding_attention" and type(layer) is StaticSlidingWindowLayer and not layer.is_initialized \
                and not layer.is_croppable:
            ring = RingSlidingWindowLayer.__new__(RingSlidingWindowLayer)
            ring.__dict__.update(layer.__dict__)  # the same (not yet allocated) layer, as transformers built it
            cache.layers[i] = ring
    return cache


def glufx_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
               is_causal: Optional[bool] = None, **kwargs):
    """transformers' SDPA attention, run by glufx's attention kernels on float32 CPU tensors: a single query by
    `glufx::decode_attention`, its heads packed onto their key-value head; a longer one (a prompt) by
    `glufx::prefill_attention`. Same arguments, masks and results as `sdpa_attention_forward` (to float
    rounding), returned in its layout, [B, T, H, D].

    Why, a decode step: with grouped-query attention transformers repeats each key-value head for its query
    heads (`repeat_kv`, a copy of the whole cache per layer and step) whenever it runs under torch.compile;
    eagerly it packs a single query's heads as rows of one key-value head instead (`pack_gqa`). Under compile a
    decode step's query length is static, so the packing traces as well. ATen's CPU flash kernel then costs
    about 2.5x what reading the cache does at a decode step's few rows; `glufx::decode_attention` reads each
    cached key and value once for all of its head's query rows (csrc/cpu/decode_attention.cpp; Gemma 3 270M,
    546 cached positions, cache in memory, AMD Zen 5: 101 -> 43 us per layer at one thread, 106 -> 37 at two).
    Why, a prompt: ATen's flash kernel computes whole blocks of 512 keys whether the mask keeps them or not
    (a causal mask's upper half, a sliding window's far keys) and repeats a key-value head's work for each of
    its query heads; `glufx::prefill_attention` computes only the keys a block of queries can attend, with a
    key-value head's query heads stacked in one GEMM (csrc/cpu/prefill_attention.cpp; 512 causal tokens, AMD
    Zen 5, one thread: 10.3 -> 5.7 ms per Gemma 3 270M layer, benchmarks/bench_attention.py).
    Anything else (dropout, a soft cap, a position bias, attention sinks, other dtypes or devices) takes
    transformers' SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    B, H, T, D = query.shape  # query: [B, H, T, D]; key, value: [B, H_kv, S, D]
    mask = attention_mask
    if (dropout and module.training) or query.requires_grad or (T == 1 and groups > DECODE_ATTENTION_ROWS) \
            or any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "s_aux", "sinks")) \
            or kwargs.get("output_attentions", False) or not _attention_kernels_take(query, key, value, mask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = D ** -0.5 if scaling is None else scaling
    if T > 1:
        # transformers' rule: causal only without a mask, unless the call or the module says otherwise
        causal = mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        return torch.ops.glufx.prefill_attention(query, key, value, mask, bool(causal), scale), None  # [B, T, H, D]
    packed = query.reshape(B, H // groups, groups, D)  # [B, H_kv, groups, D]: a key-value head's queries as rows
    if mask is not None and mask.dim() == 4 and mask.shape[1] != 1:  # per head: [B, H_kv, groups, S] like the queries
        mask = mask.reshape(mask.shape[0], H // groups, groups, mask.shape[-1])
    out = torch.ops.glufx.decode_attention(packed, key, value, mask, scale)  # [B, H_kv, groups, D]
    return out.reshape(B, H, 1, value.shape[-1]).transpose(1, 2).contiguous(), None  # [B, 1, H, D]


DECODE_ATTENTION_ROWS = 16  # query rows per key-value head glufx::decode_attention takes


def _attention_kernels_take(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            mask: Optional[torch.Tensor]) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (query, key, value)) \
        and key.shape[-1] == value.shape[-1] == query.shape[-1] and query.shape[1] % key.shape[1] == 0 \
        and (mask is None or (mask.dtype in (torch.bool, torch.float32) and mask.device.type == "cpu"))


def _use_glufx_sdpa(lm: nn.Module) -> None:
    """Switch an "sdpa" model to glufx_sdpa (registered with transformers under GLUFX_SDPA, with
    SDPA's masks); any other attention implementation is left as it is."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if getattr(lm.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(GLUFX_SDPA, glufx_sdpa)
    AttentionMaskInterface.register(GLUFX_SDPA, sdpa_mask)
    lm.set_attn_implementation(GLUFX_SDPA)


def _ring_static_caches(lm: nn.Module) -> None:
    """Make generate()'s static caches ring their sliding windows: wrap this model's (not the class's)
    `_prepare_static_cache`, the one place transformers builds them."""
    if getattr(lm, "_glufx_ring_caches", False):
        return
    lm._prepare_static_cache = types.MethodType(_prepare_ring_static_cache, lm)  # a deepcopy rebinds it to the copy
    lm._glufx_ring_caches = True


def _prepare_ring_static_cache(self, *args, **kwargs):
    cache = type(self)._prepare_static_cache(self, *args, **kwargs)  # transformers' own, from the class
    model_kwargs = kwargs.get("model_kwargs", args[4] if len(args) > 4 else None) or {}
    if not isinstance(cache, StaticCache) or not unpadded(model_kwargs.get("attention_mask")):
        return cache
    return ring_sliding_windows(cache, self.config)


_step_names = itertools.count()
_SCALARS = (bool, int, float, str, type(None))


def model_fingerprint(lm: nn.Module) -> int:
    """What dynamo's guards on a model check, taken at once: every module's identity, class and plain
    attributes (`training`, a linear's granularity...), every parameter's and buffer's identity, dtype, shape and
    device, and the config's plain attributes. Values are not in it: a compiled step reads parameters and buffers
    as inputs, so editing them in place needs no new graph. About 1 ms on Gemma 3 270M (~600 modules)."""
    parts = []
    configs = (getattr(lm, "config", None), getattr(getattr(lm, "config", None), "text_config", None))
    for cfg in configs:
        if cfg is not None:
            parts.append((id(cfg), tuple((k, v) for k, v in vars(cfg).items() if isinstance(v, _SCALARS))))
    for name, mod in lm.named_modules(remove_duplicate=False):
        parts.append((name, id(mod), type(mod), tuple((k, v) for k, v in vars(mod).items() if isinstance(v, _SCALARS))))
        for key, t in itertools.chain(mod._parameters.items(), mod._buffers.items()):
            parts.append((key, None) if t is None else (key, id(t), t.dtype, tuple(t.shape), t.device))
    return hash(tuple(parts))


def _compiled_step(self, compile_config):
    """transformers' `get_compiled_call` for a compile_decode model (called once per generate()): the compiled
    step of this model, compiled anew when the model or the config changed since it was made.

    Why: dynamo checks its guards before every step, and on a model most of them are on modules, parameters and
    buffers (about 5000 on Gemma 3 270M: 1.3 ms of a 10 ms step at two threads, profiled). compile_decode drops
    those guards (`skip_module_guards`) and checks the same things here, once per generation
    (`model_fingerprint`). Dynamo keeps compiled graphs per code object, and transformers compiles
    `self.__call__`, one code object shared by every nn.Module: so the step here is a function with a code
    object of its own, and graphs compiled without module guards can never run another model's call."""
    def step(*args, **kwargs):
        return self(*args, **kwargs)
    return _held_compiled(self, "_glufx_step", compile_config, "glufx_decode_step", step, **compile_config.to_dict())


def _held_compiled(lm: nn.Module, slot: str, config, name: str, fn, **compile_kwargs):
    """`torch.compile(fn, **compile_kwargs)`, held in `lm.<slot>` and made anew when `config` or the model
    (`model_fingerprint`) changed since; the function is renamed `<name>_<n>`, a code object of its own, so that
    dynamo keeps its graphs apart from every other model's and step's (`_compiled_step` says why)."""
    fingerprint = model_fingerprint(lm)
    held = lm.__dict__.get(slot)
    if held is None or held[0] != config or held[1] != fingerprint:
        fn.__code__ = fn.__code__.replace(co_name=f"{name}_{next(_step_names)}")
        held = (config, fingerprint, torch.compile(fn, **compile_kwargs))
        lm.__dict__[slot] = held
    return held[2]


def _prompt_or_eager_forward(self, *args, **kwargs):
    """The forward of a compile_decode model (compile_prompt=True): a prompt, more than one token without
    autograd, runs the compiled prompt step; a single token (the decode step's trace included), or a call that
    records gradients, runs the model's own forward.

    Why: transformers compiles only the decode step and runs a prompt eagerly, so the prompt's norms, rotary
    embeddings, activations and products run as hundreds of separate ATen calls over [T, hidden] tensors (a
    fifth of an eager Gemma 3 270M prefill of 512 tokens, profiled); compiled, Inductor fuses them. The prompt step
    compiles with every size dynamic, so that one graph serves every prompt length, and with Inductor's Python
    wrapper, whose few milliseconds per call a prompt does not notice and whose compilation takes a third of the
    C++ wrapper's."""
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    forward = type(self).forward
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or tokens is None or tokens.dim() < 2 \
            or tokens.shape[1] <= 1:
        return forward(self, *args, **kwargs)
    return _compiled_prompt(self)(*args, **kwargs)


def _compiled_prompt(lm: nn.Module):
    """The compiled prompt step of `lm`: its decode step's compile config (backend, exactness, guards) with
    every size dynamic and Inductor's Python wrapper; compiled anew when the model or that config changed, as
    the decode step is (`_compiled_step`)."""
    config = lm.generation_config.compile_config
    forward = type(lm).forward

    def prompt(*args, **kwargs):
        return forward(lm, *args, **kwargs)
    options = dict(config.options or {})
    if "cpp_wrapper" in options:
        options["cpp_wrapper"] = False
    if config.backend == "glufx":
        options["inductor_configs"] = {**options.get("inductor_configs", {}), **PROMPT_INDUCTOR_CONFIGS}
    elif config.backend == "inductor":
        options = {**options, **PROMPT_INDUCTOR_CONFIGS}
    return _held_compiled(lm, "_glufx_prompt", config, "glufx_prompt_step", prompt, backend=config.backend,
                          fullgraph=config.fullgraph, dynamic=True, options=options or None)


# Inductor settings of the prompt step. realize_reads_threshold=1 stores every intermediate more than one kernel reads,
# where Inductor otherwise recomputes a cheap-looking pointwise result inside each reader: transformers computes the
# rotary embedding's cos and sin once per forward, and Inductor evaluated them again in every layer's query and key
# kernels, per head (Gemma 3 270M, 512 tokens: 5 x 256 x 512 cos and sin per layer, about 23 ms of a 330 ms prefill
# at one thread; with this setting 291 ms, AMD Zen 5). The values are the same: each is computed once, stored, read.
PROMPT_INDUCTOR_CONFIGS = {"realize_reads_threshold": 1}


def padding_mask_for_step(*, attention_mask: Optional[torch.Tensor] = None, **_) -> Optional[torch.Tensor]:
    """A compile_decode model's `create_masks_for_generate`: the padding mask as generate() holds it ([B, S] or
    None), so that the model's forward builds its attention masks inside the compiled step.

    Why: for a static cache generate() builds every layer type's mask before each step (transformers'
    `create_masks_for_generate`, about thirty small ATen calls and their Python: 0.27 ms of a 10 ms Gemma 3 270M
    step at one thread, profiled) and passes them to the compiled step as inputs. The forward builds the same
    masks from the same functions when it gets the padding mask instead (the path every call without
    generate() takes), and compiled, Inductor fuses them into a few kernels (tg32 1.045x, tg32@512 1.04x at one
    thread, greedy tokens equal; docs/decode.md). Only models whose class has no mask builder of its own get
    this one (`compile_decode`): a model that defines it may need it elsewhere (image tokens, its own forward)."""
    return attention_mask


def unpadded(attention_mask: Optional[torch.Tensor]) -> bool:
    """Whether a generation's padding mask is all ones. A ring holds its slots out of position order, and a
    padding mask is laid out in position order: a padded batch keeps transformers' rolled windows."""
    return attention_mask is None or bool(attention_mask.all())


def language_model(model: nn.Module) -> nn.Module:
    """The HF causal LM that runs `model` (inside a QFeP wrapper or torch.compile), checked for generate()."""
    prefixed = as_prefixed(model)
    lm = prefixed.model if prefixed is not None else getattr(model, "_orig_mod", model)
    if not hasattr(lm, "generation_config") or not hasattr(lm, "generate"):
        raise TypeError(f"glufx.compile_decode: {type(lm).__name__} is not a transformers causal LM (it has no "
                        "generate()); pass the model glufx.compile / glufx.load returned, or an AutoModelForCausalLM")
    return lm


def compile_decode(model: nn.Module, *, max_cache_len: Optional[int] = None, exact: bool = False,
                   backend: Optional[str] = None, skip_module_guards: bool = True,
                   cpp_wrapper: bool = True, compile_prompt: bool = True, masks_in_step: bool = True) -> nn.Module:
    """Make `model.generate()` decode with a static KV cache and a compiled single-token step; returns `model`.

    `max_cache_len`: positions the static cache holds (prompt, QFeP prefix and new tokens). Every
    generation that fits reuses one compiled step; a longer one grows the cache and compiles once more
    (transformers keeps the largest length seen). Unset, the first generation sets it. Each step attends
    over the whole static cache (masked), so a much larger cache than needed costs attention time.
    `exact` (glufx models): Inductor keeps eager's float math (deploy/inductor.py), about 15 % slower
    per step on Gemma 3 270M at two threads (docs/decode.md); off by default (module doc). `backend`: "glufx"
    (default for a model holding glufx ops) or "inductor" (default for a floating-point model).
    `cpp_wrapper`: Inductor writes the code that calls the step's kernels as C++, not Python: the first
    compile takes longer (a C++ build), each step saves the Python work of a few hundred kernel calls
    (Gemma 3 270M, two threads: 48.5 -> 53 tok/s, docs/decode.md).
    `skip_module_guards` (default True): dynamo's guards on the model's modules, parameters and buffers are
    not checked before each step (1.3 ms of a 10 ms Gemma 3 270M step at two threads); the same things are
    checked once per generate() call instead (`model_fingerprint`: identities, classes, plain attributes, dtypes,
    shapes, devices), and a model changed since its step was compiled (`.to()`, a swapped module, a reassigned
    buffer, `.train()`) compiles a new one. False keeps dynamo's guards on every step.

    `compile_prompt` (default True): prompts run a compiled prompt step of their own (`_prompt_or_eager_forward`).
    `masks_in_step` (default True): the compiled steps build their attention masks from the padding mask, where
    generate() would build them eagerly before each step (`padding_mask_for_step`); for models whose class has no
    `create_masks_for_generate` of its own.

    Besides its generation config, the model changes in three ways (module doc): an "sdpa" model's attention
    implementation becomes "glufx_sdpa" (the same arithmetic, eager or compiled, in glufx's attention kernels:
    glufx_sdpa), this model's static caches ring their full sliding windows, and (`masks_in_step`) it has a
    `create_masks_for_generate` of its own.
    """
    from transformers.generation.configuration_utils import CompileConfig

    lm = language_model(model)
    if next(lm.parameters()).device.type != "cpu":
        raise NotImplementedError("glufx.compile_decode: glufx's kernels run on CPU in this build; move the model "
                                  "to CPU first")
    quantized = any(isinstance(m, LOWERED_MODULES) for m in lm.modules())
    backend = backend or ("glufx" if quantized else "inductor")
    if backend not in ("glufx", "inductor"):
        raise ValueError(f"glufx.compile_decode: backend must be 'glufx' or 'inductor', got {backend!r}")
    if backend == "glufx" and not quantized:
        raise ValueError("glufx.compile_decode: backend='glufx' needs a model glufx.compile / glufx.load lowered; "
                         "a floating-point model takes backend='inductor'")
    options = {"exact": exact, "cpp_wrapper": cpp_wrapper} if backend == "glufx" else {"cpp_wrapper": cpp_wrapper}
    if skip_module_guards:
        options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    config = CompileConfig(fullgraph=True, dynamic=None, backend=backend, mode=None, options=options or None)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    if max_cache_len is not None:
        if max_cache_len < 2:
            raise ValueError(f"glufx.compile_decode: max_cache_len must hold a prompt and a new token, got {max_cache_len}")
        lm._previous_max_cache_length = max_cache_len  # transformers' own record of the largest static cache
    _ring_static_caches(lm)
    _use_glufx_sdpa(lm)
    lm.generation_config.cache_implementation = "static"
    lm.generation_config.compile_config = config
    lm.get_compiled_call = types.MethodType(_compiled_step, lm)  # a deepcopy rebinds it to the copy
    if lm.__dict__.get("create_masks_for_generate") is padding_mask_for_step:
        del lm.create_masks_for_generate
    if masks_in_step and getattr(type(lm), "create_masks_for_generate", None) is None:
        lm.create_masks_for_generate = padding_mask_for_step  # a plain function: generate() calls it with keywords only
    if getattr(getattr(lm.__dict__.get("forward"), "__func__", None), "_glufx_prompt_router", False):
        del lm.forward
    if compile_prompt:
        # generate() reads the forward's signature (whether it takes logits_to_keep, attention_mask, ...): the
        # router shows the model's own
        @functools.wraps(type(lm).forward)
        def forward(self, *args, **kwargs):
            return _prompt_or_eager_forward(self, *args, **kwargs)
        forward._glufx_prompt_router = True
        lm.forward = types.MethodType(forward, lm)  # a deepcopy rebinds it to the copy
    return model


def static_cache_length(lm: nn.Module, needed: int) -> int:
    """The static cache size for a generation needing `needed` positions: the largest seen so far, as
    transformers sizes its own static caches, so the compiled step keeps its shapes."""
    length = max(needed, getattr(lm, "_previous_max_cache_length", -1))
    lm._previous_max_cache_length = length
    return length


def _compiled_greedy_step(lm: nn.Module):
    """The compiled step of glufx's own token loop (`generate`): the model's single-token forward and the argmax
    over its logits in one graph, with the decode step's compile config; compiled anew when the model or that
    config changed, as `_compiled_step` is. The argmax inside the graph: ATen's over Gemma 3's 262k logits took
    0.16 ms a token at one thread, as a fused reduction it is one pass over 1 MB."""
    def greedy_step(input_ids, position_ids, attention_mask, cache):
        # input_ids, position_ids: [B, 1]; attention_mask: [B, cache length] or None -> next tokens [B]
        logits = lm(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache,
                    use_cache=True, logits_to_keep=1).logits  # [B, 1, V]
        return logits[:, -1].argmax(-1)
    config = lm.generation_config.compile_config
    return _held_compiled(lm, "_glufx_greedy", config, "glufx_greedy_step", greedy_step, **config.to_dict())


_FROM_CONFIG = object()


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
             attention_mask: Optional[torch.Tensor] = None, eos_token_id=_FROM_CONFIG,
             pad_token_id: Optional[int] = None, on_token=None, skip_guards: bool = True) -> torch.Tensor:
    """Greedy decoding of a compile_decode model in glufx's own token loop; returns [B, T + new] token ids (prompt and
    new tokens, as `model.generate()` returns them; a QFeP model's prefix is not in them).

        model = glufx.compile_decode(glufx.load(dir))
        out = glufx.generate(model, input_ids, max_new_tokens=64)   # = model.generate(input_ids, do_sample=False, ...)

    The same tokens as `model.generate(input_ids, attention_mask=..., do_sample=False, max_new_tokens=...)` on the
    same model: the same static cache (ring windows, a QFeP prefix), the same compiled prompt step, the same
    single-token forward, the argmax of the last logits; logits processors a generation config may add (repetition
    penalties, bad words) are not applied. Rows stop at `eos_token_id` (default: the generation config's; None: never
    stop) and are padded with `pad_token_id` (default: the config's, else the first EOS), and the loop ends when
    every row has stopped. `on_token(tokens)` is called with each step's new tokens ([B]), the first after the
    prompt, for streaming (it must not change the model). `skip_guards` (default True): dynamo's guards run only at
    the steps where another graph may be needed (`_guarded_steps`), not before every step; between them the code
    dynamo compiled for the step is called directly, once its guards passed (`_compiled_code_for`).

    Why: transformers' generate() loop costs about 0.65 ms a token around a compiled step (preparing inputs,
    logits processors, stopping criteria, growing the mask and the ids; Gemma 3 270M at one thread, a 9 ms step,
    measured) and runs ATen's argmax over the whole vocabulary; here a step is one call of a compiled function whose
    graph ends in the argmax (`_compiled_greedy_step`), and the ids are written into a preallocated tensor."""
    lm, prefixed = language_model(model), as_prefixed(model)
    if getattr(lm.generation_config, "compile_config", None) is None \
            or getattr(getattr(lm, "get_compiled_call", None), "__func__", None) is not _compiled_step:
        raise ValueError("glufx.generate: the model has no compiled decode step; call glufx.compile_decode(model) "
                         "first (it returns the model)")
    if input_ids.dim() != 2 or input_ids.dtype != torch.long or input_ids.shape[1] == 0:
        raise ValueError(f"glufx.generate: input_ids must be a non-empty [batch, tokens] int64 tensor, got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype}")
    if max_new_tokens < 1:
        raise ValueError(f"glufx.generate: max_new_tokens must be at least 1, got {max_new_tokens}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"glufx.generate: attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    eos = lm.generation_config.eos_token_id if eos_token_id is _FROM_CONFIG else eos_token_id
    eos = None if eos is None else torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)
    if pad_token_id is None:
        pad_token_id = lm.generation_config.pad_token_id
    if pad_token_id is None and eos is not None:
        pad_token_id = int(eos[0])

    prefix_length = 0
    if prefixed is not None:
        input_ids, attention_mask = prefixed._drop_bos(input_ids, attention_mask)
        prefix_length = prefixed.prefix_length
    B, T = input_ids.shape
    padded = not unpadded(attention_mask)
    length = static_cache_length(lm, prefix_length + T + max_new_tokens)
    if prefixed is not None:
        cache = prefixed.prefix_cache(B, length, ring=not padded)
    else:
        cache = StaticCache(config=lm.config, max_cache_len=length)
        cache = cache if padded else ring_sliding_windows(cache, lm.config)

    # transformers' positions: a row's count of real tokens before each one (left padding), pads at 1
    mask = torch.ones(B, length, dtype=torch.long)  # [B, L]: the padding mask over every cache slot
    if attention_mask is not None:
        mask[:, prefix_length:prefix_length + T] = attention_mask.long()
    positions = mask[:, :prefix_length + T].cumsum(-1) - 1  # [B, P + T]
    positions.masked_fill_(mask[:, :prefix_length + T] == 0, 1)
    step_mask = mask if padded else None  # unpadded: no mask, as generate() drops an all-ones one

    out = torch.empty(B, T + max_new_tokens, dtype=torch.long)
    out[:, :T] = input_ids
    # generate()'s arguments for a prompt (a padding mask only where there is padding): the same compiled prompt graph
    # (clones with dense strides: a [1, T] slice of a longer batch is "contiguous" with another row stride)
    dense = functools.partial(torch.clone, memory_format=torch.contiguous_format)
    prompt = dict(input_ids=dense(input_ids), cache=cache, position_ids=dense(positions[:, prefix_length:]),
                  use_cache=True, logits_to_keep=1, return_dict=True)
    if padded:
        prompt["attention_mask"] = mask[:, :prefix_length + T]
    logits = lm(**prompt).logits  # [B, 1, V]
    tokens = logits[:, -1].argmax(-1)  # [B]
    step = _compiled_greedy_step(lm)
    guarded = _guarded_steps(cache, prefix_length + T, max_new_tokens) if skip_guards else range(max_new_tokens)
    position = positions[:, -1:] + 1  # [B, 1]
    unfinished = torch.ones(B, dtype=torch.bool)
    for i in range(max_new_tokens):
        if eos is not None:
            tokens = torch.where(unfinished, tokens, pad_token_id)
            unfinished &= ~torch.isin(tokens, eos)
        out[:, T + i] = tokens
        if on_token is not None:
            on_token(tokens)
        if i + 1 == max_new_tokens or (eos is not None and not bool(unfinished.any())):
            return out[:, :T + i + 1]
        # tokens[:, None]: a view at offset 0, the same input guards every step
        args = (tokens[:, None], position, step_mask, cache)
        if i in guarded:
            with torch.compiler.config.patch(dynamic_sources=_dynamic_sources()):
                tokens = step(*args)
            unguarded = _UNRESOLVED
        else:
            if unguarded is _UNRESOLVED:
                unguarded = _compiled_code_for(step, args, lm)
            if unguarded is not None:
                counters["direct_steps"] += 1
                tokens = unguarded(*args)
            else:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    tokens = step(*args)
        position = position + 1
    return out


_UNRESOLVED = object()
counters: collections.Counter = collections.Counter()  # "direct_steps": unguarded steps run without dynamo's lookup


def _compiled_code_for(step, args: tuple, lm: nn.Module):
    """The code dynamo compiled for the greedy step (`_compiled_greedy_step`) and these arguments, as a function to
    call in place of the step between guarded steps; None where there is none to trust (the step then runs under
    `skip_guard_eval_unsafe`).

    Why: even with its guards skipped, dynamo's frame evaluation looks the step up among its compiled entries and runs
    the guards that tell them apart, 0.16 ms of a 9.5 ms Gemma 3 270M token at one thread (torch.profiler, "TorchDynamo
    Cache Lookup"); the entry's own code does nothing else. Dynamo keeps a code object's entries most recently used
    first, so the entry the last guarded step ran is the first, and its guards are checked here, once, against the
    first unguarded step's own arguments: an entry that does not match (dynamo ran the step eagerly at its recompile
    limit, say) is never called. From there until the next guarded step only the cache's fill changes
    (`_guarded_steps` says why no graph depends on it there)."""
    fn = getattr(step, "_torchdynamo_orig_callable", None)
    if fn is None or fn.__code__.co_freevars != ("lm",):
        return None
    entries = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__)
    frame_locals = dict(zip(fn.__code__.co_varnames, args), lm=lm)
    if not entries or not entries[0].guard_manager.check(frame_locals):
        return None
    return types.FunctionType(entries[0].code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


# A static cache layer's length as a Python int (transformers' StaticLayer / StaticSlidingWindowLayer), dynamic from
# the first compiled step: left to dynamo, the first step's graph specialises it and the second compiles another, and
# with two graphs for one step even the unguarded steps check every cache tensor to tell them apart (0.14 ms of a
# 9 ms Gemma 3 270M step at one thread). A transformers whose layers name it otherwise gets dynamo's default.
CACHE_LENGTH_SOURCES = r"L\['cache'\]\.layers\[\d+\]\.cumulative_length_int"


def _dynamic_sources() -> str:
    own = torch.compiler.config.dynamic_sources
    return f"{own},{CACHE_LENGTH_SOURCES}" if own else CACHE_LENGTH_SOURCES


GUARD_MARGIN = 2  # steps either side of a cache layer's capacity that run dynamo's guards (`_guarded_steps`)


def _guarded_steps(cache, context: int, new_tokens: int) -> set[int]:
    """The decode steps of one generation (step i feeds the i-th new token, with `context + i` positions cached)
    that run dynamo's guards; the others call the compiled entry the last guarded step chose (`_compiled_code_for`),
    or, where there is none to trust, run only the guards that tell its compiled graphs apart
    (`skip_guard_eval_unsafe`).

    Why this is safe: within one generation nothing a guard checks changes but the cache's fill. Its modules, config
    and inputs' shapes and dtypes stay as they were (the model's, checked once per call by `model_fingerprint`), and
    the step's graph depends on the fill only through comparisons of a layer's length with its capacity (a sliding
    window starting to drop keys, a ring starting to wrap: transformers' mask sizes, RingSlidingWindowLayer). So the
    steps that may need another graph are the first two (the first compiles the step, or, on a transformers whose
    cache lengths CACHE_LENGTH_SOURCES does not name, specialises them and the second makes them dynamic) and those
    within GUARD_MARGIN of a layer's capacity; there the guards run, and a graph compiled there is one the unguarded
    steps after it choose by the guards that differ. `on_token` runs between steps: it must not change the model."""
    capacities = {int(layer.max_cache_len) for layer in getattr(cache, "layers", ()) if hasattr(layer, "max_cache_len")}
    if not capacities:
        return set(range(new_tokens))
    return {i for i in range(new_tokens)
            if i < 2 or any(abs(context + i - capacity) <= GUARD_MARGIN for capacity in capacities)}
