"""Deploy: the torch.compile backend, torch.export / AOTInductor programs, save and load."""
from .export import export
from .inductor import aoti_package
from .serialize import load, save

__all__ = ["export", "aoti_package", "save", "load"]
