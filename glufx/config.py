"""GlufxConfig: every choice glufx makes, versioned and validated on construction."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from .decide.weights import WEIGHT_METHODS
from .ops.schema import GRANULARITIES
from .recipe import (QFEM_MODES, QFEM_ORDERS, ROTATIONS, SCALE_METHODS, TARGET_METRICS, TRANSFORMS, DecideGranularity, DecideQFeM, RoundWeights,
                     DecideQFeP, DecideScales, DecideTarget, Observe, Recipe, Rotate, Transform)
from .recipe import QFEP_METHODS as _PREFIX_METHODS

FP_WEIGHTS = ("fp", "int8")  # what the linears with floating-point activations store as weights

CONFIG_VERSION = 1
QFEP_METHODS = ("auto", "off") + _PREFIX_METHODS
# "auto": glufx's best measured choice for the granularity (README, "What each technique contributes"):
# a QFeP prefix for static scales (it holds BOS's spikes in FP KV); dynamic scales with the online
# rotation do without one
AUTO_QFEP = {"static": "paper", "per_sequence": "off", "per_tensor": "off", "per_token": "off"}
AUTO_TRANSFORM = "smooth"


@dataclass
class GlufxConfig:
    version: int = CONFIG_VERSION
    # activation quantization: per_sequence (the paper's per-tensor dynamic, per batch row),
    # per_token, static (calibrated per-tensor scale) or per_tensor (one scale per call)
    granularity: str = "per_sequence"
    # calibration (docs/method.md §3: N sequences of L tokens, BOS first)
    num_samples: int = 32
    seq_len: int = 512
    batch_size: int = 4
    # QFeM: auto = greedy by held-out loss; alpha = keep r_m > alpha in FP; budget = top scores up to
    # max_fp_param_share; off = quantize every decoder linear (naive W8A8)
    qfem: str = "auto"
    alpha: Optional[float] = None
    max_fp_param_share: float = 0.10  # bound on the share of decoder-linear parameters kept in FP
    tolerance: float = 0.10  # auto: keep the smallest set within this share of the best achievable gain
    heldout_samples: int = 12  # sequences held out of scoring, for the searches (4 was within their noise)
    max_search_steps: int = 12
    min_score: float = 2.0  # groups scoring below this are never candidates (no spike to speak of)
    # auto's walk: "score" (spike score, the paper's signal) or "sensitivity" (measured held-out gain of
    # keeping each sibling group alone in FP; one evaluation per group)
    qfem_order: str = "score"
    # QFeP: "paper" ([BOS, c*, s*] by the rho search), "prefixquant" (outlier-count length), "off", or
    # "auto" (AUTO_QFEP: paper for static scales, off otherwise; off for models without a KV cache)
    qfep: str = "auto"
    quantize_lm_head: bool = False  # the paper keeps lm_head in FP
    # the weights of the linears kept out of INT8 activations (QFeM's, an FP lm_head): "fp" keeps them as they
    # are (the paper); "int8" stores them per-channel INT8 while their activations stay floating point
    # (glufx::int8_weight_linear: a quarter of an FP32 weight's bytes, what a decode step reads; docs/decode.md)
    fp_weights: str = "fp"
    # run gate, up, activation and product of each GLU module as one op (glufx::int8_glu_packed;
    # same outputs as unfused, one activation quantization and one pass over both weights)
    fuse_glu: bool = False
    require_glu: bool = True  # refuse models without a GLU block (glufx's method targets them)
    # FP-equivalent transform before quantization: "smooth" (every seam the graph proves, norm -> its
    # linears and up -> down, strength searched per seam), "smooth_up_down" (SmoothQuant at up -> down
    # only, exponent smooth_alpha), "identity" (none); "auto" = smooth
    transform: str = "auto"
    smooth_alpha: float = 0.5
    # online rotation of quantized linears' inputs (glufx/rotate.py): "hadamard" (block Hadamard with
    # random signs, for every module with dynamic activation scales; static ones stay unrotated) or "off"
    rotation: str = "hadamard"
    rotation_block: int = 128
    # static scales: "clip_search" (the clipping that minimises the error of the linears' outputs),
    # "block_search" (those clips refined by the error of each decoder block's output; slower, and no
    # better on Gemma 3 270M: docs/method.md §8) or "absmax" (no clipping)
    scales: str = "clip_search"
    # weight rounding: "rtn" (round to nearest) or "gptq" (error-compensating, from calibration second
    # moments; kept per module where it lowers held-out output error). Not with target=
    weights: str = "rtn"
    # a quality target instead of one granularity (glufx/decide/target.py): each sibling group takes the
    # cheapest of static -> per-token (rotated) -> FP that keeps the held-out target_metric within
    # `target` ("ppl": relative perplexity increase, 0.01 = +1 %; "kl": KL per token to the FP model).
    # granularity then names the cheapest rung, "static"; QFeM's FP rung is bounded by max_fp_param_share
    target: Optional[float] = None
    target_metric: str = "ppl"
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.version != CONFIG_VERSION:
            raise ValueError(f"GlufxConfig version {self.version} is not supported (this glufx reads {CONFIG_VERSION})")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"GlufxConfig.granularity={self.granularity!r}; choose one of {sorted(GRANULARITIES)}")
        if self.qfem not in QFEM_MODES:
            raise ValueError(f"GlufxConfig.qfem={self.qfem!r}; choose one of {QFEM_MODES}")
        if self.qfep not in QFEP_METHODS:
            raise ValueError(f"GlufxConfig.qfep={self.qfep!r}; choose one of {QFEP_METHODS}")
        if self.qfem == "alpha" and (self.alpha is None or self.alpha <= 0):
            raise ValueError("GlufxConfig(qfem='alpha') needs alpha > 0 (modules with score > alpha stay in FP)")
        if self.rotation not in ROTATIONS:
            raise ValueError(f"GlufxConfig.rotation={self.rotation!r}; choose one of {ROTATIONS}")
        if self.scales not in SCALE_METHODS:
            raise ValueError(f"GlufxConfig.scales={self.scales!r}; choose one of {SCALE_METHODS}")
        if self.fp_weights not in FP_WEIGHTS:
            raise ValueError(f"GlufxConfig.fp_weights={self.fp_weights!r}; choose one of {FP_WEIGHTS}")
        if self.weights not in WEIGHT_METHODS:
            raise ValueError(f"GlufxConfig.weights={self.weights!r}; choose one of {WEIGHT_METHODS}")
        if self.transform not in TRANSFORMS + ("auto",):
            raise ValueError(f"GlufxConfig.transform={self.transform!r}; choose one of {TRANSFORMS}")
        if self.target is not None:
            if not (isinstance(self.target, (int, float)) and self.target > 0):
                raise ValueError(f"GlufxConfig.target must be a positive number (0.01 = +1 % perplexity), got {self.target!r}")
            if self.target_metric not in TARGET_METRICS:
                raise ValueError(f"GlufxConfig.target_metric={self.target_metric!r}; choose one of {TARGET_METRICS}")
            if self.granularity in ("per_token", "per_tensor"):
                raise ValueError(f"GlufxConfig(target=...) chooses each module's granularity itself (static -> "
                                 f"per_token -> FP); granularity={self.granularity!r} would be ignored: drop it")
            if self.weights != "rtn":
                raise ValueError("GlufxConfig(target=...) rotates modules while it searches, after weights would be "
                                 "rounded; use weights='rtn' with target=")
            if self.qfem not in ("auto",) or self.alpha is not None:
                raise ValueError("GlufxConfig(target=...) decides which modules stay in FP itself (within "
                                 "max_fp_param_share); drop qfem= / alpha=")
            self.granularity = "static"  # the cheapest rung
        if self.alpha is not None and self.qfem == "auto":
            self.qfem = "alpha"
        if self.qfem_order not in QFEM_ORDERS:
            raise ValueError(f"GlufxConfig.qfem_order={self.qfem_order!r}; choose one of {QFEM_ORDERS}")
        if self.qfem_order == "sensitivity" and self.qfem != "auto":
            raise ValueError(f"GlufxConfig(qfem_order='sensitivity') orders QFeM's auto search; qfem={self.qfem!r} "
                             "has none: use qfem='auto'")
        for name in ("num_samples", "seq_len", "batch_size", "max_search_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"GlufxConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.heldout_samples < 0:
            raise ValueError("GlufxConfig.heldout_samples must be >= 0")
        if not 0.0 <= self.max_fp_param_share <= 1.0:
            raise ValueError(f"GlufxConfig.max_fp_param_share must lie in [0, 1], got {self.max_fp_param_share}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ValueError(f"GlufxConfig.tolerance must lie in [0, 1), got {self.tolerance}")

    def recipe(self, causal_lm: bool = True) -> Recipe:
        """The default recipe for these options: observe, transform, QFeP, granularity, scales, QFeM."""
        if self.target is not None:
            return self._target_recipe(causal_lm)
        # the strength search models the quantizer the modules will have: rotated only where Rotate rotates
        # (dynamic scales; static inputs are never rotated)
        rotated = self.rotation != "off" and self.granularity != "static"
        stages = [Observe(), Transform(self.resolved("transform"), alpha=self.smooth_alpha, granularity=self.granularity,
                                       rotation_block=self.rotation_block if rotated else 0)]
        if self.resolved("qfep") != "off" and (causal_lm or self.qfep != "auto"):
            stages.append(DecideQFeP(self.resolved("qfep")))
        stages += [DecideGranularity(self.granularity)]
        if self.rotation != "off":
            stages.append(Rotate(self.rotation, max_block=self.rotation_block))
        stages += [DecideScales(self.scales)]
        if self.weights != "rtn":
            stages.append(RoundWeights(self.weights))
        stages += [DecideQFeM(mode=self.qfem, alpha=self.alpha, max_fp_param_share=self.max_fp_param_share,
                              tolerance=self.tolerance, max_search_steps=self.max_search_steps,
                              min_score=self.min_score, order=self.qfem_order)]
        return Recipe(stages)

    def _target_recipe(self, causal_lm: bool) -> Recipe:
        # smoothing and scales are searched for the static rung, the sensitive one (the rotated
        # per-token rung measured nearly lossless with or without smoothing)
        stages = [Observe(), Transform(self.resolved("transform"), alpha=self.smooth_alpha, granularity="static")]
        if self.resolved("qfep") != "off" and (causal_lm or self.qfep != "auto"):
            stages.append(DecideQFeP(self.resolved("qfep")))
        stages += [DecideGranularity("static"), DecideScales(self.scales),
                   DecideTarget(budget=self.target, metric=self.target_metric, max_fp_param_share=self.max_fp_param_share,
                                min_score=self.min_score, rotation=self.rotation, max_block=self.rotation_block)]
        return Recipe(stages)

    def resolved(self, option: str) -> str:
        """An option's value with "auto" replaced by what it means for this granularity."""
        value = getattr(self, option)
        if value != "auto":
            return value
        return AUTO_QFEP[self.granularity] if option == "qfep" else AUTO_TRANSFORM

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GlufxConfig":
        return cls(**d)
