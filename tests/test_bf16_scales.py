"""A load spec whose q4/q8 tensors carry "scale_bf16" has their scales and biases read as bfloat16 (MLX
checkpoints), in the dense weights and in the experts: csrc/python/module.cpp to_desc -> fm_tensor_desc
-> fm_mat_view, and the expert store's views. The kernels themselves are tests/test_ops.py's.

A tiny synthetic model (no torch) has its scales and biases rounded to values both float16 and bfloat16
hold exactly; one copy keeps them as float16, another stores the same values as bfloat16 and says so in
the spec. Both compute with the same fp32 numbers, so their logits must agree bitwise; a flag that does
not reach a matrix leaves it reading bf16 bits as fp16, which is far off. (The Python side that fills the
key from a checkpoint is python/flashmoe/model.py's; here the spec is edited directly, as
tests/test_engine_errors.py does.)
"""

import os
import shutil

import numpy as np
import pytest

from flashmoe import _core
from flashmoe.errors import FlashMoEError
from flashmoe.format import PREAMBLE
from flashmoe.model import _load_spec
from flashmoe.synth import write_random_model
from test_engine_errors import TINY


def both_exact(f16):
    """float16 values (uint16 bits) moved to ones bfloat16 holds exactly too: the top 16 bits of their
    float32, back to float16 (exact, or closer to 0 for float16 subnormals: repeat until it holds)."""
    v = f16.view(np.float16).astype(np.float32)
    while True:
        t = (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
        t16 = t.astype(np.float16)
        if np.array_equal(t16.astype(np.float32), v):
            return t16.view(np.uint16), (v.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
        v = t16.astype(np.float32)


def quantized_arrays(spec):
    """(path, byte offset, count) of every scales and biases array the spec's q4/q8 tensors have."""
    out = []
    for d in spec["dense"]:
        if "group_size" in d:
            n = d["shape"][0] * (d["shape"][1] // d["group_size"])
            out += [(spec["dense_path"], d[k], n) for k in ("scales_offset", "biases_offset")]
    for path in filter(None, spec["expert_paths"]):
        for e in range(spec["config"]["num_experts"]):
            blob = PREAMBLE + e * spec["expert_stride"]
            for d in spec["expert_tensors"]:
                n = d["shape"][0] * (d["shape"][1] // d["group_size"])
                out += [(path, blob + d[k], n) for k in ("scales_offset", "biases_offset")]
    return out


def rewrite(path, offset, values):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.ascontiguousarray(values, np.uint16).tobytes())


@pytest.fixture(scope="module", params=[4, 8], ids=["q4", "q8"])
def pair(request, tmp_path_factory):
    """(spec with fp16 scales, spec with the same values as bf16 scales and the flag), of copies of a model."""
    root = tmp_path_factory.mktemp(f"bf16-q{request.param}")
    write_random_model(root / "f16", TINY, bits=request.param, progress=False)
    shutil.copytree(root / "f16", root / "bf16")
    specs = {k: _load_spec(os.fspath(root / k))[1] for k in ("f16", "bf16")}
    arrays = {k: quantized_arrays(s) for k, s in specs.items()}
    assert len(arrays["f16"]) > 6 * TINY["num_experts"]  # the dense q4/q8 tensors and every expert's
    for (p16, off, n), (pbf, _, _) in zip(arrays["f16"], arrays["bf16"]):
        with open(p16, "rb") as f:
            f.seek(off)
            f16, bf16 = both_exact(np.frombuffer(f.read(2 * n), np.uint16))
        rewrite(p16, off, f16)
        rewrite(pbf, off, bf16)
    for s in specs.values():  # the files changed after the header's checksums were taken
        s["has_dense_checksum"] = False
    bf = specs["bf16"]
    for d in bf["dense"] + bf["expert_tensors"]:
        if "group_size" in d:
            d["scale_bf16"] = True
    return specs["f16"], bf


@pytest.mark.parametrize("int8", [True, False], ids=["int8-act", "fp32-act"])
def test_bf16_scales_reach_every_matrix(pair, int8):
    spec16, spec_bf = ({**s, "int8_activations": int8} for s in pair)
    ids = (np.arange(11, dtype=np.int32) * 37) % TINY["vocab_size"]
    logits = []
    for spec in (spec16, spec_bf):
        m = _core.Model(spec)
        m.reset()
        prompt = m.forward(ids[:-1], True)  # prefill: the several-token kernels
        logits.append(np.concatenate([prompt, m.forward(ids[-1:], True)]))  # then one token: decode
    assert np.isfinite(logits[0]).all() and np.abs(logits[0]).max() > 0.1
    np.testing.assert_array_equal(logits[1], logits[0])


def test_without_the_flag_bf16_bits_read_as_fp16_are_wrong(pair):
    """The check above can tell: the bf16 model's files read without the flag give other logits."""
    spec16, spec_bf = pair
    unflagged = {**spec_bf, "dense": [{k: v for k, v in d.items() if k != "scale_bf16"} for d in spec_bf["dense"]]}
    ids = (np.arange(5, dtype=np.int32) * 37) % TINY["vocab_size"]
    a, b = _core.Model(spec16), _core.Model(unflagged)
    a.reset(), b.reset()
    assert not np.allclose(a.forward(ids, True), b.forward(ids, True), atol=1e-2)


def test_the_loader_refuses_the_flag_where_it_means_nothing(pair):
    """scale_bf16 on a tensor without scales (f32 norm, bf16 router) is a malformed spec, not ignored."""
    _, spec_bf = pair
    for name, dtype in (("norm.weight", "f32"), ("layers.0.mlp.gate.weight", "bf16")):
        spec = {**spec_bf, "dense": [dict(d) for d in spec_bf["dense"]]}
        next(d for d in spec["dense"] if d["name"] == name)["scale_bf16"] = 1
        with pytest.raises(FlashMoEError, match=rf"tensor {name}: scale_bf16 1 on a {dtype} tensor"):
            _core.Model(spec)
