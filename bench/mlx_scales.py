"""Which MLX scales and biases would float16 round? (why an MLX import keeps them in bfloat16)

    python bench/mlx_scales.py

MLX quantizes a bf16 model with bf16 scales and biases. float16 holds a bf16 value exactly only from
2^-17 up (its subnormals lose the low bits below that) and below 65504. This quantizes, with MLX itself
(mx.quantize, as mlx-lm does), tensors at Qwen3.5-397B-A17B's real shapes filled with random weights of a
range of standard deviations (trained projections sit near 0.01-0.05), plus the degenerate groups real
checkpoints have (all-zero rows: padded vocabulary entries), and counts the values float16 would change.
Prints a table and a JSON line.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

# [out, in] of one tensor per kind, Qwen3.5-397B-A17B (rows sampled where the tensor is larger)
SHAPES = {"routed expert gate_proj": (1024, 4096), "routed expert down_proj": (4096, 1024),
          "deltanet in_proj_qkv": (12288, 4096), "router mlp.gate (8-bit)": (512, 4096),
          "embed_tokens (16384 of 248320 rows)": (16384, 4096)}


def inexact(a: mx.array) -> tuple[int, int]:
    """(values float16 would round, of them below float16's normal range)."""
    f = np.array(a.astype(mx.float32))
    back = f.astype(np.float16).astype(np.float32)
    bad = back != f
    return int(bad.sum()), int((bad & (np.abs(f) < 2.0**-14)).sum())


def main() -> None:
    rows = []
    print(f"{'tensor':>36} {'std':>7} {'groups':>9} {'scales f16-inexact':>19} {'biases':>8}")
    for kind, (out, inf) in SHAPES.items():
        bits = 8 if "8-bit" in kind else 4
        for std in (0.05, 0.01, 0.002, 0.0):
            key = mx.random.key(0)
            w = (mx.random.normal((out, inf), key=key) * std).astype(mx.bfloat16)
            if std == 0.0:  # a real weight tensor with 1% all-zero rows (the rest at 0.01)
                w = (mx.random.normal((out, inf), key=key) * 0.01).astype(mx.bfloat16)
                w[: max(1, out // 100)] = 0
            _, scales, biases = mx.quantize(w, group_size=64, bits=bits)
            (s_bad, s_sub), (b_bad, _) = inexact(scales), inexact(biases)
            label = "0.01 + 1% zero rows" if std == 0.0 else f"{std:g}"
            print(f"{kind:>36} {label:>7} {scales.size:>9} {s_bad:>10} ({s_sub} sub) {b_bad:>8}")
            rows.append({"tensor": kind, "std": label, "groups": scales.size, "scales_f16_inexact": s_bad,
                         "scales_below_f16_normal": s_sub, "biases_f16_inexact": b_bad})
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
