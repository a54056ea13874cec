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


def tiny_tokenizer(vocab_size: int = 400):
    """A real byte-level BPE tokenizer trained on the web text glufx ships (offline, about a second), with
    BOS added in front of text as Gemma's and Llama's tokenizers do."""
    import json as _json
    from importlib.resources import files

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [_json.loads(line)["text"] for line in
             (files("glufx") / "resources" / "calib_openwebtext.jsonl").read_text().splitlines() if line.strip()]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_checkpoint(path, family: str = "llama"):
    """A tiny random HF causal LM with a real tokenizer saved as a checkpoint directory (config.json,
    safetensors, tokenizer files): what a user points the glufx command line at."""
    tok = tiny_tokenizer()
    model = tiny_model(family)
    model.resize_token_embeddings(len(tok))
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok
