"""Writer, validator and reader of the packed format (docs/FORMAT.md is the contract).

PackedWriter streams tensors to disk as they come; read_header validates a packed directory completely
before the engine hands its offsets to C; PackedReader dequantizes tensors for tests and debugging.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import zlib

import numpy as np

from . import arch as _arch
from . import quant
from .errors import ConversionError

MAGIC = b"FLASHMOE"
VERSION = 2  # the newest header version this code writes and reads (binary preambles stay at FILE_VERSION)
VERSIONS = (1, 2)  # 2 added a quantized tensor's scale_dtype "bfloat16"; a model that uses none is written as 1
FILE_VERSION = 1  # the preamble's version: the binary layout has not changed since version 1
SCALE_DTYPES = ("float16", "bfloat16")
PREAMBLE = 16384
KIND_DENSE = 1
KIND_EXPERTS = 2
ALIGN = 64
BLOB_ALIGN = 16384
NO_LAYER = 0xFFFFFFFF
HEADER_NAME = "flashmoe.json"
DENSE_NAME = "dense.bin"
EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
_PREAMBLE_FMT = "<8sIIQII"  # magic, version, kind, payload size, layer, num_experts
_CHUNK_ELEMS = 1 << 24  # rows are converted in chunks of ~16M elements (64 MB of float32)


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def expert_file_name(layer: int) -> str:
    return f"experts/L{layer:03d}.bin"


def _pwrite_all(fd: int, data, offset: int) -> None:
    """pwrite may write less than asked (Linux caps one call near 2 GiB); loop until done."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _preamble(kind: int, payload: int, layer: int, num_experts: int) -> bytes:
    head = struct.pack(_PREAMBLE_FMT, MAGIC, FILE_VERSION, kind, payload, layer, num_experts)
    return head + bytes(PREAMBLE - len(head))


def _section_layout(shape, dtype: str, group_size: int | None, offset: int,
                    scale_dtype: str = "float16") -> tuple[dict, int]:
    """Entry (offsets from `offset` on, each section 64-aligned) and the end of its last section."""
    out = shape[0]
    numel = math.prod(shape)
    entry = {"dtype": dtype, "shape": list(shape)}
    off = _align(offset)
    if dtype in ("q4", "q8"):
        nbytes = out * quant.packed_cols(shape[1], 4 if dtype == "q4" else 8)
        sbytes = out * (shape[1] // group_size) * 2
        s_off = _align(off + nbytes)
        b_off = _align(s_off + sbytes)
        entry.update(group_size=group_size, offset=off, nbytes=nbytes, scales_offset=s_off, biases_offset=b_off)
        if scale_dtype != "float16":  # absent means float16: version-1 headers stay as they were
            entry["scale_dtype"] = scale_dtype
        return entry, b_off + sbytes
    nbytes = numel * (4 if dtype == "f32" else 2)
    entry.update(offset=off, nbytes=nbytes)
    return entry, off + nbytes


def _stored_parts(name: str, entry: dict, data=None, q=None, scales=None, biases=None) -> list:
    """[(offset, array)] to write for a tensor given as stored, each array checked against the entry."""
    shape, dtype = entry["shape"], entry["dtype"]
    if dtype in ("q4", "q8"):
        s_dtype = np.float16 if entry.get("scale_dtype", "float16") == "float16" else np.uint16
        s_shape = (shape[0], shape[1] // entry["group_size"])
        want = (("q", q, np.uint8, (shape[0], quant.packed_cols(shape[1], int(dtype[1:]))), "offset"),
                ("scales", scales, s_dtype, s_shape, "scales_offset"),
                ("biases", biases, s_dtype, s_shape, "biases_offset"))
    else:
        want = (("data", data, np.float32 if dtype == "f32" else np.uint16, tuple(shape), "offset"),)
    out = []
    for part, arr, want_dtype, want_shape, key in want:
        if arr is None or arr.dtype != want_dtype or tuple(arr.shape) != tuple(want_shape):
            got = "missing" if arr is None else f"{arr.dtype} {list(arr.shape)}"
            raise ConversionError(f"{name}: {part} is {got}, expected {np.dtype(want_dtype)} {list(want_shape)}")
        out.append((entry[key], np.ascontiguousarray(arr)))
    return out


def _encode(a, dtype: str) -> np.ndarray:
    """A float array (float32/float16/bf16-as-uint16) in f32 or bf16 encoding."""
    if dtype == "f32":
        return quant.to_f32(a)
    if a.dtype == np.uint16:
        return np.ascontiguousarray(a)
    return quant.f32_to_bf16(quant.to_f32(a))


class PackedWriter:
    """Streams a packed model to `out_dir`.

    Arrays passed in are float32, float16, or uint16 holding bfloat16 bits (numpy has no bfloat16).
    add_expert is thread-safe, so experts can be encoded in parallel.

    Writers that already hold stored values (the MLX importer) give each tensor's encoding themselves:
    add_dense_stored, and `expert_formats` {projection: (dtype, group_size, scale_dtype)} with
    add_expert_stored.
    """

    def __init__(self, out_dir, architecture: str, config: dict, bits: int = 4, group_size: int = 64,
                 expert_formats: dict | None = None):
        if architecture not in _arch.ARCHITECTURES:
            raise ConversionError(f"unknown architecture {architecture!r}")
        if bits not in (4, 8, 16):
            raise ConversionError(f"bits must be 4, 8 or 16, got {bits}")
        if bits != 16 and (group_size < quant.MIN_GROUP_SIZE or group_size & (group_size - 1)):
            raise ConversionError(f"group_size must be a power of two >= 16, got {group_size}")
        self.dir = os.fspath(out_dir)
        self.architecture, self.config, self.bits, self.group_size = architecture, config, bits, group_size
        self._specs = _arch.packed_dense_specs(architecture, config)
        self._moe = _arch.moe_layers(architecture, config)
        self._num_experts = config["num_experts"]
        os.makedirs(os.path.join(self.dir, "experts"), exist_ok=True)
        # A header left from an earlier run must not describe the files we are about to rewrite.
        for stale in (HEADER_NAME, HEADER_NAME + ".tmp"):
            if os.path.exists(os.path.join(self.dir, stale)):
                os.remove(os.path.join(self.dir, stale))
        self._dense_fd = os.open(os.path.join(self.dir, DENSE_NAME), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._dense_fd, bytes(PREAMBLE), 0)
        self._dense_pos = PREAMBLE
        self._tensors: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._layers: dict[int, dict] = {}
        self.expert_tensors, self.blob_size = self._expert_layout(expert_formats or {})
        self.stride = _align(self.blob_size, BLOB_ALIGN)

    # -- dense ---------------------------------------------------------------------------------------
    def _quantized_dtype(self, name: str, in_features: int):
        if self.bits == 16:
            return "bf16", None
        return f"q{self.bits}", quant.pick_group_size(in_features, self.group_size, name)

    def _check_dense(self, name: str, shape) -> tuple:
        spec = self._specs.get(name)
        if spec is None:
            raise ConversionError(f"{name}: not a tensor of a {self.architecture} model with this config")
        if name in self._tensors:
            raise ConversionError(f"{name}: written twice")
        if tuple(shape) != tuple(spec[0]):
            raise ConversionError(f"{name}: shape {list(shape)}, the config implies {list(spec[0])}")
        return spec

    def add_dense(self, name: str, array, quantize: bool) -> None:
        """Append one dense tensor. quantize=True for projections/embeddings; else kept high precision."""
        self._check_dense(name, array.shape)
        if quantize:
            dtype, g = self._quantized_dtype(name, array.shape[1])
        else:
            g = None
            role = _arch.role_of(name, array.ndim)
            dtype = "bf16" if role == _arch.HP and array.dtype == np.uint16 else "f32"
        entry, end = _section_layout(array.shape, dtype, g, self._dense_pos)
        rows = array.shape[0] if array.ndim == 2 else 1
        flat = array.reshape(rows, -1)
        cols = flat.shape[1]
        step = max(1, _CHUNK_ELEMS // max(cols, 1))
        for r0 in range(0, rows, step):
            chunk = flat[r0:r0 + step]
            if dtype in ("q4", "q8"):
                q, s, b = quant.quantize(quant.to_f32(chunk), self.bits, g)
                srow = (cols // g) * 2
                _pwrite_all(self._dense_fd, q, entry["offset"] + r0 * q.shape[1])
                _pwrite_all(self._dense_fd, s, entry["scales_offset"] + r0 * srow)
                _pwrite_all(self._dense_fd, b, entry["biases_offset"] + r0 * srow)
            else:
                enc = _encode(chunk, dtype)
                _pwrite_all(self._dense_fd, enc, entry["offset"] + r0 * cols * enc.itemsize)
        self._tensors[name] = entry
        self._dense_pos = end

    def add_dense_quantized(self, name: str, shape, q, scales, biases) -> None:
        """Append one quantized dense tensor of `shape` [out, in] given already quantized (for writers that
        make quantized data directly, like the synthetic models): q uint8 [out, in/2 or in], scales and
        biases float16 [out, in/group_size] with the group size this writer picks for `in`."""
        spec = self._check_dense(name, shape)
        if spec[1] != _arch.QUANT or self.bits == 16:
            raise ConversionError(f"{name}: not quantized in a {self.bits}-bit model")
        dtype, g = self._quantized_dtype(name, shape[1])
        self.add_dense_stored(name, shape, dtype, q=q, scales=scales, biases=biases, group_size=g)

    def add_dense_stored(self, name: str, shape, dtype: str, *, data=None, q=None, scales=None, biases=None,
                         group_size: int | None = None, scale_dtype: str = "float16") -> None:
        """Append one dense tensor given exactly as it is to be stored: nothing is re-encoded.

        f32: data float32; bf16: data uint16 (bfloat16 bits); q4/q8: q uint8 [out, in/2 or in], scales and
        biases [out, in/group_size] as float16 (scale_dtype float16) or uint16 bfloat16 bits (bfloat16).
        Any dtype is accepted for any matrix (the engine's kernels take every dtype everywhere); 1-D and
        the always-float32 tensors (norms, conv1d, A_log, dt_bias) must be f32.
        """
        spec = self._check_dense(name, shape)
        if spec[1] == _arch.F32 and dtype != "f32":
            raise ConversionError(f"{name}: stored as float32 in every packed model, got {dtype}")
        entry, end = _section_layout(shape, dtype, group_size, self._dense_pos, scale_dtype)
        for off, arr in _stored_parts(name, entry, data=data, q=q, scales=scales, biases=biases):
            _pwrite_all(self._dense_fd, arr, off)
        self._tensors[name] = entry
        self._dense_pos = end

    # -- experts -------------------------------------------------------------------------------------
    def _expert_layout(self, formats: dict):
        tensors, pos = {}, 0
        for name, shape in _arch.expert_shapes(self.config).items():
            if name in formats:
                dtype, g, scale_dtype = formats[name]
            else:
                (dtype, g), scale_dtype = self._quantized_dtype(f"mlp.experts.{name}", shape[1]), "float16"
            tensors[name], pos = _section_layout(shape, dtype, g, pos, scale_dtype)
        return tensors, _align(pos)

    def encode_expert(self, gate, up, down) -> bytearray:
        """One expert's blob (blob_size bytes), without padding: each projection quantized (or bf16 at 16
        bits), then laid out as encode_expert_stored does."""
        parts = {}
        for name, w in zip(EXPERT_NAMES, (gate, up, down)):
            t = self.expert_tensors[name]
            if tuple(w.shape) != tuple(t["shape"]):
                raise ConversionError(f"expert {name}: shape {list(w.shape)}, the config implies {t['shape']}")
            if t["dtype"] == "bf16":
                parts[name] = {"data": _encode(w, "bf16")}
            else:
                parts[name] = dict(zip(("q", "scales", "biases"),
                                       quant.quantize(quant.to_f32(w), self.bits, t["group_size"])))
        return self.encode_expert_stored(parts)

    def encode_expert_stored(self, parts: dict) -> bytearray:
        """One expert's blob from its stored arrays: parts[projection] = {"data": ...} or {"q", "scales",
        "biases"} in the layout's encoding (see add_dense_stored). Nothing is re-encoded."""
        blob = bytearray(self.blob_size)
        view = memoryview(blob)
        for name in EXPERT_NAMES:
            t = self.expert_tensors[name]
            for off, arr in _stored_parts(f"expert {name}", t, **parts[name]):
                raw = memoryview(arr).cast("B")  # contiguous: _stored_parts made it so
                view[off:off + len(raw)] = raw
        return blob

    def add_expert_stored(self, layer: int, e: int, parts: dict) -> None:
        """Write expert e of `layer` from its stored arrays (encode_expert_stored); thread-safe."""
        self._add_expert(layer, e, lambda: self.encode_expert_stored(parts))

    def add_expert(self, layer: int, e: int, gate, up, down) -> None:
        """Write expert e of `layer` (gate [I,H], up [I,H], down [H,I]); any order, each exactly once."""
        self._add_expert(layer, e, lambda: self.encode_expert(gate, up, down))

    def _add_expert(self, layer: int, e: int, encode) -> None:
        st = self._claim_expert(layer, e)
        try:
            blob = encode()
        except ConversionError as exc:
            raise ConversionError(f"layer {layer} expert {e}: {exc}") from None
        self._write_expert(layer, st, e, blob)

    def add_expert_blob(self, layer: int, e: int, blob) -> None:
        """Write expert e of `layer` given already encoded: blob_size bytes laid out as expert_tensors says
        (for writers that make quantized data directly). Any order, each exactly once; thread-safe."""
        n = memoryview(blob).nbytes
        if n != self.blob_size:
            raise ConversionError(f"layer {layer} expert {e}: a blob of {n} bytes, not {self.blob_size}")
        self._write_expert(layer, self._claim_expert(layer, e), e, blob)

    def _claim_expert(self, layer: int, e: int) -> dict:
        if layer not in self._moe:
            raise ConversionError(f"layer {layer} has no routed experts in this config")
        if not 0 <= e < self._num_experts:
            raise ConversionError(f"layer {layer}: expert index {e} out of range 0..{self._num_experts - 1}")
        with self._lock:
            st = self._layers.get(layer)
            if st is None:
                path = os.path.join(self.dir, expert_file_name(layer))
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                st = self._layers[layer] = {"fd": fd, "claimed": set(), "written": 0,
                                            "crc": [None] * self._num_experts}
            if e in st["claimed"]:
                raise ConversionError(f"layer {layer} expert {e}: written twice")
            st["claimed"].add(e)
        return st

    def _write_expert(self, layer: int, st: dict, e: int, blob) -> None:
        _pwrite_all(st["fd"], blob, PREAMBLE + e * self.stride)
        with self._lock:
            st["crc"][e] = zlib.crc32(blob)
            st["written"] += 1
            if st["written"] == self._num_experts:
                self._close_layer(layer, st)

    def _close_layer(self, layer: int, st: dict) -> None:
        payload = self._num_experts * self.stride
        os.pwrite(st["fd"], _preamble(KIND_EXPERTS, payload, layer, self._num_experts), 0)
        os.ftruncate(st["fd"], PREAMBLE + payload)  # zero padding after the last blob
        os.fsync(st["fd"])
        os.close(st["fd"])
        st["fd"] = None

    # -- finish --------------------------------------------------------------------------------------
    def finish(self, source: dict | None = None, quantization: dict | None = None) -> dict:
        """Check completeness, write preambles and then the header (atomically). Returns the header.

        quantization: the header's summary section, when the writer's bits/group_size do not describe the
        model (an import that keeps its source's widths)."""
        missing = [n for n in self._specs if n not in self._tensors]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ConversionError(f"dense tensors never written: {', '.join(missing[:5])}{more}")
        layers = []
        for layer in self._moe:
            st = self._layers.get(layer)
            if st is None or st["written"] != self._num_experts:
                got = set() if st is None else st["claimed"]
                lost = [e for e in range(self._num_experts) if e not in got]
                raise ConversionError(f"layer {layer}: experts never written: {lost[:10]}"
                                      + (" ..." if len(lost) > 10 else ""))
            size = PREAMBLE + self._num_experts * self.stride
            layers.append({"layer": layer, "file": expert_file_name(layer), "size": size,
                           "num_experts": self._num_experts, "checksums": st["crc"]})
        payload = _align(self._dense_pos) - PREAMBLE
        os.pwrite(self._dense_fd, _preamble(KIND_DENSE, payload, NO_LAYER, 0), 0)
        os.ftruncate(self._dense_fd, PREAMBLE + payload)
        # Sections were written out of order, with zero gaps: the CRC is taken over the finished file.
        crc = 0
        for off in range(PREAMBLE, PREAMBLE + payload, 1 << 24):
            crc = zlib.crc32(os.pread(self._dense_fd, min(1 << 24, PREAMBLE + payload - off), off), crc)
        os.fsync(self._dense_fd)
        os.close(self._dense_fd)
        self._dense_fd = None
        qinfo = {"bits": self.bits, "mode": "none" if self.bits == 16 else "affine", "scale_dtype": "float16"}
        if self.bits != 16:
            qinfo["group_size"] = self.group_size
        if quantization is not None:
            qinfo = dict(quantization)
        from . import __version__

        entries = list(self._tensors.values()) + list(self.expert_tensors.values())
        bf16_scales = any(t.get("scale_dtype") == "bfloat16" for t in entries)
        header = {
            "format": "flashmoe",
            "version": 2 if bf16_scales else 1,
            "architecture": self.architecture,
            "config": self.config,
            "quantization": qinfo,
            "dense": {"file": DENSE_NAME, "size": PREAMBLE + payload, "checksum": crc, "tensors": self._tensors},
            "experts": {"blob_size": self.blob_size, "stride": self.stride,
                        "tensors": self.expert_tensors, "layers": layers},
            "source": {"converter": f"flashmoe {__version__}", **(source or {})},
        }
        tmp = os.path.join(self.dir, HEADER_NAME + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(header, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, HEADER_NAME))
        return header

    def close(self) -> None:
        """Release file descriptors without writing a header (after an error)."""
        if self._dense_fd is not None:
            os.close(self._dense_fd)
            self._dense_fd = None
        for st in self._layers.values():
            if st["fd"] is not None:
                os.close(st["fd"])
                st["fd"] = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def __getattr__(name):
    # read_header and PackedReader live in reader.py (which imports this module); re-export them lazily.
    if name in ("read_header", "PackedReader"):
        from . import reader

        return getattr(reader, name)
    raise AttributeError(name)


__all__ = ["PackedWriter", "PackedReader", "read_header", "MAGIC", "VERSION", "PREAMBLE", "KIND_DENSE",
           "KIND_EXPERTS", "ALIGN", "BLOB_ALIGN"]
