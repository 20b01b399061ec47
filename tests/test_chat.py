"""Chat templates against transformers' apply_chat_template, and tool-call / reasoning parsing, at once
and streamed."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest

from flashmoe.chat import ChatTemplateError, render_chat_template
from flashmoe.tokenizer import Tokenizer
from flashmoe.tool_calls import (ChatStreamParser, convert_argument, parse_chat_response, parse_tool_calls,
                                 prompt_opens_think, split_reasoning)
from text_fixtures import TEMPLATES, write_tokenizer

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Météo d'une ville — returns <json> & more",
        "parameters": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string", "description": "城市"},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
        }}}},
    {"type": "function", "function": {
        "name": "run_code", "description": "Run Python.",
        "parameters": {"type": "object", "properties": {
            "code": {"type": "string"},
            "timeout": {"type": "number"},
            "options": {"type": "object"},
            "files": {"type": "array", "items": {"type": "string"}},
            "note": {"type": ["string", "null"]},
        }}}},
]

CODE = "if a < b:\n    print('<x>', \"</y>\")\n"


def _call(name, args, string_args=True):
    return {"id": "call_1", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args) if string_args else args}}


def _conversation(string_args=True):
    """A tool-using exchange: parallel calls whose arguments are JSON strings (OpenAI's shape) or dicts."""
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris, and run my code?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "Two tools needed.",
         "tool_calls": [_call("get_weather", {"city": "Paris", "days": 3, "metric": True}, string_args),
                        _call("run_code", {"code": CODE, "timeout": 2.5, "options": {"o": [1, "é"]},
                                           "files": ["a.py"]}, string_args)]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21°C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "<x> </y>"},
        {"role": "assistant", "content": "Sunny; the code printed tags.", "reasoning_content": "Done."},
        {"role": "user", "content": "Thanks! 中文?"},
        {"role": "assistant", "content": None, "reasoning_content": "Only a call.",
         "tool_calls": [_call("get_weather", {"city": "北京"}, string_args)]},
    ]


CHATS = {
    "plain": ([{"role": "user", "content": "Hello 😀"}], None),
    "system": ([{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}], None),
    "multi_turn": ([{"role": "system", "content": "S"}, {"role": "user", "content": "one"},
                    {"role": "assistant", "content": "<think>\nold thought\n</think>\n\nreply one"},
                    {"role": "user", "content": "two"}], None),
    "tools": ([{"role": "user", "content": "What can you do?"}], TOOLS),
    "tools_and_system": ([{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Go"}], TOOLS),
    "tool_calls": (None, TOOLS),  # _conversation()
    "tool_calls_no_tools": (None, None),
}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def pair(request, tmp_path_factory):
    """(flashmoe Tokenizer, transformers tokenizer) of one template."""
    transformers = pytest.importorskip("transformers")
    d = write_tokenizer(tmp_path_factory.mktemp(request.param), template=request.param)
    return request.param, Tokenizer.from_dir(d), transformers.AutoTokenizer.from_pretrained(d)


@pytest.mark.torch
@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(pair, chat, enable_thinking, add_generation_prompt):
    name, tok, hf = pair
    messages, tools = CHATS[chat]
    ours_messages = messages if messages is not None else _conversation(string_args=True)
    hf_messages = messages if messages is not None else _conversation(string_args=False)
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    want = hf.apply_chat_template(hf_messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                  tokenize=False, **kwargs)
    before = copy.deepcopy(ours_messages)
    got = tok.apply_chat_template(ours_messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                  enable_thinking=enable_thinking)
    assert got == want
    assert ours_messages == before  # the caller's messages are not modified
    assert render_chat_template(TEMPLATES[name], ours_messages, tools=tools,
                                add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking,
                                eos_token="<|im_end|>") == want


@pytest.mark.torch
def test_render_details(pair):
    name, tok, _ = pair
    prompt = tok.apply_chat_template(_conversation(), tools=TOOLS)
    assert "Météo d'une ville — returns <json> & more" in prompt  # tojson keeps non-ASCII and <, &
    if name == "qwen3.5":
        assert "<parameter=days>\n3\n</parameter>" in prompt  # the JSON-string arguments were decoded
        assert prompt.endswith("<|im_start|>assistant\n<think>\n") and prompt_opens_think(prompt)
        assert not prompt_opens_think(tok.apply_chat_template(_conversation(), enable_thinking=False))
    else:
        assert '"arguments": {"city": "Paris", "days": 3, "metric": true}}' in prompt
        assert not prompt_opens_think(prompt)


def test_template_errors():
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(ChatTemplateError, match="system message must come first"):
        render_chat_template(TEMPLATES["qwen3.5"], messages)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for m in messages %}{{ m.content }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="empty conversation"):
        render_chat_template(TEMPLATES["qwen3.5"], [])
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages[0].__class__.__mro__ }}", [{"role": "user", "content": "x"}])


def test_template_environment():
    t = ("{{ messages[0].content | tojson }}|{{ {'a': [1, 2]} | tojson(indent=2) }}|"
         "{{ [1, 2] | tojson(separators=(',', ':')) }}|{% for i in range(5) %}{% if i == 2 %}{% break %}"
         "{% endif %}{{ i }}{% endfor %}|{{ strftime_now('%Y') | length }}|{{ enable_thinking is defined }}"
         "|{{ custom }}")
    out = render_chat_template(t, [{"role": "user", "content": "é<&>'"}], custom="X")
    assert out == '"é<&>\'"|{\n  "a": [\n    1,\n    2\n  ]\n}|[1,2]|01|4|False|X'
    t2 = "{{ enable_thinking }}{% if x is defined %}{{ x }}{% endif %}\n  {% if true %}\n  y{% endif %}"
    assert render_chat_template(t2, [{"role": "user", "content": ""}], enable_thinking=False, x=None) == "False  y"


# ---- parsing ----------------------------------------------------------------------------------------

def xml_call(name, **params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def json_call(name, args):
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "\n</tool_call>"


def _args(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_xml_single_typed():
    text = xml_call("get_weather", city="Paris", days="3", metric="true")
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "" and _args(calls) == [("get_weather", {"city": "Paris", "days": 3, "metric": True})]
    c = calls[0]
    assert re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) and c["type"] == "function"
    assert isinstance(c["function"]["arguments"], str)


def test_xml_parallel_typed():
    text = ("I'll run both.\n\n" + xml_call("get_weather", city="New York", days="2") + "\n"
            + xml_call("run_code", code="\n" + CODE, timeout="2.5", options='{"o": [1, "é"]}',
                       files="['a.py', 'b.py']", note="null") + "\n")
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "I'll run both."
    assert _args(calls) == [("get_weather", {"city": "New York", "days": 2}),
                            ("run_code", {"code": "\n" + CODE, "timeout": 2.5, "options": {"o": [1, "é"]},
                                          "files": ["a.py", "b.py"], "note": None})]  # one newline stripped
    assert '"é"' in calls[1]["function"]["arguments"]  # ensure_ascii=False
    assert len({c["id"] for c in calls}) == 2


def test_argument_conversion():
    assert convert_argument("42", {"type": "integer"}) == 42
    assert convert_argument("4.0", {"type": "integer"}) == 4
    assert convert_argument("four", {"type": "integer"}) == "four"
    assert convert_argument("-1.5e3", {"type": "number"}) == -1500.0
    assert convert_argument("7", {"type": "number"}) == 7
    assert convert_argument("False", {"type": "boolean"}) is False
    assert convert_argument("maybe", {"type": "boolean"}) == "maybe"
    assert convert_argument("null", {"type": "null"}) is None
    assert convert_argument("[1, 2]", {"type": "array"}) == [1, 2]
    assert convert_argument("{'a': True}", {"type": "object"}) == {"a": True}
    assert convert_argument("{broken", {"type": "object"}) == "{broken"
    assert convert_argument("42", {"type": "string"}) == "42"
    assert convert_argument("null", {"type": "string"}) == "null"
    assert convert_argument("5", {"anyOf": [{"type": "integer"}, {"type": "null"}]}) == 5
    assert convert_argument("abc", {"type": ["integer", "string"]}) == "abc"
    assert convert_argument("[3]", None) == [3]  # untyped: JSON if it is JSON
    assert convert_argument("Paris", None) == "Paris"


def test_json_form():
    text = json_call("get_weather", {"city": "Paris", "days": 3}) + "\n" + json_call("run_code", {"code": CODE})
    content, calls = parse_tool_calls(text)
    assert content == "" and _args(calls) == [("get_weather", {"city": "Paris", "days": 3}),
                                              ("run_code", {"code": CODE})]
    # arguments as a JSON string and under "parameters" are accepted too
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call><tool_call>{"name": "g", "parameters": {}}</tool_call>'
    assert _args(parse_tool_calls(text)[1]) == [("f", {"x": 1}), ("g", {})]


def test_mixed_content_and_calls():
    text = "Checking.\n" + json_call("get_weather", {"city": "Oslo"}) + "\nMeanwhile, " + xml_call(
        "get_weather", city="Rome") + "\n done."
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Checking.\n\nMeanwhile, \n done."
    assert _args(calls) == [("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Rome"})]
    assert parse_tool_calls("  just text, a < b  \n") == ("just text, a < b", [])
    assert parse_tool_calls("") == ("", [])


MALFORMED = [
    "Sure.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis",  # never closed
    '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>',  # bad JSON
    '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
    "<tool_call>\n<function=get_weather\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
    "<tool_call>\n<function=f>\n<parameter=x\nParis\n</parameter>\n</function>\n</tool_call>",
    "<tool_call>\nhello\n</tool_call>",
    "<tool_call></tool_call>",
    "text <tool_call",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_becomes_content(text):
    assert parse_tool_calls(text, TOOLS) == (text.strip(), [])


def test_malformed_next_to_good():
    bad = '<tool_call>\n{"name": oops}\n</tool_call>'
    content, calls = parse_tool_calls("A " + bad + " B " + xml_call("get_weather", city="X"), TOOLS)
    assert content == "A " + bad + " B" and _args(calls) == [("get_weather", {"city": "X"})]


def test_unknown_tool_and_parameter():
    text = xml_call("launch", count="3", target="moon", cfg='{"a": 1}') + xml_call("get_weather", city="7", extra="8")
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "" and _args(calls) == [("launch", {"count": 3, "target": "moon", "cfg": {"a": 1}}),
                                              ("get_weather", {"city": "7", "extra": 8})]


def test_xml_lenient_closing_tags():
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</tool_call>"
    assert _args(parse_tool_calls(text, TOOLS)[1]) == [("get_weather", {"city": "Paris"})]


def test_split_reasoning():
    assert split_reasoning("I should check.\n</think>\n\nThe answer.", True) == ("I should check.", "The answer.")
    assert split_reasoning("still thinking, cut by max_tokens", True) == ("still thinking, cut by max_tokens", "")
    assert split_reasoning("\n</think>\n\nQuick.", True) == ("", "Quick.")
    assert split_reasoning("<think>\nhmm\n</think>\n\nHi", False) == ("hmm", "Hi")
    assert split_reasoning("\n<think>\nhmm", False) == ("hmm", "")
    assert split_reasoning(" Hi <think>", False) == (None, "Hi <think>")
    r = parse_chat_response("plan\n</think>\n\nOK.\n" + xml_call("get_weather", city="Paris"), TOOLS, True)
    assert (r["reasoning_content"], r["content"]) == ("plan", "OK.")
    assert _args(r["tool_calls"]) == [("get_weather", {"city": "Paris"})]


# ---- streaming ----------------------------------------------------------------------------------------

STREAM_CASES = [  # (text, prompt_opened_think, well_formed)
    ("Hello there, a < b and c > d.", False, True),
    (xml_call("get_weather", city="Paris", days="3", metric="false"), False, True),
    ("Let me look.\n\n" + xml_call("get_weather", city="Paris") + "\n" + xml_call(
        "run_code", code=CODE, options='{"k": "<v>"}') + "\nDone <b>bold</b>", False, True),
    (json_call("get_weather", {"city": "中文", "days": 1}) + json_call("run_code", {"code": CODE}), False, True),
    ("The user wants weather.\nCall the tool.\n</think>\n\n" + xml_call("get_weather", city="Oslo"), True, True),
    ("thinking about <tool_call> inside reasoning", True, True),
    ("\n<think>\nhmm 🎉\n</think>\n\nAnswer: 42 😀", False, True),
    ("\n</think>\n\n" + json_call("get_weather", {"city": "A"}) + "  ", True, True),
    ("   ", False, True),
    ("", True, True),
] + [(t, False, False) for t in MALFORMED] + [
    ("ok\n</think>\nA " + '<tool_call>{"name": 1}</tool_call>' + " B " + xml_call("get_weather", city="X"), True, False),
    ("<thinker>is content", False, False),
    ("<think", False, False),
    ("<tool_call>\n" + xml_call("get_weather", city="Paris"), False, False),
]


def _one_shot(text, opened):
    r = parse_chat_response(text, TOOLS, opened)
    return r["reasoning_content"] or "", r["content"], _args(r["tool_calls"])


def _streamed(pieces, opened):
    parser = ChatStreamParser(TOOLS, prompt_opened_think=opened)
    deltas = [d for p in pieces for d in parser.feed(p)] + parser.finish()
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == list(range(len(calls)))
    assert all(len(d) == 1 for d in deltas) and all(next(iter(d.values())) for d in deltas)
    return (reasoning, content, _args(calls)), deltas


@pytest.mark.parametrize("case", range(len(STREAM_CASES)))
def test_stream_matches_one_shot(case):
    text, opened, well_formed = STREAM_CASES[case]
    want = _one_shot(text, opened)
    splits = [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]
    rng = random.Random(case)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randrange(1, 8)))) if len(text) > 1 else []
        splits.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    for pieces in splits:
        got, deltas = _streamed(pieces, opened)
        assert got == want, pieces
        if well_formed:
            for d in deltas:
                for tag in ("<tool_call", "</tool_call", "<think", "</think"):
                    assert tag not in d.get("content", "")
                assert "</think" not in d.get("reasoning_content", "")


def test_stream_emits_calls_when_closed():
    parser = ChatStreamParser(TOOLS)
    call = xml_call("get_weather", city="Paris")
    assert parser.feed("Hi " + call[:-3]) == [{"content": "Hi"}]
    out = parser.feed(call[-3:] + " more")
    assert [list(d) for d in out] == [["tool_calls"], ["content"]] and out[1]["content"] == "  more"
    c = out[0]["tool_calls"][0]
    assert c["index"] == 0 and c["type"] == "function" and c["id"].startswith("call_")
    assert c["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert parser.finish() == []
