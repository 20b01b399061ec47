"""Text generation, streaming, chat, prompt reuse and the context limit, on a tiny random model with the
test tokenizer of tests/text_fixtures.py next to it (random weights: the text is gibberish, the
mechanics are what is checked)."""

import collections
import numpy as np
import pytest
from text_fixtures import write_tokenizer

import flashmoe
from flashmoe.errors import ContextLengthError
from flashmoe.generation import GenerationChunk
from flashmoe.model import SamplingParams
from flashmoe.synth import DEMO_CONFIG, write_random_model

TINY = {**DEMO_CONFIG, "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"], "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "head_dim": 16,
        "num_attention_heads": 4, "num_key_value_heads": 2, "linear_num_key_heads": 2,
        "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16}
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module", params=["qwen3.5", "qwen3-next"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "m"
    write_random_model(path, TINY, bits=4, progress=False)
    write_tokenizer(path, template=request.param, vocab_size=TINY["vocab_size"])
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    # fp32 activations, so that runs split into other chunks agree to rounding (ops.h)
    return flashmoe.load(model_dir, context_length=256, int8_activations=False)


def test_generate_returns_text_ids_finish_and_usage(model):
    r = model.generate("Hello there, how are you?", max_tokens=12, stop_token_ids=[], **GREEDY)
    assert r.finish_reason == "length" and len(r.token_ids) == 12
    assert r.text == model.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    n_prompt = len(model.tokenizer.encode("Hello there, how are you?"))
    assert r.usage["prompt_tokens"] == n_prompt and r.usage["completion_tokens"] == 12
    assert r.usage["total_tokens"] == n_prompt + 12
    assert r.stats["decode_tokens_per_second"] > 0 and 0 <= r.stats["expert_hit_rate"] <= 1


def test_temperature_zero_is_the_greedy_token_loop(model):
    ids = model.tokenizer.encode("The quick brown fox")
    want = model.generate_tokens(ids, max_tokens=10, stop_token_ids=[])
    got = model.generate(ids, max_tokens=10, stop_token_ids=[], **GREEDY)
    assert got.token_ids == want


def test_seed_reproduces_and_differs(model):
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=16, stop_token_ids=[])
    a = model.generate("Once upon a time", seed=3, **kw).token_ids
    assert model.generate("Once upon a time", seed=3, **kw).token_ids == a
    assert model.generate("Once upon a time", seed=4, **kw).token_ids != a


def test_stream_deltas_join_to_generate(model):
    kw = dict(temperature=0.8, seed=11, max_tokens=20, stop_token_ids=[])
    whole = model.generate("café 中文 and more", **kw)
    chunks = list(model.stream("café 中文 and more", **kw))
    assert all(isinstance(c, GenerationChunk) for c in chunks)
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert all("\ufffd" not in c.text for c in chunks[:-1]) or "\ufffd" in whole.text
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])


def test_stop_string_cuts_the_text_and_is_never_streamed(model):
    ref = model.generate("Tell me a story", max_tokens=24, stop_token_ids=[], **GREEDY).text
    assert len(ref) > 8
    stop = ref[len(ref) // 2: len(ref) // 2 + 3]
    want = ref[:ref.find(stop)]
    r = model.generate("Tell me a story", max_tokens=24, stop=[stop], stop_token_ids=[], **GREEDY)
    assert r.finish_reason == "stop" and r.text == want
    streamed = [c.text for c in model.stream("Tell me a story", max_tokens=24, stop=[stop], stop_token_ids=[],
                                             **GREEDY)]
    assert "".join(streamed) == want


def test_stop_token_ends_generation(model):
    # a presence penalty far above the logits' range: greedy then never repeats a token, so the third
    # token is a first appearance, and stopping on it must end the answer just before it
    kw = dict(max_tokens=8, presence_penalty=1000.0, **GREEDY)
    ids = model.generate("Stop here", stop_token_ids=[], **kw).token_ids
    assert len(set(ids)) == len(ids) == 8
    r = model.generate("Stop here", stop_token_ids=[ids[2]], **kw)
    assert r.finish_reason == "stop" and r.stop == ids[2] and r.token_ids == ids[:2]


def test_greedy_with_penalties_is_the_argmax_after_them(model):
    """Greedy with penalties on: each token is the argmax of the logits after the penalties, never the backend's
    argmax of the raw logits (which a greedy step without penalties takes, model.c's device_greedy): the tokens of
    a numpy loop over forward()'s logits, penalising as sample.c does (every token seen, the prompt's too). A
    negative presence penalty far above the logits' range makes every token one seen before, so the penalties
    change the answer: the check has teeth."""
    ids = model.tokenizer.encode("Count: one two three one two three")
    rep, presence, freq = 1.8, -50.0, 0.3
    got = model.generate(ids, max_tokens=8, stop_token_ids=[], repetition_penalty=rep, presence_penalty=presence,
                         frequency_penalty=freq, **GREEDY).token_ids
    seen, want = collections.Counter(ids), []
    logits = model.forward(ids)[-1]
    for _ in range(8):
        pen = logits.astype(np.float32).copy()
        for t, c in seen.items():
            v = pen[t] / np.float32(rep) if pen[t] > 0 else pen[t] * np.float32(rep)
            pen[t] = v - (np.float32(c) * np.float32(freq) + np.float32(presence))
        want.append(int(np.argmax(pen)))
        seen[want[-1]] += 1
        logits = model.forward([want[-1]], reset=False)[-1]
    assert got == want
    assert model.generate(ids, max_tokens=8, stop_token_ids=[], **GREEDY).token_ids != want


def test_leaving_the_stream_stops_decoding(model):
    ids = model.tokenizer.encode("Count: one two three")
    for i, _ in enumerate(model.stream(ids, max_tokens=50, stop_token_ids=[], **GREEDY)):
        if i == 2:
            break
    assert model.position == len(ids) + 2  # the prompt and the two tokens after the first
    assert len(model.generate(ids, max_tokens=4, stop_token_ids=[], **GREEDY).token_ids) == 4


def cold_last_logits(model_dir, ids):
    m = flashmoe.load(model_dir, context_length=256, int8_activations=False)
    return m.forward(ids)[-1]


def test_prompt_reuse_runs_only_the_suffix_and_equals_a_cold_run(model, model_dir):
    tok = model.tokenizer
    first = tok.encode("A long shared system prompt, followed by a question.")
    r1 = model.generate(first, max_tokens=6, stop_token_ids=[], **GREEDY)
    follow = first + r1.token_ids + tok.encode(" And a follow-up.")
    r2 = model.generate(follow, max_tokens=3, stop_token_ids=[], **GREEDY)
    assert r2.usage["cached_tokens"] == len(first) + len(r1.token_ids) - 1  # the last sampled token never ran
    want = cold_last_logits(model_dir, follow)
    got = model._last_prompt_logits
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    # the same prompt again: restored from the snapshot taken one token before its end
    r3 = model.generate(follow, max_tokens=3, stop_token_ids=[], **GREEDY)
    assert r3.usage["cached_tokens"] == len(follow) - 1 and r3.token_ids == r2.token_ids


def test_chat_turns_reuse_the_conversation(model, model_dir):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    a = model.chat(msgs, max_tokens=8, **GREEDY)
    assert set(a) == {"role", "content", "reasoning_content", "tool_calls"} and a["role"] == "assistant"
    assert a.finish_reason in ("stop", "length") and a.usage["completion_tokens"] <= 8
    msgs2 = msgs + [{"role": "assistant", "content": a["content"] or "ok"}, {"role": "user", "content": "More"}]
    b = model.chat(msgs2, max_tokens=4, **GREEDY)
    prompt1 = model.tokenizer.encode(model.apply_chat_template(msgs))
    assert b.usage["cached_tokens"] >= prompt1.index(model.tokenizer.token_to_id("<|im_start|>"), 1)
    ids2 = model.tokenizer.encode(model.apply_chat_template(msgs2))
    want = cold_last_logits(model_dir, ids2)
    np.testing.assert_allclose(model._last_prompt_logits, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_stream_chat_deltas_join_to_chat(model):
    msgs = [{"role": "user", "content": "Say something"}]
    kw = dict(temperature=0.7, seed=5, max_tokens=16)
    whole = model.chat(msgs, **kw)
    parts = {"content": "", "reasoning_content": ""}
    finish = None
    for d in model.stream_chat(msgs, **kw):
        for k in parts:
            parts[k] += d.get(k, "")
        finish = d.get("finish_reason", finish)
    assert parts["content"] == whole["content"]
    assert parts["reasoning_content"] == (whole["reasoning_content"] or "")
    assert finish == whole.finish_reason


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def scripted(text):
    """A stand-in for the sampling loop that 'generates' text: chat's parsing and finish reasons are
    checked on text a random model would never write."""
    def run(model, prompt, params, **kw):
        yield GenerationChunk(text[:7], [1])
        yield GenerationChunk(text[7:], [2], "stop", {"prompt_tokens": len(prompt), "completion_tokens": 2,
                                                      "total_tokens": len(prompt) + 2, "cached_tokens": 0}, {})
    return run


@pytest.fixture
def roomy(model_dir):
    """The model with a context that holds a prompt with TOOLS (the scripted tests below run no model,
    but a prompt is refused when it does not fit the context, before any generation)."""
    return flashmoe.load(model_dir, context_length=1024, int8_activations=False)


def test_chat_returns_tool_calls(roomy, monkeypatch):
    import flashmoe.generation as g

    model = roomy

    call = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n" \
           "</parameter>\n</function>\n</tool_call>"
    monkeypatch.setattr(g, "run_generation", scripted("Let me check.\n" + call))
    msg = model.chat([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS, enable_thinking=False)
    assert msg.finish_reason == "tool_calls" and msg["content"] == "Let me check."
    (tc,) = msg["tool_calls"]
    assert tc["type"] == "function" and tc["function"]["name"] == "get_weather"
    assert tc["function"]["arguments"] == '{"city": "Paris", "days": 3}'
    deltas = list(model.stream_chat([{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                                    enable_thinking=False))
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d] == ["get_weather"]
    # malformed tool-call text comes back as content, and the answer is a plain stop
    monkeypatch.setattr(g, "run_generation", scripted("Sure <tool_call>\n<function=get_weather\noops"))
    msg = model.chat([{"role": "user", "content": "Weather?"}], tools=TOOLS, enable_thinking=False)
    assert msg.finish_reason == "stop" and msg["tool_calls"] == [] and "oops" in msg["content"]


def test_context_limit(model_dir):
    m = flashmoe.load(model_dir, context_length=32)
    with pytest.raises(ContextLengthError, match="the prompt has 40 tokens but the context holds 32"):
        m.generate(list(range(40)), max_tokens=4)
    r = m.generate(list(range(1, 26)), max_tokens=100, stop_token_ids=[], **GREEDY)
    assert r.finish_reason == "length" and len(r.token_ids) == 32 - 25 + 1 and m.position == 32
    r = m.generate(list(range(1, 33)), max_tokens=5, stop_token_ids=[], **GREEDY)  # fills it exactly
    assert r.finish_reason == "length" and len(r.token_ids) == 1


def test_bad_requests(model, tmp_path):
    with pytest.raises(ValueError, match="top_p"):
        model.generate("x", top_p=0)
    with pytest.raises(TypeError, match="unknown sampling option"):
        model.generate("x", temprature=0.5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([5, 10_000], max_tokens=1)
    with pytest.raises(ValueError, match="empty"):
        model.generate("", max_tokens=1)


def test_default_sampling_reads_generation_config(model_dir, tmp_path):
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**cfg, "temperature": 0.6, "top_k": 20, "top_p": 0.95}))
    p = flashmoe.load(d).default_sampling()
    assert (p.temperature, p.top_k, p.top_p) == (0.6, 20, 0.95)
    assert SamplingParams().temperature == 1.0


def test_response_prefix_forces_the_start_of_the_answer(roomy, monkeypatch):
    import flashmoe.generation as g

    model = roomy

    prefix = "<tool_call>\n<function=get_weather>\n"
    monkeypatch.setattr(g, "run_generation", scripted("<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"))
    for msg in (model.chat([{"role": "user", "content": "Weather?"}], tools=TOOLS, enable_thinking=False,
                           response_prefix=prefix),):
        assert msg.finish_reason == "tool_calls" and msg["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    deltas = list(model.stream_chat([{"role": "user", "content": "Weather?"}], tools=TOOLS, enable_thinking=False,
                                    response_prefix=prefix))
    calls = [d["tool_calls"][0]["function"] for d in deltas if "tool_calls" in d]
    assert calls == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    # the prefix is part of the prompt the engine runs
    seen = {}

    def capture(model_, prompt, params, **kw):
        seen["prompt"] = prompt
        yield from scripted("x")(model_, prompt, params)

    monkeypatch.setattr(g, "run_generation", capture)
    model.chat([{"role": "user", "content": "Weather?"}], enable_thinking=False, response_prefix="Sure")
    text = model.apply_chat_template([{"role": "user", "content": "Weather?"}], enable_thinking=False) + "Sure"
    assert seen["prompt"] == model.tokenizer.encode(text)


def test_the_result_says_which_stop_ended_it(model):
    ref = model.generate("Tell me a story", max_tokens=24, stop_token_ids=[], **GREEDY)
    stop = ref.text[len(ref.text) // 2: len(ref.text) // 2 + 3]
    r = model.generate("Tell me a story", max_tokens=24, stop=["zzzz", stop], stop_token_ids=[], **GREEDY)
    assert r.finish_reason == "stop" and r.stop == stop
    r = model.generate("Tell me a story", max_tokens=24, stop_token_ids=[ref.token_ids[2]], **GREEDY)
    assert r.finish_reason == "stop" and r.stop == ref.token_ids[2]
    assert model.generate("Tell me a story", max_tokens=3, stop_token_ids=[], **GREEDY).stop is None
