"""The read-amplification statistic (Model.stats, the stats lines): disk bytes read per byte of the distinct
routed experts the tokens used."""

import numpy as np
import pytest

import flashmoe
from flashmoe.synth import write_random_model
from test_engine_errors import TINY


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_random_model(d, TINY, bits=4, progress=False)
    return d


def test_every_expert_read_once_is_one(model_dir):
    """Everything fits and nothing is read ahead: each expert the prompt uses is read exactly once."""
    m = flashmoe.load(model_dir, prefetch=False)
    stride = m.header["experts"]["stride"]
    m.forward(np.arange(100) % TINY["vocab_size"])
    last = m.stats["last"]
    assert last["distinct_expert_bytes"] == int(np.count_nonzero(m.expert_usage())) * stride > 0
    assert last["bytes_read"] == last["distinct_expert_bytes"] and last["read_amplification"] == 1.0
    m.forward(np.arange(100) % TINY["vocab_size"])  # the same prompt again: all cached, nothing read
    assert m.stats["last"]["read_amplification"] == 0.0 and m.stats["last"]["distinct_expert_bytes"] > 0


@pytest.mark.parametrize("policy", ["lru", "lfru", "pagecache"])
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
def test_a_prompt_reads_each_expert_once_under_the_minimum_budget(model_dir, policy, prefetch):
    """Issue 19: at the minimum budget (k slots) a prompt of many chunks runs layer by layer, so each
    routed expert it uses is read once per layer, not once per chunk (5.4x before, on the 35B shape at a
    quarter budget). Read-ahead must not undo it: a layer pins its experts already in a slot before it
    reads any other, so none read ahead for it is evicted unused."""
    plan = flashmoe.memory_plan(model_dir, prefill_chunk=16)
    m = flashmoe.load(model_dir, memory_budget=plan["minimum"], prefill_chunk=16, prefetch=prefetch,
                      cache_policy=policy)
    assert m.memory["expert_slots"] == TINY["num_experts_per_tok"]
    m.forward(np.arange(200) % TINY["vocab_size"])  # 13 chunks
    s = m.stats
    assert s["read_amplification"] == pytest.approx(s["bytes_read"] / s["distinct_expert_bytes"])
    assert 1.0 <= s["read_amplification"] <= 1.1


def test_a_prompt_longer_than_a_segment_reads_once_per_segment(model_dir):
    """Past 2,048 tokens the layers run a segment at a time, and a cache too small to keep a layer's
    experts reads them again for the next segment: at most once per segment."""
    plan = flashmoe.memory_plan(model_dir, prefill_chunk=64, context_length=4096)
    m = flashmoe.load(model_dir, memory_budget=plan["minimum"], prefill_chunk=64, context_length=4096)
    m.forward(np.arange(3000) % TINY["vocab_size"])  # segments of 2048 + 952 tokens
    assert 1.1 < m.stats["read_amplification"] <= 2.0


def test_generation_reports_the_prompts_amplification(model_dir):
    m = flashmoe.load(model_dir, prefetch=False)
    chunks = list(m.stream(list(range(50)), flashmoe.SamplingParams(max_tokens=3, temperature=0)))
    assert chunks[-1].stats["prompt_read_amplification"] == 1.0
