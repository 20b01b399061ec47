"""Random packed models of a real architecture, written straight through PackedWriter (no HF detour).

Weights are zero-mean with std ~ 1/sqrt(in_features) so activations stay O(1), and the router is
scaled so that expert choices vary token to token: good for demos, benchmarks and engine tests.

At 4 and 8 bits every quantized tensor (the routed experts, the embedding, lm_head, projections) is made
quantized: uniformly random levels (random bytes) with, per group, `bias = -scale * (2^bits - 1) / 2`, so
each weight is uniform on [-m, m] with zero mean and the std asked for. No float weights are drawn and
nothing is quantized, so a model of the real 35B shape is written at close to disk speed. The small
high-precision tensors (routers, norms, DeltaNet gates and conv) are drawn as floats.
"""

from __future__ import annotations

import concurrent.futures as cf
import math

import numpy as np

from . import arch as _arch
from . import presets, quant
from .format import EXPERT_NAMES, PackedWriter

DEMO_CONFIG = {
    "model_type": "qwen3_5_moe_text",
    "vocab_size": 8192,
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "layer_types": _arch.default_layer_types(8),
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    "linear_conv_kernel_dim": 4,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 256,
    "shared_expert_intermediate_size": 256,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
    "tie_word_embeddings": False,
}

# Router weights have std ROUTER_STD / sqrt(hidden): the router sees a unit-RMS normed hidden state, so
# its logits have std ~ROUTER_STD. At 1.5 the softmax has clear winners that change from token to token
# (a real router's top-k carries ~40-60% of the probability); far smaller and routing is nearly
# uniform noise, far larger and a few experts win for every token.
ROUTER_STD = 1.5
_MAX_IN_FLIGHT = 16  # expert blobs made but not yet written


def _weight_std(name: str, shape) -> float:
    """The std of a matrix: O(1) embeddings, 1/sqrt(in) for projections (activations stay O(1))."""
    if name == "embed_tokens.weight":
        return 1.0
    return (ROUTER_STD if name.endswith("mlp.gate.weight") else 1.0) / math.sqrt(shape[-1])


def _random_tensor(name: str, shape, role: str, rng: np.random.Generator) -> np.ndarray:
    def normal(std, mean=0.0):
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(std)
        if mean:
            a += np.float32(mean)
        return a

    if name.endswith("A_log"):
        return np.log(rng.uniform(1.0, 16.0, shape)).astype(np.float32)
    if name.endswith("dt_bias"):
        return normal(0.3)
    if name.endswith("conv1d.weight"):
        return normal(0.3)
    if name.endswith("linear_attn.norm.weight"):  # the gated norm multiplies by w itself
        return normal(0.1, 1.0)
    if name.endswith("norm.weight"):  # zero-centred norms: x * (1 + w)
        return normal(0.1)
    w = normal(_weight_std(name, shape))
    # High-precision matrices come from bf16 checkpoints in real models; mimic that.
    return quant.f32_to_bf16(w) if role == _arch.HP else w


# -- quantized data made directly ---------------------------------------------------------------------

def _random_bytes(bitgen: np.random.BitGenerator, n: int) -> np.ndarray:
    """n uniformly random bytes (SFC64 raw output: ~2 GB/s, 15x faster than Generator.integers)."""
    return bitgen.random_raw(-(-n // 8)).view(np.uint8)[:n]


def random_scales(shape, std: float, bits: int, group_size: int, rng: np.random.Generator):
    """float16 scales and biases [out, in/g] making uniform random levels into weights of mean 0, ~std.

    Levels uniform on 0..2^b-1 have std sqrt((4^b - 1)/12); each group's scale varies by ~10% around
    std / that, and its bias is -scale * (2^b - 1)/2, which centres the group on zero.
    """
    out, inf = shape
    maxq = (1 << bits) - 1
    base = std / math.sqrt(((maxq + 1) ** 2 - 1) / 12)
    scales = (base * np.exp(0.1 * rng.standard_normal((out, inf // group_size)))).astype(np.float16)
    biases = (scales.astype(np.float32) * np.float32(-maxq / 2)).astype(np.float16)
    return scales, biases


def _expert_template(writer: PackedWriter, rng: np.random.Generator):
    """One expert blob with the scales and biases filled in and zero q sections, and those sections'
    (offset, nbytes): every expert shares the scales and differs in its random levels."""
    blob = np.zeros(writer.blob_size, np.uint8)
    q_sections = []
    for name in EXPERT_NAMES:
        t = writer.expert_tensors[name]
        s, b = random_scales(t["shape"], 1 / math.sqrt(t["shape"][1]), writer.bits, t["group_size"], rng)
        for off, arr in ((t["scales_offset"], s), (t["biases_offset"], b)):
            blob[off:off + arr.nbytes] = arr.reshape(-1).view(np.uint8)
        q_sections.append((t["offset"], t["nbytes"]))
    return blob, q_sections


def _write_dense(writer: PackedWriter, specs: dict, seed: int, bar) -> None:
    for k, (name, (shape, role)) in enumerate(specs.items()):
        seq = np.random.SeedSequence([seed, 0, k])
        if role == _arch.QUANT and writer.bits != 16:
            rng = np.random.default_rng(seq)
            g = quant.pick_group_size(shape[1], writer.group_size, name)
            s, b = random_scales(shape, _weight_std(name, shape), writer.bits, g, rng)
            cols = quant.packed_cols(shape[1], writer.bits)
            q = _random_bytes(np.random.SFC64(seq.spawn(1)[0]), shape[0] * cols).reshape(shape[0], cols)
            writer.add_dense_quantized(name, shape, q, s, b)
            nbytes = q.nbytes + s.nbytes + b.nbytes
        else:
            a = _random_tensor(name, shape, role, np.random.default_rng(seq))
            writer.add_dense(name, a, quantize=role == _arch.QUANT)
            nbytes = a.nbytes
        bar.update(nbytes)


def _write_experts(writer: PackedWriter, moe_layers, n_experts: int, seed: int, bar) -> None:
    if writer.bits == 16:  # bf16 experts: no levels to draw; small models only (demo, tests)
        def make(layer, e):
            rng = np.random.default_rng([seed, 1, layer, e])
            return [rng.standard_normal(s, dtype=np.float32) * np.float32(1 / math.sqrt(s[1]))
                    for s in _arch.expert_shapes(writer.config).values()]

        def write(layer, e, parts):
            writer.add_expert(layer, e, *parts)
    else:
        template, q_sections = _expert_template(writer, np.random.default_rng([seed, 2]))

        def make(layer, e):
            bitgen = np.random.SFC64([seed, 1, layer, e])
            blob = template.copy()
            for off, n in q_sections:
                blob[off:off + n] = _random_bytes(bitgen, n)
            return blob

        def write(layer, e, blob):
            writer.add_expert_blob(layer, e, blob)

    # Draw in this thread, checksum and write in two others (zlib and pwrite release the GIL).
    with cf.ThreadPoolExecutor(2) as pool:
        pending = set()
        for layer in moe_layers:
            for e in range(n_experts):
                if len(pending) >= _MAX_IN_FLIGHT:
                    done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                    for f in done:
                        f.result()
                        bar.update(writer.blob_size)
                pending.add(pool.submit(write, layer, e, make(layer, e)))
        for f in cf.as_completed(pending):
            f.result()
            bar.update(writer.blob_size)


def write_random_model(out_dir, config: dict | None = None, architecture: str | None = None, bits: int = 4,
                       group_size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Write a random packed model of `config` (HF text-config fields; DEMO_CONFIG by default).

    The architecture family defaults to the one of the config's model_type. Deterministic for a given
    seed. Returns the header.
    """
    from tqdm.auto import tqdm

    config = dict(config or DEMO_CONFIG)
    architecture = architecture or presets.architecture_of(config)
    cfg = _arch.get_module(architecture).extract_config(config)
    specs = _arch.packed_dense_specs(architecture, cfg)
    moe = _arch.moe_layers(architecture, cfg)
    writer = PackedWriter(out_dir, architecture, cfg, bits, group_size)
    total = presets.model_bytes(cfg, bits, group_size)["total"]
    bar = tqdm(total=total, desc="synth", unit="B", unit_scale=True, disable=not progress)
    try:
        _write_dense(writer, specs, seed, bar)
        _write_experts(writer, moe, cfg["num_experts"], seed, bar)
        return writer.finish({"model_type": cfg.get("model_type", architecture), "dtype": "random",
                              "seed": seed})
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
