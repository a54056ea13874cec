"""The main job: glufx on the real Gemma 3 270M, against FP32 and naive W8A8.

    python -m glufx.demo [--eval-text ../shared/data/wikitext-2-raw/wiki.test.raw]

Calibrates on a web-text sample shipped with glufx, measures WikiText-2 perplexity (16 windows of
512 tokens, BOS first) for FP32, naive W8A8 (every decoder linear, per-tensor dynamic activations)
and glufx (QFeM automatic), and prints the plan's kept modules and the time of every step.
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

DATA = files("glufx") / "data"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib", default=str(DATA / "calib_openwebtext.jsonl"), help=".jsonl or .txt calibration text")
    ap.add_argument("--eval-text", default=str(DATA / "wikitext2_test_excerpt.txt"), help="perplexity text")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--granularity", default="per_sequence", choices=["per_sequence", "per_token", "static", "per_tensor"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plan-out", default=None, help="write the plan as JSON here")
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
    ppl = {"FP32": step("perplexity FP32", lambda: perplexity(model, windows, desc="ppl FP32"))}

    cfg = glufx.GlufxConfig(num_samples=args.calib_samples, seq_len=args.seq_len, granularity=args.granularity)
    plan = step("calibrate + QFeM (glufx.calibrate)", lambda: glufx.calibrate(model, args.calib, cfg, tokenizer=tok))
    naive_plan = plan.without_qfem()
    naive = step("rewrite naive W8A8", lambda: glufx.compile(copy.deepcopy(model), plan=naive_plan))
    ppl["W8A8 naive"] = step("perplexity W8A8 naive", lambda: perplexity(naive, windows, desc="ppl W8A8"))
    del naive
    step("rewrite glufx (glufx.compile)", lambda: glufx.compile(model, plan=plan))
    ppl["W8A8 glufx (QFeM)"] = step("perplexity glufx", lambda: perplexity(model, windows, desc="ppl glufx"))
    gen = step("generate 16 tokens", lambda: model.generate(
        **tok("The capital of France is", return_tensors="pt"), max_new_tokens=16, do_sample=False))

    n_tok = (windows.shape[1] - 1) * windows.shape[0]
    print(f"\nGemma 3 270M, {windows.shape[0]} windows x {windows.shape[1]} tokens (BOS first, {n_tok} scored) "
          f"of {Path(args.eval_text).name}; calibration: {plan.calibration['sequences']} x {args.seq_len} tokens of "
          f"{Path(args.calib).name}; activations {args.granularity}\n")
    fp, nv, gx = ppl["FP32"], ppl["W8A8 naive"], ppl["W8A8 glufx (QFeM)"]
    print(f"{'model':<20} {'perplexity':>10}  {'INT8 share':>10}")
    print(f"{'FP32':<20} {fp:10.3f}  {'-':>10}")
    print(f"{'W8A8 naive':<20} {nv:10.3f}  {100 * naive_plan.int8_param_share():9.1f}%")
    print(f"{'W8A8 glufx (QFeM)':<20} {gx:10.3f}  {100 * plan.int8_param_share():9.1f}%")
    closed = (nv - gx) / (nv - fp) if nv > fp else float("nan")
    print(f"glufx closes {100 * closed:.1f} % of the naive W8A8 perplexity gap\n")
    print("Modules kept in floating point (QFeM) and the top of the score ranking:")
    print(plan.table(top=max(12, len(plan.kept_fp()) + 4)))
    s = plan.search
    if "metrics" in s:
        print(f"\nQFeM search ({s['metric']} to FP on {plan.calibration['heldout_sequences']} held-out sequences, "
              "per number of groups kept in FP): " + ", ".join(f"{k}:{m:.4f}" for k, m in enumerate(s["metrics"]))
              + f"  -> {s['chosen_steps']} groups kept in FP")
    print(f"\ngreedy sample: {tok.decode(gen[0], skip_special_tokens=True)!r}")
    print("\nwall time per step:")
    for k, v in times.items():
        print(f"  {k:<40} {v:7.1f} s")
    if args.plan_out:
        plan.save(args.plan_out)
    return {"perplexity": ppl, "int8_share": plan.int8_param_share(), "closed": closed, "plan": plan}


if __name__ == "__main__":
    main()
