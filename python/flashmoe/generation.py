"""Text generation on top of the C core: prompt reuse, the sampling loop, stop conditions, chat.

The C core runs the model and samples (csrc/core/sample.c); this module decides what to feed it. A
PromptCache remembers which tokens the engine state holds and keeps a few snapshots of earlier states,
so a prompt that shares a prefix with what was processed before (the next chat turn, the same long
system prompt) runs only its new suffix. The loop then samples one token per step, detokenizes
incrementally and stops on a stop token, a stop string, max_tokens or a full context.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from .errors import ArgumentError, ContextLengthError


@dataclass
class GenerationResult:
    """What Model.generate returns. finish_reason: "stop" (a stop token or string), "length"
    (max_tokens or the context is full) or, from chat, "tool_calls"."""

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict = field(default_factory=dict)   # prompt_tokens, completion_tokens, total_tokens, cached_tokens
    stats: dict = field(default_factory=dict)   # prompt/decode seconds and tokens/s, expert hit rate, read GB/s
    stop: str | int | None = None               # the stop string or stop token id that ended it, if any


@dataclass
class GenerationChunk:
    """One step of Model.stream: the text completed by this step (possibly "", while a multi-byte
    character or a possible stop string is held back) and its token ids. The last chunk has
    finish_reason, usage and stats set."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: dict | None = None
    stats: dict | None = None
    stop: str | int | None = None  # what ended it with "stop": the stop string, or the stop token id


class PromptCache:
    """Up to `capacity` snapshots of earlier engine states (LRU), and the choice of where a prompt starts.

    What the engine state holds is never tracked here: the engine records the tokens of its sequence
    itself (`_core.Model.tokens()`, and `Snapshot.tokens` for a snapshot), updates them only when a
    chunk has run through every layer, and resets them with the state when a forward fails. So an
    exception anywhere (a read error, Ctrl-C between a C call and the next line, a bad argument) can
    never leave this cache claiming a state the engine is not in.

    A snapshot holds the KV rows and the DeltaNet state at its position (the recurrent state cannot be
    rewound, so reuse of a shorter prefix needs one). Snapshots live outside memory_budget; their sizes
    are in `nbytes`."""

    def __init__(self, core, capacity: int = 4):
        self._core = core
        self.capacity = capacity
        self._snaps: list[tuple[list[int], object]] = []  # (the snapshot's own tokens, snapshot)

    @property
    def tokens(self) -> list[int]:
        """The tokens the engine state holds, in order (the engine's record)."""
        return self._core.tokens().tolist()

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for _, s in self._snaps)

    def clear(self) -> None:
        self._snaps = []
        self._core.reset()

    def reset_state(self) -> None:
        """Forget the current sequence; snapshots stay."""
        self._core.reset()

    def start(self, prompt: list[int]) -> int:
        """Put the engine in the longest known state whose tokens are a proper prefix of prompt (at least
        one prompt token must still run, for its logits); returns how many prompt tokens it holds."""
        held = self.tokens
        n = len(held)
        best, best_len = None, 0
        if 0 < n < len(prompt) and prompt[:n] == held:
            best, best_len = "current", n
        for i, (toks, _) in enumerate(self._snaps):
            k = len(toks)
            if best_len < k < len(prompt) and prompt[:k] == toks:
                best, best_len = i, k
        if best is None:
            self.reset_state()
            return 0
        if best != "current":
            toks, snap = self._snaps.pop(best)
            self._snaps.append((toks, snap))  # most recently used last
            self._core.restore(snap)
        return best_len

    def snapshot(self) -> None:
        held = self.tokens
        if self.capacity <= 0 or any(t == held for t, _ in self._snaps):
            return
        snap = self._core.snapshot()
        self._snaps.append((snap.tokens.tolist(), snap))
        while len(self._snaps) > self.capacity:
            self._snaps.pop(0)

    def run(self, ids: list[int], progress=None) -> np.ndarray:
        """Run ids from the current position in one engine call (progress(done, len(ids)) after each
        layer; an exception from it stops the run and resets the state); the last position's logits."""
        return np.asarray(self._core.forward(np.asarray(ids, dtype=np.int32), False, progress)).reshape(-1)

    def step(self, token: int, sampler) -> int:
        """Run one token and sample the next in C (the sampler accepts it)."""
        return int(self._core.decode_step(np.asarray([token], dtype=np.int32), sampler))


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string (it may yet become
    one, so a stream must not emit it)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def run_generation(model, prompt: list[int], params, *, tokenizer=None, skip_special_tokens: bool = False,
                   snapshot_at: list[int] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> Iterator[GenerationChunk]:
    """The generation loop as a generator of chunks; leaving it stops decoding at once.

    prompt: token ids. params: a validated SamplingParams. snapshot_at: prompt positions after which the
    state is worth a snapshot (e.g. the start of the last chat turn). progress(done, total) is called
    while the prompt runs."""
    cache: PromptCache = model._cache
    ctx = model.context_length
    if not prompt:
        raise ArgumentError("the prompt is empty: give at least one token")
    if len(prompt) > ctx:
        raise ContextLengthError(f"the prompt has {len(prompt)} tokens but the context holds {ctx} "
                                 f"(load the model with a larger context_length)")
    vocab = int(model.config["vocab_size"])
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise ArgumentError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if params.stop and tokenizer is None:
        raise ArgumentError("stop strings need the model's tokenizer (tokenizer.json in the model directory)")
    stop_ids = set(model.eos_token_ids) | {int(t) for t in params.stop_token_ids}
    sampler = model._new_sampler(params)
    sampler.accept(np.asarray(prompt, dtype=np.int32))

    # One generation at a time on a model: held from the first next() until the generator ends or is
    # closed (leaving the loop, or garbage collection), so another thread's call waits its turn.
    with model._exclusive("a generation"):
        before, usage = model._raw_stats(), model._core.expert_usage()
        t0 = time.perf_counter()
        reused = cache.start(prompt)
        marks = sorted({p for p in (snapshot_at or []) if reused < p < len(prompt)} | {len(prompt) - 1})
        pos, logits = reused, None
        # Each part in one engine call, which runs it layer by layer (each expert read once per layer, not
        # once per call) and reports progress after each layer; call boundaries do not depend on the chunk
        # or the budget, so neither does the output.
        for end in marks + [len(prompt)]:
            if pos < end:
                at = pos
                report = (lambda done, _, at=at: progress(at + done - reused, len(prompt) - reused)) if progress else None
                logits = cache.run(prompt[pos:end], report)
                pos = end
            if end in marks and end > reused and end < len(prompt):
                cache.snapshot()
        model._last_prompt_logits = logits
        token = int(sampler.sample(np.array(logits, dtype=np.float32)))
        sampler.accept(np.asarray([token], dtype=np.int32))
        t1 = time.perf_counter()
        prompt_read = model._raw_stats()["bytes_read"] - before["bytes_read"]
        prompt_distinct = model._distinct_bytes(usage)

        decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens) if tokenizer else None
        out: list[int] = []
        text, emitted, n_yielded = "", 0, 0
        # max_tokens 0 runs (and caches) the prompt and generates nothing, as llama.cpp's n_predict 0
        finish, cut, matched = (None if params.max_tokens > 0 else "length"), False, None

        longest = max((len(x) for x in params.stop), default=0)

        def stop_cut(s: str, start: int) -> tuple[int, str | None]:
            """Where the first stop string starts in s (-1: none), and which one; only a match ending past
            `start` is new, so each token's search covers its own text and a stop string's length before it."""
            frm = max(0, start - longest + 1)
            hits = [(i, x) for i, x in ((s.find(x, frm), x) for x in params.stop) if i >= 0]
            return min(hits) if hits else (-1, None)

        while finish is None:
            if token in stop_ids:
                finish, matched = "stop", token
                break
            out.append(token)
            if decoder is not None:
                seen = len(text)
                text += decoder.push(token)
                i, hit = stop_cut(text, seen) if params.stop else (-1, None)
                if i >= 0:
                    text, finish, cut, matched = text[:i], "stop", True, hit
                    break
            if len(out) >= params.max_tokens or model.position >= ctx:  # no room for the sampled token
                finish = "length"
                break
            safe = len(text) - _held_back(text, params.stop)
            yield GenerationChunk(text[emitted:safe], [token])
            emitted, n_yielded = max(emitted, safe), len(out)
            token = cache.step(token, sampler)
        if decoder is not None and not cut:
            seen = len(text)
            text += decoder.flush()
            i, hit = stop_cut(text, seen) if params.stop else (-1, None)
            if i >= 0:
                text, finish, matched = text[:i], "stop", hit
        t2 = time.perf_counter()

        usage = {"prompt_tokens": len(prompt), "completion_tokens": len(out),
                 "total_tokens": len(prompt) + len(out), "cached_tokens": reused}
        after = model._raw_stats()
        hits = after["expert_hits"] - before["expert_hits"]
        misses = after["expert_misses"] - before["expert_misses"]
        read = after["bytes_read"] - before["bytes_read"]
        decode_s = t2 - t1
        stats = {"prompt_seconds": t1 - t0, "prompt_tokens_per_second": (len(prompt) - reused) / max(t1 - t0, 1e-9),
                 "decode_seconds": decode_s,
                 "decode_tokens_per_second": (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else 0.0,
                 "expert_hit_rate": hits / (hits + misses) if hits + misses else 1.0,
                 "bytes_read": read, "read_gbps": read / (t2 - t0) / 1e9 if t2 > t0 else 0.0,
                 "prompt_read_amplification": prompt_read / prompt_distinct if prompt_distinct else 0.0,
                 "backend": model.backend}
        model._last_generation = (usage, stats)
        yield GenerationChunk(text[emitted:], out[n_yielded:], finish, usage, stats, matched)
