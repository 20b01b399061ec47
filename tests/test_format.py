"""read_header/PackedReader on damaged packed models, and the writer's own invariants (no torch needed)."""

import builtins
import errno
import json
import os
import re
import shutil
import struct

import numpy as np
import pytest

from flashmoe.errors import ConversionError, FormatError
from flashmoe.format import BLOB_ALIGN, PREAMBLE, PackedReader, PackedWriter, read_header
from flashmoe.synth import DEMO_CONFIG, write_random_model

TINY = dict(DEMO_CONFIG, vocab_size=300, hidden_size=64, num_hidden_layers=4, layer_types=None, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=16, num_experts=6, num_experts_per_tok=2,
            moe_intermediate_size=48, shared_expert_intermediate_size=32)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("packed") / "m"
    write_random_model(d, TINY, bits=4, group_size=32, progress=False)
    return d


@pytest.fixture
def model(packed, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(packed, d)
    return d


def edit_header(d, fn):
    p = d / "flashmoe.json"
    h = json.loads(p.read_text())
    fn(h)
    p.write_text(json.dumps(h))


NAN, INF = float("nan"), float("inf")


def set_config(**kw):
    return lambda d: edit_header(d, lambda h: h["config"].update(kw))


def set_rope(**kw):
    return lambda d: edit_header(d, lambda h: h["config"]["rope_parameters"].update(kw))


def set_tensor(name, **kw):
    return lambda d: edit_header(d, lambda h: h["dense"]["tensors"][name].update(kw))


def set_expert(name, **kw):
    return lambda d: edit_header(d, lambda h: h["experts"]["tensors"][name].update(kw))


def test_random_model_is_valid_and_deterministic(packed, tmp_path):
    h = read_header(packed)
    r = PackedReader(packed)
    r.verify()
    assert h["config"]["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert h["experts"]["stride"] % BLOB_ALIGN == 0 and h["experts"]["stride"] >= h["experts"]["blob_size"]
    for layer in h["experts"]["layers"]:
        size = os.path.getsize(packed / layer["file"])
        assert size == PREAMBLE + layer["num_experts"] * h["experts"]["stride"] == layer["size"]
    g, u, d = r.expert(2, 5)
    assert g.shape == (48, 64) and d.shape == (64, 48)
    assert 0.08 < g.std() < 0.17  # ~ 1/sqrt(64)
    write_random_model(tmp_path / "again", TINY, bits=4, group_size=32, progress=False)
    again = read_header(tmp_path / "again")
    assert again["experts"]["layers"][1]["checksums"] == h["experts"]["layers"][1]["checksums"]
    assert (packed / "dense.bin").read_bytes() == (tmp_path / "again" / "dense.bin").read_bytes()


def test_demo_model_layout(tmp_path):
    h = write_random_model(tmp_path / "demo", progress=False)
    assert h["config"]["hidden_size"] == 512 and len(h["experts"]["layers"]) == 8
    assert h["dense"]["tensors"]["layers.0.mlp.gate.weight"]["dtype"] == "bf16"
    assert h["dense"]["tensors"]["embed_tokens.weight"]["dtype"] == "q4"


def test_preamble_fields(packed):
    h = read_header(packed)
    with open(packed / "experts" / "L002.bin", "rb") as f:
        magic, version, kind, payload, layer, n = struct.unpack("<8sIIQII", f.read(32))
        rest = f.read(PREAMBLE - 32)
    assert (magic, version, kind, layer, n) == (b"FLASHMOE", 1, 2, 2, 6)
    assert payload == 6 * h["experts"]["stride"] and rest == bytes(len(rest))
    with open(packed / "dense.bin", "rb") as f:
        magic, version, kind, payload, layer, n = struct.unpack("<8sIIQII", f.read(32))
    assert (magic, version, kind, layer, n) == (b"FLASHMOE", 1, 1, 0xFFFFFFFF, 0)
    assert payload == os.path.getsize(packed / "dense.bin") - PREAMBLE
    for t in h["dense"]["tensors"].values():
        assert all(t[k] % 64 == 0 for k in ("offset", "scales_offset", "biases_offset") if k in t)


@pytest.mark.parametrize("damage,match", [
    (lambda d: shutil.rmtree(d), "not a directory"),
    (lambda d: os.remove(d / "flashmoe.json"), "flashmoe.json: missing"),
    (lambda d: (d / "flashmoe.json").write_text('{"format": "flashmoe", "vers'), "flashmoe.json: not valid JSON"),
    (lambda d: edit_header(d, lambda h: h.update(format="gguf")), "format is 'gguf'"),
    (lambda d: edit_header(d, lambda h: h.update(version=3)), "format version 3, this reader knows 1, 2"),
    (lambda d: edit_header(d, lambda h: h.update(version=True)), "format version True"),
    (lambda d: edit_header(d, lambda h: h.update(architecture="llama")), "unknown architecture 'llama'"),
    (lambda d: edit_header(d, lambda h: h["config"].pop("head_dim")), "config lacks head_dim"),
    (lambda d: edit_header(d, lambda h: h["config"].update(layer_types=["full_attention"])), "layer_types"),
    (lambda d: os.remove(d / "experts" / "L001.bin"), r"L001.bin: missing"),
    (lambda d: os.truncate(d / "dense.bin", os.path.getsize(d / "dense.bin") - 64), r"dense.bin: truncated: \d+ bytes"),
    (lambda d: os.truncate(d / "experts" / "L003.bin", 20000), r"L003.bin: truncated: 20000 bytes"),
    (lambda d: _poke(d / "dense.bin", 0, b"GGUFGGUF"), r"dense.bin: bad magic"),
    (lambda d: _poke(d / "experts" / "L000.bin", 8, struct.pack("<I", 7)), r"L000.bin: file format version 7"),
    (lambda d: _poke(d / "experts" / "L000.bin", 12, struct.pack("<I", 1)), r"L000.bin: preamble kind 1"),
    (lambda d: _poke(d / "experts" / "L000.bin", 16, struct.pack("<Q", 5)), r"L000.bin: preamble payload size 5"),
    (lambda d: shutil.copyfile(d / "experts" / "L000.bin", d / "experts" / "L001.bin"),
     r"L001.bin: preamble layer 0, expected 1"),
    (lambda d: _poke(d / "experts" / "L002.bin", 28, struct.pack("<I", 5)), r"L002.bin: preamble num_experts 5"),
    (lambda d: edit_header(d, lambda h: h["dense"]["tensors"]["norm.weight"].update(offset=h["dense"]["size"] - 64)),
     r"norm.weight: offset .* runs past the end"),
    (lambda d: edit_header(d, lambda h: h["dense"]["tensors"]["norm.weight"].update(nbytes=4)),
     r"norm.weight: nbytes 4, f32 \[64\] needs 256"),
    (lambda d: edit_header(d, lambda h: h["dense"]["tensors"]["norm.weight"].update(offset=16384 + 4)),
     r"norm.weight: offset 16388 is not a 64-aligned"),
    (lambda d: edit_header(d, lambda h: h["dense"]["tensors"]["norm.weight"].update(dtype="q4")),
     r"norm.weight: dtype q4 not allowed"),
    # bfloat16 scales came with version 2: a version-1 header naming them is refused, not misread
    (lambda d: edit_header(d, lambda h: h["dense"]["tensors"]["embed_tokens.weight"].update(scale_dtype="bfloat16")),
     r"embed_tokens.weight: scale_dtype 'bfloat16' unsupported in a version 1 header"),
    (lambda d: edit_header(d, lambda h: (h.update(version=2),
                                         h["experts"]["tensors"]["up_proj"].update(scale_dtype="float32"))),
     r"up_proj: scale_dtype 'float32' unsupported in a version 2 header"),
    (lambda d: edit_header(d, lambda h: (h.update(version=2),
                                         h["dense"]["tensors"]["norm.weight"].update(scale_dtype="bfloat16"))),
     r"norm.weight: f32 has no scale_dtype"),
    (lambda d: edit_header(d, lambda h: h["quantization"].update(scale_dtype="bfloat16")),
     r"quantization.scale_dtype 'bfloat16' unsupported"),
    (lambda d: edit_header(d, lambda h: h["dense"]["tensors"]["layers.3.self_attn.q_proj.weight"].update(shape=[64, 64])),
     r"q_proj.weight: shape \[64, 64\], the config implies \[128, 64\]"),
    (lambda d: edit_header(d, lambda h: h["dense"]["tensors"].pop("layers.1.linear_attn.A_log")), "missing: layers.1.linear_attn.A_log"),
    (lambda d: edit_header(d, lambda h: h["experts"].update(blob_size=h["experts"]["blob_size"] - 64)),
     r"experts: tensor down_proj: biases_offset .* runs past"),
    (lambda d: edit_header(d, lambda h: h["experts"].update(stride=h["experts"]["stride"] + 64)), "stride"),
    (lambda d: edit_header(d, lambda h: h["experts"]["layers"].pop(2)), r"lists layers \[0, 1, 3\]"),
    (lambda d: edit_header(d, lambda h: h["experts"]["layers"][0]["checksums"].pop()), "checksums must be 6"),
    (lambda d: edit_header(d, lambda h: h["experts"]["layers"][0].update(file="../../etc/passwd")), "bad file name"),
    # config numbers that would load and give NaN or silently wrong logits
    *[(set_config(rms_norm_eps=v), r"flashmoe.json: config rms_norm_eps = .* must be a finite number > 0")
      for v in (NAN, INF, 0, -1e-6, 1e-50, True, "1e-6", 10**400)],
    *[(set_rope(rope_theta=v), r"flashmoe.json: config rope_parameters.rope_theta = .* must be a finite number > 0")
      for v in (0, -1e6, NAN, INF, 1e39)],
    *[(set_rope(partial_rotary_factor=v), r"config rope_parameters.partial_rotary_factor = .* must be a number in \(0, 1\]")
      for v in (-0.25, 0, NAN, 1.5, None)],
    (set_rope(partial_rotary_factor=0.3), r"partial_rotary_factor 0.3 gives an odd rotary dim 9 \(head_dim 32\)"),
    (set_rope(rope_type="yarn"), r"config rope_parameters.rope_type 'yarn' unsupported"),
    # floats and out-of-range integers where the engine takes integers
    (set_config(hidden_size=64.0), r"config hidden_size = 64.0 is not an integer in 1..16777216"),
    (set_config(num_experts=2**70), r"config num_experts = 1180591620717411303424 is not an integer in 0..16777216"),
    (set_config(num_attention_heads=2**31), r"config num_attention_heads = 2147483648 is not an integer"),
    (lambda d: edit_header(d, lambda h: h["config"].update(num_hidden_layers=300, layer_types=["full_attention"] * 300)),
     r"config num_hidden_layers = 300: at most 256 layers"),
    (set_config(tie_word_embeddings="false"), r"config tie_word_embeddings = 'false' is not a boolean"),
    (set_config(hidden_act="gelu"), r"config hidden_act 'gelu' unsupported \(only silu\)"),
    (set_config(attention_bias=True), r"config attention_bias True unsupported"),
    (set_config(max_position_embeddings="4096"), r"config max_position_embeddings = '4096' is not an integer"),
    (set_config(max_position_embeddings=0), r"config max_position_embeddings = 0 is not an integer"),
    (set_config(intermediate_size=1.5), r"config intermediate_size = 1.5 is not an integer"),
    *[(set_config(eos_token_id=v), r"config eos_token_id = .* is not a token id or a list of them")
      for v in ("x", [1, "2"], -1, 2**40, 1.0)],
    (set_tensor("norm.weight", nbytes=256.0), r"tensor norm.weight: nbytes 256.0, f32 \[64\] needs 256"),
    (set_tensor("norm.weight", shape=[64.0]), r"tensor norm.weight: shape \[64.0\], the config implies \[64\]"),
    (set_tensor("norm.weight", group_size="x"), r"tensor norm.weight: f32 has no group_size"),
    (set_tensor("norm.weight", scales_offset=2**70), r"tensor norm.weight: f32 has no scales_offset"),
    (set_tensor("embed_tokens.weight", group_size=32.0), r"embed_tokens.weight: group_size 32.0 invalid"),
    (set_expert("gate_proj", nbytes=1536.0), r"experts: tensor gate_proj: nbytes 1536.0"),
    (lambda d: edit_header(d, lambda h: h["experts"]["layers"][1].update(size=float(h["experts"]["layers"][1]["size"]))),
     r"layer 1: size 114688.0, 6 experts need 114688"),
    (lambda d: edit_header(d, lambda h: h["experts"]["layers"][1].update(layer=1.0)), r"lists layers \[0, None, 2, 3\]"),
    (lambda d: edit_header(d, lambda h: h["experts"].update(stride=2**64 + 16384)), "stride"),
    (lambda d: edit_header(d, lambda h: h["dense"].update(checksum=-1)), r"dense.checksum -1 is not a CRC-32"),
    (lambda d: edit_header(d, lambda h: h["dense"].update(checksum=2.0)), r"dense.checksum 2.0 is not a CRC-32"),
    # sections sharing bytes
    (set_tensor("norm.weight", offset=40704), r"dense.bin: tensor norm.weight offset .* overlaps .*layers.0.input_layernorm.weight"),
    (lambda d: edit_header(d, lambda h: h["dense"]["tensors"]["embed_tokens.weight"].update(
        scales_offset=h["dense"]["tensors"]["embed_tokens.weight"]["biases_offset"])),
     r"tensor embed_tokens.weight scales_offset .* overlaps embed_tokens.weight biases_offset"),
    (set_expert("up_proj", offset=0), r"experts: tensor gate_proj offset .* overlaps up_proj offset"),
    (set_expert("down_proj", scales_offset=3648), r"experts: tensor up_proj biases_offset .* overlaps down_proj scales_offset"),
    # a preamble whose reserved tail is not zero
    (lambda d: _poke(d / "dense.bin", 100, b"\x01"), r"dense.bin: preamble byte 100 is not zero"),
    (lambda d: _poke(d / "experts" / "L002.bin", PREAMBLE - 1, b"\x80"), r"L002.bin: preamble byte 16383 is not zero"),
    # headers and files that cannot be read as such
    (lambda d: (d / "flashmoe.json").write_text('{"format": ' + "[" * 100000 + "]" * 100000 + "}"),
     r"flashmoe.json: not valid JSON \(nested too deeply\)"),
    (lambda d: (d / "flashmoe.json").write_bytes(b'{"format": "flashmoe\xff"}'), r"flashmoe.json: not valid JSON \(.*utf-8"),
    (lambda d: os.truncate(d / "flashmoe.json", 64 * 2**20 + 1), r"flashmoe.json: 67108865 bytes, larger than any header"),
    (lambda d: _replace_with_dir(d / "flashmoe.json"), r"flashmoe.json: not a regular file"),
    (lambda d: _replace_with_dir(d / "dense.bin"), r"dense.bin: not a regular file \(dense weights\)"),
    (lambda d: _replace_with_symlink(d / "experts" / "L001.bin", "/dev/zero"), r"L001.bin: not a regular file"),
    (lambda d: _replace_with_symlink(d / "dense.bin", d / "nowhere"), r"dense.bin: missing"),
    (lambda d: edit_header(d, lambda h: h["dense"].update(file="dense\0.bin")), "bad file name"),
    (lambda d: edit_header(d, lambda h: h["dense"].update(file="dense.bin/x")), r"dense.bin/x: cannot read"),
])
def test_damaged_model_raises_format_error(model, damage, match):
    damage(model)
    with pytest.raises(FormatError, match=match):
        read_header(model)


@pytest.mark.parametrize("change,match", [
    (dict(mlp_only_layers=3), r"config mlp_only_layers = 3 is not a list of layer indices"),
    (dict(mlp_only_layers=[1.0]), r"config mlp_only_layers = \[1.0\] is not a list of layer indices"),
    (dict(norm_topk_prob="yes"), r"config norm_topk_prob = 'yes' is not a boolean"),
    (dict(decoder_sparse_step=0), r"config decoder_sparse_step = 0 is not an integer in 1..16777216"),
    (dict(intermediate_size=2**40), r"config intermediate_size = 1099511627776 is not an integer in 1..16777216"),
])
def test_damaged_qwen3_next_config_raises_format_error(tmp_path, change, match):
    cfg = dict(TINY, model_type="qwen3_next", intermediate_size=96, mlp_only_layers=[1], decoder_sparse_step=1,
               norm_topk_prob=True)
    write_random_model(tmp_path / "m", cfg, architecture="qwen3_next", bits=4, group_size=32, progress=False)
    read_header(tmp_path / "m")
    set_config(**change)(tmp_path / "m")
    with pytest.raises(FormatError, match=match):
        read_header(tmp_path / "m")


def _poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _replace_with_dir(path):
    os.remove(path)
    os.mkdir(path)


def _replace_with_symlink(path, target):
    os.remove(path)
    os.symlink(target, path)


@pytest.mark.parametrize("rel", ["flashmoe.json", "dense.bin", "experts/L001.bin"])
def test_unreadable_file_raises_format_error(model, rel, monkeypatch):
    target = os.fspath(model / rel)
    if os.geteuid() != 0:
        os.chmod(target, 0)
    else:  # chmod does not stop root: make open() refuse the file as it would for another user
        real_open = builtins.open

        def refusing_open(file, *args, **kwargs):
            if os.fspath(file) == target:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), target)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(FormatError, match=rf"{re.escape(rel)}: cannot read: Permission denied"):
        read_header(model)


def test_symlinked_files_are_followed(model, tmp_path):
    """Data files may be symlinks (experts on another disk): the header cannot name a path outside the
    model directory, but whoever owns the directory may point its files anywhere."""
    elsewhere = tmp_path / "other-disk"
    shutil.move(model / "experts", elsewhere)
    os.symlink(elsewhere, model / "experts")
    os.rename(model / "dense.bin", elsewhere / "dense.bin")
    os.symlink(elsewhere / "dense.bin", model / "dense.bin")
    assert read_header(model)["dense"]["file"] == "dense.bin"
    PackedReader(model).verify()


def test_verify_names_corrupt_expert(model):
    h = read_header(model)
    stride = h["experts"]["stride"]
    _poke(model / "experts" / "L001.bin", PREAMBLE + 3 * stride + 100, b"\x5a\xa5")
    r = PackedReader(model)  # the header is intact; only the checksum can tell
    with pytest.raises(FormatError, match=r"L001.bin: layer 1 expert 3: checksum"):
        r.verify()


def test_writer_requires_every_expert_once(tmp_path):
    from flashmoe.arch import qwen3_5_moe

    cfg = qwen3_5_moe.extract_config(dict(TINY, num_hidden_layers=1, layer_types=None))
    w = PackedWriter(tmp_path / "m", "qwen3_5_moe", cfg, bits=8, group_size=64)
    g = np.zeros((48, 64), np.float32)
    d = np.zeros((64, 48), np.float32)
    w.add_expert(0, 4, g, g, d)
    w.add_expert(0, 0, g, g, d)  # any order
    with pytest.raises(ConversionError, match="layer 0 expert 4: written twice"):
        w.add_expert(0, 4, g, g, d)
    with pytest.raises(ConversionError, match="out of range"):
        w.add_expert(0, 6, g, g, d)
    with pytest.raises(ConversionError, match=r"shape \[48, 63\]"):
        w.add_expert(0, 1, g[:, :63], g, d)
    with pytest.raises(ConversionError, match="dense tensors never written"):
        w.finish()
    w.close()
    assert not (tmp_path / "m" / "flashmoe.json").exists()


def test_writer_missing_experts(tmp_path):
    from flashmoe.arch import qwen3_5_moe
    from flashmoe import arch as _arch

    cfg = qwen3_5_moe.extract_config(dict(TINY, num_hidden_layers=1, layer_types=None))
    w = PackedWriter(tmp_path / "m", "qwen3_5_moe", cfg, bits=16, group_size=64)
    for name, (shape, role) in _arch.packed_dense_specs("qwen3_5_moe", cfg).items():
        w.add_dense(name, np.zeros(shape, np.float32), quantize=role == "quant")
    g = np.zeros((48, 64), np.float32)
    w.add_expert(0, 2, g, g, np.zeros((64, 48), np.float32))
    with pytest.raises(ConversionError, match=r"layer 0: experts never written: \[0, 1, 3, 4, 5\]"):
        w.finish()
    w.close()
    assert not (tmp_path / "m" / "flashmoe.json").exists()
