"""The prompt cache (python/flashmoe/generation.py PromptCache) reuses a state only when every token it
holds is the new prompt's, and keeps at most `prompt_cache` snapshots, dropping the least recently used.

Every answer is checked against a fresh model (fp32 activations: a prompt run in other pieces agrees to
rounding, ~1e-5 of the largest logit, while a state holding one wrong token is off by far more), on the
last prompt position's logits and the greedy tokens that follow.

The states that differ from a new prompt in their last token only are what stop strings and re-rendered
chat turns produce: the engine ran a token that the next prompt spells differently. A cache that compared
all but the last cached token would reuse them; the tests below build such prompts on purpose, for the
current state and for a snapshot.
"""

import numpy as np
import pytest

import flashmoe
from flashmoe.synth import write_random_model
from test_generate import TINY  # the tiny model of the generation tests
from test_faults import same_as_fresh  # the prompt's answer and the engine's tokens against a fresh model

GREEDY = dict(temperature=0.0, stop_token_ids=[])
OPTS = dict(context_length=256, int8_activations=False)
RNG = np.random.default_rng(2)
A = RNG.integers(1, 300, 17).tolist()     # three unrelated prompts (distinct first tokens)
B = RNG.integers(1, 300, 13).tolist()
C = RNG.integers(1, 300, 21).tolist()
TAIL = [7, 8, 9, 10, 11]
assert len({A[0], B[0], C[0]}) == 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pcache") / "m"
    write_random_model(path, TINY, bits=4, progress=False)
    return path


@pytest.fixture(scope="module")
def fresh(model_dir):
    """A fresh model's answer to a prompt: (last prompt position's logits, greedy tokens)."""
    m = flashmoe.load(model_dir, **OPTS, prompt_cache=0)

    def answer(prompt, n):
        m.reset()
        r = m.generate(prompt, max_tokens=n, **GREEDY)
        assert r.usage["cached_tokens"] == 0
        return m._last_prompt_logits.copy(), r.token_ids
    return answer


def other_token(t):
    return t % 299 + 1  # another id of the vocabulary, never t


def test_one_wrong_token_changes_the_answer(fresh):
    """The premise: the answers to prompts that differ in one token differ by more than the tolerance
    (so reusing a state one token off could not pass as a fresh answer)."""
    prompt = A + TAIL
    altered = A[:-1] + [other_token(A[-1])] + TAIL
    a, b = fresh(prompt, 1)[0], fresh(altered, 1)[0]
    assert np.abs(a - b).max() > 100 * 1e-4 * np.abs(a).max()


def test_current_state_differing_in_its_last_token_is_not_reused(model_dir, fresh):
    m = flashmoe.load(model_dir, **OPTS)
    r = m.generate(A, max_tokens=6, **GREEDY)
    held = A + r.token_ids[:-1]  # the last sampled token never ran
    assert m._cache.tokens == held
    prompt = held[:-1] + [other_token(held[-1])] + TAIL
    r2 = same_as_fresh(m, fresh, prompt)
    # what it may reuse: a snapshot of a true prefix (the one taken one token before A's end)
    assert r2.usage["cached_tokens"] == len(A) - 1


def test_snapshot_differing_in_its_last_token_is_not_reused(model_dir, fresh):
    m = flashmoe.load(model_dir, **OPTS)
    m.generate(A, max_tokens=4, **GREEDY)  # a snapshot of A[:-1]
    m.generate(C, max_tokens=4, **GREEDY)  # the current state moves elsewhere (and C[:-1] is kept)
    prompt = A[:-2] + [other_token(A[-2])] + TAIL  # A[:-1] but for its last token, then more
    r = same_as_fresh(m, fresh, prompt)
    assert r.usage["cached_tokens"] == 0


def test_a_prompt_ending_inside_the_held_tokens_reuses_a_snapshot_only(model_dir, fresh):
    """The new prompt is a prefix of what the engine holds (a chat turn re-rendered shorter): the
    current state holds tokens past it and cannot be rewound."""
    m = flashmoe.load(model_dir, **OPTS)
    r = m.generate(A, max_tokens=6, **GREEDY)
    held = A + r.token_ids[:-1]
    r2 = same_as_fresh(m, fresh, held[:-2])
    assert r2.usage["cached_tokens"] == len(A) - 1


# ------------------------------------------------------------------ README: prompt_cache=N, LRU, 0


def snapshots_bytes(model_dir, prompts):
    """Bytes of one snapshot taken one token before each prompt's end (what generate keeps)."""
    m = flashmoe.load(model_dir, **OPTS)
    out = []
    for p in prompts:
        m.forward(p[:-1])
        out.append(m.snapshot().nbytes)
    return out


def test_prompt_cache_keeps_at_most_n_snapshots_and_drops_the_least_recently_used(model_dir, fresh):
    m = flashmoe.load(model_dir, **OPTS, prompt_cache=2)
    sa, sb, sc = snapshots_bytes(model_dir, [A, B, C])
    assert len({sa, sb, sc}) == 3  # the prompts' lengths differ: the byte counts say which are kept

    def turn(prompt, cached):
        r = same_as_fresh(m, fresh, prompt, n=3)
        assert r.usage["cached_tokens"] == cached, (prompt, r.usage)

    turn(A, 0)                # keeps A[:-1]
    turn(B, 0)                # keeps B[:-1]: [A, B]
    assert m.prompt_cache_bytes == sa + sb
    turn(A, len(A) - 1)       # A's snapshot restored and used: now the most recent [B, A]
    assert m.prompt_cache_bytes == sa + sb
    turn(C, 0)                # a third: over the cap, the least recently used (B, not A) goes
    assert m.prompt_cache_bytes == sa + sc
    turn(A, len(A) - 1)       # A is still there
    turn(B, 0)                # B was dropped; keeping B[:-1] drops C, now the least recently used
    assert m.prompt_cache_bytes == sa + sb
    turn(C, 0)


def test_prompt_cache_zero_keeps_no_snapshot_but_still_extends_the_current_state(model_dir, fresh):
    m = flashmoe.load(model_dir, **OPTS, prompt_cache=0)
    r = same_as_fresh(m, fresh, A)
    assert r.usage["cached_tokens"] == 0 and m.prompt_cache_bytes == 0
    # the next turn extends what the engine holds: only the new part runs
    follow = A + r.token_ids + TAIL
    r2 = same_as_fresh(m, fresh, follow)
    assert r2.usage["cached_tokens"] == len(A) + len(r.token_ids) - 1
    same_as_fresh(m, fresh, B)
    # no snapshot of A's states: A again runs from the start
    r3 = same_as_fresh(m, fresh, A)
    assert r3.usage["cached_tokens"] == 0 and m.prompt_cache_bytes == 0
