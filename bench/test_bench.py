"""The harness's benchmarks (bench/conftest.py says what they measure and how to run and compare them)."""

from __future__ import annotations

import flashmoe
import numpy as np
import pytest

DECODE_TOKENS, PROMPT_TOKENS, ROUNDS = 32, 256, 3
BUDGET_FRACTION = 0.25


def decode_step_bytes(header: dict) -> int:
    """Weight bytes one decode token reads: the dense tensors but the embedding (one row of it), plus
    num_experts_per_tok expert blobs per MoE layer (as bench/baseline.py counts them)."""
    total = 0
    for name, t in header["dense"]["tensors"].items():
        if name == "embed_tokens.weight":
            continue
        total += t["nbytes"]
        if "group_size" in t:  # fp16 scales and biases
            total += 2 * 2 * t["shape"][0] * (t["shape"][1] // t["group_size"])
    ex = header["experts"]
    return total + len(ex["layers"]) * header["config"]["num_experts_per_tok"] * ex["blob_size"]


def _ids(header: dict, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, header["config"]["vocab_size"], n)


def _record(benchmark, context: dict, **specific) -> None:
    benchmark.extra_info.update(context)
    benchmark.extra_info.update(specific)


def _decode_rounds(benchmark, model, header) -> list[dict]:
    """Times DECODE_TOKENS decode steps a round after an untimed prefill; returns each round's stats."""
    prompt, rounds = _ids(header, 32, 1), []

    def setup():
        model.reset()
        model.generate_tokens(prompt[:-1], max_tokens=1, stop_token_ids=[])
        model.reset_stats()

    def decode():
        model.generate_tokens(prompt[-1:], max_tokens=DECODE_TOKENS, stop_token_ids=[], reset=False)

    # One untimed round first: the first decode after loading pays one-off costs (page faults, threads).
    # The stats are read in teardown, outside the timed call.
    benchmark.pedantic(decode, setup=setup, teardown=lambda: rounds.append(model.stats), rounds=ROUNDS,
                       iterations=1, warmup_rounds=1)
    return rounds[-ROUNDS:]  # the timed ones


@pytest.fixture(scope="module")
def model_in_ram(bench_model, context):
    path, header = bench_model
    model = flashmoe.load(path, memory_budget=context["model"]["bytes"] + (1 << 30), context_length=1024)
    # Warm: a 256-token prompt routes to nearly every expert (8 of 256 a token), which then stay resident.
    model.generate_tokens(_ids(header, PROMPT_TOKENS, 0), max_tokens=1, stop_token_ids=[])
    return model


def test_decode_ram(benchmark, bench_model, context, model_in_ram):
    """Decode tokens/s with every weight in memory: memory-bound, against DRAM bandwidth."""
    _, header = bench_model
    rounds = _decode_rounds(benchmark, model_in_ram, header)
    tok_s = DECODE_TOKENS / benchmark.stats.stats.median
    step = decode_step_bytes(header)
    ceiling = context["ceilings"]["dram_copy_gbps"] * 1e9 / step
    _record(benchmark, context, measured_against="dram_copy_gbps", tokens=DECODE_TOKENS, tokens_per_s=round(tok_s, 3),
            weight_bytes_per_token=step, ceiling_tokens_per_s=round(ceiling, 3),
            ratio_to_ceiling=round(tok_s / ceiling, 4),
            bytes_read=sum(r["bytes_read"] for r in rounds), hit_rate=round(rounds[-1]["hit_rate"], 4))


def test_decode_budget(benchmark, bench_model, context, measure_disk):
    """Decode tokens/s under a budget of a quarter of the model: the routed experts stream from disk,
    against the disk's read speed."""
    path, header = bench_model
    ctx = 1024
    budget = max(int(context["model"]["bytes"] * BUDGET_FRACTION),
                 flashmoe.memory_plan(path, context_length=ctx, memory_budget=1 << 40)["minimum"])
    model = flashmoe.load(path, memory_budget=budget, context_length=ctx)
    model.generate_tokens(_ids(header, 64, 0), max_tokens=1, stop_token_ids=[])  # fills the expert cache
    rounds = _decode_rounds(benchmark, model, header)
    del model  # its memory back before the disk is sampled again
    context = {**context, "ceilings": dict(context["ceilings"])}
    after = measure_disk()
    context["ceilings"]["disk_read_gbps_after"] = round(after, 3)
    context["ceilings"]["disk_read_gbps"] = max(context["ceilings"]["disk_read_gbps"], round(after, 3))
    tok_s = DECODE_TOKENS / benchmark.stats.stats.median
    read = sum(r["bytes_read"] for r in rounds)
    per_token = read / (DECODE_TOKENS * len(rounds))
    ceiling = context["ceilings"]["disk_read_gbps"] * 1e9 / per_token if per_token else None
    _record(benchmark, context, measured_against="disk_read_gbps", tokens=DECODE_TOKENS,
            tokens_per_s=round(tok_s, 3), memory_budget=budget, budget_fraction=round(budget / context["model"]["bytes"], 3),
            bytes_read=read, bytes_read_per_token=round(per_token), direct_io=rounds[-1]["direct_io"],
            hit_rate=round(sum(r["expert_hits"] for r in rounds)
                           / max(1, sum(r["expert_hits"] + r["expert_misses"] for r in rounds)), 4),
            engine_read_gbps=round(sum(r["bytes_read"] for r in rounds)
                                   / max(1e-9, sum(r["io_busy_seconds"] for r in rounds)) / 1e9, 3),
            io_wait_share=round(sum(r["io_wait_seconds"] for r in rounds) / (benchmark.stats.stats.total or 1), 4),
            ceiling_tokens_per_s=ceiling and round(ceiling, 3), ratio_to_ceiling=ceiling and round(tok_s / ceiling, 4))


def test_prompt_ram(benchmark, bench_model, context, model_in_ram):
    """Prompt tokens/s in memory. Compute-bound: no ceiling applies; the recorded ones let machines be
    put side by side (prompt tokens/s per DRAM GB/s, or next to the kernels' numbers)."""
    _, header = bench_model
    prompt, rounds = _ids(header, PROMPT_TOKENS, 2), []

    def setup():
        model_in_ram.reset()
        model_in_ram.reset_stats()

    def prefill():
        model_in_ram.generate_tokens(prompt, max_tokens=1, stop_token_ids=[])

    benchmark.pedantic(prefill, setup=setup, teardown=lambda: rounds.append(model_in_ram.stats), rounds=ROUNDS,
                       iterations=1, warmup_rounds=1)
    rounds = rounds[-ROUNDS:]  # the timed ones
    # The engine's own prompt timing leaves out the one decode step that generate_tokens adds.
    tok_s = sorted(r["last_prompt_tokens"] / r["last_prompt_seconds"] for r in rounds)[len(rounds) // 2]
    _record(benchmark, context, measured_against=None, tokens=PROMPT_TOKENS, tokens_per_s=round(tok_s, 3),
            bytes_read=sum(r["bytes_read"] for r in rounds))


@pytest.mark.parametrize("dtype", ["q4", "q8"])
def test_matvec_kernel(benchmark, context, dtype):
    """One decode matvec (~300 MB of weights x 2048 columns, so that most of it comes from DRAM; int8
    activations, the engine's default) with the kernel the engine picks: weight GB/s against DRAM."""
    from flashmoe import _core
    from flashmoe.quant import quantize

    cols, gs, bits = 2048, 64, {"q4": 4, "q8": 8}[dtype]
    rows = 4096 * (64 if bits == 4 else 32)  # ~300 MB either way
    block = np.random.default_rng(0).standard_normal((4096, cols), dtype=np.float32) / np.sqrt(cols)
    q, s, b = quantize(block, bits, gs)  # one quantized block tiled: random enough, fast to build
    q, s, b = (np.ascontiguousarray(np.tile(a, (rows // 4096, 1))) for a in (q, s, b))
    nbytes = q.nbytes + s.nbytes + b.nbytes
    x = np.random.default_rng(1).standard_normal((1, cols), dtype=np.float32)
    w = ({"q4": _core.Q4, "q8": _core.Q8}[dtype], q, s.view(np.uint16), b.view(np.uint16), rows, cols, gs)
    benchmark.pedantic(_core.op_matmul, args=(*w, x, True), rounds=20, iterations=1, warmup_rounds=2)
    gbps = nbytes / benchmark.stats.stats.median / 1e9
    _record(benchmark, context, measured_against="dram_copy_gbps", weight_bytes=nbytes, gbps=round(gbps, 3),
            ratio_to_ceiling=round(gbps / context["ceilings"]["dram_copy_gbps"], 4))
