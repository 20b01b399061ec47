"""Reading a chat model's output: reasoning, content and tool calls, at once or as it streams.

The Qwen3.5 / Qwen3-Next family writes tool calls in one of two forms, both inside <tool_call> tags:

    <tool_call>                              <tool_call>
    <function=get_weather>                   {"name": "get_weather", "arguments": {"city": "Paris"}}
    <parameter=city>                         </tool_call>
    Paris
    </parameter>
    </function>
    </tool_call>

the XML form (Qwen3.5, Qwen3-Coder), whose argument values are bare text typed here by the tool's JSON
schema, and the JSON form (Qwen3-Next, Hermes). Both are always accepted. Thinking models put their
reasoning before a </think>; with this family's templates the prompt itself ends in "<think>\\n", so the
output holds only the closing tag.

Nothing here raises on bad model output: a tool-call block that cannot be read is returned as content.
"""

from __future__ import annotations

import ast
import json
import secrets
from collections.abc import Mapping, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_FUNC, _FUNC_END = "<function=", "</function>"
_PARAM, _PARAM_END = "<parameter=", "</parameter>"
_STRING_TYPES = ("string", "str", "text", "varchar", "char")


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def prompt_opens_think(prompt: str) -> bool:
    """Whether a rendered prompt leaves a think block open (Qwen3.5 with thinking on, Qwen3-Next
    Thinking), so the model's output starts inside the reasoning; pass it to split_reasoning."""
    text = prompt.rstrip()
    return text.endswith(THINK_OPEN)


# ---- argument typing (XML form) ---------------------------------------------------------------

def _schemas(tools: Sequence[Mapping] | None) -> dict[str, dict]:
    """Function name -> its parameters' properties, from OpenAI tool dicts (bare functions accepted)."""
    out: dict[str, dict] = {}
    for tool in tools or ():
        if not isinstance(tool, Mapping):
            continue
        fn = tool.get("function", tool)
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, Mapping) else None
            out[fn["name"]] = dict(props) if isinstance(props, Mapping) else {}
    return out


def _types(schema) -> list[str]:
    if not isinstance(schema, Mapping):
        return []
    t = schema.get("type")
    if isinstance(t, str):
        return [t.lower()]
    if isinstance(t, list):
        return [x.lower() for x in t if isinstance(x, str)]
    for key in ("anyOf", "oneOf"):  # {"anyOf": [{"type": "integer"}, {"type": "null"}]}
        if isinstance(schema.get(key), list):
            return [x for sub in schema[key] for x in _types(sub)]
    return []


_MISSING = object()


def _as(kind: str, text: str):
    """`text` read as JSON-schema type `kind`, or _MISSING when it does not read as one."""
    s = text.strip()
    if kind in ("integer", "int"):
        try:
            return int(s)
        except ValueError:
            try:
                f = float(s)
            except ValueError:
                return _MISSING
            return int(f) if f.is_integer() else _MISSING
    if kind in ("number", "float", "double"):
        try:
            v = json.loads(s)
        except ValueError:
            try:
                return float(s)
            except ValueError:
                return _MISSING
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else _MISSING
    if kind in ("boolean", "bool"):
        return {"true": True, "false": False}.get(s.lower(), _MISSING)
    if kind == "null":
        return None if s.lower() in ("null", "none") else _MISSING
    if kind in ("object", "array", "dict", "list"):
        want = dict if kind in ("object", "dict") else list
        for read in (json.loads, ast.literal_eval):  # models sometimes write Python literals
            try:
                v = read(s)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(v, want):
                return v
        return _MISSING
    return _MISSING


def convert_argument(value: str, schema) -> object:
    """An XML-form argument's text as the type its JSON schema declares.

    string types keep the text; integer, number, boolean, null, object and array are read as such
    (object/array as JSON, else as a Python literal); a value that does not read as its declared type,
    or an untyped/unknown parameter, is read as JSON if it is JSON and kept as text otherwise.
    """
    types = _types(schema)
    if types and all(t in _STRING_TYPES or t == "null" for t in types):
        if "null" in types and value.strip() == "null":
            return None
        return value
    for t in types:
        if t in _STRING_TYPES:
            continue
        v = _as(t, value)
        if v is not _MISSING:
            return v
    if any(t in _STRING_TYPES for t in types):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


# ---- one tool-call block ----------------------------------------------------------------------

def _parse_json_block(body: str) -> list[tuple[str, dict]] | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # arguments encoded twice
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if args is None:
        args = {}
    return [(obj["name"], args)] if isinstance(args, dict) else None


def _strip_one_newline(value: str) -> str:
    if value.startswith("\n"):
        value = value[1:]
    if value.endswith("\n"):
        value = value[:-1]
    return value


def _tag_name(text: str, start: int) -> tuple[str, int] | None:
    """The name of an opening tag such as <function=NAME> whose name begins at start, and the index of its
    '>'; None if the tag is unterminated or the name empty or spread over lines."""
    gt = text.find(">", start)
    if gt < 0:
        return None
    name = text[start:gt].strip()
    if not name or "\n" in name or "<" in name:
        return None
    return name, gt


def _parse_xml_block(body: str, schemas: dict[str, dict]) -> list[tuple[str, dict]] | None:
    calls = []
    pos = body.find(_FUNC)
    if pos < 0 or body[:pos].strip():
        return None
    while pos >= 0:
        tag = _tag_name(body, pos + len(_FUNC))
        if tag is None:
            return None
        name, gt = tag
        end = body.find(_FUNC_END, gt)
        fbody = body[gt + 1:] if end < 0 else body[gt + 1:end]  # a missing </function> is forgiven
        props = schemas.get(name, {})
        args: dict = {}
        p = fbody.find(_PARAM)
        while p >= 0:
            ptag = _tag_name(fbody, p + len(_PARAM))
            if ptag is None:
                return None
            pname, pgt = ptag
            pend = fbody.find(_PARAM_END, pgt)
            value = fbody[pgt + 1:] if pend < 0 else fbody[pgt + 1:pend]  # so is the last </parameter>
            args[pname] = convert_argument(_strip_one_newline(value), props.get(pname))
            if pend < 0:
                break
            p = fbody.find(_PARAM, pend + len(_PARAM_END))
        calls.append((name, args))
        if end < 0:
            break
        nxt = body.find(_FUNC, end + len(_FUNC_END))
        if nxt >= 0 and body[end + len(_FUNC_END):nxt].strip():
            return None
        pos = nxt
    return calls


def _parse_block(body: str, schemas: dict[str, dict]) -> list[dict] | None:
    """The OpenAI tool calls in the text between <tool_call> and </tool_call>, or None if unreadable."""
    calls = _parse_json_block(body) if body.lstrip().startswith("{") else _parse_xml_block(body, schemas)
    if not calls:
        return None
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
            for name, args in calls]


# ---- whole responses ----------------------------------------------------------------------------

def parse_tool_calls(text: str, tools: Sequence[Mapping] | None = None) -> tuple[str, list[dict]]:
    """Split a response into its content and its tool calls.

    Returns (content, tool_calls): content is the text outside the readable <tool_call> blocks, stripped
    ("" when there is none: never None, so callers need not check), tool_calls are OpenAI-shaped
    {"id": "call_…", "type": "function", "function": {"name", "arguments": JSON string}}, in order.
    tools (OpenAI tool dicts) type the XML form's arguments by their JSON schema; unknown tools and
    parameters are still returned, their values read as JSON where they are JSON. A block that cannot be
    read (bad JSON, no name, `<function=` without `>`) or is never closed stays in content verbatim.
    """
    schemas = _schemas(tools)
    content: list[str] = []
    calls: list[dict] = []
    pos = 0
    while True:
        start = text.find(TOOL_OPEN, pos)
        if start < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        end = text.find(TOOL_CLOSE, start + len(TOOL_OPEN))
        if end < 0:
            content.append(text[start:])
            break
        parsed = _parse_block(text[start + len(TOOL_OPEN):end], schemas)
        if parsed is None:
            content.append(text[start:end + len(TOOL_CLOSE)])
        else:
            calls += parsed
        pos = end + len(TOOL_CLOSE)
    return "".join(content).strip(), calls


def split_reasoning(text: str, prompt_opened_think: bool) -> tuple[str | None, str]:
    """Split a response into (reasoning_content, content), both stripped.

    prompt_opened_think: the prompt ended inside a think block (see prompt_opens_think), so everything
    up to the first </think> is reasoning. Otherwise reasoning is present only when the output itself
    starts with <think>, and is None when there is none. A think block never closed (output cut by
    max_tokens while thinking) is all reasoning, with content "".
    """
    if prompt_opened_think:
        body = text
    else:
        lead = text.lstrip()
        if not lead.startswith(THINK_OPEN):
            return None, text.strip()
        body = lead[len(THINK_OPEN):]
    end = body.find(THINK_CLOSE)
    if end < 0:
        return body.strip(), ""
    return body[:end].strip(), body[end + len(THINK_CLOSE):].strip()


def parse_chat_response(text: str, tools: Sequence[Mapping] | None = None,
                        prompt_opened_think: bool = False) -> dict:
    """The OpenAI assistant message of a whole response: {"role", "content", "reasoning_content",
    "tool_calls"} (reasoning None when there is none, tool_calls [] when there are none)."""
    reasoning, rest = split_reasoning(text, prompt_opened_think)
    content, calls = parse_tool_calls(rest, tools)
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}


# ---- streaming ------------------------------------------------------------------------------------

def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class _Strip:
    """Streams text with the ends stripped: leading whitespace dropped, trailing whitespace held until
    more text follows it, so the pieces join to "".join(all).strip()."""

    def __init__(self):
        self.started = False
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.held + text
        out = text.rstrip()
        self.held = text[len(out):]
        return out


class ChatStreamParser:
    """The streaming counterpart of split_reasoning + parse_tool_calls, fed text as it is detokenized.

    feed(delta) and finish() return OpenAI chat-completion delta dicts: {"reasoning_content": str},
    {"content": str}, and {"tool_calls": [{"index", "id", "type": "function", "function": {"name",
    "arguments"}}]} once a call's </tool_call> has arrived (each call whole, arguments a JSON string).
    Text that may be the start of a tag is held until it is known, so no tag fragment reaches content
    or reasoning; joined, the deltas equal the one-shot results (call ids aside). A block still open or
    unreadable at finish() comes out as content, as in parse_tool_calls.
    """

    def __init__(self, tools: Sequence[Mapping] | None = None, prompt_opened_think: bool = False):
        self._schemas = _schemas(tools)
        self._state = "think" if prompt_opened_think else "start"
        self._buf = ""
        self._reasoning = _Strip()
        self._content = _Strip()
        self._index = 0
        self._scanned = 0
        self._out: list[dict] = []

    def _emit(self, key: str, text: str) -> None:
        if not text:
            return
        if self._out and list(self._out[-1]) == [key]:
            self._out[-1][key] += text
        else:
            self._out.append({key: text})

    def _step(self, final: bool) -> None:
        """Consume as much of the buffer as can be decided."""
        while True:
            buf = self._buf
            if self._state == "start":
                lead = buf.lstrip()
                if lead.startswith(THINK_OPEN):
                    self._buf, self._state = lead[len(THINK_OPEN):], "think"
                elif (not lead or THINK_OPEN.startswith(lead)) and not final:
                    return
                else:
                    self._state = "text"
            elif self._state == "think":
                end = buf.find(THINK_CLOSE)
                if end >= 0:
                    self._emit("reasoning_content", self._reasoning.feed(buf[:end]))
                    self._buf, self._state = buf[end + len(THINK_CLOSE):], "text"
                    continue
                keep = 0 if final else _partial_suffix(buf, THINK_CLOSE)
                self._emit("reasoning_content", self._reasoning.feed(buf[:len(buf) - keep]))
                self._buf = buf[len(buf) - keep:]
                return
            elif self._state == "text":
                start = buf.find(TOOL_OPEN)
                if start >= 0:
                    self._emit("content", self._content.feed(buf[:start]))
                    self._buf, self._state = buf[start:], "tool"
                    continue
                keep = 0 if final else _partial_suffix(buf, TOOL_OPEN)
                self._emit("content", self._content.feed(buf[:len(buf) - keep]))
                self._buf = buf[len(buf) - keep:]
                return
            else:  # "tool": the buffer starts with <tool_call>
                end = buf.find(TOOL_CLOSE, max(len(TOOL_OPEN), self._scanned - len(TOOL_CLOSE) + 1))
                if end < 0:
                    self._scanned = len(buf)  # a long call is searched once, not once per delta
                    if final:
                        self._emit("content", self._content.feed(buf))
                        self._buf = ""
                    return
                block = buf[:end + len(TOOL_CLOSE)]
                calls = _parse_block(block[len(TOOL_OPEN):end], self._schemas)
                if calls is None:
                    self._emit("content", self._content.feed(block))
                else:
                    for call in calls:
                        call["index"] = self._index
                        self._index += 1
                    self._out.append({"tool_calls": calls})
                self._buf, self._state, self._scanned = buf[len(block):], "text", 0

    def feed(self, delta: str) -> list[dict]:
        self._buf += delta
        self._step(final=False)
        out, self._out = self._out, []
        return out

    def finish(self) -> list[dict]:
        """The deltas still held back; call once, after the last feed."""
        self._step(final=True)
        out, self._out = self._out, []
        return out
