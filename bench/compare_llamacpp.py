"""flashmoe side by side with llama.cpp on the same random Qwen3.5-MoE model: same function, speed in RAM
and under a memory cap.

    python bench/compare_llamacpp.py [--layers 8] [--prompts 128,512] [--tokens 32] [--extra-tokens 8]
                                     [--caps 0.25,0.5] [--time-limit 600] [--threads 2] [--warmup 256]
                                     [--skip-check] [--skip-speed] [--perf] [--quick] [--dir DIR]

llama.cpp is an OPTIONAL bench dependency (never a runtime or test dependency of flashmoe). Install
llama-cpp-python 0.3.36, which builds the llama.cpp it vendors from source (about 20 minutes on 2
cores), and the gguf package:

    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \\
                -DLLAMA_BUILD_TOOLS=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \\
        pip install llama-cpp-python==0.3.36 gguf

Models (written once under --dir and reused; bench/gguf_export.py makes the GGUFs from the packed
models' dequantized tensors, so both engines run the same weights up to requantization):
  - check model: flashmoe synth's `tiny` preset at 8 bits, as GGUF F32 (exact: the same weights) and
    Q8_0;
  - benchmark model: a random Qwen3.5-35B-A3B of the real per-layer shape truncated to --layers layers,
    4-bit, as GGUF Q4_0 (4.5 bits/weight: the bytes per weight of flashmoe's 4-bit, used for speed) and
    Q4_1 (exact transcoding of the 4-bit levels, scales and biases: used for the check).

1. Same function. Teacher-forced: both engines compute the logits of every position of one random
   token sequence; printed: top-1 agreement (argmax position by position), max |logit difference|, the
   relative RMS difference, and the greedy continuation of a prefix by each engine (tokens equal up to
   the first divergence). A control row compares llama.cpp with itself across the two GGUF types: what
   requantization alone does to a random model (random routers sit near ties, so small numeric
   differences flip experts and argmaxes; that is why the F32 GGUF is in the check).
2. Speed, in one run, the same thread count for both (--threads): each engine in a fresh process.
   (a) RAM: no cap, weights warmed (one --warmup-token pass first, then a fresh sequence is measured);
       llama.cpp with its defaults (repacked Q4_0 weights in anonymous memory) and with --no-repack
       (weights served from the mmap, as under a cap).
   (b) each cap in --caps (fractions of the packed model's size; default a quarter and a half): the
       child joins a cgroup v1 memory limit of exactly that many bytes before it starts (page cache
       and anonymous memory together), the page cache is dropped first (cold), flashmoe gets
       memory_budget = cap - its bare interpreter's footprint - 32 MiB, llama.cpp gets mmap and no
       repack (repacked weights would have to fit in anonymous memory). A run that is OOM-killed or
       passes --time-limit is reported as such with how far it got.
   Each prompt length in --prompts is run in every setting (one prefill chunk / llama.cpp batch of
   the whole prompt; --tokens decode steps after the first length, --extra-tokens after the others).
   Measured per run: prompt tokens/s, decode tokens/s (greedy single-token steps), and for the prompt
   and the decode separately: bytes read from storage (/proc/self/io read_bytes: O_DIRECT reads for
   flashmoe, page-cache misses and their readahead for llama.cpp), major and minor page faults and
   CPU seconds (getrusage), flashmoe's expert hit rate, I/O wait and read GB/s (Model.stats) and its
   expert cache slots (what the budget leaves after dense weights, KV, state and the prefill chunk's
   scratch), the cgroup's peak usage. Stall per decode token = (decode seconds per token under the
   cap) - (the same engine and code path in RAM): time lost to the memory limit. --perf adds
   `perf record -e cpu-clock` profiles of the RAM runs' prompt and decode (top symbols, share per
   library).
Ratios printed: flashmoe / llama.cpp decode and prompt tokens/s at each setting (goals: >= 1.2 in RAM,
>= 5 under a cap where both finish; where llama.cpp does not finish, the smallest cap where it does),
and flashmoe prompt tok/s / flashmoe decode tok/s (goal >= 20).

Results, with the analysis of where each engine's time goes: bench/RESULTS.md.

--quick: the `small` preset (120 MB), 16- and 64-token prompts, 8 tokens, caps of 0.75 and 1.5 times the model
(a quarter of 120 MB is below the bare interpreter): a smoke test of the script (under a minute once
its models are written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import BENCH_DIR, drop_page_cache, fmt_bytes, memory_cgroup_dir, model_path  # noqa: E402  (bench/decode.py)

SLACK = 32 << 20  # as bench/decode.py: what the limit allows besides budget + interpreter
NO_LLAMA = ("llama-cpp-python is not installed. It is an optional bench dependency; see the top of "
            "bench/compare_llamacpp.py for the install command (it builds llama.cpp from source).")


# ==================================================================================== child processes

def _emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _proc_kv(path: str) -> dict:
    out = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(":")
                parts = v.split()
                if parts and parts[0].isdigit():
                    out[k.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out


def usage() -> dict:
    """This process's counters: wall, CPU seconds, page faults, bytes read from storage."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    io = _proc_kv("/proc/self/io")
    return {"wall": time.perf_counter(), "cpu": r.ru_utime + r.ru_stime, "majflt": r.ru_majflt,
            "minflt": r.ru_minflt, "read_bytes": io.get("read_bytes", 0)}


def delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def _rss() -> dict:
    s = _proc_kv("/proc/self/status")
    return {"rss": s.get("VmRSS", 0), "peak_rss": s.get("VmHWM", 0)}


class Llama:
    """llama.cpp through llama-cpp-python's low-level API: token ids in, logits out."""

    def __init__(self, path: str, threads: int, n_ctx: int, n_batch: int, repack: bool):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = bool(repack)  # False = llama.cpp's --no-repack
        mp.load_mode = L.LLAMA_LOAD_MODE_MMAP
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not make a context")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.n_batch = n_batch
        self.batch = L.llama_batch_init(n_batch, 0, 1)
        self.pos = 0

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self.pos = 0

    def eval(self, ids, all_logits: bool = False) -> np.ndarray:
        """Feed ids after the current position; logits of the last token [V] (or of all tokens [T, V])."""
        b, rows = self.batch, []
        for c0 in range(0, len(ids), self.n_batch):
            chunk = ids[c0:c0 + self.n_batch]
            last = c0 + len(chunk) == len(ids)
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = int(t)
                b.pos[i] = self.pos + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = all_logits or (last and i == len(chunk) - 1)
            rc = self.L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            self.pos += len(chunk)
            want = range(len(chunk)) if all_logits else ([len(chunk) - 1] if last else [])
            for i in want:
                rows.append(np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i),
                                                  shape=(self.vocab,)).copy())
        return np.stack(rows) if all_logits else rows[-1]


def _greedy_llama(llm: Llama, prefix, n: int) -> list[int]:
    llm.clear()
    tok = int(np.argmax(llm.eval(prefix)))
    out = [tok]
    while len(out) < n:
        tok = int(np.argmax(llm.eval([tok])))
        out.append(tok)
    return out


def child_check(spec: dict) -> None:
    """Teacher-forced logits of spec['ids'] (saved to spec['out']) and a greedy continuation."""
    ids, prefix, n = spec["ids"], spec["ids"][:spec["prefix"]], spec["greedy"]
    if spec["engine"] == "flashmoe":
        import flashmoe

        model = flashmoe.load(spec["path"], threads=spec["threads"], context_length=spec["context"],
                              int8_activations=spec.get("int8", True))
        logits = model.forward(ids)
        greedy = model.generate_tokens(prefix, max_tokens=n, stop_token_ids=[])
    else:
        llm = Llama(spec["path"], spec["threads"], spec["context"], max(len(ids), 8), repack=True)
        logits = llm.eval(ids, all_logits=True)
        greedy = _greedy_llama(llm, prefix, n)
    np.save(spec["out"], logits.astype(np.float32))
    _emit(phase="done", greedy=[int(t) for t in greedy])


class _Perf:
    """perf record -e cpu-clock of this process while a phase runs (spec["perf"] is a path prefix)."""

    def __init__(self, spec: dict, phase: str):
        self.proc = None
        if spec.get("perf"):
            self.proc = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "-p",
                                          str(os.getpid()), "-o", f"{spec['perf']}.{phase}.perf"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # attached before the phase starts

    def stop(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait()


def child_speed(spec: dict) -> None:
    """Load, (warm up), prefill the prompt, decode greedily; a JSON line per phase on stdout."""
    prompt, n = spec["prompt"], spec["tokens"]
    u0 = usage()
    if spec["engine"] == "flashmoe":
        import flashmoe
        from flashmoe import _core  # noqa: F401
        from flashmoe.errors import MemoryBudgetError

        if spec.get("baseline"):
            _emit(phase="baseline", **_rss())
            return
        try:
            model = flashmoe.load(spec["path"], memory_budget=spec["budget"], threads=spec["threads"],
                                  context_length=spec["context"], prefill_chunk=spec["chunk"])
        except MemoryBudgetError as exc:
            _emit(phase="error", error="below minimum", message=str(exc))
            return
        _emit(phase="load", **delta(u0, usage()), memory=model.memory, **_rss())
        if spec.get("warmup"):
            model.generate_tokens(spec["warmup"], max_tokens=1, stop_token_ids=[])
            _emit(phase="warmup", tokens=len(spec["warmup"]), hit_rate=model.stats["hit_rate"])
        model.reset_stats()
        pf = _Perf(spec, "prompt")
        u1 = usage()
        first = model.generate_tokens(prompt, max_tokens=1, stop_token_ids=[])  # prefill (fresh sequence)
        u2 = usage()
        pf.stop()
        s_prompt = {k: v for k, v in model.stats.items() if k != "last"}
        _emit(phase="prompt", tokens=len(prompt), **delta(u1, u2), stats=s_prompt, **_rss())
        model.reset_stats()
        pf = _Perf(spec, "decode")
        u3 = usage()
        rest = model.generate_tokens(first, max_tokens=n, stop_token_ids=[], reset=False)  # n single-token steps
        u4 = usage()
        pf.stop()
        s_dec = {k: v for k, v in model.stats.items() if k != "last"}
        _emit(phase="decode", tokens=n, **delta(u3, u4), stats=s_dec, greedy=[int(t) for t in first + rest],
              **_rss())
        return

    if spec.get("baseline"):
        import llama_cpp  # noqa: F401

        _emit(phase="baseline", **_rss())
        return
    llm = Llama(spec["path"], spec["threads"], spec["context"], spec["chunk"], repack=spec["repack"])
    _emit(phase="load", **delta(u0, usage()), **_rss())
    if spec.get("warmup"):
        llm.eval(spec["warmup"])
        llm.clear()
        _emit(phase="warmup", tokens=len(spec["warmup"]))
    pf = _Perf(spec, "prompt")
    u1 = usage()
    tok = int(np.argmax(llm.eval(prompt)))
    u2 = usage()
    pf.stop()
    _emit(phase="prompt", tokens=len(prompt), **delta(u1, u2), **_rss())
    pf = _Perf(spec, "decode")
    out, u3 = [tok], usage()
    for i in range(n):
        tok = int(np.argmax(llm.eval([tok])))
        out.append(tok)
        if i % 4 == 3:
            _emit(phase="progress", tokens=i + 1, **delta(u3, usage()))
    u4 = usage()
    pf.stop()
    _emit(phase="decode", tokens=n, **delta(u3, u4), greedy=out, **_rss())


# ==================================================================================== the parent

def run_child(spec: dict, cap: int | None = None, time_limit: float | None = None, cold: bool = False,
              log: str | None = None) -> dict:
    """One child process (inside a fresh cgroup v1 memory limit of `cap` bytes when given): its phases."""
    dropped = drop_page_cache() if cold else None
    cg = None
    if cap:
        parent = memory_cgroup_dir()
        if not parent:
            return {"error": "no writable cgroup v1 memory controller (not root?)"}
        cg = os.path.join(parent, f"flashmoe-vs-llama-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(cg)
        with open(os.path.join(cg, "memory.limit_in_bytes"), "w") as f:
            f.write(str(cap))

    def join():  # in the child between fork and exec: everything it allocates is charged to cg
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    t0 = time.perf_counter()
    timed_out, out, err, proc = False, "", "", None
    res = {"cold": dropped, "cap": cap}
    try:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=join if cg else None)
        try:
            out, err = proc.communicate(timeout=time_limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            timed_out = True
        res["wall"] = time.perf_counter() - t0
        if cg:
            res["cgroup_peak"] = int(open(os.path.join(cg, "memory.max_usage_in_bytes")).read())
            res["cgroup_failcnt"] = int(open(os.path.join(cg, "memory.failcnt")).read())
    finally:  # interrupted or not: no child left running, no cgroup left behind
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if cg:
            try:
                os.rmdir(cg)
            except OSError:
                pass
    wall = res["wall"]
    if log:
        with open(log, "w") as f:
            f.write(err)
    for line in out.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            res[d.pop("phase")] = d
    if timed_out:
        res["error"] = f"time limit: killed after {wall:.0f} s"
    elif proc.returncode == -9:
        res["error"] = f"killed (OOM at the cgroup limit) after {wall:.0f} s"
    elif proc.returncode != 0:
        res["error"] = f"exit {proc.returncode}: {(err.strip().splitlines() or [''])[-1]}"
    elif "error" in res and isinstance(res["error"], dict):
        res["error"] = f"{res['error']['error']}: {res['error']['message']}"
    return res


def ensure_models(args) -> dict:
    """The packed models and their GGUFs (written once under --dir)."""
    from gguf_export import export

    from flashmoe import presets
    from flashmoe.synth import write_random_model

    m = {}
    os.makedirs(args.dir, exist_ok=True)
    check_dir = os.path.join(args.dir, f"{args.check_preset}-8bit")
    if not os.path.exists(os.path.join(check_dir, "flashmoe.json")):
        write_random_model(check_dir, presets.get(args.check_preset), bits=8, progress=False)
    bench_dir, _ = model_path(argparse.Namespace(preset=args.preset, layers=args.layers, dir=args.dir))
    m["check"], m["bench"] = check_dir, bench_dir
    for key, src, types in (("check", check_dir, ("f32", "q8_0")), ("bench", bench_dir, ("q4_1", "q4_0"))):
        for t in types:
            path = f"{src.removesuffix('-8bit').removesuffix('-4bit')}-{t}.gguf"
            if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(
                    os.path.join(src, "flashmoe.json")):
                print(f"writing {path} ...", flush=True)
                r = export(src, path, t, progress=True)
                print(f"  {fmt_bytes(r['bytes'])}, {r['seconds']:.0f} s", flush=True)
            m[f"{key}_{t}"] = path
    return m


def packed_size(path: str) -> int:
    from flashmoe.reader import model_bytes, read_header

    return model_bytes(read_header(path))


# ------------------------------------------------------------------------------------ 1. same function

def compare_logits(a: np.ndarray, b: np.ndarray, ga: list, gb: list) -> dict:
    top_a, top_b = a.argmax(1), b.argmax(1)
    srt = np.sort(a, axis=1)
    margin = srt[:, -1] - srt[:, -2]  # the first engine's top-1 minus top-2 logit
    diff = np.abs(a - b)
    agree = top_a == top_b
    same = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), len(ga))
    return {"top1_agreement": float(agree.mean()), "positions": int(len(agree)),
            "max_abs_diff": float(diff.max()), "logit_scale": float(np.abs(a).max()),
            "rel_rms_diff": float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(a ** 2))),
            "median_margin": float(np.median(margin)),
            "median_margin_disagreeing": float(np.median(margin[~agree])) if (~agree).any() else None,
            "median_row_max_diff": float(np.median(diff.max(1))),
            "greedy_equal_prefix": same, "greedy_tokens": len(ga)}


def check(args, models: dict) -> list:
    print("\n== 1. same function: teacher-forced logits and greedy tokens, flashmoe vs llama.cpp ==")
    rows = []
    tmp = os.path.join(args.dir, "check-logits")
    os.makedirs(tmp, exist_ok=True)
    cases = [("check", models["check"], [("F32 (exact weights)", models["check_f32"]),
                                        ("Q8_0", models["check_q8_0"])], args.check_tokens),
             ("bench", models["bench"], [("Q4_1 (exact weights)", models["bench_q4_1"]),
                                        ("Q4_0 (speed file)", models["bench_q4_0"])], args.check_tokens)]
    for key, packed, ggufs, T in cases:
        from flashmoe.reader import read_header

        cfg = read_header(packed)["config"]
        ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], T).tolist()
        base = {"ids": ids, "prefix": T // 4, "greedy": args.greedy, "threads": args.threads,
                "context": 2 * T + args.greedy}
        name = os.path.basename(packed)
        results = {}
        # flashmoe with fp32 activations (the exact function) and with int8 ones (its default)
        for label, path in [("flashmoe", packed), ("flashmoe int8", packed)] + ggufs:
            out = os.path.join(tmp, f"{key}-{len(results)}.npy")
            engine = "flashmoe" if label.startswith("flashmoe") else "llama"
            r = run_child(dict(base, engine=engine, path=path, out=out, int8=label == "flashmoe int8"),
                          time_limit=1800)
            if "error" in r:
                print(f"  {name} {label}: {r['error']}")
                continue
            results[label] = (np.load(out), r["done"]["greedy"])
            os.remove(out)
        if "flashmoe" not in results:
            continue
        pairs = ([("flashmoe", g) for g, _ in ggufs] + [("flashmoe int8", g) for g, _ in ggufs]
                 + [(ggufs[0][0], ggufs[1][0])])
        print(f"\n{name}: {T} positions teacher-forced; greedy {args.greedy} tokens after a {T // 4}-token "
              f"prefix")
        print(f"  {'A':>30} vs {'B (llama.cpp)':<22} {'top-1 agree':>11} {'max|dlogit|':>11} "
              f"{'rel RMS':>8} {'greedy same':>11}  margins: median / where they disagree")
        for a_lab, b_lab in pairs:
            if a_lab not in results or b_lab not in results:
                continue
            c = compare_logits(results[a_lab][0], results[b_lab][0], results[a_lab][1], results[b_lab][1])
            a_name = a_lab if a_lab.startswith("flashmoe") else f"llama.cpp {a_lab}"
            mdis = "-" if c["median_margin_disagreeing"] is None else f"{c['median_margin_disagreeing']:.3f}"
            print(f"  {a_name:>30} vs {b_lab:<22} {c['top1_agreement']:>11.3f} {c['max_abs_diff']:>11.4f} "
                  f"{c['rel_rms_diff']:>8.4f} {c['greedy_equal_prefix']:>5}/{c['greedy_tokens']:<5}  "
                  f"{c['median_margin']:.3f} / {mdis}")
            rows.append({"model": name, "a": a_name, "b": f"llama.cpp {b_lab}", **c})
    return rows


# ------------------------------------------------------------------------------------ 2. speed

def speed(args, models: dict) -> dict:
    from flashmoe.reader import read_header

    packed, gguf_path = models["bench"], models["bench_q4_0"]
    cfg = read_header(packed)["config"]
    size = packed_size(packed)
    rng = np.random.default_rng(0)
    warmup = rng.integers(0, cfg["vocab_size"], args.warmup).tolist()
    prompts = {p: rng.integers(0, cfg["vocab_size"], p).tolist() for p in args.prompts}
    tokens = {p: args.tokens if i == 0 else args.extra_tokens for i, p in enumerate(args.prompts)}
    context = max([args.warmup] + [p + max(tokens[p], args.tokens) + 1 for p in args.prompts]) + 16
    common = {"threads": args.threads, "context": context, "perf": args.perf}
    ours = dict(common, engine="flashmoe", path=packed)
    theirs = dict(common, engine="llama", path=gguf_path)
    logs = os.path.join(args.dir, "logs")
    os.makedirs(logs, exist_ok=True)
    interp = {}
    for e, s in (("flashmoe", ours), ("llama", theirs)):
        r = run_child(dict(s, baseline=1, prompt=[], tokens=0, chunk=1))
        if "baseline" not in r:
            sys.exit(f"{e}: the bare interpreter does not start: {r.get('error')}")
        interp[e] = r["baseline"]["rss"]
    print(f"\n== 2. speed: {os.path.basename(packed)} ({fmt_bytes(size)} packed; GGUF Q4_0 "
          f"{fmt_bytes(os.path.getsize(gguf_path))}), {args.threads} threads each; prompts of "
          f"{', '.join(map(str, args.prompts))} tokens (one prefill chunk each) then "
          f"{tokens[args.prompts[0]]} greedy decode steps (under a cap: {args.extra_tokens} after the later "
          f"prompts); in RAM each engine runs {args.ram_repeats} times in turn; bare interpreter RSS: flashmoe "
          f"{fmt_bytes(interp['flashmoe'])}, llama.cpp {fmt_bytes(interp['llama'])} ==", flush=True)
    runs = []

    def go(setting, engine, spec, cap=None, keep=True, **kw):
        t = time.perf_counter()
        label = f"{setting} {engine} P{len(spec['prompt'])}"
        print(f"  running {label} ...", end="", flush=True)
        base = os.path.join(logs, label.replace(" ", "_"))
        if spec.get("perf"):
            spec = dict(spec, perf=base)
        r = run_child(spec, cap=cap, log=base + ".log", **kw)
        r.update(setting=setting, engine=engine, prompt_len=len(spec["prompt"]))
        print(f" {time.perf_counter() - t:.0f} s{'  ' + r['error'] if 'error' in r else ''}", flush=True)
        if spec.get("perf"):
            r["profile"] = {ph: perf_top(f"{base}.{ph}.perf") for ph in ("prompt", "decode")}
        if keep:
            runs.append(r)
        return r

    # In RAM the engines are run in turn --ram-repeats times (this host's speed drifts by 10-20% between
    # minutes): each phase is reported at its median run, with the spread.
    for p in args.prompts:
        per = {"prompt": prompts[p], "tokens": args.tokens, "chunk": p}
        trio = [("flashmoe", dict(ours, **per, budget=size + (1 << 30), warmup=warmup)),
                ("llama.cpp", dict(theirs, **per, repack=True, warmup=warmup)),
                ("llama.cpp no-repack", dict(theirs, **per, repack=False, warmup=warmup))]
        reps = {e: [] for e, _ in trio}
        for _ in range(args.ram_repeats):
            for e, spec in trio:
                reps[e].append(go("RAM", e, spec, keep=False))
        runs.extend(median_run(reps[e]) for e, _ in trio)
    for frac in args.caps:
        cap = int(size * frac)
        setting = f"cap {frac:g}"
        budget = cap - interp["flashmoe"] - SLACK
        for p in args.prompts:
            per = {"prompt": prompts[p], "tokens": tokens[p], "chunk": p, "perf": False}
            if budget <= 0:
                runs.append({"setting": setting, "engine": "flashmoe", "cap": cap, "prompt_len": p,
                             "error": "cap below the bare interpreter's footprint"})
            else:
                go(setting, "flashmoe", dict(ours, **per, budget=budget), cap=cap, cold=True,
                   time_limit=args.time_limit)
            go(setting, "llama.cpp", dict(theirs, **per, repack=False), cap=cap, cold=True,
               time_limit=args.time_limit)
    return {"runs": runs, "model_bytes": size, "gguf_bytes": os.path.getsize(gguf_path), "interp": interp}


def median_run(reps: list) -> dict:
    """Runs of one setting merged: each phase from the run with the median wall time of that phase, and
    every run's tok/s under "repeats"."""
    ok = [r for r in reps if "error" not in r and r.get("prompt") and r.get("decode")]
    if not ok:
        return reps[-1]
    out = dict(ok[0])
    for ph in ("prompt", "decode"):
        out[ph] = sorted((r[ph] for r in ok), key=lambda x: x["wall"])[len(ok) // 2]
    out["repeats"] = {ph: [r[ph]["tokens"] / r[ph]["wall"] for r in ok] for ph in ("prompt", "decode")}
    return out


def perf_top(path: str, n: int = 8) -> dict:
    """A `perf record -e cpu-clock` file: its top symbols [(share, dso, symbol)] and the share per dso."""
    if not os.path.exists(path):
        return {}
    out = subprocess.run(["perf", "report", "--stdio", "--no-children", "--sort", "dso,sym", "-i", path],
                         capture_output=True, text=True).stdout
    rows, dsos = [], {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0].endswith("%") and not line.startswith("#"):
            pct, dso = float(parts[0][:-1]), os.path.basename(parts[1])
            rows.append((pct, dso, " ".join(parts[3:])))
            dsos[dso] = dsos.get(dso, 0.0) + pct
    return {"top": rows[:n], "dso": sorted(((v, k) for k, v in dsos.items()), reverse=True)[:5]}


def summarize(r: dict) -> dict:
    """Per-run numbers: tok/s, per-token I/O and faults."""
    s = {"setting": r["setting"], "engine": r["engine"], "prompt_len": r.get("prompt_len"),
         "cap": r.get("cap"), "error": r.get("error"), "cgroup_peak": r.get("cgroup_peak")}
    for ph in ("prompt", "decode"):
        p = r.get(ph)
        if not p:
            continue
        n = p["tokens"]
        s[ph] = {"tok_s": n / p["wall"], "seconds": p["wall"], "tokens": n,
                 "read_bytes_per_token": p["read_bytes"] / n, "read_gbps": p["read_bytes"] / p["wall"] / 1e9,
                 "majflt_per_token": p["majflt"] / n, "minflt_per_token": p["minflt"] / n,
                 "cpu_share": p["cpu"] / p["wall"], "peak_rss": p.get("peak_rss")}
        st = p.get("stats")
        if st:
            s[ph].update(hit_rate=st["hit_rate"], io_wait_share=st["io_wait_seconds"] / p["wall"],
                         engine_read_gbps=st["read_gbps"], engine_bytes_read_per_token=st["bytes_read"] / n)
    if "greedy" in r.get("decode", {}):
        s["greedy"] = r["decode"]["greedy"]
    if "repeats" in r:
        s["repeats"] = r["repeats"]
    if "error" in r and "progress" in r:  # how far a killed llama.cpp run got
        p = r["progress"]
        s["partial_decode"] = {"tokens": p["tokens"], "seconds": p["wall"], "tok_s": p["tokens"] / p["wall"]}
    if "load" in r:
        s["load_seconds"] = r["load"]["wall"]
        if "memory" in r["load"]:  # flashmoe: the budget's split (the expert cache gets what is left)
            s["memory"] = r["load"]["memory"]
    if r.get("profile"):
        s["profile"] = r["profile"]
    return s


def report(sp: dict, args) -> dict:
    rows = [summarize(r) for r in sp["runs"]]
    print(f"\n{'setting':<9} {'engine':<20} {'P':>4} {'prompt t/s':>10} {'decode t/s':>10} "
          f"{'pr MB rd/tok':>12} {'dec MB rd/tok':>13} {'dec majflt/t':>12} {'dec CPU/wall':>12} "
          f"{'dec hit':>7} {'dec I/O wait':>12} "
          f"{'peak mem':>9} {'slots':>5}")
    for s in rows:
        lead = f"{s['setting']:<9} {s['engine']:<20} {s['prompt_len']:>4}"
        if "decode" not in s:
            extra = ""
            if "partial_decode" in s:
                pd = s["partial_decode"]
                extra = f" (decoded {pd['tokens']} tokens in {pd['seconds']:.0f} s: {pd['tok_s']:.3f} tok/s)"
            if "prompt" in s:
                extra += f" (prompt {s['prompt']['tok_s']:.2f} tok/s)"
            print(f"{lead} {s.get('error')}{extra}")
            continue
        d, p = s["decode"], s.get("prompt", {})
        hit = f"{d['hit_rate']:.3f}" if "hit_rate" in d else "-"
        iow = f"{d['io_wait_share']:.0%}" if "io_wait_share" in d else "-"
        peak = s["cgroup_peak"] or d.get("peak_rss") or 0
        print(f"{lead} {p.get('tok_s', 0):>10.2f} {d['tok_s']:>10.2f} "
              f"{p.get('read_bytes_per_token', 0) / 1e6:>12.1f} {d['read_bytes_per_token'] / 1e6:>13.1f} "
              f"{d['majflt_per_token']:>12.1f} {d['cpu_share']:>12.2f} "
              f"{hit:>7} {iow:>12} {fmt_bytes(peak):>9} {s.get('memory', {}).get('expert_slots', '-'):>5}")
    for s in rows:
        if len(s.get("repeats", {}).get("decode", [])) > 1:
            print(f"  {s['setting']} {s['engine']} P{s['prompt_len']}: each run's prompt / decode tok/s: " +
                  ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(s["repeats"]["prompt"], s["repeats"]["decode"])))
    for s in rows:
        for ph, prof in (s.get("profile") or {}).items():
            if prof:
                print(f"  perf {s['setting']} {s['engine']} P{s['prompt_len']} {ph}: by dso " +
                      ", ".join(f"{dso} {pct:.0f}%" for pct, dso in prof["dso"]) + "; top symbols " +
                      ", ".join(f"{sym} {pct:.0f}%" for pct, dso, sym in prof["top"][:5]))

    by = {(s["setting"], s["engine"], s["prompt_len"]): s for s in rows}
    settings = ["RAM"] + [f"cap {f:g}" for f in args.caps]
    ratios = []
    print("\nratios (flashmoe / llama.cpp), and flashmoe prompt / flashmoe decode (decode of the same run):")
    for p in args.prompts:
        # stall under a cap: against the same engine's same code path in RAM (llama.cpp runs capped without
        # repacking, so against its no-repack RAM run)
        ram_dec = {e: by.get(("RAM", r, p), {}).get("decode", {}).get("tok_s")
                   for e, r in (("flashmoe", "flashmoe"), ("llama.cpp", "llama.cpp no-repack"))}
        for st in settings:
            o, t = by.get((st, "flashmoe", p), {}), by.get((st, "llama.cpp", p), {})
            row = {"setting": st, "prompt_len": p}
            if "decode" in o and "prompt" in o:
                row["ours_prompt_over_decode"] = o["prompt"]["tok_s"] / o["decode"]["tok_s"]
            if "decode" in o and "decode" in t:
                row["decode_ratio"] = o["decode"]["tok_s"] / t["decode"]["tok_s"]
            if "prompt" in o and "prompt" in t:
                row["prompt_ratio"] = o["prompt"]["tok_s"] / t["prompt"]["tok_s"]
            if "decode" in o and "decode" not in t and "partial_decode" in t:
                row["decode_ratio_at_least"] = o["decode"]["tok_s"] / t["partial_decode"]["tok_s"]
            if st == "RAM":
                nr = by.get((st, "llama.cpp no-repack", p), {})
                if "decode" in o and "decode" in nr:
                    row["decode_ratio_no_repack"] = o["decode"]["tok_s"] / nr["decode"]["tok_s"]
                    row["prompt_ratio_no_repack"] = o["prompt"]["tok_s"] / nr["prompt"]["tok_s"]
            else:
                for e, s in (("flashmoe", o), ("llama.cpp", t)):
                    if "decode" in s and ram_dec[e]:
                        row[f"{e}_stall_per_token_s"] = 1 / s["decode"]["tok_s"] - 1 / ram_dec[e]
            ratios.append(row)
            goal = "1.2" if st == "RAM" else "5"
            parts = []
            if "decode_ratio" in row:
                parts.append(f"decode {row['decode_ratio']:.2f}x (goal >= {goal})")
            elif "decode_ratio_at_least" in row:
                parts.append(f"decode >= {row['decode_ratio_at_least']:.2f}x (llama.cpp did not finish; "
                             f"its rate so far)")
            else:
                parts.append("no decode ratio (a run did not finish)")
            if "prompt_ratio" in row:
                parts.append(f"prompt {row['prompt_ratio']:.2f}x")
            if "decode_ratio_no_repack" in row:
                parts.append(f"vs llama.cpp no-repack: decode {row['decode_ratio_no_repack']:.2f}x, prompt "
                             f"{row['prompt_ratio_no_repack']:.2f}x")
            if "ours_prompt_over_decode" in row:
                parts.append(f"flashmoe prompt/decode {row['ours_prompt_over_decode']:.1f}x (goal >= 20)")
            for e in ("flashmoe", "llama.cpp"):
                if f"{e}_stall_per_token_s" in row:
                    parts.append(f"{e} stall {row[f'{e}_stall_per_token_s'] * 1e3:.0f} ms/token over RAM")
            print(f"  P{p:<4} {st:<9} " + "; ".join(parts))
    p0 = args.prompts[0]
    finished = [st for st in settings[1:] if "decode" in by.get((st, "llama.cpp", p0), {})]
    if finished:
        print(f"  smallest cap where llama.cpp finished (P{p0}): {finished[0]}")
    o_g = by.get(("RAM", "flashmoe", p0), {}).get("greedy")
    t_g = by.get(("RAM", "llama.cpp", p0), {}).get("greedy")
    if o_g and t_g:
        same = next((i for i, (x, y) in enumerate(zip(o_g, t_g)) if x != y), len(o_g))
        print(f"  greedy tokens of the speed runs (flashmoe 4-bit vs llama.cpp Q4_0, requantized): equal for "
              f"the first {same} of {len(o_g)}")
    return {"rows": rows, "ratios": ratios, "smallest_finished_cap": finished[0] if finished else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen3.5-35b-a3b")
    ap.add_argument("--layers", type=int, default=8, help="layers of the preset in the benchmark model")
    ap.add_argument("--check-preset", default="tiny", help="the small model of the correctness check")
    ap.add_argument("--check-tokens", type=int, default=64, help="teacher-forced positions of the check")
    ap.add_argument("--greedy", type=int, default=16, help="greedy tokens compared in the check")
    ap.add_argument("--prompts", default="128,512",
                    help="prompt lengths, each one prefill chunk (default 128,512); the first is the main "
                         "run")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps after the first prompt length")
    ap.add_argument("--extra-tokens", type=int, default=8, help="decode steps after the other prompt lengths")
    ap.add_argument("--perf", action="store_true",
                    help="profile the prompt and decode of the RAM runs with perf record -e cpu-clock")
    ap.add_argument("--warmup", type=int, default=256, help="tokens of the warm-up pass of the RAM runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ram-repeats", type=int, default=3,
                    help="runs of each engine in RAM, taken in turn; each phase is reported at its median")
    ap.add_argument("--caps", default="0.25,0.5", help="memory caps as fractions of the packed model size")
    ap.add_argument("--time-limit", type=float, default=600, help="seconds before a capped run is killed")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the small preset, few tokens: a smoke test")
    ap.add_argument("--dir", default=BENCH_DIR)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run_child's cleanup runs on kill too
    if args.child:
        spec = json.loads(args.child)
        (child_check if "out" in spec else child_speed)(spec)
        return
    try:
        import llama_cpp  # noqa: F401
        import gguf  # noqa: F401
    except ImportError:
        sys.exit(NO_LLAMA)
    if args.quick:
        args.preset, args.layers, args.prompts, args.tokens, args.warmup = "small", 8, "16,64", 8, 64
        args.check_tokens, args.greedy, args.caps = 32, 8, "0.75,1.5"
    args.caps = [float(c) for c in args.caps.split(",") if c]
    args.prompts = [int(p) for p in args.prompts.split(",") if p]
    t0 = time.perf_counter()
    models = ensure_models(args)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, "
                         f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
              "date": time.strftime("%Y-%m-%d"), "llama_cpp_python": llama_cpp.__version__,
              "preset": args.preset, "layers": args.layers, "threads": args.threads}
    if not args.skip_check:
        result["check"] = check(args, models)
    if not args.skip_speed:
        sp = speed(args, models)
        result.update(model_bytes=sp["model_bytes"], gguf_bytes=sp["gguf_bytes"], interp=sp["interp"],
                      prompts=args.prompts, tokens=args.tokens, extra_tokens=args.extra_tokens,
                      caps=args.caps,
                      **report(sp, args))
    result["seconds"] = time.perf_counter() - t0
    print(f"\ntotal {result['seconds']:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
