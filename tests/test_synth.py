"""Presets of the real model shapes and the synthetic-model writer: shapes, weights, routing, CLI (no torch)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

import flashmoe
from flashmoe import arch as _arch
from flashmoe import presets
from flashmoe.errors import ConversionError
from flashmoe.format import PackedWriter
from flashmoe.reader import PackedReader, read_header
from flashmoe.synth import write_random_model

REAL = ("qwen3.5-397b-a17b", "qwen3.5-122b-a10b", "qwen3.5-35b-a3b", "qwen3-next-80b-a3b")


def n_params(cfg):
    a = presets.architecture_of(cfg)
    dense = sum(math.prod(shape) for shape, _ in _arch.packed_dense_specs(a, cfg).values())
    expert = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    return dense + expert * cfg["num_experts"] * len(_arch.moe_layers(a, cfg))


@pytest.mark.parametrize("name, billions, layers, full", [
    ("qwen3.5-397b-a17b", 397, 60, 15), ("qwen3.5-122b-a10b", 122, 48, 12), ("qwen3.5-35b-a3b", 35, 40, 10),
    ("qwen3-next-80b-a3b", 80, 48, 12)])
def test_real_presets_have_the_released_sizes(name, billions, layers, full):
    cfg = presets.get(name)
    assert cfg["num_hidden_layers"] == len(cfg["layer_types"]) == layers
    assert cfg["layer_types"].count("full_attention") == full
    assert all((t == "full_attention") == ((i + 1) % 4 == 0) for i, t in enumerate(cfg["layer_types"]))
    assert abs(n_params(cfg) / 1e9 - billions) < 0.02 * billions  # the parameter count in the name
    arch_module = _arch.get_module(presets.architecture_of(cfg))
    assert arch_module.extract_config(cfg)["layer_types"] == cfg["layer_types"]  # a valid HF text config


def test_expert_blob_and_model_sizes():
    big = presets.get("qwen3.5-397b-a17b")
    assert presets.expert_blob_bytes(big, bits=4) == 3 * 1024 * 4096 * 0.5625 == 7077888  # FORMAT.md's example
    assert presets.expert_blob_bytes(big, bits=8) == 3 * 1024 * 4096 * 1.0625
    assert presets.expert_blob_bytes(presets.get("qwen3.5-35b-a3b")) == 3 * 512 * 2048 * 0.5625
    size = presets.model_bytes(big)
    assert 215e9 < size["total"] < 230e9 and size["experts"] > 0.97 * size["total"]


def test_truncate_keeps_per_layer_shapes():
    full = presets.get("qwen3-next-80b-a3b")
    cut = presets.truncate("qwen3-next-80b-a3b", 6)
    assert cut["num_hidden_layers"] == 6 and cut["layer_types"] == full["layer_types"][:6]
    specs_full = _arch.packed_dense_specs("qwen3_next", full)
    specs_cut = _arch.packed_dense_specs("qwen3_next", cut)
    assert all(specs_full[n] == s for n, s in specs_cut.items())
    assert not any(n.startswith("layers.6.") for n in specs_cut)
    assert presets.get("qwen3-next-80b-a3b") == full  # presets are copies, never changed in place
    with pytest.raises(ValueError, match="layers must be in 1..48"):
        presets.truncate(full, 0)
    with pytest.raises(ValueError, match="unknown preset"):
        presets.get("qwen9")


@pytest.fixture(scope="module", params=["tiny", "tiny-next"])
def tiny_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "m"
    write_random_model(path, presets.truncate(request.param, 4), seed=3, progress=False)
    return path


def test_tiny_model_is_valid_with_zero_mean_weights(tiny_model):
    h = read_header(tiny_model)
    assert h["config"]["num_hidden_layers"] == 4 and len(h["experts"]["layers"]) == 4
    r = PackedReader(tiny_model)
    r.verify()  # every expert's checksum
    g, u, d = r.expert(1, 7)
    for w in (g, u, d):
        std = 1 / math.sqrt(w.shape[1])
        assert abs(w.mean()) < 0.05 * std and 0.85 * std < w.std() < 1.15 * std
    emb = r.tensor("embed_tokens.weight")
    assert abs(emb.mean()) < 0.02 and 0.85 < emb.std() < 1.15
    assert not np.array_equal(r.blob(0, 0), r.blob(0, 1))


def test_tiny_model_loads_generates_and_routes_token_by_token(tiny_model):
    model = flashmoe.load(tiny_model)
    cfg = model.config
    k, n_exp = cfg["num_experts_per_tok"], cfg["num_experts"]
    prompt = np.random.default_rng(0).integers(0, cfg["vocab_size"], 8)
    model.forward(prompt)
    model.reset_stats()
    out = model.generate_tokens(prompt[-1:], max_tokens=32, reset=False, stop_token_ids=[])
    assert len(out) == 32 and all(0 <= t < cfg["vocab_size"] for t in out)
    usage = model.expert_usage()
    assert usage.shape == (4, n_exp) and (usage.sum(axis=1) == 32 * k).all()
    distinct = (usage > 0).sum(axis=1)
    # The same experts every token would touch k per layer; uniform routing touches E(1 - (1 - k/E)^32).
    uniform = n_exp * (1 - (1 - k / n_exp) ** 32)
    assert (distinct > 0.7 * uniform).all(), (distinct, uniform)
    p = usage / usage.sum(axis=1, keepdims=True)
    entropy = -np.sum(p * np.log2(np.where(p > 0, p, 1)), axis=1)
    assert (entropy > 0.8 * math.log2(n_exp)).all()


def test_same_seed_same_model(tmp_path):
    cfg = presets.truncate("tiny", 2)
    a = write_random_model(tmp_path / "a", cfg, seed=1, progress=False)
    b = write_random_model(tmp_path / "b", cfg, seed=1, progress=False)
    c = write_random_model(tmp_path / "c", cfg, seed=2, progress=False, bits=8)
    assert a["experts"]["layers"] == b["experts"]["layers"]
    assert (tmp_path / "a" / "dense.bin").read_bytes() == (tmp_path / "b" / "dense.bin").read_bytes()
    assert c["experts"]["layers"][0]["checksums"] != a["experts"]["layers"][0]["checksums"]
    assert c["dense"]["tensors"]["lm_head.weight"]["dtype"] == "q8"
    PackedReader(tmp_path / "c").verify()


def test_writer_checks_prequantized_parts(tmp_path):
    cfg = _arch.get_module("qwen3_5_moe").extract_config(presets.truncate("tiny", 1))
    w = PackedWriter(tmp_path / "m", "qwen3_5_moe", cfg, bits=4, group_size=64)
    shape = (512, 128)
    q = np.zeros((512, 64), np.uint8)
    s = np.zeros((512, 2), np.float16)
    with pytest.raises(ConversionError, match=r"scales is float32 \[512, 2\], expected float16"):
        w.add_dense_quantized("lm_head.weight", shape, q, s.astype(np.float32), s)
    with pytest.raises(ConversionError, match=r"q is uint8 \[512, 128\], expected uint8 \[512, 64\]"):
        w.add_dense_quantized("lm_head.weight", shape, np.zeros(shape, np.uint8), s, s)
    with pytest.raises(ConversionError, match="not quantized"):
        w.add_dense_quantized("layers.0.mlp.gate.weight", (32, 128), q, s, s)
    w.add_dense_quantized("lm_head.weight", shape, q, s, s)
    with pytest.raises(ConversionError, match="written twice"):
        w.add_dense_quantized("lm_head.weight", shape, q, s, s)
    with pytest.raises(ConversionError, match=f"a blob of 100 bytes, not {w.blob_size}"):
        w.add_expert_blob(0, 1, bytes(100))
    w.add_expert_blob(0, 1, bytes(w.blob_size))
    with pytest.raises(ConversionError, match="layer 0 expert 1: written twice"):
        w.add_expert_blob(0, 1, bytes(w.blob_size))
    w.close()


def run_cli(*args):
    pkg_root = os.path.dirname(os.path.dirname(flashmoe.__file__))  # the package under test
    env = dict(os.environ, PYTHONPATH=pkg_root)
    return subprocess.run([sys.executable, "-m", "flashmoe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_synth(tmp_path):
    out = tmp_path / "m"
    r = run_cli("synth", "--preset", "tiny-next", "--layers", "3", "--bits", "8", "--quiet", str(out))
    assert r.returncode == 0, r.stderr
    assert "3 layers (3 DeltaNet + 0 attention), 8-bit" in r.stdout
    h = read_header(out)
    assert h["architecture"] == "qwen3_next" and h["quantization"]["bits"] == 8
    assert h["config"]["num_experts"] == 32 and h["config"]["num_hidden_layers"] == 3
    again = run_cli("synth", "--preset", "tiny-next", "--layers", "3", "--quiet", str(out))
    assert again.returncode == 1 and "--overwrite" in again.stderr
    bad = run_cli("synth", "--preset", "tiny", "--layers", "9", "--quiet", str(tmp_path / "x"))
    assert bad.returncode == 1 and "layers must be in 1..8" in bad.stderr
