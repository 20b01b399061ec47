"""`flashmoe serve`: the OpenAI and Anthropic APIs, driven by the official `openai` and `anthropic` clients
against a real server on a loopback port, on a tiny random model with the test tokenizer (gibberish
text: the shapes, the streaming, tool calls forced with tool_choice, queueing and cancellation are
what is checked). Scripted generation (as in test_generate.py) stands in where the text matters:
parallel tool calls and a generation slow enough to be cancelled."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from test_generate import TINY
from text_fixtures import write_tokenizer

import flashmoe
from flashmoe.generation import GenerationChunk
from flashmoe.synth import write_random_model

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
try:  # the clients' HTTP library: httpx2 in newer releases
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from flashmoe.server import create_app  # noqa: E402

KEY = "test-key-123"
NAME = "tiny-moe"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
A_TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather in a city",
        "input_schema": TOOLS[0]["function"]["parameters"],
    }
]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "m"
    write_random_model(path, TINY, bits=4, progress=False)
    write_tokenizer(path, template="qwen3.5", vocab_size=TINY["vocab_size"])
    return path


@contextlib.contextmanager
def serving(app):
    """app served by uvicorn in a thread of this process (so that generation can be scripted), on a free
    loopback port; yields its URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def served(model_dir):
    model = flashmoe.load(model_dir, context_length=1024, int8_activations=False)
    app = create_app(model, model_name=NAME, api_key=KEY, max_tokens_limit=128, max_body_bytes=64 * 1024)
    with serving(app) as url:
        yield url, app.state.server


@pytest.fixture
def url(served):
    return served[0]


@pytest.fixture
def oa(url):
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
def an(url):
    with anthropic.Anthropic(base_url=url, api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


def healthy(url):
    r = httpx.get(url + "/health", timeout=10)
    return r.status_code == 200 and r.json()["status"] == "ok"


def scripted(monkeypatch, pieces, finish="stop", delay=0.0, seen=None):
    """Replace the sampling loop with one that 'generates' the given text pieces (then finish)."""
    import flashmoe.generation as g

    def run(model, prompt, params, **kw):
        if seen is not None:
            seen["prompt"] = model.tokenizer.decode(prompt)
        for p in pieces:
            if delay:
                time.sleep(delay)
            yield GenerationChunk(p, [1])
        n = len(pieces)
        yield GenerationChunk(
            "",
            [],
            finish,
            {
                "prompt_tokens": len(prompt),
                "completion_tokens": n,
                "total_tokens": len(prompt) + n,
                "cached_tokens": 0,
            },
            {},
        )

    monkeypatch.setattr(g, "run_generation", run)


def call_text(name, **args):
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in args.items())
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


# ---- basics ------------------------------------------------------------------------------------------


def test_health_and_models(url, oa, an):
    r = httpx.get(url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["model"] == NAME
    assert [m.id for m in oa.models.list()] == [NAME]
    card = oa.models.retrieve(NAME)
    assert card.id == NAME and card.owned_by == "flashmoe"
    assert [m.id for m in an.models.list()] == [NAME]
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("nope")


def test_chat_and_stream_deltas_join(oa):
    kw = dict(model=NAME, messages=USER, max_tokens=12, temperature=0)
    r = oa.chat.completions.create(**kw)
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    msg = choice.message
    assert msg.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert (
        r.usage.completion_tokens <= 12
        and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    )
    reasoning = getattr(msg, "reasoning_content", None) or ""
    assert (msg.content or "") + reasoning  # the thinking template: mostly reasoning

    chunks = list(oa.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks[:-1])
    assert content == (msg.content or "") and thought == reasoning
    # the same prompt again: the prompt cache serves all of it but the last token
    again = oa.chat.completions.create(**kw)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_raw_sse_shape_ends_with_done(url):
    body = {"model": NAME, "messages": USER, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}
    assert "usage" not in last  # only with stream_options.include_usage


def test_stop_and_thinking_switch(oa):
    base = dict(
        model=NAME,
        messages=USER,
        max_tokens=16,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    r = oa.chat.completions.create(**base)
    text = r.choices[0].message.content
    assert getattr(r.choices[0].message, "reasoning_content", None) is None
    # the fixture model's greedy answer is fixed: long enough to cut (if a fixture change makes it short,
    # pick another prompt rather than skip)
    assert len(text) >= 6, text
    stop = text[3:6]
    cut = oa.chat.completions.create(**base, stop=[stop])
    assert (
        cut.choices[0].finish_reason == "stop"
        and cut.choices[0].message.content == text[: text.find(stop)].strip()
    )


def test_completions(oa, served):
    r = oa.completions.create(model=NAME, prompt="The weather in Paris is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    chunks = list(
        oa.completions.create(
            model=NAME,
            prompt="The weather in Paris is",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    ids = served[1].model.tokenizer.encode("The weather in Paris is")
    by_ids = oa.completions.create(model=NAME, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text
    seeded = [oa.completions.create(model=NAME, prompt="Once", max_tokens=8, temperature=1.0, seed=s).choices[0].text
              for s in (3, 3, 4)]
    assert seeded[0] == seeded[1] != seeded[2]
    echo = oa.completions.create(model=NAME, prompt="Hello", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("Hello")


# ---- tool calls --------------------------------------------------------------------------------------


def test_named_tool_choice_forces_a_call_and_the_result_round_trips(oa):
    r = oa.chat.completions.create(
        model=NAME,
        messages=USER,
        tools=TOOLS,
        max_tokens=10,
        temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = r.choices[0]
    assert choice.finish_reason in ("tool_calls", "length")  # length: the random model never closes the call
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)
    # the same, streamed: the call arrives whole in one delta
    chunks = list(
        oa.chat.completions.create(
            model=NAME,
            messages=USER,
            tools=TOOLS,
            max_tokens=10,
            temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather")]
    assert calls[0].function.arguments == call.function.arguments
    # send the result back; the model answers
    messages = USER + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 18, "sky": "sunny"}'},
    ]
    answer = oa.chat.completions.create(
        model=NAME, messages=messages, tools=TOOLS, max_tokens=6, temperature=0
    )
    assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens >= 1
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_parallel_and_forced_tool_calls_scripted(oa, an, monkeypatch):
    two = [
        "Two cities.</think>\n\n",
        "Checking both.\n",
        call_text("get_weather", city="Paris", days=3),
        "\n",
        call_text("get_weather", city="London"),
    ]
    scripted(monkeypatch, two)
    r = oa.chat.completions.create(model=NAME, messages=USER, tools=TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Checking both."
    assert msg.reasoning_content == "Two cities."
    assert [json.loads(c.function.arguments) for c in msg.tool_calls] == [
        {"city": "Paris", "days": 3},
        {"city": "London"},
    ]
    assert len({c.id for c in msg.tool_calls}) == 2
    chunks = list(oa.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0, 1] and chunks[-1].choices[0].finish_reason == "tool_calls"
    one = oa.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1
    none = oa.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    m = an.messages.create(model=NAME, max_tokens=50, messages=USER, tools=A_TOOLS)
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == [
        "thinking",
        "text",
        "tool_use",
        "tool_use",
    ]
    assert m.content[0].thinking == "Two cities." and m.content[1].text == "Checking both."
    assert m.content[2].input == {"city": "Paris", "days": 3} and m.content[2].id.startswith("toolu_")
    with an.messages.stream(model=NAME, max_tokens=50, messages=USER, tools=A_TOOLS) as s:
        streamed = s.get_final_message()
    no_id = lambda blocks: [{k: v for k, v in b.model_dump().items() if k != "id"} for b in blocks]  # noqa: E731
    assert no_id(streamed.content) == no_id(m.content) and streamed.stop_reason == "tool_use"

    # tool_choice required / named: the answer is made to start with the call, thinking off
    seen = {}
    scripted(monkeypatch, ["<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>"], seen=seen)
    r = oa.chat.completions.create(
        model=NAME,
        messages=USER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert seen["prompt"].endswith("<think>\n\n</think>\n\n<tool_call>\n<function=get_weather>\n")
    assert json.loads(r.choices[0].message.tool_calls[0].function.arguments) == {"city": "Rome"}
    scripted(monkeypatch, ["<function=get_weather>\n</function>\n</tool_call>"], seen=seen)
    r = oa.chat.completions.create(model=NAME, messages=USER, tools=TOOLS, tool_choice="required")
    assert seen["prompt"].endswith("</think>\n\n<tool_call>\n") and r.choices[0].finish_reason == "tool_calls"
    m = an.messages.create(
        model=NAME, max_tokens=50, messages=USER, tools=A_TOOLS, tool_choice={"type": "any"}
    )
    assert m.stop_reason == "tool_use" and m.content[-1].name == "get_weather"


def test_forced_call_prefix_follows_the_template_format():
    from types import SimpleNamespace

    from text_fixtures import TEMPLATES

    from flashmoe.server.common import forced_prefix
    from flashmoe.tool_calls import parse_tool_calls

    xml = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=TEMPLATES["qwen3.5"]))
    hermes = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=TEMPLATES["qwen3-next"]))
    assert forced_prefix(xml, "get_weather") == "<tool_call>\n<function=get_weather>\n"
    assert forced_prefix(xml, None) == forced_prefix(hermes, None) == "<tool_call>\n"
    text = forced_prefix(hermes, "get_weather") + '{"city": "Paris"}}\n</tool_call>'
    assert parse_tool_calls(text)[1][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }


# ---- limits, errors, auth ----------------------------------------------------------------------------


def test_auth(url):
    for c in (openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0),):
        with pytest.raises(openai.AuthenticationError) as e:
            c.chat.completions.create(model=NAME, messages=USER, max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(anthropic.AuthenticationError) as e:
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
            model=NAME, max_tokens=2, messages=USER
        )
    assert e.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": e.value.body["error"]["message"]},
    }
    r = httpx.get(url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert healthy(url)  # /health needs no key


def test_bad_requests_get_4xx_in_the_api_shape_and_the_server_stays_healthy(url, oa, an):
    h = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    post = lambda path, content, **kw: httpx.post(
        url + path, content=content, headers={**h, **kw}, timeout=30
    )  # noqa: E731
    ok = {"model": NAME, "messages": USER, "max_tokens": 2}
    cases = [
        ("/v1/chat/completions", b'{"model": "tiny-moe", "messages": [', 400, None),
        ("/v1/chat/completions", b"[1, 2]", 400, None),
        ("/v1/chat/completions", json.dumps({**ok, "model": "gpt-4o"}).encode(), 404, "model_not_found"),
        ("/v1/chat/completions", json.dumps({**ok, "max_tokens": -5}).encode(), 400, "invalid_value"),
        ("/v1/chat/completions", json.dumps({**ok, "max_tokens": 100000}).encode(), 400, "invalid_value"),
        ("/v1/chat/completions", json.dumps({**ok, "temperature": "hot"}).encode(), 400, None),
        ("/v1/chat/completions", json.dumps({**ok, "top_p": 0}).encode(), 400, None),
        (
            "/v1/chat/completions",
            json.dumps({**ok, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            400,
            None,
        ),
        (
            "/v1/chat/completions",
            json.dumps({**ok, "messages": [{"role": "user", "content": "x " * 1500}]}).encode(),
            400,
            "context_length_exceeded",
        ),
        (
            "/v1/chat/completions",
            json.dumps({**ok, "messages": [{"role": "user", "content": "x" * 70000}]}).encode(),
            413,
            None,
        ),
        ("/v1/completions", json.dumps({"model": NAME, "prompt": [5, 100000]}).encode(), 400, None),
        ("/v1/nothing", b"{}", 404, None),
    ]
    for path, content, status, code in cases:
        r = post(path, content)
        assert r.status_code == status, (path, content[:60], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert code is None or err["code"] == code, err
        assert healthy(url)
    r = post(
        "/v1/chat/completions",
        json.dumps({**ok, "messages": [{"role": "user", "content": "x " * 1500}]}).encode(),
    )
    assert "the context holds 1024" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="context holds"):  # streamed: answered before any chunk
        oa.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "x " * 1500}], max_tokens=2, stream=True
        )
    # the clients' own exceptions
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model=NAME, messages=USER, max_tokens=-1)
    with pytest.raises(anthropic.BadRequestError) as e:
        an.messages.create(model=NAME, max_tokens=0, messages=USER)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        an.messages.create(model="claude-x", max_tokens=4, messages=USER)
    assert e.value.body["error"]["type"] == "not_found_error"
    r = post("/v1/messages", json.dumps({"model": NAME, "messages": USER}).encode())  # no max_tokens
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = post("/v1/messages", b"x" * 70000)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    # still serving
    still = oa.chat.completions.create(model=NAME, messages=USER, max_tokens=2, temperature=0)
    assert still.usage.completion_tokens >= 1


# ---- queueing and cancellation -----------------------------------------------------------------------


def test_parallel_clients_get_what_they_would_get_alone(oa):
    prompts = ["Hello there", "Tell me about Paris", "def add(a, b):"]

    def ask(p):
        r = oa.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": p}], max_tokens=10, temperature=0
        )
        return r.choices[0].message.model_dump()

    alone = [ask(p) for p in prompts]
    together = [None] * len(prompts)

    def worker(i):
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone


def test_disconnect_mid_stream_frees_the_engine(url, oa, served, monkeypatch):
    engine = served[1].engine
    before = engine.counts["cancelled"]
    scripted(monkeypatch, ["tok "] * 2000, delay=0.02)  # 40 s if never cancelled
    t0 = time.perf_counter()
    stream = oa.chat.completions.create(model=NAME, messages=USER, max_tokens=100, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    # a non-streaming request whose client gives up is cancelled too
    with pytest.raises(openai.APITimeoutError):
        oa.with_options(timeout=0.5).chat.completions.create(model=NAME, messages=USER, max_tokens=100)
    monkeypatch.undo()
    r = oa.chat.completions.create(model=NAME, messages=USER, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    assert time.perf_counter() - t0 < 10
    assert engine.counts["cancelled"] == before + 2
    h = httpx.get(url + "/health").json()
    assert h["status"] == "ok" and not h["busy"] and h["queued"] == 0


# ---- Anthropic Messages ------------------------------------------------------------------------------


def test_anthropic_messages_and_stream_events(an):
    kw = dict(
        model=NAME,
        max_tokens=12,
        extra_body={"temperature": 0},
        system=[{"type": "text", "text": "You are terse."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
    )
    m = an.messages.create(**kw)
    assert m.type == "message" and m.role == "assistant" and m.model == NAME and m.id.startswith("msg_")
    assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.output_tokens <= 12
    assert m.content and {b.type for b in m.content} <= {"thinking", "text"}
    events = list(an.messages.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    blocks = kinds[1:-2]
    # each block: start, deltas, stop, with increasing indices
    i, index = 0, 0
    while i < len(blocks):
        assert blocks[i] == "content_block_start" and events[1 + i].index == index
        i += 1
        while blocks[i] == "content_block_delta":
            assert events[1 + i].index == index
            i += 1
        assert blocks[i] == "content_block_stop"
        i, index = i + 1, index + 1
    assert (
        events[-2].delta.stop_reason == m.stop_reason
        and events[-2].usage.output_tokens == m.usage.output_tokens
    )
    assert events[0].message.usage.input_tokens == m.usage.input_tokens + (
        m.usage.cache_read_input_tokens or 0
    )
    with an.messages.stream(**kw) as s:
        final = s.get_final_message()
    body = {**kw.pop("extra_body"), **kw, "stream": True}
    with httpx.stream(
        "POST",
        str(an.base_url).rstrip("/") + "/v1/messages",
        json=body,
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
        timeout=30,
    ) as r:
        raw = [ln for ln in r.iter_lines() if ln]
    assert [ln[7:] for ln in raw[::2]] == kinds and all(ln.startswith("event: ") for ln in raw[::2])
    assert all(json.loads(d[6:])["type"] == e[7:] for e, d in zip(raw[::2], raw[1::2]))
    kw["extra_body"] = {"temperature": 0}
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in m.content]
    # stop sequences, thinking off
    plain = an.messages.create(**{**kw, "max_tokens": 16}, thinking={"type": "disabled"})
    assert [b.type for b in plain.content] == ["text"]
    text = plain.content[0].text
    assert len(text) >= 6
    cut = an.messages.create(
        **{**kw, "max_tokens": 16}, thinking={"type": "disabled"}, stop_sequences=[text[3:6]]
    )
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == text[3:6]
    n = an.messages.count_tokens(model=NAME, messages=kw["messages"], system=kw["system"])
    assert n.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)


def test_anthropic_tool_use_round_trip(an):
    kw = dict(
        model=NAME,
        max_tokens=10,
        extra_body={"temperature": 0},
        tools=A_TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    m = an.messages.create(**kw, messages=USER)
    assert m.stop_reason in ("tool_use", "max_tokens")
    use = m.content[-1]
    assert use.type == "tool_use" and use.name == "get_weather" and isinstance(use.input, dict)
    with an.messages.stream(**kw, messages=USER) as s:
        events = list(s)
        final = s.get_final_message()
    assert any(
        e.type == "content_block_delta" and e.delta.type == "input_json_delta"
        for e in events
        if hasattr(e, "delta")
    )
    assert final.content[-1].type == "tool_use" and final.content[-1].input == use.input
    messages = USER + [
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees, sunny"},
                {"type": "text", "text": "Thanks!"},
            ],
        },
    ]
    answer = an.messages.create(
        model=NAME, max_tokens=6, extra_body={"temperature": 0}, tools=A_TOOLS, messages=messages
    )
    assert answer.role == "assistant" and answer.usage.output_tokens >= 1
    assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")


# ---- the command -------------------------------------------------------------------------------------


def test_serve_command(model_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flashmoe.cli",
            "serve",
            str(model_dir),
            "--port",
            "0",
            "--context-length",
            "128",
            "--api-key",
            "k1",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        base = line.split("http://")[1].split()[0]
        base = "http://" + base
        for _ in range(100):
            try:
                if httpx.get(base.replace("/v1", "/health"), timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        with openai.OpenAI(base_url=base, api_key="k1", max_retries=0) as c:
            assert [m.id for m in c.models.list()] == ["m"]  # the directory's name
            # greedy: a sampled first token could be a stop token (the model is random), which ends at 0
            r = c.chat.completions.create(model="m", messages=USER, max_tokens=3, temperature=0)
            assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -15)


# ---- issue 14: no stall, the right status, no poisoned retry, cancellation -----------------------------

AUTH = {"Authorization": f"Bearer {KEY}"}


def health(url):
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200
    return r.json()


def rss() -> int:
    """This process's resident bytes (0 where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def wait_for(cond, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def post_and_hold(url, path, body):
    """POST body on a raw socket, returned open: closing it is the client leaving."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
    sock.sendall(head.encode() + data)
    return sock


@pytest.fixture(scope="module")
def big_served(model_dir):
    """A server with the default body limit (16 MiB) and a context of 1024 tokens."""
    model = flashmoe.load(model_dir, context_length=1024, int8_activations=False)
    app = create_app(model, model_name=NAME)
    with serving(app) as url:
        yield url, app.state.server


@pytest.mark.parametrize("kind", ["ascii", "cjk"])
def test_a_huge_prompt_neither_stalls_the_server_nor_keeps_its_memory(big_served, kind, tmp_path):
    """A chat message of 15 MB of ASCII (refused from its length alone, untokenized) or of 2 M CJK
    characters (which no byte count can refuse under NFC: tokenized, 6 M tokens, with the GIL released)
    while another client polls /health every 50 ms: /health answers throughout, the prompt gets the usual
    context-length 400, and the memory tokenizing went through is given back. Before: /health waited
    17 s (ASCII) behind the tokenizer holding the GIL, and the process kept 1.9 GB."""
    url, _ = big_served
    if kind == "ascii":
        text = ("The weather in Paris is sunny, 21 degrees. " * 350_000)[:15_000_000]
    else:
        text = "中文日本語你好世界" * 222_223
    body = json.dumps({"model": NAME, "messages": [{"role": "user", "content": text}], "max_tokens": 2})
    body = body.encode()
    assert len(body) < 16 * 1024 * 1024
    path = tmp_path / "body.json"
    path.write_bytes(body)
    del text, body
    answers, stop = [], threading.Event()

    def poll():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                answers.append((time.perf_counter(), c.get(url + "/health").status_code))
                time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    before = rss()
    t0 = time.perf_counter()
    poller.start()
    # the client in a process of its own: this one's memory is then the server's (and the poller's)
    post = (f"import {httpx.__name__} as httpx, sys; r = httpx.post(sys.argv[1], content=open(sys.argv[2], 'rb').read(), "
            "headers={'content-type': 'application/json'}, timeout=120); print(r.status_code); print(r.text)")
    out = subprocess.run([sys.executable, "-c", post, url + "/v1/chat/completions", str(path)],
                         capture_output=True, text=True, timeout=180)
    t1 = time.perf_counter()
    stop.set()
    poller.join(60)
    grown = rss() - before
    assert out.returncode == 0, out.stderr
    status, text = out.stdout.split("\n", 1)
    assert status == "400", out.stdout
    err = json.loads(text)["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert "the context holds 1024" in err["message"]
    assert all(status == 200 for _, status in answers)
    times = [t0] + [t for t, _ in answers if t0 < t < t1] + [t1]
    longest_wait = max(b - a for a, b in zip(times, times[1:]))
    assert longest_wait < 1.0, f"/health went unanswered for {longest_wait:.2f} s"
    if before:  # Linux
        assert grown < 100 << 20, f"the server kept {grown >> 20} MiB more after the request"


def test_a_prompt_text_is_refused_untokenized_only_when_it_cannot_fit(served, monkeypatch):
    """Over context_length times the longest token's bytes, a prompt is refused without tokenizing; at
    that edge, a text of exactly context_length tokens (the longest token over and over) still runs."""
    from flashmoe.errors import ContextLengthError
    from flashmoe.tokenizer import Tokenizer

    model = served[1].model
    ctx = model.context_length
    longest = "<|endoftext|>"  # 13 bytes, one token: the longest of the test tokenizer
    assert model.tokenizer._length_rule == ("ascii", len(longest))
    seen = []
    encoding = Tokenizer._encoding
    monkeypatch.setattr(Tokenizer, "_encoding",
                        lambda self, text, *a: seen.append(text) or encoding(self, text, *a))
    assert model._encode_prompt(longest * ctx, "chat") == model.tokenizer.encode(longest) * ctx
    seen.clear()
    with pytest.raises(ContextLengthError, match=f"at least {ctx + 1} tokens .* the context holds {ctx}"):
        model._encode_prompt(longest * (ctx + 1), "chat")
    assert seen == []  # never tokenized
    # a text the bound lets through is tokenized, and counted before its ids become a list
    with pytest.raises(ContextLengthError, match=f"has {ctx + 1} tokens"):
        model._encode_prompt("<|im_end|>" * (ctx + 1), "chat")
    assert len(seen) == 1


NAN, INF = float("nan"), float("inf")
BAD_FIELDS = [  # path, field, value, code (None: not checked)
    ("/v1/chat/completions", "top_k", 2**70, None),
    ("/v1/chat/completions", "top_k", 2**31, None),
    ("/v1/chat/completions", "seed", -1, None),
    ("/v1/chat/completions", "seed", 2**70, None),
    ("/v1/chat/completions", "max_tokens", 2**70, "invalid_value"),
    ("/v1/chat/completions", "max_completion_tokens", 10**30, "invalid_value"),
    ("/v1/chat/completions", "temperature", NAN, None),
    ("/v1/chat/completions", "top_p", NAN, None),
    ("/v1/chat/completions", "min_p", INF, None),
    ("/v1/chat/completions", "presence_penalty", NAN, None),
    ("/v1/chat/completions", "repetition_penalty", 1e308, None),  # a finite double, inf as a float32
    ("/v1/chat/completions", "n", 2, None),
    ("/v1/chat/completions", "n", 2**70, None),
    ("/v1/chat/completions", "logit_bias", {"5": 1}, None),
    ("/v1/chat/completions", "logprobs", True, None),
    ("/v1/chat/completions", "stop", ["a"] * 1000, None),
    ("/v1/chat/completions", "chat_template_kwargs", {"messages": []}, None),
    ("/v1/chat/completions", "chat_template_kwargs", {"add_generation_prompt": False}, None),
    ("/v1/chat/completions", "messages", [{"role": "user", "content": [{"type": "image_url"}]}], None),
    ("/v1/completions", "prompt", [2**31], None),
    ("/v1/completions", "prompt", [-1], None),
    ("/v1/completions", "prompt", [2**70], None),
    ("/v1/completions", "prompt", [5] * 2000, "context_length_exceeded"),
    ("/v1/completions", "prompt", "x " * 1500, "context_length_exceeded"),
    ("/v1/completions", "top_k", 2**70, None),
    ("/v1/completions", "seed", 2**70, None),
    ("/v1/completions", "temperature", NAN, None),
    ("/v1/completions", "max_tokens", 2**70, "invalid_value"),
    ("/v1/completions", "n", 2, None),
    ("/v1/completions", "logit_bias", {"1": 2}, None),
    ("/v1/messages", "top_k", 2**70, None),
    ("/v1/messages", "temperature", NAN, None),
    ("/v1/messages", "top_p", INF, None),
    ("/v1/messages", "max_tokens", 2**70, None),
]


@pytest.mark.parametrize("path,field,value,code", BAD_FIELDS,
                         ids=[f"{p[4:].replace('/', '.')}-{f}-{i}"
                              for i, (p, f, _, _) in enumerate(BAD_FIELDS)])
def test_a_bad_field_gets_400_naming_it(url, path, field, value, code):
    base = {"model": NAME, "max_tokens": 2}
    base.update({"prompt": "Hello"} if path == "/v1/completions" else {"messages": USER})
    r = httpx.post(url + path, content=json.dumps({**base, field: value}),
                   headers={**AUTH, "content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    if path == "/v1/messages":
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and field in err["message"], err
    else:
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == field, err
        assert code is None or err["code"] == code, err
    assert "internal error" not in err["message"]


def test_engine_errors_map_by_kind():
    """What the engine raises: about the request 400 (naming the prompt's field), the server's own
    failures 500 saying what failed, in both APIs' shapes."""
    from flashmoe.chat import ChatTemplateError
    from flashmoe.errors import (ArgumentError, ContextLengthError, FlashMoEError, FormatError,
                                 MemoryBudgetError, ReadError)
    from flashmoe.server import anthropic as an_api
    from flashmoe.server import openai as oa_api
    from flashmoe.server.common import engine_error

    cases = [
        (ContextLengthError("the prompt has 5000 tokens but the context holds 1024"), 400,
         "context_length_exceeded", "the prompt has 5000"),
        (ChatTemplateError("chat template error: roles must alternate"), 400, None, "roles must alternate"),
        (ArgumentError("token id 7 is outside the vocabulary [0, 5)"), 400, None, "token id 7"),
        (ReadError("layer 0 expert 3: read failed at offset 0: Input/output error"), 500, "read_error",
         "could not read the model's files: layer 0 expert 3"),
        (FormatError("layer 0 expert 3: checksum mismatch"), 500, "model_error", "failed a check: layer 0"),
        (MemoryBudgetError("cannot allocate the KV cache"), 500, "model_error", "ran out of memory"),
        (FlashMoEError("something in the core"), 500, "model_error", "the engine failed: something"),
        (RuntimeError("boom"), 500, None, "internal error: RuntimeError: boom"),
        (TypeError("unsupported operand"), 500, None, "internal error: TypeError"),
    ]
    for exc, status, code, words in cases:
        err = engine_error(exc, "prompt")
        assert (err.status, err.code, err.param) == (status, code, "prompt" if status == 400 else None), exc
        assert words in err.message, (exc, err.message)
        kinds = (oa_api.error_body(err)["error"]["type"], an_api.error_body(err)["error"]["type"])
        assert kinds == (("invalid_request_error",) * 2 if status == 400 else ("server_error", "api_error"))


def test_a_model_without_a_tokenizer_serves_token_ids_and_refuses_text_with_400(tmp_path):
    write_random_model(tmp_path / "m", TINY, bits=4, progress=False)
    model = flashmoe.load(tmp_path / "m", context_length=256, int8_activations=False)
    with serving(create_app(model, model_name=NAME)) as base:
        for path, body in [("/v1/chat/completions", {"messages": USER}), ("/v1/messages", {"messages": USER}),
                           ("/v1/messages/count_tokens", {"messages": USER}),
                           ("/v1/completions", {"prompt": "Hi"})]:
            r = httpx.post(base + path, json={"model": NAME, "max_tokens": 2, **body}, timeout=30)
            assert r.status_code == 400 and "no tokenizer" in r.text, (path, r.text)
        r = httpx.post(base + "/v1/completions", json={"model": NAME, "prompt": [1, 2, 3], "max_tokens": 2,
                                                      "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3


def test_a_failed_read_answers_500_and_the_retry_gets_what_a_fresh_server_gives(model_dir):
    """An expert read fails (the fault hook) at points spread over a request: in the prompt, after the
    prompt's snapshot, in decode. The request gets a 500 saying so, /health keeps answering, and the
    client's retry returns exactly the fresh server's answer (greedy), not one from a state the failure
    left half-built."""
    opts = dict(context_length=1024, int8_activations=False, expert_cache_slots=2, prefetch=False)
    body = {"model": NAME, "messages": USER, "max_tokens": 8, "temperature": 0}

    def answer(r):
        assert r.status_code == 200, r.text
        j = r.json()
        return j["choices"], j["usage"]["prompt_tokens"], j["usage"]["completion_tokens"]

    fresh = flashmoe.load(model_dir, **opts)
    with serving(create_app(fresh, model_name=NAME)) as base:
        misses = fresh.stats["expert_misses"]
        want = answer(httpx.post(base + "/v1/chat/completions", json=body, timeout=60))
        reads = fresh.stats["expert_misses"] - misses  # two cache slots, no prefetch: every miss is a read
    assert reads >= 64
    model = flashmoe.load(model_dir, **opts)
    errors = []
    with serving(create_app(model, model_name=NAME)) as base:
        for after in range(0, reads - reads // 8, reads // 8):
            model.clear_prompt_cache()  # each round starts as the fresh server did: failures land as meant
            model._core.debug_fail_reads(after, 1)
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 500, (after, r.text)
            errors.append(r.json()["error"])
            assert healthy(base)
            retry = answer(httpx.post(base + "/v1/chat/completions", json=body, timeout=60))
            assert retry == want, f"the retry after a read failing once {after} reads into the request"
    for err in errors:
        assert err["type"] == "server_error" and err["code"] == "read_error", err
        assert "could not read the model's files" in err["message"] and "Input/output error" in err["message"]


def test_a_queued_request_whose_client_leaves_is_dropped_at_once_and_never_runs(url, served, monkeypatch):
    import flashmoe.generation as g

    release, running, prompts = threading.Event(), threading.Event(), []

    def run(model, prompt, params, **kw):  # the first request holds the engine until released
        prompts.append(model.tokenizer.decode(prompt))
        running.set()
        assert release.wait(30)
        usage = {"prompt_tokens": len(prompt), "completion_tokens": 1, "total_tokens": len(prompt) + 1,
                 "cached_tokens": 0}
        yield GenerationChunk("done", [1], "stop", usage, {})

    monkeypatch.setattr(g, "run_generation", run)
    before = health(url)["requests"]
    first = {}
    body = {"model": NAME, "messages": [{"role": "user", "content": "the first"}]}
    t = threading.Thread(target=lambda: first.update(
        r=httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60)))
    t.start()
    try:
        assert running.wait(10)
        sock = post_and_hold(url, "/v1/chat/completions",
                             {"model": NAME, "messages": [{"role": "user", "content": "the second"}]})
        wait_for(lambda: health(url)["queued"] == 1, "the second request to be queued")
        sock.close()
        # it leaves the queue as soon as the server sees its client go, while the first still runs
        wait_for(lambda: health(url)["queued"] == 0, "the second request to leave the queue")
        h = health(url)
        assert h["busy"] and h["requests"] == {**before, "cancelled": before["cancelled"] + 1}
    finally:
        release.set()
        t.join(30)
    assert first["r"].status_code == 200 and first["r"].json()["choices"][0]["finish_reason"] == "stop"
    assert len(prompts) == 1 and "the first" in prompts[0]  # the second never ran
    wait_for(lambda: not health(url)["busy"], "the engine to be idle")
    assert health(url)["requests"] == {**before, "completed": before["completed"] + 1,
                                       "cancelled": before["cancelled"] + 1}


def test_a_client_leaving_during_a_long_prompt_stops_it_at_the_next_layer(model_dir, monkeypatch):
    """A long prompt runs in one engine call, layer by layer, the job's progress callback after each layer:
    once the server sees the client go, the next layer stops the prompt (the rest never runs), the engine
    state is reset (no prefix of a layer-by-layer prompt is complete), and the next request is served as
    by a fresh model."""
    from flashmoe.generation import PromptCache

    model = flashmoe.load(model_dir, context_length=1024, int8_activations=False, prefill_chunk=8)
    app = create_app(model, model_name=NAME)
    engine = app.state.server.engine
    messages = [{"role": "user", "content": "The weather in Paris is sunny. " * 50}]
    n_prompt = len(model.tokenizer.encode(model.apply_chat_template(messages)))
    assert 320 < n_prompt <= 1024
    calls, reports, started = [], [], threading.Event()
    run = PromptCache.run

    def watched(self, ids, progress=None):
        calls.append(len(ids))

        def report(done, total):
            reports.append((done, total))
            if len(reports) == 1:  # hold the prompt after its first layer until the server has seen the client leave
                started.set()
                wait_for(lambda: engine._current is not None and engine._current.cancelled, "the cancellation")
            progress(done, total)
        return run(self, ids, report if progress else None)

    monkeypatch.setattr(PromptCache, "run", watched)
    with serving(app) as base:
        sock = post_and_hold(base, "/v1/chat/completions",
                             {"model": NAME, "messages": messages, "max_tokens": 4})
        assert started.wait(10)
        sock.close()
        wait_for(lambda: not health(base)["busy"], "the engine to stop")
        assert health(base)["requests"] == {"completed": 0, "cancelled": 1, "failed": 0}
        n_layers = model.config["num_hidden_layers"]
        assert 320 < calls[0] <= n_prompt and reports == [(calls[0] // n_layers, calls[0])]  # up to the last turn
        assert model.position == 0
        monkeypatch.setattr(PromptCache, "run", run)
        short = [{"role": "user", "content": "Hi"}]
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": NAME, "messages": short, "max_tokens": 4,
                                                              "temperature": 0}, timeout=60).json()
    fresh = flashmoe.load(model_dir, context_length=1024, int8_activations=False, prefill_chunk=8)
    assert r["choices"][0]["message"]["content"] == fresh.chat(short, max_tokens=4, temperature=0)["content"]
