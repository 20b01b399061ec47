"""Validation and reading of packed model directories (docs/FORMAT.md).

read_header is what the engine's loader calls before handing offsets to C: it checks every fact the C
side relies on (files, sizes, preambles, tensor names, shapes, dtypes, offsets, alignment, value ranges
and types: every integer it hands to C fits the C type) and raises FormatError naming the file and the
problem.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
import zlib

import numpy as np

from . import arch as _arch
from . import quant
from .errors import FormatError
from .format import (ALIGN, BLOB_ALIGN, EXPERT_NAMES, FILE_VERSION, HEADER_NAME, KIND_DENSE, KIND_EXPERTS, MAGIC,
                     NO_LAYER, PREAMBLE, SCALE_DTYPES, VERSIONS, _PREAMBLE_FMT)

_DTYPES = ("f32", "bf16", "q4", "q8")
# Matrices may take any dtype (the kernels take every one everywhere; an MLX import keeps the router at 8
# bits); norms, conv1d, A_log and dt_bias are always float32.
_ALLOWED = {_arch.QUANT: _DTYPES, _arch.HP: _DTYPES, _arch.F32: ("f32",)}
_QUANT_KEYS = ("group_size", "scales_offset", "biases_offset", "scale_dtype")
_FIELDS = struct.calcsize(_PREAMBLE_FMT)  # preamble bytes that carry fields; the rest must be zero
_MAX_HEADER = 64 << 20  # a 397B model's header is ~1 MB; reading stops here
# Config sizes: far above any real model, small enough that the engine's products of a few of them
# (heads x head_dim x tokens x 4 bytes) stay within 64 bits; csrc/core/model.c check_config agrees.
_MAX_DIM = 1 << 24
_MAX_LAYERS = 256  # FM_MAX_LAYERS (csrc/include/flashmoe.h)
_INT32_MAX = 2**31 - 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _f32(x: float) -> float:
    """x rounded to float32, as the engine stores it; OverflowError past the float32 range."""
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def _open_error(path: str, exc: OSError) -> FormatError:
    return FormatError(f"{path}: cannot read: {exc.strerror or exc}")


def _check_preamble(path: str, kind: int, layer: int, num_experts: int, size: int) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(PREAMBLE)
    except OSError as exc:
        raise _open_error(path, exc) from None
    if len(head) < PREAMBLE:
        raise FormatError(f"{path}: file too short for its preamble")
    magic, version, k, payload, lyr, n = struct.unpack_from(_PREAMBLE_FMT, head)
    if magic != MAGIC:
        raise FormatError(f"{path}: bad magic {magic!r} (expected {MAGIC!r}); not a flashmoe file")
    if version != FILE_VERSION:
        raise FormatError(f"{path}: file format version {version}, this reader knows {FILE_VERSION}")
    if k != kind:
        raise FormatError(f"{path}: preamble kind {k}, expected {kind}")
    if payload != size - PREAMBLE:
        raise FormatError(f"{path}: preamble payload size {payload}, but the file holds {size - PREAMBLE}")
    if lyr != layer:
        raise FormatError(f"{path}: preamble layer {lyr}, expected {layer}")
    if n != num_experts:
        raise FormatError(f"{path}: preamble num_experts {n}, expected {num_experts}")
    tail = head[_FIELDS:]
    if any(tail):  # reserved: a later version may give these bytes meaning
        at = _FIELDS + len(tail) - len(tail.lstrip(b"\0"))
        raise FormatError(f"{path}: preamble byte {at} is not zero (bytes {_FIELDS}..{PREAMBLE - 1} are reserved)")


def _stat(path: str, what: str) -> os.stat_result:
    """stat of a file the model needs, which must be a regular file (symlinks are followed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing ({what})") from None
    except OSError as exc:
        raise _open_error(path, exc) from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: not a regular file ({what})")
    return st


def _check_file(root: str, rel, expected_size, what: str) -> str:
    # Names stay inside the model directory; a symlink there is followed (experts on another disk).
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) or ".." in rel.split("/"):
        raise FormatError(f"{root}: {what} has a bad file name {rel!r}")
    path = os.path.join(root, rel)
    actual = _stat(path, what).st_size
    if not _is_int(expected_size) or actual != expected_size:
        what = "truncated" if _is_int(expected_size) and actual < expected_size else "wrong size"
        raise FormatError(f"{path}: {what}: {actual} bytes, the header says {expected_size}")
    return path


def _check_entry(where: str, name: str, t, shape, allowed, limit: int, base: int, version: int = 1) -> list:
    """One tensor entry: dtype, shape, sizes, alignment, and bounds within [base, limit).
    Returns its sections as (start, end, what) for _check_overlaps."""
    if not isinstance(t, dict):
        raise FormatError(f"{where}: tensor {name}: entry is not an object")
    dtype = t.get("dtype")
    if dtype not in _DTYPES:
        raise FormatError(f"{where}: tensor {name}: unknown dtype {dtype!r}")
    if dtype not in allowed:
        raise FormatError(f"{where}: tensor {name}: dtype {dtype} not allowed here (expected one of {allowed})")
    if t.get("shape") != list(shape) or not all(map(_is_int, t["shape"])):  # [64.0] == [64] in Python
        raise FormatError(f"{where}: tensor {name}: shape {t.get('shape')}, the config implies {list(shape)}")
    numel = math.prod(shape)
    sections = [("offset", None)]
    if dtype in ("q4", "q8"):
        g = t.get("group_size")
        if (not _is_int(g) or g < quant.MIN_GROUP_SIZE or shape[1] % g
                or (dtype == "q4" and (shape[1] % 2 or g % 2))):
            raise FormatError(f"{where}: tensor {name}: group_size {g!r} invalid for shape {list(shape)}")
        sd = t.get("scale_dtype", "float16")
        if sd not in SCALE_DTYPES[:version]:  # bfloat16 scales came with version 2
            raise FormatError(f"{where}: tensor {name}: scale_dtype {sd!r} unsupported in a version {version} "
                              f"header (expected one of {SCALE_DTYPES[:version]})")
        expect = shape[0] * quant.packed_cols(shape[1], 4 if dtype == "q4" else 8)
        sbytes = shape[0] * (shape[1] // g) * 2
        sections += [("scales_offset", sbytes), ("biases_offset", sbytes)]
    else:
        expect = numel * (4 if dtype == "f32" else 2)
        for key in _QUANT_KEYS:  # the loader would hand them to C
            if key in t:
                raise FormatError(f"{where}: tensor {name}: {dtype} has no {key} (found {t[key]!r})")
    if not _is_int(t.get("nbytes")) or t["nbytes"] != expect:
        raise FormatError(f"{where}: tensor {name}: nbytes {t.get('nbytes')!r}, {dtype} {list(shape)} needs {expect}")
    out = []
    for key, fixed in sections:
        off = t.get(key)
        n = expect if fixed is None else fixed
        if not _is_int(off) or off < base or off % ALIGN:
            raise FormatError(f"{where}: tensor {name}: {key} {off!r} is not a {ALIGN}-aligned offset >= {base}")
        if off + n > limit:
            raise FormatError(f"{where}: tensor {name}: {key} {off} + {n} bytes runs past the end ({limit})")
        out.append((off, off + n, f"{name} {key}"))
    return out


def _check_overlaps(where: str, sections: list) -> None:
    """No two sections share a byte. Sorted by start, every section is non-empty, so checking
    neighbours suffices."""
    sections = sorted(sections, key=lambda s: s[0])  # stable: ties stay in header order
    for (s0, e0, a), (s1, e1, b) in zip(sections, sections[1:]):
        if s1 < e0:
            raise FormatError(f"{where}: tensor {a} [{s0}, {e0}) overlaps {b} [{s1}, {e1})")


def _config_int(hpath: str, cfg: dict, k: str, lo: int, hi: int = _MAX_DIM) -> None:
    if not _is_int(cfg[k]) or not lo <= cfg[k] <= hi:
        raise FormatError(f"{hpath}: config {k} = {cfg[k]!r} is not an integer in {lo}..{hi}")


def _positive_float(hpath: str, name: str, v) -> None:
    """A number the engine keeps as a float32 and divides by or takes powers of: finite and > 0 there."""
    try:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(_f32(v)) and _f32(v) > 0
    except OverflowError:  # beyond float32 (or float) range
        ok = False
    if not ok:
        raise FormatError(f"{hpath}: config {name} = {v!r} must be a finite number > 0 (as a float32)")


def _check_config(hpath: str, arch: str, cfg) -> None:
    if not isinstance(cfg, dict):
        raise FormatError(f"{hpath}: config is not an object")
    need = _arch.REQUIRED_FIELDS + (_arch.REQUIRED_FIELDS_NEXT if arch == "qwen3_next" else ())
    missing = [k for k in need if k not in cfg]
    if missing:
        raise FormatError(f"{hpath}: config lacks {', '.join(missing)}")
    for k in need:
        if k in ("layer_types", "rope_parameters", "mlp_only_layers", "rms_norm_eps", "tie_word_embeddings",
                 "norm_topk_prob"):
            continue
        _config_int(hpath, cfg, k, 0 if k == "num_experts" else 1)
    if cfg["num_hidden_layers"] > _MAX_LAYERS:
        raise FormatError(f"{hpath}: config num_hidden_layers = {cfg['num_hidden_layers']}: at most {_MAX_LAYERS} "
                          "layers are supported")
    for k, hi in (("intermediate_size", _MAX_DIM), ("max_position_embeddings", _INT32_MAX)):
        if k not in need and cfg.get(k) is not None:  # optional; the loader reads them when present
            _config_int(hpath, cfg, k, 0 if k == "intermediate_size" else 1, hi)
    for k in ("tie_word_embeddings", "norm_topk_prob"):
        if k in cfg and not isinstance(cfg[k], bool):  # "false" would be true
            raise FormatError(f"{hpath}: config {k} = {cfg[k]!r} is not a boolean")
    # The engine computes silu MLPs and bias-free attention, whatever the header says: refuse other models
    # (the converter does too, arch.normalize_config).
    if cfg.get("hidden_act", "silu") != "silu":
        raise FormatError(f"{hpath}: config hidden_act {cfg['hidden_act']!r} unsupported (only silu)")
    if cfg.get("attention_bias") not in (None, False):
        raise FormatError(f"{hpath}: config attention_bias {cfg['attention_bias']!r} unsupported (only false)")
    eos = cfg.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and not all(_is_int(e) and 0 <= e <= _INT32_MAX for e in eos_ids):
        raise FormatError(f"{hpath}: config eos_token_id = {eos!r} is not a token id or a list of them")
    _positive_float(hpath, "rms_norm_eps", cfg["rms_norm_eps"])
    lt = cfg["layer_types"]
    if not isinstance(lt, list) or len(lt) != cfg["num_hidden_layers"] or any(x not in _arch.LAYER_TYPES for x in lt):
        raise FormatError(f"{hpath}: config layer_types must list {cfg['num_hidden_layers']} entries of {_arch.LAYER_TYPES}")
    if arch == "qwen3_next":
        mlp_only = cfg["mlp_only_layers"]
        if not isinstance(mlp_only, list) or not all(map(_is_int, mlp_only)):  # indices past the last layer: no-ops
            raise FormatError(f"{hpath}: config mlp_only_layers = {mlp_only!r} is not a list of layer indices")
    rp = cfg["rope_parameters"]
    if not isinstance(rp, dict) or "rope_theta" not in rp or "partial_rotary_factor" not in rp:
        raise FormatError(f"{hpath}: config rope_parameters must hold rope_theta and partial_rotary_factor")
    if rp.get("rope_type", "default") != "default":
        raise FormatError(f"{hpath}: config rope_parameters.rope_type {rp['rope_type']!r} unsupported "
                          "(only 'default')")
    _positive_float(hpath, "rope_parameters.rope_theta", rp["rope_theta"])
    prf = rp["partial_rotary_factor"]
    if not (isinstance(prf, (int, float)) and not isinstance(prf, bool) and 0 < prf <= 1):
        raise FormatError(f"{hpath}: config rope_parameters.partial_rotary_factor = {prf!r} must be a number "
                          "in (0, 1]")
    rot = int(cfg["head_dim"] * prf)  # as transformers and the engine (csrc/core/blocks.c) compute it
    if rot % 2:
        raise FormatError(f"{hpath}: config rope_parameters.partial_rotary_factor {prf} gives an odd rotary dim "
                          f"{rot} (head_dim {cfg['head_dim']})")
    if cfg["linear_num_value_heads"] % cfg["linear_num_key_heads"]:
        raise FormatError(f"{hpath}: config linear_num_value_heads is not a multiple of linear_num_key_heads")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise FormatError(f"{hpath}: config num_attention_heads is not a multiple of num_key_value_heads")
    if cfg["num_experts_per_tok"] > cfg["num_experts"]:
        raise FormatError(f"{hpath}: config num_experts_per_tok exceeds num_experts")


def model_bytes(header: dict) -> int:
    """Bytes of a packed model's binary files: dense.bin and every experts file."""
    return header["dense"]["size"] + sum(e["size"] for e in header["experts"]["layers"])


def read_header(path) -> dict:
    """Load and fully validate flashmoe.json and the binary files it names. Returns the header."""
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise FormatError(f"{root}: not a directory (expected a packed flashmoe model)")
    hpath = os.path.join(root, HEADER_NAME)
    if not os.path.lexists(hpath):
        raise FormatError(f"{hpath}: missing; {root} is not a packed flashmoe model (convert it first)")
    size = _stat(hpath, "the header").st_size
    if size <= _MAX_HEADER:
        try:
            with open(hpath, "rb") as f:
                raw = f.read(_MAX_HEADER + 1)  # bounded: the file may have grown since
        except OSError as exc:
            raise _open_error(hpath, exc) from None
        size = len(raw)
    if size > _MAX_HEADER:
        raise FormatError(f"{hpath}: {size} bytes, larger than any header ({_MAX_HEADER} at most)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise FormatError(f"{hpath}: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # UnicodeDecodeError is one
        raise FormatError(f"{hpath}: not valid JSON ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != "flashmoe":
        fmt = header.get("format") if isinstance(header, dict) else None
        raise FormatError(f"{hpath}: format is {fmt!r}, expected 'flashmoe'")
    version = header.get("version")
    if version not in VERSIONS or not _is_int(version):
        raise FormatError(f"{hpath}: format version {version!r}, this reader knows {', '.join(map(str, VERSIONS))}")
    arch = header.get("architecture")
    if arch not in _arch.ARCHITECTURES:
        raise FormatError(f"{hpath}: unknown architecture {arch!r}, supported: {', '.join(_arch.ARCHITECTURES)}")
    cfg = header.get("config")
    _check_config(hpath, arch, cfg)
    q = header.get("quantization")
    if not isinstance(q, dict) or q.get("bits") not in (4, 8, 16):
        raise FormatError(f"{hpath}: quantization.bits must be 4, 8 or 16")
    if q.get("scale_dtype", "float16") not in SCALE_DTYPES[:version]:
        raise FormatError(f"{hpath}: quantization.scale_dtype {q.get('scale_dtype')!r} unsupported")

    dense = header.get("dense")
    if not isinstance(dense, dict) or not isinstance(dense.get("tensors"), dict):
        raise FormatError(f"{hpath}: missing dense section")
    crc = dense.get("checksum", 0)  # absent in models written before it existed
    if not _is_int(crc) or not 0 <= crc < 2**32:
        raise FormatError(f"{hpath}: dense.checksum {crc!r} is not a CRC-32")
    dpath = _check_file(root, dense.get("file"), dense.get("size"), "dense weights")
    _check_preamble(dpath, KIND_DENSE, NO_LAYER, 0, dense["size"])
    specs = _arch.packed_dense_specs(arch, cfg)
    tensors = dense["tensors"]
    missing = [n for n in specs if n not in tensors]
    if missing:
        raise FormatError(f"{hpath}: dense tensors missing: {', '.join(missing[:5])}")
    extra = [n for n in tensors if n not in specs]
    if extra:
        raise FormatError(f"{hpath}: unexpected dense tensors: {', '.join(extra[:5])}")
    sections = []
    for name, (shape, role) in specs.items():
        sections += _check_entry(dpath, name, tensors[name], shape, _ALLOWED[role], dense["size"], PREAMBLE, version)
    _check_overlaps(dpath, sections)

    ex = header.get("experts")
    if not isinstance(ex, dict) or not isinstance(ex.get("tensors"), dict) or not isinstance(ex.get("layers"), list):
        raise FormatError(f"{hpath}: missing experts section")
    blob, stride = ex.get("blob_size"), ex.get("stride")
    if (not _is_int(blob) or not _is_int(stride) or blob <= 0 or stride < blob or stride % BLOB_ALIGN
            or stride >= 2**64):
        raise FormatError(f"{hpath}: experts blob_size {blob!r} / stride {stride!r} invalid "
                          f"(stride must be a multiple of {BLOB_ALIGN}, >= blob_size and < 2^64)")
    eshapes = _arch.expert_shapes(cfg)
    if sorted(ex["tensors"]) != sorted(EXPERT_NAMES):
        raise FormatError(f"{hpath}: experts.tensors must be exactly {EXPERT_NAMES}")
    sections, where = [], hpath + " experts"
    for name, shape in eshapes.items():
        sections += _check_entry(where, name, ex["tensors"][name], shape, _ALLOWED[_arch.QUANT], blob, 0, version)
    _check_overlaps(where, sections)
    want = _arch.moe_layers(arch, cfg)
    got = [e.get("layer") if isinstance(e, dict) and _is_int(e.get("layer")) else None for e in ex["layers"]]
    if got != want:
        raise FormatError(f"{hpath}: experts.layers lists layers {got}, the config has MoE layers {want}")
    n = cfg["num_experts"]
    for entry in ex["layers"]:
        layer = entry["layer"]
        if not _is_int(entry.get("num_experts")) or entry["num_experts"] != n:
            raise FormatError(f"{hpath}: layer {layer}: num_experts {entry.get('num_experts')!r}, config says {n}")
        size = PREAMBLE + n * stride
        if not _is_int(entry.get("size")) or entry["size"] != size:
            raise FormatError(f"{hpath}: layer {layer}: size {entry.get('size')!r}, {n} experts need {size}")
        sums = entry.get("checksums")
        if not isinstance(sums, list) or len(sums) != n or not all(_is_int(c) and 0 <= c < 2**32 for c in sums):
            raise FormatError(f"{hpath}: layer {layer}: checksums must be {n} CRC-32 values")
        epath = _check_file(root, entry.get("file"), size, f"experts of layer {layer}")
        _check_preamble(epath, KIND_EXPERTS, layer, n, size)
    return header


class PackedReader:
    """Reads tensors and experts of a packed model back as float32 (tests, debugging). Stored arrays come
    back as stored: scales and biases float16, or uint16 bfloat16 bits where scale_dtype is bfloat16."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.header = read_header(self.path)
        self.bits = self.header["quantization"]["bits"]
        self._layers = {e["layer"]: e for e in self.header["experts"]["layers"]}

    @staticmethod
    def _parts(buf: memoryview, t: dict, base: int) -> dict:
        """The stored arrays of one entry: {"data"} for f32/bf16 (bf16 as uint16), else {"q", "scales", "biases"}."""
        shape, dtype = tuple(t["shape"]), t["dtype"]
        raw = np.frombuffer(buf, np.uint8, t["nbytes"], t["offset"] - base)
        if dtype == "f32":
            return {"data": raw.view(np.float32).reshape(shape)}
        if dtype == "bf16":
            return {"data": raw.view(np.uint16).reshape(shape)}
        n = shape[0] * (shape[1] // t["group_size"])
        sdt = np.float16 if t.get("scale_dtype", "float16") == "float16" else np.uint16  # uint16: bf16 bits
        return {"q": raw.reshape(shape[0], -1),
                "scales": np.frombuffer(buf, sdt, n, t["scales_offset"] - base).reshape(shape[0], -1),
                "biases": np.frombuffer(buf, sdt, n, t["biases_offset"] - base).reshape(shape[0], -1)}

    def _decode(self, buf: memoryview, t: dict, base: int) -> np.ndarray:
        p = self._parts(buf, t, base)
        if t["dtype"] == "f32":
            return p["data"].copy()
        if t["dtype"] == "bf16":
            return quant.bf16_to_f32(p["data"])
        return quant.dequantize(p["q"], p["scales"], p["biases"], 4 if t["dtype"] == "q4" else 8,
                                t["group_size"], tuple(t["shape"]))

    def raw_tensor(self, name: str) -> tuple[dict, memoryview]:
        """A dense tensor's entry and its bytes from `offset` to the end of its last section."""
        t = self.header["dense"]["tensors"][name]
        end = t["offset"] + t["nbytes"]
        if "biases_offset" in t:
            end = t["biases_offset"] + t["shape"][0] * (t["shape"][1] // t["group_size"]) * 2
        with open(os.path.join(self.path, self.header["dense"]["file"]), "rb") as f:
            f.seek(t["offset"])
            buf = f.read(end - t["offset"])
        return t, memoryview(buf)

    def tensor_parts(self, name: str) -> dict:
        """A dense tensor's stored arrays (see _parts), for tests that check q, scales and biases."""
        t, buf = self.raw_tensor(name)
        return self._parts(buf, t, t["offset"])

    def tensor(self, name: str) -> np.ndarray:
        """A dense tensor, dequantized to float32."""
        if name not in self.header["dense"]["tensors"]:
            raise KeyError(name)
        t, buf = self.raw_tensor(name)
        return self._decode(buf, t, t["offset"])

    def blob(self, layer: int, e: int) -> bytes:
        entry = self._layers[layer]
        if not 0 <= e < entry["num_experts"]:
            raise IndexError(f"layer {layer}: expert {e} out of range")
        ex = self.header["experts"]
        with open(os.path.join(self.path, entry["file"]), "rb") as f:
            f.seek(PREAMBLE + e * ex["stride"])
            data = f.read(ex["blob_size"])
        if len(data) != ex["blob_size"]:
            raise FormatError(f"{entry['file']}: short read of layer {layer} expert {e}")
        return data

    def expert(self, layer: int, e: int):
        """(gate, up, down) of one expert, dequantized to float32."""
        buf = memoryview(self.blob(layer, e))
        ts = self.header["experts"]["tensors"]
        return tuple(self._decode(buf, ts[n], 0) for n in EXPERT_NAMES)

    def expert_parts(self, layer: int, e: int) -> tuple:
        """(gate, up, down) stored arrays of one expert (see _parts)."""
        buf = memoryview(self.blob(layer, e))
        ts = self.header["experts"]["tensors"]
        return tuple(self._parts(buf, ts[n], 0) for n in EXPERT_NAMES)

    def verify(self) -> None:
        """Check dense.bin's payload (if the header has its CRC-32) and every expert blob against their CRC-32."""
        dense = self.header["dense"]
        if "checksum" in dense:
            path, crc = os.path.join(self.path, dense["file"]), 0
            with open(path, "rb") as f:
                f.seek(PREAMBLE)
                while chunk := f.read(1 << 24):
                    crc = zlib.crc32(chunk, crc)
            if crc != dense["checksum"]:
                raise FormatError(f"{path}: checksum {crc:#010x}, header says {dense['checksum']:#010x} (corrupt)")
        for layer, entry in self._layers.items():
            for e, want in enumerate(entry["checksums"]):
                got = zlib.crc32(self.blob(layer, e))
                if got != want:
                    raise FormatError(f"{os.path.join(self.path, entry['file'])}: layer {layer} expert {e}: "
                                      f"checksum {got:#010x}, header says {want:#010x} (corrupt)")
