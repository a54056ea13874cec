"""The `torch.compile(model, backend="glufx", options={"plan": plan})` backend.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml): nothing changes in
PyTorch's global configuration at import. Two inputs work:
  * an already-lowered model (`glufx.compile` / `glufx.load`): the graph holds glufx ops; the backend
    compiles it with the exact Inductor mode (no plan needed);
  * a floating-point model and its plan: the backend runs glufx's matcher on the dynamo graph and
    lowers each planned linear with `glufx.lower.lower_weights`, the per-module lowering
    `glufx.lower` uses, into `torch.ops.glufx.int8_linear` on canonical INT8 weights held as graph
    constants; with `fuse_glu`, each fusable GLU product becomes `torch.ops.glufx.int8_glu`, as
    `glufx.lower` builds `Int8GLU`. The outputs equal the eager lowered model's bit for bit.
Quantized weights are cached per live weight tensor (and its FQN and version), so recompiles (new
shapes, guards) reuse them. A planned linear the backend cannot lower (its weight is computed in the
graph) is counted in `counters["planned_not_lowered"]` and warned about.
"""
from __future__ import annotations

import warnings
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from torch import fx

from ..lower import gate_up_fusable, lower_weights
from ..match import is_linear, match_graph, module_fqn, projection_input
from ..nn import Int8Linear, Int8WeightLinear
from ..ops.schema import GRANULARITIES
from ..plan import Plan
from ..transforms import plan_transform_state
from .inductor import compile_graph

counters: Counter = Counter()
# id(weight) -> (weakref to it, (fqn, version, shape, dtype), Int8Linear). Keyed by the live tensor,
# not its data_ptr: a freed model's storage is reused by the next one, same shapes and FQNs.
_weight_cache: dict[int, tuple[weakref.ref, tuple, Int8Linear]] = {}
GLUFX_OPS = ("glufx.int8_linear", "glufx.int8_glu")


def _resolve_plan(options: dict) -> Optional[Plan]:
    plan = options.get("plan")
    if plan is None:
        return None
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    if not isinstance(plan, Plan):
        raise TypeError(f"glufx backend: options['plan'] must be a glufx.Plan or a path, got {type(plan).__name__}")
    return plan


def _plan_key(fqn: str, plan: Plan) -> Optional[str]:
    """The plan entry for a graph FQN; a wrapper (e.g. PrefixedLM's `model.`) may prefix the path."""
    if fqn in plan.modules:
        return fqn
    hits = [k for k in plan.modules if fqn.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


def _lowered(key: str, weight: torch.Tensor, bias: Optional[torch.Tensor], plan: Plan) -> Int8Linear:
    mp = plan.modules[key]
    state = (key, weight._version, tuple(weight.shape), weight.dtype, mp.granularity, mp.x_scale, str(mp.rotation))
    hit = _weight_cache.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == state:
        counters["weights_cache_hits"] += 1
        return hit[2]
    mod = lower_weights(weight, bias, mp, plan.tensors)
    ident = id(weight)
    _weight_cache[ident] = (weakref.ref(weight, lambda _: _weight_cache.pop(ident, None)), state, mod)
    counters["weights_quantized"] += 1
    return mod


def _const(gm: fx.GraphModule, name: str, value: Optional[torch.Tensor]) -> Optional[fx.Node]:
    if value is None:
        return None
    gm.register_buffer(name, value)
    return gm.graph.get_attr(name)


def _linear_args(node: fx.Node):
    w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[0], w, b


def rewrite_dynamo_graph(gm: fx.GraphModule, example_inputs: list, plan: Plan) -> int:
    """Lower the plan's linears (and GLU products, with fuse_glu) in a dynamo graph; returns the count."""
    if plan.transforms:
        _check_transforms(gm, example_inputs, plan)
    value_of = {n: v for n, v in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs)}
    nodes = {n.name: n for n in gm.graph.nodes}
    lowered: dict[str, tuple[str, Int8Linear]] = {}  # linear node name -> (planned FQN, its lowered module)
    weight_only: dict[str, tuple[str, Int8WeightLinear]] = {}  # fp_weights="int8": the FP-activation linears
    fp_weights = plan.config.get("fp_weights", "fp") == "int8"
    n_rewritten, skipped = 0, []
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and is_linear(node)) or projection_input(node) is None:
            continue
        key = _plan_key(module_fqn(node) or "", plan)
        if key is None or not (plan.modules[key].action == "int8" or (fp_weights and plan.modules[key].action == "fp")):
            continue
        x, w, b = _linear_args(node)
        weight, bias = value_of.get(w), value_of.get(b) if b is not None else None
        if not isinstance(weight, torch.Tensor) or (b is not None and not isinstance(bias, torch.Tensor)):
            skipped.append(key)  # computed in the graph: nothing to quantize ahead of time
            continue
        if plan.modules[key].action == "fp":
            weight_only[node.name] = (key, Int8WeightLinear.from_float(weight, bias, what=key))
            continue
        lowered[node.name] = (key, _lowered(key, weight, bias, plan))

    fused = _fuse_glus(gm, plan, nodes, lowered) if plan.config.get("fuse_glu") else set()
    for name, (key, mod) in [*lowered.items(), *weight_only.items()]:
        if name in fused:
            continue
        node = nodes[name]
        prefix = "glufx_" + key.replace(".", "_")
        with gm.graph.inserting_before(node):
            weights = (node.args[0], _const(gm, prefix + "_w_q", mod.w_q), _const(gm, prefix + "_w_scale", mod.w_scale),
                       _const(gm, prefix + "_bias", mod.bias))
            if isinstance(mod, Int8WeightLinear):
                op, args = torch.ops.glufx.int8_weight_linear.default, weights
            else:
                op, args = torch.ops.glufx.int8_linear.default, (
                    *weights, _const(gm, prefix + "_x_scale", mod.x_scale), GRANULARITIES[mod.granularity],
                    _const(gm, prefix + "_rot_signs", mod.rot_signs), mod.rot_block)
            new = gm.graph.call_function(op, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        n_rewritten += 1
        counters["int8_weight_linear" if isinstance(mod, Int8WeightLinear) else "int8_linear"] += 1
    if skipped:
        counters["planned_not_lowered"] += len(skipped)
        warnings.warn(f"glufx backend: {len(skipped)} planned INT8 linear(s) stay in floating point because their "
                      f"weight is computed inside the graph (e.g. {skipped[0]})", stacklevel=2)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return n_rewritten + len(fused)


def _fuse_glus(gm: fx.GraphModule, plan: Plan, nodes: dict, lowered: dict) -> set:
    """GLU products whose gate and up are both lowered with one activation quantization -> int8_glu
    (the predicate glufx.lower asks before building an Int8GLU)."""
    fused = set()
    plain = {b["gate"]: b for b in plan.glu_blocks if b.get("module")}
    node_of = {key: name for name, (key, _) in lowered.items()}  # planned FQN -> its lowered linear node
    for block in match_graph(gm.graph).glu_blocks:
        if block.fused or block.moe or block.mul_node is None:
            continue
        plan_block = plain.get(_plan_key(block.gate, plan))
        if plan_block is None or plan_block["gate"] not in node_of or plan_block["up"] not in node_of:
            continue
        gn, un = node_of[plan_block["gate"]], node_of[plan_block["up"]]
        g, u = lowered[gn][1], lowered[un][1]
        if gate_up_fusable(plan, plan_block, g, u) is not None:
            continue
        mul = nodes[block.mul_node]
        prefix = "glufx_" + plan_block["module"].replace(".", "_")
        with gm.graph.inserting_before(mul):
            args = (nodes[gn].args[0], _const(gm, prefix + "_gate_w_q", g.w_q), _const(gm, prefix + "_gate_w_scale", g.w_scale),
                    _const(gm, prefix + "_up_w_q", u.w_q), _const(gm, prefix + "_up_w_scale", u.w_scale), block.act,
                    _const(gm, prefix + "_x_scale", g.x_scale), GRANULARITIES[g.granularity],
                    _const(gm, prefix + "_rot_signs", g.rot_signs), g.rot_block)
            new = gm.graph.call_function(torch.ops.glufx.int8_glu.default, args)
        new.meta.update(mul.meta)
        mul.replace_all_uses_with(new)
        gm.graph.erase_node(mul)
        fused |= {gn, un}
        counters["glu_fused"] += 1
    return fused


def _check_transforms(gm: fx.GraphModule, example_inputs: list, plan: Plan) -> None:
    """A plan with transforms lowers a model that carries them (glufx.prefixed(model, plan) applies them):
    quantizing the untransformed weights with the transformed model's scales would be silently wrong."""
    by_fqn = {}
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs):
        for user in node.users:
            if user.op == "call_function" and is_linear(user) and _linear_args(user)[1] is node:
                key = _plan_key(module_fqn(user) or "", plan)
                if key is not None:
                    by_fqn[key] = value
    if by_fqn and plan_transform_state(plan.transforms, by_fqn.get) != "after":
        raise ValueError("glufx backend: the plan has equivalence transforms the compiled model does not carry; "
                         'compile torch.compile(glufx.prefixed(model, plan), backend="glufx", options={"plan": plan}) '
                         "(glufx.prefixed applies the plan's transforms and QFeP prefix)")


def _holds_prefix(gm: fx.GraphModule) -> bool:
    """A PrefixedLM's prefix KV buffers reach the graph as inputs (or constants) named after them."""
    return any("prefix_k0" in node.name or "prefix_k0" in str(node.target)
               for node in gm.graph.nodes if node.op in ("placeholder", "get_attr"))


def _holds_glufx_ops(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and str(n.target).startswith(GLUFX_OPS) for n in gm.graph.nodes)


def glufx_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None) -> Any:
    """options: `plan` (a Plan or its JSON path; not needed for an already-lowered model); `inductor`
    (default True; False runs the rewritten graph as is); `exact` (default True: Inductor keeps eager's
    float math, so the logits equal `glufx.compile`'s bit for bit; False lets it generate every float op,
    see deploy/inductor.py); `cpp_wrapper` (default False: Inductor's wrapper, the code that calls the
    kernels, is Python; True compiles it to C++, which costs a longer compile and saves the Python work per
    call, what a single-token decode step of a small model is mostly made of); `inductor_configs` (a dict of
    further `torch._inductor.config` settings for this compilation, as `torch._inductor.aoti_compile_and_package`
    takes them)."""
    options = dict(options or {})
    unknown = set(options) - {"plan", "inductor", "exact", "cpp_wrapper", "inductor_configs"}
    if unknown:
        raise ValueError(f"glufx backend: unknown option(s) {sorted(unknown)}; known: plan, inductor, exact, "
                         "cpp_wrapper, inductor_configs")
    plan = _resolve_plan(options)
    if plan is None:
        if not _holds_glufx_ops(gm):
            raise ValueError('glufx backend: pass the plan: torch.compile(m, backend="glufx", options={"plan": plan}) '
                             "with plan = glufx.calibrate(m, calib_data, ...) (or a path to its JSON), or compile a "
                             "model glufx.compile / glufx.load already lowered")
        n_rewritten = 0
    else:
        n_rewritten = rewrite_dynamo_graph(gm, example_inputs, plan)
        if plan.qfep and n_rewritten and not _holds_prefix(gm):
            raise ValueError("glufx backend: the plan has a QFeP prefix but the compiled model does not: compile "
                             'torch.compile(glufx.prefixed(model, plan), backend="glufx", options={"plan": plan}) '
                             "(the plan's QFeM choices were measured with the prefix in place)")
    counters["graphs"] += 1
    if not options.get("inductor", True):
        return gm.forward
    # A fresh GraphModule: Inductor looks new get_attr constants up by their source otherwise
    # (docs/design.md, "The torch.compile backend").
    return compile_graph(fx.GraphModule(gm, gm.graph), example_inputs, exact=options.get("exact", True),
                         cpp_wrapper=bool(options.get("cpp_wrapper", False)),
                         inductor_configs=options.get("inductor_configs"))
