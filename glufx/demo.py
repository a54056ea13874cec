"""The main job: glufx on the real Gemma 3 270M, against FP32 and plain round-to-nearest W8A8.

    python -m glufx.demo [--eval-text ../shared/data/wikitext-2-raw/wiki.test.raw] [--granularity per_token]

Calibrates on a web-text sample shipped with glufx and measures WikiText-2 perplexity (16 windows of
512 tokens, BOS first, positions 2..511 scored for every row) for FP32, plain W8A8 (round to nearest,
every decoder linear, no transform) and glufx's default recipe (`GlufxConfig(granularity=g)`), with
per-token dynamic and with static activation scales. A QFeP model is also compared with the FP model
carrying the same prefix (what the prefix itself changes). Prints the static plan and every step's time.
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
# plain W8A8: what every INT8 tool does first (llm-compressor's W8A8 scheme, computed by glufx's kernels)
ROUND_TO_NEAREST = dict(qfem="off", qfep="off", rotation="off", transform="identity", scales="absmax")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", default=str(DATA / "calib_openwebtext.jsonl"), help=".jsonl or .txt calibration text")
    ap.add_argument("--eval-text", default=str(DATA / "wikitext2_test_excerpt.txt"), help="perplexity text")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--granularity", action="append", choices=["per_token", "static", "per_sequence", "per_tensor"],
                    help="activation granularities to show (default: per_token and static)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plan-out", default=None, help="write the last glufx plan as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    granularities = args.granularity or ["per_token", "static"]

    times: dict[str, float] = {}

    def step(name, fn):
        t0 = time.perf_counter()
        out = fn()
        times[name] = time.perf_counter() - t0
        print(f"[glufx demo] {name}: {times[name]:.1f} s", flush=True)
        return out

    model, tok = step("load Gemma 3 270M", load_gemma3_270m)
    windows = wikitext2_windows(args.eval_text, tok, args.seq_len, args.windows)
    ppl = lambda m, name: step(f"perplexity {name}", lambda: perplexity(m, windows, desc=f"ppl {name}",  # noqa: E731
                                                                         first_scored=2))
    ppl_fp = ppl(model, "FP32")
    table: dict[str, dict[str, tuple]] = {g: {} for g in granularities}
    plans = {}
    for g in granularities:
        base = dict(num_samples=args.calib_samples, seq_len=args.seq_len, granularity=g)
        for name, extra in (("W8A8 round-to-nearest", ROUND_TO_NEAREST), ("glufx", {})):
            cfg = glufx.GlufxConfig(**base, **extra)
            plan = step(f"calibrate {name} ({g})", lambda: glufx.calibrate(model, args.calib, cfg, tokenizer=tok))
            q = step(f"lower {name} ({g})", lambda: glufx.compile(copy.deepcopy(model), plan=plan))
            table[g][name] = (ppl(q, f"{name} ({g})"), plan.int8_param_share())
            plans[(g, name)] = plan
            if plan.qfep:  # the FP model with the same prefix: what the prefix itself does
                fp_pref = glufx.prefixed(copy.deepcopy(model), plan)
                table[g]["FP32 + the same QFeP prefix"] = (ppl(fp_pref, f"FP32 + prefix ({g})"), None)

    n_scored = (windows.shape[1] - 2) * windows.shape[0]
    print(f"\nGemma 3 270M, {windows.shape[0]} windows x {windows.shape[1]} tokens (BOS first, {n_scored} tokens "
          f"scored) of {Path(args.eval_text).name}; calibration {args.calib_samples} x {args.seq_len} tokens of "
          f"{Path(args.calib).name}\n")
    print(f"{'perplexity':<30}{'activations':<14}{'ppl':>9}{'vs FP32':>10}{'INT8 %':>8}")
    print(f"{'FP32':<30}{'-':<14}{ppl_fp:9.3f}{'':>10}{'-':>8}")
    for g in granularities:
        for name, (p, share) in table[g].items():
            print(f"{name:<30}{g:<14}{p:9.3f}{100 * (p / ppl_fp - 1):+9.2f}%"
                  + (f"{100 * share:8.1f}" if share is not None else f"{'-':>8}"))
    g_last = granularities[-1]
    plan = plans[(g_last, "glufx")]
    print(f"\nglufx plan ({g_last}): the modules kept in floating point and the top of the score ranking")
    print(plan.table(top=max(12, len(plan.kept_fp()) + 4)))
    if plan.qfep:
        ids = plan.qfep["token_ids"]
        print(f"QFeP prefix {ids} = {[tok.decode([i]) for i in ids]}; its effect on the FP model: KL "
              f"{plan.qfep['fp_kl']:.4f} per token on held-out calibration text (bound {plan.qfep['max_fp_kl']})")
    for s in plan.stages:
        summary = {k: v for k, v in s["summary"].items() if not isinstance(v, (dict, list))}
        print(f"  stage {s['index']:>6} {s['stage']:<18} {s['seconds']:6.1f} s  {summary}")
    q = glufx.compile(copy.deepcopy(model), plan=plan)
    gen = step("generate 16 tokens", lambda: q.generate(
        **tok("The capital of France is", return_tensors="pt"), max_new_tokens=16, do_sample=False))
    print(f"greedy sample: {tok.decode(gen[0], skip_special_tokens=True)!r}")
    print("\nwall time per step:")
    for k, v in times.items():
        print(f"  {k:<52} {v:7.1f} s")
    if args.plan_out:
        plan.save(args.plan_out)
    return {"fp": ppl_fp, "table": table, "plans": plans}


if __name__ == "__main__":
    main()
