"""Run a compressed-tensors export in vLLM, from glufx's environment.

vLLM pins its own transformers and compressed-tensors, so it lives in a virtual environment of its own
(`bash scripts/vllm_env.sh` makes one); glufx talks to it through a subprocess running
glufx/deploy/_vllm_worker.py there. `run_vllm` returns vLLM's greedy continuations and the log-probability
of every prompt token, which `vllm_perplexity` turns into glufx's perplexity protocol (same windows, same
scored positions) so an engine's number sits beside glufx's own.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

ENV_VAR = "GLUFX_VLLM_PYTHON"  # the vLLM environment's python, when not at the default place
WORKER = Path(__file__).with_name("_vllm_worker.py")


def vllm_python(python: Optional[str | Path] = None) -> Path:
    """The python of vLLM's environment: `python`, $GLUFX_VLLM_PYTHON, or .venv-vllm/ beside this checkout."""
    candidates = [python, os.environ.get(ENV_VAR), Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise FileNotFoundError(f"glufx: no vLLM environment found (looked at python=..., ${ENV_VAR}, and .venv-vllm/ "
                            "beside the glufx checkout); create one with `bash scripts/vllm_env.sh` or set "
                            f"{ENV_VAR} to its python")


def run_vllm(model_dir: str | Path, prompts: Sequence[Sequence[int]], max_tokens: int = 1, *,
             max_model_len: Optional[int] = None, dtype: str = "float32", memory_share: float = 0.2,
             python: Optional[str | Path] = None, timeout: float = 1800) -> dict:
    """vLLM's greedy tokens and prompt log-probabilities for `prompts` (token ids) on the checkpoint in
    `model_dir`. `memory_share`: share of host memory vLLM may reserve on CPU (its default, 0.92, takes a
    small machine's whole memory)."""
    py = vllm_python(python)
    length = max(len(p) for p in prompts) + max_tokens
    req = {"model": str(Path(model_dir).resolve()), "prompts": [list(map(int, p)) for p in prompts],
           "max_tokens": max_tokens, "max_model_len": max_model_len or length, "dtype": dtype,
           "memory_share": memory_share}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "answer.json"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        proc = subprocess.run([str(py), str(WORKER), str(out)], input=json.dumps(req), text=True,
                              capture_output=True, timeout=timeout, env=env, cwd=tmp)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"glufx: vLLM failed on {model_dir} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def vllm_perplexity(model_dir: str | Path, windows: torch.Tensor, first_scored: int = 2, **kw) -> dict:
    """Perplexity of `windows` [B, T] (BOS first) as vLLM runs the checkpoint, scoring positions
    first_scored..T-1 of every row: glufx.eval.perplexity's protocol."""
    ans = run_vllm(model_dir, windows.tolist(), max_tokens=1, **kw)
    return {**perplexity_from_logprobs(ans["prompt_logprobs"], first_scored), "vllm": ans["vllm"],
            "seconds": ans["seconds"]}


def perplexity_from_logprobs(prompt_logprobs: Sequence[Sequence[float]], first_scored: int = 2) -> dict:
    """glufx's perplexity protocol over run_vllm's prompt log-probabilities, where entry t - 1 of a row is
    log p(token_t | tokens_<t): positions first_scored.. of every row."""
    nll = -sum(sum(lps[first_scored - 1:]) for lps in prompt_logprobs)
    n = sum(len(lps[first_scored - 1:]) for lps in prompt_logprobs)
    return {"perplexity": float(torch.tensor(nll / n).exp()), "tokens": n}
