"""The paper's comparison grid (arXiv 2405.14428, Tables 2-3) on Gemma 3 270M, one reproducible command:

    python benchmarks/paper_grid.py --data-dir ../shared/data --limit 500 --out paper_grid.json

Rows: FP32; W8A8 (every decoder linear, round to nearest, absmax scales); + QFeM (auto); + QFeP (paper);
+ both; for per-sequence dynamic (the paper's per-tensor dynamic, computed per batch row) and static
per-tensor activations; and glufx's default recipe for each granularity beside them. Columns: WikiText-2
perplexity (16 x 512 windows, BOS first, positions 2.. scored for every row), the six zero-shot tasks
through lm-evaluation-harness (glufx.eval.zero_shot; `--limit` items per task), their mean accuracy, and
the wall time of calibration and evaluation. Calibration: 32 x 512 tokens of the web text given by
--calib. Writes JSON and a markdown table (the README's).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import glufx
from glufx.eval import TASKS, markdown_table, wikitext_perplexity, write_results, zero_shot
from glufx.models import load_gemma3_270m

PAPER = dict(transform="identity", rotation="off", scales="absmax")  # the paper's quantizer, nothing of glufx's own
GRID = {
    "W8A8": dict(PAPER, qfem="off", qfep="off"),
    "+QFeM": dict(PAPER, qfem="auto", qfep="off"),
    "+QFeP": dict(PAPER, qfem="off", qfep="paper"),
    "+QFeM+QFeP": dict(PAPER, qfem="auto", qfep="paper"),
    "glufx default": {},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="folder with wikitext-2-raw/ and the task files")
    ap.add_argument("--calib", default=None, help="calibration .jsonl (default DATA_DIR/openwebtext/openwebtext_800.jsonl)")
    ap.add_argument("--limit", type=int, default=None, help="items per zero-shot task (default: all)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--granularities", default="per_sequence,static")
    ap.add_argument("--rows", default=",".join(["FP32", *GRID]),
                    help="which rows to run (default all: FP32," + ",".join(GRID) + ")")
    ap.add_argument("--out", default="paper_grid.json")
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    calib = args.calib or str(data / "openwebtext" / "openwebtext_800.jsonl")
    tasks = [t for t in args.tasks.split(",") if t]
    model, tok = load_gemma3_270m()
    wikitext = data / "wikitext-2-raw" / "wiki.test.raw"
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r != "FP32" and r not in GRID]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from FP32,{','.join(GRID)}")
    out = Path(args.out)
    results, times = {}, {}

    def save():  # after every row: a long run that stops keeps what it measured
        write_results(results, out, out.with_suffix(".md"), meta={"limit": args.limit, "times": times, "calib": calib,
                                                                  "threads": torch.get_num_threads()})

    def evaluate(label, m, calib_s=0.0):
        t0 = time.perf_counter()
        res = {"wikitext": wikitext_perplexity(m, tok, wikitext, progress=False)}
        if tasks:
            zs = zero_shot(m, tok, tasks, data_dir=data, limit=args.limit, progress=False, bootstrap_iters=1000)
            res.update(zs)
            accs = [zs[t]["acc"] for t in tasks if "acc" in zs[t]]
            res["mean"] = {"acc": sum(accs) / len(accs)}
        results[label] = res
        times[label] = {"calibration_s": calib_s, "eval_s": time.perf_counter() - t0}
        print(f"{label}: ppl {res['wikitext']['perplexity']:.3f}"
              + (f", mean acc {res['mean']['acc']:.4f}" if "mean" in res else "")
              + f" (calibration {calib_s:.0f} s, eval {times[label]['eval_s']:.0f} s)", flush=True)
        save()

    if "FP32" in rows:
        evaluate("FP32", model)
    for gran in args.granularities.split(","):
        for name, options in GRID.items():
            if name not in rows:
                continue
            cfg = glufx.GlufxConfig(granularity=gran, progress=False, **options)
            t0 = time.perf_counter()
            plan = glufx.calibrate(model, calib, cfg, tokenizer=tok)
            calib_s = time.perf_counter() - t0
            q = glufx.compile(copy.deepcopy(model), plan=plan)
            evaluate(f"{gran} {name} (INT8 {100 * plan.int8_param_share():.0f} %)", q, calib_s)
            del q
    print(markdown_table(results))


if __name__ == "__main__":
    main()
