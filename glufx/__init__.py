"""glufx: W8A8 quantization of GLU language models that survives their activation spikes (QFeM).

    model = glufx.compile(model, calib_data, tokenizer=tok)     # calibrate, decide, rewrite
    plan = glufx.calibrate(model, calib_data, tokenizer=tok)    # inspect first; glufx.compile(model, plan=plan)
"""
from . import ops  # noqa: F401  (registers torch.ops.glufx before anything loads a program using them)
from .api import NoGLUError, calibrate, check_model, compile, prefixed
from .config import GlufxConfig
from .deploy import aoti_package, export, load, save
from .nn import Int8GLU, Int8Linear
from .observe import CalibrationError
from .plan import ModulePlan, Plan
from .rewrite import apply_plan, counters

__all__ = ["GlufxConfig", "Plan", "ModulePlan", "Int8Linear", "Int8GLU", "calibrate", "compile", "apply_plan", "counters",
           "check_model", "NoGLUError", "CalibrationError", "prefixed", "export", "aoti_package", "save", "load"]
__version__ = "0.1.0"
