"""What each supported architecture family looks like once packed: config rules and tensor shapes.

Both families pack to the same tensor names (Qwen3-Next's fused DeltaNet projections are split by the
converter), so the packed layout is described here once; the per-family modules only map checkpoint
names and extract configs. Nothing here needs torch.
"""

from __future__ import annotations

ARCHITECTURES = ("qwen3_5_moe", "qwen3_next")

# Roles: "quant" = quantized at 4/8 bits (bf16 at 16); "f32" = always float32;
# "hp" = high precision, bf16 when the source is bf16, else float32.
QUANT, F32, HP = "quant", "f32", "hp"

# Fields the engine reads; read_header requires them all.
REQUIRED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "rms_norm_eps", "tie_word_embeddings", "layer_types", "rope_parameters",
    "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
    "linear_num_value_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
REQUIRED_FIELDS_NEXT = ("mlp_only_layers", "decoder_sparse_step", "norm_topk_prob", "intermediate_size")

LAYER_TYPES = ("linear_attention", "full_attention")


def default_layer_types(num_layers: int, interval: int = 4) -> list[str]:
    """Full attention when (i+1) % interval == 0, else linear attention (transformers' rule)."""
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)]


def is_moe_layer(architecture: str, config: dict, i: int) -> bool:
    if architecture == "qwen3_5_moe":
        return True
    return (
        i not in (config.get("mlp_only_layers") or [])
        and config.get("num_experts", 0) > 0
        and (i + 1) % config.get("decoder_sparse_step", 1) == 0
    )


def moe_layers(architecture: str, config: dict) -> list[int]:
    return [i for i in range(config["num_hidden_layers"]) if is_moe_layer(architecture, config, i)]


def expert_shapes(config: dict) -> dict:
    """Shapes of one routed expert's projections, [out, in]."""
    h, i = config["hidden_size"], config["moe_intermediate_size"]
    return {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def linear_attn_dims(config: dict):
    hk, hv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
    return hk, hv, dk, dv


def packed_dense_specs(architecture: str, config: dict) -> dict:
    """name -> (shape, role) of every dense tensor a packed model of this config holds."""
    h, v = config["hidden_size"], config["vocab_size"]
    specs = {"embed_tokens.weight": ((v, h), QUANT), "norm.weight": ((h,), F32)}
    if not config.get("tie_word_embeddings", False):
        specs["lm_head.weight"] = ((v, h), QUANT)
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    hk, hv, dk, dv = linear_attn_dims(config)
    conv_dim = 2 * hk * dk + hv * dv
    for i, kind in enumerate(config["layer_types"]):
        p = f"layers.{i}."
        specs[p + "input_layernorm.weight"] = ((h,), F32)
        specs[p + "post_attention_layernorm.weight"] = ((h,), F32)
        if kind == "full_attention":
            a = p + "self_attn."
            specs[a + "q_proj.weight"] = ((2 * nh * hd, h), QUANT)  # query and gate interleaved per head
            specs[a + "k_proj.weight"] = ((nkv * hd, h), QUANT)
            specs[a + "v_proj.weight"] = ((nkv * hd, h), QUANT)
            specs[a + "o_proj.weight"] = ((h, nh * hd), QUANT)
            specs[a + "q_norm.weight"] = ((hd,), F32)
            specs[a + "k_norm.weight"] = ((hd,), F32)
        else:
            a = p + "linear_attn."
            specs[a + "in_proj_qkv.weight"] = ((conv_dim, h), QUANT)
            specs[a + "in_proj_z.weight"] = ((hv * dv, h), QUANT)
            specs[a + "in_proj_b.weight"] = ((hv, h), HP)
            specs[a + "in_proj_a.weight"] = ((hv, h), HP)
            specs[a + "conv1d.weight"] = ((conv_dim, config["linear_conv_kernel_dim"]), F32)
            specs[a + "dt_bias"] = ((hv,), F32)
            specs[a + "A_log"] = ((hv,), F32)
            specs[a + "norm.weight"] = ((dv,), F32)
            specs[a + "out_proj.weight"] = ((h, hv * dv), QUANT)
        m = p + "mlp."
        if is_moe_layer(architecture, config, i):
            si = config["shared_expert_intermediate_size"]
            specs[m + "gate.weight"] = ((config["num_experts"], h), HP)
            specs[m + "shared_expert.gate_proj.weight"] = ((si, h), QUANT)
            specs[m + "shared_expert.up_proj.weight"] = ((si, h), QUANT)
            specs[m + "shared_expert.down_proj.weight"] = ((h, si), QUANT)
            specs[m + "shared_expert_gate.weight"] = ((1, h), HP)
        else:
            di = config["intermediate_size"]
            specs[m + "gate_proj.weight"] = ((di, h), QUANT)
            specs[m + "up_proj.weight"] = ((di, h), QUANT)
            specs[m + "down_proj.weight"] = ((h, di), QUANT)
    return specs


def role_of(name: str, ndim: int) -> str:
    """The precision role of a tensor not quantized, from its name (FORMAT.md's rules)."""
    if ndim == 1 or name.endswith(("conv1d.weight", "A_log", "dt_bias")):
        return F32
    return HP


def get_module(architecture: str):
    if architecture == "qwen3_5_moe":
        from . import qwen3_5_moe as mod
    elif architecture == "qwen3_next":
        from . import qwen3_next as mod
    else:
        raise ValueError(f"unknown architecture {architecture!r}, supported: {', '.join(ARCHITECTURES)}")
    return mod


# -- source checkpoints ------------------------------------------------------------------------------

def normalize_config(text: dict, defaults: dict) -> dict:
    """The text config with HF defaults for absent fields, layer_types and rope_parameters filled in.

    Field names stay verbatim; the engine reads only the normalised fields.
    """
    from ..errors import ConversionError

    cfg = dict(text)
    for k, v in defaults.items():
        if cfg.get(k) is None:
            cfg[k] = v
    n = cfg["num_hidden_layers"]
    if not cfg.get("layer_types"):
        cfg["layer_types"] = default_layer_types(n, cfg.get("full_attention_interval") or 4)
    if len(cfg["layer_types"]) != n or any(t not in LAYER_TYPES for t in cfg["layer_types"]):
        raise ConversionError(f"config layer_types {cfg['layer_types']} does not list {n} layers of {LAYER_TYPES}")
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    # Older configs keep these at the top level.
    rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope.setdefault("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
    cfg["rope_parameters"] = rope
    for k in REQUIRED_FIELDS:
        if k not in cfg:
            raise ConversionError(f"config lacks {k}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"config hidden_act {cfg['hidden_act']!r} unsupported (only silu)")
    if cfg.get("attention_bias"):
        raise ConversionError("config attention_bias=true is unsupported")
    if cfg["linear_num_value_heads"] % cfg["linear_num_key_heads"]:
        raise ConversionError("config linear_num_value_heads must be a multiple of linear_num_key_heads")
    return cfg


def source_dense_specs(architecture: str, config: dict) -> dict:
    """Checkpoint name (prefix removed) -> shape of every non-expert tensor, for the family's common names."""
    specs = {}
    for name, (shape, _) in packed_dense_specs(architecture, config).items():
        if name.endswith("conv1d.weight"):
            shape = (shape[0], 1, shape[1])  # nn.Conv1d's [channels, in/groups, kernel]
        specs[name] = tuple(shape)
    return specs
