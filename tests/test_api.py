"""glufx.compile / glufx.calibrate end to end on tiny models of every GLU family; errors that name the fix."""
import json

import pytest
import torch

import glufx
from glufx import GlufxConfig, Plan
from glufx.nn import Int8Linear

from conftest import FAMILIES, sqnr, tiny_model

# 2-layer models: one down_proj is 11 % of the decoder linears, so the FP budget is wider than the default
FAST = dict(seq_len=48, batch_size=4, progress=False, num_samples=8, heldout_samples=4, max_fp_param_share=0.25)


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_family(family, calib_ids):
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(calib_ids[:4]).logits
    before = glufx.counters["int8_linear"]
    glufx.compile(model, calib_ids, GlufxConfig(**FAST))
    plan = model.glufx_plan
    n_int8 = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert n_int8 == len(plan.quantized()) > 0
    assert glufx.counters["int8_linear"] - before == n_int8
    assert not isinstance(model.lm_head, Int8Linear)
    with torch.no_grad():
        out = model(calib_ids[:4]).logits
    assert sqnr(ref, out) > 20, f"{family}: W8A8 logits SQNR {sqnr(ref, out):.1f} dB"
    if family == "mixtral":
        experts = [m for m in plan.modules.values() if m.role == "experts"]
        assert experts and all(m.action == "fp" and "expert" in m.reason for m in experts)
        assert plan.modules["model.layers.0.mlp.gate"].action == "fp"


def test_qfem_keeps_the_spiking_down_proj(calib_ids):
    model = tiny_model("llama")
    plan = glufx.calibrate(model, calib_ids, GlufxConfig(**FAST))
    assert plan.ranked()[0].fqn == "model.layers.0.mlp.down_proj"
    assert plan.modules["model.layers.0.mlp.down_proj"].action == "fp"
    assert plan.search["chosen_steps"] >= 1
    # the search measured a real improvement
    assert plan.search["metrics"][plan.search["chosen_steps"]] < plan.search["metrics"][0]
    assert plan.int8_param_share() >= 0.75


def test_qfem_beats_naive_w8a8(calib_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        ref = model(calib_ids).logits
    naive = glufx.compile(tiny_model("llama"), calib_ids, GlufxConfig(**{**FAST, "qfem": "off"}))
    qfem = glufx.compile(model, calib_ids, GlufxConfig(**FAST))
    with torch.no_grad():
        s_naive, s_qfem = sqnr(ref, naive(calib_ids).logits), sqnr(ref, qfem(calib_ids).logits)
    assert s_qfem > s_naive + 3, (s_naive, s_qfem)


def test_alpha_and_budget_modes(calib_ids):
    model = tiny_model("llama")
    plan = glufx.calibrate(model, calib_ids, GlufxConfig(**{**FAST, "qfem": "alpha", "alpha": 3.0}))
    kept = set(plan.kept_fp())
    assert kept == {f for f, m in plan.modules.items() if m.score > 3.0 and m.role not in ("head",)}
    budget = glufx.calibrate(model, calib_ids, GlufxConfig(**{**FAST, "qfem": "budget", "max_fp_param_share": 0.15}))
    assert 1 - budget.int8_param_share() <= 0.15
    assert budget.kept_fp()[0] == "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("granularity", ["per_sequence", "per_token", "static", "per_tensor"])
def test_granularities(granularity, calib_ids):
    model = tiny_model("qwen2")
    with torch.no_grad():
        ref = model(calib_ids).logits
    # QFeP (the static default) has its own tests: here the same model object is compared
    glufx.compile(model, calib_ids, GlufxConfig(**{**FAST, "granularity": granularity, "qfep": "off"}))
    assert {m.granularity for m in model.modules() if isinstance(m, Int8Linear)} == {granularity}
    if granularity == "static":
        assert all(m.x_scale is not None and m.x_scale > 0 for m in model.glufx_plan.modules.values()
                   if m.action == "int8")
    with torch.no_grad():
        assert sqnr(ref, model(calib_ids).logits) > 15


def test_plan_json_roundtrip_and_reapply(calib_ids, tmp_path):
    model = tiny_model("gemma3")
    plan = glufx.calibrate(model, calib_ids, GlufxConfig(**FAST))
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = Plan.load(path)
    assert loaded.to_dict() == json.loads(plan.to_json())
    a = glufx.compile(tiny_model("gemma3"), plan=plan)
    b = glufx.compile(tiny_model("gemma3"), plan=loaded)
    with torch.no_grad():
        assert torch.equal(a(calib_ids).logits, b(calib_ids).logits)
    table = plan.table()
    assert "model.layers.0.mlp.down_proj" in table and "decoder-linear parameters in INT8" in table


def test_generate_and_batches(calib_ids):
    model = glufx.compile(tiny_model("llama"), calib_ids, GlufxConfig(**FAST))
    prompts = calib_ids[:3, :6]
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=5, do_sample=False)
    assert out.shape == (3, 11) and torch.equal(out[:, :6], prompts)
    # per-sequence activation scales: a row's result does not depend on its batch mates
    with torch.no_grad():
        together = model(calib_ids[:3]).logits
        alone = model(calib_ids[1:2]).logits
    assert torch.allclose(together[1:2], alone, atol=1e-5)
    loss = model(calib_ids[:2], labels=calib_ids[:2]).loss
    assert torch.isfinite(loss)


def test_strings_and_file_calibration(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # a character-level tokenizer that prepends BOS, as Llama / Gemma tokenizers do
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}, ".": 29, "\n": 30}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    texts = ["the quick brown fox. jumps over\nthe lazy dog." * 3, "hello world.\n" * 5, "abc" * 40, "z"]
    with pytest.warns(UserWarning, match="1 of 4 calibration sequences have fewer than 4 tokens"):
        plan = glufx.calibrate(tiny_model("llama"), texts, GlufxConfig(**{**FAST, "qfem": "off"}), tokenizer=tok)
    assert plan.calibration["sequences"] == 3 and plan.calibration["bos_token_id"] == 1  # "z" left out
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in texts * 10))
    plan = glufx.calibrate(tiny_model("llama"), f, GlufxConfig(**{**FAST, "qfem": "off"}), tokenizer=tok)
    assert plan.calibration["tokens"] == plan.calibration["sequences"] * 48


class TwoLayerGLU(torch.nn.Module):
    """A GLU MLP outside transformers: glufx works on any module with GLU blocks."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.w1, self.w3 = torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(32, 64, bias=False)
        self.w2 = torch.nn.Linear(64, 32)

    def forward(self, x):
        h = self.norm(x)
        return x + self.w2(torch.nn.functional.gelu(self.w1(h), approximate="tanh") * self.w3(h))


def test_generic_module_with_example_inputs():
    torch.manual_seed(0)
    m = TwoLayerGLU().eval()
    examples = [torch.randn(2, 10, 32) for _ in range(6)]
    with torch.no_grad():
        ref = m(examples[0])
    glufx.compile(m, examples, GlufxConfig(progress=False, heldout_samples=2, min_score=1.0))
    blocks = m.glufx_plan.glu_blocks
    assert blocks == [{"gate": "w1", "up": "w3", "down": "w2", "act": "gelu_tanh", "fused": False, "moe": False,
                      "module": None}]  # the root also norms and adds the residual: not fusable
    with torch.no_grad():
        assert sqnr(ref, m(examples[0])) > 25


# ---- errors that name the problem and the fix ----------------------------------------------

def _opt():
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=128, word_embed_proj_dim=32)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_non_glu_model_is_refused_with_the_fix(calib_ids):
    with pytest.raises(glufx.NoGLUError, match="no GLU block.*require_glu=False"):
        glufx.compile(_opt(), calib_ids, GlufxConfig(**FAST))


def test_non_glu_model_quantizable_when_asked(calib_ids):
    model = _opt()
    with torch.no_grad():
        ref = model(calib_ids).logits
    glufx.compile(model, calib_ids, GlufxConfig(**{**FAST, "require_glu": False, "qfem": "off"}))
    assert model.glufx_plan.glu_blocks == []
    assert isinstance(model.model.decoder.layers[0].fc1, Int8Linear)
    with torch.no_grad():
        assert sqnr(ref, model(calib_ids).logits) > 20


@pytest.mark.parametrize("bad", [torch.zeros(0, 8, dtype=torch.long), [], None])
def test_empty_calibration(bad):
    with pytest.raises(ValueError, match="calibration data is (empty|None)"):
        glufx.compile(tiny_model("llama"), bad, GlufxConfig(**FAST))


def test_unsupported_dtype_and_device():
    with pytest.raises(TypeError, match="model.float\\(\\)"):
        glufx.compile(tiny_model("llama").double(), torch.ones(2, 8, dtype=torch.long))
    model = tiny_model("llama").to("meta")
    with pytest.raises(NotImplementedError, match="model.to\\('cpu'\\)"):
        glufx.compile(model, torch.ones(2, 8, dtype=torch.long))


def test_strings_without_tokenizer():
    with pytest.raises(ValueError, match="tokenizer=tok"):
        glufx.compile(tiny_model("llama"), ["some text"], GlufxConfig(**FAST))


@pytest.mark.parametrize("kwargs,match", [
    (dict(granularity="per_channel"), "granularity"), (dict(qfem="magic"), "qfem"),
    (dict(qfem="alpha"), "alpha > 0"), (dict(max_fp_param_share=2.0), "max_fp_param_share"),
    (dict(version=99), "version"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GlufxConfig(**kwargs)
