"""Zero-shot accuracy through lm-evaluation-harness, offline, with the task definitions shipped in glufx.

lm-eval's built-in tasks fetch their data from the Hugging Face Hub. The YAMLs in `tasks/` are those tasks with
the prompts, choices and metrics unchanged and only the data source replaced: loaders that read the original
public files from `data_dir` (layout in `tasks.utils.LAYOUT`). The model runs in memory through lm-eval's HFLM
(see `_lm.GlufxLM` for how a QFeP model scores the same tokens as the others). lm-eval is an optional dependency.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .tasks import utils as _tasks

TASKS: tuple[str, ...] = ("lambada", "piqa", "winogrande", "hellaswag", "arc_easy", "boolq")
TASKS_DIR = Path(__file__).parent / "tasks"
DATA_LAYOUT: dict[str, str] = {t: " + ".join(_tasks.LAYOUT[t]) for t in TASKS}  # for messages: task -> its files
META = "harness"  # the key of a result set's run description; every other key is a task


def _lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError('glufx.eval.zero_shot needs lm-evaluation-harness: pip install "glufx[eval]"') from e
    return lm_eval


def zero_shot(model, tokenizer, tasks: Sequence[str] = TASKS, *, data_dir: str | Path, limit: Optional[int] = None,
              batch_size: int = 1, progress: bool = True, bootstrap_iters: int = 100_000,
              log_samples: bool = False) -> dict[str, Any]:
    """Zero-shot metrics of an in-memory causal LM (plain, glufx-quantized or PrefixedLM) on `tasks`.

    Returns {task: {"acc": .., "acc_stderr": .., "acc_norm": .., ...}, "harness": {lm-eval version, limit, item
    counts}}; with `log_samples`, "harness" also holds each task's per-item loglikelihoods (one per choice).
    `limit` takes the first items of each task, for quick runs. `progress` shows the scoring bar (lm-eval draws its
    short setup bars regardless). `bootstrap_iters` only drives lambada's perplexity stderr (lm-eval's default;
    the other stderrs are closed-form).
    """
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; available: {list(TASKS)}")
    for t in tasks:
        _tasks.files(data_dir, t)  # fail before the model runs, naming the missing file
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager

    from ._lm import GlufxLM

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                          metadata={"data_dir": str(Path(data_dir).resolve())})
    lm = GlufxLM(model, tokenizer, batch_size=batch_size, progress=progress)
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"glufx_{t}" for t in tasks], task_manager=manager, limit=limit,
                                  bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    results: dict[str, Any] = {}
    for t in tasks:
        raw = out["results"][f"glufx_{t}"]
        results[t] = {k.split(",")[0]: float(v) for k, v in raw.items()
                      if "," in k and isinstance(v, (int, float))}
    meta = {"lm_eval": lm_eval.__version__, "limit": limit, "num_fewshot": 0,
            "n": {t: out["n-samples"][f"glufx_{t}"]["effective"] for t in tasks}}
    if log_samples:
        meta["samples"] = {t: [{"doc_id": s["doc_id"], "target": s["target"],
                                "loglikelihoods": [float(r[0]) for r in s["filtered_resps"]]}
                               for s in out["samples"][f"glufx_{t}"]] for t in tasks}
    results[META] = meta
    return results


def write_results(results: Mapping[str, Any], path_json: str | Path, path_md: str | Path | None = None,
                  meta: Optional[Mapping[str, Any]] = None) -> None:
    """Write zero_shot results as JSON and, with `path_md`, a markdown table, one row per model.

    `results` is one result ({task: {metric: value}}, as zero_shot returns) or {label: result} for models side by
    side. The JSON is {"results": {label: {task: {metric: value}}}, "harness": {label: run description},
    "meta": meta}: its results part holds numbers only, the layout glufx.report tabulates.
    """
    single = all(isinstance(v, (int, float)) for t, m in results.items() if t != META for v in m.values())
    sets = {"model": results} if single else dict(results)
    doc = {"results": {label: {t: m for t, m in r.items() if t != META} for label, r in sets.items()},
           META: {label: {k: v for k, v in r.get(META, {}).items() if k != "samples"} for label, r in sets.items()},
           "meta": dict(meta or {})}
    Path(path_json).write_text(json.dumps(doc, indent=2) + "\n")
    if path_md is not None:
        Path(path_md).write_text(markdown_table(sets) + "\n")


def markdown_table(sets: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per label, one column per (task, metric), "value ± stderr" where lm-eval gives a stderr."""
    columns: list[tuple[str, str]] = []
    for r in sets.values():
        for t, metrics in r.items():
            columns += [(t, k) for k in metrics if t != META and not k.endswith("_stderr") and (t, k) not in columns]

    def cell(r: Mapping[str, Any], t: str, k: str) -> str:
        v, se = r.get(t, {}).get(k), r.get(t, {}).get(f"{k}_stderr")
        if v is None:
            return "-"
        return f"{v:.4f}" + (f" ± {se:.4f}" if se is not None and math.isfinite(se) else "")

    lines = ["| model | " + " | ".join(f"{t} {k}" for t, k in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(r, t, k) for t, k in columns) + " |" for label, r in sets.items()]
    return "\n".join(lines)
