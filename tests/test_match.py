"""The structural matcher on exported graphs (ATen) and dynamo graphs (torch IR) of every GLU family."""
import pytest
import torch

from glufx.capture import capture
from glufx.match import match_graph, normalize_fqn

from conftest import FAMILIES, tiny_model

# (dense GLU blocks, fused gate_up, MoE blocks) per 2-layer tiny model
EXPECTED = {f: (2, 0, 0) for f in FAMILIES}
EXPECTED["phi3"] = (2, 2, 0)
EXPECTED["mixtral"] = (0, 0, 2)


def _export_match(model):
    ids = torch.randint(3, 96, (2, 9))
    ep = capture(model, ((), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))
    return match_graph(ep.module().graph)


@pytest.mark.parametrize("family", FAMILIES)
def test_match_counts(family):
    model = tiny_model(family)
    m = _export_match(model)
    c = m.counts()
    assert (c["glu_blocks"], c["fused_gate_up"], c["moe_blocks"]) == EXPECTED[family]
    # every nn.Linear of the model is found and keyed by its FQN; other F.linear callers are routers
    linears = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert linears <= set(m.linears)
    assert all(m.projections[f].role == "router" for f in set(m.linears) - linears)
    assert m.projections["lm_head"].role == "head"
    for b in m.glu_blocks:
        if not b.moe and not b.fused:
            assert b.gate.endswith("gate_proj") and b.up.endswith("up_proj") and b.down.endswith("down_proj")
            assert m.projections[b.gate].group == m.projections[b.up].group
            assert m.projections[b.down].role == "down"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sibling_groups(family):
    m = _export_match(tiny_model(family))
    groups = {tuple(sorted(g)) for g in m.groups}
    p = "model.layers.0."
    assert (p + "self_attn.k_proj", p + "self_attn.q_proj", p + "self_attn.v_proj") in groups
    assert (p + "mlp.gate_proj", p + "mlp.up_proj") in groups
    assert (p + "mlp.down_proj",) in groups


def test_moe_blocks_reported_and_routers_marked():
    m = _export_match(tiny_model("mixtral"))
    assert all(b.moe for b in m.glu_blocks)
    assert {b.gate for b in m.glu_blocks} == {f"model.layers.{i}.mlp.experts.gate_up_proj" for i in range(2)}
    assert {b.down for b in m.glu_blocks} == {f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)}
    assert m.projections["model.layers.0.mlp.gate"].role == "router"


@pytest.mark.parametrize("family", ["llama", "gemma3", "phi3"])
def test_same_matches_on_dynamo_graph(family):
    model = tiny_model(family)
    exported = _export_match(model)
    seen = []

    def backend(gm, example_inputs):
        seen.append(match_graph(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    ids = torch.randint(3, 96, (2, 9))
    torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, use_cache=False)
    dyn = seen[0]
    # norm and value seams are proven on the exported graph calibration captures (parameters as
    # attributes, ATen ops); dynamo's graph takes parameters as inputs and spells ops in torch IR, and the
    # backend never transforms
    seams = {"norm_seams": 0, "value_seams": 0}
    assert {**dyn.counts(), **seams} == {**exported.counts(), **seams}
    assert exported.counts()["norm_seams"] > 0
    assert {(b.gate, b.up, b.down, b.act) for b in dyn.glu_blocks} == \
        {(b.gate, b.up, b.down, b.act) for b in exported.glu_blocks}


def test_normalize_dynamo_paths():
    assert normalize_fqn("L['self'].model.layers[0].mlp.gate_proj") == "model.layers.0.mlp.gate_proj"
    assert normalize_fqn("L['self']._modules['model']._modules['layers'][3]") == "model.layers.3"
    assert normalize_fqn("L['args'][0].model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert normalize_fqn("model.layers.1.mlp") == "model.layers.1.mlp"


def test_glu_module_found_only_when_it_computes_nothing_else():
    class MLP(torch.nn.Module):
        def __init__(self, extra: bool):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(16, 32, bias=False)
            self.down_proj, self.extra = torch.nn.Linear(32, 16, bias=False), extra

        def forward(self, x):
            h = torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x)
            y = self.down_proj(h)
            return y * 0.5 if self.extra else y  # a scaling inside the module: not a plain GLU

    class Net(torch.nn.Module):
        def __init__(self, extra: bool):
            super().__init__()
            self.mlp = MLP(extra)

        def forward(self, x):
            return self.mlp(x) + x

    for extra, module in ((False, "mlp"), (True, None)):
        ep = torch.export.export(Net(extra), (torch.randn(2, 3, 16),))
        (block,) = match_graph(ep.module().graph).glu_blocks
        assert block.module == module


def test_normalize_fqn_keeps_modules_in_names():
    """Only dynamo's `._modules['x']` accessor is rewritten, never `_modules` inside a module's name."""
    assert normalize_fqn("L['self'].model.adapter_modules[0].up_proj") == "model.adapter_modules.0.up_proj"
    assert normalize_fqn("L['self'].model.layers[0].mlp._modules['up']") == "model.layers.0.mlp.up"
    assert normalize_fqn("L['self']._modules['model'].layers[1]") == "model.layers.1"
    assert normalize_fqn("L['fn']._modules['0']") == "0"  # torch.compile(module) names the root `fn`
