"""The text configs of the models flashmoe targets, for synthetic models of their real shapes.

Each preset is the Hugging Face text config of the released checkpoint (field names verbatim, the fields
the engine reads), checked against the published config.json files: Qwen/Qwen3.5-397B-A17B,
Qwen/Qwen3.5-122B-A10B and Qwen/Qwen3.5-35B-A3B (their `text_config`), Qwen/Qwen3-Next-80B-A3B-Instruct.
`truncate` keeps a preset's per-layer shapes with fewer layers, so a model of the real width fits a disk.
"""

from __future__ import annotations

import copy
import math

from . import arch as _arch
from . import quant

_ROPE = {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25}

_QWEN3_5 = {
    "model_type": "qwen3_5_moe_text",
    "vocab_size": 248320,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "full_attention_interval": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "rope_parameters": _ROPE,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "eos_token_id": 248044,
}

_PRESETS = {
    "qwen3.5-397b-a17b": dict(
        _QWEN3_5, hidden_size=4096, num_hidden_layers=60, num_attention_heads=32, linear_num_value_heads=64,
        num_experts=512, num_experts_per_tok=10, moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024),
    "qwen3.5-122b-a10b": dict(
        _QWEN3_5, hidden_size=3072, num_hidden_layers=48, num_attention_heads=32, linear_num_value_heads=64,
        num_experts=256, num_experts_per_tok=8, moe_intermediate_size=1024,
        shared_expert_intermediate_size=1024),
    "qwen3.5-35b-a3b": dict(
        _QWEN3_5, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, linear_num_value_heads=32,
        num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
        shared_expert_intermediate_size=512),
    "qwen3-next-80b-a3b": {
        "model_type": "qwen3_next",
        "vocab_size": 151936,
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 4,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "intermediate_size": 5120,  # the dense MLP of mlp_only_layers (none in the release)
        "norm_topk_prob": True,
        "mlp_only_layers": [],
        "decoder_sparse_step": 1,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "rope_parameters": _ROPE,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
}
# Small configs of the same two families for tests and smoke runs (every code path, small sizes).
_TINY = {
    "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4, "head_dim": 64,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
    "linear_value_head_dim": 32, "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64, "max_position_embeddings": 4096, "bos_token_id": None,
    "eos_token_id": None,
}
_PRESETS["tiny"] = dict(_QWEN3_5, **_TINY)
_PRESETS["tiny-next"] = dict(_PRESETS["qwen3-next-80b-a3b"], **_TINY, intermediate_size=256)
# ~120 MB at 4 bits, experts 97% of it: big enough for streaming smoke runs (bench/decode.py --quick).
_PRESETS["small"] = {**_QWEN3_5, **_TINY, "vocab_size": 4096, "hidden_size": 256, "num_experts": 64,
                     "num_experts_per_tok": 8, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 256}
for _name, _cfg in _PRESETS.items():
    _cfg = {k: v for k, v in _cfg.items() if v is not None}  # the tiny ones have no eos/bos ids
    _cfg["layer_types"] = _arch.default_layer_types(_cfg["num_hidden_layers"], 4)
    _PRESETS[_name] = _cfg

NAMES = tuple(_PRESETS)


def get(name: str) -> dict:
    """A copy of the named preset's config."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(NAMES)}")
    return copy.deepcopy(_PRESETS[name])


def architecture_of(config: dict) -> str:
    """The packed-format architecture family of an HF text config."""
    return "qwen3_next" if config.get("model_type") == "qwen3_next" else "qwen3_5_moe"


def truncate(preset, layers: int) -> dict:
    """The preset (a name or a config) with only its first `layers` layers: every per-layer shape and the
    layer_types pattern (full attention every 4th layer) kept."""
    cfg = get(preset) if isinstance(preset, str) else copy.deepcopy(preset)
    if not 1 <= layers <= cfg["num_hidden_layers"]:
        raise ValueError(f"layers must be in 1..{cfg['num_hidden_layers']}, got {layers}")
    cfg["num_hidden_layers"] = layers
    cfg["layer_types"] = cfg["layer_types"][:layers]
    if "mlp_only_layers" in cfg:
        cfg["mlp_only_layers"] = [i for i in cfg["mlp_only_layers"] if i < layers]
    return cfg


# -- sizes, without writing anything ----------------------------------------------------------------

def _matrix_bytes(shape, bits: int, group_size: int) -> int:
    out, inf = shape
    if bits == 16:
        return 2 * out * inf
    g = quant.pick_group_size(inf, group_size)
    return out * quant.packed_cols(inf, bits) + 2 * 2 * out * (inf // g)  # q + float16 scales and biases


def expert_blob_bytes(config: dict, bits: int = 4, group_size: int = 64) -> int:
    """Bytes of one routed expert (gate, up, down with scales and biases), before 64-byte alignment."""
    return sum(_matrix_bytes(s, bits, group_size) for s in _arch.expert_shapes(config).values())


def model_bytes(config: dict, bits: int = 4, group_size: int = 64) -> dict:
    """Approximate packed size (alignment padding left out): dense, experts and total bytes."""
    architecture = architecture_of(config)
    dense = 0
    for name, (shape, role) in _arch.packed_dense_specs(architecture, config).items():
        if role == _arch.QUANT:
            dense += _matrix_bytes(shape, bits, group_size)
        else:  # routers and in_proj_a/b are bf16 in real checkpoints; norms, conv, A_log, dt_bias f32
            dense += math.prod(shape) * (2 if role == _arch.HP else 4)
    stride = -(-expert_blob_bytes(config, bits, group_size) // 16384) * 16384
    experts = len(_arch.moe_layers(architecture, config)) * config["num_experts"] * stride
    return {"dense": dense, "experts": experts, "total": dense + experts}
