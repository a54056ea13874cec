"""Runs inside vLLM's own environment (scripts/vllm_env.sh), started by glufx.deploy.vllm: imports vLLM, never
glufx. Reads a JSON request from stdin, writes a JSON answer to the file named by argv[1]:

  request  {"model": DIR, "prompts": [[token ids]], "max_tokens": n, "max_model_len": L, "dtype": "float32",
            "memory_share": 0.2}
  answer   {"vllm": version, "greedy": [[new token ids]], "prompt_logprobs": [[log p(token_t | tokens_<t)
            for t = 1 .. len-1]], "quantization": what vLLM chose for the checkpoint, "seconds": load + run}
"""
import json
import os
import sys
import time

# this file sits among glufx's modules (compressed_tensors.py, vllm.py): keep them from shadowing vLLM's packages
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]


def _keep_float32_int8_off_amx(dtype: str) -> bool:
    """vLLM 0.32's CPU W8A8 linear takes its AMX kernel (`int8_scaled_mm_with_quant`) for INT8 weights on any
    CPU with AMX tiles (Sapphire Rapids and later), and that kernel accepts only bfloat16 / float16
    activations: a float32 model fails in its first forward ("expect A to be bfloat16 or half"). For float32
    the engine is kept on the oneDNN kernel it uses on every other x86 CPU. Returns whether it had to."""
    import torch

    if dtype != "float32" or not torch.cpu._is_amx_tile_supported():
        return False
    from vllm.model_executor.kernels.linear.scaled_mm import cpu as scaled_mm_cpu

    amx_kernel_allowed = scaled_mm_cpu.check_cpu_sgl_kernel
    scaled_mm_cpu.check_cpu_sgl_kernel = lambda n, k, w_dtype: w_dtype != torch.int8 and amx_kernel_allowed(n, k, w_dtype)
    return True


def main() -> None:
    req = json.load(sys.stdin)
    # the engine core otherwise runs in a spawned process that re-imports this script's caller
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams

    dtype = req.get("dtype", "float32")
    rerouted = _keep_float32_int8_off_amx(dtype)
    t0 = time.perf_counter()
    llm = LLM(model=req["model"], skip_tokenizer_init=True, enforce_eager=True, dtype=dtype,
              max_model_len=req["max_model_len"], gpu_memory_utilization=req.get("memory_share", 0.2), seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=req["max_tokens"], prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in req["prompts"]], params, use_tqdm=False)
    greedy, prompt_lps = [], []
    for prompt, out in zip(req["prompts"], outs):
        greedy.append(list(out.outputs[0].token_ids))
        # entry t holds {token: Logprob} for prompt position t (None for the first, which has no context)
        prompt_lps.append([float(d[tok].logprob) for tok, d in zip(prompt[1:], out.prompt_logprobs[1:])])
    quant = getattr(llm.llm_engine.vllm_config.model_config, "quantization", None)
    answer = {"vllm": vllm.__version__, "greedy": greedy, "prompt_logprobs": prompt_lps,
              "quantization": quant, "seconds": time.perf_counter() - t0, "float32_int8_off_amx": rerouted}
    with open(sys.argv[1], "w") as f:
        json.dump(answer, f)


if __name__ == "__main__":
    main()
