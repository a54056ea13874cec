"""Prefill and decode speed of a causal LM as a user runs it (`glufx bench`, benchmarks/).

Prefill: one forward over a prompt of random ordinary tokens (no cache, the last position's logits,
as generation needs). Decode: greedy `generate()` of `new_tokens` tokens after a short prompt, every
token forced (min_new_tokens), timed end to end. Medians of `repeats` after one warm-up run.
"""
from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def bench_generation(model, prompt_len: int = 512, new_tokens: int = 32, repeats: int = 5, seed: int = 0) -> dict:
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(min(1000, vocab // 2), vocab, (1, prompt_len), generator=g)  # no special tokens
    short = prompt[:, :8]

    def timed(fn) -> float:
        fn()  # warm-up: prepared weight layouts, allocator
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    prefill = timed(lambda: model(input_ids=prompt, use_cache=False, logits_to_keep=1))
    decode = timed(lambda: model.generate(input_ids=short, attention_mask=torch.ones_like(short),
                                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False))
    return {"prefill_s": prefill, "decode_s": decode, "prefill_tok_s": prompt_len / prefill,
            "decode_tok_s": new_tokens / decode, "threads": torch.get_num_threads()}
