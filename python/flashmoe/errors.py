"""The exceptions flashmoe raises. Errors from the C core arrive as FlashMoEError (or a subclass)."""


class FlashMoEError(RuntimeError):
    """Base class of every error flashmoe raises on bad input or a failed operation."""


class FormatError(FlashMoEError, ValueError):
    """A packed model directory is missing, truncated, corrupt, or of an unknown version."""


class ConversionError(FlashMoEError, ValueError):
    """A source checkpoint cannot be converted: missing or truncated files, unknown model_type, bad shapes."""


class ContextLengthError(FlashMoEError, ValueError):
    """The tokens do not fit in the model's context length."""


class ReadError(FlashMoEError, OSError):
    """Reading model data from disk failed (short read, I/O error)."""


class DeviceError(FlashMoEError):
    """The GPU failed a command (Metal: a command buffer's error status). The model's sequence is reset;
    the next call starts afresh."""


class MemoryBudgetError(FlashMoEError, ValueError):
    """The memory budget cannot hold the dense weights plus one layer's working set of experts."""


class ArgumentError(FlashMoEError, ValueError, TypeError):
    """A bad argument to the API: a value out of range or of the wrong type (it is both a ValueError and a
    TypeError, so code that catches either of those keeps working)."""


class ModelBusyError(FlashMoEError):
    """This thread already holds the model with an unfinished stream, and another call would interleave
    with it (other threads wait their turn instead)."""
