"""transformers loads glufx checkpoints natively: `AutoModelForCausalLM.from_pretrained(dir)` after `import glufx`.

glufx.save writes `quantization_config = {"quant_method": "glufx", ...}` into config.json. transformers has no
plugin discovery for quantizers: a library registers its `quant_method` in transformers' registry
(`register_quantization_config` / `register_quantizer`) and must be imported before from_pretrained. `import
glufx` does that once (`register()`, idempotent); it adds the name "glufx" and changes nothing else.

The quantizer does what glufx.load does, inside from_pretrained's own loading: before the weights load, the
model (still on the meta device) gets the plan's empty INT8 modules (`lower(..., skeleton=True)`), so the
safetensors fill glufx's buffers by name; after, every glufx buffer must have come from the file (transformers
only warns about missing keys, glufx refuses), the plan and statistics are attached, and a QFeP prefix is put
in front of the model in place (`glufx.prefix.attach_prefix`: from_pretrained returns the object it built).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

QUANT_METHOD = "glufx"


def quantization_config_dict() -> dict:
    from ..plan import PLAN_VERSION
    from .serialize import PLAN_FILE, PREFIX_FILE

    return {"quant_method": QUANT_METHOD, "plan_file": PLAN_FILE, "prefix_file": PREFIX_FILE,
            "plan_version": PLAN_VERSION}


def untie_lowered(model) -> None:
    """Drop transformers' tied-weight pairs whose module glufx replaced: a Gemma lm_head lowered to INT8 (W8A8 or
    weight-only) holds its own INT8 weight, not the embedding's, and has no `weight` for from_pretrained to tie."""
    from ..nn import LOWERED_MODULES

    tied = getattr(model, "all_tied_weights_keys", None)
    if not tied:
        return
    for target, source in list(tied.items()):
        owners = [model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model for name in (target, source)]
        if any(isinstance(m, LOWERED_MODULES) for m in owners):
            del tied[target]


def _classes():
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class GlufxQuantizationConfig(QuantizationConfigMixin):
        """config.json's quantization_config of a glufx checkpoint: where the plan and the prefix are."""

        def __init__(self, plan_file: str = "glufx_plan.json", prefix_file: str = "prefix.safetensors",
                     plan_version: Optional[int] = None, **kwargs):
            self.quant_method = QUANT_METHOD
            self.plan_file, self.prefix_file, self.plan_version = plan_file, prefix_file, plan_version
            for k, v in kwargs.items():  # keys of a newer glufx round-trip untouched
                if k != "quant_method":
                    setattr(self, k, v)

    class GlufxHfQuantizer(HfQuantizer):
        requires_calibration = True  # a glufx checkpoint is calibrated; from_pretrained cannot quantize on load

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.directory: Optional[Path] = None
            self.plan = None

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from ..lower import lower
            from ..plan import Plan

            if not checkpoint_files:
                raise ValueError("glufx: from_pretrained gave the quantizer no checkpoint file to find the plan beside")
            self.directory = Path(checkpoint_files[0]).parent
            plan_path = self.directory / self.quantization_config.plan_file
            if not plan_path.exists():
                raise FileNotFoundError(f"glufx: {plan_path} is missing; a glufx checkpoint keeps its plan beside "
                                        "the weights (write it with glufx.save)")
            self.plan = Plan.load(plan_path)
            lower(model, self.plan, skeleton=True)  # empty INT8 modules on the meta device; the file fills them
            untie_lowered(model)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from ..nn import LOWERED_MODULES
            from ..prefix import PrefixKV, attach_prefix
            from .serialize import attach_saved_statistics

            missing = [f"{name}.{b}" for name, mod in model.named_modules() if isinstance(mod, LOWERED_MODULES)
                       for b, t in mod.named_buffers(recurse=False)
                       if t is not None and not getattr(t, "_is_hf_initialized", False)]
            if missing:
                raise ValueError(f"glufx: the checkpoint in {self.directory} lacks {len(missing)} INT8 tensors the plan "
                                 f"needs (e.g. {missing[:3]}); it does not belong to this plan: save it again with "
                                 "glufx.save")
            attach_saved_statistics(self.plan, self.directory)
            model.glufx_plan = self.plan
            prefix = self.directory / self.quantization_config.prefix_file
            if prefix.exists():
                attach_prefix(model, PrefixKV.load(prefix))
            return model

        def is_serializable(self, **kwargs):
            return False  # glufx.save writes what a glufx checkpoint needs (plan, prefix), save_pretrained would not

        @property
        def is_trainable(self):
            return False

    return GlufxQuantizationConfig, GlufxHfQuantizer


def register() -> None:
    """Make "glufx" a quant_method transformers' from_pretrained knows (once per process)."""
    from transformers.quantizers import auto

    if QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return
    config_cls, quantizer_cls = _classes()
    auto.register_quantization_config(QUANT_METHOD)(config_cls)
    auto.register_quantizer(QUANT_METHOD)(quantizer_cls)


def add_quantization_config(config_path: Path) -> None:
    """Write glufx's quantization_config into a saved config.json."""
    config = json.loads(config_path.read_text())
    config["quantization_config"] = quantization_config_dict()
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
