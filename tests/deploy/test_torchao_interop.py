"""The plan as a torchao FqnToConfig quantizes exactly the modules the plan quantizes."""
import torch

import glufx

from conftest import tiny_model

CFG = dict(seq_len=48, batch_size=4, progress=False, num_samples=8, heldout_samples=4, max_fp_param_share=0.25)


def test_fqn_to_config_drives_quantize_(calib_ids):
    from torchao.quantization import FqnToConfig, quantize_

    model = tiny_model("llama")
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG))
    cfg = plan.to_torchao()
    assert isinstance(cfg, FqnToConfig)
    assert cfg.fqn_to_config["model.layers.0.mlp.down_proj"] is None  # kept by QFeM
    assert cfg.fqn_to_config["lm_head"] is None
    quantize_(model, cfg, filter_fn=None)
    quantized = {n for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and type(m.weight).__name__ != "Parameter"}
    assert quantized == set(plan.quantized())
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids[:2]).logits).all()
