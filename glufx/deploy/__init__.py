"""Deploy: the torch.compile backend, torch.export / AOTInductor programs, save and load, torchao."""
from .decode import compile_decode, generate
from .export import export
from .inductor import aoti_package
from .serialize import load, save, save_pretrained
from .torchao_interop import to_fqn_to_config as to_torchao

__all__ = ["compile_decode", "generate", "export", "aoti_package", "save", "load", "save_pretrained", "to_torchao"]
