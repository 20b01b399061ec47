"""The public Model: load a packed directory, run the forward pass and generate, all in the C core."""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from dataclasses import dataclass, field

import numpy as np

from . import arch as _arch
from .errors import ArgumentError, ContextLengthError, FlashMoEError, FormatError, ModelBusyError
from .format import EXPERT_NAMES
from .reader import read_header

_DTYPE_IDS = {"f32": 0, "bf16": 1, "q8": 2, "q4": 3}
_ARCH_IDS = {"qwen3_5_moe": 0, "qwen3_next": 1}
CACHE_POLICIES = {"lru": 0, "lfru": 1, "pagecache": 2}
DEFAULT_CONTEXT = 4096
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}
INT32_MAX = 2**31 - 1
MAX_THREADS = 256          # csrc/core/threads.c
MAX_STOP_STRINGS = 256     # each is searched for after every token
MAX_STOP_LENGTH = 4096
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_COUNTERS = ("tokens", "expert_hits", "expert_misses", "prefetches", "prefetch_hits", "bytes_read",
             "io_wait_seconds", "io_busy_seconds", "compute_seconds", "device_expert_hits",
             "device_expert_misses", "device_bytes_in", "device_step_replays", "device_step_recordings",
             "device_shared_folds", "device_host_experts", "device_prompt_layers", "device_launch_seconds",
             "device_wait_seconds")


def parse_size(value) -> int:
    """Bytes from an int or a string such as "6GB" (10^9), "6GiB" or "6G" (2^30), "512MB", "1.5 GiB"."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        n = int(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        num = text.rstrip("bikmgt")
        unit = text[len(num):]
        try:
            n = int(float(num) * _UNITS[unit])
        except (ValueError, KeyError, OverflowError):
            raise ArgumentError(f"cannot read a size from {value!r} (try '6GB', '6GiB' or a number of bytes)") from None
    else:
        raise ArgumentError(f"a size must be an int or a string like '6GB', got {type(value).__name__}")
    if not 0 < n < 2**64:
        raise ArgumentError(f"a size must be positive and below 2**64 bytes, got {value!r}")
    return n


def int_arg(name: str, value, lo: int, hi: int = INT32_MAX) -> int:
    """value as an int in [lo, hi], else ArgumentError naming it (bools and floats are not integers)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ArgumentError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ArgumentError(f"{name} must be in [{lo}, {hi}], got {value}")
    return int(value)


def _derived(d: dict) -> dict:
    d["hit_rate"] = d["expert_hits"] / max(1, d["expert_hits"] + d["expert_misses"])
    # bytes read from disk per byte of the distinct routed experts the tokens used: 1.0 when each was read
    # once; more when a small cache reads some again (a prompt's chunks); below 1 when some were cached
    d["read_amplification"] = d["bytes_read"] / d["distinct_expert_bytes"] if d["distinct_expert_bytes"] else 0.0
    d["read_gbps"] = d["bytes_read"] / d["io_busy_seconds"] / 1e9 if d["io_busy_seconds"] > 0 else 0.0
    d["tokens_per_second"] = d["tokens"] / d["compute_seconds"] if d["compute_seconds"] > 0 else 0.0
    return d


def _desc(name: str, t: dict) -> dict:
    d = {"name": name, "dtype": _DTYPE_IDS[t["dtype"]], "shape": list(t["shape"]), "offset": t["offset"],
         "nbytes": t["nbytes"]}
    for k in ("group_size", "scales_offset", "biases_offset"):
        if k in t:
            d[k] = t[k]
    if t.get("scale_dtype") == "bfloat16":
        d["scale_bf16"] = 1
    return d


def _engine_config(architecture: str, cfg: dict) -> dict:
    """The numbers the C core reads, derived from the HF config (field names verbatim)."""
    rope = cfg["rope_parameters"]
    if rope.get("rope_type", "default") != "default":
        raise FlashMoEError(f"rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
    return {
        **{k: int(cfg[k]) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
            "linear_num_key_heads", "linear_num_value_heads", "num_experts", "num_experts_per_tok",
            "moe_intermediate_size", "shared_expert_intermediate_size")},
        "intermediate_size": int(cfg.get("intermediate_size") or 0),
        # Qwen3.5 always renormalises the top-k weights; Qwen3-Next does when norm_topk_prob.
        "norm_topk_prob": 1 if architecture == "qwen3_5_moe" else int(bool(cfg.get("norm_topk_prob", True))),
        "tie_word_embeddings": int(bool(cfg.get("tie_word_embeddings", False))),
        "rms_norm_eps": float(cfg["rms_norm_eps"]),
        "rope_theta": float(rope["rope_theta"]),
        "partial_rotary_factor": float(rope.get("partial_rotary_factor", 1.0)),
    }


def _eos_ids(cfg: dict) -> list[int]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _load_spec(path: str, *, memory_budget=None, cache_policy: str = "lfru", prefetch: bool = True,
               io_threads: int = 8, context_length: int | None = None, prefill_chunk: int | None = None,
               expert_cache_slots: int | None = None, verify_checksums: bool = False,
               int8_activations: bool = True, backend: str = "auto", gpu_memory_budget=None):
    """The validated header and the load spec the C core takes (csrc/python/module.cpp: to_spec)."""
    built = backends()
    if not isinstance(backend, str) or (backend not in built and backend != "auto"):
        why = ("is not built into this flashmoe" if backend in KNOWN_BACKENDS else "is not a flashmoe backend")
        raise ArgumentError(f"backend {backend!r} {why} (built: {', '.join(built)}; docs/ARCHITECTURE.md)")
    header = read_header(path)
    architecture = header["architecture"]
    cfg = header["config"]
    n_layers = cfg["num_hidden_layers"]
    if context_length is None:
        context_length = min(int(cfg.get("max_position_embeddings") or DEFAULT_CONTEXT), DEFAULT_CONTEXT)
    context_length = int_arg("context_length", context_length, 1)
    if prefill_chunk is not None:
        prefill_chunk = int_arg("prefill_chunk", prefill_chunk, 1)
    if expert_cache_slots is not None:
        expert_cache_slots = int_arg("expert_cache_slots", expert_cache_slots, 1)
    if not isinstance(cache_policy, str) or cache_policy not in CACHE_POLICIES:
        raise ArgumentError(f"cache_policy must be one of {', '.join(CACHE_POLICIES)}, got {cache_policy!r}")
    io_threads = int_arg("io_threads", io_threads, 1, 1024)
    ex = header["experts"]
    layers = {e["layer"]: e for e in ex["layers"]}
    n_experts = int(cfg["num_experts"])
    checksums = []
    for i in range(n_layers):
        checksums.extend(layers[i]["checksums"] if i in layers else [0] * n_experts)
    spec = {
        "arch": _ARCH_IDS[architecture],
        "config": _engine_config(architecture, cfg),
        "layer_is_full_attention": [int(t == "full_attention") for t in cfg["layer_types"]],
        "layer_is_moe": [int(_arch.is_moe_layer(architecture, cfg, i)) for i in range(n_layers)],
        "dense_path": os.path.join(path, header["dense"]["file"]),
        "dense_size": header["dense"]["size"],
        "has_dense_checksum": "checksum" in header["dense"],  # absent in models written before it existed
        "dense_checksum": header["dense"].get("checksum", 0),
        "dense": [_desc(n, t) for n, t in header["dense"]["tensors"].items()],
        "expert_paths": [os.path.join(path, layers[i]["file"]) if i in layers else None for i in range(n_layers)],
        "expert_file_sizes": [layers[i]["size"] if i in layers else 0 for i in range(n_layers)],
        "expert_checksums": checksums,
        "expert_blob_size": ex["blob_size"],
        "expert_stride": ex["stride"],
        "expert_tensors": [_desc(n, ex["tensors"][n]) for n in EXPERT_NAMES],
        "context_length": int(context_length),
        "prefill_chunk": int(prefill_chunk or 128),
        "memory_budget": parse_size(memory_budget) if memory_budget is not None else 0,
        "gpu_memory_budget": parse_size(gpu_memory_budget) if gpu_memory_budget is not None else 0,
        "expert_cache_slots": int(expert_cache_slots or 0),
        "cache_policy": CACHE_POLICIES[cache_policy],
        "io_threads": int(io_threads),
        "prefetch": bool(prefetch),
        "verify_checksums": bool(verify_checksums),
        "int8_activations": bool(int8_activations),
        "backend": backend,
    }
    if prefill_chunk is None:
        spec["prefill_chunk"] = _auto_prefill_chunk(spec)
    return header, spec


def _auto_prefill_chunk(spec: dict) -> int:
    """The largest prompt chunk of 512, 256 and 128 tokens whose scratch costs at most a tenth of the
    expert cache. A prompt runs layer by layer whatever the chunk, so it changes neither what is read nor
    the output; a bigger one runs the attention, DeltaNet and shared-expert matmuls on more tokens at a
    time, but its scratch comes out of the memory budget, i.e. out of the expert cache."""
    from . import _core

    for chunk in (512, 256):
        try:
            plan = _core.plan_memory({**spec, "prefill_chunk": chunk})
        except FlashMoEError:  # the budget does not even fit this chunk's scratch
            continue
        if plan["scratch_bytes"] <= plan["expert_cache_bytes"] / 10:
            return chunk
    return 128


def memory_plan(path, **options) -> dict:
    """How flashmoe.load(path, **options) would split its memory budget, without loading: minimum
    (the smallest budget that loads), budget, dense_bytes, kv_bytes, state_bytes, scratch_bytes,
    expert_cache_bytes, expert_slots, experts_total. Raises MemoryBudgetError like load would."""
    from . import _core

    options.pop("threads", None)
    return _core.plan_memory(_load_spec(os.fspath(path), **options)[1])


@dataclass
class SamplingParams:
    """How to pick each token (defaults as mlx-lm / OpenAI: plain sampling at temperature 1).

    The pipeline, in the C core (csrc/core/sample.c, semantics in csrc/include/flashmoe.h): penalties
    over the prompt and generated tokens (repetition_penalty HF-style: a seen token's logit divided
    by it if positive, multiplied if negative; presence_penalty subtracted once per seen token,
    frequency_penalty times its count), then temperature 0 -> argmax, else top_k, softmax at the
    temperature, top_p, min_p, renormalise, a seeded draw. seed None: a fresh random seed per use.
    """

    temperature: float = 1.0
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    min_p: float = 0.0                # 0 = off
    repetition_penalty: float = 1.0   # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)

    def validate(self) -> "SamplingParams":
        """Raise ArgumentError (a ValueError) naming the first bad field; returns self."""
        def num(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ArgumentError(f"{name} must be a finite number, got {v!r}")
            try:
                f = float(v)
            except OverflowError:
                f = float("inf")
            if not abs(f) <= _FLOAT32_MAX:  # finite as the C core's float32, too: 1e300 would be inf there
                raise ArgumentError(f"{name} must be a finite number, got {v!r}")
            return f

        def integer(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ArgumentError(f"{name} must be an integer, got {v!r}")
            return int(v)

        if num("temperature", self.temperature) < 0:
            raise ArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 <= integer("top_k", self.top_k) <= INT32_MAX:
            raise ArgumentError(f"top_k must be >= 0 (0 = off) and below 2**31, got {self.top_k}")
        if not 0 < num("top_p", self.top_p) <= 1:
            raise ArgumentError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= num("min_p", self.min_p) <= 1:
            raise ArgumentError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if num("repetition_penalty", self.repetition_penalty) <= 0:
            raise ArgumentError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        num("presence_penalty", self.presence_penalty)
        num("frequency_penalty", self.frequency_penalty)
        if self.seed is not None and not 0 <= integer("seed", self.seed) < 2**64:
            raise ArgumentError(f"seed must be None or an integer in [0, 2**64), got {self.seed}")
        if integer("max_tokens", self.max_tokens) < 0:
            raise ArgumentError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if isinstance(self.stop, (str, bytes)) or not isinstance(self.stop, (list, tuple)) or \
                not all(isinstance(x, str) and x for x in self.stop):
            raise ArgumentError(f"stop must be a list of non-empty strings, got {self.stop!r:.200}")
        if len(self.stop) > MAX_STOP_STRINGS or any(len(x) > MAX_STOP_LENGTH for x in self.stop):
            raise ArgumentError(f"stop: at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters "
                             f"(got {len(self.stop)}, the longest {max(map(len, self.stop))})")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, (list, tuple, set)):
            raise ArgumentError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r:.200}")
        for t in self.stop_token_ids:
            if not 0 <= integer("stop_token_ids entry", t) <= INT32_MAX:
                raise ArgumentError(f"stop_token_ids must be token ids in [0, 2**31), got {t}")
        return self

    def core_params(self) -> dict:
        """The dict _core.Sampler takes; a random seed when seed is None (0 is the C default seed)."""
        self.validate()
        seed = self.seed if self.seed is not None else secrets.randbits(64)
        return {"temperature": float(self.temperature), "top_k": int(self.top_k), "top_p": float(self.top_p),
                "min_p": float(self.min_p), "repetition_penalty": float(self.repetition_penalty),
                "presence_penalty": float(self.presence_penalty),
                "frequency_penalty": float(self.frequency_penalty), "seed": int(seed)}


class Model:
    """A loaded packed model and the state of one sequence.

    Use flashmoe.load(path, ...) to make one. Options:
      memory_budget       bytes (or "6GB") for everything the engine allocates: dense weights, KV cache,
                          DeltaNet state, scratch and the expert cache, which gets what is left
                          (default: half of physical RAM). Too small a budget raises MemoryBudgetError
                          naming the minimum.
      cache_policy        "lfru" (default: recency-weighted frequency), "lru", or "pagecache" (no engine
                          cache: buffered reads through the OS page cache)
      prefetch            predict the next layer's experts from the current hidden state, keep them
                          from eviction and read them ahead (default True)
      io_threads          concurrent expert reads (default 8)
      threads             compute threads (process-wide; default: one per CPU core)
      context_length      tokens of KV cache (default min(max_position_embeddings, 4096))
      prefill_chunk       a prompt's attention and DeltaNet run this many tokens at a time, rounded up
                          to a multiple of 16 (default: 512, 256 or 128, the largest whose scratch costs
                          at most a tenth of the expert cache); changes neither the reads nor the output
      expert_cache_slots  cap the expert cache at this many experts (default: what the budget holds)
      verify_checksums    check each expert blob's CRC-32 on every read (costs CPU: bench/RESULTS.md)
      prompt_cache        snapshots of earlier prompt states kept for reuse by generate/chat (default 4;
                          0 = none). Each holds the KV rows and DeltaNet state at its position and
                          lives outside memory_budget (prompt_cache_bytes says how much).
      int8_activations    matmuls on int8-quantized activations, as llama.cpp does (default True): ~2x
                          faster 4-bit decode, ~1.4x faster prompts, ~1% error per product; False keeps
                          them fp32 (the exact dequantized function; csrc/backend/cpu/cpu.h)
      backend             where the layers compute: "auto" (the default: the environment's
                          FLASHMOE_BACKEND where set, else "metal" on a Mac whose build has the Metal
                          backend complete and a Metal GPU, else "cpu"), "cpu", "cuda" or "metal";
                          flashmoe.backends() lists what this build has, Model.backend says which ran
                          (docs/ARCHITECTURE.md)
      gpu_memory_budget   CUDA: bytes (or "16GB") of GPU memory for the dense weights, state, scratch
                          and the VRAM expert cache, which gets what is left (default: what the GPU has
                          free, less 1 GiB); experts missing there come from the host's expert cache
                          (memory_budget), and below it from disk
    """

    def __init__(self, path, *, threads: int | None = None, prompt_cache: int = 4, **options):
        from . import _core
        from .generation import PromptCache

        self.path = os.fspath(path)
        self.header, spec = _load_spec(self.path, **options)
        self.architecture = self.header["architecture"]
        self.cache_policy = options.get("cache_policy", "lfru")
        prompt_cache = int_arg("prompt_cache", prompt_cache, 0, 4096)
        if threads is not None:
            _core.set_threads(int_arg("threads", threads, 1, MAX_THREADS))
        self._core = _core.Model(spec)
        self.prefill_chunk = int(spec["prefill_chunk"])
        self._cache = PromptCache(self._core, prompt_cache)
        self._lock = threading.Lock()
        self._lock_owner = None  # the thread holding _lock
        self._tokenizer = None
        self._last_generation = None
        self._eos = _eos_ids(self.header["config"])
        self._base = self._raw_stats()  # counters at load / reset_stats
        self._usage_base = self._core.expert_usage()
        self._last = {k: 0 for k in _COUNTERS}
        self._last["distinct_expert_bytes"] = 0
        self._expert_stride = int(self.header["experts"]["stride"])
    # ------------------------------------------------------------------ properties

    @property
    def config(self) -> dict:
        """The model's Hugging Face text config (field names verbatim)."""
        return self.header["config"]

    @property
    def position(self) -> int:
        """Tokens processed in the current sequence."""
        return self._core.position

    @property
    def context_length(self) -> int:
        return self._core.context_length

    @property
    def backend(self) -> str:
        """The backend the layers compute on ("cpu", ...)."""
        return self._core.backend

    def _raw_stats(self) -> dict:
        return self._core.stats()

    @property
    def stats(self) -> dict:
        """Counters since load (or reset_stats): tokens, expert_hits, expert_misses (one per expert per
        layer per chunk), prefetches, prefetch_hits, bytes_read, io_wait_seconds (compute thread blocked
        on reads), io_busy_seconds (reads in flight), compute_seconds, and derived hit_rate, read_gbps,
        tokens_per_second; distinct_expert_bytes (the routed experts the tokens used, each counted once
        per layer) and read_amplification (bytes_read / distinct_expert_bytes: 1.0 when every expert used
        was read once); device_expert_hits, device_expert_misses and device_bytes_in (CUDA: the VRAM
        expert cache, device_expert_slots experts, above the host's; 0 elsewhere); device_step_replays and
        device_step_recordings (CUDA: decode steps replayed from a recorded CUDA graph, and recordings made);
        device_shared_folds (CUDA: MoE layers whose shared expert ran in the routed experts' kernels);
        device_host_experts (CUDA: routed experts the host computed from its memory instead of copying them);
        device_prompt_layers (CUDA: MoE layers of prompts routed on the GPU, with no round trip to the host);
        device_launch_seconds and device_wait_seconds (CUDA: host time launching replayed steps, and
        blocked waiting for the GPU);
        "last" holds the same for the last forward/generate call; "direct_io" says
        whether expert reads bypass the page cache; "backend" where the layers computed."""
        raw = self._raw_stats()
        out = _derived({**{k: raw[k] - self._base[k] for k in _COUNTERS},
                        "distinct_expert_bytes": self._distinct_bytes(self._usage_base)})
        out["last"] = _derived(dict(self._last))
        out["direct_io"] = raw["direct_io"]
        out["device_expert_slots"] = raw["device_expert_slots"]
        out["backend"] = self._core.backend
        for k in ("last_prompt_tokens", "last_prompt_seconds", "last_generated_tokens", "last_decode_seconds"):
            out[k] = raw[k]
        return out

    def reset_stats(self) -> None:
        self._base = self._raw_stats()
        self._usage_base = self._core.expert_usage()
        self._last = {k: 0 for k in _COUNTERS}
        self._last["distinct_expert_bytes"] = 0

    def _distinct_bytes(self, usage_before) -> int:
        """Bytes of the routed experts used since usage_before (an expert_usage() snapshot)."""
        return int(np.count_nonzero(self._core.expert_usage() - usage_before)) * self._expert_stride

    def expert_usage(self) -> np.ndarray:
        """Token-uses of each routed expert since load (or reset_stats): int64 [layers, experts]."""
        return (self._core.expert_usage() - self._usage_base).astype(np.int64)

    @property
    def memory(self) -> dict:
        """Where the memory budget goes, in bytes: budget, dense_bytes, kv_bytes, state_bytes,
        scratch_bytes, expert_cache_bytes; expert_slots of experts_total experts fit the cache."""
        return self._core.memory()

    def _timed(self, fn, *args):
        before, usage = self._raw_stats(), self._core.expert_usage()
        try:
            return fn(*args)
        finally:
            after = self._raw_stats()
            self._last = {k: after[k] - before[k] for k in _COUNTERS}
            self._last["distinct_expert_bytes"] = self._distinct_bytes(usage)

    # ------------------------------------------------------------------ running

    @contextlib.contextmanager
    def _exclusive(self, what: str):
        """Hold the model for one call (or one whole generation): calls from other threads wait their
        turn, so a Model can be shared between threads. A call from the thread that already holds it
        (an unfinished stream it has not closed) would interleave with that stream: ModelBusyError."""
        me = threading.get_ident()
        if self._lock_owner == me:
            raise ModelBusyError(f"{what}: this thread still holds the model with an unfinished stream; "
                                 f"exhaust it or call its close() first")
        with self._lock:
            self._lock_owner = me
            try:
                yield
            finally:
                self._lock_owner = None

    def reset(self) -> None:
        """Forget the current sequence (prompt cache snapshots stay; clear_prompt_cache drops them)."""
        with self._exclusive("reset"):
            self._cache.reset_state()

    def clear_prompt_cache(self) -> None:
        """Forget the current sequence and every prompt cache snapshot."""
        with self._exclusive("clear_prompt_cache"):
            self._cache.clear()

    @property
    def prompt_cache_bytes(self) -> int:
        return self._cache.nbytes

    def _tokens(self, token_ids) -> np.ndarray:
        """token_ids as int32, each checked against the vocabulary before the cast (which would wrap)."""
        try:
            ids = np.asarray(token_ids)
        except (ValueError, TypeError, OverflowError) as exc:
            raise ArgumentError(f"token_ids must be a 1-D sequence of integers ({exc})") from None
        if ids.ndim != 1 or ids.size == 0:
            raise ArgumentError(f"token_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            if ids.dtype != object or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ArgumentError(f"token_ids must be integers, got {ids.dtype}")
        vocab = int(self.config["vocab_size"])
        bad = np.flatnonzero((ids < 0) | (ids >= vocab))
        if bad.size:
            i = int(bad[0])
            raise ArgumentError(f"token id {ids[i]} at index {i} is outside the vocabulary [0, {vocab})")
        return ids.astype(np.int32)

    def forward(self, token_ids, reset: bool = True, all_logits: bool = True) -> np.ndarray:
        """Run tokens through the model. Returns float32 logits [T, vocab] for every position, or
        [1, vocab] for the last one when all_logits is False (a long prompt's would be T x vocab floats).

        reset=False continues from the current state (prefill, then single-token steps)."""
        ids = self._tokens(token_ids)
        with self._exclusive("forward"):
            if reset:
                self._core.reset()
            return self._timed(self._core.forward, ids, bool(all_logits))

    def trace(self, token_ids, reset: bool = True) -> dict:
        """Run tokens and return every named intermediate of the forward pass as float32 [T, n]:
        "embed", "L{i}.attn_out" or "L{i}.deltanet_out", "L{i}.mlp_out", "L{i}.out" (the residual
        stream after layer i), "final_norm" (last token only). For bisecting a mismatch layer by layer."""
        ids = self._tokens(token_ids)
        with self._exclusive("trace"):
            if reset:
                self._core.reset()
            return self._core.trace(ids)

    def generate_tokens(self, token_ids, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
                        stop_token_ids=None, reset: bool = True) -> list[int]:
        """Token ids in, token ids out, the whole loop in C (benchmarks; generate() is the full API).
        Generate up to max_tokens new token ids after the prompt; greedy when temperature is 0.

        Stops after a token in stop_token_ids (default: the config's eos_token_id), at max_tokens, or
        when the context is full. Afterwards the state holds the prompt and every generated token but
        the last (it was sampled, not yet run): continue with forward([last], reset=False)."""
        ids = self._tokens(token_ids)
        params = SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                                stop_token_ids=[] if stop_token_ids is None else list(stop_token_ids)).validate()
        stops = self._eos if stop_token_ids is None else [int(t) for t in params.stop_token_ids]
        with self._exclusive("generate_tokens"):
            if reset:
                self._core.reset()
            if max_tokens == 0:
                return []
            # more tokens than the context holds cannot be generated: bound the C side's output buffer
            n = min(int(max_tokens), self.context_length)
            return list(self._timed(self._core.generate, ids, n, float(temperature), int(seed or 0), stops))

    # ------------------------------------------------------------------ low level: steps and snapshots

    def snapshot(self):
        """A copy of the sequence state (position, KV cache rows, DeltaNet state, and the tokens it holds):
        a _core.Snapshot with .position, .nbytes and .tokens. restore(snap) returns this model to exactly
        that state."""
        with self._exclusive("snapshot"):
            return self._core.snapshot()

    def restore(self, snap) -> None:
        """Return to the state of a snapshot taken from this model (or one loaded with the same config
        and context length; otherwise ArgumentError). Later logits are bit-identical to the original run."""
        with self._exclusive("restore"):
            try:
                self._core.restore(snap)
            except (ValueError, TypeError) as exc:
                raise ArgumentError(str(exc)) from None

    def _new_sampler(self, params: SamplingParams | None = None):
        """A _core.Sampler for this model's vocabulary (params None: SamplingParams())."""
        from . import _core

        params = SamplingParams() if params is None else params
        return _core.Sampler(params.core_params(), int(self.config["vocab_size"]))

    def _step(self, tokens, sampler) -> int:
        """Run tokens from the current position and return the next token sampled with sampler (which
        accepts it). The GIL is released while the C core runs."""
        ids = self._tokens(tokens)
        with self._exclusive("step"):
            return int(self._core.decode_step(ids, sampler))

    # ------------------------------------------------------------------ text: generate, stream, chat

    @property
    def tokenizer(self):
        """The model's Tokenizer (tokenizer.json in the model directory), or None if it has none."""
        if self._tokenizer is None and os.path.exists(os.path.join(self.path, "tokenizer.json")):
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_dir(self.path)
        return self._tokenizer

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise FormatError(f"{what} needs the model's tokenizer, and {self.path} has no tokenizer.json "
                              f"(copy the tokenizer files of the original model there, or pass token ids)")
        return self.tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        """Tokens that end generation: the tokenizer's and generation_config's eos, and the config's."""
        ids = list(self.tokenizer.eos_token_ids) if self.tokenizer is not None else []
        return ids + [t for t in self._eos if t not in ids]

    def default_sampling(self) -> SamplingParams:
        """The model's recommended sampling (generation_config.json: temperature, top_k, top_p, min_p,
        repetition_penalty), else SamplingParams() defaults."""
        from .tokenizer import read_json

        cfg = read_json(os.path.join(self.path, "generation_config.json"))  # {} when absent
        params = SamplingParams()
        if cfg.get("do_sample") is False:
            params.temperature = 0.0
        for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
            if cfg.get(k) is not None:
                setattr(params, k, type(getattr(params, k))(cfg[k]))
        return params

    def _sampling(self, sampling: SamplingParams | None, overrides: dict) -> SamplingParams:
        import dataclasses

        base = dataclasses.replace(sampling) if sampling is not None else self.default_sampling()
        unknown = set(overrides) - {f.name for f in dataclasses.fields(SamplingParams)}
        if unknown:
            raise ArgumentError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(base, **overrides).validate()

    def _encode_prompt(self, text: str, what: str) -> list[int]:
        """The token ids of a prompt text; ContextLengthError, without tokenizing, for a text too long to
        fit the context whatever its tokens (tokenizing megabytes takes seconds and gigabytes)."""
        tok = self._require_tokenizer(what)
        ctx = self.context_length
        least = tok.min_tokens(text)
        if least > ctx:
            raise ContextLengthError(f"the prompt has at least {least} tokens ({len(text)} characters) but "
                                     f"the context holds {ctx} (load the model with a larger context_length)")
        encoding = tok._encoding(text)
        if len(encoding) > ctx:  # said before the ids become a list of Python ints
            n, encoding = len(encoding), None  # (not kept alive by the exception's traceback)
            raise ContextLengthError(f"the prompt has {n} tokens but the context holds {ctx} "
                                     f"(load the model with a larger context_length)")
        return encoding.ids

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self._encode_prompt(prompt, "a text prompt")
        return [int(t) for t in self._tokens(prompt)]

    def stream(self, prompt, sampling: SamplingParams | None = None, *, skip_special_tokens: bool = True,
               progress=None, **overrides):
        """Generate after prompt (text, or token ids), yielding GenerationChunk deltas as tokens arrive;
        the last one carries finish_reason, usage and stats. Leaving the loop stops decoding at once.

        sampling: SamplingParams (default: default_sampling()); keyword overrides of its fields, e.g.
        temperature=0, max_tokens=64, stop=["\\n\\n"], seed=1. The prompt continues from a cached
        state when it extends one (see prompt_cache)."""
        from .generation import run_generation

        params = self._sampling(sampling, overrides)
        ids = self._prompt_ids(prompt)
        return run_generation(self, ids, params, tokenizer=self.tokenizer, skip_special_tokens=skip_special_tokens,
                              progress=progress)

    def generate(self, prompt, sampling: SamplingParams | None = None, **kwargs):
        """Generate after prompt (text, or token ids) and return a GenerationResult: text, token_ids,
        finish_reason ("stop" or "length"), usage and stats. Options as stream()."""
        from .generation import GenerationResult

        text, ids = [], []
        for c in self.stream(prompt, sampling, **kwargs):
            text.append(c.text)
            ids.extend(c.token_ids)
        return GenerationResult("".join(text), ids, c.finish_reason, c.usage, c.stats, c.stop)

    def apply_chat_template(self, messages, tools=None, add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None, **extra) -> str:
        """The prompt text for messages under the model's own chat template (the string transformers'
        apply_chat_template renders). Assistant tool_calls may carry arguments as a JSON string."""
        tok = self._require_tokenizer("apply_chat_template")
        return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                       enable_thinking=enable_thinking, **extra)

    def _chat_prompt(self, messages, tools, enable_thinking, template_kwargs, response_prefix=None):
        from .tool_calls import prompt_opens_think

        tok = self._require_tokenizer("chat")
        text = self.apply_chat_template(messages, tools, True, enable_thinking, **(template_kwargs or {}))
        opened = prompt_opens_think(text)
        text += response_prefix or ""
        ids = self._encode_prompt(text, "chat")
        # Snapshot at the start of the last turn (its <|im_start|>): the next turn's prompt repeats
        # everything before it, even when the template re-renders this turn's answer differently.
        start = tok.token_to_id("<|im_start|>")
        marks = [len(ids) - 1 - ids[::-1].index(start)] if start is not None and start in ids else []
        return ids, marks, opened

    def stream_chat(self, messages, tools=None, enable_thinking: bool | None = None,
                    sampling: SamplingParams | None = None, *, template_kwargs: dict | None = None,
                    response_prefix: str | None = None, progress=None, **overrides):
        """chat() as a stream of OpenAI-style delta dicts: {"reasoning_content": str}, {"content": str},
        {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]}, and last
        {"finish_reason": "stop" | "length" | "tool_calls", "usage": {...}, "stats": {...}, "stop": the stop
        string or stop token id that ended it, or None}."""
        from .generation import run_generation
        from .tool_calls import ChatStreamParser

        params = self._sampling(sampling, overrides)
        ids, marks, opened = self._chat_prompt(messages, tools, enable_thinking, template_kwargs, response_prefix)
        parser = ChatStreamParser(tools, prompt_opened_think=opened)
        called = False
        pending = parser.feed(response_prefix) if response_prefix else []
        for c in run_generation(self, ids, params, tokenizer=self.tokenizer, skip_special_tokens=True,
                                snapshot_at=marks, progress=progress):
            deltas, pending = pending + (parser.feed(c.text) if c.text else []), []
            if c.finish_reason is not None:
                deltas += parser.finish()
            for d in deltas:
                called = called or "tool_calls" in d
                yield d
            if c.finish_reason is not None:
                finish = "tool_calls" if called and c.finish_reason == "stop" else c.finish_reason
                yield {"finish_reason": finish, "usage": c.usage, "stats": c.stats, "stop": c.stop}

    def chat(self, messages, tools=None, enable_thinking: bool | None = None,
             sampling: SamplingParams | None = None, *, template_kwargs: dict | None = None,
             response_prefix: str | None = None, progress=None, **overrides) -> "AssistantMessage":
        """Answer a conversation: messages and tools in the OpenAI shape, rendered with the model's chat
        template. Returns the assistant message as an OpenAI-shaped dict {"role", "content",
        "reasoning_content" (the <think> part, or None), "tool_calls" (list, each with arguments a JSON
        string)}, which can be appended to messages as is; .finish_reason ("stop", "length",
        "tool_calls"), .usage and .stats ride along as attributes. Sampling as generate().
        response_prefix: text the answer is made to start with (appended to the prompt, and part of the
        parsed answer), e.g. "<tool_call>\n<function=get_weather>\n" to force a call."""
        from .generation import run_generation
        from .tool_calls import parse_chat_response

        params = self._sampling(sampling, overrides)
        ids, marks, opened = self._chat_prompt(messages, tools, enable_thinking, template_kwargs, response_prefix)
        text = [response_prefix or ""]
        for c in run_generation(self, ids, params, tokenizer=self.tokenizer, skip_special_tokens=True,
                                snapshot_at=marks, progress=progress):
            text.append(c.text)
        msg = AssistantMessage(parse_chat_response("".join(text), tools, prompt_opened_think=opened))
        finish = c.finish_reason
        if msg["tool_calls"] and finish == "stop":
            finish = "tool_calls"
        msg.finish_reason, msg.usage, msg.stats = finish, c.usage, c.stats
        return msg


class AssistantMessage(dict):
    """An OpenAI-shaped assistant message (a plain dict) with finish_reason, usage and stats attached."""

    finish_reason: str | None = None
    usage: dict | None = None
    stats: dict | None = None


KNOWN_BACKENDS = ("cpu", "cuda", "metal")


def backends() -> list[str]:
    """The compute backends this build of flashmoe has (load's `backend`): "cpu", and "cuda" or "metal"
    where they were built. load's default, "auto", picks among them (Model's docstring says how)."""
    from . import _core

    return _core.backends().split(",")


def load(path, **options) -> Model:
    """Load a packed flashmoe model directory (see docs/FORMAT.md). Options: see Model."""
    return Model(path, **options)
