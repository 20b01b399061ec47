"""README promises of `flashmoe serve` that tests/test_server.py does not check, each so that it fails when
the promise is broken:

- "One model serves requests one at a time, in arrival order, on a worker thread (the event loop never
  waits on it)": /health answers at once while a long prompt computes; requests queued behind a running
  one start in the order they arrived, never two at once.
- "It binds to 127.0.0.1 unless --host says otherwise; --api-key KEY (or $FLASHMOE_API_KEY) makes every
  request but /health send Authorization: Bearer KEY or x-api-key: KEY."
- "--max-tokens-limit (default: the context length) and --max-body-bytes (default 16 MiB) bound requests".
- `max_tokens`/`max_completion_tokens` on /v1/chat/completions.

The CLI ones run `flashmoe serve` itself in a subprocess; the others a server in this process.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from test_generate import TINY
from text_fixtures import write_tokenizer

import flashmoe
from flashmoe.generation import GenerationChunk
from flashmoe.synth import DEMO_CONFIG, write_random_model

try:  # the clients' HTTP library: httpx2 in newer releases
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from flashmoe.server import create_app  # noqa: E402

NAME = "tiny-moe"
CTX = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("promises") / NAME
    write_random_model(path, TINY, bits=4, progress=False)
    write_tokenizer(path, template="qwen3.5", vocab_size=TINY["vocab_size"])
    return path


class InProcess:
    """uvicorn serving create_app(model, **options) on a free loopback port, in a thread of this process."""

    def __init__(self, model, **options):
        self.app = create_app(model, model_name=NAME, **options)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self):
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            time.sleep(0.01)
        raise AssertionError("the server did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
        assert not self.thread.is_alive()


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


# ---------------------------------------------------------------------- /health while a prompt computes

# Big enough that one 2000-token prompt is one C call of ~1 s on one thread.
WIDE = {**DEMO_CONFIG, "vocab_size": 1024, "hidden_size": 512, "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"], "num_experts": 16, "num_experts_per_tok": 4,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512}


def test_health_answers_at_once_while_a_long_prompt_computes(tmp_path):
    """A 2000-token prompt runs as one call into C of about a second (one thread). /health, asked every
    20 ms meanwhile, must say the engine is busy and answer within 0.4 s each time: an event loop that
    ran the model, or a C call holding the GIL, would keep it waiting for the whole call (or never see the
    engine busy)."""
    from flashmoe import _core

    path = tmp_path / "wide"
    write_random_model(path, WIDE, bits=4, progress=False)
    threads = _core.get_threads()
    try:
        model = flashmoe.load(path, context_length=2048, prefill_chunk=512, threads=1)
        prompt = np.random.default_rng(0).integers(0, WIDE["vocab_size"], 2000).tolist()
        t0 = time.perf_counter()
        model.forward(prompt)
        alone = time.perf_counter() - t0
        assert alone > 0.4, alone  # the premise: the prompt is a long computation
        model.reset()
        with InProcess(model) as srv:
            answer = {}
            req = threading.Thread(target=lambda: answer.update(r=post(srv.url, "/v1/completions", {
                "model": NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0})))
            polls = []
            req.start()
            while req.is_alive():
                t = time.perf_counter()
                h = httpx.get(srv.url + "/health", timeout=30)
                polls.append((time.perf_counter() - t, h.status_code, h.json()["busy"]))
                time.sleep(0.02)
            req.join()
        assert answer["r"].status_code == 200, answer["r"].text
        busy = [p for p in polls if p[2]]
        assert len(busy) >= 5, polls  # it was asked while computing, and answered
        assert all(code == 200 for _, code, _ in polls)
        assert max(lat for lat, _, _ in polls) < 0.4, (alone, sorted(polls)[-5:])
    finally:
        _core.set_threads(threads)


# ------------------------------------------------------------------ one at a time, in arrival order


def test_requests_run_one_at_a_time_in_arrival_order(model_dir, monkeypatch):
    """A slow first request holds the engine; four more arrive 0.15 s apart while it runs. The scripted
    generation records when each starts and ends: in arrival order, and never two at once."""
    import flashmoe.generation as g

    log, lock = [], threading.Lock()

    def run(model, prompt, params, **kw):  # the generation loop, replaced: who runs, and when
        text = model.tokenizer.decode(prompt)
        who = next(w for w in "ABCDE" if f"request {w}." in text)
        with lock:
            log.append(("start", who, time.perf_counter()))
        time.sleep(0.8 if who == "A" else 0.05)
        with lock:
            log.append(("end", who, time.perf_counter()))
        yield GenerationChunk("ok", [1], "stop", {"prompt_tokens": len(prompt), "completion_tokens": 1,
                                                  "total_tokens": len(prompt) + 1, "cached_tokens": 0}, {})

    monkeypatch.setattr(g, "run_generation", run)
    model = flashmoe.load(model_dir, context_length=256, int8_activations=False)
    with InProcess(model) as srv:
        results = {}

        def ask(who):
            results[who] = post(srv.url, "/v1/chat/completions", {
                "model": NAME, "max_tokens": 4, "messages": [{"role": "user", "content": f"request {who}."}]})
        threads = []
        for who in "ABCDE":
            threads.append(threading.Thread(target=ask, args=(who,)))
            threads[-1].start()
            time.sleep(0.15)
        for t in threads:
            t.join(60)
    assert all(results[w].status_code == 200 for w in "ABCDE"), {w: r.text for w, r in results.items()}
    starts = [who for kind, who, _ in log if kind == "start"]
    assert starts == list("ABCDE"), log
    events = sorted(log, key=lambda e: e[2])
    assert [kind for kind, _, _ in events] == ["start", "end"] * 5, events  # never two at once


# ------------------------------------------------------------------ max_tokens / max_completion_tokens


def test_max_completion_tokens(model_dir):
    model = flashmoe.load(model_dir, context_length=256, int8_activations=False)
    with InProcess(model, max_tokens_limit=40) as srv:
        base = {"model": NAME, "messages": [{"role": "user", "content": "Count to ten."}], "temperature": 0,
                "chat_template_kwargs": {"enable_thinking": False}}

        def completion_tokens(**limits):
            r = post(srv.url, "/v1/chat/completions", {**base, **limits})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["finish_reason"] == "length", body
            return body["usage"]["completion_tokens"]

        assert completion_tokens(max_completion_tokens=3) == 3
        assert completion_tokens(max_tokens=5) == 5
        assert completion_tokens(max_completion_tokens=4, max_tokens=9) == 4  # the newer name wins
        r = post(srv.url, "/v1/chat/completions", {**base, "max_completion_tokens": 41})
        assert r.status_code == 400 and "max_completion_tokens" in r.text and "40" in r.text, r.text


# ------------------------------------------------------------------------------- `flashmoe serve`


class Served:
    """`flashmoe serve MODEL --port 0 ARGS` in a subprocess; url from its first line."""

    def __init__(self, model_dir, args, env=None):
        full_env = dict(os.environ, **(env or {}))
        pkg_root = os.path.dirname(os.path.dirname(flashmoe.__file__))
        full_env["PYTHONPATH"] = os.pathsep.join([pkg_root] + ([os.environ["PYTHONPATH"]]
                                                               if os.environ.get("PYTHONPATH") else []))
        self.proc = subprocess.Popen([sys.executable, "-m", "flashmoe.cli", "serve", str(model_dir), "--port", "0",
                                      "--log-level", "warning", *args], env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if " at http" not in line:
            self.proc.kill()
            raise AssertionError(f"no server: {line}{self.proc.stderr.read()[-3000:]}")
        self.url = line.split(" at ")[1].split()[0].rsplit("/v1", 1)[0]
        self.port = int(self.url.rsplit(":", 1)[1])
        for _ in range(500):
            try:
                if httpx.get(self.url.replace("0.0.0.0", "127.0.0.1") + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.01)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def listening_address(port):
    """The local address (IPv4 dotted) the LISTEN socket on `port` is bound to, from /proc/net/tcp."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if int(p, 16) == port and state == "0A":
            return socket.inet_ntoa(bytes.fromhex(addr)[::-1])
    raise AssertionError(f"nothing listens on port {port}")


@pytest.fixture(scope="module")
def cli_server(model_dir):
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("reads the bound address from Linux's /proc/net/tcp")
    s = Served(model_dir, ["--context-length", str(CTX)], env={"FLASHMOE_API_KEY": "env-key-456"})
    yield s
    s.close()


def test_serve_binds_to_loopback_unless_told(cli_server, model_dir):
    assert listening_address(cli_server.port) == "127.0.0.1"
    other = Served(model_dir, ["--host", "0.0.0.0", "--context-length", str(CTX)])
    try:
        assert listening_address(other.port) == "0.0.0.0"
    finally:
        other.close()


def test_api_key_from_the_environment(cli_server):
    url = cli_server.url
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer env-key-456"}, timeout=10).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"x-api-key": "env-key-456"}, timeout=10).status_code == 200
    assert httpx.get(url + "/health", timeout=10).status_code == 200  # /health needs no key


def test_api_key_option_overrides_the_environment(model_dir):
    s = Served(model_dir, ["--api-key", "flag-key", "--context-length", str(CTX)], env={"FLASHMOE_API_KEY": "env-key"})
    try:
        assert httpx.get(s.url + "/v1/models", headers={"x-api-key": "flag-key"}, timeout=10).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"x-api-key": "env-key"}, timeout=10).status_code == 401
    finally:
        s.close()


def test_default_max_tokens_limit_is_the_context_length(cli_server):
    key = {"x-api-key": "env-key-456"}
    body = {"model": NAME, "prompt": [5, 6, 7], "temperature": 0}
    r = post(cli_server.url, "/v1/completions", {**body, "max_tokens": CTX}, headers=key)
    assert r.status_code == 200, r.text  # up to the context: accepted (and it stops when the context is full)
    assert r.json()["choices"][0]["finish_reason"] == "length"
    r = post(cli_server.url, "/v1/completions", {**body, "max_tokens": CTX + 1}, headers=key)
    assert r.status_code == 400 and f"limit of {CTX}" in r.text, r.text


def test_default_max_body_is_16_mib(cli_server):
    """A body of exactly 16 MiB (a small request padded with JSON whitespace) is read; one byte more is
    refused with 413 before the model sees it."""
    key = {"x-api-key": "env-key-456", "content-type": "application/json"}
    req = json.dumps({"model": NAME, "prompt": [5, 6, 7], "max_tokens": 1, "temperature": 0}).encode()
    limit = 16 * 2**20
    for size, status in ((limit, 200), (limit + 1, 413)):
        body = req + b" " * (size - len(req))
        r = httpx.post(cli_server.url + "/v1/completions", content=body, headers=key, timeout=60)
        assert r.status_code == status, (size, r.status_code, r.text[:300])
