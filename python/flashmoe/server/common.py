"""What the OpenAI and Anthropic front ends share: errors, request reading, sampling options, the
post-processing of Model.stream_chat deltas, and running a job while watching for the client leaving."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import secrets
import time

from ..errors import ContextLengthError, FlashMoEError, FormatError, MemoryBudgetError, ReadError
from ..tool_calls import TOOL_OPEN, parse_tool_calls


class APIError(Exception):
    """An error answered in the API's own JSON shape. kind: the OpenAI error type / Anthropic error type
    is derived from status unless given."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def engine_error(exc: BaseException, prompt_param: str = "messages") -> APIError:
    """An exception from the engine as an APIError: what the request asked wrongly 400 (a prompt over the
    context, a template refusing the messages, a bad argument), the server's own failures 500 with what
    failed. The requests' fields are checked before they reach the engine, so a 400 from here is about
    the prompt (prompt_param names its field)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, ReadError):
        return APIError(500, f"the engine could not read the model's files: {exc}", code="read_error")
    if isinstance(exc, FormatError):
        # at run time this is an expert that failed its checksum (the files are corrupt); a server
        # without a tokenizer or chat template refuses text requests before they get here
        return APIError(500, f"the model's files failed a check: {exc}", code="model_error")
    if isinstance(exc, MemoryBudgetError):
        return APIError(500, f"the engine ran out of memory: {exc}", code="model_error")
    if isinstance(exc, ValueError):  # ChatTemplateError, a token id outside the vocabulary...
        return APIError(400, str(exc), param=prompt_param)
    if isinstance(exc, FlashMoEError):
        return APIError(500, f"the engine failed: {exc}", code="model_error")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def require_tokenizer(model, chat: bool = True) -> None:
    """400 for a text request to a model without a tokenizer (or, for chat, without a chat template)."""
    tok = model.tokenizer
    if tok is None:
        raise bad("this model has no tokenizer (no tokenizer.json in its directory): only /v1/completions "
                  "with a prompt of token ids is served")
    if chat and tok.chat_template is None:
        raise bad("this model's tokenizer has no chat template: only /v1/completions is served")


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def now() -> int:
    return int(time.time())


async def read_json(request, max_bytes: int) -> dict:
    """The request's JSON object body; 413 past max_bytes (by Content-Length, or while reading a chunked
    body), 400 when it is not a JSON object."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise bad("invalid Content-Length header") from None
        if n > max_bytes:
            raise APIError(413, f"request body of {n} bytes is larger than the limit of {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body is larger than the limit of {max_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise bad("the request body is empty: send a JSON object")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad(f"the request body must be a JSON object, got {type(data).__name__}")
    return data


# ---- typed fields ------------------------------------------------------------------------------


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def get_number(body: dict, name: str, lo: float | None = None, hi: float | None = None):
    v = body.get(name)
    if v is None:
        return None
    if not _is_num(v):
        raise bad(f"'{name}' must be a number, got {json.dumps(v)}", param=name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"'{name}' must be in [{lo}, {hi}], got {v}", param=name)
    return v


def get_int(body: dict, name: str, lo: int | None = None):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(f"'{name}' must be an integer, got {json.dumps(v)}", param=name)
    if lo is not None and v < lo:
        raise bad(f"'{name}' must be >= {lo}, got {v}", param=name)
    return v


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {json.dumps(v)}", param=name)
    return v


def get_stop(body: dict, name: str) -> list[str]:
    v = body.get(name)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad(f"'{name}' must be a string or a list of strings", param=name)
    return [s for s in v if s]


@dataclasses.dataclass
class ServerConfig:
    model_name: str
    max_tokens_limit: int
    max_body_bytes: int
    api_key: str | None = None


def max_tokens_of(body: dict, names: tuple[str, ...], cfg: ServerConfig, required: bool = False) -> int:
    """The request's max_tokens (first of `names` given): >= 1 and <= the server's limit, else 400."""
    for name in names:
        if body.get(name) is not None:
            v = body[name]
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(f"'{name}' must be an integer, got {json.dumps(v)}", param=name)
            if v < 1:
                raise bad(f"'{name}' must be at least 1, got {v}", param=name, code="invalid_value")
            if v > cfg.max_tokens_limit:
                raise bad(
                    f"'{name}' is {v}, above this server's limit of {cfg.max_tokens_limit}",
                    param=name,
                    code="invalid_value",
                )
            return v
    if required:
        raise bad(f"'{names[0]}' is required", param=names[0])
    return cfg.max_tokens_limit


def sampling_params(defaults, max_tokens: int, stop: list[str], **fields):
    """The model's default SamplingParams with the request's fields (None = not given) over them;
    400 naming the first bad one."""
    given = {k: v for k, v in fields.items() if v is not None}
    params = dataclasses.replace(defaults, max_tokens=max_tokens, stop=stop, **given)
    try:
        return params.validate()
    except ValueError as e:  # its message starts with the field's name
        raise bad(str(e), param=re.match(r"\w*", str(e)).group()) from None


def check_model(body: dict, cfg: ServerConfig) -> None:
    name = body.get("model")
    if name is None:
        return
    if not isinstance(name, str):
        raise bad("'model' must be a string", param="model")
    if name != cfg.model_name:
        raise APIError(
            404,
            f"The model '{name}' does not exist; this server serves '{cfg.model_name}'",
            param="model",
            code="model_not_found",
        )


def text_of(content, where: str) -> str:
    """A message content given as a string or a list of text parts / blocks, as one string. where:
    the content's place in the request ("messages[2]", "system"), which names the field of an error."""
    param = re.match(r"\w*", where).group()
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
                continue
            if not isinstance(part, dict):
                raise bad(f"{where}: a content part must be an object", param=param)
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text"):
                if not isinstance(part.get("text"), str):
                    raise bad(f"{where}: a text part needs 'text' as a string", param=param)
                out.append(part["text"])
            else:
                raise bad(f"{where}: content of type {kind!r} is not supported (text only)", param=param)
        return "".join(out)
    raise bad(f"{where}: content must be a string or a list of parts", param=param)


# ---- chat jobs -----------------------------------------------------------------------------------


def uses_xml_calls(model) -> bool:
    """Whether the model's template teaches the Qwen3.5 XML call form (else the JSON / Hermes form)."""
    template = getattr(model.tokenizer, "chat_template", None) or ""
    return "<function=" in template


def forced_prefix(model, name: str | None) -> str:
    """The answer's start that forces a tool call (name: that function; None: any)."""
    if name is None:
        return "<tool_call>\n"
    if uses_xml_calls(model):
        return f"<tool_call>\n<function={name}>\n"
    return '<tool_call>\n{"name": ' + json.dumps(name) + ', "arguments": '


@dataclasses.dataclass
class ChatJob:
    """What a chat request asks the engine for, after translation from the API's shape."""

    messages: list
    tools: list | None  # tools as rendered into the prompt (None: no tools)
    parse_tools: list | None  # tools the output's calls are typed by
    params: object  # SamplingParams
    enable_thinking: bool | None = None
    template_kwargs: dict | None = None
    response_prefix: str | None = None
    drop_tool_calls: bool = False  # tool_choice "none": calls are not returned
    single_tool_call: bool = False  # parallel_tool_calls false / disable_parallel_tool_use
    count_prompt: bool = False  # first item: {"prompt_tokens": n} (Anthropic's message_start)

    def work(self, model):
        """The function the engine runs: yields stream_chat deltas (the last one says which stop ended it)."""

        def run(job):
            if self.count_prompt:
                text = model.apply_chat_template(
                    self.messages, self.tools, True, self.enable_thinking, **(self.template_kwargs or {})
                )
                # _encode_prompt: a prompt too long for the context fails here, before tokenizing
                n = len(model._encode_prompt(text + (self.response_prefix or ""), "chat"))
                del text  # not held while the whole answer is generated
                yield {"prompt_tokens": n}
            for d in model.stream_chat(
                self.messages,
                tools=self.tools,
                enable_thinking=self.enable_thinking,
                sampling=self.params,
                template_kwargs=self.template_kwargs,
                response_prefix=self.response_prefix,
                progress=job.progress,
            ):
                yield d

        return run


class DeltaFilter:
    """Post-processes stream_chat deltas for the API: drops tool calls (tool_choice none), keeps only the
    first (no parallel calls), and returns a last tool call left unclosed (cut off by max_tokens or a
    stop string, or the model ending its turn without </tool_call>) as a call when it reads as one, as
    OpenAI returns a call cut off by max_tokens (the stream parser gives an unclosed <tool_call> block
    back as content)."""

    def __init__(self, job: ChatJob):
        self.job = job
        self.held: dict | None = None
        self.n_calls = 0
        self.stop_string: str | None = None

    def feed(self, d: dict) -> list[dict]:
        out = []
        if self.held is not None:
            held, self.held = self.held, None
            if "finish_reason" in d:
                out += self._recover(held["content"])
            else:
                out.append(held)
        if "content" in d and TOOL_OPEN in d["content"] and not self.job.drop_tool_calls:
            self.held = d
            return out
        if "tool_calls" in d:
            calls = d["tool_calls"]
            if self.job.drop_tool_calls:
                return out
            if self.job.single_tool_call:
                calls = calls[: max(0, 1 - self.n_calls)]
            if not calls:
                return out
            calls = [{**c, "index": self.n_calls + i} for i, c in enumerate(calls)]
            self.n_calls += len(calls)
            out.append({"tool_calls": calls})
            return out
        if "finish_reason" in d:
            d = dict(d)
            if d["finish_reason"] == "tool_calls" and self.n_calls == 0:
                d["finish_reason"] = "stop"
            elif d["finish_reason"] == "stop" and self.n_calls and not self.job.drop_tool_calls:
                d["finish_reason"] = "tool_calls"  # a call recovered from an unclosed block
            # the stop string that ended it (Anthropic's stop_sequence), None for a stop token
            self.stop_string = d.get("stop") if d["finish_reason"] == "stop" and isinstance(d.get("stop"), str) else None
        out.append(d)
        return out

    def _recover(self, content: str) -> list[dict]:
        i = content.find(TOOL_OPEN)
        rest, calls = parse_tool_calls(content[i:] + "\n</tool_call>", self.job.parse_tools)
        if not calls or rest:
            return [{"content": content}]
        out = [{"content": content[:i]}] if content[:i].strip() else []
        if self.job.single_tool_call:
            calls = calls[: max(0, 1 - self.n_calls)]
        calls = [{**c, "index": self.n_calls + k} for k, c in enumerate(calls)]
        self.n_calls += len(calls)
        if calls:
            out.append({"tool_calls": calls})
        return out


async def watch_disconnect(request, job) -> None:
    """Cancel job when the client disconnects (run as a task while no response is streaming)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return
    except (asyncio.CancelledError, Exception):
        return


class Watch:
    """async with Watch(request, job): the job is cancelled if the client leaves meanwhile."""

    def __init__(self, request, job):
        self.request, self.job, self.task = request, job, None

    async def __aenter__(self):
        self.task = asyncio.ensure_future(watch_disconnect(self.request, self.job))
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        try:
            await self.task
        except BaseException:
            pass
        if exc[0] is not None:  # the handler failed or was cancelled: nobody reads the job anymore
            self.job.cancel()
        return False


def json_dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
