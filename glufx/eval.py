"""Evaluation (SPEC §5): perplexity on non-overlapping windows of a tokenized text, BOS first."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import adds_bos


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
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True, desc: str = "ppl") -> float:
    """exp(mean NLL) over every predicted token of every window (identical denominators across methods)."""
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress):
        ids = windows[i:i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def wikitext2_windows(path: str | Path, tokenizer, seq_len: int = 512, n_windows: int = 16) -> torch.Tensor:
    return perplexity_windows(Path(path).read_text(encoding="utf-8"), tokenizer, seq_len, n_windows)
