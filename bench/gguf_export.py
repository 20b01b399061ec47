"""Export a packed flashmoe Qwen3.5-MoE model to GGUF for llama.cpp (arch `qwen35moe`), for benchmarks.

    python bench/gguf_export.py PACKED_DIR OUT.gguf [--type q8_0|q4_0|q4_1|f16|f32]

A bench tool, not part of the package: it needs the optional `gguf` package (`pip install gguf`) and
reads the packed model with flashmoe.reader.PackedReader, so the GGUF holds the same weights as the
packed model (the packed model's dequantized values), requantized to --type:

  q8_0  ggml Q8_0 (blocks of 32, one float16 scale, symmetric int8): 8.5 bits/weight.
  q4_0  ggml Q4_0 (blocks of 32, one float16 scale, symmetric 4-bit): 4.5 bits/weight, the same bytes
        per weight as flashmoe's 4-bit (group 64, float16 scale + bias). Lossy: a re-quantization.
  q4_1  ggml Q4_1 (blocks of 32, float16 scale + min, affine 4-bit): 5.0 bits/weight. From a 4-bit
        packed model with group size a multiple of 32 it is EXACT: each 32-block takes its group's
        scale and bias and the same levels (w = d*q + m is flashmoe's w = scale*q + bias), so the
        weights are bit-for-bit the same function. Otherwise a re-quantization.
  f16, f32  plain floats (f32 is exact for any packed model; small models only).

Tensors that flashmoe keeps in high precision (norms, conv1d, A_log, dt_bias, routers, in_proj_a/b,
shared_expert_gate) are written as F32 whatever --type says (exact: they are f32 or bf16 in the
packed model).

What llama.cpp's qwen35moe loader expects (read from llama.cpp's convert_hf_to_gguf.py, Qwen3.5-MoE
handling, and src/models/qwen35moe.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors):
  - names from gguf's TENSOR_NAMES: token_embd, output, output_norm, blk.N.{attn_norm,
    post_attention_norm, attn_q, attn_k, attn_v, attn_output, attn_q_norm, attn_k_norm, attn_qkv
    (in_proj_qkv), attn_gate (in_proj_z), ssm_beta (in_proj_b), ssm_alpha (in_proj_a), ssm_conv1d,
    ssm_dt.bias (dt_bias), ssm_a, ssm_norm, ssm_out (out_proj), ffn_gate_inp (router),
    ffn_{gate,up,down}_exps (3-D, [E, out, in] in numpy order = ggml ne {in, out, E}),
    ffn_{gate,up,down}_shexp, ffn_gate_inp_shexp (1-D [H])};
  - numpy [out, in] matrices (ggml ne {in, out}); conv1d as [channels, kernel];
  - zero-centred RMSNorm weights stored as 1 + w (input, post-attention, final, q_norm, k_norm; not
    the DeltaNet gated norm, which multiplies by w itself);
  - ssm_a = -exp(A_log);
  - DeltaNet value heads reordered from grouped-by-key-head to tiled order ([G0v0, G1v0, .., G0v1, ..])
    in in_proj_qkv's v rows, in_proj_z, in_proj_b/a, A_log, dt_bias, conv1d's v channels and out_proj's
    columns, because ggml broadcasts key heads over value heads tiled;
  - q_proj stays interleaved per head [query | gate], as in the checkpoint;
  - metadata: qwen35moe.{context_length, embedding_length, block_count, attention.head_count,
    attention.head_count_kv, attention.key_length, attention.value_length,
    attention.layer_norm_rms_epsilon, expert_count, expert_used_count, expert_feed_forward_length,
    expert_shared_feed_forward_length, rope.freq_base, rope.dimension_count (head_dim x
    partial_rotary_factor), rope.dimension_sections ([11, 11, 10, 0]: interleaved mRoPE, which reduces
    to plain RoPE for text), ssm.conv_kernel, ssm.state_size (key head dim), ssm.group_count (key
    heads), ssm.time_step_rank (value heads), ssm.inner_size (value heads x value head dim),
    full_attention_interval (and attention.recurrent_layers when layer_types break the pattern),
    vocab_size}; tokenizer.ggml.model = "none" (no tokenizer: both engines take token ids).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

try:
    import gguf
except ImportError:  # the bench's optional dependency
    sys.exit("bench/gguf_export.py needs the gguf package: pip install gguf")

from flashmoe import quant
from flashmoe.format import EXPERT_NAMES
from flashmoe.reader import PackedReader

T = gguf.MODEL_TENSOR
QT = gguf.GGMLQuantizationType
TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1}
FILE_TYPES = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
              QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
              QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1}
ARCH = gguf.MODEL_ARCH.QWEN35MOE
MROPE_SECTIONS = [11, 11, 10, 0]  # what llama.cpp's converter writes for Qwen3.5 (all equal for text)
_ROW_CHUNK = 8192  # rows of a big matrix (embedding, lm_head) converted at a time

# packed name suffix -> (gguf tensor, gguf suffix, kind). kinds: "q" quantized matrix, "f" f32 kept,
# "norm1" zero-centred norm (+1), "alog" (-exp).
_LAYER_MAP = {
    "input_layernorm.weight": (T.ATTN_NORM, "weight", "norm1"),
    "post_attention_layernorm.weight": (T.ATTN_POST_NORM, "weight", "norm1"),
    "self_attn.q_proj.weight": (T.ATTN_Q, "weight", "q"),
    "self_attn.k_proj.weight": (T.ATTN_K, "weight", "q"),
    "self_attn.v_proj.weight": (T.ATTN_V, "weight", "q"),
    "self_attn.o_proj.weight": (T.ATTN_OUT, "weight", "q"),
    "self_attn.q_norm.weight": (T.ATTN_Q_NORM, "weight", "norm1"),
    "self_attn.k_norm.weight": (T.ATTN_K_NORM, "weight", "norm1"),
    "linear_attn.in_proj_qkv.weight": (T.ATTN_QKV, "weight", "q"),
    "linear_attn.in_proj_z.weight": (T.ATTN_GATE, "weight", "q"),
    "linear_attn.in_proj_b.weight": (T.SSM_BETA, "weight", "f"),
    "linear_attn.in_proj_a.weight": (T.SSM_ALPHA, "weight", "f"),
    "linear_attn.conv1d.weight": (T.SSM_CONV1D, "weight", "f"),
    "linear_attn.dt_bias": (T.SSM_DT, "bias", "f"),
    "linear_attn.A_log": (T.SSM_A, None, "alog"),
    "linear_attn.norm.weight": (T.SSM_NORM, "weight", "f"),
    "linear_attn.out_proj.weight": (T.SSM_OUT, "weight", "q"),
    "mlp.gate.weight": (T.FFN_GATE_INP, "weight", "f"),
    "mlp.shared_expert.gate_proj.weight": (T.FFN_GATE_SHEXP, "weight", "q"),
    "mlp.shared_expert.up_proj.weight": (T.FFN_UP_SHEXP, "weight", "q"),
    "mlp.shared_expert.down_proj.weight": (T.FFN_DOWN_SHEXP, "weight", "q"),
    "mlp.shared_expert_gate.weight": (T.FFN_GATE_INP_SHEXP, "weight", "f"),
}
_TOP_MAP = {
    "embed_tokens.weight": (T.TOKEN_EMBD, "weight", "q"),
    "lm_head.weight": (T.OUTPUT, "weight", "q"),
    "norm.weight": (T.OUTPUT_NORM, "weight", "norm1"),
}
_EXPERT_MAP = {"gate_proj": T.FFN_GATE_EXP, "up_proj": T.FFN_UP_EXP, "down_proj": T.FFN_DOWN_EXP}


def gguf_name(tensor: T, suffix: str | None, bid: int | None = None) -> str:
    if tensor not in gguf.MODEL_TENSORS[ARCH]:
        raise ValueError(f"{gguf.TENSOR_NAMES[tensor]} is not a qwen35moe tensor in this gguf package")
    name = gguf.TENSOR_NAMES[tensor].format(bid=bid)
    return f"{name}.{suffix}" if suffix else name


def map_name(packed: str) -> tuple[str, str]:
    """packed tensor name -> (gguf name, kind)."""
    if packed in _TOP_MAP:
        t, suffix, kind = _TOP_MAP[packed]
        return gguf_name(t, suffix), kind
    _, bid, rest = packed.split(".", 2)
    t, suffix, kind = _LAYER_MAP[rest]
    return gguf_name(t, suffix, int(bid)), kind


# -- the DeltaNet value-head reorder -------------------------------------------------------------------

def reorder_v_heads(a: np.ndarray, axis: int, hk: int, r: int, hd: int) -> np.ndarray:
    """Value heads along `axis` (hk*r heads of hd, grouped by key head) -> tiled order."""
    shape = list(a.shape)
    a = a.reshape(shape[:axis] + [hk, r, hd] + shape[axis + 1:])
    return np.ascontiguousarray(np.swapaxes(a, axis, axis + 1)).reshape(shape)


def transform(rest: str, a: np.ndarray, cfg: dict) -> np.ndarray:
    """The layout changes llama.cpp needs for one layer tensor (float arrays; rest = name after
    `layers.N.`). Used on weights and, for exact Q4_1, on their per-element scales and biases."""
    hk, hv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    r = hv // hk
    if r == 1 or not rest.startswith("linear_attn."):
        return a
    qk = 2 * hk * dk
    if rest in ("linear_attn.in_proj_qkv.weight", "linear_attn.conv1d.weight"):
        return np.concatenate([a[:qk], reorder_v_heads(a[qk:], 0, hk, r, dv)])
    if rest == "linear_attn.in_proj_z.weight":
        return reorder_v_heads(a, 0, hk, r, dv)
    if rest in ("linear_attn.in_proj_b.weight", "linear_attn.in_proj_a.weight", "linear_attn.A_log",
                "linear_attn.dt_bias"):
        return reorder_v_heads(a, 0, hk, r, 1)
    if rest == "linear_attn.out_proj.weight":
        return reorder_v_heads(a, 1, hk, r, dv)
    return a


# -- encodings ---------------------------------------------------------------------------------------

def encode_q4_1_exact(w: np.ndarray, s: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Q4_1 blocks of w whose every 32-block is d*q + m with d = s, m = b there (levels recovered)."""
    rows, cols = w.shape
    nb = cols // 32
    d = s[:, ::32].astype(np.float16)
    m = b[:, ::32].astype(np.float16)
    df, mf = d.astype(np.float32)[:, :, None], m.astype(np.float32)[:, :, None]
    q = (w.reshape(rows, nb, 32) - mf) / np.where(df > 0, df, np.float32(np.inf))
    q = np.clip(np.rint(q), 0, 15).astype(np.uint8)
    packed = q[:, :, :16] | (q[:, :, 16:] << np.uint8(4))  # element j low nibble, j+16 high
    out = np.empty((rows, nb, 20), np.uint8)
    out[:, :, 0:2] = d.view(np.uint8).reshape(rows, nb, 2)
    out[:, :, 2:4] = m.view(np.uint8).reshape(rows, nb, 2)
    out[:, :, 4:] = packed
    return out.reshape(rows, nb * 20)


def encode(w: np.ndarray, qtype: QT, s=None, b=None) -> np.ndarray:
    if qtype == QT.Q4_1 and s is not None:
        return encode_q4_1_exact(w, s, b)
    return gguf.quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)


def byte_shape(shape, qtype: QT) -> tuple:
    if qtype in (QT.F32, QT.F16):
        return tuple(shape)
    return gguf.quants.quant_shape_to_byte_shape(shape, qtype)


def nbytes_of(shape, qtype: QT) -> int:
    if qtype == QT.F32:
        return 4 * math.prod(shape)
    if qtype == QT.F16:
        return 2 * math.prod(shape)
    return math.prod(byte_shape(shape, qtype))


# -- the exporter -------------------------------------------------------------------------------------

class Exporter:
    def __init__(self, packed_dir: str, qtype: QT):
        self.reader = PackedReader(packed_dir)
        self.header = self.reader.header
        if self.header["architecture"] != "qwen3_5_moe":
            raise SystemExit(f"{packed_dir}: architecture {self.header['architecture']}; this exporter "
                             f"writes qwen35moe (Qwen3.5-MoE) only")
        self.cfg = self.header["config"]
        self.qtype = qtype
        bits = self.header["quantization"]["bits"]
        self.exact_q4_1 = qtype == QT.Q4_1 and bits == 4

    def _exact_ok(self, t: dict) -> bool:
        return self.exact_q4_1 and t["dtype"] == "q4" and t["group_size"] % 32 == 0

    # one dense tensor: the encoded array, possibly in row chunks (a list of arrays to concatenate)
    def dense(self, packed: str, kind: str) -> np.ndarray:
        t = self.header["dense"]["tensors"][packed]
        rest = packed.split(".", 2)[2] if packed.startswith("layers.") else packed
        if kind != "q":
            a = self.reader.tensor(packed)
            if kind == "norm1":
                a = a + np.float32(1)
            elif kind == "alog":
                a = -np.exp(a)
            if rest == "mlp.shared_expert_gate.weight":
                a = a.reshape(-1)
            return np.ascontiguousarray(transform(rest, a, self.cfg), dtype=np.float32)
        if t["dtype"] in ("f32", "bf16"):
            a = transform(rest, self.reader.tensor(packed), self.cfg)
            return encode(a, self.qtype)
        parts = self.reader.tensor_parts(packed)
        bits, g, shape = (4 if t["dtype"] == "q4" else 8), t["group_size"], t["shape"]
        exact = self._exact_ok(t)
        chunks = []
        step = _ROW_CHUNK if rest == packed else shape[0]  # layer tensors are small and may be permuted
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            q, s, bb = parts["q"][r0:r1], parts["scales"][r0:r1], parts["biases"][r0:r1]
            w = transform(rest, quant.dequantize(q, s, bb, bits, g, (r1 - r0, shape[1])), self.cfg)
            if exact:
                se = transform(rest, np.repeat(s.astype(np.float32), g, axis=1), self.cfg)
                be = transform(rest, np.repeat(bb.astype(np.float32), g, axis=1), self.cfg)
                chunks.append(encode(w, self.qtype, se, be))
            else:
                chunks.append(encode(w, self.qtype))
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def experts(self, layer: int, proj: str) -> np.ndarray:
        """One layer's experts of one projection: [E, out, in] encoded."""
        t = self.header["experts"]["tensors"][proj]
        n_exp = self.cfg["num_experts"]
        shape = t["shape"]
        dtype = np.float32 if self.qtype == QT.F32 else np.float16 if self.qtype == QT.F16 else np.uint8
        out = np.empty((n_exp,) + byte_shape(shape, self.qtype), dtype)
        k = EXPERT_NAMES.index(proj)
        bits, g = (4 if t["dtype"] == "q4" else 8), t.get("group_size")
        exact = self._exact_ok(t)
        for e in range(n_exp):
            if t["dtype"] in ("q4", "q8"):
                p = self.reader.expert_parts(layer, e)[k]
                w = quant.dequantize(p["q"], p["scales"], p["biases"], bits, g, tuple(shape))
                if exact:
                    out[e] = encode(w, self.qtype, np.repeat(p["scales"].astype(np.float32), g, axis=1),
                                    np.repeat(p["biases"].astype(np.float32), g, axis=1))
                    continue
            else:
                w = self.reader.expert(layer, e)[k]
            out[e] = encode(w, self.qtype)
        return out

    def plan(self):
        """[(gguf name, numpy shape of the tensor's values, ggml type, producer)] in file order."""
        items = []
        tensors = self.header["dense"]["tensors"]
        for packed, t in tensors.items():
            name, kind = map_name(packed)
            shape = list(t["shape"])
            if packed.endswith("mlp.shared_expert_gate.weight"):
                shape = [shape[1]]
            qt = self.qtype if kind == "q" else QT.F32
            items.append((name, shape, qt, lambda p=packed, k=kind: self.dense(p, k)))
        for entry in self.header["experts"]["layers"]:
            layer = entry["layer"]
            for proj in EXPERT_NAMES:
                shape = [self.cfg["num_experts"]] + list(self.header["experts"]["tensors"][proj]["shape"])
                items.append((gguf_name(_EXPERT_MAP[proj], "weight", layer), shape, self.qtype,
                              lambda li=layer, p=proj: self.experts(li, p)))
        return items

    def metadata(self, w: gguf.GGUFWriter, name: str) -> None:
        c = self.cfg
        rope = c["rope_parameters"]
        w.add_name(name)
        w.add_file_type(FILE_TYPES[self.qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(int(c.get("max_position_embeddings") or 4096))
        w.add_embedding_length(c["hidden_size"])
        w.add_block_count(c["num_hidden_layers"])
        w.add_head_count(c["num_attention_heads"])
        w.add_head_count_kv(c["num_key_value_heads"])
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
        w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
        w.add_expert_count(c["num_experts"])
        w.add_expert_used_count(c["num_experts_per_tok"])
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
        w.add_rope_freq_base(float(rope["rope_theta"]))
        w.add_rope_dimension_count(int(c["head_dim"] * float(rope.get("partial_rotary_factor", 1.0))))
        w.add_rope_dimension_sections(MROPE_SECTIONS)
        w.add_ssm_conv_kernel(c["linear_conv_kernel_dim"])
        w.add_ssm_state_size(c["linear_key_head_dim"])
        w.add_ssm_group_count(c["linear_num_key_heads"])
        w.add_ssm_time_step_rank(c["linear_num_value_heads"])
        w.add_ssm_inner_size(c["linear_value_head_dim"] * c["linear_num_value_heads"])
        w.add_full_attention_interval(4)
        recurrent = [t == "linear_attention" for t in c["layer_types"]]
        if recurrent != [(i + 1) % 4 != 0 for i in range(len(recurrent))]:
            w.add_array(f"{w.arch}.attention.recurrent_layers", recurrent)
        w.add_vocab_size(c["vocab_size"])
        w.add_tokenizer_model("none")

    def write(self, out_path: str, progress: bool = True) -> dict:
        c = self.cfg
        if c["linear_key_head_dim"] != c["linear_value_head_dim"]:
            raise SystemExit("llama.cpp's qwen35moe assumes linear_key_head_dim == linear_value_head_dim")
        items = self.plan()
        tmp = out_path + ".part"
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCH])
        self.metadata(w, os.path.basename(os.path.normpath(self.reader.path)))
        for name, shape, qt, _ in items:
            np_dtype = np.float32 if qt == QT.F32 else np.float16 if qt == QT.F16 else np.uint8
            w.add_tensor_info(name, byte_shape(shape, qt), np.dtype(np_dtype), nbytes_of(shape, qt),
                              raw_dtype=None if qt in (QT.F32, QT.F16) else qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total = sum(nbytes_of(s, qt) for _, s, qt, _ in items)
        done, t0 = 0, time.perf_counter()
        for name, shape, qt, make in items:
            a = make()
            want = nbytes_of(shape, qt)
            if a.nbytes != want:
                raise RuntimeError(f"{name}: made {a.nbytes} bytes, expected {want}")
            w.write_tensor_data(a)
            done += a.nbytes
            if progress and sys.stderr.isatty():
                print(f"\r  gguf {done / 1e9:.2f}/{total / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)",
                      end="", file=sys.stderr, flush=True)
        w.close()
        if progress and sys.stderr.isatty():
            print(file=sys.stderr)
        os.replace(tmp, out_path)
        return {"path": out_path, "type": self.qtype.name, "bytes": os.path.getsize(out_path),
                "tensor_bytes": total, "exact": self.exact_q4_1 or self.qtype == QT.F32,
                "seconds": time.perf_counter() - t0}


def export(packed_dir: str, out_path: str, qtype: str = "q8_0", progress: bool = True) -> dict:
    """Write the packed model at packed_dir as a qwen35moe GGUF of type qtype. Returns sizes."""
    if qtype.lower() not in TYPES:
        raise ValueError(f"type must be one of {', '.join(TYPES)}, got {qtype!r}")
    return Exporter(packed_dir, TYPES[qtype.lower()]).write(out_path, progress)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("packed", help="a packed flashmoe model directory (Qwen3.5-MoE)")
    ap.add_argument("out", help="the GGUF file to write")
    ap.add_argument("--type", default="q8_0", choices=sorted(TYPES))
    args = ap.parse_args()
    r = export(args.packed, args.out, args.type)
    print(f"{r['path']}: {r['type']}, {r['bytes'] / 1e9:.3f} GB"
          f"{' (exact transcoding)' if r['exact'] else ''}, {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
