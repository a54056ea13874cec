import os
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", message=".*Enum subclass.*")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs():
    import transformers as tf

    return {
        "llama": lambda: tf.LlamaConfig(**TINY),
        "mistral": lambda: tf.MistralConfig(**TINY, sliding_window=16),
        "qwen2": lambda: tf.Qwen2Config(**TINY),
        "qwen3": lambda: tf.Qwen3Config(**TINY, head_dim=16),
        "gemma": lambda: tf.GemmaConfig(**TINY, head_dim=16),
        "gemma2": lambda: tf.Gemma2Config(**TINY, head_dim=16, sliding_window=16),
        "gemma3": lambda: tf.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=16,
                                              layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: tf.Phi3Config(**TINY),
        "mixtral": lambda: tf.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
    }


# The calibration settings every tiny-model test uses (small, fast, QFeM search with room to exclude).
CFG = dict(seq_len=48, batch_size=4, progress=False, num_samples=8, heldout_samples=4, max_fp_param_share=0.25)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "mixtral"]


def tiny_model(family: str, seed: int = 0, spike: bool = True):
    """A tiny random HF causal LM. With `spike`, layer 0's down_proj input gets an activation spike on
    token 5 (as real GLU models show on delimiters): a large up_proj row for a channel the token excites."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_configs()[family]()).eval()
    if spike and family not in ("mixtral", "phi3"):
        with torch.no_grad():
            mlp = model.model.layers[0].mlp
            emb = model.model.embed_tokens.weight[5]
            direction = emb / emb.norm()
            mlp.gate_proj.weight[7] = 40 * direction
            mlp.up_proj.weight[7] = 40 * direction
    return model


@pytest.fixture
def calib_ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (12, 48), generator=g)
    ids[:, 0] = 1
    ids[:, 10] = 5  # the spike token, as a delimiter would appear in real text
    return ids


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-30)))


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
