"""flashmoe: run Mixture-of-Experts models larger than memory by streaming experts from SSD."""

from .errors import ConversionError, FlashMoEError, FormatError

__version__ = "0.1.0"


def convert(src, dst, **options):
    """Convert a Hugging Face checkpoint directory into a packed flashmoe model (see docs/FORMAT.md)."""
    from .convert import convert as _convert

    return _convert(src, dst, **options)


def load(path, **options):
    """Load a packed model directory. Returns a flashmoe.Model."""
    from .model import load as _load

    return _load(path, **options)


def __getattr__(name):
    if name == "Model":
        from .model import Model

        return Model
    raise AttributeError(name)


__all__ = ["ConversionError", "FlashMoEError", "FormatError", "Model", "convert", "load", "__version__"]
