"""Documents for the shipped lm-eval tasks, built from local copies of the public data sets.

lm-eval's built-in tasks download from the Hugging Face Hub; these loaders (the YAMLs' `custom_dataset`) read
the original public files from a directory instead. Each returns the split the built-in task evaluates, with the
built-in task's field names, so every YAML keeps the built-in prompt, choices and metrics verbatim and only the
data source differs. lm-eval calls a loader with the task metadata, which carries `data_dir`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

# Where each task's files sit under data_dir (the layout of the public copies: files as their authors publish them).
LAYOUT: dict[str, tuple[str, ...]] = {
    "lambada": ("lambada/lambada_test.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "winogrande": ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt",),
    "arc_easy": ("arc-easy/arc_easy_test.jsonl",),
    "boolq": ("boolq/dev.jsonl",),
}


def files(data_dir: str | Path | None, task: str) -> list[Path]:
    """The task's files, or an error that names the missing file and the whole expected layout."""
    if data_dir is None:
        raise ValueError(f"{task}: no data_dir given (pass data_dir=...; expected layout: {_layout()})")
    paths = [Path(data_dir) / rel for rel in LAYOUT[task]]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{task}: {p} not found; data_dir must hold {_layout()}")
    return paths


def _layout() -> str:
    return ", ".join(rel for rels in LAYOUT.values() for rel in rels)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _labels(path: Path, n: int) -> list[str]:
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != n:
        raise ValueError(f"{path}: {len(labels)} labels for {n} items")
    return labels


def _split(name: str, rows: list[dict[str, Any]]):
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_list(rows)})


def lambada(data_dir: str | None = None, **_):
    """OpenAI's LAMBADA test file, the source of EleutherAI/lambada_openai (default config)."""
    (path,) = files(data_dir, "lambada")
    return _split("test", [{"text": d["text"]} for d in _jsonl(path)])


def piqa(data_dir: str | None = None, **_):
    """PIQA validation; the labels come in their own file."""
    docs, labels = files(data_dir, "piqa")
    rows = _jsonl(docs)
    return _split("validation", [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)}
                                 for d, y in zip(rows, _labels(labels, len(rows)))])


def winogrande(data_dir: str | None = None, **_):
    """WinoGrande 1.1 dev (= winogrande_xl validation); `answer` is "1"/"2" as on the Hub."""
    docs, labels = files(data_dir, "winogrande")
    rows = _jsonl(docs)
    return _split("validation", [{"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"],
                                  "answer": y} for d, y in zip(rows, _labels(labels, len(rows)))])


def arc_easy(data_dir: str | None = None, **_):
    """ARC-Easy test in the Hub's schema: choice labels are positional, so `answerKey` indexes the gold one."""
    (path,) = files(data_dir, "arc_easy")
    rows = []
    for d in _jsonl(path):
        keys = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        rows.append({"id": d["id"], "question": d["prompt"], "choices": {"text": d["choices"], "label": keys},
                     "answerKey": keys[d["answer_idx"]]})
    return _split("test", rows)


def boolq(data_dir: str | None = None, **_):
    """BoolQ dev in the original release's format; super_glue's label is 1 for True."""
    (path,) = files(data_dir, "boolq")
    return _split("validation", [{"question": d["question"], "passage": d["passage"], "label": int(d["answer"])}
                                 for d in _jsonl(path)])


def hellaswag_query(line: str) -> str:
    """lm-eval's query from the 6-line text format, which joined ctx_a and ctx_b and kept ctx_b's case.

    lm-eval builds ctx_a + " " + ctx_b.capitalize(). ctx_b is ActivityNet's trailing noun phrase, always lower case
    in this file: the unfinished clause after the last sentence end. WikiHow items have no ctx_b and end with a
    finished sentence. So capitalizing a lower-case tail that is not a finished sentence restores lm-eval's query
    wherever ctx_a ends a sentence (items whose ctx_a stops mid-sentence cannot be told apart; they are rare).
    """
    from lm_eval.tasks.hellaswag.utils import preprocess

    label, _, ctx = line.partition(": ")
    tail = re.split(r"(?<=[.!?])\s+", ctx)[-1]  # a suffix of ctx
    if tail[:1].islower() and not tail.endswith((".", "!", "?")):
        ctx = ctx[:len(ctx) - len(tail)] + tail[0].upper() + tail[1:]
    return preprocess(f"{label}: {ctx}")


def hellaswag(data_dir: str | None = None, **_):
    """HellaSwag validation from the 6-line text format (query, gold 0-3, four endings), as lm-eval's process_docs
    would leave it (the raw fields ctx_a/ctx_b are not in this file; see hellaswag_query)."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    (path,) = files(data_dir, "hellaswag")
    lines = path.read_text(encoding="utf-8").split("\n")
    n = len(lines) // 6
    if len(lines) not in (6 * n, 6 * n + 1):
        raise ValueError(f"{path}: {len(lines)} lines, expected 6 per item")
    rows = [{"query": hellaswag_query(lines[i]), "choices": [preprocess(e) for e in lines[i + 2:i + 6]],
             "label": int(lines[i + 1])} for i in range(0, 6 * n, 6)]
    return _split("validation", rows)
