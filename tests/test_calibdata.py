"""calibdata: what users have works, or gets an error that names the problem and the fix."""
import pytest
import torch

import glufx
from glufx.calibdata import lm_sequences

from conftest import CFG, tiny_model


class _Tok:
    """A tokenizer stand-in with BOS, enough for the data paths (the real ones run in the Gemma tests)."""

    bos_token_id, eos_token, pad_token_id = 1, None, 0

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [3 + (ord(c) % 90) for c in text]
        ids = ([1] if add_special_tokens else []) + ids
        t = torch.tensor([ids])
        return type("Enc", (), {"input_ids": t if return_tensors else ids})()


def test_list_of_1xL_tensors_as_a_tokenizer_returns_them(calib_ids):
    rows = [r[None] for r in calib_ids]  # what tokenizer(text, return_tensors="pt").input_ids gives
    plan = glufx.calibrate(tiny_model("llama"), rows, glufx.GlufxConfig(**CFG))
    assert plan.calibration["sequences"] == CFG["num_samples"]


def test_batch_encoding_mask_is_respected():
    from transformers import BatchEncoding

    ids = torch.randint(3, 90, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    seqs = lm_sequences(BatchEncoding({"input_ids": ids, "attention_mask": mask}), None, 512, 8)
    assert [len(s) for s in seqs] == [10, 6]
    assert torch.equal(seqs[1], ids[1, :6])


def test_missing_file_says_so():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        glufx.calibrate(tiny_model("llama"), "no/such/calib.jsonl", glufx.GlufxConfig(**CFG), tokenizer=_Tok())


def test_one_token_sequences_are_refused(calib_ids):
    with pytest.raises(ValueError, match="every calibration sequence has fewer than 4 tokens"):
        glufx.calibrate(tiny_model("llama"), calib_ids[:, :1], glufx.GlufxConfig(**CFG))


def test_strings_need_a_tokenizer_and_work_with_one():
    with pytest.raises(ValueError, match="tokenizer="):
        lm_sequences(["some text"], None, 64, 4)
    seqs = lm_sequences(["some text here", "more text"], _Tok(), 64, 4)
    assert [s[0].item() for s in seqs] == [1, 1] and len(seqs[0]) == 15


def test_float_tensors_are_not_token_ids():
    with pytest.raises(ValueError, match="integer token ids"):
        lm_sequences(torch.randn(2, 8), None, 64, 4)
