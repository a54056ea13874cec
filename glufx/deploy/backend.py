"""The `torch.compile(model, backend="glufx", options={"plan": plan})` backend.

Registered through the `torch_dynamo_backends` entry point (pyproject.toml): nothing changes in
PyTorch's global configuration at import. The backend runs glufx's matcher on the dynamo graph
(torch-IR spelling; weights arrive as placeholders whose real tensors are in `example_inputs`),
rewrites every linear the plan quantizes into `torch.ops.glufx.int8_linear_packed` with the packed
weight as a graph constant, and hands the graph to Inductor, which keeps the glufx op as an extern
call and (by default) eager's float math around it (deploy/inductor.py). Quantized weights are
cached per live weight tensor (and its FQN and version), so recompiles (new shapes, guards) reuse them.
"""
from __future__ import annotations

import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from torch import fx

from ..match import is_linear, module_fqn, projection_input
from ..ops.schema import GRANULARITIES
from ..plan import Plan
from .inductor import compile_graph

counters: Counter = Counter()
# id(weight) -> (weakref to it, (fqn, version, shape, dtype), (packed, scale)). Keyed by the live
# tensor, not its data_ptr: a freed model's storage is reused by the next one, same shapes and FQNs.
_weight_cache: dict[int, tuple[weakref.ref, tuple, tuple[torch.Tensor, torch.Tensor]]] = {}


def _resolve_plan(options: Optional[dict]) -> Plan:
    options = dict(options or {})
    plan = options.get("plan")
    if plan is None:
        raise ValueError('glufx backend: pass the plan: torch.compile(m, backend="glufx", options={"plan": plan}) '
                         "with plan = glufx.calibrate(m, calib_data, ...) (or a path to its JSON)")
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


def _quantized(fqn: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    state = (fqn, weight._version, tuple(weight.shape), weight.dtype)
    hit = _weight_cache.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == state:
        counters["weights_cache_hits"] += 1
        return hit[2]
    w_q, w_scale = torch.ops.glufx.quantize_weight(weight.detach())
    packed = (torch.ops.glufx.pack_weight(w_q), w_scale)
    key = id(weight)
    _weight_cache[key] = (weakref.ref(weight, lambda _: _weight_cache.pop(key, None)), state, packed)
    counters["weights_quantized"] += 1
    return packed


def rewrite_dynamo_graph(gm: fx.GraphModule, example_inputs: list, plan: Plan) -> int:
    """Replace planned linears by glufx.int8_linear_packed; returns the number rewritten."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    value_of = {n: v for n, v in zip(placeholders, example_inputs)}
    n_rewritten = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and is_linear(node)) or projection_input(node) is None:
            continue
        key = _plan_key(module_fqn(node) or "", plan)
        if key is None or plan.modules[key].action != "int8":
            continue
        mp = plan.modules[key]
        x = node.args[0]
        w = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = value_of.get(w)
        if not isinstance(weight, torch.Tensor):
            continue  # the weight is computed in the graph: leave the linear in floating point
        w_packed, w_s = _quantized(key, weight)
        prefix = "glufx_" + key.replace(".", "_")
        gm.register_buffer(prefix + "_w_packed", w_packed)
        gm.register_buffer(prefix + "_w_scale", w_s)
        x_scale = None
        if mp.granularity == "static":
            gm.register_buffer(prefix + "_x_scale", torch.tensor([mp.x_scale], dtype=torch.float32))
        with gm.graph.inserting_before(node):
            wq_n = gm.graph.get_attr(prefix + "_w_packed")
            ws_n = gm.graph.get_attr(prefix + "_w_scale")
            if mp.granularity == "static":
                x_scale = gm.graph.get_attr(prefix + "_x_scale")
            new = gm.graph.call_function(torch.ops.glufx.int8_linear_packed.default,
                                         (x, wq_n, ws_n, b, x_scale, GRANULARITIES[mp.granularity]))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        n_rewritten += 1
        counters["int8_linear"] += 1
    gm.graph.lint()
    gm.recompile()
    return n_rewritten


def _holds_prefix(gm: fx.GraphModule) -> bool:
    """A PrefixedLM's prefix KV buffers reach the graph as inputs (or constants) named after them."""
    return any("prefix_k0" in node.name or "prefix_k0" in str(node.target)
               for node in gm.graph.nodes if node.op in ("placeholder", "get_attr"))


def glufx_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None) -> Any:
    """options: `plan` (a Plan or its JSON path); `inductor` (default True; False runs the rewritten
    graph as is); `exact` (default True: Inductor keeps eager's float math, so the logits equal
    `glufx.compile`'s bit for bit; False lets it generate every float op, see deploy/inductor.py)."""
    options = dict(options or {})
    unknown = set(options) - {"plan", "inductor", "exact"}
    if unknown:
        raise ValueError(f"glufx backend: unknown option(s) {sorted(unknown)}; known: plan, inductor, exact")
    plan = _resolve_plan(options)
    n_rewritten = rewrite_dynamo_graph(gm, example_inputs, plan)
    if plan.qfep and n_rewritten and not _holds_prefix(gm):
        raise ValueError("glufx backend: the plan has a QFeP prefix but the compiled model does not: compile "
                         'torch.compile(glufx.prefixed(model, plan), backend="glufx", options={"plan": plan}) '
                         "(the plan's QFeM choices were measured with the prefix in place)")
    counters["graphs"] += 1
    if not options.get("inductor", True):
        return gm.forward
    # A fresh GraphModule: Inductor looks new get_attr constants up by their source otherwise
    # (NOTES-capture.md: "... not found in param_name_to_source").
    return compile_graph(fx.GraphModule(gm, gm.graph), example_inputs, exact=options.get("exact", True))
