"""transformers' from_pretrained reads glufx checkpoints after `import glufx`: the same model glufx.load gives."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import glufx
from glufx.eval import perplexity
from glufx.prefix import as_prefixed

from conftest import CFG, tiny_model


@pytest.mark.parametrize("family,qfep,fuse_glu", [("llama", "off", False), ("gemma3", "paper", True)])
def test_from_pretrained_is_glufx_load(family, qfep, fuse_glu, calib_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    q = glufx.compile(tiny_model(family), calib_ids, glufx.GlufxConfig(**CFG, qfep=qfep, fuse_glu=fuse_glu))
    d = glufx.save(q, tmp_path / "m")
    assert json.loads((d / "config.json").read_text())["quantization_config"]["quant_method"] == "glufx"
    ours, hf = glufx.load(d), AutoModelForCausalLM.from_pretrained(d)
    assert not hf.training
    assert hf.glufx_plan.to_dict() == q.glufx_plan.to_dict()
    assert (as_prefixed(hf) is not None) == (qfep != "off")  # the QFeP prefix restored in place
    assert sum(isinstance(m, (glufx.Int8Linear, glufx.Int8GLU)) for m in hf.modules()) == \
        sum(isinstance(m, (glufx.Int8Linear, glufx.Int8GLU)) for m in ours.modules()) > 0
    x = calib_ids[:3, 1:20]
    with torch.no_grad():
        assert torch.equal(hf(input_ids=x).logits, ours(input_ids=x).logits)
    assert perplexity(hf, calib_ids, progress=False, first_scored=2) == \
        perplexity(ours, calib_ids, progress=False, first_scored=2)
    prompt = calib_ids[:2, :10]
    assert torch.equal(hf.generate(input_ids=prompt, max_new_tokens=5, do_sample=False),
                       ours.generate(input_ids=prompt, max_new_tokens=5, do_sample=False))
    assert hf.glufx_plan.stats is not None  # statistics for reports, as glufx.load attaches them


@pytest.mark.parametrize("options", [dict(fp_weights="int8"), dict(quantize_lm_head=True)])
def test_from_pretrained_reads_a_lowered_tied_lm_head(options, calib_ids, tmp_path):
    """Gemma ties lm_head to the embedding; a lowered lm_head (weight-only INT8 or W8A8) holds its own INT8 weight
    and has no `weight` for transformers to tie: from_pretrained must not try (it raised AttributeError)."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("gemma3")
    assert model.config.get_text_config().tie_word_embeddings
    q = glufx.compile(model, calib_ids, glufx.GlufxConfig(**CFG, qfep="off", **options))
    assert isinstance(q.lm_head, (glufx.Int8WeightLinear, glufx.Int8Linear))
    d = glufx.save(q, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(d)
    assert type(hf.lm_head) is type(q.lm_head)
    x = calib_ids[:2, 1:20]
    with torch.no_grad():
        assert torch.equal(hf(input_ids=x).logits, q(input_ids=x).logits)


def test_from_pretrained_refuses_a_checkpoint_missing_int8_tensors(calib_ids, tmp_path):
    from transformers import AutoModelForCausalLM

    d = glufx.save(glufx.compile(tiny_model("llama"), calib_ids, glufx.GlufxConfig(**CFG)), tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.w_scale"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="lacks 1 INT8 tensors"):
        AutoModelForCausalLM.from_pretrained(d)


def test_glufx_load_reads_directories_written_before_the_quantization_config(calib_ids, tmp_path):
    q = glufx.compile(tiny_model("llama"), calib_ids, glufx.GlufxConfig(**CFG))
    d = glufx.save(q, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    del config["quantization_config"]  # what glufx.save wrote before this version
    (d / "config.json").write_text(json.dumps(config))
    x = calib_ids[:2, 1:20]
    with torch.no_grad():
        assert torch.equal(glufx.load(d)(input_ids=x).logits, q(input_ids=x).logits)


def test_save_pretrained_formats(calib_ids, tmp_path):
    q = glufx.compile(tiny_model("llama"), calib_ids, glufx.GlufxConfig(**CFG, rotation="off", granularity="per_token"))
    assert (glufx.save_pretrained(q, tmp_path / "a") / "glufx_plan.json").exists()
    ct = glufx.save_pretrained(q, tmp_path / "b", format="compressed-tensors")
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    with pytest.raises(ValueError, match="choose 'glufx' or 'compressed-tensors'"):
        glufx.save_pretrained(q, tmp_path / "c", format="gguf")
