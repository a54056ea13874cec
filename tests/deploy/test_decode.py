"""glufx.compile_decode: generate() on a compiled single-token step over a static cache."""
import copy

import pytest
import torch

import glufx
from glufx.deploy import backend as glufx_backend
from glufx.deploy import decode

from conftest import CFG, tiny_model


def _generate(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)


def _quantized(family, calib_ids, **cfg):
    model = tiny_model(family)
    model.generation_config.eos_token_id = None  # every generation runs its full length
    plan = glufx.calibrate(model, calib_ids, glufx.GlufxConfig(**CFG, **cfg))
    return glufx.compile(model, plan=plan)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window layers in the static cache
def test_compiled_step_equals_the_traced_step(family, calib_ids):
    """Inductor in exact mode (off by default for decode) adds no float difference: every step's logits equal those of the same dynamo graph
    run without Inductor. (Against eager with a dynamic cache they differ: transformers traces attention with an
    explicit mask over the static cache; docs/deploy.md measures that on Gemma 3.)"""
    model = _quantized(family, calib_ids)
    ids = calib_ids[:1, :7]
    torch._dynamo.reset()
    traced = glufx.compile_decode(copy.deepcopy(model), exact=True)
    traced.generation_config.compile_config.options = {"inductor": False}
    ref = _generate(traced, ids, 10)
    torch._dynamo.reset()
    before = glufx_backend.counters["graphs"]
    out = _generate(glufx.compile_decode(copy.deepcopy(model), exact=True), ids, 10)
    assert glufx_backend.counters["graphs"] > before  # the step did go through the backend
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compile_prompt", [True, False])
def test_compiled_decode_stays_close_to_eager(calib_ids, compile_prompt):
    """The static cache's attention arithmetic, glufx's attention kernels and Inductor's fused float math are
    other valid float orders: logits stay within INT8 noise, of the prompt step and of the decode step."""
    model = _quantized("llama", calib_ids)
    ids = calib_ids[:1, :7]
    eager = _generate(model, ids, 2)
    torch._dynamo.reset()
    before = glufx_backend.counters["graphs"]
    compiled = _generate(glufx.compile_decode(copy.deepcopy(model), compile_prompt=compile_prompt), ids, 2)
    graphs = glufx_backend.counters["graphs"] - before
    # the decode step's graph, and the prompt step's (dynamo may run the backend twice on a dynamic graph)
    assert graphs > 1 if compile_prompt else graphs == 1
    for e, c in zip(eager.logits, compiled.logits):
        assert (e - c).abs().max() <= 0.05 * e.abs().max()


def test_the_prompt_step_keeps_the_forward_signature(calib_ids):
    """generate() reads the forward's signature: with the prompt step's router in place it still sees
    logits_to_keep (so a prompt's logits are computed for its last position only) and attention_mask; the
    router goes away with compile_prompt=False."""
    import inspect

    model = glufx.compile_decode(tiny_model("llama"))
    own = inspect.signature(type(model).forward.__get__(model))
    assert inspect.signature(model.forward) == own
    assert model._supports_logits_to_keep()
    glufx.compile_decode(model, compile_prompt=False)
    assert "forward" not in model.__dict__


def test_a_prompt_runs_the_compiled_prompt_step(calib_ids):
    """One graph for prompts of every length (dynamic sizes); single tokens and calls that record gradients run
    the model's own forward, and the prompt step's logits stay within INT8 noise of eager glufx's."""
    model = _quantized("llama", calib_ids)
    compiled = glufx.compile_decode(copy.deepcopy(model))
    torch._dynamo.reset()
    with torch.no_grad():
        before = glufx_backend.counters["graphs"]
        for length in (7, 12, 30):
            ids = calib_ids[:1, :length]
            out, ref = compiled(input_ids=ids).logits, model(input_ids=ids).logits
            assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
        graphs = glufx_backend.counters["graphs"] - before
        assert 1 <= graphs <= 2  # dynamo may run the backend twice on a dynamic graph, then never again
        compiled(input_ids=calib_ids[:1, :1])
        assert glufx_backend.counters["graphs"] - before == graphs
    compiled(input_ids=calib_ids[:1, :9])  # gradients on: eager
    assert glufx_backend.counters["graphs"] - before == graphs


def test_no_recompile_per_position_or_call(calib_ids):
    model = glufx.compile_decode(_quantized("gemma3", calib_ids), max_cache_len=64)
    torch._dynamo.reset()
    before = glufx_backend.counters["graphs"]
    _generate(model, calib_ids[:1, :7], 12)
    first = glufx_backend.counters["graphs"] - before
    # the prompt step: one graph with dynamic sizes (dynamo may run the backend on it twice); decode: the first
    # step specialises the position, the second makes it dynamic, and a sliding window that fills (16 positions
    # here) takes its other branch once: at most three graphs, for any length
    assert 1 <= first <= 5
    _generate(model, calib_ids[1:2, :9], 30)  # another prompt length, more tokens: the same cache shape
    assert glufx_backend.counters["graphs"] - before == first


def test_qfep_prefix_in_the_static_cache(calib_ids):
    """A QFeP model decodes from a static cache that starts with the prefix's FP keys and values."""
    model = _quantized("llama", calib_ids, qfep="paper")
    assert model.glufx_plan.qfep
    ids = calib_ids[:1, 1:8]  # no BOS: it is inside the prefix
    torch._dynamo.reset()
    traced = glufx.compile_decode(copy.deepcopy(model), exact=True)
    glufx.deploy.decode.language_model(traced).generation_config.compile_config.options = {"inductor": False}
    ref = _generate(traced, ids, 6)
    torch._dynamo.reset()
    out = _generate(glufx.compile_decode(copy.deepcopy(model), exact=True), ids, 6)
    assert out.sequences.shape == (1, 7 + 6)  # the user's tokens and the new ones, not the prefix
    assert torch.equal(out.sequences, ref.sequences)
    # the prefix is really there: the first new token's logits are eager glufx's (the same eager prefill, up to
    # attention over the static cache's padded length: 1 ulp on an AVX-512 Xeon, bit-equal on Zen 4), and
    # the same model without its prefix is far from them
    eager = _generate(model, ids, 1).logits[0]
    torch.testing.assert_close(out.logits[0], eager, rtol=0, atol=1e-5 * float(eager.abs().max()))
    without_prefix = _generate(model.model, ids, 1).logits[0]
    assert float((without_prefix - eager).abs().max()) > 1e-2 * float(eager.abs().max())


def test_floating_point_model_takes_inductor(calib_ids):
    model = tiny_model("llama")
    model.generation_config.eos_token_id = None
    glufx.compile_decode(model)
    assert model.generation_config.compile_config.backend == "inductor"
    with pytest.raises(ValueError, match="backend='inductor'"):
        glufx.compile_decode(tiny_model("llama"), backend="glufx")


def test_bad_arguments_are_named(calib_ids):
    with pytest.raises(TypeError, match="not a transformers causal LM"):
        glufx.compile_decode(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="max_cache_len"):
        glufx.compile_decode(tiny_model("llama"), max_cache_len=1)
    with pytest.raises(ValueError, match="backend must be"):
        glufx.compile_decode(tiny_model("llama"), backend="eager")


def test_skipping_module_guards_changes_no_output(calib_ids):
    model = _quantized("llama", calib_ids)
    ids = calib_ids[:1, :7]
    torch._dynamo.reset()
    guarded = _generate(glufx.compile_decode(copy.deepcopy(model), skip_module_guards=False), ids, 6)
    torch._dynamo.reset()
    unguarded = glufx.compile_decode(copy.deepcopy(model))  # the default skips them
    assert unguarded.generation_config.compile_config.options["guard_filter_fn"] is not None
    out = _generate(unguarded, ids, 6)
    assert torch.equal(out.sequences, guarded.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, guarded.logits))


def _swap_o_proj(model, seed):
    """A structural change dynamo's skipped module guards would have caught: layer 0's o_proj becomes a
    floating-point nn.Linear with other weights."""
    attn = model.model.layers[0].self_attn
    old = attn.o_proj
    new = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    torch.nn.init.normal_(new.weight, std=0.2, generator=torch.Generator().manual_seed(seed))
    attn.o_proj = new


def test_a_changed_model_compiles_a_new_step(calib_ids):
    """The module guards compile_decode skips are checked once per generate() (model_fingerprint): a model
    changed after its step compiled decodes as a fresh compile of the changed model does, not with the stale graph."""
    model = _quantized("llama", calib_ids)
    ids = calib_ids[:1, :7]
    torch._dynamo.reset()
    compiled = glufx.compile_decode(copy.deepcopy(model))
    before = _generate(compiled, ids, 4)
    _swap_o_proj(compiled, seed=1)
    after = _generate(compiled, ids, 4)
    changed = copy.deepcopy(model)
    _swap_o_proj(changed, seed=1)
    torch._dynamo.reset()
    ref = _generate(glufx.compile_decode(changed, skip_module_guards=False), ids, 4)
    assert torch.equal(after.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, ref.logits))
    assert not torch.equal(after.logits[1], before.logits[1])  # the change is visible in the compiled steps


def test_two_models_never_share_a_step(calib_ids):
    """Two models of one architecture, same cache shapes, different modules: with module guards skipped, each
    still runs its own graphs (each compiled step has a code object of its own)."""
    model = _quantized("llama", calib_ids)
    ids = calib_ids[:1, :7]
    other = copy.deepcopy(model)
    _swap_o_proj(other, seed=2)
    torch._dynamo.reset()
    ref = _generate(glufx.compile_decode(copy.deepcopy(other), skip_module_guards=False), ids, 4)
    torch._dynamo.reset()
    first, second = glufx.compile_decode(model), glufx.compile_decode(other)
    _generate(first, ids, 4)
    out = _generate(second, ids, 4)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))


def test_ring_window_holds_the_rolled_windows_keys():
    """A full ring holds the same keys as transformers' rolled window, in another slot order; a multi-token
    update on a full ring puts it back in order first and then equals transformers' update."""
    from transformers.cache_utils import StaticSlidingWindowLayer

    from glufx.deploy.decode import RingSlidingWindowLayer

    g = torch.Generator().manual_seed(0)
    rolled = StaticSlidingWindowLayer(max_cache_len=40, sliding_window=8)
    ring = RingSlidingWindowLayer(max_cache_len=40, sliding_window=8)
    steps = [5] + [1] * 11 + [3] + [1] * 2  # fills at 8, wraps past it, then a 3-token chunk, then single steps
    for t in steps:
        k, v = torch.randn(1, 2, t, 4, generator=g), torch.randn(1, 2, t, 4, generator=g)
        ka, va = rolled.update(k, v)
        kb, vb = ring.update(k, v)
        if t > 1 or rolled.cumulative_length_int <= 8:  # before the ring turns, and on every chunk: the same order
            assert torch.equal(ka, kb) and torch.equal(va, vb)
        else:  # the same slots as a set: sort each cached key's rows
            assert torch.equal(ka.sort(dim=2).values, kb.sort(dim=2).values)
            assert torch.equal(va.sort(dim=2).values, vb.sort(dim=2).values)
    assert ring.cumulative_length_int == rolled.cumulative_length_int == sum(steps)
    assert int(ring.next_slot) == 2  # two single steps since the chunk reordered the ring


def test_ring_window_generates_what_the_rolled_window_does(calib_ids):
    """Eager generation (no compile) past a sliding window of 16: transformers' rolled static cache and the
    ring give the same tokens and logits to float-order noise."""
    from glufx.deploy.decode import RingSlidingWindowLayer, _ring_static_caches

    model = tiny_model("gemma3", spike=False)
    model.generation_config.eos_token_id = None
    model.generation_config.cache_implementation = "static"
    ids = calib_ids[:1, :7]
    rolled = _generate(model, ids, 30)
    _ring_static_caches(model)
    cache = model._prepare_static_cache("static", 1, 40, None, {})
    assert sum(isinstance(layer, RingSlidingWindowLayer) for layer in cache.layers) == 1  # the sliding layer
    ring = _generate(model, ids, 30)
    assert torch.equal(ring.sequences, rolled.sequences)
    for a, b in zip(ring.logits, rolled.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    twin = copy.deepcopy(model)  # the copy builds its own caches, not the original's
    twin._prepare_static_cache("static", 1, 77, None, {})
    assert twin._previous_max_cache_length == 77 and model._previous_max_cache_length == 40


def test_padded_batch_keeps_rolled_windows(calib_ids):
    """A ring's slots are out of position order and a padding mask is not: a left-padded batch past its window
    decodes as transformers' rolled cache does."""
    from glufx.deploy.decode import RingSlidingWindowLayer, _ring_static_caches

    model = tiny_model("gemma3", spike=False)
    model.generation_config.eos_token_id = None
    model.generation_config.cache_implementation = "static"
    ids = calib_ids[:2, :9].clone()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # the first row is 5 tokens, left-padded
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        rolled = model.generate(ids, **kw)
        _ring_static_caches(model)
        # as long as the cache `rolled` had: a longer one (the next generate reuses the longest) sums attention
        # over more slots, which moved logits by 1e-7 of their scale on an AMD EPYC
        length = model._previous_max_cache_length
        cache = model._prepare_static_cache("static", 2, length, None, {"attention_mask": mask})
        assert not any(isinstance(layer, RingSlidingWindowLayer) for layer in cache.layers)
        again = model.generate(ids, **kw)
    assert torch.equal(again.sequences, rolled.sequences)
    assert all(torch.equal(a, b) for a, b in zip(again.logits, rolled.logits))


@pytest.mark.parametrize("per_head_mask", [False, True])
def test_packed_gqa_attention_equals_repeated_heads(per_head_mask):
    from transformers.integrations.sdpa_attention import repeat_kv

    from glufx.deploy.decode import glufx_sdpa

    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 3, True
    q = torch.randn(2, 6, 1, 16, generator=g)  # 6 query heads over 2 key-value heads
    k, v = torch.randn(2, 2, 20, 16, generator=g), torch.randn(2, 2, 20, 16, generator=g)
    mask = torch.rand(2, 6 if per_head_mask else 1, 1, 20, generator=g) > 0.3
    mask[..., 0] = True
    out, _ = glufx_sdpa(module, q, k, v, mask, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 3), repeat_kv(v, 3), attn_mask=mask,
                                                           scale=0.25).transpose(1, 2)
    assert out.shape == (2, 1, 6, 16)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups,query_len,dtype,kernel", [
    (3, 1, torch.float32, "decode_attention"), (1, 1, torch.float32, "decode_attention"),  # GQA packed, and MHA
    (3, 4, torch.float32, "prefill_attention"), (1, 7, torch.float32, "prefill_attention"),
    (3, 1, torch.bfloat16, None), (3, 4, torch.bfloat16, None), (17, 1, torch.float32, None)])
def test_float32_attention_runs_glufx_kernels(monkeypatch, groups, query_len, dtype, kernel):
    """A decode step's attention (one query, float32, at most 16 query heads per key-value head) runs
    glufx::decode_attention, a float32 prompt's glufx::prefill_attention; anything else takes transformers' SDPA
    path, with the same result."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from glufx.deploy import decode

    calls = []
    for name in ("decode_attention", "prefill_attention"):
        def counting(*args, _op=getattr(torch.ops.glufx, name), _name=name):
            calls.append(_name)
            return _op(*args)
        monkeypatch.setattr(torch.ops.glufx, name, counting)
    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = groups, True
    q = torch.randn(1, 2 * groups, query_len, 32, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 40, 32, generator=g).to(dtype) for _ in range(2))
    mask = torch.ones(1, 1, query_len, 40, dtype=torch.bool).tril(40 - query_len)
    out, _ = decode.glufx_sdpa(module, q, k, v, mask, scaling=0.2)
    assert calls == ([kernel] if kernel else [])
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups),
                                                           attn_mask=mask, scale=0.2).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask_kind", ["none_causal", "none_not_causal", "module_not_causal", "sliding", "padded"])
def test_prompt_attention_equals_transformers_sdpa(mask_kind):
    """glufx_sdpa on a prompt gives what transformers' sdpa_attention_forward gives for the same call: its
    causal rule (no mask -> causal, unless the call or the module says not), sliding-window and padding masks,
    grouped-query heads, and its output layout [B, T, H, D]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from glufx.deploy.decode import glufx_sdpa

    g = torch.Generator().manual_seed(1)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, mask_kind != "module_not_causal"
    T = S = 150
    q = torch.randn(2, 4, T, 24, generator=g)
    k, v = torch.randn(2, 2, S, 24, generator=g), torch.randn(2, 2, S, 24, generator=g)
    kwargs, mask = {}, None
    i, j = torch.arange(T)[:, None], torch.arange(S)[None, :]
    if mask_kind == "none_not_causal":
        kwargs["is_causal"] = False
    elif mask_kind == "sliding":
        mask = ((j <= i) & (i - j < 40)).expand(2, 1, T, S)
    elif mask_kind == "padded":  # the second sequence's first 30 positions are padding
        live = torch.ones(2, S, dtype=torch.bool)
        live[1, :30] = False
        mask = (j <= i)[None, None] & live[:, None, None, :]
    out, _ = glufx_sdpa(module, q, k, v, mask, scaling=0.3, **kwargs)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3, **kwargs)
    assert out.shape == ref.shape == (2, T, 4, 24)
    if mask_kind == "padded":  # rows with nothing to attend: zeros here, NaN from SDPA
        assert torch.equal(out[1, :30], torch.zeros_like(out[1, :30]))
        out, ref = out[:, 30:], ref[:, 30:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compile_decode_switches_sdpa_models_only(calib_ids):
    model = glufx.compile_decode(tiny_model("llama"))
    assert model.config._attn_implementation == "glufx_sdpa"
    eager = tiny_model("llama")
    eager.set_attn_implementation("eager")
    assert glufx.compile_decode(eager).config._attn_implementation == "eager"


def test_masks_built_in_the_step_equal_generates_masks(calib_ids):
    """generate() hands a compile_decode model the padding mask and the compiled step builds the attention masks
    itself (`padding_mask_for_step`): the same tokens and, in the exact mode, the same logits as the step fed
    generate()'s own masks, past a sliding window (the ring) and on a left-padded batch (rolled windows)."""
    from glufx.deploy.decode import padding_mask_for_step

    model = _quantized("gemma3", calib_ids)
    ids = calib_ids[:2, :9].clone()
    padded = torch.ones_like(ids)
    padded[0, :4] = 0
    outs = {}
    for in_step in (True, False):
        torch._dynamo.reset()
        m = glufx.compile_decode(copy.deepcopy(model), exact=True, cpp_wrapper=False, masks_in_step=in_step)
        assert (m.__dict__.get("create_masks_for_generate") is padding_mask_for_step) == in_step
        with torch.no_grad():
            outs[in_step] = [m.generate(x, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                        output_logits=True, return_dict_in_generate=True)
                             for x, mask in ((ids[1:], None), (ids, padded))]
    for built, given in zip(outs[True], outs[False]):
        assert torch.equal(built.sequences, given.sequences)
        for a, b in zip(built.logits, given.logits):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    glufx.compile_decode(m, masks_in_step=False)
    assert "create_masks_for_generate" not in m.__dict__


def test_a_models_own_mask_builder_is_kept(calib_ids):
    """A model class with a `create_masks_for_generate` of its own (image tokens, a forward that calls it) keeps
    it: generate() builds its masks eagerly, as transformers does."""
    model = tiny_model("llama")
    own = lambda **kw: kw["attention_mask"]  # noqa: E731
    model.__class__ = type("OwnMasks", (type(model),), {"create_masks_for_generate": staticmethod(own)})
    glufx.compile_decode(model)
    assert "create_masks_for_generate" not in model.__dict__


def _hf_greedy(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, **kw)


def test_glufx_generate_equals_generate_past_a_window(calib_ids):
    """glufx's own token loop gives generate()'s greedy tokens, past a sliding window of 16 (its ring fills and
    wraps while steps run without dynamo's guards), and a second call reuses its graphs."""
    model = glufx.compile_decode(_quantized("gemma3", calib_ids), exact=True, max_cache_len=48)
    ids = calib_ids[:1, :7]
    torch._dynamo.reset()
    ref = _hf_greedy(model, ids, 30, attention_mask=torch.ones_like(ids))
    before = glufx_backend.counters["graphs"]
    direct = decode.counters["direct_steps"]
    out = glufx.generate(model, ids, 30)
    # 29 steps; the guarded ones: the first two and those within 2 of the window's 16 and the cache's 48 positions
    assert decode.counters["direct_steps"] - direct == 29 - len(_guarded(7, 29, (16, 48)))
    # its step went through the backend: one graph with the cache's lengths dynamic from the first step
    # (CACHE_LENGTH_SOURCES), one more once the window of 16 is full
    graphs = glufx_backend.counters["graphs"] - before
    assert 1 <= graphs <= 2
    assert out.shape == (1, 7 + 30) and torch.equal(out, ref)
    seen = []
    direct = decode.counters["direct_steps"]
    again = glufx.generate(model, calib_ids[1:2, :9], 30, on_token=seen.append, skip_guards=False)
    assert decode.counters["direct_steps"] == direct  # every step through dynamo's guards
    assert glufx_backend.counters["graphs"] - before == graphs  # another prompt length: the same graphs
    assert torch.equal(again, _hf_greedy(model, calib_ids[1:2, :9], 30, attention_mask=torch.ones(1, 9, dtype=torch.long)))
    assert len(seen) == 30 and torch.equal(torch.stack(seen, 1), again[:, 9:])


def _guarded(context, steps, capacities):
    return {i for i in range(steps) if i < 2 or any(abs(context + i - c) <= decode.GUARD_MARGIN for c in capacities)}


def test_unguarded_steps_run_only_a_compiled_entry_whose_guards_pass(calib_ids, monkeypatch):
    """Between guarded steps glufx.generate calls the code dynamo compiled for the step directly; the entry is checked
    against the first unguarded step's arguments, and one whose guards fail (another dtype here) is never used."""
    model = glufx.compile_decode(_quantized("llama", calib_ids), exact=True)
    ids = calib_ids[:1, :6]
    real, seen = decode._compiled_code_for, []

    def spy(step, args, lm):
        seen.append((real(step, args, lm), real(step, (args[0].int(),) + args[1:], lm)))
        return seen[-1][0]
    monkeypatch.setattr(decode, "_compiled_code_for", spy)
    out = glufx.generate(model, ids, 10)
    assert seen and all(fn is not None and wrong is None for fn, wrong in seen)
    assert torch.equal(out, _hf_greedy(model, ids, 10, attention_mask=torch.ones_like(ids)))
    # no entry to trust: the step runs through dynamo (skip_guard_eval_unsafe), with the same tokens
    monkeypatch.setattr(decode, "_compiled_code_for", lambda step, args, lm: None)
    direct = decode.counters["direct_steps"]
    assert torch.equal(glufx.generate(model, ids, 10), out)
    assert decode.counters["direct_steps"] == direct


def test_glufx_generate_padded_batch_stops_at_eos(calib_ids):
    """A left-padded batch, rows stopping at EOS and padded after it, as generate() does."""
    model = glufx.compile_decode(_quantized("llama", calib_ids), exact=True)
    ids = calib_ids[:2, :9].clone()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # the first row is 5 tokens, left-padded
    free = _hf_greedy(model, ids, 12, attention_mask=mask)
    eos = int(free[1, 9 + 3])  # the second row's fourth new token
    ref = _hf_greedy(model, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    out = glufx.generate(model, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref[:, :out.shape[1]]) and (ref[:, out.shape[1]:] == 0).all()
    first = int((free[1, 9:] == eos).nonzero()[0])  # a tiny model repeats itself: its first occurrence
    assert int(out[1, 9 + first]) == eos and (out[1, 9 + first + 1:] == 0).all()
    assert torch.equal(glufx.generate(model, ids, 12, attention_mask=mask), free)


def test_glufx_generate_keeps_the_qfep_prefix(calib_ids):
    model = glufx.compile_decode(_quantized("llama", calib_ids, qfep="paper"), exact=True)
    ids = calib_ids[:1, 1:8]
    ref = _hf_greedy(model, ids, 6, attention_mask=torch.ones_like(ids))
    out = glufx.generate(model, ids, 6)
    assert out.shape == (1, 7 + 6) and torch.equal(out, ref)


def test_glufx_generate_names_bad_input(calib_ids):
    model = tiny_model("llama")
    ids = calib_ids[:1, :5]
    with pytest.raises(ValueError, match="compile_decode"):
        glufx.generate(model, ids, 4)
    glufx.compile_decode(model)
    with pytest.raises(ValueError, match="max_new_tokens"):
        glufx.generate(model, ids, 0)
    with pytest.raises(ValueError, match="int64"):
        glufx.generate(model, ids.float(), 4)
    with pytest.raises(ValueError, match="attention_mask"):
        glufx.generate(model, ids, 4, attention_mask=torch.ones(1, 3, dtype=torch.long))


def test_guarded_steps_surround_each_capacity():
    from types import SimpleNamespace

    from glufx.deploy.decode import GUARD_MARGIN, _guarded_steps

    cache = SimpleNamespace(layers=[SimpleNamespace(max_cache_len=16), SimpleNamespace(max_cache_len=64)])
    steps = _guarded_steps(cache, context=7, new_tokens=60)
    # the first two steps, and every step whose cached length is within the margin of 16 or 64
    assert steps == {0, 1} | set(range(16 - 7 - GUARD_MARGIN, 16 - 7 + GUARD_MARGIN + 1)) \
        | set(range(64 - 7 - GUARD_MARGIN, 60))
    assert _guarded_steps(SimpleNamespace(layers=[]), 7, 5) == set(range(5))
