"""Prints one table of speed ratios against the baselines measured in the same process."""
import platform
from collections import defaultdict

import torch


def _cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return "unknown"
    keep = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    return " ".join(f for f in keep if f in flags) or "none of avx2/avx512/vnni/amx"


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    med, other, rot, speed = defaultdict(dict), defaultdict(dict), defaultdict(dict), defaultdict(dict)
    weight_bytes, stream = {}, {}  # bench_decode.py: bytes per token per system, read bandwidth per thread count
    attention, prefill_attention = [], []  # bench_attention.py
    for bench in session.benchmarks:
        if not bench.stats.data:  # a test that failed before timing anything
            continue
        p, median = bench.params, bench.stats.median
        if "attention" in bench.extra_info:
            attention.append(bench.extra_info["attention"])
        elif "prefill_attention" in bench.extra_info:
            prefill_attention.append(bench.extra_info["prefill_attention"])
        elif "tokens_per_s" in bench.extra_info:
            speed[(p["case"], p["threads"])].update(bench.extra_info["tokens_per_s"])
            weight_bytes.update(bench.extra_info["weight_bytes"])
        elif "bandwidth_gbs" in bench.extra_info:
            stream[bench.extra_info["threads"]] = bench.extra_info["bandwidth_gbs"]
        elif "variant" in p:
            rot[(p["shape"], p["M"], p["threads"])][p["variant"]] = median
            if "paired_cost" in bench.extra_info:
                rot[(p["shape"], p["M"], p["threads"])][p["variant"] + " paired"] = bench.extra_info["paired_cost"]
        elif "shape" in p:
            med[(p["shape"], p["M"], p["threads"])][p["impl"]] = median
        else:
            other[bench.group][p["impl"]] = median
    tr = terminalreporter
    for group, d in other.items():
        if "fp32" in d and "glufx" in d:
            tr.write_line(f"{group}: FP32 {1e3 * d['fp32']:.1f} ms, glufx {1e3 * d['glufx']:.1f} ms, "
                          f"speed-up {d['fp32'] / d['glufx']:.2f}x ({torch.get_num_threads()} threads)")
    if speed:
        _speed_table(tr, speed, weight_bytes, stream)
    if attention:
        tr.write_line("")
        tr.write_line(f"CPU: {_cpu_model()}  flags: {_cpu_flags()}  torch {torch.__version__}")
        tr.write_line("decode attention, us per layer (median; caches read from memory); speed-up = SDPA / glufx")
        tr.write_line(f"{'model':>12} {'S':>5} {'thr':>3} {'KV MB':>6} {'SDPA':>8} {'glufx':>8} {'speed-up':>9} {'glufx GB/s':>11}")
        for a in sorted(attention, key=lambda a: (a["model"], a["S"], a["threads"])):
            us = a["us"]
            tr.write_line(f"{a['model']:>12} {a['S']:>5} {a['threads']:>3} {a['kv_bytes'] / 1e6:6.2f} {us['sdpa']:8.1f}"
                          f" {us['glufx']:8.1f} {us['sdpa'] / us['glufx']:8.2f}x {a['kv_bytes'] / us['glufx'] / 1e3:11.1f}")
    if prefill_attention:
        tr.write_line("")
        tr.write_line(f"CPU: {_cpu_model()}  flags: {_cpu_flags()}  torch {torch.__version__}")
        tr.write_line("prefill attention, ms per layer (median), transformers' sdpa_attention_forward vs glufx_sdpa; "
                      "sliding: a 512-token window")
        tr.write_line(f"{'model':>12} {'T':>5} {'layer':>8} {'thr':>3} {'SDPA':>9} {'glufx':>9} {'speed-up':>9}")
        for a in sorted(prefill_attention, key=lambda a: (a["model"], a["T"], a["layer"], a["threads"])):
            ms = a["ms"]
            tr.write_line(f"{a['model']:>12} {a['T']:>5} {a['layer']:>8} {a['threads']:>3} {ms['sdpa']:9.2f} "
                          f"{ms['glufx']:9.2f} {ms['sdpa'] / ms['glufx']:8.2f}x")
    if rot:
        tr.write_line("")
        tr.write_line(f"CPU: {_cpu_model()}  flags: {_cpu_flags()}  torch {torch.__version__}")
        tr.write_line("online rotation cost: median time / plain glufx linear's - 1 (same process, back to back)")
        tr.write_line("(paired: median ratio of alternating batches, the drift-free estimate)")
        tr.write_line(f"{'K x N':>12} {'M':>4} {'thr':>3} {'plain us':>10} {'fused':>9} {'paired':>9} {'separate':>9}"
                      f" {'paired':>9}")
        for (shape, M, th), d in sorted(rot.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
            if "plain" not in d:
                continue
            cost = lambda v: f"{100 * (d[v] / d['plain'] - 1):+8.1f}%" if v in d else f"{'-':>9}"  # noqa: E731
            paired = lambda v: f"{100 * d[v]:+8.1f}%" if v in d else f"{'-':>9}"  # noqa: E731
            tr.write_line(f"{shape:>12} {M:>4} {th:>3} {1e6 * d['plain']:10.1f} {cost('fused')} {paired('fused paired')}"
                          f" {cost('separate')} {paired('separate paired')}")
    if not med:
        return
    import numpy
    import torchao

    tr.write_line("")
    tr.write_line(f"CPU: {_cpu_model()}")
    tr.write_line(f"glufx linear benchmark  torch {torch.__version__}  torchao {torchao.__version__}  numpy "
                  f"{numpy.__version__}  {platform.processor() or platform.machine()}  flags: {_cpu_flags()}")
    tr.write_line("median ms per call; ratios = baseline time / glufx time (> 1: glufx faster)")
    impls = ["fp32_linear", "fp32_numpy", "fbgemm_dynamic", "torchao_int8", "pt2e_x86", "glufx", "glufx_rotated"]
    tr.write_line(f"{'K x N':>12} {'M':>4} {'thr':>3} " + "".join(f"{i:>15}" for i in impls)
                  + f"{'vs best FP32':>14}{'vs fbgemm':>11}{'vs torchao':>11}{'vs PT2E':>9}{'rotation cost':>14}")
    for (shape, M, th), d in sorted(med.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        g = d.get("glufx")
        cells = "".join(f"{1e3 * d[i]:15.3f}" if i in d else f"{'-':>15}" for i in impls)
        best_fp = min((d[i] for i in ("fp32_linear", "fp32_numpy") if i in d), default=None)  # -k may skip both
        ratio = lambda b: f"{b / g:.2f}x" if g and b else "-"  # noqa: E731
        tr.write_line(f"{shape:>12} {M:>4} {th:>3} {cells}{ratio(best_fp):>14}{ratio(d.get('fbgemm_dynamic')):>11}"
                      f"{ratio(d.get('torchao_int8')):>11}{ratio(d.get('pt2e_x86')):>9}"
                      + (f"{100 * (d['glufx_rotated'] / g - 1):+13.1f}%" if g and "glufx_rotated" in d else f"{'-':>14}"))


def _speed_table(tr, speed, byte_counts, stream) -> None:
    systems = list(dict.fromkeys(s for d in speed.values() for s in d))  # as bench_decode.py measured them
    tr.write_line("")
    tr.write_line(f"CPU: {_cpu_model()}  flags: {_cpu_flags()}  torch {torch.__version__}")
    tr.write_line("Gemma 3 270M, tokens/s (median of 5 rounds, every system in each round); ratios: glufx compiled / "
                  "baseline (> 1: glufx faster)")
    width = {s: max(16, len(s) + 1) for s in systems}
    versus = lambda d, s: (f"{d[s] / d['llama_cpp_q8_0']:.2f}x" if d.get(s) and d.get("llama_cpp_q8_0")  # noqa: E731
                           else "-")
    tr.write_line(f"{'case':>9} {'thr':>3} " + "".join(f"{s:>{width[s]}}" for s in systems)
                  + f"{'vs eager':>10}{'vs FP32':>9}{'vs llama.cpp':>14}{'w8fp vs llama.cpp':>19}"
                  + f"{'w8fp medium vs llama.cpp':>26}{'glufx.generate w8fp vs llama.cpp':>34}")
    for (case, th), d in sorted(speed.items(), key=lambda kv: (["pp512", "tg32", "tg32@512"].index(kv[0][0]), kv[0][1])):
        g = d.get("glufx_compiled")
        ratio = lambda b: f"{g / d[b]:.2f}x" if g and d.get(b) else "-"  # noqa: E731
        tr.write_line(f"{case:>9} {th:>3} " + "".join(f"{d[s]:{width[s]}.1f}" if s in d else f"{'-':>{width[s]}}"
                                                       for s in systems)
                      + f"{ratio('glufx_eager'):>10}{ratio('fp32'):>9}{ratio('llama_cpp_q8_0'):>14}"
                      + versus(d, "glufx_compiled_w8fp").rjust(19) + versus(d, "glufx_w8fp_medium").rjust(26)
                      + versus(d, "glufx_generate_w8fp").rjust(34))
    tr.write_line("(pp512 of a compiled system: the prompt step generate() runs on a compile_decode model, its own "
                  "compiled graph with glufx's attention kernels; glufx eager: glufx.compile's model, transformers' SDPA;"
                  " glufx_generate_w8fp: the w8fp model decoding in glufx.generate's greedy loop, not generate()'s;"
                  " glufx_w8fp_medium: the w8fp model's prefill under torch.set_float32_matmul_precision('medium'))")
    if byte_counts:
        tr.write_line("decode as effective bandwidth: weight bytes per token x tokens/s (tg32), GB/s; "
                      + ", ".join(f"streaming read {th} thread(s) {gbs:.1f}" for th, gbs in sorted(stream.items())))
        for th in sorted({t for (c, t) in speed if c == "tg32"}):
            d = speed[("tg32", th)]
            tr.write_line(f"  {th} thread(s): " + ", ".join(
                f"{s} {byte_counts[s] / 1e6:.0f} MB x {d[s]:.1f}/s = {byte_counts[s] * d[s] / 1e9:.1f}"
                for s in systems if s in d and byte_counts.get(s)))
