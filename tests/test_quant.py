"""quant.py against straightforward per-group loops and FORMAT.md's rules."""

import numpy as np
import pytest

from flashmoe import quant
from flashmoe.errors import ConversionError


def ref_quantize(w, bits, g):
    """FORMAT.md's quantization written as a plain loop, float32 arithmetic, float16 scale/bias."""
    maxq = (1 << bits) - 1
    out, inf = w.shape
    q = np.zeros((out, inf), np.uint8)
    scales = np.zeros((out, inf // g), np.float16)
    biases = np.zeros((out, inf // g), np.float16)
    for r in range(out):
        for j in range(inf // g):
            grp = w[r, j * g:(j + 1) * g]
            mn, mx = np.float32(grp.min()), np.float32(grp.max())
            s = np.float16((mx - mn) / np.float32(maxq))
            b = np.float16(mn)
            scales[r, j], biases[r, j] = s, b
            for c in range(g):
                if s == 0:
                    q[r, j * g + c] = 0
                else:
                    v = (grp[c] - np.float32(b)) / np.float32(s)
                    q[r, j * g + c] = min(max(round(float(v)), 0), maxq)
    if bits == 4:
        packed = np.zeros((out, inf // 2), np.uint8)
        for r in range(out):
            for c in range(inf // 2):
                packed[r, c] = q[r, 2 * c] | (q[r, 2 * c + 1] << 4)
        q = packed
    return q, scales, biases


def error_bound(w, scales, biases, bits, g):
    """|w - deq| <= scale/2 plus what rounding scale and bias to float16 costs, per group."""
    maxq = (1 << bits) - 1
    grp = w.reshape(w.shape[0], -1, g)
    mn, mx = grp.min(axis=2), grp.max(axis=2)
    s, b = scales.astype(np.float32), biases.astype(np.float32)
    exact = (mx - mn) / maxq
    bound = s / 2 + np.abs(b - mn) + maxq * np.abs(s - exact)
    bound = bound + 4 * np.finfo(np.float32).eps * np.maximum(np.abs(mn), np.abs(mx))  # float32 arithmetic
    return np.repeat(bound, g, axis=1)


AWKWARD = [((7, 48), 16), ((5, 96), 32), ((3, 64), 64), ((9, 80), 16), ((2, 256), 128)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,g", AWKWARD)
def test_quantize_matches_reference_loop(bits, shape, g):
    rng = np.random.default_rng(sum(shape) + bits)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3, (shape[0], 1))).astype(np.float32)
    w[0, :g] = 0.375  # a constant group
    q, s, b = quant.quantize(w, bits, g)
    rq, rs, rb = ref_quantize(w, bits, g)
    assert q.dtype == np.uint8 and s.dtype == np.float16 and b.dtype == np.float16
    np.testing.assert_array_equal(s, rs)
    np.testing.assert_array_equal(b, rb)
    np.testing.assert_array_equal(q, rq)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,g", AWKWARD)
def test_dequantize_error_bound(bits, shape, g):
    rng = np.random.default_rng(7)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    q, s, b = quant.quantize(w, bits, g)
    deq = quant.dequantize(q, s, b, bits, g, shape)
    assert deq.dtype == np.float32 and deq.shape == shape
    err = np.abs(w - deq)
    assert (err <= error_bound(w, s, b, bits, g)).all()
    # and the bound is not vacuous: it is about half a quantization step
    assert err.max() <= s.astype(np.float32).max() * 0.51 + 1e-3 * np.abs(w).max()


def test_constant_group_is_exact():
    w = np.full((2, 32), 0.1875, np.float32)
    w[1, 16:] = -2.5
    q, s, b = quant.quantize(w, 4, 16)
    assert (s == 0).all() and (q == 0).all()
    np.testing.assert_array_equal(b.astype(np.float32), [[0.1875, 0.1875], [0.1875, -2.5]])
    np.testing.assert_array_equal(quant.dequantize(q, s, b, 4, 16, w.shape), w)


def test_q4_nibble_order():
    # min 0, max 15 -> scale 1, bias 0, q = w
    w = np.array([[0, 15, 3, 12] + [7] * 12], np.float32)
    q, s, b = quant.quantize(w, 4, 16)
    assert s[0, 0] == 1 and b[0, 0] == 0
    assert q[0, 0] == 0xF0  # element 0 in the low nibble, element 1 in the high nibble
    assert q[0, 1] == 0xC3
    np.testing.assert_array_equal(quant.unpack(q, 4, 16)[0], w[0].astype(np.uint8))


def test_q8_exact_on_grid():
    # 256 levels spaced 0.5 apart: scale 0.5 and bias -10 are exact in float16, so is every value
    w = (np.arange(256, dtype=np.float32) * 0.5 - 10)[::-1].reshape(1, 256).copy()
    q, s, b = quant.quantize(w, 8, 256)
    assert s[0, 0] == 0.5 and b[0, 0] == -10
    np.testing.assert_array_equal(quant.dequantize(q, s, b, 8, 256, w.shape), w)


def test_pick_group_size_fallback():
    assert quant.pick_group_size(4096, 64) == 64
    assert quant.pick_group_size(96, 64) == 32
    assert quant.pick_group_size(80, 64) == 16
    assert quant.pick_group_size(48, 128) == 16
    with pytest.raises(ConversionError, match="layers.0.mlp.down_proj.*100"):
        quant.pick_group_size(100, 64, "layers.0.mlp.down_proj")


def test_bf16_round_to_nearest_even():
    one = 1.0
    vals = np.array([one, one + 2**-8, one + 3 * 2**-8, one + 2**-8 + 2**-20, -3.0e38, 1e-40, np.inf, -np.inf],
                    np.float32)
    bits = quant.f32_to_bf16(vals)
    back = quant.bf16_to_f32(bits)
    assert back[0] == 1.0
    assert back[1] == 1.0  # halfway: ties to the even mantissa
    assert back[2] == one + 2**-6  # halfway: ties up to even
    assert back[3] == one + 2**-7  # above halfway rounds up
    assert back[4] == np.float32(-3.0e38) or abs(back[4] + 3.0e38) / 3.0e38 < 2**-8
    assert back[6] == np.inf and back[7] == -np.inf
    assert np.isnan(quant.bf16_to_f32(quant.f32_to_bf16(np.array([np.nan], np.float32))))[0]


@pytest.mark.torch
def test_bf16_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * 1e3
    ours = quant.f32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(quant.bf16_to_f32(ours), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_quantize_rejects_non_finite():
    w = np.zeros((1, 16), np.float32)
    w[0, 3] = np.nan
    with pytest.raises(ConversionError, match="NaN"):
        quant.quantize(w, 4, 16)
