"""Calibration data: whatever the user has -> batches of model inputs with a token mask.

Language models take token tensors, a list of strings plus tokenizer, or a .txt / .jsonl path;
any other module takes an iterable of example inputs (tensors, tuples or dicts).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch


def is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "generate") and hasattr(model, "get_output_embeddings") \
        and model.get_output_embeddings() is not None


@dataclass
class Batch:
    args: tuple
    kwargs: dict
    mask: Optional[torch.Tensor] = None  # [B, T] bool: positions that enter statistics
    token_ids: Optional[torch.Tensor] = None  # [B, T]

    @property
    def n_sequences(self) -> int:
        return int(self.mask.shape[0]) if self.mask is not None else 1


@dataclass
class CalibrationSet:
    batches: list[Batch]
    heldout: list[Batch] = field(default_factory=list)  # for QFeM's loss search, never scored
    bos_token_id: Optional[int] = None

    @property
    def n_sequences(self) -> int:
        return sum(b.n_sequences for b in self.batches)

    def without_bos(self) -> "CalibrationSet":
        """The same sequences with their leading BOS removed (for a model whose QFeP prefix holds it)."""
        if self.bos_token_id is None:
            return self

        def strip(b: Batch) -> Batch:
            if b.token_ids is None or not bool((b.token_ids[:, 0] == self.bos_token_id).all()):
                return b
            ids, mask = b.token_ids[:, 1:], b.mask[:, 1:]
            kwargs = {**b.kwargs, "input_ids": ids, "attention_mask": mask.long()}
            return Batch(b.args, kwargs, mask, ids)

        return CalibrationSet([strip(b) for b in self.batches], [strip(b) for b in self.heldout], self.bos_token_id)

    @property
    def n_tokens(self) -> int:
        return sum(int(b.mask.sum()) if b.mask is not None else 0 for b in self.batches)


def read_texts(path: str | Path) -> list[str]:
    """A .jsonl file (one {"text": ...} per line) or a plain text file, as a list of documents."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"glufx: calibration file {path} does not exist")
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    return [path.read_text(encoding="utf-8")]


def adds_bos(tokenizer) -> Optional[int]:
    """BOS id if the tokenizer puts one in front of text by default (Gemma, Llama), else None (Qwen)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if len(ids) and ids[0] == bos else None


def token_windows(texts: list[str], tokenizer, seq_len: int, num_samples: int, seed: int = 0) -> list[torch.Tensor]:
    """Documents joined and cut into windows of `seq_len` tokens, BOS first when the model uses one
    (the paper's fixed-length calibration crops); windows drawn at random with a fixed seed."""
    bos = adds_bos(tokenizer)
    sep = tokenizer.eos_token or "\n\n"
    ids = tokenizer(sep.join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    body = seq_len - (bos is not None)
    n_windows = len(ids) // body
    if n_windows == 0:
        raise ValueError(f"glufx: calibration text has {len(ids)} tokens, fewer than one window of {seq_len}; "
                         "pass more text or a smaller seq_len")
    picks = sorted(random.Random(seed).sample(range(n_windows), min(num_samples, n_windows)))
    prefix = torch.tensor([bos] if bos is not None else [], dtype=torch.long)
    return [torch.cat([prefix, ids[i * body:(i + 1) * body]]) for i in picks]


def lm_sequences(calib_data: Any, tokenizer, seq_len: int, num_samples: int) -> list[torch.Tensor]:
    if isinstance(calib_data, (str, Path)):
        if tokenizer is None:
            raise ValueError("glufx: calibration from a file needs the model's tokenizer: glufx.compile(..., tokenizer=tok)")
        return token_windows(read_texts(calib_data), tokenizer, seq_len, num_samples)
    if isinstance(calib_data, torch.Tensor):
        if calib_data.dtype != torch.long or calib_data.dim() not in (1, 2):
            raise ValueError(f"glufx: token calibration data must be a [N, L] or [L] int64 tensor, got "
                             f"{tuple(calib_data.shape)} {calib_data.dtype}")
        rows = calib_data.view(-1, calib_data.shape[-1])
        return [r for r in rows[:num_samples]]
    items = list(calib_data)
    if not items:
        return []
    if all(isinstance(t, str) for t in items):
        if tokenizer is None:
            raise ValueError("glufx: calibration from strings needs the model's tokenizer: glufx.compile(..., tokenizer=tok)")
        bos = adds_bos(tokenizer)
        seqs = []
        for text in items[:num_samples]:
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][: seq_len - (bos is not None)]
            seqs.append(torch.cat([torch.tensor([bos]), ids]) if bos is not None else ids)
        return [s for s in seqs if len(s) > 0]
    if all(isinstance(t, torch.Tensor) and t.dtype == torch.long and t.dim() == 1 for t in items):
        return items[:num_samples]
    raise TypeError("glufx: for a language model, calib_data must be token ids ([N, L] int64 tensor or a list of "
                    "1-D tensors), a list of strings (with tokenizer=), or a path to a .txt / .jsonl file")


def pad_batches(seqs: list[torch.Tensor], batch_size: int, pad_id: int) -> list[Batch]:
    """Right-padded batches; the mask keeps padding out of every statistic."""
    batches = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        T = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.bool)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = s
            mask[j, : len(s)] = True
        batches.append(Batch(args=(), kwargs={"input_ids": ids, "attention_mask": mask.long(), "use_cache": False}, mask=mask, token_ids=ids))
    return batches


def _as_inputs(item: Any) -> tuple[tuple, dict]:
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, tuple):
        return item, {}
    if isinstance(item, list):
        return tuple(item), {}
    if isinstance(item, dict):
        return (), dict(item)
    raise TypeError(f"glufx: a calibration example must be a tensor, tuple or dict of inputs, got {type(item).__name__}")


def prepare(model: torch.nn.Module, calib_data: Any, tokenizer=None, *, seq_len: int, num_samples: int,
            batch_size: int, heldout_samples: int) -> CalibrationSet:
    if calib_data is None:
        raise ValueError("glufx: calibration data is None; pass token ids, strings (with tokenizer=), a text file "
                         "path, or example inputs")
    if is_causal_lm(model):
        seqs = lm_sequences(calib_data, tokenizer, seq_len, num_samples + heldout_samples)
        if not seqs:
            raise ValueError("glufx: calibration data is empty: pass at least one non-empty sequence "
                             "(the paper calibrates on 512 sequences; 32+ is a practical minimum)")
        n_held = min(heldout_samples, len(seqs) // 2)
        score_seqs, held = (seqs[:-n_held], seqs[-n_held:]) if n_held else (seqs, [])
        pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad_id = pad_id if pad_id is not None else (getattr(model.config, "pad_token_id", None) or 0)
        bos = adds_bos(tokenizer) if tokenizer is not None else getattr(model.config, "bos_token_id", None)
        return CalibrationSet(pad_batches(score_seqs, batch_size, pad_id), pad_batches(held, 1, pad_id), bos)
    examples = [_as_inputs(x) for x in (calib_data if isinstance(calib_data, Iterable) else [calib_data])]
    if not examples:
        raise ValueError("glufx: calibration data is empty: pass at least one example input")
    n_held = min(heldout_samples, len(examples) // 2)
    mk = lambda ex: Batch(args=ex[0], kwargs=ex[1])  # noqa: E731
    score, held = (examples[:-n_held], examples[-n_held:]) if n_held else (examples, [])
    return CalibrationSet([mk(e) for e in score], [mk(e) for e in held])
