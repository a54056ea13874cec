"""QFeP injection: the prefix's full-precision KV cache in front of every call of a causal LM.

Route (docs/design.md, "QFeP injection"): a wrapper that, on each call, builds a fresh `DynamicCache` from the stored
per-layer prefix K/V (expanded to the batch) and calls the model with `cache=`. It reuses the model's
own concatenation, position, mask and sliding-window logic, so it is exact for every family
(GQA, sliding layers, q/k-norm) and traces under torch.export and torch.compile unchanged. The graph
route (concatenating at SDPA inputs, shifting rotary positions, editing masks) depends on SDPA and on
each model's mask rules; it was rejected for that reason. The stored tensors are never mutated.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn


@dataclass
class PrefixKV:
    token_ids: list[int]
    keys: list[torch.Tensor]  # per layer [1, H_kv, P_l, D] (post-RoPE; P_l < P on a full sliding window)
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return len(self.token_ids)

    def state_dict(self) -> dict[str, torch.Tensor]:
        d = {"token_ids": torch.tensor(self.token_ids, dtype=torch.long)}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            d[f"keys.{i}"], d[f"values.{i}"] = k.contiguous(), v.contiguous()
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "PrefixKV":
        n = sum(k.startswith("keys.") for k in d)
        return cls(d["token_ids"].tolist(), [d[f"keys.{i}"] for i in range(n)], [d[f"values.{i}"] for i in range(n)])

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(path))

    @classmethod
    def load(cls, path: str | Path) -> "PrefixKV":
        from safetensors.torch import load_file

        return cls.from_state_dict(load_file(str(path)))


@torch.no_grad()
def compute_prefix_kv(model: nn.Module, token_ids: list[int]) -> PrefixKV:
    """Run the prefix through `model` (which must still be the floating-point model) once."""
    out = model(input_ids=torch.tensor([token_ids], device=model.device), use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    return PrefixKV(list(token_ids), [l.keys.detach().clone() for l in cache.layers],
                    [l.values.detach().clone() for l in cache.layers])


class PrefixedLM(nn.Module):
    """A causal LM that starts every call from the QFeP prefix cache.

    Takes the user's normal inputs (no BOS needed: it is inside the prefix; a leading BOS is dropped),
    returns outputs for the user's tokens only; `generate()` returns prompt + new tokens.
    """

    def __init__(self, model: nn.Module, prefix: PrefixKV, drop_bos: bool = True):
        super().__init__()
        self.model = model
        # Dropping a user's BOS is a data-dependent branch: traced and exported wrappers take inputs
        # without BOS instead (drop_bos=False).
        self.drop_bos = drop_bos
        self.register_buffer("prefix_ids", torch.tensor(prefix.token_ids, dtype=torch.long))
        for i, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
            self.register_buffer(f"prefix_k{i}", k)
            self.register_buffer(f"prefix_v{i}", v)
        self.n_layers = len(prefix.keys)
        bos = getattr(model.config, "bos_token_id", None)
        self.bos_token_id: Optional[int] = bos if bos is not None and bos in prefix.token_ids else None

    @property
    def prefix_length(self) -> int:
        return int(self.prefix_ids.numel())

    def prefix(self) -> PrefixKV:
        return PrefixKV(self.prefix_ids.tolist(), [getattr(self, f"prefix_k{i}") for i in range(self.n_layers)],
                        [getattr(self, f"prefix_v{i}") for i in range(self.n_layers)])

    def prefix_cache(self, batch: int, max_cache_len: Optional[int] = None, ring: bool = True):
        """A new cache holding the prefix: dynamic, or static with room for `max_cache_len` positions
        (the prefix included) for a compiled decode step (deploy/decode.py; `ring`: full sliding windows
        as rings, for generations without padding)."""
        from transformers import DynamicCache, StaticCache

        from .deploy.decode import ring_sliding_windows

        if max_cache_len is None:
            cache = DynamicCache(config=self.model.config)
        else:
            cache = StaticCache(config=self.model.config, max_cache_len=max_cache_len)
            cache = ring_sliding_windows(cache, self.model.config) if ring else cache
        for i in range(self.n_layers):
            k, v = getattr(self, f"prefix_k{i}"), getattr(self, f"prefix_v{i}")
            # expand() makes views; the cache concatenates into new tensors, so the buffers stay intact
            cache.update(k.expand(batch, *k.shape[1:]), v.expand(batch, *v.shape[1:]), i)
        return cache

    def _drop_bos(self, input_ids, attention_mask):
        """A tokenizer that adds BOS would put it in twice: drop a leading BOS column, mask a left-padded one."""
        if not self.drop_bos or self.bos_token_id is None or input_ids is None or input_ids.shape[1] == 0:
            return input_ids, attention_mask
        if bool((input_ids[:, 0] == self.bos_token_id).all()) and input_ids.shape[1] > 1:
            return input_ids[:, 1:], attention_mask[:, 1:] if attention_mask is not None else None
        if attention_mask is not None:
            first = attention_mask.long().argmax(dim=1)  # first real token of each (left-padded) row
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            is_bos = input_ids[rows, first] == self.bos_token_id
            if bool(is_bos.any()):
                attention_mask = attention_mask.clone()
                attention_mask[rows[is_bos], first[is_bos]] = 0
        return input_ids, attention_mask

    def _with_prefix_mask(self, attention_mask, batch: int, length: int, device):
        ones = torch.ones(batch, self.prefix_length, dtype=torch.long, device=device)
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
        return torch.cat([ones, attention_mask.long()], dim=1)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, labels=None,
                use_cache=None, logits_to_keep=0, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        if cache is None:  # a new sequence: start from the prefix
            input_ids, attention_mask = self._drop_bos(input_ids, attention_mask)
            if labels is not None and labels.shape[1] != input_ids.shape[1]:
                labels = labels[:, labels.shape[1] - input_ids.shape[1]:]
            B, T = input_ids.shape
            cache = self.prefix_cache(B)
            attention_mask = self._with_prefix_mask(attention_mask, B, T, input_ids.device)
            if position_ids is not None:
                position_ids = position_ids + self.prefix_length
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         labels=labels, use_cache=True, logits_to_keep=logits_to_keep, **kwargs)
        if use_cache is False:  # the caller wants no cache back (torch.export cannot return one unregistered)
            out = type(out)(**{k: v for k, v in out.items() if k not in ("cache", "past_key_values")})
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        input_ids, attention_mask = self._drop_bos(input_ids, attention_mask)
        B, T = input_ids.shape
        full = torch.cat([self.prefix_ids.to(input_ids.device).expand(B, -1), input_ids], dim=1)
        mask = self._with_prefix_mask(attention_mask, B, T, input_ids.device)
        static_length = self._static_length(T, kwargs)
        # transformers refuses a cache object beside `cache_implementation`, and merges the model's own setting
        # into a config passed in: the prefix cache is the static cache, so the setting is off for this call
        config = self.model.generation_config
        implementation = config.cache_implementation
        try:
            if static_length is not None:
                config.cache_implementation = None
            from .deploy.decode import unpadded

            cache = self.prefix_cache(B, static_length, ring=unpadded(attention_mask))
            out = self.model.generate(full, attention_mask=mask, cache=cache, **kwargs)
        finally:
            config.cache_implementation = implementation
        sequences = out.sequences if hasattr(out, "sequences") else out
        sequences = sequences[:, self.prefix_length:]
        if hasattr(out, "sequences"):
            out.sequences = sequences
            return out
        return sequences

    def _static_length(self, prompt_length: int, kwargs: dict) -> Optional[int]:
        """The static cache size a compiled decode needs (None: a dynamic cache will do). transformers sizes its
        own static caches from the generation length; the prefix cache is built here, so it is sized here."""
        import copy

        config = kwargs.get("generation_config") or self.model.generation_config
        implementation = kwargs.pop("cache_implementation", None) or getattr(config, "cache_implementation", None)
        if implementation != "static":
            return None
        if "generation_config" in kwargs:  # the caller's config, copied with the setting off (see generate)
            kwargs["generation_config"] = copy.deepcopy(config)
            kwargs["generation_config"].cache_implementation = None
        new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
        if new_tokens is None:
            new_tokens = kwargs.get("max_length", config.max_length) - prompt_length
        from .deploy.decode import static_cache_length

        return static_cache_length(self.model, self.prefix_length + prompt_length + new_tokens)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)


def attach_prefix(model: nn.Module, prefix: PrefixKV) -> nn.Module:
    """Give an HF causal LM the QFeP prefix in place, for loaders that must return the model object they built
    (transformers' from_pretrained): its class becomes a subclass whose forward and generate start a new
    sequence from the prefix, through a PrefixedLM around the model. Calls that bring their own cache (every
    step after the first) run the original forward. `as_prefixed(model)` returns that PrefixedLM."""
    base = type(model)

    def forward(self, *args, **kwargs):
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            return self._glufx_prefixed(*args, **kwargs)  # it calls back here with its prefix cache
        return base.forward(self, *args, **kwargs)

    def generate(self, *args, **kwargs):
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            return self._glufx_prefixed.generate(*args, **kwargs)
        return base.generate(self, *args, **kwargs)

    wrapper = PrefixedLM(model, prefix)
    # held outside the module tree: the wrapper holds the model, and a cycle would recurse in state_dict()
    object.__setattr__(model, "_glufx_prefixed", wrapper)
    model.__class__ = type(f"Prefixed{base.__name__}", (base,), {"forward": forward, "generate": generate,
                                                                 "__module__": base.__module__})
    return model


def as_prefixed(model: nn.Module) -> Optional[PrefixedLM]:
    """The PrefixedLM that runs `model` (itself, the one attach_prefix gave it, or either under torch.compile),
    or None for a model without a QFeP prefix."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, PrefixedLM):
        return model
    return model.__dict__.get("_glufx_prefixed")
