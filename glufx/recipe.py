"""Calibration as a recipe: an ordered list of stage configs, each a versioned dataclass validated on
construction (docs/design.md, "Recipe").

    recipe = Recipe([Observe(), Transform("smooth_up_down", alpha=0.5), DecideGranularity("per_token"),
                     DecideScales(), DecideQFeM(mode="auto")])
    plan = glufx.calibrate(model, calib, recipe=recipe, tokenizer=tok)

Each stage reads the model and the current statistics (`Context`) and records what it decided in the
plan: per module under `ModulePlan.decisions[stage]`, and a summary with its config and time in
`Plan.stages`. A stage that changes the floating-point model the next stages see (a transform, a
QFeP prefix) marks the statistics stale, and the runner observes again before any stage reads them:
QFeP's second pass is an instance of that rule. `GlufxConfig` builds the default recipe.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Optional

from torch import nn

from .calibdata import CalibrationSet, is_causal_lm
from .capture import capture
from .match import MatchResult, match_graph
from .observe import Observer, instrument, run_calibration
from .ops.schema import GRANULARITIES
from .plan import ModulePlan, Plan
from .stats import Statistics, from_observer

STAGE_VERSION = 1
# the choices of the stages' options (GlufxConfig offers the same ones)
TRANSFORMS = ("identity", "smooth_up_down", "smooth")
QFEP_METHODS = ("paper", "prefixquant")
SCALE_METHODS = ("absmax", "clip_search", "block_search")
QFEM_MODES = ("auto", "alpha", "budget", "off")
TARGET_METRICS = ("ppl", "kl")
QFEM_ORDERS = ("score", "sensitivity")
ROTATIONS = ("hadamard", "off")


class NoGLUError(ValueError):
    pass


@dataclass
class Context:
    """What the stages share: the model (and the runner, the model with a QFeP prefix in front when one
    is active), the calibration data, the latest match and statistics, and the plan being built."""

    model: nn.Module
    calib: CalibrationSet
    plan: Plan
    quantize_lm_head: bool = False
    require_glu: bool = True
    progress: bool = True
    runner: Optional[nn.Module] = None
    match: Optional[MatchResult] = None
    stats: Optional[Statistics] = None
    stale: bool = True  # the model changed since the last observation
    observations: list[Statistics] = field(default_factory=list)
    backup: object = None  # transforms.WeightBackup: restores the user's FP weights after calibration

    @property
    def lm(self) -> bool:
        return is_causal_lm(self.model)

    def targets(self) -> list[str]:
        """Linears glufx may quantize: decoder linears, plus the head if asked; never routers."""
        roles = TARGET_ROLES + (("head",) if self.quantize_lm_head else ())
        return [f for f, p in self.match.projections.items() if p.kind == "linear" and p.role in roles]


TARGET_ROLES = ("gate", "up", "gate_up", "down", "other")


@dataclass
class Stage:
    """A recipe step. Subclasses are dataclasses of their options; `name` keys their decisions."""

    name: ClassVar[str] = "stage"
    reads_stats: ClassVar[bool] = True

    def __post_init__(self):
        version = getattr(self, "version", STAGE_VERSION)
        if version != STAGE_VERSION:
            raise ValueError(f"{type(self).__name__} version {version} is not supported (this glufx reads "
                             f"{STAGE_VERSION})")

    def run(self, ctx: Context) -> dict:  # returns the stage's summary for Plan.stages
        raise NotImplementedError

    def _choose(self, option: str, choices: tuple) -> None:
        if getattr(self, option) not in choices:
            raise ValueError(f"{type(self).__name__}.{option}={getattr(self, option)!r}; choose one of {choices}")

    def to_dict(self) -> dict:
        return {"stage": type(self).__name__, **asdict(self)}


@dataclass
class Observe(Stage):
    """Capture the model (torch.export), match its GLU blocks and projections, instrument every
    projection input with an observer node and run the calibration data through it."""

    version: int = STAGE_VERSION
    name: ClassVar[str] = "observe"
    reads_stats: ClassVar[bool] = False

    def run(self, ctx: Context) -> dict:
        runner = ctx.runner or ctx.model
        root = "model." if runner is not ctx.model else ""
        first = ctx.calib.batches[0]
        # Calibration never reads the logits: an LM computes the head for one position only, unless
        # the head itself is a quantization target and needs its input statistics.
        extra = {"logits_to_keep": 1} if is_causal_lm(runner) and not ctx.quantize_lm_head else {}
        ep = capture(runner, (first.args, {**first.kwargs, **extra}))
        gm = ep.module()
        match = match_graph(gm.graph, strip_root=root)
        if not match.glu_blocks and ctx.require_glu:
            raise NoGLUError(
                f"glufx: no GLU block found in {type(ctx.model).__name__} (looked for two projections of one input, "
                "SiLU/GELU on one, their product feeding a third projection). QFeM and QFeP target GLU models "
                "(Llama, Mistral, Qwen, Gemma, Phi-3, Mixtral). To W8A8-quantize this model's linears anyway, pass "
                "GlufxConfig(require_glu=False).")
        observer = Observer(match)
        instrument(gm, match, observer)
        run_calibration(gm, observer, ctx.calib, extra, progress=ctx.progress)
        ctx.match = match
        ctx.stats = from_observer(observer, {"observation": len(ctx.observations),
                                             "qfep_active": ctx.runner is not None,
                                             "sequences": ctx.calib.n_sequences, "tokens": ctx.calib.n_tokens})
        ctx.observations.append(ctx.stats)
        ctx.stale = False
        _sync_modules(ctx)
        return {"observation": len(ctx.observations) - 1, "inputs": len(ctx.stats.inputs),
                "tokens": ctx.calib.n_tokens, "match": match.counts()}


def _sync_modules(ctx: Context) -> None:
    """Plan entries for every matched projection; refreshed scores, earlier decisions kept."""
    scores = ctx.stats.scores()
    targets = set(ctx.targets())
    why_not = {"head": "output head (kept FP; quantize_lm_head=True to change)", "router": "MoE router",
               "experts": "MoE expert bank (3-D weights: no INT8 kernel yet)"}
    for f, p in ctx.match.projections.items():
        mp = ctx.plan.modules.get(f)
        if mp is None:
            int8 = f in targets
            mp = ModulePlan(fqn=f, action="int8" if int8 else "fp", role=p.role, granularity=None, score=0.0,
                            reason="W8A8" if int8 else why_not.get(p.role, "not a target"), group=p.group,
                            in_features=p.in_features, out_features=p.out_features, n_params=p.n_params, kind=p.kind)
            ctx.plan.modules[f] = mp
        mp.score = scores.get(f, 0.0)
    ctx.plan.glu_blocks = [{k: v for k, v in vars(b).items() if k != "mul_node"} for b in ctx.match.glu_blocks]




@dataclass
class Transform(Stage):
    """An FP-equivalent edit of the model (glufx/transforms.py). `identity` changes nothing;
    `smooth_up_down` moves down_proj's input channel outliers into up_proj's weight at every GLU
    seam the matcher proved (SmoothQuant's s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha), one alpha);
    `smooth` scales every proven seam (norm -> its sibling linears, up -> down, v -> o) with the strength
    whose quantized output error is lowest on sampled calibration inputs (quantized as `granularity`
    and, with `rotation_block`, rotated, as the modules will be), or not at all where none helps, and
    refuses a seam that moves the FP model's outputs by more than `tolerance` (relative)."""

    kind: str = "identity"
    alpha: float = 0.5
    granularity: str = "per_token"
    rotation_block: int = 0
    rotate_values: bool = True  # with rotation_block: rotate v -> o seams offline instead of o's input online
    max_tokens: int = 512
    tolerance: float = 1e-5
    version: int = STAGE_VERSION
    name: ClassVar[str] = "transform"

    def __post_init__(self):
        super().__post_init__()
        self._choose("kind", TRANSFORMS)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"Transform.alpha must lie in [0, 1], got {self.alpha}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"Transform.granularity={self.granularity!r}; choose one of {sorted(GRANULARITIES)}")

    def run(self, ctx: Context) -> dict:
        if self.kind == "identity":
            return {"applied": 0}
        if self.kind == "smooth":
            return self._smooth(ctx)
        from . import transforms as T

        by_fqn = ctx.stats.by_fqn()
        applied, skipped = 0, {}
        for up_fqn, down_fqn, why in T.up_down_seams(ctx.plan.glu_blocks, ctx.model):
            st = by_fqn.get(down_fqn)
            if why is None and (st is None or st.channel_absmax is None):
                why = "down_proj's input was not observed"
            if why is not None:
                skipped[down_fqn] = why
                continue
            up, down = ctx.model.get_submodule(up_fqn), ctx.model.get_submodule(down_fqn)
            s = T.smooth_scales(st.channel_absmax, down.weight.detach().abs().amax(dim=0), self.alpha)
            before = T.fingerprint(up.weight, down.weight)
            ctx.backup.save(up_fqn)
            ctx.backup.save(down_fqn)
            T.scale_up_down(up, down, s)
            entry = T.record(ctx.plan, "scale_up_down", up_fqn, down_fqn, s, before,
                             T.fingerprint(up.weight, down.weight), alpha=self.alpha,
                             x_absmax_before=float(st.channel_absmax.max()),
                             x_absmax_after=float((st.channel_absmax / s).max()))
            for f in (up_fqn, down_fqn):
                ctx.plan.modules[f].decisions["transform"] = {"kind": entry["kind"], "index": len(ctx.plan.transforms) - 1}
            applied += 1
        if applied:
            ctx.stale = True  # the FP model's activations changed: observe again
        return {"applied": applied, "skipped": skipped}


    def _smooth(self, ctx: Context) -> dict:
        import torch

        from . import transforms as T
        from .decide.scales import sample_inputs
        from .rotate import hadamard_block

        targets = set(ctx.targets())
        seams, skipped = [], {}
        for ns in ctx.match.norm_seams:
            if all(f in targets for f in ns.consumers):
                seams.append(("scale_norm", ns.weight, ns.consumers, ns, None))
        for up, down, why in T.up_down_seams(ctx.plan.glu_blocks, ctx.model):
            if why is None and down in targets:
                seams.append(("scale_up_down", up, [down], None, None))
            elif why is not None:
                skipped[down] = why
        for vs in ctx.match.value_seams:
            if vs.consumer in targets:
                seams.append(("scale_v_o", vs.producer, [vs.consumer], None, torch.tensor(vs.channel_map)))
        if not seams:
            return {"applied": 0, "skipped": skipped}
        samples = sample_inputs(ctx, [c[0] for _, _, c, _, _ in seams], self.max_tokens)
        probe = _probe_inputs(ctx)
        reference = _probe_outputs(ctx, probe)
        applied, worst, by_kind = 0, 0.0, {}
        for kind, producer, consumers, ns, cmap in seams:
            x = samples[consumers[0]]  # x: [T, K], what the consumers read today
            w = torch.cat([ctx.model.get_submodule(f).weight.detach().float() for f in consumers])
            block = hadamard_block(x.shape[1], self.rotation_block) if self.rotation_block else 0
            alpha, s, errors = T.search_scales(x, w, self.granularity, block, channel_map=cmap)
            if alpha is None:
                skipped[consumers[0]] = "no strength lowers the quantized output error"
                continue
            touched = [producer, *consumers] + ([ns.bias] if ns is not None and ns.bias else [])
            weight_of = (lambda f: T.weight_of(ctx.model, f))
            # a linear producer's bias is divided too: a refused seam restores it with the weights
            biases = [ctx.model.get_submodule(producer).bias] if kind != "scale_norm" else []
            before = T.fingerprint(*(weight_of(f) for f in (producer, *consumers)))
            for f in touched:  # the user's weights come back after calibration
                ctx.backup.save(f.rpartition(".")[0] if kind == "scale_norm" and f not in consumers else f)
            if kind == "scale_norm":
                edit = lambda: T.scale_norm(ctx.model, producer, ns.bias, ns.scale, ns.offset, consumers, s)  # noqa: E731
            elif kind == "scale_v_o":
                edit = lambda: T.scale_v_o(ctx.model.get_submodule(producer),  # noqa: E731
                                           ctx.model.get_submodule(consumers[0]), s, cmap)
            else:
                edit = lambda: T.scale_up_down(ctx.model.get_submodule(producer),  # noqa: E731
                                               ctx.model.get_submodule(consumers[0]), s)
            moved, kept = self._checked(ctx, edit, [weight_of(f) for f in touched] + biases, reference, probe)
            if not kept:
                skipped[consumers[0]] = f"changed the FP model's outputs by {moved:.2e} (relative): refused"
                continue
            worst = max(worst, moved)
            extra = {"norm_scale": ns.scale, "norm_offset": ns.offset, "bias": ns.bias} if ns is not None else {}
            if cmap is not None:
                extra["channel_map"] = _channel_map_key(ctx, producer, cmap)
            entry = T.record(ctx.plan, kind, producer, consumers, s, before,
                             T.fingerprint(*(weight_of(f) for f in (producer, *consumers))), alpha=alpha,
                             errors={str(k): v for k, v in errors.items()}, fp_change=moved, **extra)
            for f in consumers + ([producer] if producer in ctx.plan.modules else []):
                ctx.plan.modules[f].decisions["transform"] = {"kind": kind, "alpha": alpha,
                                                               "index": len(ctx.plan.transforms) - 1,
                                                               "error": errors[alpha], "error_before": errors["none"]}
            applied += 1
            by_kind[kind] = by_kind.get(kind, 0) + 1
        if self.rotation_block and self.rotate_values:
            for vs in ctx.match.value_seams:
                if vs.consumer in targets:
                    moved = self._rotate_value_seam(ctx, vs, reference, probe, skipped)
                    if moved is not None:
                        applied, worst = applied + 1, max(worst, moved)
                        by_kind["rotate_v_o"] = by_kind.get("rotate_v_o", 0) + 1
        if applied:
            ctx.stale = True
        return {"applied": applied, "seams": len(seams), "by_kind": by_kind, "skipped": skipped, "max_fp_change": worst}

    def _rotate_value_seam(self, ctx: Context, vs, reference, probe, skipped: dict) -> Optional[float]:
        """v -> o rotated offline (transforms.rotate_v_o) where the channel map allows a block Hadamard; o's
        input then needs no online rotation (Rotate skips it). Refused like a scaling if the FP model moves."""
        import torch

        from . import transforms as T
        from .rotate import random_signs

        cmap = torch.tensor(vs.channel_map)
        producer, consumer = ctx.model.get_submodule(vs.producer), ctx.model.get_submodule(vs.consumer)
        block = T.value_rotation_block(cmap, producer.out_features, self.rotation_block)
        if not block:
            skipped[vs.consumer] = "the value seam's channel map has no aligned power-of-two blocks: rotated online"
            return None
        signs = random_signs(producer.out_features, seed=len(ctx.plan.transforms))
        before = T.fingerprint(producer.weight, consumer.weight)
        ctx.backup.save(vs.producer)
        ctx.backup.save(vs.consumer)
        moved, kept = self._checked(ctx, lambda: T.rotate_v_o(producer, consumer, block, signs, cmap),
                                    [producer.weight, producer.bias, consumer.weight], reference, probe)
        if not kept:
            skipped[vs.consumer] = f"the offline rotation changed the FP model's outputs by {moved:.2e}: refused"
            return None
        T.record(ctx.plan, "rotate_v_o", vs.producer, [vs.consumer], signs, before,
                 T.fingerprint(producer.weight, consumer.weight), block=block,
                 channel_map=_channel_map_key(ctx, vs.producer, cmap), fp_change=moved)
        ctx.plan.modules[vs.consumer].decisions["offline_rotation"] = {"block": block, "producer": vs.producer,
                                                                       "index": len(ctx.plan.transforms) - 1}
        return moved


    def _checked(self, ctx: Context, edit, tensors: list, reference, probe) -> tuple[float, bool]:
        """Apply `edit` (an FP-equivalent change of `tensors`), measure how far the FP model's outputs moved,
        and undo it when that exceeds the tolerance: (relative change, kept)."""
        import torch

        saved = [(t, t.detach().clone()) for t in tensors if t is not None]
        edit()
        moved = _relative_change(reference, _probe_outputs(ctx, probe))
        if moved <= self.tolerance:
            return moved, True
        with torch.no_grad():
            for t, v in saved:
                t.copy_(v)
        return moved, False


def _channel_map_key(ctx: Context, producer: str, cmap) -> str:
    """One sidecar tensor per value seam, shared by its scaling and its rotation."""
    key = f"value_seam.{producer}.channel_map"
    ctx.plan.tensors.setdefault(key, cmap.clone())
    return key


def _probe_inputs(ctx: Context):
    b = (ctx.calib.heldout or ctx.calib.batches)[0]
    cut = {k: (v[:1, :64] if hasattr(v, "dim") and v.dim() == 2 else v) for k, v in b.kwargs.items()}
    return b.args, cut


def _probe_outputs(ctx: Context, probe):
    import torch

    from .decide.qfem import _first_tensor

    with torch.no_grad():
        out = (ctx.runner or ctx.model)(*probe[0], **probe[1])
    return (out.logits if hasattr(out, "logits") else _first_tensor(out)).detach().double()


def _relative_change(ref, out) -> float:
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


@dataclass
class DecideQFeP(Stage):
    """The quantization-free prefix (docs/method.md §4): search it, cache its KV from the FP model and
    run every later stage on the model with the prefix in front (which re-observes). The prefix's own
    effect on the FP model (KL per token on held-out sequences) is measured and recorded; a prefix whose
    effect exceeds `max_fp_kl` is declined (the plan says why) and calibration goes on without one."""

    method: str = "paper"
    max_fp_kl: float = 0.05
    version: int = STAGE_VERSION
    name: ClassVar[str] = "qfep"

    def __post_init__(self):
        super().__post_init__()
        self._choose("method", QFEP_METHODS)
        if not self.max_fp_kl >= 0:
            raise ValueError(f"DecideQFeP.max_fp_kl must be >= 0, got {self.max_fp_kl}")

    def run(self, ctx: Context) -> dict:
        import warnings

        from .decide.qfep import document_start_token, prefix_fp_effect, search_paper, search_prefixquant
        from .prefix import PrefixedLM, compute_prefix_kv

        if not ctx.lm:
            raise ValueError("glufx: QFeP needs a causal language model (a KV cache to hold the prefix); "
                             "use GlufxConfig(qfep='off') for other modules")
        by_fqn = ctx.stats.by_fqn()
        scored = [f for f in ctx.targets() if f in by_fqn]
        target = max(scored, key=lambda f: by_fqn[f].score)
        bos = ctx.calib.bos_token_id
        start = document_start_token(ctx.model, bos)  # BOS, or the document separator of a model without one
        if self.method == "paper":
            qfep = search_paper(ctx.model, target, by_fqn[target], ctx.calib, start)
        else:
            downs = [by_fqn[f] for f in scored if ctx.match.projections[f].role == "down"] or [by_fqn[target]]
            qfep = search_prefixquant(target, downs, start)
        runner = PrefixedLM(ctx.model, compute_prefix_kv(ctx.model, qfep["token_ids"]), drop_bos=False)
        effect = prefix_fp_effect(ctx.model, runner, ctx.calib.heldout or ctx.calib.batches[:1], bos)
        qfep.update(fp_kl=effect, max_fp_kl=self.max_fp_kl, start_token=start,
                    start="bos" if bos is not None else ("document separator" if start is not None else "none"))
        if effect > self.max_fp_kl:
            why = (f"the prefix {qfep['token_ids']} changes the FP model by KL {effect:.3f} per token on held-out "
                   f"sequences (bound {self.max_fp_kl}): it would be credited with what it changes, not what it "
                   "protects; QFeP declined (raise DecideQFeP.max_fp_kl to keep it)")
            warnings.warn("glufx: " + why, stacklevel=2)
            ctx.plan.calibration["qfep_declined"] = {**qfep, "why": why}
            return {"declined": True, "fp_kl": effect, "token_ids": qfep["token_ids"], "why": why}
        ctx.plan.qfep = qfep
        ctx.runner = runner
        ctx.calib = ctx.calib.without_bos()  # the prefix holds BOS: the user's tokens follow it
        ctx.stale = True
        return {"token_ids": qfep["token_ids"], "target": target, "method": self.method, "fp_kl": effect}


@dataclass
class DecideGranularity(Stage):
    """Activation granularity per quantized module: `granularity` for all, `per_module` overrides by FQN."""

    granularity: str = "per_sequence"
    per_module: dict = field(default_factory=dict)
    version: int = STAGE_VERSION
    name: ClassVar[str] = "granularity"
    reads_stats: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        for g in [self.granularity, *self.per_module.values()]:
            if g not in GRANULARITIES:
                raise ValueError(f"DecideGranularity: granularity {g!r}; choose one of {sorted(GRANULARITIES)}")

    def run(self, ctx: Context) -> dict:
        unknown = sorted(set(self.per_module) - set(ctx.plan.modules))
        if unknown:
            raise ValueError(f"DecideGranularity.per_module names modules the model lacks: {unknown[:5]}")
        for f in ctx.targets():
            g = self.per_module.get(f, self.granularity)
            mp = ctx.plan.modules[f]
            mp.granularity = g if mp.action == "int8" else None
            mp.decisions["granularity"] = {"granularity": g, "source": "per_module" if f in self.per_module else "default"}
        return {"granularity": self.granularity, "overrides": len(self.per_module)}


@dataclass
class Rotate(Stage):
    """Online Hadamard rotation of each quantized linear's input (glufx/rotate.py, docs/method.md §7):
    blocks of the largest power of two dividing the input size, at most `max_block`, after random signs
    (`signs`, seeded by `seed`). Modules with static scales are left unrotated (a rotated input's static
    scale is set by the tokens of largest norm: measured ruinous), as are sizes with no even factor."""

    kind: str = "hadamard"
    max_block: int = 128
    signs: bool = True
    seed: int = 0
    version: int = STAGE_VERSION
    name: ClassVar[str] = "rotation"
    reads_stats: ClassVar[bool] = False

    def __post_init__(self):
        super().__post_init__()
        self._choose("kind", ROTATIONS)
        if self.max_block < 2 or self.max_block & (self.max_block - 1):
            raise ValueError(f"Rotate.max_block must be a power of two >= 2, got {self.max_block}")

    def run(self, ctx: Context) -> dict:
        from .rotate import hadamard_block, random_signs, signs_key

        rotated, skipped = 0, {}
        for f in ctx.targets():
            mp = ctx.plan.modules[f]
            mp.rotation = None
            if mp.action != "int8" or self.kind == "off":
                continue
            block = hadamard_block(mp.in_features, self.max_block)
            why = ("static activation scale" if mp.granularity == "static" else
                   "input rotated offline across its value seam (v -> o)" if "offline_rotation" in mp.decisions else
                   f"{mp.in_features} input features have no power-of-two block" if not block else None)
            if why is not None:
                skipped[f] = why
                mp.decisions["rotation"] = {"rotated": False, "why": why}
                continue
            key = None
            if self.signs:
                key = signs_key(mp.in_features, self.seed)
                ctx.plan.tensors.setdefault(key, random_signs(mp.in_features, self.seed))
            mp.rotation = {"kind": self.kind, "block": block, "signs": key}
            mp.decisions["rotation"] = {"rotated": True, "block": block, "signs": key is not None}
            rotated += 1
        return {"rotated": rotated, "skipped": len(skipped)}


@dataclass
class DecideScales(Stage):
    """Static activation scales for modules whose granularity is static (glufx/decide/scales.py):
    `absmax` (absmax / 127 of the calibration inputs), `clip_search` (the clipping of that scale that
    minimises the error of the outputs of the linears reading the input, over `max_tokens` sampled
    calibration tokens) or `block_search` (clip_search's clips refined, group by group, by the error of
    the output of the repeated block holding them, its static linears quantized). The observed absmax is
    recorded for every target."""

    method: str = "absmax"
    max_tokens: int = 1024
    version: int = STAGE_VERSION
    name: ClassVar[str] = "scales"

    def __post_init__(self):
        super().__post_init__()
        self._choose("method", SCALE_METHODS)
        if self.max_tokens < 1:
            raise ValueError(f"DecideScales.max_tokens must be >= 1, got {self.max_tokens}")

    def run(self, ctx: Context) -> dict:
        from .decide.scales import block_clip_search, clip_search

        by_fqn = ctx.stats.by_fqn()
        search = {"clip_search": clip_search, "block_search": block_clip_search}.get(self.method)
        searched = search(ctx, max_tokens=self.max_tokens) if search is not None else {}
        n = 0
        for f in ctx.targets():
            mp, st = ctx.plan.modules[f], by_fqn.get(f)
            absmax = st.absmax if st is not None else 0.0
            static = mp.decisions.get("granularity", {}).get("granularity") == "static"
            mp.x_scale = absmax / 127.0 if static and absmax > 0 else None
            if static and mp.x_scale is None and mp.action == "int8":
                raise ValueError(f"glufx: {f} saw only zeros in calibration: no static scale; give it another "
                                 "granularity (DecideGranularity(per_module=...)) or other calibration data")
            mp.decisions["scales"] = {"method": self.method, "absmax": absmax, "x_scale": mp.x_scale}
            if f in searched and mp.x_scale is not None:
                mp.x_scale = searched[f]["x_scale"]
                mp.decisions["scales"].update({k: v for k, v in searched[f].items() if k != "absmax"})
            n += mp.x_scale is not None
        clips = [v["clip"] for v in searched.values()]
        return {"static_scales": n, **({"clip_min": min(clips), "clip_mean": sum(clips) / len(clips)} if clips else {})}




@dataclass
class RoundWeights(Stage):
    """Which integer each INT8 weight takes (glufx/decide/weights.py): `gptq` rounds each module's (rotated)
    weight column by column, moving the error onto the columns left by the inverse second moments of
    `max_tokens` sampled calibration inputs (damped by `damp` of their mean), and keeps the result for
    modules where it lowers the output error on held-out tokens; `rtn` rounds to nearest. It runs on the
    final weights and rotations: after every Transform and Rotate, before the stages that run the quantized
    model (QFeM)."""

    method: str = "gptq"
    max_tokens: int = 4096
    damp: float = 0.01
    block_size: int = 128
    version: int = STAGE_VERSION
    name: ClassVar[str] = "weights"
    reads_stats: ClassVar[bool] = False

    def __post_init__(self):
        from .decide.weights import WEIGHT_METHODS

        super().__post_init__()
        self._choose("method", WEIGHT_METHODS)
        if self.max_tokens < 2:
            raise ValueError(f"RoundWeights.max_tokens must be >= 2 (half fit, half judge), got {self.max_tokens}")
        if not 0.0 < self.damp < 1.0:
            raise ValueError(f"RoundWeights.damp must lie in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"RoundWeights.block_size must be >= 1, got {self.block_size}")

    def run(self, ctx: Context) -> dict:
        from .decide.weights import codes_key, round_weights

        if self.method == "rtn":
            for f in ctx.targets():
                ctx.plan.modules[f].weights = None
                ctx.plan.tensors.pop(codes_key(f), None)
            return {"linears": 0, "gptq_kept": 0}
        return round_weights(ctx, self.max_tokens, self.damp, self.block_size)


@dataclass
class DecideQFeM(Stage):
    """Which linears keep FP activations (docs/method.md §3): `auto` walks score-sorted sibling groups
    measuring held-out KL to the FP model, `alpha` keeps score > alpha, `budget` the top scores up to
    `max_fp_param_share`, `off` none. `order="sensitivity"` (auto only) walks the groups instead by the
    measured held-out gain of keeping each alone in FP, per parameter (one evaluation per group)."""

    mode: str = "auto"
    alpha: Optional[float] = None
    max_fp_param_share: float = 0.10
    tolerance: float = 0.10
    max_search_steps: int = 12
    min_score: float = 2.0
    order: str = "score"  # auto: walk groups by spike score (the paper's signal) or by measured sensitivity
    version: int = STAGE_VERSION
    name: ClassVar[str] = "qfem"

    def __post_init__(self):
        super().__post_init__()
        self._choose("mode", QFEM_MODES)
        if self.mode == "alpha" and (self.alpha is None or self.alpha <= 0):
            raise ValueError("DecideQFeM(mode='alpha') needs alpha > 0 (modules with score > alpha stay in FP)")
        if not 0.0 <= self.max_fp_param_share <= 1.0:
            raise ValueError(f"DecideQFeM.max_fp_param_share must lie in [0, 1], got {self.max_fp_param_share}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"DecideQFeM.tolerance must lie in [0, 1), got {self.tolerance}")
        if self.max_search_steps < 1:
            raise ValueError("DecideQFeM.max_search_steps must be >= 1")
        self._choose("order", QFEM_ORDERS)
        if self.order == "sensitivity" and self.mode != "auto":
            raise ValueError(f"DecideQFeM(order='sensitivity') orders the auto search; mode={self.mode!r} has none")

    def run(self, ctx: Context) -> dict:
        from .decide.qfem import decide_qfem

        return decide_qfem(ctx, self)


@dataclass
class DecideTarget(Stage):
    """A granularity plan to a quality budget (glufx/decide/target.py, docs/method.md §10): each sibling
    group takes the cheapest of static -> per-token (rotated, `rotation`) -> floating point that keeps
    the held-out `metric` within `budget`: "ppl", the relative perplexity increase (0.01 = +1 %), or
    "kl", the KL per token to the floating-point model. Needs static scales for every target
    (DecideGranularity("static") and DecideScales() before it); decides rotations and QFeM's FP rung
    itself, so it replaces Rotate and DecideQFeM in a recipe."""

    budget: float = 0.01
    metric: str = "ppl"
    max_fp_param_share: float = 0.10
    min_score: float = 2.0
    rotation: str = "hadamard"
    max_block: int = 128
    version: int = STAGE_VERSION
    name: ClassVar[str] = "target"

    def __post_init__(self):
        super().__post_init__()
        self._choose("metric", TARGET_METRICS)
        self._choose("rotation", ROTATIONS)
        if not (isinstance(self.budget, (int, float)) and self.budget > 0 and self.budget == self.budget):
            raise ValueError(f"DecideTarget.budget must be a positive number (0.01 = +1 % perplexity), got {self.budget!r}")
        if not 0.0 <= self.max_fp_param_share <= 1.0:
            raise ValueError(f"DecideTarget.max_fp_param_share must lie in [0, 1], got {self.max_fp_param_share}")
        if self.max_block < 2 or self.max_block & (self.max_block - 1):
            raise ValueError(f"DecideTarget.max_block must be a power of two >= 2, got {self.max_block}")

    def run(self, ctx: Context) -> dict:
        from .decide.target import decide_target

        return decide_target(ctx, self)


@dataclass
class Recipe:
    stages: list[Stage]

    def __post_init__(self):
        if not self.stages:
            raise ValueError("glufx: a recipe needs at least one stage")
        bad = [s for s in self.stages if not isinstance(s, Stage)]
        if bad:
            raise TypeError(f"glufx: recipe stages must be glufx.recipe.Stage configs, got {type(bad[0]).__name__}")
        names = [s.name for s in self.stages if s.name != "observe"]
        dup = sorted({n for n in names if names.count(n) > 1} - {"transform"})
        if dup:
            raise ValueError(f"glufx: a recipe holds each decision stage once; repeated: {dup}")
        order = [s.name for s in self.stages]
        if "target" in order:
            clash = [n for n in ("qfem", "rotation") if n in order]
            if clash:
                raise ValueError(f"glufx: DecideTarget chooses rotations and the FP rung itself; drop {clash} from "
                                 f"the recipe (stages: {order})")
            if "scales" not in order or order.index("scales") > order.index("target"):
                raise ValueError("glufx: DecideTarget needs DecideScales before it (a static scale for every candidate)")
        for needs, first in (("qfem", "granularity"), ("scales", "granularity"), ("rotation", "granularity"),
                             ("target", "granularity")):
            if needs in order and (first not in order or order.index(first) > order.index(needs)):
                raise ValueError(f"glufx: the recipe's {needs} stage needs a {first} stage before it "
                                 f"(stages: {order})")
        if "qfem" in order and "rotation" in order and order.index("rotation") > order.index("qfem"):
            raise ValueError("glufx: Rotate must come before DecideQFeM (QFeM's search runs the quantized model, "
                             "rotations included)")
        if "weights" in order:
            at = order.index("weights")
            if "target" in order:
                raise ValueError("glufx: RoundWeights cannot precede DecideTarget, which rotates modules after it "
                                 "(the codes are for the weights as they are when it runs); drop one of them")
            late = [n for n in order[at + 1:] if n in ("transform", "rotation")]
            if late:
                raise ValueError(f"glufx: RoundWeights must come after every Transform and Rotate (its codes are for "
                                 f"the final weights); {late} follow it (stages: {order})")
            if "qfem" in order and order.index("qfem") < at:
                raise ValueError("glufx: RoundWeights must come before DecideQFeM (QFeM's search runs the quantized "
                                 "model, its weights included)")
        if "qfem" in order and "scales" in order and order.index("scales") > order.index("qfem"):
            raise ValueError("glufx: DecideScales must come before DecideQFeM (QFeM's search runs the "
                             "quantized model, static scales included)")

    def to_dict(self) -> list[dict]:
        return [s.to_dict() for s in self.stages]

    def run(self, ctx: Context) -> Plan:
        for i, stage in enumerate(self.stages):
            if stage.reads_stats and ctx.stale:
                self._timed(Observe(), ctx, f"{i}:auto")  # statistics of the model as it now is
            self._timed(stage, ctx, str(i))
        if ctx.match is None:
            raise ValueError("glufx: the recipe never observed the model; start it with Observe()")
        unset = [f for f, m in ctx.plan.modules.items() if m.action == "int8" and m.granularity is None]
        if unset:
            raise ValueError(f"glufx: the recipe left {len(unset)} INT8 modules without an activation granularity "
                             f"(e.g. {unset[0]}); add DecideGranularity(...) to it")
        return ctx.plan

    @staticmethod
    def _timed(stage: Stage, ctx: Context, index: str) -> None:
        t0 = time.perf_counter()
        summary = stage.run(ctx)
        ctx.plan.stages.append({**stage.to_dict(), "index": index, "seconds": time.perf_counter() - t0,
                                "summary": summary})
