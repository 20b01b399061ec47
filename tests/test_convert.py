"""The converter against transformers' own tiny models, in every checkpoint layout; bad inputs."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from flashmoe import arch as _arch  # noqa: E402
from flashmoe import quant  # noqa: E402
from flashmoe.convert import convert  # noqa: E402
from flashmoe.errors import ConversionError  # noqa: E402
from flashmoe.format import PackedReader  # noqa: E402
from hf_fixtures import make_hf_model, save_checkpoint  # noqa: E402

_MODELS = {}


def model(arch):
    if arch not in _MODELS:
        _MODELS[arch] = make_hf_model(arch, seed=3)
    return _MODELS[arch]


def source_tensors(src):
    """Every tensor of a saved checkpoint as float32 numpy, names as written."""
    out = {}
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            out.update({k: v.float().numpy() for k, v in load_file(os.path.join(src, f)).items()})
    return out


def deinterleave_with_transformers(m, layer, w_qkvz, w_ba):
    """in_proj_qkv/z/b/a as transformers' fix_query_key_value_ordering orders x @ W^T, with x = identity
    (so x @ W^T = W^T exactly and the result is compared bit for bit)."""
    la = m.model.layers[layer].linear_attn
    qkvz = torch.from_numpy(w_qkvz.T.copy())[None]
    ba = torch.from_numpy(w_ba.T.copy())[None]
    q, k, v, z, b, a = la.fix_query_key_value_ordering(qkvz, ba)
    flat = lambda t: t.reshape(1, t.shape[1], -1)[0].T.numpy()  # noqa: E731
    qkv = torch.cat([torch.from_numpy(flat(q)).T, torch.from_numpy(flat(k)).T, torch.from_numpy(flat(v)).T], 1)
    return {"in_proj_qkv.weight": qkv.T.numpy(), "in_proj_z.weight": flat(z),
            "in_proj_b.weight": flat(b), "in_proj_a.weight": flat(a)}


def expected_packed(arch, m, src, cfg):
    """Packed name -> float32 source values (before the storage dtype), from the checkpoint files."""
    sd = source_tensors(src)
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in sd) else "model."
    dense, experts = {}, {}
    for k, v in sd.items():
        if k.startswith(("model.visual.", "mtp.")):
            continue
        name = k[len(prefix):] if k.startswith(prefix) else k
        parts = name.split(".")
        if ".mlp.experts." in name:
            layer = int(parts[1])
            if parts[4] == "gate_up_proj":
                inter = v.shape[1] // 2
                for e in range(v.shape[0]):
                    experts.setdefault((layer, e), {}).update(gate_proj=v[e, :inter], up_proj=v[e, inter:])
            elif parts[4] == "down_proj":
                for e in range(v.shape[0]):
                    experts.setdefault((layer, e), {})["down_proj"] = v[e]
            else:
                experts.setdefault((layer, int(parts[4])), {})[parts[5]] = v
        elif name.endswith("in_proj_qkvz.weight"):
            base = name[: -len("in_proj_qkvz.weight")]
            split = deinterleave_with_transformers(m, int(parts[1]), v, sd[k.replace("qkvz", "ba")])
            dense.update({base + n: a for n, a in split.items()})
        elif name.endswith("in_proj_ba.weight"):
            continue
        elif name.endswith("conv1d.weight"):
            dense[name] = v[:, 0, :]
        else:
            dense[name] = v
    return dense, experts


def stored(v, dtype):
    """What the packed file must hold for float32 source values v in `dtype` (bits 16 only)."""
    return quant.bf16_to_f32(quant.f32_to_bf16(v)) if dtype == "bf16" else v


CASES = [
    # arch, layout, prefix, dtype, shards, multimodal, extras
    ("qwen3_5_moe", "fused", "model.", "bfloat16", 1, False, False),
    ("qwen3_5_moe", "per_expert", "model.language_model.", "bfloat16", 3, False, False),
    ("qwen3_5_moe", "fused", "model.", "bfloat16", 2, True, True),
    ("qwen3_5_moe", "per_expert", "model.", "float16", 1, False, False),
    ("qwen3_5_moe", "fused", "model.", "float32", 2, False, True),
    ("qwen3_next", "fused", "model.", "bfloat16", 1, False, False),
    ("qwen3_next", "per_expert", "model.", "bfloat16", 3, False, True),
]


@pytest.mark.parametrize("arch,layout,prefix,dtype,shards,multimodal,extras", CASES)
def test_bits16_is_exact(tmp_path, arch, layout, prefix, dtype, shards, multimodal, extras):
    m = model(arch)
    src = save_checkpoint(m, tmp_path / "src", layout=layout, prefix=prefix, dtype=dtype, shards=shards,
                          multimodal=multimodal, extras=extras)
    header = convert(src, tmp_path / "dst", bits=16, progress=False)
    r = PackedReader(tmp_path / "dst")
    r.verify()
    cfg = header["config"]
    assert header["architecture"] == arch and header["source"]["dtype"] == dtype
    assert cfg["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert cfg["rope_parameters"]["rope_theta"] == 10000.0 and cfg["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert header["quantization"] == {"bits": 16, "mode": "none", "scale_dtype": "float16"}
    if arch == "qwen3_next":
        assert cfg["mlp_only_layers"] == [1] and cfg["norm_topk_prob"] is True
        assert [e["layer"] for e in header["experts"]["layers"]] == [0, 2, 3]
    dense, experts = expected_packed(arch, m, src, cfg)
    specs = _arch.packed_dense_specs(arch, cfg)
    assert set(header["dense"]["tensors"]) == set(dense) == set(specs)
    for name, v in dense.items():
        role = specs[name][1]
        want = {"quant": "bf16", "f32": "f32", "hp": "bf16" if dtype == "bfloat16" else "f32"}[role]
        entry = header["dense"]["tensors"][name]
        assert entry["dtype"] == want, name
        np.testing.assert_array_equal(r.tensor(name), stored(v, want), err_msg=name)
    moe = [e["layer"] for e in header["experts"]["layers"]]
    assert set(experts) == {(layer, e) for layer in moe for e in range(cfg["num_experts"])}
    for (layer, e), trio in experts.items():
        for name, got in zip(("gate_proj", "up_proj", "down_proj"), r.expert(layer, e)):
            np.testing.assert_array_equal(got, stored(trio[name], "bf16"), err_msg=f"{layer}.{e}.{name}")
    if extras:
        assert os.path.isfile(tmp_path / "dst" / "generation_config.json")


def test_bf16_source_matches_model_parameters(tmp_path):
    """Independent of the helpers above: packed bf16 values equal the model's own parameters."""
    m = model("qwen3_5_moe")
    convert(save_checkpoint(m, tmp_path / "src"), tmp_path / "dst", bits=16, progress=False)
    r = PackedReader(tmp_path / "dst")
    layer = m.model.layers[0]
    np.testing.assert_array_equal(r.tensor("layers.0.linear_attn.in_proj_qkv.weight"),
                                  layer.linear_attn.in_proj_qkv.weight.detach().numpy())
    gate, up, down = r.expert(0, 7)
    gu = layer.mlp.experts.gate_up_proj.detach().numpy()[7]
    np.testing.assert_array_equal(gate, gu[:48])
    np.testing.assert_array_equal(up, gu[48:])
    np.testing.assert_array_equal(down, layer.mlp.experts.down_proj.detach().numpy()[7])


def test_qwen3_next_deinterleave_against_forward(tmp_path):
    """x @ packed in_proj_qkv^T etc. reproduce what transformers computes from the fused projections."""
    m = model("qwen3_next")
    convert(save_checkpoint(m, tmp_path / "src"), tmp_path / "dst", bits=16, progress=False)
    r = PackedReader(tmp_path / "dst")
    la = m.model.layers[0].linear_attn
    x = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q, k, v, z, b, a = la.fix_query_key_value_ordering(la.in_proj_qkvz(x), la.in_proj_ba(x))
    xn = x[0].numpy().astype(np.float64)  # float64 products of bf16 values: both sides exact to 1e-12
    qkv = xn @ r.tensor("layers.0.linear_attn.in_proj_qkv.weight").T.astype(np.float64)
    ref = torch.cat([t.reshape(1, 5, -1) for t in (q, k, v)], -1)[0].numpy()
    np.testing.assert_allclose(qkv, ref, rtol=1e-5, atol=1e-5)
    for name, t in (("in_proj_z", z), ("in_proj_b", b), ("in_proj_a", a)):
        got = xn @ r.tensor(f"layers.0.linear_attn.{name}.weight").T.astype(np.float64)
        np.testing.assert_allclose(got, t.reshape(1, 5, -1)[0].numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    # the split really reorders: q of head 1 is not where the fused layout keeps it
    w_fused = la.in_proj_qkvz.weight.detach().numpy()
    assert not np.array_equal(r.tensor("layers.0.linear_attn.in_proj_qkv.weight")[24:48], w_fused[24:48])


def quant_bound(w, scales, biases, bits, g):
    """Per-element |w - deq| bound: half a step plus what float16 rounding of scale and bias costs."""
    maxq = (1 << bits) - 1
    grp = w.reshape(w.shape[0], -1, g)
    mn, mx = grp.min(axis=2), grp.max(axis=2)
    s, b = scales.astype(np.float32), biases.astype(np.float32)
    bound = s / 2 + np.abs(b - mn) + maxq * np.abs(s - (mx - mn) / maxq)
    bound += 4 * np.finfo(np.float32).eps * np.maximum(np.abs(mn), np.abs(mx))
    return np.repeat(bound, g, axis=1)


@pytest.mark.parametrize("arch,bits", [("qwen3_5_moe", 4), ("qwen3_5_moe", 8), ("qwen3_next", 4)])
def test_quantized_within_bound(tmp_path, arch, bits):
    m = model(arch)
    src = save_checkpoint(m, tmp_path / "src", layout="per_expert" if arch == "qwen3_next" else "fused")
    header = convert(src, tmp_path / "dst", bits=bits, group_size=64, progress=False)
    r = PackedReader(tmp_path / "dst")
    r.verify()
    assert header["quantization"] == {"bits": bits, "mode": "affine", "group_size": 64, "scale_dtype": "float16"}
    dense, experts = expected_packed(arch, m, src, header["config"])
    specs = _arch.packed_dense_specs(arch, header["config"])
    n_quant = 0
    for name, v in dense.items():
        entry = header["dense"]["tensors"][name]
        if specs[name][1] != "quant":
            assert entry["dtype"] in ("f32", "bf16")
            np.testing.assert_array_equal(r.tensor(name), v, err_msg=name)  # bf16 source: exact either way
            continue
        n_quant += 1
        assert entry["dtype"] == f"q{bits}"
        g = entry["group_size"]
        assert g == quant.pick_group_size(v.shape[1], 64)  # 128 -> 64, 96 -> 32, 80 -> 16
        p = r.tensor_parts(name)
        assert (np.abs(r.tensor(name) - v) <= quant_bound(v, p["scales"], p["biases"], bits, g)).all(), name
    assert n_quant >= 10
    assert header["dense"]["tensors"]["layers.3.self_attn.o_proj.weight"]["group_size"] == 32
    assert header["dense"]["tensors"]["layers.0.linear_attn.out_proj.weight"]["group_size"] == 16
    et = header["experts"]["tensors"]
    assert et["gate_proj"]["group_size"] == 64 and et["down_proj"]["group_size"] == 16
    for (layer, e), trio in experts.items():
        got = r.expert(layer, e)
        parts = r.expert_parts(layer, e)
        for name, deq, p in zip(("gate_proj", "up_proj", "down_proj"), got, parts):
            w = trio[name]
            g = et[name]["group_size"]
            assert (np.abs(deq - w) <= quant_bound(w, p["scales"], p["biases"], bits, g)).all()


# -- bad checkpoints --------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(model("qwen3_5_moe"), tmp_path / "src", layout="per_expert", shards=2)


def _rewrite(src, mutate):
    """Apply mutate(dict) to the tensors of each shard and save them back."""
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            path = os.path.join(src, f)
            sd = load_file(path)
            mutate(sd)
            save_file(sd, path)


def _fails(src, dst, match):
    with pytest.raises(ConversionError, match=match):
        convert(src, dst, bits=4, progress=False)
    assert not os.path.exists(os.path.join(dst, "flashmoe.json"))


def test_missing_shard(ckpt, tmp_path):
    os.remove(os.path.join(ckpt, "model-00002-of-00002.safetensors"))
    _fails(ckpt, tmp_path / "dst", r"model-00002-of-00002.safetensors: missing shard")


def test_truncated_safetensors(ckpt, tmp_path):
    path = os.path.join(ckpt, "model-00001-of-00002.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    _fails(ckpt, tmp_path / "dst", r"model-00001-of-00002.safetensors: truncated safetensors file: tensor")


def test_corrupt_safetensors_header(ckpt, tmp_path):
    path = os.path.join(ckpt, "model-00002-of-00002.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"{garbage")
    _fails(ckpt, tmp_path / "dst", r"model-00002-of-00002.safetensors: corrupt safetensors header")


def test_corrupt_safetensors_header_length(ckpt, tmp_path):
    path = os.path.join(ckpt, "model-00001-of-00002.safetensors")
    with open(path, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))
    _fails(ckpt, tmp_path / "dst", r"model-00001-of-00002.safetensors: corrupt safetensors header")


def test_unknown_model_type(ckpt, tmp_path):
    cfg_path = os.path.join(ckpt, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["model_type"] = "llama"
    json.dump(cfg, open(cfg_path, "w"))
    _fails(ckpt, tmp_path / "dst", r"unknown model_type 'llama', supported: qwen3_5_moe, qwen3_5_moe_text, qwen3_next")


def test_wrong_tensor_shape(ckpt, tmp_path):
    name = "model.layers.2.linear_attn.out_proj.weight"

    def mutate(sd):
        if name in sd:
            sd[name] = torch.zeros(128, 81, dtype=torch.bfloat16)
    _rewrite(ckpt, mutate)
    _fails(ckpt, tmp_path / "dst", rf"{name} has shape \[128, 81\], the config implies \[128, 80\]")


def test_config_disagreeing_with_tensors(ckpt, tmp_path):
    cfg_path = os.path.join(ckpt, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["moe_intermediate_size"] = 64
    json.dump(cfg, open(cfg_path, "w"))
    _fails(ckpt, tmp_path / "dst", r"experts.0.gate_proj.weight has shape \[48, 128\], the config implies \[64, 128\]")


@pytest.mark.parametrize("name", ["model.layers.1.post_attention_layernorm.weight",
                                  "model.layers.0.mlp.experts.7.up_proj.weight", "lm_head.weight"])
def test_missing_tensor(ckpt, tmp_path, name):
    _rewrite(ckpt, lambda sd: sd.pop(name, None))
    idx = os.path.join(ckpt, "model.safetensors.index.json")
    os.remove(idx)  # without the index the converter can only notice the tensor is absent
    _fails(ckpt, tmp_path / "dst", rf"tensor {name} missing from the checkpoint")


def test_index_names_missing_tensor(ckpt, tmp_path):
    _rewrite(ckpt, lambda sd: sd.pop("model.norm.weight", None))
    _fails(ckpt, tmp_path / "dst", r"tensor model.norm.weight listed in the index is missing")


def test_unsupported_dtype(ckpt, tmp_path):
    name = "model.layers.0.input_layernorm.weight"

    def mutate(sd):
        if name in sd:
            sd[name] = torch.zeros(128, dtype=torch.int8)
    _rewrite(ckpt, mutate)
    _fails(ckpt, tmp_path / "dst", rf"{name} has unsupported dtype I8")


def test_unexpected_tensor(ckpt, tmp_path):
    def mutate(sd):
        if "model.norm.weight" in sd:
            sd["model.layers.0.mlp.mystery.weight"] = torch.zeros(3, dtype=torch.bfloat16)
    _rewrite(ckpt, mutate)
    idx = os.path.join(ckpt, "model.safetensors.index.json")
    os.remove(idx)
    _fails(ckpt, tmp_path / "dst", r"unexpected tensors model.layers.0.mlp.mystery.weight")


def test_missing_config(ckpt, tmp_path):
    os.remove(os.path.join(ckpt, "config.json"))
    _fails(ckpt, tmp_path / "dst", r"config.json: missing")


def test_refuses_to_overwrite(ckpt, tmp_path):
    convert(ckpt, tmp_path / "dst", bits=8, progress=False)
    with pytest.raises(ConversionError, match="already holds a packed model"):
        convert(ckpt, tmp_path / "dst", bits=4, progress=False)
    header = convert(ckpt, tmp_path / "dst", bits=4, progress=False, overwrite=True)
    assert header["quantization"]["bits"] == 4
    PackedReader(tmp_path / "dst").verify()


def test_old_style_config(tmp_path):
    """Top-level rope_theta/partial_rotary_factor, no layer_types, no rope_parameters."""
    src = save_checkpoint(model("qwen3_5_moe"), tmp_path / "src")
    cfg_path = os.path.join(src, "config.json")
    cfg = json.load(open(cfg_path))
    del cfg["layer_types"], cfg["rope_parameters"]
    cfg.update(rope_theta=5e6, partial_rotary_factor=0.5, full_attention_interval=4)
    json.dump(cfg, open(cfg_path, "w"))
    header = convert(src, tmp_path / "dst", bits=16, progress=False)
    assert header["config"]["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert header["config"]["rope_parameters"]["rope_theta"] == 5e6
    assert header["config"]["rope_parameters"]["partial_rotary_factor"] == 0.5


def test_layer_types_rule():
    from flashmoe.arch import qwen3_next

    cfg = qwen3_next.extract_config({"model_type": "qwen3_next", "num_hidden_layers": 6, "full_attention_interval": 2,
                                     "mlp_only_layers": [0], "decoder_sparse_step": 2})
    assert cfg["layer_types"] == ["linear_attention", "full_attention"] * 3
    assert _arch.moe_layers("qwen3_next", cfg) == [1, 3, 5]
    cfg = qwen3_next.extract_config({"num_hidden_layers": 3, "layer_types": ["full_attention"] * 3})
    assert cfg["layer_types"] == ["full_attention"] * 3  # honoured as given


def test_tied_embeddings(tmp_path):
    m = make_hf_model("qwen3_5_moe", seed=5, tie_word_embeddings=True)
    src = save_checkpoint(m, tmp_path / "src")  # transformers' state dict still carries lm_head.weight
    header = convert(src, tmp_path / "dst", bits=16, progress=False)
    assert header["config"]["tie_word_embeddings"] is True
    assert "lm_head.weight" not in header["dense"]["tensors"]
    np.testing.assert_array_equal(PackedReader(tmp_path / "dst").tensor("embed_tokens.weight"),
                                  m.model.embed_tokens.weight.detach().numpy())


@pytest.mark.parametrize("bits,group_size,match", [(3, 64, "bits must be 4, 8 or 16"),
                                                   (4, 48, "group_size must be a power of two")])
def test_bad_options(ckpt, tmp_path, bits, group_size, match):
    with pytest.raises(ConversionError, match=match):
        convert(ckpt, tmp_path / "dst", bits=bits, group_size=group_size, progress=False)
    assert not os.path.exists(tmp_path / "dst")
