"""Quality of glufx recipes on a real model, one fixed protocol (docs/method.md §5).

    python benchmarks/quality.py --calib ../shared/data/openwebtext/openwebtext_800.jsonl \
        --eval-text ../shared/data/wikitext-2-raw/wiki.test.raw per_token per_token:rotation=off static

Each positional argument is a recipe: a granularity, optionally followed by GlufxConfig overrides
(`per_token:rotation=off,qfem=off`). Gemma 3 270M (from its local package), calibration N x 512
tokens, WikiText-2 16 windows x 512 tokens, BOS first, positions 2..511 scored for every row (QFeP
models predict from position 2 on), FP32 measured in the same process. Prints one row per recipe
(perplexity, change vs FP32, INT8 share of decoder-linear parameters, calibration seconds; for a QFeP
plan also the FP model with the same prefix, and the prefix's KL on held-out calibration text) and with
--json appends the rows to a file.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import fields
from importlib.resources import files

import torch

import glufx
from glufx.eval import perplexity, wikitext2_windows
from glufx.models import load_gemma3_270m

DATA = files("glufx") / "resources"


def parse_recipe(spec: str) -> dict:
    gran, _, rest = spec.partition(":")
    kw: dict = {"granularity": gran}
    types = {f.name: f.type for f in fields(glufx.GlufxConfig)}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k not in types:
            raise SystemExit(f"unknown GlufxConfig field {k!r} in recipe {spec!r}")
        kw[k] = (v.lower() == "true") if "bool" in str(types[k]) else (
            int(v) if "int" in str(types[k]) and v.lstrip("-").isdigit() else (
                float(v) if "float" in str(types[k]) and v.replace(".", "", 1).replace("e-", "", 1).isdigit() else v))
    return kw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--calib", default=str(DATA / "calib_openwebtext.jsonl"))
    ap.add_argument("--eval-text", default=str(DATA / "wikitext2_test_excerpt.txt"))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--json", default=None, help="append result rows (JSON lines) here")
    ap.add_argument("--progress", action="store_true", help="show calibration progress bars")
    args = ap.parse_args(argv)

    model, tok = load_gemma3_270m()
    windows = wikitext2_windows(args.eval_text, tok, 512, args.windows)
    fp = perplexity(model, windows, first_scored=2, progress=False)
    print(f"FP32 perplexity {fp:.3f}  ({windows.shape[0]} x {windows.shape[1]} tokens, {torch.get_num_threads()} threads)",
          flush=True)
    rows = []
    for spec in args.recipes:
        cfg = glufx.GlufxConfig(num_samples=args.calib_samples, progress=args.progress, **parse_recipe(spec))
        t0 = time.perf_counter()
        plan = glufx.calibrate(model, args.calib, cfg, tokenizer=tok)
        t_cal = time.perf_counter() - t0
        q = glufx.compile(copy.deepcopy(model), plan=plan)
        ppl = perplexity(q, windows, first_scored=2, progress=False)
        # a QFeP model against the FP model with the same prefix too: the prefix's own effect apart
        fp_prefixed = perplexity(glufx.prefixed(copy.deepcopy(model), plan), windows, first_scored=2,
                                 progress=False) if plan.qfep else None
        row = {"recipe": spec, "ppl": ppl, "fp32": fp, "delta_pct": 100 * (ppl / fp - 1), "fp32_prefixed": fp_prefixed,
               "int8_share": plan.int8_param_share(), "calib_s": t_cal,
               "static_share": _static_share(plan), "qfep": plan.qfep["token_ids"] if plan.qfep else None}
        rows.append(row)
        print(f"{spec:<48} ppl {ppl:8.3f}  {row['delta_pct']:+7.2f} %  INT8 {100 * row['int8_share']:5.1f} %  "
              f"static {100 * row['static_share']:5.1f} %  calib {t_cal:6.0f} s"
              + (f"  | FP32 + its prefix {fp_prefixed:.3f} (prefix FP KL {plan.qfep['fp_kl']:.4f})" if plan.qfep else ""),
              flush=True)
        if "target" in plan.search:
            t = plan.search["target"]
            row["target"] = {k: v for k, v in t.items() if k != "steps"}
            print(f"  target {t['metric']} {t['budget']}: held-out {t['final_metric']:+.4f} (all per-token "
                  f"{t['per_token_metric']:+.4f}), static {100 * t['static_share']:.1f} %, per-token "
                  f"{100 * t['per_token_share']:.1f} %, FP {100 * t['fp_share']:.1f} %, speed estimate "
                  f"{t['speed_vs_all_static']:.2f}x all-static, {t['evaluations']} evaluations", flush=True)
            print("  measured curve (static share: held-out metric): " + ", ".join(
                f"{100 * c['static_share']:.0f} %: {c['metric']:+.4f}" for c in t["curve"]), flush=True)
        weights = next((st["summary"] for st in plan.stages if st.get("stage") == "RoundWeights"), None)
        if weights and weights.get("linears"):  # GPTQ keeps its codes only where held-out error drops
            row["weights"] = weights
            print(f"  GPTQ codes kept on {weights['gptq_kept']} of {weights['linears']} INT8 linears "
                  f"(median held-out error ratio gptq/rtn {weights.get('median_error_ratio', 1.0):.3f})", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows


def _static_share(plan) -> float:
    dec = [m for m in plan.modules.values() if m.kind == "linear" and m.role not in ("head", "router")]
    total = sum(m.n_params for m in dec)
    return sum(m.n_params for m in dec if m.action == "int8" and m.granularity == "static") / total if total else 0.0


if __name__ == "__main__":
    main()
