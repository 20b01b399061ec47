"""Outputs do not depend on how the engine is run (the README's promise, issue 19): a prompt's logits and the
greedy tokens after it are bit-identical whatever the memory budget, the prefill chunk, the number of
threads, the cache policy and prefetch. Every op is batch invariant (csrc/backend/backend.h): a token's
numbers do not depend on how many tokens share a call, and the prompt is cut at the same DeltaNet chunk
boundaries whatever the chunk. Tiny random models, so the whole grid runs in seconds; the prompts span
several chunks, and the long one several segments (the tokens the engine runs layer by layer)."""

import itertools

import numpy as np
import pytest

import flashmoe
from flashmoe import _core
from flashmoe.synth import DEMO_CONFIG, write_random_model

# Qwen3.5-MoE: DeltaNet and attention layers, 16 experts of which 4 per token (routing near ties is what
# made a different chunk fork the generated text)
TINY = {**DEMO_CONFIG, "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"], "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 32, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "num_experts": 16, "num_experts_per_tok": 4,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
PROMPT = 516  # > 512: several chunks at every chunk size; the last one of 4 tokens at some, 36 at 80
GENERATE = 8


@pytest.fixture(scope="module", params=[4, 8, 16], ids=lambda b: f"{b}bit")
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"inv{request.param}") / "m"
    write_random_model(path, TINY, bits=request.param, progress=False)
    return path


def prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, TINY["vocab_size"], n)


def budgets(path, chunk):
    """The three budgets of the issue: the minimum (k expert slots), a quarter of the experts beyond it,
    and none (everything cached)."""
    plan = flashmoe.memory_plan(path, prefill_chunk=chunk)
    expert_bytes = plan["experts_total"] * (plan["expert_cache_bytes"] // plan["expert_slots"])
    return {"minimum": plan["minimum"], "quarter": plan["minimum"] + expert_bytes // 4, "unlimited": None}


def run(path, ids, *, budget, chunk, threads, policy, prefetch, int8=True, context=1024):
    m = flashmoe.load(path, memory_budget=budget, prefill_chunk=chunk, threads=threads, cache_policy=policy,
                      prefetch=prefetch, int8_activations=int8, context_length=context)
    logits = m.forward(ids)
    return logits, m.generate_tokens(ids, GENERATE, stop_token_ids=[]), m.stats["read_amplification"]


@pytest.fixture(autouse=True)
def restore_threads():
    before = _core.get_threads()
    yield
    _core.set_threads(before)


def test_every_budget_chunk_thread_count_policy_and_prefetch_gives_the_same_bits(model_dir):
    ids = prompt(PROMPT)
    ref_logits, ref_tokens, _ = run(model_dir, ids, budget=None, chunk=128, threads=2, policy="lfru", prefetch=True)
    assert ref_logits.shape == (PROMPT, TINY["vocab_size"]) and len(ref_tokens) == GENERATE
    seen = 0
    for chunk in (64, 80, 128, 512):
        for (bname, budget), threads, policy, prefetch in itertools.product(
                budgets(model_dir, chunk).items(), (1, 2), ("lru", "lfru"), (True, False)):
            logits, tokens, _ = run(model_dir, ids, budget=budget, chunk=chunk, threads=threads, policy=policy,
                                    prefetch=prefetch)
            where = f"chunk {chunk}, budget {bname}, {threads} threads, {policy}, prefetch {prefetch}"
            assert np.array_equal(logits, ref_logits), f"{where}: logits differ by up to " \
                f"{np.abs(logits - ref_logits).max():.3g}"
            assert tokens == ref_tokens, f"{where}: {tokens} != {ref_tokens}"
            seen += 1
    assert seen == 96


@pytest.mark.parametrize("int8", [True, False], ids=["int8-activations", "fp32-activations"])
def test_a_prompt_over_several_segments_gives_the_same_bits(model_dir, int8):
    """2,100 tokens: past one segment (2,048), so the layer-by-layer runs are cut too; the page-cache
    policy and odd chunk sizes (rounded up to whole DeltaNet chunks) on the way."""
    ids = prompt(2100, seed=1)
    ref_logits, ref_tokens, _ = run(model_dir, ids, budget=None, chunk=512, threads=2, policy="lfru",
                                    prefetch=True, int8=int8, context=4096)
    for chunk, threads, policy, budget in ((64, 1, "lru", "minimum"), (100, 2, "pagecache", "quarter"),
                                           (7, 2, "lfru", "minimum")):
        b = budgets(model_dir, chunk)[budget]
        logits, tokens, _ = run(model_dir, ids, budget=b, chunk=chunk, threads=threads, policy=policy,
                                prefetch=True, int8=int8, context=4096)
        where = f"chunk {chunk}, budget {budget}, {threads} threads, {policy}"
        assert np.array_equal(logits, ref_logits), f"{where}: up to {np.abs(logits - ref_logits).max():.3g}"
        assert tokens == ref_tokens, where


def test_generate_gives_the_same_bits_at_every_chunk_and_budget(model_dir):
    """The high-level path (generate: the prompt cache's snapshot marks, progress after each layer) cuts a
    prompt into engine calls that depend on neither the chunk nor the budget."""
    ids = [int(t) for t in prompt(700, seed=3)]
    seen = []
    for chunk, budget in ((64, "minimum"), (80, "quarter"), (512, "unlimited")):
        m = flashmoe.load(model_dir, memory_budget=budgets(model_dir, chunk)[budget], prefill_chunk=chunk,
                          context_length=1024)
        calls = []
        r = m.generate(ids, max_tokens=GENERATE, temperature=0, stop_token_ids=[],
                       progress=lambda done, total: calls.append((done, total)))
        assert calls[-1] == (len(ids), len(ids)) and calls == sorted(calls)
        seen.append((m._last_prompt_logits.tobytes(), r.token_ids))
    assert seen[0] == seen[1] == seen[2]


def test_continuing_at_a_deltanet_chunk_boundary_gives_the_same_bits(model_dir):
    """A prompt sent in two calls cut at a multiple of 16 positions gives the bits of one call; cut
    elsewhere, only the DeltaNet's chunks differ (README: continuing from a snapshot may differ in the
    last bits)."""
    ids = prompt(300, seed=2)
    m = flashmoe.load(model_dir, prefill_chunk=64, context_length=1024)
    whole = m.forward(ids)
    for cut in (16, 128, 160):
        first = m.forward(ids[:cut])
        rest = m.forward(ids[cut:], reset=False)
        assert np.array_equal(np.concatenate([first, rest]), whole), f"cut at {cut}"
    first = m.forward(ids[:100])
    rest = m.forward(ids[100:], reset=False)
    np.testing.assert_allclose(np.concatenate([first, rest]), whole, rtol=0, atol=1e-3 * np.abs(whole).max())
