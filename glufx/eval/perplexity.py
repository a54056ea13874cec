"""Evaluation (docs/method.md §5): perplexity on non-overlapping windows of a tokenized text, BOS first."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibdata import adds_bos


def perplexity_windows(text: str, tokenizer, seq_len: int, n_windows: Optional[int] = None) -> torch.Tensor:
    """[W, seq_len] windows: BOS (when the model uses one) + seq_len - 1 consecutive tokens of `text`."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    bos = adds_bos(tokenizer)
    body = seq_len - (bos is not None)
    W = len(ids) // body if n_windows is None else min(n_windows, len(ids) // body)
    win = ids[: W * body].view(W, body)
    if bos is not None:
        win = torch.cat([torch.full((W, 1), bos, dtype=torch.long), win], dim=1)
    return win


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True, desc: str = "ppl",
               first_scored: int = 1) -> float:
    """exp(mean NLL) over tokens at window positions >= `first_scored` (BOS sits at 0).

    A QFeP model (PrefixedLM) replaces BOS by its prefix: it gets the window without BOS and produces
    no prediction for position 1, so tables that compare it use first_scored=2 for every row, keeping
    the denominators identical across methods (docs/method.md §5).
    """
    from ..prefix import as_prefixed

    prefixed = as_prefixed(model) is not None  # a PrefixedLM or a loaded model with its prefix attached
    if prefixed and first_scored < 2:
        raise ValueError("perplexity: a QFeP model predicts tokens from position 2 on; pass first_scored=2 "
                         "(and use it for every model you compare against)")
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress):
        ids = windows[i:i + batch_size]
        start = 1 if prefixed else 0  # logits[:, j] predicts ids[:, start + j + 1]
        logits = model(input_ids=ids[:, start:], use_cache=False).logits[:, :-1].float()
        first = first_scored - start - 1
        logits, targets = logits[:, first:], ids[:, first_scored:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return math.exp(nll / count)


def wikitext2_windows(path: str | Path, tokenizer, seq_len: int = 512, n_windows: int = 16) -> torch.Tensor:
    return perplexity_windows(Path(path).read_text(encoding="utf-8"), tokenizer, seq_len, n_windows)


def wikitext_perplexity(model, tokenizer, path: str | Path | None = None, windows: int = 16, seq_len: int = 512,
                        progress: bool = True) -> dict[str, float]:
    """WikiText-2 perplexity as docs/method.md §5 tabulates it: scored from position 2 for every model, so that a
    QFeP model (no prediction for position 1) shares the others' denominator. `path` is wiki.test.raw; None takes
    the excerpt glufx ships, for quick runs."""
    from importlib.resources import files

    text = Path(path) if path is not None else files("glufx") / "resources" / "wikitext2_test_excerpt.txt"
    ids = perplexity_windows(text.read_text(encoding="utf-8"), tokenizer, seq_len, windows)
    return {"perplexity": perplexity(model, ids, progress=progress, desc="wikitext", first_scored=2)}
