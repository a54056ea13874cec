"""glufx: W8A8 quantization of GLU language models that survives their activation spikes (QFeM, QFeP).

    model = glufx.compile(model, calib_data, tokenizer=tok)     # calibrate, decide, lower
    model = glufx.compile_decode(model)                         # generate() on a compiled, static-cache step
    out = glufx.generate(model, input_ids, max_new_tokens=64)   # greedy, in glufx's own token loop
    plan = glufx.calibrate(model, calib_data, tokenizer=tok)    # inspect first; glufx.compile(model, plan=plan)
"""
from . import ops  # noqa: F401  (registers torch.ops.glufx before anything loads a program using them)
from .api import NoGLUError, calibrate, check_model, compile, prefixed
from .config import GlufxConfig
from .deploy import aoti_package, compile_decode, export, generate, load, save, save_pretrained, to_torchao
from .deploy.hf_quantizer import register as _register_hf_quantizer
from .lower import PlanMismatchError, counters, lower
from .nn import Int8GLU, Int8Linear, Int8WeightLinear
from .observe import CalibrationError
from .plan import ModulePlan, Plan
from .recipe import (DecideGranularity, DecideQFeM, DecideQFeP, DecideScales, DecideTarget, Observe, Recipe, Rotate,
                     RoundWeights, Stage, Transform)
from .stats import Statistics

__all__ = ["GlufxConfig", "Plan", "ModulePlan", "Int8Linear", "Int8GLU", "Int8WeightLinear", "calibrate", "compile", "lower", "counters",
           "check_model", "NoGLUError", "CalibrationError", "PlanMismatchError", "prefixed", "compile_decode", "generate", "export", "aoti_package",
           "save", "load", "save_pretrained", "to_torchao", "Recipe", "Stage", "Observe", "Transform", "DecideQFeP", "DecideGranularity",
           "DecideScales", "DecideQFeM", "DecideTarget", "Rotate", "RoundWeights", "Statistics"]
__version__ = "0.2.0"

# The one registration at import: transformers has no plugin discovery for quantizers, and the promise is that
# `import glufx` makes from_pretrained read glufx checkpoints. It adds the name "glufx" to transformers' quantizer
# registry and nothing else (the torch.compile backend registers through its entry point instead).
_register_hf_quantizer()
