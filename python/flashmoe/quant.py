"""bfloat16 conversion and group-wise affine quantization, exactly as docs/FORMAT.md specifies.

All functions are vectorised numpy and work on float32 input. Arrays of dtype uint16 are bfloat16 bit
patterns throughout flashmoe (numpy has no bfloat16 type).
"""

from __future__ import annotations

import numpy as np

from .errors import ConversionError

MIN_GROUP_SIZE = 16


def f32_to_bf16(a) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays NaN."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():  # the rounding add could carry a NaN's payload into the exponent; force a quiet NaN
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def bf16_to_f32(u16) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32 (exact)."""
    u16 = np.ascontiguousarray(u16, dtype=np.uint16)
    return (u16.astype(np.uint32) << np.uint32(16)).view(np.float32)


def to_f32(a) -> np.ndarray:
    """Any supported source array (float32, float16, bf16-as-uint16) -> float32."""
    if a.dtype == np.uint16:
        return bf16_to_f32(a)
    return np.asarray(a, dtype=np.float32)


def pick_group_size(in_features: int, requested: int, name: str = "tensor") -> int:
    """The requested group size, halved until it divides in_features (not below 16)."""
    g = int(requested)
    while g >= MIN_GROUP_SIZE and in_features % g:
        g //= 2
    if g < MIN_GROUP_SIZE:
        raise ConversionError(
            f"{name}: input dimension {in_features} is not divisible by group size {requested} "
            f"or any halving of it down to {MIN_GROUP_SIZE}; it cannot be quantized"
        )
    return g


def packed_cols(in_features: int, bits: int) -> int:
    """Bytes per row of the packed q array."""
    return in_features // 2 if bits == 4 else in_features


def quantize(w, bits: int, group_size: int):
    """Quantize w[out, in] (float32) -> (q uint8 [out, in or in/2], scales f16 [out, in/g], biases f16).

    scale = (max-min)/(2^bits-1) and bias = min are rounded to float16 first and q is computed from the
    rounded values; a constant group gets scale 0, q 0, bias = its value.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    w = np.asarray(w, dtype=np.float32)
    out, inf = w.shape
    if inf % group_size or (bits == 4 and inf % 2):
        raise ValueError(f"in={inf} is not divisible by group size {group_size}")
    if not np.isfinite(w).all():
        raise ConversionError("cannot quantize a tensor containing NaN or infinity")
    maxq = (1 << bits) - 1
    g = w.reshape(out, inf // group_size, group_size)
    mn = g.min(axis=2)
    mx = g.max(axis=2)
    with np.errstate(over="ignore"):
        scales = ((mx - mn) / np.float32(maxq)).astype(np.float16)
        biases = mn.astype(np.float16)
    if not (np.isfinite(scales).all() and np.isfinite(biases).all()):
        raise ConversionError("tensor values exceed the float16 range of quantization scales/biases")
    s = scales.astype(np.float32)[:, :, None]
    b = biases.astype(np.float32)[:, :, None]
    # Dividing by +inf where scale is 0 yields q = 0 for that group without a separate select.
    q = g - b
    q /= np.where(s > 0, s, np.float32(np.inf))
    np.rint(q, out=q)
    np.clip(q, 0, maxq, out=q)
    q = q.astype(np.uint8).reshape(out, inf)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << np.uint8(4))  # element 2j in the low nibble
    return np.ascontiguousarray(q), scales, biases


def unpack(q, bits: int, in_features: int) -> np.ndarray:
    """Packed q -> uint8 [out, in] of integer levels."""
    q = np.asarray(q, dtype=np.uint8)
    if bits == 8:
        return q.reshape(-1, in_features)
    q = q.reshape(-1, in_features // 2)
    levels = np.empty((q.shape[0], in_features), dtype=np.uint8)
    levels[:, 0::2] = q & np.uint8(0x0F)
    levels[:, 1::2] = q >> np.uint8(4)
    return levels


def dequantize(q, scales, biases, bits: int, group_size: int, shape) -> np.ndarray:
    """Inverse of quantize: float32 [out, in] = scale * q + bias per group. Scales and biases are float16,
    or uint16 holding bfloat16 bits (an MLX import's), or float32."""
    out, inf = shape
    levels = unpack(q, bits, inf).astype(np.float32).reshape(out, inf // group_size, group_size)
    s = to_f32(np.asarray(scales)).reshape(out, inf // group_size, 1)
    b = to_f32(np.asarray(biases)).reshape(out, inf // group_size, 1)
    return (levels * s + b).reshape(out, inf)
