"""Calibration data: whatever the user has -> batches of model inputs with a token mask.

Language models take token tensors, a list of strings plus tokenizer, or a .txt / .jsonl path;
any other module takes an iterable of example inputs (tensors, tuples or dicts).
"""
from __future__ import annotations

import json
import random
import warnings
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


MIN_TOKENS = 4  # fewer positions give no meaningful max / median of the token-wise absmax


def read_texts(path: str | Path) -> list[str]:
    """A .jsonl file (one {"text": ...} per line) or a plain text file, as a list of documents."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"glufx: calibration file {path} does not exist (pass an existing .txt / .jsonl "
                                "path, a list of strings, or token ids)")
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


def _token_rows(t: torch.Tensor, mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """Rows of a [L], [1, L] or [N, L] integer tensor; a mask (a tokenizer's attention_mask) drops padding."""
    if t.dtype not in (torch.long, torch.int32, torch.int64) or t.dim() not in (1, 2):
        raise ValueError(f"glufx: token calibration data must be [L] or [N, L] integer token ids, got a "
                         f"{tuple(t.shape)} {t.dtype} tensor")
    rows = t.long().reshape(-1, t.shape[-1])
    if mask is None:
        return list(rows)
    mask = mask.reshape(rows.shape).bool()
    return [r[m] for r, m in zip(rows, mask)]


def _mapping_ids(d) -> Optional[list[torch.Tensor]]:
    """input_ids (+ attention_mask) of a tokenizer's BatchEncoding or a plain dict, else None."""
    try:
        ids = d["input_ids"]
    except (KeyError, TypeError, IndexError):
        return None
    mask = d.get("attention_mask") if hasattr(d, "get") else None
    ids = torch.as_tensor(ids)
    return _token_rows(ids, torch.as_tensor(mask) if mask is not None else None)


def lm_sequences(calib_data: Any, tokenizer, seq_len: int, num_samples: int) -> list[torch.Tensor]:
    if isinstance(calib_data, (str, Path)):
        texts = read_texts(calib_data)  # a missing file is named before anything asks for a tokenizer
        if tokenizer is None:
            raise ValueError("glufx: calibration from a file needs the model's tokenizer: glufx.compile(..., tokenizer=tok)")
        return token_windows(texts, tokenizer, seq_len, num_samples)
    if isinstance(calib_data, torch.Tensor):
        return _token_rows(calib_data)[:num_samples]
    from_mapping = _mapping_ids(calib_data) if not isinstance(calib_data, (list, tuple)) else None
    if from_mapping is not None:
        return from_mapping[:num_samples]
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
    if all(isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() in (1, 2) for t in items):
        return [r for t in items for r in _token_rows(t)][:num_samples]  # [L] or [1, L] each (tokenizer output)
    mappings = [_mapping_ids(t) for t in items]
    if all(m is not None for m in mappings):
        return [r for m in mappings for r in m][:num_samples]
    raise TypeError("glufx: for a language model, calib_data must be token ids (an [N, L] tensor, a list of [L] or "
                    "[1, L] tensors, a tokenizer's BatchEncoding), a list of strings (with tokenizer=), or a path to "
                    f"a .txt / .jsonl file; got {type(calib_data).__name__} of {type(items[0]).__name__}")



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
        short = [len(s) for s in seqs if len(s) < MIN_TOKENS]
        advice = ("a spike ratio max/median needs many positions. Pass longer texts (the paper uses 1024 tokens; "
                  "glufx defaults to seq_len=512) or a file")
        if len(short) == len(seqs):
            raise ValueError(f"glufx: every calibration sequence has fewer than {MIN_TOKENS} tokens "
                             f"(longest: {max(short)}): {advice}")
        if short:
            warnings.warn(f"glufx: {len(short)} of {len(seqs)} calibration sequences have fewer than {MIN_TOKENS} "
                          f"tokens and are left out: {advice}", stacklevel=3)
            seqs = [s for s in seqs if len(s) >= MIN_TOKENS]
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
