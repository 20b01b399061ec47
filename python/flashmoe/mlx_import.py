"""MLX checkpoint (mlx-lm's layout, affine 4/8-bit) -> packed flashmoe model, keeping MLX's values.

Nothing is re-quantized: MLX's affine quantization is the packed format's (w = scale * q + bias per group
along `in`; a uint32 word holds elements in order from its low bits, so its little-endian bytes are our q4
or q8 row bytes). Quantized tensors keep their bits, group size and scale dtype per tensor (mlx-lm keeps
the router and shared-expert gate at 8 bits inside 4-bit models); unquantized ones keep their values.

What mlx-lm's converter did to the Hugging Face weights is undone here (mlx_lm/models/qwen3_5.py,
qwen3_5_moe.py, qwen3_next.py, `sanitize`):
- names: Qwen3.5 under `language_model.model.*` and `language_model.lm_head`; Qwen3-Next under `model.*`;
- routed experts stacked per layer as `mlp.switch_mlp.{gate,up,down}_proj` [E, out, in];
- `conv1d.weight` as [C, K, 1];
- the zero-centred norms (input/post-attention layernorm, final norm, q_norm, k_norm) stored as `1 + w`,
  already rounded to the checkpoint's dtype: stored here as w = v - 1 in float32, which is exact (checked),
  so the engine's 1 + w gives back MLX's value v, not the unrounded original.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import os

import numpy as np

from . import arch as _arch
from . import quant
from .errors import ConversionError
from .format import EXPERT_NAMES, PackedWriter
from .safetensors_io import DTYPE_NAMES, Checkpoint

SKIP_PREFIXES = ("vision_tower.", "model.visual.", "mtp.", "model.mtp.", "language_model.model.mtp.")
# Norms mlx-lm stores as 1 + w (the HF model multiplies by 1 + w; MLX's RMSNorm by its weight).
ZERO_CENTRED = (".input_layernorm.weight", ".post_attention_layernorm.weight", ".q_norm.weight",
                ".k_norm.weight")
_FLOATS = ("BF16", "F16", "F32")


def is_mlx_checkpoint(raw_config: dict, names) -> bool:
    """mlx-lm writes a `quantization` section into config.json and stacks experts as switch_mlp."""
    return isinstance(raw_config.get("quantization"), dict) or any(".switch_mlp." in n for n in names)


class _Source:
    """One MLX tensor (`base`.weight, with .scales/.biases when quantized) and how it is stored.

    Shapes are the packed [out, in]; experts add a leading E that each read indexes."""

    def __init__(self, base: str, weight: str, quantized: bool, bits=None, group_size=None, float_dtype=None,
                 scale_dtype=None):
        self.base, self.weight, self.quantized = base, weight, quantized
        self.bits, self.group_size, self.float_dtype, self.scale_dtype = bits, group_size, float_dtype, scale_dtype

    @property
    def stored_dtype(self) -> str:
        if self.quantized:
            return f"q{self.bits}"
        return "bf16" if self.float_dtype == "BF16" else "f32"  # float16 widens exactly to float32

    def format(self) -> tuple:
        """(dtype, group_size, scale_dtype) as PackedWriter's expert_formats takes it."""
        return self.stored_dtype, self.group_size, _stored_scale_dtype(self.scale_dtype)

    def describe(self) -> str:
        if self.quantized:
            return f"{self.bits}-bit, groups of {self.group_size}, {DTYPE_NAMES[self.scale_dtype]} scales"
        return DTYPE_NAMES[self.float_dtype]


def _stored_scale_dtype(src_dtype):
    """Scales are kept in the checkpoint's own 16-bit type, never converted (bench/RESULTS.md: bf16 scales
    cost the kernels nothing); a dense tensor's float32 ones are narrowed where every value survives
    (_scales), routed experts' are refused (_Plan: one layout for every expert must be fixed up front)."""
    return {"BF16": "bfloat16", "F16": "float16", None: "float16"}[src_dtype]


class _Plan:
    """Every packed tensor's MLX source, checked against the config before anything is written."""

    def __init__(self, ckpt: Checkpoint, mod, cfg: dict, raw: dict, src: str):
        self.ckpt, self.cfg, self.mod, self.src = ckpt, cfg, mod, src
        names = [n for n in ckpt.names() if not n.startswith(SKIP_PREFIXES)]
        if any(n.startswith("language_model.model.") for n in names):
            self.prefix, self.head = "language_model.model.", "language_model."
        else:
            self.prefix, self.head = "model.", ""
        q = raw.get("quantization") or {}
        if not isinstance(q, dict):
            raise ConversionError(f"{src}/config.json: quantization is not an object")
        self.qdefault = {k: q[k] for k in ("bits", "group_size", "mode") if k in q}
        self.qoverride = {k: v for k, v in q.items() if k not in ("bits", "group_size", "mode")}
        self.used: set[str] = set()

        self.dense = []  # (packed name, packed shape, _Source, kind: how to undo mlx-lm, role)
        specs = _arch.packed_dense_specs(mod.ARCHITECTURE, cfg)
        h = cfg["hidden_size"]
        hk, hv, dk, dv = _arch.linear_attn_dims(cfg)
        for name, (shape, role) in specs.items():
            if mod.ARCHITECTURE == "qwen3_next" and name.endswith(("in_proj_qkv.weight", "in_proj_z.weight")):
                fused = name.rsplit(".", 2)[0] + ".in_proj_qkvz"
                src_t = self._tensor(fused, (2 * hk * dk + 2 * hv * dv, h))
                self.dense.append((name, shape, src_t, ("qkvz", 0 if "in_proj_qkv." in name else 1), role))
            elif mod.ARCHITECTURE == "qwen3_next" and name.endswith(("in_proj_b.weight", "in_proj_a.weight")):
                fused = name.rsplit(".", 2)[0] + ".in_proj_ba"
                src_t = self._tensor(fused, (2 * hv, h))
                self.dense.append((name, shape, src_t, ("ba", 0 if "in_proj_b." in name else 1), role))
            elif name.endswith("conv1d.weight"):
                src_t = self._tensor(name[:-len(".weight")], (shape[0], shape[1], 1))
                self.dense.append((name, shape, src_t, ("conv1d",), role))
            else:
                kind = ("zero_centred",) if (name.endswith(ZERO_CENTRED) or name == "norm.weight") else ("plain",)
                base, suffix = (name[:-len(".weight")], ".weight") if name.endswith(".weight") else (name, "")
                self.dense.append((name, shape, self._tensor(base, shape, suffix), kind, role))
        if cfg.get("tie_word_embeddings"):  # mlx-lm drops a tied copy; accept one if present
            self.used |= {self.head + "lm_head." + s for s in ("weight", "scales", "biases")}

        # experts[layer][projection] = _Source over [E, out, in]; one layout for every layer
        self.experts = {}
        eshapes = _arch.expert_shapes(cfg)
        for layer in _arch.moe_layers(mod.ARCHITECTURE, cfg):
            self.experts[layer] = {
                p: self._tensor(f"layers.{layer}.mlp.switch_mlp.{p}", (cfg["num_experts"],) + eshapes[p])
                for p in EXPERT_NAMES}
        self.expert_formats = {}
        for layer, srcs in self.experts.items():
            for p, s in srcs.items():
                if s.quantized and s.scale_dtype == "F32":
                    raise ConversionError(
                        f"{src}: {s.base} has float32 scales (an MLX model quantized in float32), which no 16-bit "
                        "type holds in general; convert the MLX model with --dtype bfloat16 or float16")
                first = self.expert_formats.setdefault(p, (s.format(), s))
                if first[0] != s.format():
                    raise ConversionError(
                        f"{src}: {s.base} is {s.describe()} where {first[1].base} is {first[1].describe()}: "
                        "routed experts must have one encoding in every layer")
        self.expert_formats = {p: v[0] for p, v in self.expert_formats.items()}

        extra = sorted(set(names) - self.used)
        if extra:
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            raise ConversionError(f"{src}: unexpected tensors {', '.join(extra[:5])}{more} "
                                  f"(not part of an MLX {mod.ARCHITECTURE} model with this config)")

    def full(self, base: str) -> str:
        return self.head + base if base.startswith("lm_head") else self.prefix + base

    def _tensor(self, base: str, shape, suffix: str = ".weight") -> _Source:
        """Check one MLX tensor (weight, and scales/biases when quantized) against its expected shape."""
        ckpt, full = self.ckpt, self.full(base)
        w = full + suffix
        if w not in ckpt:
            raise ConversionError(f"{self.src}: tensor {w} missing from the checkpoint")
        self.used.add(w)
        where = ckpt.where[w].path
        override = self.qoverride.get(full, None)
        if (full + ".scales") not in ckpt:
            if ckpt.dtype(w) not in _FLOATS:
                raise ConversionError(f"{where}: tensor {w} has dtype {ckpt.dtype(w)} and no scales: "
                                      f"not a float tensor, nor one MLX quantized (supported: {', '.join(_FLOATS)})")
            if tuple(ckpt.shape(w)) != tuple(shape):
                raise ConversionError(f"{where}: tensor {w} has shape {list(ckpt.shape(w))}, the config implies "
                                      f"{list(shape)}")
            return _Source(full, w, False, float_dtype=ckpt.dtype(w))
        # Quantized: the config's parameters for this module (its own entry, else the defaults).
        params = dict(self.qdefault)
        if isinstance(override, dict):
            params.update(override)
        mode, bits, g = params.get("mode", "affine"), params.get("bits"), params.get("group_size")
        self.used.add(full + ".scales")
        if mode != "affine":
            raise ConversionError(
                f"{where}: tensor {w} is quantized in MLX mode {mode!r}; only 'affine' (scale and bias per group) "
                "has an exact packed form")
        if full + ".biases" not in ckpt:
            raise ConversionError(f"{where}: tensor {w} has scales but no biases (not MLX affine quantization)")
        self.used.add(full + ".biases")
        if bits not in (4, 8):
            raise ConversionError(
                f"{where}: tensor {w} is {bits}-bit; the packed format stores 4- and 8-bit groups only, so it "
                "cannot be imported without re-quantizing (which this importer never does)")
        *lead, out, inf = shape
        if not isinstance(g, int) or g < quant.MIN_GROUP_SIZE or inf % g or (bits == 4 and g % 2):
            raise ConversionError(f"{where}: tensor {w}: group size {g!r} does not divide its {inf} inputs")
        want = {w: ("U32", (*lead, out, inf * bits // 32))}
        sdt = ckpt.dtype(full + ".scales")
        for part in (".scales", ".biases"):
            want[full + part] = (sdt, (*lead, out, inf // g))
        if sdt not in _FLOATS:
            raise ConversionError(f"{where}: tensor {full}.scales has dtype {sdt} (expected one of {_FLOATS})")
        for n, (dt, shp) in want.items():
            if ckpt.dtype(n) != dt or tuple(ckpt.shape(n)) != tuple(shp):
                raise ConversionError(
                    f"{ckpt.where[n].path}: tensor {n} is {ckpt.dtype(n)} {list(ckpt.shape(n))}; {bits}-bit groups "
                    f"of {g} (config.json's quantization) of a {list(shape)} tensor need {dt} {list(shp)}")
        return _Source(full, w, True, bits=bits, group_size=g, scale_dtype=sdt)

    def read(self, s: _Source, index: int | None = None) -> dict:
        """The stored arrays of one tensor (or expert `index` of a stacked one): {"data"} or {"q", "scales",
        "biases"}, the way PackedWriter.add_dense_stored takes them."""
        ckpt = self.ckpt
        if not s.quantized:
            w = ckpt.get(s.weight, index)
            return {"data": np.asarray(w) if s.float_dtype == "BF16" else quant.to_f32(w)}
        words = np.asarray(ckpt.get(s.weight, index))
        q = words.astype("<u4", copy=False).view(np.uint8).reshape(words.shape[0], -1)
        scales, biases = (_scales(s.base + part, ckpt.get(s.base + part, index), ckpt.dtype(s.base + part))
                          for part in (".scales", ".biases"))
        return {"q": q, "scales": scales, "biases": biases}


def _scales(name: str, a, src_dtype: str) -> np.ndarray:
    """MLX scales or biases as stored: bf16 bits or float16 as they are; float32 narrowed to float16 or
    bfloat16 only where that is exact for every value (else the tensor cannot be imported exactly)."""
    a = np.asarray(a)
    if src_dtype in ("BF16", "F16"):
        return a
    with np.errstate(over="ignore"):
        for narrow in (lambda x: x.astype(np.float16), quant.f32_to_bf16):
            n = narrow(a)
            if np.array_equal(quant.to_f32(n), a):
                return n
    raise ConversionError(f"tensor {name}: float32 values that neither float16 nor bfloat16 holds exactly")


def _dense_arrays(plan: _Plan, s: _Source, kind: tuple, role: str):
    """(dtype, arrays) of one packed dense tensor, MLX's transformations undone."""
    cfg = plan.cfg
    parts = plan.read(s)
    if kind[0] in ("qkvz", "ba"):
        from .arch import qwen3_next

        split = qwen3_next.split_qkvz if kind[0] == "qkvz" else qwen3_next.split_ba
        parts = {k: np.ascontiguousarray(split(v, cfg)[kind[1]]) for k, v in parts.items()}
    if role == _arch.F32 or s.float_dtype == "F16":
        if s.quantized:  # a quantized conv1d would be odd; its exact value is the dequantized float32
            shape = (parts["q"].shape[0], parts["scales"].shape[1] * s.group_size)
            parts = {"data": quant.dequantize(parts["q"], parts["scales"], parts["biases"], s.bits,
                                              s.group_size, shape)}
        parts = {"data": quant.to_f32(parts["data"])}
        if kind[0] == "conv1d":
            parts["data"] = parts["data"].reshape(parts["data"].shape[0], -1)
        if kind[0] == "zero_centred":
            v = parts["data"]
            w = v - np.float32(1)
            if not np.array_equal(w + np.float32(1), v):
                bad = int(np.flatnonzero(w + np.float32(1) != v)[0])
                raise ConversionError(f"tensor {s.weight}: element {bad} = {v.flat[bad]!r} is not 1 + w for "
                                      "any float32 w (a zero-centred norm weight the engine cannot reproduce)")
            parts["data"] = w
        return "f32", parts
    if s.quantized:
        sd = "bfloat16" if parts["scales"].dtype == np.uint16 else "float16"
        return f"q{s.bits}", dict(parts, group_size=s.group_size, scale_dtype=sd)
    return s.stored_dtype, parts


def import_mlx(src: str, dst: str, mod, cfg: dict, raw: dict, model_type, bits=None, group_size=None,
               progress: bool = True, workers: int | None = None, prepare_dst=None) -> dict:
    """Write the packed model of the MLX checkpoint at `src` (convert.convert dispatches here)."""
    from tqdm.auto import tqdm

    from .convert import run_bounded

    plan = _Plan(Checkpoint(src), mod, cfg, raw, src)
    gate = plan.experts[min(plan.experts)]["gate_proj"] if plan.experts else None
    src_bits = gate.bits if gate is not None and gate.quantized else 16
    if bits is not None and bits != src_bits:
        raise ConversionError(f"{src}: an MLX checkpoint keeps its own quantization (its routed experts are "
                              f"{src_bits}-bit); --bits {bits} disagrees (leave it out)")
    if group_size is not None and gate is not None and gate.quantized and group_size != gate.group_size:
        raise ConversionError(f"{src}: an MLX checkpoint keeps its own quantization (groups of "
                              f"{gate.group_size}); --group-size {group_size} disagrees (leave it out)")
    prepare_dst(dst)
    ckpt = plan.ckpt
    total = sum(ckpt.nbytes(n) for n in plan.used if n in ckpt)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="import", disable=not progress)
    g = gate.group_size if gate is not None and gate.quantized else 64
    writer = PackedWriter(dst, mod.ARCHITECTURE, cfg, src_bits if src_bits in (4, 8) else 16, g,
                          expert_formats=plan.expert_formats)
    try:
        for name, shape, s, kind, role in plan.dense:
            dtype, parts = _dense_arrays(plan, s, kind, role)
            writer.add_dense_stored(name, shape, dtype, **parts)
            bar.update(sum(ckpt.nbytes(n) for n in _names_of(plan, s)) // (2 if kind[0] in ("qkvz", "ba") else 1))
        workers = workers or min(8, os.cpu_count() or 1)
        with cf.ThreadPoolExecutor(workers) as pool:
            for layer, srcs in plan.experts.items():
                per_expert = sum(ckpt.nbytes(n) for s in srcs.values() for n in _names_of(plan, s)) // cfg["num_experts"]

                def job(e, srcs=srcs, layer=layer, per_expert=per_expert):
                    writer.add_expert_stored(layer, e, {p: plan.read(s, e) for p, s in srcs.items()})
                    return per_expert
                run_bounded(pool, workers, cfg["num_experts"], job, bar)
        qinfo = {"bits": src_bits, "mode": "affine" if src_bits != 16 else "none",
                 "scale_dtype": plan.expert_formats["gate_proj"][2] if src_bits != 16 else "float16"}
        if src_bits != 16:
            qinfo["group_size"] = g
        q = raw.get("quantization") if isinstance(raw.get("quantization"), dict) else {}
        source = {"format": "mlx", "model_type": model_type, "dtype": _main_dtype(plan),
                  "mlx_quantization": {k: q[k] for k in ("bits", "group_size", "mode") if k in q}}
        header = writer.finish(source, quantization=qinfo)
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
    return header


def _names_of(plan: _Plan, s: _Source) -> list:
    return [s.weight, s.base + ".scales", s.base + ".biases"] if s.quantized else [s.weight]


def _main_dtype(plan: _Plan) -> str:
    counts = collections.Counter(plan.ckpt.dtype(n) for n in plan.used if n in plan.ckpt
                                 and plan.ckpt.dtype(n) in _FLOATS)
    return DTYPE_NAMES[counts.most_common(1)[0][0]] if counts else "unknown"
