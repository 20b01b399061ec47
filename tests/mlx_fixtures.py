"""Tiny MLX checkpoints made by mlx-lm itself, and the float32 references they imply.

make_mlx_checkpoint: a tiny transformers model (hf_fixtures.make_hf_model), saved the way the real
checkpoints are (Qwen3.5 as the multimodal wrapper with fused experts; Qwen3-Next with per-expert weights
and rope_theta at the top level), then converted by `mlx_lm.convert` with quantization.

reference_state_dict: the MLX checkpoint's weights as transformers takes them: every quantized tensor
dequantized by mx.dequantize in float32 (scales and biases widened first, so w = scale * q + bias with one
rounding), and mlx-lm's sanitize undone (names, switch_mlp stacks, conv1d axes, norms stored as 1 + w).
Needs torch, transformers, mlx and mlx-lm; callers importorskip them first.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import torch

from hf_fixtures import make_hf_model, save_checkpoint

ZERO_CENTRED = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                ".q_norm.weight", ".k_norm.weight")
# Every matrix quantizable at groups of 32: the hidden and every projection's input a multiple of 32.
QUANTIZABLE = dict(moe_intermediate_size=64, shared_expert_intermediate_size=96, linear_value_head_dim=24)
QUANTIZABLE_NEXT = dict(QUANTIZABLE, intermediate_size=128)


def make_mlx_checkpoint(out_dir, arch: str, bits: int, group_size: int = 64, seed: int = 0, quant_predicate=None,
                        **overrides):
    """(mlx checkpoint directory, the transformers model it came from). quant_predicate: mlx-lm's
    (path, module) -> False | {"bits", "group_size"}, to quantize only some modules."""
    from mlx_lm.convert import convert

    out_dir = os.fspath(out_dir)
    model = make_hf_model(arch, seed=seed, **overrides)
    hf_dir = save_checkpoint(model, os.path.join(out_dir, "hf"), layout="fused" if arch == "qwen3_5_moe" else "per_expert",
                             multimodal=arch == "qwen3_5_moe")
    if arch == "qwen3_next":  # as Qwen3-Next-80B's config.json has them (mlx-lm's ModelArgs requires them)
        path = os.path.join(hf_dir, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
        cfg["partial_rotary_factor"] = cfg["rope_parameters"]["partial_rotary_factor"]
        with open(path, "w") as f:
            json.dump(cfg, f)
    mlx_dir = os.path.join(out_dir, "mlx")
    convert(hf_dir, mlx_path=mlx_dir, quantize=True, q_bits=bits, q_group_size=group_size, dtype="bfloat16",
            quant_predicate=quant_predicate)
    return mlx_dir, model


def mlx_weights(mlx_dir) -> dict:
    import mlx.core as mx

    out = {}
    for f in sorted(glob.glob(os.path.join(mlx_dir, "*.safetensors"))):
        out.update(mx.load(f))
    return out


def quant_params(config: dict, base: str) -> dict:
    q = config["quantization"]
    p = {"group_size": q["group_size"], "bits": q["bits"]}
    if isinstance(q.get(base), dict):
        p.update(q[base])
    return p


def reference_state_dict(mlx_dir, arch: str) -> dict:
    """HF parameter name -> float32 torch tensor, from the MLX checkpoint alone."""
    import mlx.core as mx

    with open(os.path.join(mlx_dir, "config.json")) as f:
        config = json.load(f)
    weights = mlx_weights(mlx_dir)
    floats = {}
    for name, w in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")]
        if base + ".scales" in weights:
            p = quant_params(config, base)
            w = mx.dequantize(w, weights[base + ".scales"].astype(mx.float32),
                              weights[base + ".biases"].astype(mx.float32), group_size=p["group_size"], bits=p["bits"])
        floats[name] = np.array(w.astype(mx.float32))
    sd, experts = {}, {}
    for name, v in floats.items():
        if arch == "qwen3_5_moe":
            name = name.replace("language_model.model.", "model.").replace("language_model.lm_head.", "lm_head.")
        if name.endswith("conv1d.weight"):
            v = v.transpose(0, 2, 1)  # [C, K, 1] -> nn.Conv1d's [C, 1, K]
        if name.endswith(ZERO_CENTRED):
            v = v - np.float32(1)  # mlx-lm stored 1 + w
        if ".switch_mlp." in name:
            layer_mlp, proj = name.split(".switch_mlp.")
            experts.setdefault(layer_mlp, {})[proj.split(".")[0]] = v
            continue
        sd[name] = v
    for layer_mlp, p in experts.items():  # transformers' fused expert parameters
        sd[layer_mlp + ".experts.gate_up_proj"] = np.concatenate([p["gate_proj"], p["up_proj"]], axis=1)
        sd[layer_mlp + ".experts.down_proj"] = p["down_proj"]
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def reference_model(mlx_dir, arch: str, template):
    """A copy of `template` (the transformers model of the same config) carrying the MLX weights."""
    import copy

    model = copy.deepcopy(template)
    missing, unexpected = model.load_state_dict(reference_state_dict(mlx_dir, arch), strict=False)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    return model


def mlx_lm_logits(mlx_dir, ids) -> np.ndarray:
    """mlx-lm's own logits [T, vocab], its model cast to float32 (exact from bf16) so it computes in fp32."""
    from pathlib import Path

    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(mlx_dir))
    model.set_dtype(mx.float32)
    out = model(mx.array(np.asarray(ids, np.int32))[None])
    return np.array(out[0].astype(mx.float32))


def write_synthetic_mlx(out_dir, cfg: dict, bits: int = 4, group_size: int = 64, seed: int = 0) -> dict:
    """A Qwen3.5-MoE checkpoint in mlx-lm's layout and naming with random stored values (random uint32 words,
    random bf16 scales and biases, some of them ones float16 cannot hold), written with MLX's own
    safetensors writer. Quantized as mlx-lm does: every matrix whose input width the group size divides,
    the router and shared-expert gate at 8 bits. Returns {name: numpy array as stored (bf16 as uint16)}."""
    import mlx.core as mx
    from flashmoe import arch as _arch
    from flashmoe.quant import f32_to_bf16

    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)

    def bf16(shape, std, mean=0.0):
        return f32_to_bf16(rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean))

    def quantized(shape, b, g):
        *lead, out, inf = shape
        scales = bf16((*lead, out, inf // g), 0.002)
        scales.reshape(-1)[::97] = f32_to_bf16(np.float32(-1e-7))  # what MLX stores for a constant group
        return {".weight": rng.integers(0, 2**32, (*lead, out, inf * b // 32), dtype=np.uint32),
                ".scales": scales, ".biases": bf16(scales.shape, 0.02)}

    stored, overrides = {}, {}
    for name, (shape, role) in _arch.packed_dense_specs("qwen3_5_moe", cfg).items():
        full = ("language_model." if name.startswith("lm_head") else "language_model.model.") + name
        base = full[: -len(".weight")] if full.endswith(".weight") else full
        if role == _arch.F32:
            if name.endswith("conv1d.weight"):
                stored[full] = bf16((shape[0], shape[1], 1), 0.3)
            else:  # norms as mlx-lm stores them (1 + w), A_log, dt_bias
                stored[full] = bf16(shape, 0.1, 1.0)
        elif shape[1] % group_size:
            stored[full] = bf16(shape, 0.02)
        else:
            b = 8 if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) else bits
            if b != bits:
                overrides[base] = {"group_size": group_size, "bits": b}
            stored.update({base + k: v for k, v in quantized(shape, b, group_size).items()})
    for layer in _arch.moe_layers("qwen3_5_moe", cfg):
        for proj, shape in _arch.expert_shapes(cfg).items():
            base = f"language_model.model.layers.{layer}.mlp.switch_mlp.{proj}"
            stored.update({base + k: v for k, v in quantized((cfg["num_experts"],) + tuple(shape), bits,
                                                                 group_size).items()})
    arrays = {k: mx.array(v).view(mx.bfloat16) if v.dtype == np.uint16 else mx.array(v) for k, v in stored.items()}
    mx.save_safetensors(os.path.join(out_dir, "model.safetensors"), arrays, metadata={"format": "mlx"})
    config = {"model_type": "qwen3_5_moe", "text_config": cfg,
              "quantization": {"group_size": group_size, "bits": bits, "mode": "affine", **overrides}}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)
    return stored
