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


def test_a_small_cache_reads_some_again(model_dir):
    """At the minimum budget in chunks of 16, a prompt's experts are read several times over (what issue
    19's layer-major prefill is to bring down to once): the statistic says so, and agrees with its parts."""
    plan = flashmoe.memory_plan(model_dir, prefill_chunk=16)
    m = flashmoe.load(model_dir, memory_budget=plan["minimum"], prefill_chunk=16, prefetch=False)
    m.forward(np.arange(200) % TINY["vocab_size"])
    s = m.stats
    assert s["read_amplification"] == pytest.approx(s["bytes_read"] / s["distinct_expert_bytes"])
    assert s["read_amplification"] > 1.5


def test_generation_reports_the_prompts_amplification(model_dir):
    m = flashmoe.load(model_dir, prefetch=False)
    chunks = list(m.stream(list(range(50)), flashmoe.SamplingParams(max_tokens=3, temperature=0)))
    assert chunks[-1].stats["prompt_read_amplification"] == 1.0
