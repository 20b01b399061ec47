"""Choosing a backend (load's `backend`), and a promise of the backend split that tests elsewhere do not
check: a model computes the same whatever the thread count (the CPU backend runs small experts side by
side, big ones split). The include rule is tests/test_layering.py."""

import os
import sys

import numpy as np
import pytest

import flashmoe
from flashmoe import _core
from flashmoe.errors import ArgumentError, FlashMoEError
from flashmoe.synth import write_random_model
from test_engine_errors import TINY


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_random_model(d, TINY, bits=4, progress=False)
    return d


def test_default_backend(model_dir):
    """The default ("auto", also by name) is the CPU unless this build has Metal or CUDA
    (csrc/backend/backend.c: then Metal where the machine has a Metal GPU and the backend every op, else
    CUDA where it has a CUDA GPU)."""
    m = flashmoe.load(model_dir)
    assert "cpu" in flashmoe.backends()
    gpus = [b for b in ("metal", "cuda") if b in flashmoe.backends() and _core.backend_has_device(b)
            and (b != "metal" or sys.platform == "darwin")]  # (the emulated Metal of tests is no default)
    env = os.environ.get("FLASHMOE_BACKEND", "auto")
    assert m.backend == (env if env != "auto" else gpus[0] if gpus else "cpu")
    m.forward([1, 2, 3])
    assert m.stats["backend"] == m.backend
    assert flashmoe.load(model_dir, backend="auto").backend == m.backend


def test_device_expert_counters_are_zero_without_a_device_cache(model_dir):
    """Model.stats' device_expert_* counters (a GPU backend's own expert cache: CUDA's VRAM tier,
    tests/test_cuda_backend.py) are there and zero on the CPU, whose expert cache is the host's."""
    m = flashmoe.load(model_dir, backend="cpu")
    m.generate_tokens([1, 2, 3], max_tokens=4, stop_token_ids=[])
    st = m.stats
    assert st["expert_hits"] + st["expert_misses"] > 0
    assert [st[k] for k in ("device_expert_slots", "device_expert_hits", "device_expert_misses",
                            "device_bytes_in", "device_host_experts", "device_prompt_layers")] == [0, 0, 0, 0, 0, 0]
    assert st["last"]["device_expert_hits"] == 0


@pytest.mark.parametrize("name,match", [("cuda", "'cuda' is not built into this flashmoe"),
                                        ("metal", "'metal' is not built into this flashmoe"),
                                        ("tpu", "'tpu' is not a flashmoe backend"),
                                        (3, "3 is not a flashmoe backend")])
def test_unbuilt_or_unknown_backend_is_a_clear_error(model_dir, name, match):
    if name in flashmoe.backends():
        pytest.skip(f"{name} is built here")
    with pytest.raises(ArgumentError, match=match):
        flashmoe.load(model_dir, backend=name)


def test_the_c_loader_refuses_an_unknown_backend_too(model_dir):
    from flashmoe.model import _load_spec

    spec = _load_spec(os.fspath(model_dir))[1]
    spec["backend"] = "tpu"
    with pytest.raises(FlashMoEError, match="unknown backend 'tpu'"):
        _core.Model(spec)


@pytest.mark.parametrize("threads", [1, 2])
def test_logits_do_not_depend_on_how_experts_are_spread(model_dir, threads):
    """1 thread: every expert alone; 2: experts of up to 64 tokens side by side on their own lanes, bigger
    ones split over the pool (256 tokens in one chunk over 8 experts, 2 each: both kinds). Same function."""
    ids = (np.arange(256) * 7) % TINY["vocab_size"]
    before = _core.get_threads()
    try:
        _core.set_threads(1)
        ref = flashmoe.load(model_dir, prefill_chunk=256).forward(ids)
        _core.set_threads(threads)
        m = flashmoe.load(model_dir, prefill_chunk=256)
        got = m.forward(ids)
        counts = m.expert_usage()
        assert (counts > 64).any() and ((counts > 0) & (counts <= 64)).any()  # both paths ran
    finally:
        _core.set_threads(before)
    np.testing.assert_array_equal(got, ref)  # rows split over threads, never a reduction: bit for bit



def test_flashmoe_backend_environment_picks_the_default(model_dir):
    """FLASHMOE_BACKEND names the backend of every load that names none ("auto"): a known one is used, an
    unknown one is an error that names it (a subprocess each: the variable is read at load)."""
    import subprocess
    import sys

    code = ("import flashmoe\ntry:\n    print(flashmoe.load(%r).backend)\nexcept flashmoe.FlashMoEError as e:\n"
            "    print(type(e).__name__, e)" % str(model_dir))
    for value, want in (("cpu", "cpu"), ("", "cpu"), ("nope", "unknown backend 'nope'")):
        env = dict(os.environ, FLASHMOE_BACKEND=value)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0 and want in out.stdout, (value, out.stdout, out.stderr[-2000:])
