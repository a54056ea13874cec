"""Observers: scores per docs/method.md §3, padding excluded, bad activations rejected."""
import pytest
import torch

import glufx
from glufx.api import calibrate
from glufx.config import GlufxConfig

from conftest import tiny_model

# the observer under test sees the FP model as given: no transform (a transform re-observes), no prefix
CFG = dict(qfem="off", seq_len=48, batch_size=4, progress=False, transform="identity", qfep="off")


def _stats(model, ids):
    _, stats = calibrate(model, ids, GlufxConfig(num_samples=len(ids), **CFG), return_stats=True)
    return stats


def test_score_is_mean_of_max_over_median(calib_ids):
    model = tiny_model("llama")
    stats = _stats(model, calib_ids)
    # recompute layer 0 down_proj's input directly with a hook
    seen = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(calib_ids)
    h.remove()
    a = seen[0].abs().amax(-1)  # [N, T]
    expected = (a.amax(1) / a.median(1).values).mean()
    st = stats["model.layers.0.mlp.down_proj"]
    assert st.score == pytest.approx(float(expected), rel=1e-5)
    assert st.absmax == pytest.approx(float(seen[0].abs().max()), rel=1e-6)
    assert torch.allclose(st.channel_absmax, seen[0].abs().amax((0, 1)))
    # the planted spike token (5) is where the largest values occur
    assert st.top_tokens()[0]["token_id"] == 5
    assert st.score > 5 * stats["model.layers.1.mlp.down_proj"].score


def test_padding_never_enters_statistics(calib_ids):
    model = tiny_model("llama")
    seqs = [calib_ids[i, : 20 + 2 * i] for i in range(8)]  # ragged: batches are padded
    padded = _stats(model, seqs)
    one_by_one = {}
    for s in seqs:  # each sequence alone: no padding at all
        st = _stats(model, s[None])
        for k, v in st.items():
            one_by_one.setdefault(k, []).append(v)
    for fqn, st in padded.items():
        if fqn == "lm_head":  # calibration runs the head on the last position only (logits_to_keep=1)
            continue
        alone = one_by_one[fqn]
        assert st.n_tokens == sum(len(s) for s in seqs)
        assert st.seq_max == pytest.approx([a.seq_max[0] for a in alone], rel=1e-5)
        assert st.seq_median == pytest.approx([a.seq_median[0] for a in alone], rel=1e-5)


def test_nan_activations_are_reported(calib_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 0] = float("inf")
    with pytest.raises(glufx.CalibrationError, match="down_proj contain NaN or Inf"):
        _stats(model, calib_ids)


def test_memory_does_not_grow_with_tokens(calib_ids):
    model = tiny_model("llama")
    short = _stats(model, calib_ids[:, :24])["model.layers.0.mlp.down_proj"]
    long = _stats(model, calib_ids)["model.layers.0.mlp.down_proj"]
    # twice the tokens, the same held state: per-sequence scalars, K channels, fixed-size top lists
    assert long.n_tokens == 2 * short.n_tokens

    def held(st):
        return (len(st.seq_max), len(st.seq_median), len(st.top), sum(map(len, st.seq_top)),
                st.channel_absmax.numel())

    assert held(short) == held(long) == (len(calib_ids), len(calib_ids), 16, 3 * len(calib_ids), 128)  # down_proj input: 128 channels
