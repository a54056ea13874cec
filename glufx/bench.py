"""Prefill and decode speed of a causal LM as a user runs it (`glufx bench`, benchmarks/).

Prefill: one forward over a prompt of random ordinary tokens (no cache, the last position's logits,
as generation needs). Decode: greedy `generate()` of `new_tokens` tokens after a short prompt, timed end
to end, with the end-of-sequence token unset for the run so every token is generated (`min_new_tokens`
would add a vocabulary-wide mask per step: 6.2 ms of `isin`, `where` and `arange` on Gemma 3's 262k
vocabulary, 16 % of its eager decode step at one thread).
Medians of `repeats` after one warm-up run (which also compiles a `glufx.compile_decode` model).
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
    config = model.generation_config
    eos = config.eos_token_id
    config.eos_token_id = None
    try:
        decode = timed(lambda: model.generate(input_ids=short, attention_mask=torch.ones_like(short),
                                              max_new_tokens=new_tokens, do_sample=False))
    finally:
        config.eos_token_id = eos
    return {"prefill_s": prefill, "decode_s": decode, "prefill_tok_s": prompt_len / prefill,
            "decode_tok_s": new_tokens / decode, "threads": torch.get_num_threads()}
