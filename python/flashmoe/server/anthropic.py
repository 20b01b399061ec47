"""The Anthropic Messages API: /v1/messages (streaming events included) and /v1/messages/count_tokens.

Requests are translated into the OpenAI-shaped messages the chat templates take (tool_use blocks become
assistant tool_calls, tool_result blocks tool messages, thinking blocks reasoning_content), and the
stream_chat deltas back into content blocks: thinking, text and tool_use (input as an object)."""

from __future__ import annotations

import json

from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, StreamingResponse

from .common import (
    APIError,
    ChatJob,
    DeltaFilter,
    Watch,
    bad,
    check_model,
    engine_error,
    forced_prefix,
    get_int,
    get_number,
    get_stop,
    json_dumps,
    max_tokens_of,
    new_id,
    read_json,
    require_tokenizer,
    sampling_params,
    text_of,
)
from .openai import SSE_HEADERS, _chain, _first

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_body(err: APIError) -> dict:
    kind = _ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id[len("call_") :] if call_id.startswith("call_") else call_id


def _blocks(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of content blocks")
    for b in content:
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise bad(f"{where}.content: each block must be an object with a 'type'")
    return content


def _messages(body: dict) -> list[dict]:
    out = []
    system = body.get("system")
    if system is not None:
        text = text_of(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages: a non-empty list is required")
    for i, m in enumerate(msgs):
        where = f"messages.{i}"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad(f"{where}: role must be 'user' or 'assistant'")
        blocks = _blocks(m.get("content"), where)
        if m["role"] == "user":
            text = []
            for b in blocks:
                if b["type"] == "text":
                    text.append(text_of([b], where))
                elif b["type"] == "tool_result":
                    c = b.get("content")
                    result = text_of(c if c is not None else "", f"{where}.tool_result")
                    out.append(
                        {
                            "role": "tool",
                            "tool_call_id": b.get("tool_use_id"),
                            "content": ("Error: " + result) if b.get("is_error") else result,
                        }
                    )
                else:
                    raise bad(
                        f"{where}: content blocks of type {b['type']!r} are not supported in user messages"
                    )
            if text or not any(b["type"] == "tool_result" for b in blocks):
                out.append({"role": "user", "content": "".join(text)})
        else:
            msg = {"role": "assistant", "content": ""}
            calls, reasoning = [], []
            for b in blocks:
                if b["type"] == "text":
                    msg["content"] += text_of([b], where)
                elif b["type"] == "thinking":
                    if isinstance(b.get("thinking"), str):
                        reasoning.append(b["thinking"])
                elif b["type"] == "redacted_thinking":
                    continue
                elif b["type"] == "tool_use":
                    if not isinstance(b.get("name"), str):
                        raise bad(f"{where}: a tool_use block needs a 'name'")
                    args = b.get("input") if b.get("input") is not None else {}
                    calls.append(
                        {
                            "id": b.get("id"),
                            "type": "function",
                            "function": {
                                "name": b["name"],
                                "arguments": json.dumps(args, ensure_ascii=False),
                            },
                        }
                    )
                else:
                    raise bad(
                        f"{where}: content blocks of type {b['type']!r} are not supported from the assistant"
                    )
            if reasoning:
                msg["reasoning_content"] = "".join(reasoning)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools: must be a list")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise bad(f"tools.{i}: a tool needs a 'name'")
        if t.get("type") not in (None, "custom"):
            raise bad(f"tools.{i}: tools of type {t['type']!r} are not supported (custom tools only)")
        fn = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out or None


def messages_job(server, body: dict) -> ChatJob:
    check_model(body, server.cfg)
    require_tokenizer(server.model)
    messages = _messages(body)
    tools = _tools(body)
    params = sampling_params(
        server.defaults,
        max_tokens_of(body, ("max_tokens",), server.cfg, required=True),
        get_stop(body, "stop_sequences"),
        temperature=get_number(body, "temperature", 0, 2),
        top_p=get_number(body, "top_p", 0, 1),
        top_k=get_int(body, "top_k", 0),
    )
    thinking = body.get("thinking")
    enable = None
    if isinstance(thinking, dict):
        enable = thinking.get("type") != "disabled"  # enabled, adaptive...: the template's thinking on
    elif thinking is not None:
        raise bad('thinking: must be an object like {"type": "enabled", "budget_tokens": N}')
    job = ChatJob(messages, tools, tools, params, enable)
    choice = body.get("tool_choice")
    if choice is None:
        return job
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad('tool_choice: must be {"type": "auto" | "any" | "tool" | "none"}')
    job.single_tool_call = bool(choice.get("disable_parallel_tool_use"))
    kind = choice["type"]
    if kind == "none":
        job.tools, job.drop_tool_calls = None, True
    elif kind in ("any", "tool"):
        if not tools:
            raise bad(f"tool_choice: type {kind!r} needs tools")
        name = None
        if kind == "tool":
            name = choice.get("name")
            if name not in {t["function"]["name"] for t in tools}:
                raise bad(f"tool_choice: the tool {name!r} is not in tools")
        job.response_prefix, job.enable_thinking = forced_prefix(server.model, name), False
    return job


def _usage(u: dict) -> dict:
    cached = u.get("cached_tokens", 0)
    return {
        "input_tokens": u["prompt_tokens"] - cached,
        "output_tokens": u["completion_tokens"],
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def _stop(job: ChatJob, filt: DeltaFilter, finish: str) -> tuple[str, str | None]:
    if finish == "tool_calls":
        return "tool_use", None
    if finish == "length":
        return "max_tokens", None
    if filt.stop_string:
        return "stop_sequence", filt.stop_string
    return "end_turn", None


def _input(arguments: str):
    try:
        v = json.loads(arguments)
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


async def messages(server, request):
    body = await read_json(request, server.cfg.max_body_bytes)
    job = await run_in_threadpool(messages_job, server, body)  # off the event loop, as in openai.py
    stream = body.get("stream") is True
    job.count_prompt = stream
    engine_job = server.engine.submit(job.work(server.model))
    filt = DeltaFilter(job)
    mid, name = new_id("msg_"), server.cfg.model_name

    if not stream:
        content: list[dict] = []
        finish, usage = None, None
        async with Watch(request, engine_job):
            try:
                async for raw in engine_job:
                    for d in filt.feed(raw):
                        if "reasoning_content" in d:
                            if not content or content[-1]["type"] != "thinking":
                                content.append({"type": "thinking", "thinking": "", "signature": ""})
                            content[-1]["thinking"] += d["reasoning_content"]
                        elif "content" in d:
                            if not content or content[-1]["type"] != "text":
                                content.append({"type": "text", "text": ""})
                            content[-1]["text"] += d["content"]
                        elif "tool_calls" in d:
                            content += [
                                {
                                    "type": "tool_use",
                                    "id": _tool_id(c["id"]),
                                    "name": c["function"]["name"],
                                    "input": _input(c["function"]["arguments"]),
                                }
                                for c in d["tool_calls"]
                            ]
                        elif "finish_reason" in d:
                            finish, usage = d["finish_reason"], d["usage"]
            except Exception as e:
                raise engine_error(e) from None
        if finish is None:
            raise APIError(499, "the client closed the request")
        stop_reason, stop_sequence = _stop(job, filt, finish)
        return JSONResponse(
            {
                "id": mid,
                "type": "message",
                "role": "assistant",
                "model": name,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": stop_sequence,
                "usage": _usage(usage),
            }
        )

    # the first item is the prompt's token count; wait for the next (the first delta, or an error)
    count = await _first(request, engine_job)
    first = await _first(request, engine_job)
    n_prompt = count["prompt_tokens"] if count else 0

    def event(kind: str, data: dict) -> str:
        return f"event: {kind}\ndata: {json_dumps({'type': kind, **data})}\n\n"

    async def events():
        index, open_kind = -1, None
        try:
            yield event(
                "message_start",
                {
                    "message": {
                        "id": mid,
                        "type": "message",
                        "role": "assistant",
                        "model": name,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": n_prompt, "output_tokens": 0},
                    }
                },
            )
            async for raw in _chain([first] if first is not None else [], engine_job):
                for d in filt.feed(raw):
                    if "finish_reason" in d:
                        if open_kind is not None:
                            yield event("content_block_stop", {"index": index})
                            open_kind = None
                        stop_reason, stop_sequence = _stop(job, filt, d["finish_reason"])
                        yield event(
                            "message_delta",
                            {
                                "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                "usage": _usage(d["usage"]),
                            },
                        )
                        yield event("message_stop", {})
                        continue
                    if "tool_calls" in d:
                        for c in d["tool_calls"]:
                            if open_kind is not None:
                                yield event("content_block_stop", {"index": index})
                            index, open_kind = index + 1, None
                            yield event(
                                "content_block_start",
                                {
                                    "index": index,
                                    "content_block": {
                                        "type": "tool_use",
                                        "id": _tool_id(c["id"]),
                                        "name": c["function"]["name"],
                                        "input": {},
                                    },
                                },
                            )
                            yield event(
                                "content_block_delta",
                                {
                                    "index": index,
                                    "delta": {
                                        "type": "input_json_delta",
                                        "partial_json": json_dumps(_input(c["function"]["arguments"])),
                                    },
                                },
                            )
                            yield event("content_block_stop", {"index": index})
                        continue
                    kind = "thinking" if "reasoning_content" in d else "text"
                    if open_kind != kind:
                        if open_kind is not None:
                            yield event("content_block_stop", {"index": index})
                        index, open_kind = index + 1, kind
                        block = (
                            {"type": "thinking", "thinking": "", "signature": ""}
                            if kind == "thinking"
                            else {"type": "text", "text": ""}
                        )
                        yield event("content_block_start", {"index": index, "content_block": block})
                    delta = (
                        {"type": "thinking_delta", "thinking": d["reasoning_content"]}
                        if kind == "thinking"
                        else {"type": "text_delta", "text": d["content"]}
                    )
                    yield event("content_block_delta", {"index": index, "delta": delta})
        except Exception as e:
            yield event("error", {"error": error_body(engine_error(e))["error"]})
        finally:
            engine_job.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def count_tokens(server, request):
    body = await read_json(request, server.cfg.max_body_bytes)
    check_model(body, server.cfg)
    require_tokenizer(server.model)
    msgs, tools = await run_in_threadpool(lambda: (_messages(body), _tools(body)))
    model = server.model

    def work(job):
        text = model.apply_chat_template(msgs, tools)
        yield model.tokenizer.count_tokens(text)

    job = server.engine.submit(work)
    async with Watch(request, job):
        try:
            n = await job.next()
        except StopAsyncIteration:
            raise APIError(499, "the client closed the request") from None
        except Exception as e:
            raise engine_error(e) from None
    return JSONResponse({"input_tokens": n})
