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
    aten.dropout.default, aten.contiguous.default, F.dropout, torch.clone,
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
class MatchResult:
    projections: dict[str, Projection] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    glu_blocks: list[GLUBlock] = field(default_factory=list)

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
    return result


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
