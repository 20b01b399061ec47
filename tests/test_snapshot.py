"""State snapshots for multi-turn prefix reuse: restoring one makes every later logit bit-identical, on
both architectures (KV cache rows of the attention layers, conv and recurrent state of the DeltaNet
layers). Tiny random transformers models converted at 16 bits, as in test_models.py."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_fixtures import make_hf_model, save_checkpoint  # noqa: E402

import flashmoe  # noqa: E402
from flashmoe.model import SamplingParams  # noqa: E402

ARCHS = ("qwen3_5_moe", "qwen3_next")
RTOL = 1e-3  # as test_models.py: chunking changes the summation order only
CHUNK = 16


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def packed(arch, tmp_path_factory):
    hf = make_hf_model(arch, seed=0)
    ck = save_checkpoint(hf, tmp_path_factory.mktemp("hf"))
    out = tmp_path_factory.mktemp("packed")
    flashmoe.convert(ck, out, bits=16, progress=False, overwrite=True)
    return str(out)


@pytest.fixture(scope="module")
def model(packed):
    return flashmoe.load(packed, context_length=256, prefill_chunk=CHUNK)


def ids(model, n, seed):
    return np.random.default_rng(seed).integers(0, model.config["vocab_size"], n)


def rel_err(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def state_bytes(cfg, pos):
    conv_dim = 2 * cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"] + \
        cfg["linear_num_value_heads"] * cfg["linear_value_head_dim"]
    total = 0
    for kind in cfg["layer_types"]:
        if kind == "full_attention":
            total += 2 * pos * cfg["num_key_value_heads"] * cfg["head_dim"] * 4
        else:
            total += (cfg["linear_conv_kernel_dim"] - 1) * conv_dim * 4
            total += cfg["linear_num_value_heads"] * cfg["linear_key_head_dim"] * cfg["linear_value_head_dim"] * 4
    return total


@pytest.mark.parametrize("n_a", [32, 27])  # 32: A ends on a chunk boundary; 27: it does not
def test_restore_gives_bit_identical_logits(model, n_a):
    a, b = ids(model, n_a, 1), ids(model, 20, 2)
    model.forward(a)
    snap = model.snapshot()
    assert snap.position == n_a == model.position
    assert snap.nbytes == state_bytes(model.config, n_a)
    x = model.forward(b, reset=False)
    x_step = [model.forward(ids(model, 1, 10 + i), reset=False)[0] for i in range(5)]

    model.forward(ids(model, 40, 3))  # an unrelated sequence in between
    model.restore(snap)
    assert model.position == n_a
    np.testing.assert_array_equal(model.forward(b, reset=False), x)
    np.testing.assert_array_equal(
        np.stack([model.forward(ids(model, 1, 10 + i), reset=False)[0] for i in range(5)]), np.stack(x_step))

    model.restore(snap)  # a snapshot can be restored any number of times
    np.testing.assert_array_equal(model.forward(b, reset=False), x)

    cold = model.forward(np.concatenate([a, b]))[n_a:]
    if n_a % CHUNK == 0:  # cut at a multiple of 16: the DeltaNet chunks fall where they did, the same bits
        np.testing.assert_array_equal(cold, x)
    else:
        assert rel_err(cold, x) <= RTOL


def test_restore_then_greedy_steps(model):
    """The multi-turn use: turn 1, snapshot, turn 2 from the snapshot equals turn 2 after turn 1."""
    a, b = ids(model, 25, 4), ids(model, 9, 5)
    model.forward(a)
    snap = model.snapshot()
    s = model._new_sampler(SamplingParams(temperature=0.0))
    want = [model._step(b, s)]
    while len(want) < 12:
        want.append(model._step([want[-1]], s))
    model.reset()
    model.restore(snap)
    s = model._new_sampler(SamplingParams(temperature=0.0))
    got = [model._step(b, s)]
    while len(got) < 12:
        got.append(model._step([got[-1]], s))
    assert got == want


def test_empty_snapshot_is_a_reset(model):
    model.reset()
    snap = model.snapshot()
    assert snap.position == 0 and snap.nbytes == state_bytes(model.config, 0)
    a = ids(model, 10, 6)
    fresh = model.forward(a)
    model.restore(snap)
    assert model.position == 0
    np.testing.assert_array_equal(model.forward(a, reset=False), fresh)


def test_restore_into_another_context_length_raises(model, packed):
    model.forward(ids(model, 12, 7))
    snap = model.snapshot()
    other = flashmoe.load(packed, context_length=128, prefill_chunk=CHUNK)
    other.forward(ids(model, 5, 8))
    with pytest.raises(ValueError, match="context length 256, this one has 128"):
        other.restore(snap)
    assert other.position == 5  # untouched
    same = flashmoe.load(packed, context_length=256, prefill_chunk=64)  # chunk size is not state
    same.restore(snap)
    assert same.position == 12


def test_restore_into_another_architecture_raises(tmp_path_factory, model):
    other_arch = "qwen3_next" if model.architecture == "qwen3_5_moe" else "qwen3_5_moe"
    hf = make_hf_model(other_arch, seed=0, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
    out = tmp_path_factory.mktemp("other")
    flashmoe.convert(save_checkpoint(hf, tmp_path_factory.mktemp("hfo")), out, bits=16, progress=False,
                     overwrite=True)
    other = flashmoe.load(out, context_length=256)
    model.forward(ids(model, 3, 9))
    with pytest.raises(ValueError, match="the snapshot is of a model with"):
        other.restore(model.snapshot())
