"""Tiny transformers reference models and checkpoints in every layout the converter accepts.

Shared by the converter tests and the engine-vs-transformers tests. Needs torch and transformers;
callers should `pytest.importorskip("transformers")` first.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

ARCHS = ("qwen3_5_moe", "qwen3_next")

_TINY_COMMON = dict(
    vocab_size=251, hidden_size=128, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1,
    head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=24,
    linear_value_head_dim=20, linear_conv_kernel_dim=4, num_experts=10, num_experts_per_tok=3,
    moe_intermediate_size=48, shared_expert_intermediate_size=80, max_position_embeddings=512,
    rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
)
_TINY_NEXT = dict(intermediate_size=112, mlp_only_layers=[1], norm_topk_prob=True, decoder_sparse_step=1)


def tiny_config(arch: str, **overrides) -> dict:
    """HF text-config fields of a tiny model with awkward sizes (layer 3 is full attention)."""
    if arch not in ARCHS:
        raise ValueError(arch)
    cfg = json.loads(json.dumps(_TINY_COMMON))  # deep copy
    if arch == "qwen3_next":
        cfg.update(json.loads(json.dumps(_TINY_NEXT)))
    cfg.update(overrides)
    return cfg


def _classes(arch: str):
    import transformers

    if arch == "qwen3_5_moe":
        return transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeForCausalLM
    return transformers.Qwen3NextConfig, transformers.Qwen3NextForCausalLM


def _perturb(name: str, p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random value for every parameter, around what it means (zero-init norms hide bugs)."""
    def normal(std, mean=0.0):
        return torch.randn(p.shape, generator=gen) * std + mean

    if name.endswith("A_log"):
        return torch.log(torch.rand(p.shape, generator=gen) * 15 + 1)
    if name.endswith("dt_bias"):
        return normal(0.3)
    if name.endswith("conv1d.weight"):
        return normal(0.3)
    if name.endswith("linear_attn.norm.weight"):  # gated norm multiplies by w itself, init 1
        return normal(0.1, 1.0)
    if name.endswith("norm.weight"):  # zero-centred norms: output * (1 + w)
        return normal(0.1)
    if name.endswith("embed_tokens.weight"):
        return normal(1.0)
    if name.endswith("mlp.gate.weight"):  # router: logits of std ~1.5 so routing varies by token
        return normal(1.5 / math.sqrt(p.shape[-1]))
    return normal(1.0 / math.sqrt(p.shape[-1]))


def make_hf_model(arch: str, seed: int = 0, **overrides):
    """transformers CausalLM of tiny_config(arch), fp32 eval with eager attention and experts, every
    parameter random and rounded to a bf16 value (so a bits=16 conversion is lossless)."""
    config_cls, model_cls = _classes(arch)
    config = config_cls(**tiny_config(arch, **overrides))
    torch.manual_seed(seed)
    model = model_cls._from_config(config, attn_implementation="eager", experts_implementation="eager",
                                   dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(_perturb(name, p, gen).to(torch.bfloat16).to(torch.float32))
    return model.eval()


def _text_config_dict(model) -> dict:
    cfg = model.config.to_dict()
    for k in ("transformers_version", "_name_or_path", "id2label", "label2id", "architectures"):
        cfg.pop(k, None)
    return cfg


def _split_experts(sd: dict) -> dict:
    """Fused mlp.experts.{gate_up_proj,down_proj} -> per-expert nn.Linear weights."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base, inter = k[: -len("gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :inter]
                out[f"{base}{e}.up_proj.weight"] = v[e, inter:]
        elif k.endswith("mlp.experts.down_proj"):
            base = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


def save_checkpoint(model, out_dir, layout: str = "fused", prefix: str = "model.", dtype: str = "bfloat16",
                    shards: int = 1, multimodal: bool = False, extras: bool = False) -> str:
    """Write `model` as a Hugging Face checkpoint directory; returns out_dir.

    layout: "fused" (mlp.experts.gate_up_proj/down_proj, transformers' own) or "per_expert".
    multimodal: a qwen3_5_moe wrapper config with text_config, names under model.language_model.
    extras: add model.visual.* and mtp.* tensors (to be skipped) and a generation_config.json.
    """
    from safetensors.torch import save_file

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    text_cfg = _text_config_dict(model)
    arch = "qwen3_next" if text_cfg["model_type"] == "qwen3_next" else "qwen3_5_moe"
    if multimodal:
        if arch != "qwen3_5_moe":
            raise ValueError("multimodal checkpoints exist only for qwen3_5_moe")
        prefix = "model.language_model."
    tdtype = getattr(torch, dtype)
    sd = {}
    for k, v in model.state_dict().items():
        name = prefix + k[len("model."):] if k.startswith("model.") else k
        sd[name] = v.detach().to(tdtype)
    if layout == "per_expert":
        sd = _split_experts(sd)
    elif layout != "fused":
        raise ValueError(layout)
    if extras:
        gen = torch.Generator().manual_seed(1)
        for k, shape in (("model.visual.blocks.0.attn.qkv.weight", (24, 8)), ("model.visual.merger.norm.weight", (8,)),
                         ("mtp.fc.weight", (16, 32)), ("mtp.layers.0.input_layernorm.weight", (16,))):
            sd[k] = torch.randn(shape, generator=gen).to(tdtype)
        with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
            json.dump({"do_sample": True, "temperature": 0.7}, f)
    sd = {k: v.contiguous().clone() for k, v in sd.items()}

    if multimodal:
        config = {"model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"],
                  "text_config": text_cfg, "vision_config": {"model_type": "qwen3_5_moe_vision", "depth": 1},
                  "tie_word_embeddings": text_cfg.get("tie_word_embeddings", False)}
    else:
        config = dict(text_cfg)
    config["dtype"] = dtype
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)

    names = sorted(sd)
    if shards == 1:
        save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return out_dir
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in names[s * per:(s + 1) * per]}
        save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return out_dir


def reference_logits(model, ids) -> np.ndarray:
    """fp32 logits [T, vocab] of one sequence."""
    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long))
    return out.logits[0].float().numpy()
