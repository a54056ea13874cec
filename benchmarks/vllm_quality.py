"""What a compressed-tensors export keeps, measured on Gemma 3 270M: perplexity as vLLM runs the checkpoint beside
glufx's own number for the same plan, and what the format cannot carry (the online rotation, the QFeP prefix)
costs against glufx's best plan at that granularity.

    bash scripts/vllm_env.sh && python benchmarks/vllm_quality.py --data-dir ../shared/data --out vllm_quality.json

Protocol: WikiText-2 raw test, 16 x 512 windows, BOS first, positions 2..511 scored for every row (docs/method.md
section 5); calibration 32 x 512 tokens of the web text in DATA_DIR/openwebtext. vLLM runs in float32 on CPU.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

import glufx
from glufx.deploy.vllm import vllm_perplexity
from glufx.eval import perplexity, wikitext2_windows
from glufx.models import load_gemma3_270m

# (label, the exportable config, the config it stands in for: glufx's best at that granularity)
ROWS = [("per_token", dict(granularity="per_token", rotation="off"), dict(granularity="per_token")),
        ("static", dict(granularity="static"), None)]  # static: glufx's default, exported without its prefix


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--rows", default=",".join(r[0] for r in ROWS))
    ap.add_argument("--skip-best", action="store_true", help="do not recalibrate glufx's best (non-exportable) plans")
    ap.add_argument("--out", default="vllm_quality.json")
    args = ap.parse_args(argv)
    data = Path(args.data_dir)
    calib = data / "openwebtext" / "openwebtext_800.jsonl"
    model, tok = load_gemma3_270m()
    windows = wikitext2_windows(data / "wikitext-2-raw" / "wiki.test.raw", tok, 512, 16)
    ppl = lambda m: perplexity(m, windows, progress=False, first_scored=2)  # noqa: E731
    results = {"FP32": {"glufx": ppl(model)}}
    print(f"FP32 {results['FP32']['glufx']:.3f}", flush=True)
    for label, options, best in ROWS:
        if label not in args.rows.split(","):
            continue
        t0 = time.perf_counter()
        plan = glufx.calibrate(model, calib, glufx.GlufxConfig(progress=False, **options), tokenizer=tok)
        q = glufx.compile(copy.deepcopy(model), plan=plan)
        row = {"calibration_s": time.perf_counter() - t0, "int8_share": plan.int8_param_share()}
        prefixed = glufx.prefix.as_prefixed(q)
        if prefixed is not None:  # what glufx runs, then the same model without its prefix: what the format holds
            row["glufx with prefix"] = ppl(q)
        row["glufx"] = ppl(prefixed.model if prefixed is not None else q)
        with tempfile.TemporaryDirectory() as tmp:
            glufx.save_pretrained(q, Path(tmp) / "ct", format="compressed-tensors", drop_prefix=True)
            v = vllm_perplexity(Path(tmp) / "ct", windows, max_model_len=1024)
        row.update(vllm=v["perplexity"], vllm_version=v["vllm"], vllm_s=v["seconds"])
        if best is not None and not args.skip_best:
            bq = glufx.compile(copy.deepcopy(model), plan=glufx.calibrate(
                model, calib, glufx.GlufxConfig(progress=False, **best), tokenizer=tok))
            row["glufx best (not exportable)"] = ppl(bq)
            del bq
        results[label] = row
        print(label, json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
        del q


if __name__ == "__main__":
    main()
