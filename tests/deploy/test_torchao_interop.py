"""The plan as a torchao FqnToConfig quantizes exactly the modules the plan quantizes."""
import pytest
import torch

import glufx

from conftest import CFG, sqnr, tiny_model



def test_fqn_to_config_drives_quantize_(calib_ids):
    from torchao.quantization import FqnToConfig, quantize_

    model = tiny_model("llama")
    with pytest.raises(ValueError, match="rotation='off'"):
        glufx.to_torchao(glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG)))
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG, rotation="off"))
    model = glufx.prefixed(model, plan)  # the plan's FP-equivalent transforms, which torchao does not know
    cfg = glufx.to_torchao(plan)
    assert isinstance(cfg, FqnToConfig)
    assert cfg.fqn_to_config["model.layers.0.mlp.down_proj"] is None  # kept by QFeM
    assert cfg.fqn_to_config["lm_head"] is None
    quantize_(model, cfg, filter_fn=None)
    quantized = {n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ != "Parameter"}
    assert quantized == set(plan.quantized())
    # torchao's kernels on the plan's modules agree with glufx's on the same plan (per-sequence scales
    # there span the call: compare one sequence at a time)
    ours = glufx.compile(tiny_model("llama"), plan=plan)
    with torch.no_grad():
        for row in calib_ids[:3]:
            a, b = model(row[None]).logits, ours(input_ids=row[None]).logits
            assert sqnr(b, a) > 25, sqnr(b, a)
