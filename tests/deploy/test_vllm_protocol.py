"""The glufx side of the vLLM bridge, without vLLM: perplexity from an engine's prompt log-probabilities follows
glufx's protocol exactly, and a missing engine environment is named with the fix."""
import pytest
import torch

from glufx.deploy.vllm import ENV_VAR, perplexity_from_logprobs, vllm_python
from glufx.eval import perplexity

from conftest import tiny_model


def test_perplexity_from_prompt_logprobs_is_glufx_protocol():
    # run_vllm's layout: per row, entry t - 1 is log p(token_t | tokens_<t); fed glufx's own log-probs, the
    # engine-side formula must give glufx.eval.perplexity's number for every first_scored
    model = tiny_model("llama").eval()
    windows = torch.randint(3, 96, (3, 20), generator=torch.Generator().manual_seed(0))
    windows[:, 0] = 1
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=windows).logits[:, :-1].double(), -1)
    rows = lp.gather(2, windows[:, 1:, None])[..., 0].tolist()
    for first in (1, 2):
        ours = perplexity(model, windows, progress=False, first_scored=first)
        got = perplexity_from_logprobs(rows, first_scored=first)
        assert got["tokens"] == 3 * (20 - first)
        assert got["perplexity"] == pytest.approx(ours, rel=1e-5)


def test_missing_engine_environment_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere" / "python"))
    monkeypatch.setattr("glufx.deploy.vllm.__file__", str(tmp_path / "a" / "b" / "vllm.py"))
    with pytest.raises(FileNotFoundError, match="bash scripts/vllm_env.sh"):
        vllm_python()
