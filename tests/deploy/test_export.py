"""glufx.export: an ExportedProgram with the glufx ops (and QFeP prefix); save/load; AOTInductor."""
import subprocess
import sys
import textwrap

import pytest
import torch

import glufx

from conftest import CFG, tiny_model



@pytest.fixture(scope="module")
def quantized():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (12, 48), generator=g)
    ids[:, 0], ids[:, 10] = 1, 5
    return glufx.compile(tiny_model("llama"), ids, glufx.GlufxConfig(**CFG, qfep="paper"))


def test_export_dynamic_batch_and_sequence(quantized):
    ep = glufx.export(quantized)
    assert sum("glufx.int8_linear" in str(n.target) for n in ep.graph.nodes) == len(quantized.glufx_plan.quantized())
    # the prefix KV is inside the program, as buffers
    assert any("prefix_k0" in name for name in ep.state_dict)
    for B, T in ((1, 5), (3, 17)):
        x = torch.randint(3, 96, (B, T))
        m = torch.ones_like(x)
        with torch.no_grad():
            assert torch.equal(ep.module()(x, m), quantized(input_ids=x, attention_mask=m).logits)
    # glufx ops survive the default decompositions
    dec = ep.run_decompositions()
    assert sum("glufx.int8_linear" in str(n.target) for n in dec.graph.nodes) == len(quantized.glufx_plan.quantized())


def test_aoti_package_runs(quantized, tmp_path):
    ep = glufx.export(quantized)
    x = torch.randint(3, 96, (2, 7))
    m = torch.ones_like(x)
    path = glufx.aoti_package(ep, str(tmp_path / "m.pt2"))
    with torch.no_grad():
        expected = quantized(input_ids=x, attention_mask=m).logits
    torch.save({"x": x, "m": m, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import glufx  # registers the glufx ops the package calls
        runner = torch._inductor.aoti_load_package({path!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        out = runner(io["x"], io["m"])
        print("equal", bool(torch.equal(out, io["expected"])))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "equal True" in res.stdout, res.stdout  # eager's float math inside the package: same bits


def test_export_refuses_size_one_examples(quantized):
    x = torch.randint(3, 96, (1, 7))
    with pytest.raises(ValueError, match="batch and sequence >= 2"):
        glufx.export(quantized, (x, torch.ones_like(x)))


def test_exported_from_view_inputs_loads_in_a_fresh_process(quantized, tmp_path):
    ids = torch.randint(3, 96, (3, 20))
    ep = glufx.export(quantized, (ids[:, 1:12], torch.ones(3, 11, dtype=torch.long)))  # a view, as windows are
    torch.export.save(ep, tmp_path / "m.pt2")
    x, m = ids[:2, 2:9].clone(), torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        torch.save({"x": x, "m": m, "expected": quantized(input_ids=x, attention_mask=m).logits}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import glufx
        ep = torch.export.load({str(tmp_path / 'm.pt2')!r})
        io = torch.load({str(tmp_path / 'io.pt')!r})
        print("equal", bool(torch.equal(ep.module()(io["x"], io["m"]), io["expected"])))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert "equal True" in res.stdout, res.stdout + res.stderr[-3000:]
