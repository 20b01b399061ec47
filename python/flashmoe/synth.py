"""Random packed models of a real architecture, written straight through PackedWriter (no HF detour).

Weights are zero-mean with std ~ 1/sqrt(in_features) so activations stay O(1), and the router is
scaled so that expert choices vary token to token: good for demos, benchmarks and engine tests.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os

import numpy as np

from . import arch as _arch
from . import quant
from .format import PackedWriter

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
    if name == "embed_tokens.weight":
        return normal(1.0)
    # Router logits of std ~1.5 so routing varies by token; other matrices keep activations O(1).
    w = normal((1.5 if name.endswith("mlp.gate.weight") else 1.0) / math.sqrt(shape[-1]))
    # High-precision matrices come from bf16 checkpoints in real models; mimic that.
    return quant.f32_to_bf16(w) if role == _arch.HP else w


def write_random_model(out_dir, config: dict | None = None, architecture: str = "qwen3_5_moe", bits: int = 4,
                       group_size: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Write a random packed model of `config` (HF text-config fields; DEMO_CONFIG by default).

    Deterministic for a given seed. Returns the header.
    """
    from tqdm.auto import tqdm

    cfg = _arch.get_module(architecture).extract_config(dict(config or DEMO_CONFIG))
    specs = _arch.packed_dense_specs(architecture, cfg)
    moe = _arch.moe_layers(architecture, cfg)
    shapes = _arch.expert_shapes(cfg)
    n_exp = cfg["num_experts"]
    writer = PackedWriter(out_dir, architecture, cfg, bits, group_size)
    bar = tqdm(total=len(specs) + len(moe) * n_exp, desc="synth", disable=not progress)
    try:
        for k, (name, (shape, role)) in enumerate(specs.items()):
            rng = np.random.default_rng([seed, 0, k])
            writer.add_dense(name, _random_tensor(name, shape, role, rng), quantize=role == _arch.QUANT)
            bar.update(1)

        def expert(layer, e):
            rng = np.random.default_rng([seed, 1, layer, e])
            g, u, d = (rng.standard_normal(s, dtype=np.float32) * np.float32(1 / math.sqrt(s[1]))
                       for s in shapes.values())
            writer.add_expert(layer, e, g, u, d)

        with cf.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            futures = [pool.submit(expert, layer, e) for layer in moe for e in range(n_exp)]
            for f in cf.as_completed(futures):
                f.result()
                bar.update(1)
        return writer.finish({"model_type": cfg.get("model_type", architecture), "dtype": "random",
                              "seed": seed})
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
