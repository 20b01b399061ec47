"""flashmoe: run Mixture-of-Experts models larger than memory by streaming experts from SSD."""

from .convert import convert  # noqa: E402  (binds the function over the submodule name)
from .errors import (ConversionError, ContextLengthError, DeviceError, FlashMoEError, FormatError,
                     MemoryBudgetError, ReadError)

__version__ = "0.1.0"


def load(path, **options):
    """Load a packed model directory. Returns a flashmoe.Model."""
    from .model import load as _load

    return _load(path, **options)


def memory_plan(path, **options):
    """How load(path, **options) would split its memory budget (and the minimum), without loading."""
    from .model import memory_plan as _plan

    return _plan(path, **options)


def parse_tool_calls(text, tools=None):
    """(content, tool_calls) from model output text: Qwen3.5's XML tool calls (arguments typed by the
    tools' JSON schemas) and Qwen3-Next's JSON ones, in the OpenAI shape; malformed calls stay content."""
    from .tool_calls import parse_tool_calls as _parse

    return _parse(text, tools)


_LAZY = {"Model": "model", "SamplingParams": "model", "backends": "model", "AssistantMessage": "model", "Tokenizer": "tokenizer",
         "GenerationResult": "generation", "GenerationChunk": "generation"}


def __getattr__(name):
    if name in _LAZY:  # imported on first use: `import flashmoe` stays light
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["AssistantMessage", "ConversionError", "ContextLengthError", "DeviceError", "FlashMoEError", "FormatError",
           "GenerationChunk", "GenerationResult", "MemoryBudgetError", "Model", "ReadError", "SamplingParams",
           "Tokenizer", "backends", "convert", "load", "memory_plan", "parse_tool_calls", "__version__"]
