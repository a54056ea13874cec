"""glufx.save / glufx.load: quantized model, plan and QFeP prefix reproduce outputs exactly."""
import pytest
import torch

import glufx
from glufx.prefix import PrefixedLM

from conftest import CFG, tiny_model



@pytest.mark.parametrize("family,qfep", [("llama", "off"), ("gemma3", "paper")])
def test_save_load_roundtrip(family, qfep, calib_ids, tmp_path):
    q = glufx.compile(tiny_model(family), calib_ids, glufx.GlufxConfig(**CFG, qfep=qfep))
    glufx.save(q, tmp_path / "m")
    back = glufx.load(tmp_path / "m")
    assert isinstance(back, PrefixedLM) == (qfep != "off")
    assert back.glufx_plan.to_dict() == q.glufx_plan.to_dict()
    x = calib_ids[:3, 1:20]
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, q(input_ids=x).logits)
    n_int8 = sum(isinstance(m, glufx.Int8Linear) for m in back.modules())
    assert n_int8 == len(q.glufx_plan.quantized())


def test_load_rejects_foreign_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="glufx.save"):
        glufx.load(tmp_path)
