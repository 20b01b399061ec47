"""Bad input and failed reads at the engine: clear exceptions naming what is wrong, never a crash or a
computation with a missing expert. Uses a tiny synthetic model (no torch needed)."""

import json
import os
import shutil
import zlib

import numpy as np
import pytest

import flashmoe
from flashmoe.errors import ContextLengthError, FlashMoEError, FormatError, ReadError
from flashmoe.format import PackedReader
from flashmoe.synth import DEMO_CONFIG, write_random_model

TINY = {**DEMO_CONFIG, "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"], "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "m"
    write_random_model(path, TINY, bits=4, progress=False)
    return path


@pytest.fixture
def copy(model_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(model_dir, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(FormatError, match="not a directory"):
        flashmoe.load(tmp_path / "nope")


def test_context_overflow_is_an_error_and_leaves_the_state_usable(model_dir):
    # fp32 activations: with int8 ones, the 6- and 10-token calls would take other kernels than the
    # 16-token one (ops.h), a ~1% difference that is not what this test is about.
    m = flashmoe.load(model_dir, context_length=16, int8_activations=False)
    ids = np.arange(20) % 300
    with pytest.raises(ContextLengthError, match="exceed the context length 16"):
        m.forward(ids)
    a = m.forward(ids[:10])
    with pytest.raises(ContextLengthError):
        m.forward(ids[10:17], reset=False)
    assert m.position == 10
    b = m.forward(ids[10:16], reset=False)  # fills the context exactly
    # Not bitwise: how the tokens are split changes fp32 summation orders (the matmul's token tiles, the
    # chunked gated delta rule): ~1.5e-5 here on logits up to ~4; a broken state gives errors of order 1.
    np.testing.assert_allclose(np.concatenate([a, b]), m.forward(ids[:16]), rtol=0, atol=1e-4)
    # generation that reaches the limit stops there instead of failing
    out = m.generate_tokens(ids[:10], max_tokens=50, stop_token_ids=[])
    assert m.position == 16 and len(out) == 7


def test_token_outside_vocabulary(model_dir):
    m = flashmoe.load(model_dir)
    with pytest.raises(FlashMoEError, match="outside the vocabulary"):
        m.forward([1, 2, 300])
    with pytest.raises(ValueError):
        m.forward([])


def test_expert_file_truncated_after_load_names_layer_and_expert(copy):
    m = flashmoe.load(copy, expert_cache_slots=1)
    header = json.loads((copy / "flashmoe.json").read_text())
    entry = header["experts"]["layers"][0]
    with open(copy / entry["file"], "r+b") as f:
        f.truncate(16384 + header["experts"]["stride"] // 2)  # only half of expert 0 remains
    with pytest.raises(ReadError, match=r"layer 0 expert \d+: short read"):
        m.forward(np.arange(40) % 300)


def test_truncated_expert_file_refused_at_load(copy):
    header = json.loads((copy / "flashmoe.json").read_text())
    path = copy / header["experts"]["layers"][2]["file"]
    os.truncate(path, os.path.getsize(path) - 1)
    with pytest.raises(FormatError, match="L002"):
        flashmoe.load(copy)


def test_corrupt_blob_detected_with_verify(copy):
    header = json.loads((copy / "flashmoe.json").read_text())
    stride = header["experts"]["stride"]
    path = copy / header["experts"]["layers"][1]["file"]
    with open(path, "r+b") as f:  # flip one byte inside every expert of layer 1
        for e in range(TINY["num_experts"]):
            f.seek(16384 + e * stride + 100)
            b = f.read(1)
            f.seek(16384 + e * stride + 100)
            f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(FormatError, match=r"layer 1 expert \d+: checksum mismatch"):
        flashmoe.load(copy, verify_checksums=True).forward([1, 2, 3])


def test_conv_kernel_beyond_the_engine_refused(tmp_path):
    """The DeltaNet conv keeps a block's taps on the stack: a kernel past the bound is refused at load."""
    path = tmp_path / "m"
    write_random_model(path, {**TINY, "linear_conv_kernel_dim": 65}, bits=4, progress=False)
    with pytest.raises(FlashMoEError, match="linear_conv_kernel_dim 65, at most 64"):
        flashmoe.load(path)


def test_shape_disagreeing_with_config_refused(copy):
    header = json.loads((copy / "flashmoe.json").read_text())
    header["config"]["moe_intermediate_size"] += 16
    (copy / "flashmoe.json").write_text(json.dumps(header))
    with pytest.raises(FormatError, match="shape"):
        flashmoe.load(copy)


def test_failed_read_never_computes(copy):
    """After a read error the sequence is reset; the file written back in place has changed since load
    and is refused (without checksums nothing says its bytes are the right ones again); a new load
    works. (tests/test_faults.py: a model whose reads recover gives a fresh model's results.)"""
    m = flashmoe.load(copy, expert_cache_slots=1)
    ids = np.arange(12) % 300
    good = m.forward(ids)
    header = json.loads((copy / "flashmoe.json").read_text())
    path = copy / header["experts"]["layers"][3]["file"]
    data = path.read_bytes()
    os.truncate(path, 16384)
    with pytest.raises(ReadError):
        m.forward(ids)
    assert m.position == 0
    path.write_bytes(data)
    with pytest.raises(FormatError, match="L003.bin changed on disk"):
        m.forward(ids)
    np.testing.assert_array_equal(flashmoe.load(copy, expert_cache_slots=1).forward(ids), good)


# -- the C core's own checks: the C API does not trust its caller, so these bypass read_header and hand
# -- the engine a load spec (python/flashmoe/model.py _load_spec) with one value made bad.

def _spec(path, **options):
    from flashmoe.model import _load_spec

    return _load_spec(os.fspath(path), **options)[1]


def _core():
    from flashmoe import _core

    return _core


@pytest.mark.parametrize("field,value", [
    ("rms_norm_eps", float("nan")), ("rms_norm_eps", float("inf")), ("rms_norm_eps", 0.0), ("rms_norm_eps", -1e-6),
    ("rope_theta", 0.0), ("rope_theta", -1e6), ("rope_theta", float("nan")), ("rope_theta", float("inf")),
    ("partial_rotary_factor", float("nan")), ("partial_rotary_factor", 0.0), ("partial_rotary_factor", -0.5),
    ("partial_rotary_factor", 1.5), ("partial_rotary_factor", float("inf")),
])
def test_engine_refuses_bad_float_config(model_dir, field, value):
    spec = _spec(model_dir)
    spec["config"][field] = value
    with pytest.raises(FlashMoEError, match=rf"config: {field} .* must be"):
        _core().plan_memory(spec)


def test_engine_refuses_absurd_dimensions(model_dir):
    """Dimensions past 2^24 would overflow the engine's size arithmetic (heads x head_dim x tokens)."""
    spec = _spec(model_dir)
    spec["config"]["num_attention_heads"] = 2**30
    with pytest.raises(FlashMoEError, match=r"config: num_attention_heads must be in 1\.\.16777216, got 1073741824"):
        _core().plan_memory(spec)


def _dense_entry(spec, name):
    return next(d for d in spec["dense"] if d["name"] == name)


@pytest.mark.parametrize("name,key", [("norm.weight", "offset"), ("embed_tokens.weight", "scales_offset"),
                                      ("lm_head.weight", "biases_offset")])
def test_engine_refuses_extent_that_wraps_around(model_dir, name, key):
    """offset + nbytes past 2^64 wraps to a small number; the check must not be fooled by it."""
    spec = _spec(model_dir)
    _dense_entry(spec, name)[key] = 2**64 - 64
    with pytest.raises(FormatError, match=rf"tensor {name}: .*(do not fit|outside) dense.bin"):
        _core().Model(spec)


@pytest.mark.parametrize("change,match", [
    (lambda ex: ex[0].update(offset=2**64 - 64), "expert gate_proj does not fit"),
    (lambda ex: ex[1].update(scales_offset=2**64 - 64), "expert up_proj does not fit"),
    (lambda ex: ex[2].update(group_size=0), "expert down_proj: group size 0"),  # was a division by zero
    (lambda ex: ex[2].update(group_size=-16), "expert down_proj: group size -16"),
    (lambda ex: ex[0].update(dtype=7), "expert gate_proj: unknown dtype 7"),
])
def test_engine_refuses_bad_expert_layout(model_dir, change, match):
    spec = _spec(model_dir)
    change(spec["expert_tensors"])
    with pytest.raises(FormatError, match=match):
        _core().plan_memory(spec)


def test_engine_refuses_stride_that_overflows(model_dir):
    spec = _spec(model_dir)
    spec["expert_stride"] = 2**63  # a 16 KiB multiple; 8 experts of it wrap around 2^64
    with pytest.raises(FormatError, match=r"expert stride 9223372036854775808 .* 8 experts"):
        _core().plan_memory(spec)


def test_engine_refuses_dense_smaller_than_its_preamble(model_dir):
    spec = _spec(model_dir)
    spec["dense_size"] = 100
    with pytest.raises(FormatError, match=r"dense.bin: 100 bytes, less than its 16384-byte preamble"):
        _core().plan_memory(spec)


@pytest.mark.parametrize("rel", ["dense.bin", "experts/L001.bin"])
def test_engine_refuses_nonzero_preamble_tail(copy, rel):
    spec = _spec(copy)  # validated while the file was intact
    with open(copy / rel, "r+b") as f:
        f.seek(4000)
        f.write(b"\x01")
    with pytest.raises(FormatError, match=rf"{rel}: preamble byte 4000 is not zero"):
        _core().Model(spec)


def _flip_dense_byte(path):
    header = json.loads((path / "flashmoe.json").read_text())
    off = header["dense"]["tensors"]["norm.weight"]["offset"] + 8
    with open(path / "dense.bin", "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x10]))
    return header


def test_dense_checksum_verified(copy):
    header = json.loads((copy / "flashmoe.json").read_text())
    payload = (copy / "dense.bin").read_bytes()[16384:]
    assert header["dense"]["checksum"] == zlib.crc32(payload)
    flashmoe.load(copy, verify_checksums=True).forward([1, 2, 3])
    _flip_dense_byte(copy)
    with pytest.raises(FormatError, match=r"dense.bin: checksum mismatch \(crc32 [0-9a-f]{8}, header says "
                                          rf"{header['dense']['checksum']:08x}\)"):
        flashmoe.load(copy, verify_checksums=True)
    flashmoe.load(copy).forward([1, 2, 3])  # not asked to verify: the cost of a pass over dense.bin is not paid
    with pytest.raises(FormatError, match=r"dense.bin: checksum .*header says"):
        PackedReader(copy).verify()


def test_model_without_dense_checksum_still_loads(copy):
    """Models written before dense.bin had a checksum: nothing to verify, so nothing is."""
    header = json.loads((copy / "flashmoe.json").read_text())
    del header["dense"]["checksum"]
    (copy / "flashmoe.json").write_text(json.dumps(header))
    _flip_dense_byte(copy)
    flashmoe.load(copy, verify_checksums=True).forward([1, 2, 3])
    PackedReader(copy).verify()
