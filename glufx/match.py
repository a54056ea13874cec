"""Match: find GLU blocks, projections and sibling groups in a captured graph, by structure.

One matcher for both graph dialects glufx sees:
  torch.export (ATen):  aten.linear.default, aten.silu.default, aten.gelu.default, aten.mul.Tensor
  dynamo (torch IR):    torch._C._nn.linear / F.linear, F.silu / F.gelu, operator.mul / torch.mul
Names are never used to decide what a block is, only to report it: every projection is keyed by the
FQN of its module, read from `nn_module_stack` (dynamo spellings normalised).
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

LINEAR_TARGETS = {aten.linear.default, torch._C._nn.linear, F.linear}
MUL_TARGETS = {aten.mul.Tensor, operator.mul, torch.mul}
SILU_TARGETS = {aten.silu.default, F.silu, torch._C._nn.silu if hasattr(torch._C._nn, "silu") else F.silu}
GELU_TARGETS = {aten.gelu.default, F.gelu, torch._C._nn.gelu}
SPLIT_TARGETS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, torch.chunk, torch.split}
# Ops that pass a value through unchanged in value terms (casts, copies, eval-mode dropout).
PASSTHROUGH_TARGETS = {
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.clone.default, aten.alias.default,
    aten.dropout.default, aten.contiguous.default, aten.type_as.default, F.dropout, torch.clone,
}
PASSTHROUGH_METHODS = {"to", "float", "half", "bfloat16", "type", "contiguous", "clone"}
ROUTER_TARGETS = {aten.softmax.int, aten._softmax.default, aten.topk.default, aten.sigmoid.default, F.softmax,
                  torch.softmax, torch.topk, torch.sigmoid}


@dataclass
class Projection:
    """One weight-carrying matmul: an nn.Linear (2-D weight) or a fused 3-D expert bank."""

    fqn: str  # module FQN (plan key)
    node: str  # graph node name
    input_node: str  # producer of the activation after stripping casts
    in_features: int
    out_features: int
    n_params: int
    kind: str = "linear"  # "linear" | "experts"
    role: str = "other"  # gate | up | gate_up | down | router | head | experts | other
    group: int = -1  # sibling group id (projections sharing one input)


@dataclass
class GLUBlock:
    gate: str  # projection FQNs; gate == up for a fused gate_up projection
    up: str
    down: str
    act: str  # silu | gelu | gelu_tanh
    fused: bool = False
    moe: bool = False
    module: Optional[str] = None  # the module whose forward is exactly down(act(gate(x)) * up(x)), if one is
    mul_node: Optional[str] = None  # the product's graph node (graph-local: not part of a plan)


@dataclass
class NormSeam:
    """A sibling group's input is `y * g (+ b)`, g = scale * w + offset elementwise, w (and b) parameters of
    one norm that reach nothing else, and the product reaches nothing but the group's linears: dividing
    g (and b) by s and multiplying the linears' input columns by s leaves the model's function unchanged.
    Found for RMSNorm (g = w), Gemma's (g = 1 + w) and LayerNorm (g = w, with bias); proven on the graph,
    whatever the norm's class is called."""

    weight: str  # FQN of the parameter w
    consumers: list[str]  # the linears reading the product
    scale: float = 1.0
    offset: float = 0.0
    bias: Optional[str] = None  # FQN of the LayerNorm bias, when there is one
    group: int = -1


@dataclass
class ValueSeam:
    """A linear `producer` whose output reaches the linear `consumer` only by moving values around
    (views, transposes, head expansion for grouped-query attention) and as the *value* of an attention
    (which mixes tokens, never channels): consumer input column j reads producer output channel
    `channel_map[j]` (several columns per channel under GQA). Dividing the producer's output channel c
    by s_c and multiplying every consumer column that reads c by s_c leaves the function unchanged.
    Found for v -> o by following the graph, whatever the modules are called."""

    producer: str
    consumer: str
    channel_map: list[int]


@dataclass
class MatchResult:
    projections: dict[str, Projection] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    glu_blocks: list[GLUBlock] = field(default_factory=list)
    norm_seams: list[NormSeam] = field(default_factory=list)
    value_seams: list[ValueSeam] = field(default_factory=list)

    @property
    def moe_blocks(self) -> list[GLUBlock]:
        return [b for b in self.glu_blocks if b.moe]

    @property
    def linears(self) -> dict[str, Projection]:
        return {k: p for k, p in self.projections.items() if p.kind == "linear"}

    def counts(self) -> dict[str, int]:
        return {
            "glu_blocks": sum(not b.moe for b in self.glu_blocks),
            "moe_blocks": len(self.moe_blocks),
            "fused_gate_up": sum(b.fused and not b.moe for b in self.glu_blocks),
            "linears": len(self.linears),
            "groups": len(self.groups),
            "norm_seams": len(self.norm_seams),
            "value_seams": len(self.value_seams),
        }


_DYNAMO_INDEX = re.compile(r"\[(\d+)\]")
_DYNAMO_MODULES = re.compile(r"(?:^|\.)_modules\[['\"]([^'\"]+)['\"]\]")
_DYNAMO_KEY = re.compile(r"\[['\"]([^'\"]+)['\"]\]")


def normalize_fqn(path: str) -> str:
    """`L['self'].model.layers[0].mlp._modules['up']` (or `L['args'][0]...`) -> `model.layers.0.mlp.up`."""
    # the root module is `self` when a method is compiled, `args[0]` when the module call is
    path = re.sub(r"^L\[['\"](self|args|fn)['\"]\](\[0\])?\.?", "", path)
    path = re.sub(r"^L__self__\.?", "", path)
    # only dynamo's `._modules['x']` accessor, never `_modules` inside a module's own name
    path = _DYNAMO_MODULES.sub(r".\1", path)
    path = _DYNAMO_KEY.sub(r".\1", path)
    path = _DYNAMO_INDEX.sub(r".\1", path)
    return path.strip(".").replace("..", ".")


def module_fqn(node: fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return normalize_fqn(path)


def strip(node):
    """The value a node carries, looking through casts and copies."""
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target in PASSTHROUGH_TARGETS:
            node = node.args[0]
        elif node.op == "call_method" and node.target in PASSTHROUGH_METHODS:
            node = node.args[0]
        else:
            break
    return node


def _val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val", node.meta.get("example_value")) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _weight_base(node) -> Optional[fx.Node]:
    # A 3-D expert bank reaches its matmul through transpose/permute/select views.
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in {
        aten.transpose.int, aten.permute.default, aten.t.default, torch.transpose, aten.select.int,
    }:
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr") else None


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS or (
        node.op == "call_method" and node.target == "linear")


def projection_input(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, str]]:
    """(activation input, weight node, kind) if `node` is a projection, else None."""
    if node.op != "call_function":
        return None
    if node.target in LINEAR_TARGETS:
        x, w = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        w_val = _val(w)
        if w_val is not None and w_val.dim() == 2 and _weight_base(w) is not None:
            return strip(x), w, "linear"
        if w_val is not None and w_val.dim() == 2:  # a slice of an expert bank (eager MoE loop)
            base = _weight_base(w)
            return (strip(x), base, "experts") if base is not None else None
        return None
    name = str(node.target)
    if any(k in name for k in ("grouped_mm", "batched_mm", "bmm")) and node.args:
        for w in node.args[1:]:
            base = _weight_base(w) if isinstance(w, fx.Node) else None
            if base is not None and _val(base) is not None and _val(base).dim() == 3:
                return strip(node.args[0]), base, "experts"
    return None


def _act_kind(node) -> Optional[tuple[str, fx.Node]]:
    node = strip(node)
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in SILU_TARGETS:
        return "silu", node.args[0]
    if node.op == "call_function" and node.target in GELU_TARGETS:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return ("gelu_tanh" if approx == "tanh" else "gelu"), node.args[0]
    return None


def _projection_of(node, projs: dict[str, tuple[Projection, fx.Node]]) -> Optional[tuple[Projection, Optional[int]]]:
    """The projection whose output `node` is (or a chunk of it: the chunk index)."""
    node = strip(node)
    if not isinstance(node, fx.Node):
        return None
    if node.name in projs:
        return projs[node.name][0], None
    if node.op == "call_function" and node.target is operator.getitem:
        src = strip(node.args[0])
        if isinstance(src, fx.Node) and (src.op == "call_function" and src.target in SPLIT_TARGETS
                                         or src.op == "call_method" and src.target in ("chunk", "split")):
            inner = strip(src.args[0])
            if isinstance(inner, fx.Node) and inner.name in projs:
                return projs[inner.name][0], node.args[1]
    return None


def _plain_glu_module(graph: fx.Graph, block: GLUBlock, strip_root: str, allowed: set) -> Optional[str]:
    """The module holding gate, up and down whose forward computes nothing but the GLU (so it can be
    replaced by one fused op), or None. Every op traced inside it must belong to one of the three
    projections, be the activation or the product, or be a cast."""
    parent = block.gate.rpartition(".")[0]
    if not parent or block.up.rpartition(".")[0] != parent or block.down.rpartition(".")[0] != parent:
        return None
    projections = {block.gate, block.up, block.down}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        fqn = (module_fqn(node) or "").removeprefix(strip_root)
        if fqn != parent and not fqn.startswith(parent + "."):
            continue
        inside_projection = any(fqn == p or fqn.startswith(p + ".") for p in projections)
        if not (inside_projection or node in allowed or strip(node) is not node
                or node.target in PASSTHROUGH_TARGETS or node.target in PASSTHROUGH_METHODS):
            return None
    return parent


def match_graph(graph: fx.Graph, param_names: Optional[dict[str, str]] = None, strip_root: str = "") -> MatchResult:
    """`param_names`: placeholder name -> parameter FQN (an ExportedProgram's graph signature);
    `strip_root`: a wrapper's attribute path to drop, so FQNs are those of the wrapped model."""
    result = MatchResult()
    projs: dict[str, tuple[Projection, fx.Node]] = {}  # node name -> projection
    for node in graph.nodes:
        found = projection_input(node)
        if found is None:
            continue
        x, w, kind = found
        if kind == "experts":  # one module owns several banks: key each by its parameter
            fqn = (param_names or {}).get(w.name) or (w.target if w.op == "get_attr" else f"{module_fqn(node)}.{w.name}")
        else:
            fqn = module_fqn(node) or (param_names or {}).get(w.name, w.name).removesuffix(".weight")
        fqn = fqn.removeprefix(strip_root)
        wv = _val(w)
        out_f, in_f = wv.shape[-2], wv.shape[-1]  # [out, in] or [experts, out, in]
        if fqn in result.projections:  # one module called twice (shared weights): keep the first
            projs[node.name] = (result.projections[fqn], node)
            continue
        p = Projection(fqn=fqn, node=node.name, input_node=x.name if isinstance(x, fx.Node) else str(x),
                       in_features=int(in_f), out_features=int(out_f), n_params=int(wv.numel()), kind=kind)
        result.projections[fqn] = p
        projs[node.name] = (p, node)

    # GLU: mul(act(proj_a(x)), proj_b(x)) feeding a down projection.
    for node in graph.nodes:
        if not (node.op == "call_function" and node.target in MUL_TARGETS and len(node.args) == 2):
            continue
        for act_side, lin_side in ((0, 1), (1, 0)):
            act = _act_kind(node.args[act_side])
            if act is None:
                continue
            gate = _projection_of(act[1], projs)
            up = _projection_of(node.args[lin_side], projs)
            if gate is None or up is None:
                continue
            (gp, gi), (upp, ui) = gate, up
            same_input = gp.input_node == upp.input_node
            fused = gp is upp and gi is not None and ui is not None and gi != ui
            if not (same_input and (gp is not upp or fused)):
                continue
            downs = [u for u in _users_through_casts(node) if u.name in projs]
            if len(downs) != 1:
                continue
            down = projs[downs[0].name][0]
            moe = gp.kind == "experts"
            block = GLUBlock(gate=gp.fqn, up=upp.fqn, down=down.fqn, act=act[0], fused=fused, moe=moe,
                             mul_node=node.name)
            if not (fused or moe):
                block.module = _plain_glu_module(graph, block, strip_root, allowed={node, strip(node.args[act_side])})
            result.glu_blocks.append(block)
            if fused:
                gp.role = "gate_up"
            else:
                gp.role, upp.role = "gate", "up"
            down.role = "down"
            if moe:
                for p in (gp, upp, down):
                    p.role = "experts"
            break

    _mark_routers_and_head(graph, projs)
    by_input: dict[str, list[str]] = {}
    for p in result.projections.values():
        by_input.setdefault(p.input_node, []).append(p.fqn)
    result.groups = list(by_input.values())
    for gid, members in enumerate(result.groups):
        for fqn in members:
            result.projections[fqn].group = gid
    nodes = {n.name: n for n in graph.nodes}
    for gid, members in enumerate(result.groups):
        if all(result.projections[f].kind == "linear" for f in members):
            seam = _norm_seam(graph, nodes.get(result.projections[members[0]].input_node), members, projs, strip_root)
            if seam is not None:
                seam.group = gid
                result.norm_seams.append(seam)
    for name, (p, node) in projs.items():
        if p.kind == "linear" and projs[name][1] is node:
            vs = _value_seam(node, p, projs)
            if vs is not None:
                result.value_seams.append(vs)
    return result


# Ops that only move values (ATen, as torch.export writes them): a channel goes where they put it.
MOVE_TARGETS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default, aten.slice.Tensor, aten.flatten.using_ints,
    aten.unflatten.int, aten.t.default,
} | PASSTHROUGH_TARGETS
ATTENTION_TARGETS = {aten.scaled_dot_product_attention.default}
MATMUL_TARGETS = {aten.matmul.default}


def _concrete(a):
    """An op argument with every symbolic size (batch, sequence) set to 1."""
    if isinstance(a, fx.Node):
        v = a.meta.get("val")
        if isinstance(v, torch.SymInt) or isinstance(v, int):
            return 1
        raise _NotASeam
    if isinstance(a, (list, tuple)):
        return type(a)(_concrete(x) for x in a)
    return a


class _NotASeam(Exception):
    pass


def _value_seam(node: fx.Node, producer: Projection, projs: dict) -> Optional[ValueSeam]:
    """Follow `node`'s output with one token of one sequence, carrying each channel's index as its
    value through the ops between it and the next linear: only value moves and an attention's value
    input are allowed (with one token, attention returns its value: the weights are 1), each step has a
    single user. The consumer's input then reads, column by column, which producer channel it is."""
    val = _val(node)
    if val is None or val.dim() < 2 or not all(isinstance(d, torch.SymInt) or d == 1 for d in val.shape[:-1]):
        return None  # not a [batch, sequence, channels] value with free batch and sequence sizes
    label = torch.arange(producer.out_features, dtype=torch.float64).reshape([1] * (val.dim() - 1) + [-1])
    cur, moved = node, False
    try:
        for _ in range(64):
            users = [u for u in cur.users if not (u.op == "call_function" and str(u.target).startswith("aten._assert"))]
            if len(users) != 1 or users[0].op != "call_function":
                return None
            u = users[0]
            if u.name in projs:
                consumer = projs[u.name][0]
                if u.args[0] is not cur or consumer.kind != "linear" or not moved or consumer.fqn == producer.fqn:
                    return None
                cmap = label.reshape(-1)
                if cmap.numel() != consumer.in_features:
                    return None
                return ValueSeam(producer=producer.fqn, consumer=consumer.fqn, channel_map=[int(c) for c in cmap])
            if u.target in ATTENTION_TARGETS:
                if len(u.args) < 3 or u.args[2] is not cur or cur in u.args[:2] or cur in u.kwargs.values():
                    return None
                q_heads, v_heads = _val(u.args[0]).shape[-3], label.shape[-3]
                if q_heads != v_heads:
                    if not u.kwargs.get("enable_gqa") or q_heads % v_heads:
                        return None
                    label = label.repeat_interleave(q_heads // v_heads, dim=-3)
                moved = True
            elif u.target in MATMUL_TARGETS:  # eager attention: probabilities @ value
                if len(u.args) != 2 or u.args[1] is not cur or u.args[0] is cur:
                    return None
                if _val(u.args[0]).shape[-3] != label.shape[-3]:
                    return None
                moved = True
            elif u.target in MOVE_TARGETS:
                if any(isinstance(a, fx.Node) and a is not cur and _val(a) is not None for a in u.args):
                    return None
                args = [label if a is cur else _concrete(a) for a in u.args]
                kwargs = {k: _concrete(a) for k, a in u.kwargs.items() if k not in ("dtype", "device", "layout")}
                label = u.target(*args, **kwargs)
                if label.dtype != torch.float64:
                    return None
            else:
                return None
            cur = u
    except (_NotASeam, RuntimeError, TypeError, IndexError):
        return None
    return None


LAYER_NORM_TARGETS = {aten.layer_norm.default, F.layer_norm, torch.layer_norm}
RMS_NORM_TARGETS = {t for t in (getattr(aten, "rms_norm", None), getattr(F, "rms_norm", None),
                                getattr(torch, "rms_norm", None)) if t is not None}
RMS_NORM_TARGETS = {getattr(t, "default", t) for t in RMS_NORM_TARGETS}


def _attr(graph: fx.Graph, target: str):
    obj = graph.owning_module
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _param_expression(node, graph: fx.Graph) -> Optional[tuple[fx.Node, set]]:
    """(the one parameter node, the expression's nodes) if `node` is computed from a single parameter
    and constants only, else None."""
    seen, params, stack = set(), [], [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            v = _attr(graph, n.target)
            if isinstance(v, torch.nn.Parameter) or (isinstance(v, torch.Tensor) and v.dim() == 1 and v.numel() > 1):
                params.append(n)
            elif not isinstance(v, torch.Tensor):
                return None
        elif n.op == "call_function":
            stack.extend(a for a in (*n.args, *n.kwargs.values()) if isinstance(a, fx.Node))
        else:
            return None  # a placeholder or method call: not a function of parameters only
    return (params[0], seen) if len(params) == 1 else None


def _evaluate(node, leaf: fx.Node, value: torch.Tensor, graph: fx.Graph, memo: dict):
    if not isinstance(node, fx.Node):
        return node
    if node in memo:
        return memo[node]
    if node is leaf:
        out = value
    elif node.op == "get_attr":
        out = _attr(graph, node.target)
    else:
        args = [_evaluate(a, leaf, value, graph, memo) for a in node.args]
        kwargs = {k: _evaluate(a, leaf, value, graph, memo) for k, a in node.kwargs.items()}
        out = node.target(*args, **kwargs)
    memo[node] = out
    return out


def _affine(expr: fx.Node, param: fx.Node, graph: fx.Graph, K: int) -> Optional[tuple[float, float]]:
    """(a, c) with expr(w) = a * w + c for every w (checked at 0, 1, 2 and the parameter's value), or None."""
    w = _attr(graph, param.target)
    if not isinstance(w, torch.Tensor) or w.shape != (K,):
        return None
    with torch.no_grad():
        f = {t: _evaluate(expr, param, torch.full((K,), float(t), dtype=w.dtype), graph, {}).detach().double()
             for t in (0, 1, 2)}
        a, c = f[1] - f[0], f[0]
        if not (torch.allclose(f[2] - f[1], a) and torch.allclose(a, a[0].expand(K)) and
                torch.allclose(c, c[0].expand(K)) and abs(float(a[0])) > 1e-6):
            return None
        actual = _evaluate(expr, param, w.detach(), graph, {}).detach().double()
        if not torch.allclose(actual, a[0] * w.detach().double() + c[0], rtol=1e-6, atol=1e-7):
            return None
    return float(a[0]), float(c[0])


def _only_feeds(node: fx.Node, allowed: set) -> bool:
    # export's metadata assertions read a value without using it
    return all(u in allowed or (u.op == "call_function" and str(u.target).startswith("aten._assert")) for u in node.users)


def _norm_seam(graph: fx.Graph, node: Optional[fx.Node], members: list[str], projs: dict, strip_root: str
               ) -> Optional[NormSeam]:
    if node is None or node.op != "call_function":
        return None
    linears = {n for name, (p, n) in projs.items() if p.fqn in members}
    users = _users_through_casts(node)
    if not users or any(u not in linears for u in users):
        return None  # the product also reaches something else (a residual, another op)
    K = projs[next(iter(linears)).name][0].in_features

    def fqn(n: fx.Node) -> str:
        return str(n.target).removeprefix(strip_root)

    if node.target in LAYER_NORM_TARGETS or node.target in RMS_NORM_TARGETS:
        w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        b = None
        if node.target in LAYER_NORM_TARGETS:
            b = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
        w, b = strip(w), strip(b) if b is not None else None
        ok = isinstance(w, fx.Node) and w.op == "get_attr" and _only_feeds(w, {node} | set(node.args[2:4]))
        if not ok or (b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr")):
            return None
        return NormSeam(weight=fqn(w), consumers=list(members), bias=fqn(b) if b is not None else None)
    if node.target not in MUL_TARGETS or len(node.args) != 2:
        return None
    for side in (0, 1):
        found = _param_expression(node.args[side], graph)
        other = node.args[1 - side]
        if found is None or not isinstance(other, fx.Node) or _param_expression(other, graph) is not None:
            continue
        param, expr_nodes = found
        if any(not _only_feeds(n, expr_nodes | {node}) for n in expr_nodes):
            continue  # the parameter (or a value made from it) is used elsewhere too
        ac = _affine(node.args[side], param, graph, K)
        if ac is None:
            continue
        return NormSeam(weight=fqn(param), consumers=list(members), scale=ac[0], offset=ac[1])
    return None


def _users_through_casts(node: fx.Node) -> list[fx.Node]:
    out = []
    for u in node.users:
        if (u.op == "call_function" and u.target in PASSTHROUGH_TARGETS) or (
                u.op == "call_method" and u.target in PASSTHROUGH_METHODS):
            out.extend(_users_through_casts(u))
        else:
            out.append(u)
    return out


def _mark_routers_and_head(graph: fx.Graph, projs: dict[str, tuple[Projection, fx.Node]]) -> None:
    # Router: a linear whose output is turned into routing weights. Head: a linear with no
    # projection downstream of it (lm_head, classifier). Both stay outside the decoder-linear set.
    downstream: dict[fx.Node, bool] = {}
    for node in reversed(graph.nodes):
        downstream[node] = any(downstream[u] or u.name in projs for u in node.users)
    for name, (p, node) in projs.items():
        if p.kind != "linear" or p.role != "other":
            continue
        if any(u.op == "call_function" and u.target in ROUTER_TARGETS for u in _users_through_casts(node)):
            p.role = "router"
        elif not downstream[node]:
            p.role = "head"
