"""The spike report (glufx/report.py): figures and tables from saved statistics, never the model."""
import pytest
import torch

import glufx
from glufx.report import Saved, grid, summary, write_report

from conftest import CFG, tiny_checkpoint


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    model, tok = tiny_checkpoint(root / "fp")
    texts = ["The history of the city begins with a small fort. It grew.\nMany people came."] * 16
    q = glufx.compile(model, texts, glufx.GlufxConfig(**CFG, granularity="static"), tokenizer=tok)
    glufx.save(q, root / "q", tokenizer=tok)
    return root / "q"


def test_report_is_written_from_saved_statistics_without_running_a_model(saved_dir, monkeypatch):
    pytest.importorskip("matplotlib")

    def no_model(*a, **k):
        raise AssertionError("the report ran a model")

    monkeypatch.setattr(torch.nn.Module, "__call__", no_model)
    path = write_report(saved_dir)
    text = path.read_text()
    for png in ("spike_heatmap.png", "spike_tokens.png", "channel_outliers.png"):
        data = (saved_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"]({png})" in text
    saved = Saved(saved_dir)
    plan = saved.plan
    # every decoder linear appears in the decision table with its action and granularity
    for f, m in plan.modules.items():
        if m.role not in ("head", "router"):
            assert f"| {f} | {m.role} |" in text
    # the QFeP section names the prefix the plan holds (static recipe: QFeP on) and its FP effect
    assert "## QFeP" in text and ("Prefix (paper)" in text or "No QFeP" in text)
    if plan.qfep:
        assert f"{plan.qfep['fp_kl']:.4f}" in text


def test_report_finds_the_spike_the_tiny_model_carries(saved_dir):
    saved = Saved(saved_dir)
    layers, labels, cells = grid(saved.first)
    assert layers == [0, 1] and "down" in labels and {"q/k/v", "gate/up", "o"} <= set(labels)
    # tiny_model puts a spike into layer 0's down_proj input on token 5: the largest score of the plain model
    assert max(cells, key=cells.get) == (0, "down")
    first = {f: st for st in saved.first.inputs for f in st.fqns}["model.layers.0.mlp.down_proj"]
    assert first.trace and len(first.trace) == len(first.trace_tokens)
    text = summary(saved_dir)
    assert "model.layers.0.mlp.down_proj" in text.splitlines()[5]  # first of the most spiky inputs


def test_report_refuses_a_directory_without_a_plan(tmp_path):
    with pytest.raises(FileNotFoundError, match="glufx_plan.json"):
        write_report(tmp_path)
