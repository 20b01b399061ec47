"""Hugging Face checkpoint -> packed flashmoe model (docs/FORMAT.md); MLX checkpoints go to mlx_import.py.

Streams: tensors are memory-mapped from the safetensors shards and written as they are converted, so
memory stays bounded however large the checkpoint. Every tensor is checked against the shape the
config implies before anything is written.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import glob
import json
import os
import shutil

from . import arch as _arch
from .errors import ConversionError
from .format import HEADER_NAME, PackedWriter
from .mlx_import import import_mlx, is_mlx_checkpoint
from .safetensors_io import DTYPE_NAMES, Checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
SKIP_PREFIXES = ("model.visual.", "visual.", "mtp.", "model.mtp.", "model.language_model.mtp.")
_MODULES = ("qwen3_5_moe", "qwen3_next")


def _module_for(model_type):
    for arch in _MODULES:
        mod = _arch.get_module(arch)
        if model_type in mod.MODEL_TYPES:
            return mod
    supported = [t for a in _MODULES for t in _arch.get_module(a).MODEL_TYPES]
    raise ConversionError(f"unknown model_type {model_type!r}, supported: {', '.join(supported)}")


def load_source_config(src: str, with_raw: bool = False):
    """(architecture module, normalised text config, raw model_type) of a checkpoint directory (and the raw
    config.json when with_raw)."""
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: missing (not a Hugging Face checkpoint directory?)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as exc:
        raise ConversionError(f"{path}: not valid JSON ({exc})") from None
    mod = _module_for(raw.get("model_type"))
    try:
        cfg = mod.extract_config(raw)
    except ConversionError as exc:
        raise ConversionError(f"{path}: {exc}") from None
    if with_raw:
        return mod, cfg, raw.get("model_type"), raw
    return mod, cfg, raw.get("model_type")


def _strip_names(ckpt: Checkpoint) -> tuple[dict, str]:
    """Checkpoint names without their prefix -> full names, skipping vision and MTP tensors."""
    prefix = "model.language_model." if any(n.startswith("model.language_model.") for n in ckpt.names()) \
        else "model."
    out = {}
    for n in ckpt.names():
        if n.startswith(SKIP_PREFIXES):
            continue
        out[n[len(prefix):] if n.startswith(prefix) else n] = n
    return out, prefix


class _Plan:
    """Which checkpoint tensors feed which packed tensors; shapes checked against the config."""

    def __init__(self, ckpt: Checkpoint, mod, cfg: dict, src: str):
        self.ckpt, self.cfg = ckpt, cfg
        names, self.prefix = _strip_names(ckpt)
        used = set()

        def need(short: str, shape) -> str:
            full = names.get(short)
            if full is None:
                shown = short if short == "lm_head.weight" else self.prefix + short
                raise ConversionError(f"{src}: tensor {shown} missing from the checkpoint")
            got = tuple(ckpt.shape(full))
            if got != tuple(shape):
                raise ConversionError(f"{ckpt.where[full].path}: tensor {full} has shape {list(got)}, "
                                      f"the config implies {list(shape)}")
            used.add(short)
            return full

        # dense[layer or None] = [checkpoint name, ...]
        self.dense = collections.defaultdict(list)
        for short, shape in mod.source_specs(cfg).items():
            layer = int(short.split(".")[1]) if short.startswith("layers.") else None
            self.dense[layer].append((short, need(short, shape)))
        # experts[layer] = ("fused", gate_up, down) or ("split", [(gate, up, down)] * E)
        self.experts = {}
        e_n, h, i = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
        for layer in _arch.moe_layers(mod.ARCHITECTURE, cfg):
            p = f"layers.{layer}.mlp.experts."
            if p + "gate_up_proj" in names:
                self.experts[layer] = ("fused", need(p + "gate_up_proj", (e_n, 2 * i, h)),
                                       need(p + "down_proj", (e_n, h, i)))
            else:
                self.experts[layer] = ("split", [
                    (need(f"{p}{e}.gate_proj.weight", (i, h)), need(f"{p}{e}.up_proj.weight", (i, h)),
                     need(f"{p}{e}.down_proj.weight", (h, i))) for e in range(e_n)])
        if cfg.get("tie_word_embeddings"):
            used.add("lm_head.weight")  # some tied checkpoints still carry a copy
        extra = sorted(set(names) - used)
        if extra:
            more = f" and {len(extra) - 5} more" if len(extra) > 5 else ""
            raise ConversionError(f"{src}: unexpected tensors {', '.join(names[n] for n in extra[:5])}{more} "
                                  f"(not part of a {mod.ARCHITECTURE} model with this config)")
        full_names = [n for lst in self.dense.values() for _, n in lst]
        for kind, *rest in self.experts.values():
            full_names += rest if kind == "fused" else [n for trio in rest[0] for n in trio]
        self.total_bytes = sum(ckpt.nbytes(n) for n in full_names)
        counts = collections.Counter(ckpt.dtype(n) for n in full_names)
        self.dtype = DTYPE_NAMES.get(counts.most_common(1)[0][0], "unknown") if counts else "unknown"
        for n in full_names:  # fail before writing anything
            if ckpt.dtype(n) not in DTYPE_NAMES:
                raise ConversionError(f"{ckpt.where[n].path}: tensor {n} has unsupported dtype {ckpt.dtype(n)} "
                                      f"(supported: BF16, F16, F32)")


def _prepare_dst(dst: str, overwrite: bool) -> None:
    if os.path.exists(os.path.join(dst, HEADER_NAME)):
        if not overwrite:
            raise ConversionError(f"{dst}: already holds a packed model (pass overwrite=True to replace it)")
        os.remove(os.path.join(dst, HEADER_NAME))
        for old in glob.glob(os.path.join(dst, "experts", "L*.bin")):
            os.remove(old)
    os.makedirs(dst, exist_ok=True)


def convert(src, dst, bits: int | None = None, group_size: int | None = None, progress: bool = True,
            overwrite: bool = False, workers: int | None = None) -> dict:
    """Convert the checkpoint directory `src` into a packed model at `dst`. Returns the header.

    A Hugging Face checkpoint is quantized: bits 4 (the default) or 8 (group-wise affine, groups of
    group_size, default 64) or 16 (bf16, lossless from bf16 sources). An MLX checkpoint (mlx-lm's
    layout) keeps its own quantization, never re-quantized: bits or group_size that disagree with it are
    an error (mlx_import.py).
    """
    from tqdm.auto import tqdm

    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: not a directory")
    if bits is not None and bits not in (4, 8, 16):
        raise ConversionError(f"bits must be 4, 8 or 16, got {bits}")
    if group_size is not None and (group_size < 16 or group_size & (group_size - 1)):
        raise ConversionError(f"group_size must be a power of two >= 16, got {group_size}")
    mod, cfg, model_type, raw = load_source_config(src, with_raw=True)
    ckpt = Checkpoint(src)
    if is_mlx_checkpoint(raw, ckpt.names()):
        header = import_mlx(src, dst, mod, cfg, raw, model_type, bits, group_size, progress, workers,
                            prepare_dst=lambda d: _prepare_dst(d, overwrite))
        _copy_tokenizer(src, dst)
        return header
    bits = 4 if bits is None else bits
    group_size = 64 if group_size is None else group_size
    plan = _Plan(ckpt, mod, cfg, src)
    _prepare_dst(dst, overwrite)
    ckpt = plan.ckpt
    workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress)
    writer = PackedWriter(dst, mod.ARCHITECTURE, cfg, bits, group_size)
    specs = _arch.packed_dense_specs(mod.ARCHITECTURE, cfg)
    try:
        with cf.ThreadPoolExecutor(workers) as pool:
            for layer in [None] + list(range(cfg["num_hidden_layers"])):
                for short, full in plan.dense.get(layer, []):
                    src_arr = ckpt.get(full)
                    for name, arr in mod.to_packed(short, src_arr, cfg):
                        writer.add_dense(name, arr, quantize=specs[name][1] == _arch.QUANT)
                    bar.update(ckpt.nbytes(full))
                    del src_arr
                if layer in plan.experts:
                    _convert_experts(writer, pool, workers, ckpt, layer, plan.experts[layer], bar)
        header = writer.finish({"format": "hf", "model_type": model_type, "dtype": plan.dtype})
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
    _copy_tokenizer(src, dst)
    return header


def _copy_tokenizer(src: str, dst: str) -> None:
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def _convert_experts(writer, pool, workers, ckpt, layer, how, bar) -> None:
    """Submit one layer's experts to the pool, a bounded number in flight."""
    kind = how[0]
    if kind == "fused":
        count, inter = ckpt.shape(how[1])[0], ckpt.shape(how[1])[1] // 2
        per_expert = (ckpt.nbytes(how[1]) + ckpt.nbytes(how[2])) // count

        def job(e):
            gate_up = ckpt.get(how[1], e)
            writer.add_expert(layer, e, gate_up[:inter], gate_up[inter:], ckpt.get(how[2], e))
            return per_expert
    else:
        trios = how[1]

        def job(e):
            g, u, d = (ckpt.get(n) for n in trios[e])
            writer.add_expert(layer, e, g, u, d)
            return sum(ckpt.nbytes(n) for n in trios[e])
        count = len(trios)
    run_bounded(pool, workers, count, job, bar)


def run_bounded(pool, workers: int, count: int, job, bar) -> None:
    """job(0..count-1) on the pool, at most 2 * workers in flight; each returns bytes for the progress bar."""
    pending = set()
    try:
        for e in range(count):
            pending.add(pool.submit(job, e))
            if len(pending) >= 2 * workers:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    bar.update(f.result())
        for f in cf.as_completed(pending):
            bar.update(f.result())
    except BaseException:
        for f in pending:
            f.cancel()
        raise
