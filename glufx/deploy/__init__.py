"""Deploy: the torch.compile backend, torch.export / AOTInductor programs, save and load."""
from .export import export
from .serialize import load, save

__all__ = ["export", "save", "load"]
