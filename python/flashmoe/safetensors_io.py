"""Minimal safetensors reading by memory map, with bfloat16 support numpy's backend lacks.

A file is 8 bytes of little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the data. Tensors come back as read-only np.memmap views (bf16 as uint16 bit patterns), so a
checkpoint far larger than memory is read piece by piece.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

from .errors import ConversionError

# U32: MLX's packed quantized weights (mlx_import.py); the Hugging Face converter takes only the floats.
DTYPES = {"BF16": np.dtype(np.uint16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32),
          "U32": np.dtype("<u4")}
DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_MAX_HEADER = 1 << 28


class SafetensorsFile:
    """One .safetensors file: its header parsed and validated against the file size."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ConversionError(f"{path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > min(size - 8, _MAX_HEADER):
                    raise ConversionError(f"{path}: corrupt safetensors header (header length {n}, "
                                          f"file is {size} bytes)")
                raw = f.read(n)
        except OSError as exc:
            raise ConversionError(f"{path}: cannot read ({exc})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{path}: corrupt safetensors header ({exc})") from None
        self.data_start = 8 + n
        self.entries = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (b, end) = e["dtype"], [int(x) for x in e["shape"]], e["data_offsets"]
                b, end = int(b), int(end)
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: corrupt safetensors header (bad entry for {name})") from None
            if self.data_start + end > size or b > end:
                raise ConversionError(f"{path}: truncated safetensors file: tensor {name} needs bytes up to "
                                      f"{self.data_start + end}, the file has {size}")
            if dtype in DTYPES and end - b != math.prod(shape) * DTYPES[dtype].itemsize:
                raise ConversionError(f"{path}: corrupt safetensors header: tensor {name} {dtype} {shape} "
                                      f"spans {end - b} bytes")
            self.entries[name] = (dtype, tuple(shape), b)

    def get(self, name: str, index: int | None = None) -> np.ndarray:
        """The tensor, or with `index` only tensor[index] (one expert of a fused 3-D tensor), memory-mapped.

        Mapping just the slice keeps a process's mapped footprint to what it is converting.
        """
        dtype, shape, b = self.entries[name]
        if dtype not in DTYPES:
            raise ConversionError(f"{self.path}: tensor {name} has dtype {dtype}; supported: "
                                  f"{', '.join(DTYPES)}")
        if index is not None:
            sub = math.prod(shape[1:]) * DTYPES[dtype].itemsize
            b, shape = b + index * sub, shape[1:]
        if math.prod(shape) == 0:
            return np.zeros(shape, DTYPES[dtype])
        return np.memmap(self.path, dtype=DTYPES[dtype], mode="r", offset=self.data_start + b, shape=shape)


class Checkpoint:
    """All safetensors files of a checkpoint directory, through the index when there is one."""

    def __init__(self, src: str):
        index_path = os.path.join(src, "model.safetensors.index.json")
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index_path}: corrupt index ({exc})") from None
            shards = sorted(set(weight_map.values()))
            for s in shards:
                if not os.path.isfile(os.path.join(src, s)):
                    raise ConversionError(f"{os.path.join(src, s)}: missing shard named in {index_path}")
        else:
            weight_map = None
            shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
            if not shards:
                raise ConversionError(f"{src}: no *.safetensors files")
        self.files = {s: SafetensorsFile(os.path.join(src, s)) for s in shards}
        self.where: dict[str, SafetensorsFile] = {}
        for s, f in self.files.items():
            for name in f.entries:
                if weight_map is not None and weight_map.get(name, s) != s:
                    continue  # the index assigns this name to another shard
                if name in self.where:
                    raise ConversionError(f"{f.path}: tensor {name} also in {self.where[name].path}")
                self.where[name] = f
        if weight_map is not None:
            for name, s in weight_map.items():
                if name not in self.where:
                    raise ConversionError(f"{os.path.join(src, s)}: tensor {name} listed in the index is missing")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self):
        return self.where.keys()

    def shape(self, name: str) -> tuple:
        return self.where[name].entries[name][1]

    def dtype(self, name: str) -> str:
        return self.where[name].entries[name][0]

    def nbytes(self, name: str) -> int:
        dt = DTYPES.get(self.dtype(name))
        return math.prod(self.shape(name)) * (dt.itemsize if dt is not None else 0)

    def get(self, name: str, index: int | None = None) -> np.ndarray:
        return self.where[name].get(name, index)
