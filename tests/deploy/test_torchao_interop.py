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
    # torchao's kernels on the plan's modules agree with glufx's on the same plan, module by module on the
    # same inputs (whole-model logits of two W8A8 implementations drift apart chaotically: one code off by
    # one rounding boundary grows layer by layer). Per-sequence scales span the call: one sequence at a time.
    ours = glufx.compile(tiny_model("llama"), plan=plan)
    inputs = {}
    hooks = [model.get_submodule(f).register_forward_pre_hook(lambda m, a, f=f: inputs.setdefault(f, a[0]))
             for f in plan.quantized()]
    with torch.no_grad():
        model(calib_ids[:1])
        for h in hooks:
            h.remove()
        for f, x in inputs.items():
            a, b = model.get_submodule(f)(x), ours.get_submodule(f)(x)
            assert sqnr(b, a) > 30, (f, sqnr(b, a))
        # and end to end, the two stay close on the logits
        assert sqnr(ours(input_ids=calib_ids[:1]).logits, model(calib_ids[:1]).logits) > 12
