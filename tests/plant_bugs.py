#!/usr/bin/env python3
"""Plant deliberate bugs, one at a time, in a copy of the project and report which ones the tests catch.

Not a test (pytest collects test_*.py only) and not run by CI: rerun it after big changes, and add a plant
whenever a bug escapes the suite. Each plant is a small textual patch (the text must occur exactly once,
so a plant that no longer applies is reported, not skipped) and the tests that should catch it.

    python tests/plant_bugs.py                 # every plant
    python tests/plant_bugs.py --only rope_sign lfru_is_lru
    python tests/plant_bugs.py --list

It copies the working tree (tracked and untracked files, not ignored ones) to a temporary directory, builds
it there into a --target directory (pip install --no-deps --no-build-isolation, so the interpreter running
this needs the build requirements: scikit-build-core, pybind11, cmake, ninja; later builds are incremental),
runs the plant's tests unplanted once (they must pass) and then planted, and prints a table: caught (with
the number of failing tests) or ESCAPED.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Plant:
    name: str
    file: str
    old: str
    new: str
    tests: list  # pytest arguments: files, node ids, -k expressions
    what: str


PLANTS = [
    # -- the first four, from issue 21's introduction
    Plant("rope_sign", "csrc/backend/cpu/ops.c",
          "xh[i] = x1 * c - x2 * s;", "xh[i] = x1 * c + x2 * s;",
          ["tests/test_ops.py", "-k", "rope"], "RoPE rotates the wrong way"),
    Plant("quant_group_swap", "csrc/backend/cpu/ops.c",
          """            const uint8_t *q = (const uint8_t *)w->data + (size_t)r * (n / 2);
            for (int g = 0; g < ng; g++) {
                const float s = sc[g], b = bi[g];""",
          """            const uint8_t *q = (const uint8_t *)w->data + (size_t)r * (n / 2);
            for (int g = 0; g < ng; g++) {
                const float s = sc[g ^ (ng > 1)], b = bi[g ^ (ng > 1)];""",
          ["tests/test_ops.py", "-k", "get_row or matmul"], "q4 rows dequantized with a neighbour group's scale"),
    Plant("router_drops_kth", "csrc/backend/cpu/backend_cpu.c",
          "        for (int j = 0; j < k; j++) {\n            const float w = wt",
          "        for (int j = 0; j < k - 1; j++) {\n            const float w = wt",
          ["tests/test_models.py", "tests/test_ops.py", "-k", "prefill_matches or decode_token or moe_combine"],
          "the k-th routed expert is left out"),
    Plant("decode_router_unnormalised", "csrc/core/blocks.c",
          "FM_OP(be, route, s->logits, T, E, k, norm_topk, s->topk",
          "FM_OP(be, route, s->logits, T, E, k, norm_topk && T > 1, s->topk",
          ["tests/test_models.py", "-k", "decode_token"], "decode steps skip the top-k renormalisation"),
    # -- issue 21, item 1: the prompt cache
    Plant("prompt_cache_current_last_token", "python/flashmoe/generation.py",
          "if 0 < n < len(prompt) and prompt[:n] == held:",
          "if 0 < n < len(prompt) and prompt[:n - 1] == held[:n - 1]:",
          ["tests/test_prompt_cache.py"], "the current state is reused when all but its last token match"),
    Plant("prompt_cache_snapshot_last_token", "python/flashmoe/generation.py",
          "if best_len < k < len(prompt) and prompt[:k] == toks:",
          "if best_len < k < len(prompt) and prompt[:k - 1] == toks[:k - 1]:",
          ["tests/test_prompt_cache.py"], "a snapshot is reused when all but its last token match"),
    Plant("prompt_cache_fifo", "python/flashmoe/generation.py",
          "toks, snap = self._snaps.pop(best)\n            self._snaps.append((toks, snap))",
          "toks, snap = self._snaps[best]",
          ["tests/test_prompt_cache.py"], "snapshots dropped first in, first out instead of least recently used"),
    Plant("prompt_cache_over_cap", "python/flashmoe/generation.py",
          "while len(self._snaps) > self.capacity:", "while len(self._snaps) > self.capacity + 1:",
          ["tests/test_prompt_cache.py"], "one snapshot more than prompt_cache is kept"),
    # -- item 3: the sampler at 248k tokens
    Plant("top_p_block_skip_off_by_one", "csrc/core/sample.c",
          """        if ((i % SKIP) == 0 && i + SKIP <= n && !block_any_ge(e + i, tau)) {
            i += SKIP - 1;""",
          """        if ((i % SKIP) == 0 && i + SKIP <= n && !block_any_ge(e + i, tau)) {
            i += SKIP;""",
          ["tests/test_sampling.py"], "top_p's block skip also passes the next block's first token"),
    Plant("block_test_misses_last", "csrc/core/sample.c",
          "for (int j = 0; j < SKIP; j++) any |= x[j] >= thr;", "for (int j = 0; j < SKIP - 1; j++) any |= x[j] >= thr;",
          ["tests/test_sampling.py"], "the block test ignores a block's last token (top_p, min_p)"),
    Plant("sampler_always_argmax", "csrc/core/sample.c",
          "    if (p->temperature <= 0.0f) return fm_argmax_f32(logits, V);\n",
          "    if (p->temperature >= 0.0f) return fm_argmax_f32(logits, V);\n",
          ["tests/test_sampling.py", "-k", "large_vocabulary"], "sampling always returns the argmax"),
    Plant("greedy_ignores_penalties", "csrc/core/sample.c",
          "    return s->p.temperature <= 0.0f && penalties_off(&s->p);",
          "    return s->p.temperature <= 0.0f;",
          ["tests/test_generate.py", "-k", "penalties"],
          "a greedy step with penalties takes the backend's argmax of the raw logits (penalties ignored)"),
    Plant("sampler_plain_copy", "csrc/core/sample.c",
          "                            float inv_t) {\n    return exp_all_body(l, e, blk, n, mx, inv_t);",
          "                            float inv_t) {\n    return exp_all_body(l, e, blk, n, mx, inv_t * 0.5f);",
          ["tests/test_sampling.py"], "a wrong temperature in the plain (non-AVX2) copy of the sampler's exp"),
    # -- item 4: the expert cache policies
    Plant("lfru_is_lru", "csrc/io/expert_store.c",
          "    if (s->policy == FM_CACHE_LFRU && s->lfreq[x->key] != s->lfreq[y->key])",
          "    if (0 && s->policy == FM_CACHE_LFRU && s->lfreq[x->key] != s->lfreq[y->key])",
          ["tests/test_cache_policy.py"], "lfru silently evicts as plain LRU"),
    Plant("prefetch_unprotected", "csrc/io/expert_store.c",
          "const int ta = s->protect[x->key], tb = s->protect[y->key];", "const int ta = 0, tb = 0;",
          ["tests/test_cache_policy.py"], "predicted (prefetched) experts lose their protection from eviction"),
    # -- kernels: clones, subnormal scales
    Plant("silu_plain_copy", "csrc/backend/cpu/ops.c",
          "static void silu_mul_plain(float *out, const float *gate, const float *up, size_t total) {\n"
          "    silu_mul(out, gate, up, total);",
          "static void silu_mul_plain(float *out, const float *gate, const float *up, size_t total) {\n"
          "    silu_mul(out, gate, up, total - (total > 1));",
          ["tests/test_ops.py", "-k", "silu_mul"], "the plain (non-AVX2) copy of silu_mul skips the last element"),
    Plant("f16_subnormal_flushed", "csrc/core/util.h",
          "    } else { /* subnormal: renormalise */",
          "    } else if (1) {\n        u = sign;\n    } else { /* subnormal: renormalise */",
          ["tests/test_ops.py", "-k", "matmul or get_row"], "float16 subnormal scales and biases read as zero"),
    Plant("neon_bias_group", "csrc/backend/cpu/matmul_neon.c",
          "const float32x4_t b = vdupq_n_f32(bi[g]);", "const float32x4_t b = vdupq_n_f32(bi[g ^ (ng > 1)]);",
          ["tests/test_cross_isa.py", "-k", "neon"], "NEON q4/q8 rows take a neighbour group's bias"),
    Plant("neon_shared_f16_subnormal", "csrc/core/util.h",
          "    } else { /* subnormal: renormalise */",
          "    } else if (1) {\n        u = sign;\n    } else { /* subnormal: renormalise */",
          ["tests/test_cross_isa.py", "-k", "neon"],
          "subnormal scales read as zero, in code NEON and the portable kernels share (numpy sees it)"),
    # -- bfloat16 scales and biases (MLX checkpoints): each kernel variant's reading of them
    Plant("x86_bf16_scales_as_f16", "csrc/backend/cpu/matmul_x86.h",
          "return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)) : _mm256_cvtph_ps(v);",
          "return _mm256_cvtph_ps(v);",
          ["tests/test_ops.py", "-k", "avx2 and (sbf16 or bf16-extreme)"], "the x86 kernels read bf16 scales as fp16"),
    Plant("avx2_int8_decode_bf16_as_f16", "csrc/backend/cpu/matmul_avx2.c",
          "if (a->w->scale_bf16) ROWS_SB(1);", "if (a->w->scale_bf16) ROWS_SB(0);",
          ["tests/test_ops.py", "-k", "avx2 and int8 and (sbf16 or bf16-extreme)"],
          "the AVX2 int8 decode reads bf16 scales as fp16"),
    Plant("avx512_bf16_as_f16", "csrc/backend/cpu/matmul_avx512.c",
          "if (a->w->scale_bf16) rows_1(a, r0, r1, 1);", "if (a->w->scale_bf16) rows_1(a, r0, r1, 0);",
          ["tests/test_ops.py", "-k", "avx512 and int8 and (sbf16 or bf16-extreme)"],
          "the AVX-512 int8 decode reads bf16 scales as fp16 (caught only where the CPU has AVX-512 VNNI)"),
    Plant("scalar_bf16_through_f16", "csrc/backend/cpu/ops.c",
          "s[g] = fm_bf16_to_f32(sc[g]), b[g] = fm_bf16_to_f32(bi[g]);",
          "s[g] = (float)(_Float16)fm_bf16_to_f32(sc[g]), b[g] = (float)(_Float16)fm_bf16_to_f32(bi[g]);",
          ["tests/test_ops.py", "-k", "scalar and bf16-extreme"],
          "the portable kernels round bf16 scales through fp16 (only values fp16 cannot hold tell)"),
    Plant("neon_bf16_scales_as_f16", "csrc/backend/cpu/matmul.h",
          "vst1q_f32(s + g, vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(sc + g), 16)));",
          "vst1q_f32(s + g, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sc + g))));",
          ["tests/test_cross_isa.py", "-k", "neon"], "the NEON kernels read bf16 scales (not biases) as fp16"),
    Plant("mat_view_drops_scale_bf16", "csrc/io/packed.c",
          "out->scale_bf16 = quant && d->scale_bf16;", "out->scale_bf16 = 0;",
          ["tests/test_bf16_scales.py"], "the engine's matrices read bf16 scales as fp16 whatever the spec says"),
    Plant("to_desc_ignores_scale_bf16", "csrc/python/module.cpp",
          'd.contains("scale_bf16") && d["scale_bf16"].cast<bool>()', 'd.contains("scale_bf16") && false',
          ["tests/test_bf16_scales.py"], 'the binding drops a tensor\'s "scale_bf16"'),
    # -- the default configuration and the trace
    Plant("experts_without_int8", "csrc/io/expert_store.c",
          "s->int8_act = spec->int8_activations;", "s->int8_act = 0;",
          ["tests/test_models.py", "-k", "int8"], "routed experts skip the int8 activations the rest uses"),
    Plant("trace_final_norm_unnormalised", "csrc/core/model.c",
          'fm_trace(m, m->s.xn, rows, H, "final_norm");',
          'fm_trace(m, m->s.x + (size_t)first * H, rows, H, "final_norm");',
          ["tests/test_models.py", "-k", "trace"], "the trace's final_norm is the stream before the norm"),
    Plant("trace_last_layer_out", "csrc/models/qwen3_5_moe.c",
          'fm_trace(m, x, T, H, "L%d.out", l);',
          'fm_trace(m, l == m->c.num_hidden_layers - 1 ? out : x, T, H, "L%d.out", l);',
          ["tests/test_models.py", "-k", "trace"], "the trace's last layer output is its MoE output"),
    # -- README promises: memory and reads
    Plant("default_budget_quarter", "csrc/core/model.c",
          "(uint64_t)pages * (uint64_t)page / 2", "(uint64_t)pages * (uint64_t)page / 4",
          ["tests/test_io.py"], "no budget gives a quarter of RAM"),
    Plant("gb_read_as_gib", "python/flashmoe/model.py",
          '"gb": 10**9,', '"gb": 1 << 30,', ["tests/test_io.py"], '"6GB" read as 6 GiB'),
    Plant("no_o_direct", "csrc/io/expert_store.c",
          "int fd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);", "int fd = open(path, O_RDONLY | O_CLOEXEC);",
          ["tests/test_io.py"], "expert reads go through the page cache"),
    Plant("io_threads_ignored", "csrc/io/expert_store.c",
          "s->n_threads = spec->io_threads > 0 ? spec->io_threads : 8;", "s->n_threads = 8;",
          ["tests/test_io.py"], "io_threads ignored: always 8 reads in flight"),
    # -- README promises: the server
    Plant("serve_ignores_env_key", "python/flashmoe/server/cli.py",
          'default=os.environ.get("FLASHMOE_API_KEY"),', "default=None,",
          ["tests/test_server_promises.py"], "$FLASHMOE_API_KEY ignored"),
    Plant("serve_binds_everywhere", "python/flashmoe/server/cli.py",
          '"--host", default="127.0.0.1"', '"--host", default="0.0.0.0"',
          ["tests/test_server_promises.py"], "serve binds to every interface by default"),
    Plant("serve_body_limit_16mb", "python/flashmoe/server/cli.py",
          "DEFAULT_MAX_BODY = 16 * 1024 * 1024", "DEFAULT_MAX_BODY = 16 * 1000 * 1000",
          ["tests/test_server_promises.py"], "the default body limit is 16 MB, not 16 MiB"),
    Plant("serve_max_tokens_not_context", "python/flashmoe/server/app.py",
          "max_tokens_limit=int(max_tokens_limit or model.context_length),",
          "max_tokens_limit=int(max_tokens_limit or 4096),",
          ["tests/test_server_promises.py"], "the default max-tokens limit is not the context length"),
    Plant("serve_ignores_max_completion_tokens", "python/flashmoe/server/openai.py",
          'max_tokens_of(body, ("max_completion_tokens", "max_tokens"), cfg),',
          'max_tokens_of(body, ("max_tokens",), cfg),',
          ["tests/test_server_promises.py"], "max_completion_tokens ignored"),
    Plant("serve_lifo", "python/flashmoe/server/engine.py",
          "job = self._queue.popleft()", "job = self._queue.pop()",
          ["tests/test_server_promises.py"], "queued requests served last in, first out"),
    Plant("serve_health_waits", "python/flashmoe/server/app.py",
          "        eng = server.engine\n        return JSONResponse(",
          "        eng = server.engine\n        while eng.busy:\n            time.sleep(0.01)\n        return JSONResponse(",
          ["tests/test_server_promises.py"], "/health waits for the running request"),
    Plant("serve_queued_not_cancelled", "python/flashmoe/server/engine.py",
          "        self._cancelled.set()\n        if self._engine is not None:\n            self._engine._drop(self)",
          "        self._cancelled.set()",
          ["tests/test_server.py", "-k", "queued_request_whose_client_leaves"],
          "a queued request whose client left stays in the queue until its turn"),
    Plant("serve_prompt_not_cancelled", "python/flashmoe/server/engine.py",
          "        if self._cancelled.is_set():\n            raise JobCancelled()",
          "        pass",
          ["tests/test_server.py", "-k", "leaving_during_a_long_prompt"],
          "a client leaving while its prompt runs does not stop the prompt"),
    # -- issue 14: faults, interrupts, threads, bad input
    Plant("model_lock_off", "python/flashmoe/model.py",
          "        with self._lock:\n            self._lock_owner = me",
          "        with contextlib.nullcontext():\n            self._lock_owner = me",
          ["tests/test_faults.py", "-k", "threads or stream"], "generations from several threads interleave"),
    Plant("changed_file_not_refused", "csrc/io/expert_store.c",
          "else if (!s->verify && !file_unchanged(", "else if (0 && !s->verify && !file_unchanged(",
          ["tests/test_faults.py", "-k", "overwritten or cut_short"],
          "an experts file changed on disk after load is read as if it were the same"),
    Plant("token_ids_wrap", "python/flashmoe/model.py",
          "bad = np.flatnonzero((ids < 0) | (ids >= vocab))", "bad = np.flatnonzero(ids < 0)",
          ["tests/test_faults.py", "-k", "bad_arguments"], "token ids past the vocabulary wrap in the int32 cast"),
    Plant("max_tokens_zero_generates", "python/flashmoe/generation.py",
          '(None if params.max_tokens > 0 else "length")', "None",
          ["tests/test_faults.py", "-k", "max_tokens_zero"], "max_tokens=0 still returns a token"),
    Plant("model_calls_hold_the_gil", "csrc/python/module.cpp",
          "        py::gil_scoped_release release;\n        std::lock_guard<std::mutex> lock;",
          "        std::lock_guard<std::mutex> lock;",
          ["tests/test_server_promises.py", "-k", "health"], "model calls keep the GIL while C computes"),
    # -- issue 17: the backend interface (ops moved out of the core)
    Plant("kv_write_one_row_early", "csrc/backend/cpu/backend_cpu.c",
          "memcpy(cache + (size_t)pos0 * row, src,", "memcpy(cache + (size_t)(pos0 > 0 ? pos0 - 1 : 0) * row, src,",
          ["tests/test_models.py", "-k", "decode_token"], "new keys and values written one row early"),
    Plant("q_gate_swapped", "csrc/backend/cpu/backend_cpu.c",
          "memcpy(q + th * hd, q2 + th * 2 * hd, sizeof(float) * hd);",
          "memcpy(q + th * hd, q2 + th * 2 * hd + hd, sizeof(float) * hd);",
          ["tests/test_models.py", "-k", "prefill_matches"], "the attention query read from the gate half"),
    Plant("lanes_take_unsorted_work", "csrc/backend/cpu/backend_cpu.c",
          "lane_job J = {c, c->order, xn, ye};", "lane_job J = {c, work, xn, ye};",
          ["tests/test_backend.py", "-k", "spread"], "side-by-side experts computed from the wrong list"),
    # -- issue 16: importing MLX checkpoints
    Plant("mlx_norm_keeps_plus_one", "python/flashmoe/mlx_import.py",
          "            w = v - np.float32(1)\n", "            w = v - np.float32(0)\n",
          ["tests/test_mlx_import.py", "-k", "prefill and qwen3_5_moe-4bit-g64"],
          "mlx-lm's 1 + w norms imported as they are"),
    Plant("mlx_scales_flag_dropped", "python/flashmoe/model.py",
          '        d["scale_bf16"] = 1', '        d["scale_bf16"] = 0',
          ["tests/test_mlx_import.py", "-k", "prefill and qwen3_next-8bit-g64"],
          "the loader reads an MLX import's bf16 scales as fp16"),
    Plant("mlx_qkvz_not_split", "python/flashmoe/mlx_import.py",
          "        split = qwen3_next.split_qkvz if", "        split = qwen3_next.split_ba if",
          ["tests/test_mlx_import.py", "-k", "prefill and qwen3_next-4bit-g64"],
          "Qwen3-Next's fused in_proj_qkvz de-interleaved the wrong way"),
    Plant("mlx_override_ignored", "python/flashmoe/mlx_import.py",
          "        if isinstance(override, dict):\n            params.update(override)",
          "        if isinstance(override, dict) and False:\n            params.update(override)",
          ["tests/test_mlx_import.py", "-k", "prefill and qwen3_5_moe-4bit-g64"],
          "the 8-bit router read with the 4-bit defaults"),
    Plant("mlx_router_int8", "csrc/core/blocks.c",
          "    w->router.int8_act = w->shared_gate.int8_act = 0;", "",
          ["tests/test_mlx_import.py", "-k", "router_activations"], "an 8-bit router takes int8 activations"),
    # -- issue 19: layer-by-layer prompts and batch invariance
    Plant("deltanet_chunks_unaligned", "csrc/backend/cpu/gated_delta.c",
          "        n = C - (J->pos0 + c0) % C;", "        n = C - c0 % C;",
          ["tests/test_ops.py", "-k", "same_bits"], "the DeltaNet's chunks start at the call, not at absolute positions"),
    Plant("deltanet_one_token_chunk_chunked", "csrc/backend/cpu/gated_delta.c",
          "        if (n == 1) {", "        if (n == 0) {",
          ["tests/test_ops.py", "-k", "same_bits"], "a 1-token chunk takes the chunked form, a 1-token call the recurrent"),
    Plant("prompt_chunk_major", "csrc/core/model.c",
          "    m->segment = segment <= m->chunk ? m->chunk : (segment + m->chunk - 1) / m->chunk * m->chunk;",
          "    m->segment = m->chunk;",
          ["tests/test_read_amplification.py"], "a prompt runs chunk by chunk again: experts read once per chunk"),
    Plant("misses_before_hits", "csrc/core/blocks.c",
          "    hits_first(m, layer, n_need);\n", "    (void)hits_first;\n",
          ["tests/test_read_amplification.py"], "a miss evicts an expert read ahead for this layer"),
    Plant("generation_cuts_prompts_by_chunk", "python/flashmoe/generation.py",
          "                logits = cache.run(prompt[pos:end], report)\n",
          "                for s in range(pos, end, 4 * model.prefill_chunk):\n"
          "                    logits = cache.run(prompt[s:min(end, s + 4 * model.prefill_chunk)], report)\n",
          ["tests/test_budget_invariance.py", "-k", "generate"], "generate cuts a prompt into calls that depend on the chunk"),
    # -- batch invariance (csrc/backend/cpu/matmul.h): within tolerance of numpy, so test_ops passes it
    Plant("int8_tile_one_chain", "csrc/backend/cpu/matmul_avx2.c",
          "accb = _mm256_fmadd_ps(_mm256_broadcast_ps((const __m128 *)(rs + 4)), _mm256_loadu_ps(de + 8), accb);",
          "acc = _mm256_fmadd_ps(_mm256_broadcast_ps((const __m128 *)(rs + 4)), _mm256_loadu_ps(de + 8), acc);",
          ["tests/test_batch_invariance.py", "-k", "int8"],
          "the int8 prefill tiles add the bias terms into the dots' chain (decode keeps two): a token's outputs "
          "depend on its batch"),
    # -- the CUDA kernels, on the CPU emulator (tests/cuda_emu/): barriers and warp functions left out or wrong
    Plant("cuda_rmsnorm_no_barrier", "csrc/backend/cuda/eltwise.cu",
          "    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;\n    __syncthreads();",
          "    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"], "CUDA row reduction without its barrier"),
    Plant("cuda_attention_no_barrier", "csrc/backend/cuda/attention.cu",
          "    }\n    __syncthreads();\n    /* merged in warp order", "    }\n    /* merged in warp order",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"], "CUDA attention merges partials unsynchronised"),
    Plant("cuda_argmax_ties_to_the_last", "csrc/backend/cuda/eltwise.cu",
          "(0xFFFFFFFFu - (unsigned)i);", "(unsigned)i;",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"], "the GPU's greedy token: a tie goes to the last id"),
    Plant("cuda_argmax_minus_zero_below", "csrc/backend/cuda/eltwise.cu",
          "__float_as_uint(v == 0.0f ? 0.0f : v)", "__float_as_uint(v)",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"],
          "the GPU's greedy token: -0.0 ranks below +0.0 (they compare equal: the lower id wins)"),
    Plant("cuda_route_sum_skips_a_lane", "csrc/backend/cuda/route.cu",
          "for (int m = 16; m > 0; m >>= 1) sum += __shfl_xor_sync", "for (int m = 16; m > 1; m >>= 1) sum += __shfl_xor_sync",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"], "CUDA router's softmax sum misses a lane"),
    Plant("cuda_group_sum_skips_a_lane", "csrc/backend/cuda/gated_delta.cu",
          "for (int m = 1; m < P; m <<= 1) x +=", "for (int m = 2; m < P; m <<= 1) x +=",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"], "CUDA gated delta's warp sum misses a step"),
    Plant("cuda_deltanet_chunks_unaligned", "csrc/backend/cuda/gated_delta.cu",
          "    p.n0 = CH - (pos0 + a) % CH < b - a ? CH - (pos0 + a) % CH : b - a;",
          "    p.n0 = CH < b - a ? CH : b - a;",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"],
          "CUDA's DeltaNet chunks start at the call, not at absolute positions"),
    Plant("cuda_deltanet_one_token_chunk_chunked", "csrc/backend/cuda/gated_delta.cu",
          "    const int b = last >= a && T - last == 1 ? T - 1 : T;", "    const int b = T;",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"],
          "CUDA: a 1-token last chunk takes the chunked form, a 1-token call the recurrent"),
    Plant("cuda_deltanet_stage_no_barrier", "csrc/backend/cuda/gated_delta.cu",
          "        in.store(Ks, Qs, Vs, Rs);\n        __syncthreads();\n",
          "        in.store(Ks, Qs, Vs, Rs);\n",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"],
          "CUDA's chunked gated delta rule reads a chunk's staged inputs unsynchronised"),
    Plant("cuda_mma_stage_read_before_its_wait", "csrc/backend/cuda/matmul_mma.cu",
          "            cp_wait<C::ST - 2>(); /* chunk k landed", "            cp_wait<C::ST - 1>(); /* chunk k landed",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"],
          "the tensor-core prefill computes a chunk before its cp.async copies are waited for"),
    Plant("cuda_mma_warp_reads_before_its_lanes_wait", "csrc/backend/cuda/matmul_mma.cu",
          "            __syncwarp();         /* every lane's", "            /* every lane's",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"],
          "a warp of the tensor-core prefill reads its lanes' copies before they have waited for them"),
    Plant("cuda_mma_warp_sums_added_in_a_chain", "csrc/backend/cuda/matmul_mma.cu",
          "for (int w = 0; w + span < C::NW; w += 2 * span) v[mi][w] = __fadd_rn(v[mi][w], v[mi][w + span]);",
          "for (int w = 0; w + span < C::NW; w += 2 * span) v[mi][0] = __fadd_rn(v[mi][0], v[mi][w + span]);",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"],
          "the warps' subtree sums added one after another, not as the butterfly's top levels"),
    Plant("cuda_mma_counter_merge_short_a_level", "csrc/backend/cuda/matmul_mma.cu",
          "        for (int k = 0; k < T; k++) v = __fadd_rn(P[k][o], v);",
          "        for (int k = 1; k < T; k++) v = __fadd_rn(P[k][o], v);",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"],
          "the tensor-core prefill's lane counter drops its lowest waiting subtree"),
    Plant("cuda_mma_narrow_tiles_counted_wide", "csrc/backend/cuda/matmul_mma.cu",
          "if (ex_host[e].n >= a.big) bx += (ex_host[e].n + C::BN - 1) / C::BN;",
          "if (ex_host[e].n >= a.big) bx += (ex_host[e].n + 15) / 16;",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"],
          "a grouped call in 8-token tiles launches the blocks of 16-token ones (an expert's last tokens not computed)"),
    # -- a prompt's choices grouped on the device (cuda/route.cu's group_k, moe_prompt)
    Plant("cuda_group_rank_in_batch_dropped", "csrc/backend/cuda/route.cu",
          "const int r = off[e] + cnt[w * E + e] + __popc(p & ((1u << lane) - 1));",
          "const int r = off[e] + cnt[w * E + e];",
          ["tests/test_cuda_emu.py", "-k", "prompts_routed"],
          "two choices of one expert in a warp's batch of 32 get the same row (one token's FFN lost)"),
    Plant("cuda_group_tile_bound_short", "csrc/backend/cuda/cuda_kernels.h",
          "return (int)((n + (long long)(bn - 1) * experts) / bn);",
          "return (int)(n / bn);",
          ["tests/test_cuda_emu.py", "-k", "prompts_routed"],
          "the tile map's grid without the experts' partial tiles: the last tiles of some experts never computed"),
    # -- the host's share of decode's experts (cuda/host_ffn.c, cuda_experts.cu's host_finish)
    Plant("host_ffn_butterfly_out_of_order", "csrc/backend/cuda/host_ffn.c",
          "        for (int i = 0; i < o; i++) A[i] = A[i] + A[i + o];",
          "        for (int i = 0; i < o; i++) A[i] = A[2 * i] + A[2 * i + 1];",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"],
          "the host's replay adds the lanes in another order than the warp's butterfly"),
    Plant("host_ffn_avx2_lanes_paired_wrong", "csrc/backend/cuda/host_ffn.c",
          "const __m256 B0 = _mm256_add_ps(A[0], A[2]), B1 = _mm256_add_ps(A[1], A[3])",
          "const __m256 B0 = _mm256_add_ps(A[0], A[1]), B1 = _mm256_add_ps(A[2], A[3])",
          ["tests/test_cuda_emu.py", "-k", "op_harness and forward"],
          "the host's AVX2 replay pairs the wrong lanes in the butterfly's first level"),
    Plant("host_rows_first_not_copied", "csrc/backend/cuda/cuda_experts.cu",
          "        if (!on[j]) continue;\n        const size_t bytes = sizeof(float) * (size_t)jobs[q].n * H;",
          "        if (!on[j] || (q == 0 && ++q)) continue;\n        const size_t bytes = sizeof(float) * (size_t)jobs[q].n * H;",
          ["tests/test_cuda_emu.py", "-k", "tiers"],
          "the host's first expert's rows never reach the GPU"),
]


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def copy_tree(dst):
    files = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue  # deleted in the working tree
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, rel))


def build(tree, target):
    shutil.rmtree(target, ignore_errors=True)
    r = run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target,
             "."], cwd=tree)
    if r.returncode != 0:
        raise RuntimeError(f"build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def pytest(tree, target, args):
    env = dict(os.environ, PYTHONPATH=target)
    env.pop("FLASHMOE_CI_REQUIRE", None)
    t0 = time.monotonic()
    r = run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *args], cwd=tree, env=env)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", tail)) else 0
    errors = int(m.group(1)) if (m := re.search(r"(\d+) errors?", tail)) else 0
    names = sorted({m.group(1) for m in re.finditer(r"^(?:FAILED|ERROR) \S+::(\w+)", r.stdout, re.M)})
    return r.returncode, failed + errors, tail, time.monotonic() - t0, names


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="plant names to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the plants and exit")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    a = ap.parse_args()
    plants = [p for p in PLANTS if not a.only or p.name in a.only]
    if a.list or not plants:
        for p in PLANTS:
            print(f"{p.name:34} {p.file:34} {p.what}")
        return 0
    tmp = tempfile.mkdtemp(prefix="flashmoe-plants-")
    tree, target = os.path.join(tmp, "src"), os.path.join(tmp, "site")
    rows = []
    try:
        copy_tree(tree)
        build(tree, target)
        for tests in dict.fromkeys(tuple(p.tests) for p in plants):  # they pass unplanted, else "caught"
            rc, n, tail, _, _ = pytest(tree, target, list(tests))          # would mean nothing
            if rc != 0:
                print(f"{' '.join(tests)}: fails without a plant: {tail}", file=sys.stderr)
                return 2
        for p in plants:
            path = os.path.join(tree, p.file)
            with open(path) as f:
                text = f.read()
            count = text.count(p.old)
            if count != 1:
                rows.append((p, f"DOES NOT APPLY (found {count}x)", ""))
                continue
            with open(path, "w") as f:
                f.write(text.replace(p.old, p.new))
            try:
                build(tree, target)
                rc, n, tail, secs, names = pytest(tree, target, p.tests)
                verdict = f"caught: {n} failed" if rc == 1 and n > 0 else ("ESCAPED" if rc == 0 else f"ERROR rc={rc}")
                rows.append((p, verdict, ", ".join(names)))
            except RuntimeError as exc:
                rows.append((p, "ERROR: does not build", ""))
                print(exc, file=sys.stderr)
            finally:
                with open(path, "w") as f:
                    f.write(text)
            print(f"{p.name}: {rows[-1][1]}", file=sys.stderr, flush=True)
        build(tree, target)  # leave the copy built as it was
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    w = max(len(p.name) for p, _, _ in rows)
    print(f"{'plant':{w}}  {'verdict':18}  what (tests run) -> failing tests")
    for p, verdict, names in rows:
        print(f"{p.name:{w}}  {verdict:18}  {p.what} ({' '.join(p.tests)})")
        if names:
            print(f"{'':{w}}  {'':18}  -> {names}")
    escaped = [p.name for p, v, _ in rows if not v.startswith("caught")]
    print(f"\n{len(rows) - len(escaped)} of {len(rows)} caught" + (f"; not caught: {', '.join(escaped)}" if escaped else ""))
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
