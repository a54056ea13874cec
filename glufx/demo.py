"""The main job: glufx on the real Gemma 3 270M, against FP32 and naive W8A8.

    python -m glufx.demo [--eval-text ../shared/data/wikitext-2-raw/wiki.test.raw] [--static] [--no-qfep]

Calibrates on a web-text sample shipped with glufx and measures WikiText-2 perplexity (16 windows
of 512 tokens, BOS first) for FP32, naive W8A8 (every decoder linear), +QFeM, +QFeP and +both, with
per-tensor dynamic activations (computed per sequence) and, with --static, calibrated static scales.
Prints the plan's kept modules, the QFeP prefix and the wall time of every step.
"""
from __future__ import annotations

import argparse
import copy
import time
from importlib.resources import files
from pathlib import Path

import torch

import glufx
from glufx.eval import perplexity, wikitext2_windows
from glufx.models import load_gemma3_270m

DATA = files("glufx") / "resources"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", default=str(DATA / "calib_openwebtext.jsonl"), help=".jsonl or .txt calibration text")
    ap.add_argument("--eval-text", default=str(DATA / "wikitext2_test_excerpt.txt"), help="perplexity text")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--static", action="store_true", help="add the column set with static activation scales")
    ap.add_argument("--no-qfep", action="store_true", help="FP32 / W8A8 / +QFeM only (faster)")
    ap.add_argument("--qfep-method", default="paper", choices=["paper", "prefixquant"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plan-out", default=None, help="write the per-sequence glufx plan (QFeM + QFeP) as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    times: dict[str, float] = {}

    def step(name, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        print(f"[glufx demo] {name}: {times[name]:.1f} s", flush=True)
        return out

    model, tok = step("load Gemma 3 270M", load_gemma3_270m)
    windows = wikitext2_windows(args.eval_text, tok, args.seq_len, args.windows)
    # QFeP models predict from position 2 on (the prefix replaces BOS): every row scores the same tokens
    first = 1 if args.no_qfep else 2
    ppl_fp = step("perplexity FP32", lambda: perplexity(model, windows, desc="ppl FP32", first_scored=first))

    def evaluate(name, plan):
        q = step(f"rewrite {name}", lambda: glufx.compile(copy.deepcopy(model), plan=plan))
        return step(f"perplexity {name}", lambda: perplexity(q, windows, desc=f"ppl {name}", first_scored=first))

    granularities = ["per_sequence"] + (["static"] if args.static else [])
    table: dict[str, dict[str, float]] = {g: {} for g in granularities}
    plans = {}
    for g in granularities:
        cfg = glufx.GlufxConfig(num_samples=args.calib_samples, seq_len=args.seq_len, granularity=g)
        qfem = step(f"calibrate QFeM ({g})", lambda: glufx.calibrate(model, args.calib, cfg, tokenizer=tok))
        rows = {"W8A8": qfem.without_qfem(), "W8A8 + QFeM": qfem}
        if not args.no_qfep:
            cfg_p = glufx.GlufxConfig(**{**cfg.to_dict(), "qfep": args.qfep_method})
            both = step(f"calibrate QFeM + QFeP ({g})", lambda: glufx.calibrate(model, args.calib, cfg_p, tokenizer=tok))
            rows.update({"W8A8 + QFeP": both.without_qfem(), "W8A8 + QFeM + QFeP": both})
        for name, plan in rows.items():
            table[g][name] = evaluate(f"{name} ({g})", plan)
        plans[g] = rows

    n_scored = (windows.shape[1] - first) * windows.shape[0]
    print(f"\nGemma 3 270M, {windows.shape[0]} windows x {windows.shape[1]} tokens (BOS first, {n_scored} tokens "
          f"scored) of {Path(args.eval_text).name}; calibration {args.calib_samples} x {args.seq_len} tokens of "
          f"{Path(args.calib).name}\n")
    head = f"{'perplexity':<20}" + "".join(f"{g:>16} {'INT8 %':>7}" for g in granularities)
    print(head)
    print(f"{'FP32':<20}" + "".join(f"{ppl_fp:16.3f} {'-':>7}" for _ in granularities))
    for name in plans[granularities[0]]:
        print(f"{name:<20}" + "".join(
            f"{table[g][name]:16.3f} {100 * plans[g][name].int8_param_share():7.1f}" for g in granularities))
    g0 = granularities[0]
    best_name = list(plans[g0])[-1]
    nv, gx = table[g0]["W8A8"], table[g0][best_name]
    closed = (nv - gx) / (nv - ppl_fp) if nv > ppl_fp else float("nan")
    print(f"\n{best_name} closes {100 * closed:.1f} % of the naive W8A8 perplexity gap ({g0})\n")
    plan = plans[g0][best_name]
    print(f"Plan of '{best_name}' ({g0}): modules kept in floating point and the top of the score ranking")
    print(plan.table(top=max(12, len(plan.kept_fp()) + 4)))
    if plan.qfep:
        ids = plan.qfep["token_ids"]
        print(f"QFeP prefix {ids} = {[tok.decode([i]) for i in ids]}; " + ", ".join(
            f"{k}={v:.3g}" for k, v in plan.qfep.items() if isinstance(v, float)))
    s = plan.search
    if s.get("metrics"):
        print(f"QFeM search ({s['metric']} to FP on {plan.calibration['heldout_sequences']} held-out sequences, "
              "per number of groups kept in FP): " + ", ".join(f"{k}:{m:.4f}" for k, m in enumerate(s["metrics"]))
              + f"  -> {s['chosen_steps']}")
    q = glufx.compile(copy.deepcopy(model), plan=plan)
    gen = step("generate 16 tokens", lambda: q.generate(
        **tok("The capital of France is", return_tensors="pt"), max_new_tokens=16, do_sample=False))
    print(f"greedy sample: {tok.decode(gen[0], skip_special_tokens=True)!r}")
    print("\nwall time per step:")
    for k, v in times.items():
        print(f"  {k:<44} {v:7.1f} s")
    if args.plan_out:
        plan.save(args.plan_out)
    return {"fp": ppl_fp, "table": table, "closed": closed, "plans": plans}


if __name__ == "__main__":
    main()
