"""flashmoe: run Mixture-of-Experts models larger than memory by streaming experts from SSD."""

from .convert import convert  # noqa: E402  (binds the function over the submodule name)
from .errors import (ConversionError, ContextLengthError, FlashMoEError, FormatError, MemoryBudgetError,
                     ReadError)

__version__ = "0.1.0"


def load(path, **options):
    """Load a packed model directory. Returns a flashmoe.Model."""
    from .model import load as _load

    return _load(path, **options)


def memory_plan(path, **options):
    """How load(path, **options) would split its memory budget (and the minimum), without loading."""
    from .model import memory_plan as _plan

    return _plan(path, **options)


def __getattr__(name):
    if name == "Model":
        from .model import Model

        return Model
    raise AttributeError(name)


__all__ = ["ConversionError", "ContextLengthError", "FlashMoEError", "MemoryBudgetError", "ReadError", "FormatError", "Model", "convert", "load", "memory_plan", "__version__"]
