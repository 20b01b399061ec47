"""MLX checkpoints imported without re-quantizing (flashmoe/mlx_import.py).

mlx-lm (`mlx[cpu]` on Linux) converts tiny transformers models at 4 and 8 bits; flashmoe imports them. The
reference is transformers carrying the MLX checkpoint's weights dequantized in float32 with mlx's own
mx.dequantize, mlx-lm's sanitize undone (tests/mlx_fixtures.py); a second one is mlx-lm's model itself, cast
to float32. The engine computes in fp32 from the same values, so an exact import agrees to float32 rounding
(~1e-5); any re-quantization, a dropped `1 + w`, a wrong row order or a scale read in the wrong dtype is
off by far more (4-bit re-quantization of these models moves the logits by 20-90%, see the last column of
test_reference_is_discriminating).
"""

import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from hf_fixtures import reference_logits  # noqa: E402
from mlx_fixtures import (QUANTIZABLE, QUANTIZABLE_NEXT, make_mlx_checkpoint, mlx_lm_logits,  # noqa: E402
                          mlx_weights, quant_params, reference_model)

import flashmoe  # noqa: E402
from flashmoe.cli import main  # noqa: E402
from flashmoe import quant  # noqa: E402
from flashmoe.errors import ConversionError  # noqa: E402
from flashmoe.reader import PackedReader  # noqa: E402

pytestmark = pytest.mark.torch
RTOL = 1e-4  # the bound; observed ~1e-6 (summation order only)
N_PROMPT = 40

# (arch, bits, group size, config overrides): at groups of 64 the tiny model's awkward widths (48, 80, 96
# inputs) leave some matrices in bf16 next to quantized ones; at 32 every matrix is quantized.
CASES = [(a, b, 64, {}) for a in ("qwen3_5_moe", "qwen3_next") for b in (4, 8)] + [
    ("qwen3_5_moe", 4, 32, QUANTIZABLE), ("qwen3_next", 8, 32, QUANTIZABLE_NEXT)]


def case_id(c):
    return f"{c[0]}-{c[1]}bit-g{c[2]}"


@pytest.fixture(scope="module", params=CASES, ids=case_id)
def imported(request, tmp_path_factory):
    arch, bits, g, overrides = request.param
    d = tmp_path_factory.mktemp(case_id(request.param))
    mlx_dir, hf = make_mlx_checkpoint(d, arch, bits, g, **overrides)
    dst = str(d / "packed")
    header = flashmoe.convert(mlx_dir, dst, progress=False)
    return {"arch": arch, "bits": bits, "group": g, "mlx": mlx_dir, "hf": hf, "dst": dst, "header": header,
            "ref": reference_model(mlx_dir, arch, hf)}


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def prompt(n=N_PROMPT, seed=0):
    return np.random.default_rng(seed).integers(0, 251, n)


def test_prefill_matches_the_dequantized_reference(imported):
    ids = prompt()
    got = flashmoe.load(imported["dst"], int8_activations=False).forward(ids)
    ref = reference_logits(imported["ref"], ids)
    assert rel_err(got, ref) <= RTOL
    assert (got.argmax(1) == ref.argmax(1)).all()
    mlx = mlx_lm_logits(imported["mlx"], ids)  # the second reference: mlx-lm itself, in fp32
    assert rel_err(got, mlx) <= RTOL
    assert (got.argmax(1) == mlx.argmax(1)).all()


def test_decode_matches_the_dequantized_reference(imported):
    ids = prompt(12, seed=1)
    m = flashmoe.load(imported["dst"], int8_activations=False)
    rows = [m.forward(ids[:1])[0]] + [m.forward(ids[i:i + 1], reset=False)[0] for i in range(1, len(ids))]
    ref = reference_logits(imported["ref"], ids)
    assert rel_err(np.stack(rows), ref) <= RTOL
    assert (np.stack(rows).argmax(1) == ref.argmax(1)).all()


def test_reference_is_discriminating(imported):
    """The test above could not pass by chance: the original bf16 model (which a re-quantization would
    approximate) is far from the MLX one, and so is the engine with int8 activations."""
    ids = prompt()
    ref = reference_logits(imported["ref"], ids)
    assert rel_err(reference_logits(imported["hf"], ids), ref) > 100 * RTOL


def test_header_records_the_source(imported):
    h = imported["header"]
    assert h["source"]["format"] == "mlx"
    assert h["quantization"]["bits"] == imported["bits"] and h["quantization"]["group_size"] == imported["group"]
    t = h["dense"]["tensors"]
    # mlx-lm's 8-bit router and shared-expert gate stay 8-bit, with MLX's bf16 scales
    assert t["layers.0.mlp.gate.weight"]["dtype"] == "q8"
    assert t["layers.0.mlp.shared_expert_gate.weight"]["dtype"] == "q8"
    assert t["embed_tokens.weight"]["dtype"] == f"q{imported['bits']}"
    assert t["embed_tokens.weight"]["scale_dtype"] == "bfloat16" and h["version"] == 2
    assert h["experts"]["tensors"]["gate_proj"]["dtype"] == f"q{imported['bits']}"


def test_experts_are_mlx_bytes_reordered(imported):
    """Each expert blob holds MLX's packed words byte for byte and its bf16 scales and biases bit for bit."""
    r = PackedReader(imported["dst"])
    w = mlx_weights(imported["mlx"])
    prefix = "language_model.model." if imported["arch"] == "qwen3_5_moe" else "model."
    cfg = r.header["config"]
    for layer in (0, cfg["num_hidden_layers"] - 1):
        if layer not in [e["layer"] for e in r.header["experts"]["layers"]]:
            continue
        for e in (0, cfg["num_experts"] - 1):
            for proj, parts in zip(("gate_proj", "up_proj", "down_proj"), r.expert_parts(layer, e)):
                base = f"{prefix}layers.{layer}.mlp.switch_mlp.{proj}"
                if base + ".scales" not in w:  # left in bf16 by mlx-lm
                    assert np.array_equal(parts["data"], np.array(w[base + ".weight"][e].view(mx.uint16)))
                    continue
                words = np.array(w[base + ".weight"][e])
                assert np.array_equal(parts["q"], words.view(np.uint8).reshape(words.shape[0], -1))
                for k in ("scales", "biases"):
                    assert np.array_equal(parts[k], np.array(w[f"{base}.{k}"][e].view(mx.uint16)))


def test_loss_free_against_the_mlx_values(imported):
    """Every dense matrix dequantizes (PackedReader, numpy) to exactly mx.dequantize's values."""
    r = PackedReader(imported["dst"])
    w = mlx_weights(imported["mlx"])
    with open(os.path.join(imported["mlx"], "config.json")) as f:
        cfg_json = json.load(f)
    prefix = "language_model.model." if imported["arch"] == "qwen3_5_moe" else "model."
    for name in ("embed_tokens.weight", "layers.0.mlp.gate.weight", "layers.3.self_attn.q_proj.weight"):
        base = prefix + name[: -len(".weight")]
        p = quant_params(cfg_json, base)
        want = mx.dequantize(w[base + ".weight"], w[base + ".scales"].astype(mx.float32),
                             w[base + ".biases"].astype(mx.float32), group_size=p["group_size"], bits=p["bits"])
        assert np.array_equal(r.tensor(name), np.array(want)), name


def test_tied_embeddings(tmp_path):
    """mlx-lm drops a tied lm_head; the engine then reads logits through the (4-bit, bf16-scaled) embedding."""
    # (Qwen3-Next: mlx-lm's Qwen3.5 wrapper keeps a tied lm_head it then refuses, an mlx-lm bug)
    mlx_dir, hf = make_mlx_checkpoint(tmp_path, "qwen3_next", 4, 64, tie_word_embeddings=True)
    header = flashmoe.convert(mlx_dir, tmp_path / "packed", progress=False)
    assert "lm_head.weight" not in header["dense"]["tensors"]
    ids = prompt(16)
    got = flashmoe.load(tmp_path / "packed", int8_activations=False).forward(ids)
    ref = reference_logits(reference_model(mlx_dir, "qwen3_next", hf), ids)
    assert rel_err(got, ref) <= RTOL and (got.argmax(1) == ref.argmax(1)).all()


def test_router_activations_stay_fp32(tmp_path):
    """With int8 activations on (the default), an 8-bit router still routes on fp32 activations: a model
    whose only quantized matrices are its routers gives bit-identical logits either way."""
    def routers_only(path, module):
        return {"group_size": 64, "bits": 8} if path.endswith("mlp.gate") else False

    mlx_dir, _ = make_mlx_checkpoint(tmp_path, "qwen3_5_moe", 8, 64, quant_predicate=routers_only)
    header = flashmoe.convert(mlx_dir, tmp_path / "packed", progress=False)
    quantized = {n for n, t in header["dense"]["tensors"].items() if t["dtype"] in ("q4", "q8")}
    assert quantized == {f"layers.{i}.mlp.gate.weight" for i in range(4)}
    ids = prompt(20)
    a = flashmoe.load(tmp_path / "packed", int8_activations=True).forward(ids)
    b = flashmoe.load(tmp_path / "packed", int8_activations=False).forward(ids)
    np.testing.assert_array_equal(a, b)


def test_info_shows_the_source(imported, capsys):
    assert main(["info", imported["dst"]]) == 0
    out = capsys.readouterr().out
    assert "MLX checkpoint" in out
    assert f"routed experts {imported['bits']}-bit" in out and "router 8-bit" in out


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def mlx4(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlx4")
    return make_mlx_checkpoint(d, "qwen3_5_moe", 4, 64)[0]


def _copy(src, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst


def _edit_config(d, fn):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


def _rewrite(d, fn):
    """Rewrite the checkpoint's tensors (a dict of mx arrays) through fn."""
    w = mlx_weights(d)
    fn(w)
    for f in d.glob("*.safetensors"):
        f.unlink()
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    mx.save_safetensors(str(d / "model.safetensors"), w, metadata={"format": "mlx"})


def _fails(src, tmp_path, match, **kw):
    with pytest.raises(ConversionError, match=match):
        flashmoe.convert(src, tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out" / "flashmoe.json").exists()


def test_refuses_unknown_architecture(mlx4, tmp_path):
    src = _copy(mlx4, tmp_path)
    _edit_config(src, lambda c: c.update(model_type="llama"))
    _fails(src, tmp_path, "unknown model_type 'llama'")


def test_refuses_missing_tensor(mlx4, tmp_path):
    src = _copy(mlx4, tmp_path)
    _rewrite(src, lambda w: w.pop("language_model.model.layers.2.linear_attn.in_proj_z.scales"))
    # without its scales the weight is uint32 words, not a float tensor
    _fails(src, tmp_path, r"language_model.model.layers.2.linear_attn.in_proj_z.weight has dtype U32 and no scales")
    src2 = _copy(mlx4, tmp_path / "b")
    _rewrite(src2, lambda w: w.pop("language_model.model.layers.1.mlp.switch_mlp.up_proj.weight"))
    _fails(src2, tmp_path, r"tensor language_model.model.layers.1.mlp.switch_mlp.up_proj.weight missing")


def test_refuses_missing_biases(mlx4, tmp_path):
    src = _copy(mlx4, tmp_path)
    _rewrite(src, lambda w: w.pop("language_model.model.embed_tokens.biases"))
    _fails(src, tmp_path, r"embed_tokens.weight has scales but no biases")


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4", "mxfp8"])
def test_refuses_non_affine_modes(mlx4, tmp_path, mode):
    src = _copy(mlx4, tmp_path)
    _edit_config(src, lambda c: c["quantization"].update(mode=mode))
    _fails(src, tmp_path, rf"language_model.model.embed_tokens.weight is quantized in MLX mode '{mode}'")


def test_refuses_a_real_mxfp4_checkpoint(tmp_path):
    """mlx-lm's own mxfp4 output (uint8 E8M0 scales, no biases) is refused, naming a tensor."""
    from mlx_lm.convert import convert as mlx_convert

    from hf_fixtures import make_hf_model, save_checkpoint

    hf = save_checkpoint(make_hf_model("qwen3_5_moe", **QUANTIZABLE), tmp_path / "hf", multimodal=True)
    mlx_convert(str(hf), mlx_path=str(tmp_path / "mlx"), quantize=True, q_mode="mxfp4", dtype="bfloat16")
    _fails(tmp_path / "mlx", tmp_path, r"tensor language_model\.\S+ is quantized in MLX mode 'mxfp4'")


@pytest.mark.parametrize("bits", [2, 3, 5, 6])
def test_refuses_widths_the_format_lacks(tmp_path, bits):
    mlx_dir, _ = make_mlx_checkpoint(tmp_path, "qwen3_next", bits, 64)
    _fails(mlx_dir, tmp_path, rf"tensor model\.\S+ is {bits}-bit; the packed format stores 4- and 8-bit")


def test_cli_convert(mlx4, tmp_path, capsys):
    assert main(["convert", str(mlx4), str(tmp_path / "a"), "--quiet"]) == 0
    assert "from MLX" in capsys.readouterr().out
    assert main(["convert", str(mlx4), str(tmp_path / "b"), "--bits", "8", "--quiet"]) == 1
    assert "--bits 8 disagrees" in capsys.readouterr().err


def test_refuses_float32_expert_scales(tmp_path):
    from mlx_lm.convert import convert as mlx_convert

    from hf_fixtures import make_hf_model, save_checkpoint

    hf = save_checkpoint(make_hf_model("qwen3_5_moe"), tmp_path / "hf", multimodal=True)
    mlx_convert(str(hf), mlx_path=str(tmp_path / "mlx"), quantize=True, q_bits=4, dtype="float32")
    _fails(tmp_path / "mlx", tmp_path, r"layers.0.mlp.switch_mlp.gate_proj has float32 scales")


def test_refuses_bits_that_disagree(mlx4, tmp_path):
    _fails(mlx4, tmp_path, r"keeps its own quantization \(its routed experts are 4-bit\); --bits 8", bits=8)
    _fails(mlx4, tmp_path, r"groups of 64\); --group-size 32", group_size=32)
    flashmoe.convert(mlx4, tmp_path / "ok", bits=4, group_size=64, progress=False)  # agreeing is fine


def test_refuses_per_layer_expert_widths(mlx4, tmp_path):
    """mlx-lm's mixed recipes give layers different widths; one expert layout serves every layer."""
    src = _copy(mlx4, tmp_path)
    base = "language_model.model.layers.2.mlp.switch_mlp.gate_proj"

    def requantize(w):  # layer 2's gate_proj at 8 bits, where every other layer's is 4-bit
        f = mx.dequantize(w[base + ".weight"], w[base + ".scales"], w[base + ".biases"], group_size=64, bits=4)
        q, s, b = mx.quantize(f, group_size=64, bits=8)
        w.update({base + ".weight": q, base + ".scales": s, base + ".biases": b})
    _rewrite(src, requantize)
    _edit_config(src, lambda c: c["quantization"].update({base: {"group_size": 64, "bits": 8}}))
    _fails(src, tmp_path, r"layers.2.mlp.switch_mlp.gate_proj is 8-bit, groups of 64, bfloat16 scales where "
                          r"\S+layers.0.mlp.switch_mlp.gate_proj is 4-bit, groups of 64, bfloat16 scales")


def test_refuses_shapes_that_disagree_with_the_config(mlx4, tmp_path):
    src = _copy(mlx4, tmp_path)
    base = "language_model.model.layers.0.linear_attn.in_proj_qkv"
    _edit_config(src, lambda c: c["quantization"].update({base: {"group_size": 64, "bits": 8}}))
    _fails(src, tmp_path, rf"tensor {base}.weight is U32 \[176, 16\]; 8-bit groups of 64 .* need U32 \[176, 32\]")


# ---------------------------------------------------------------- a full-shape layer


def test_full_shape_layer_is_mlx_bytes(tmp_path):
    """One Qwen3.5-397B-A17B layer at its real shapes (16 of its 512 experts, a small vocabulary), in MLX's
    layout with random words and bf16 scales (some below float16's range): every quantized tensor and expert
    blob of the import holds MLX's bytes, reordered, not recomputed; norms are MLX's values less 1."""
    from mlx_fixtures import write_synthetic_mlx

    from flashmoe import presets

    cfg = presets.truncate(presets.get("qwen3.5-397b-a17b"), 1)
    cfg.update(vocab_size=512, num_experts=16, num_experts_per_tok=4)
    stored = write_synthetic_mlx(tmp_path / "mlx", cfg, bits=4, group_size=64)
    header = flashmoe.convert(tmp_path / "mlx", tmp_path / "packed", progress=False)
    r = PackedReader(tmp_path / "packed")
    p = "language_model.model."
    for name, t in header["dense"]["tensors"].items():
        src = (p[:-len("model.")] if name.startswith("lm_head") else p) + name
        base = src[: -len(".weight")] if src.endswith(".weight") else src
        if t["dtype"] in ("q4", "q8"):
            parts = r.tensor_parts(name)
            assert np.array_equal(parts["q"], stored[base + ".weight"].view(np.uint8).reshape(t["shape"][0], -1))
            assert np.array_equal(parts["scales"], stored[base + ".scales"])
            assert np.array_equal(parts["biases"], stored[base + ".biases"])
        elif name.endswith("norm.weight") and ".linear_attn." not in name:
            assert np.array_equal(r.tensor(name) + np.float32(1), quant.bf16_to_f32(stored[src]))
        elif name.endswith("conv1d.weight"):
            assert np.array_equal(r.tensor(name), quant.bf16_to_f32(stored[src][:, :, 0]))
        else:
            assert np.array_equal(r.tensor(name), quant.bf16_to_f32(stored[src])), name
    assert header["dense"]["tensors"]["layers.0.linear_attn.in_proj_qkv.weight"]["shape"] == [12288, 4096]
    for e in (0, 7, 15):
        for proj, parts in zip(("gate_proj", "up_proj", "down_proj"), r.expert_parts(0, e)):
            base = f"{p}layers.0.mlp.switch_mlp.{proj}"
            assert np.array_equal(parts["q"], stored[base + ".weight"][e].view(np.uint8).reshape(parts["q"].shape))
            assert np.array_equal(parts["scales"], stored[base + ".scales"][e])
            assert np.array_equal(parts["biases"], stored[base + ".biases"][e])
    r.verify()


def test_float32_scales_narrow_only_when_exact():
    from flashmoe.mlx_import import _scales

    f16_exact = np.array([0.5, -2.0**-20, 1000.0], np.float32)  # -2^-20: a float16 subnormal
    bf16_exact = np.array([2.0**-100, -1.5 * 2.0**100], np.float32)  # outside float16's range
    assert _scales("t", f16_exact, "F32").dtype == np.float16
    assert np.array_equal(quant.bf16_to_f32(_scales("t", bf16_exact, "F32")), bf16_exact)
    with pytest.raises(ConversionError, match="tensor t: float32 values that neither"):
        _scales("t", np.array([0.1], np.float32), "F32")
