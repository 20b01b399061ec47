"""The OpenAI API: /v1/chat/completions and /v1/completions, streaming (SSE) and not."""

from __future__ import annotations

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
    get_bool,
    get_int,
    get_number,
    get_stop,
    json_dumps,
    max_tokens_of,
    new_id,
    now,
    read_json,
    require_tokenizer,
    sampling_params,
    text_of,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_ROLES = ("system", "developer", "user", "assistant", "tool")
# what the template is already given: chat_template_kwargs may not pass them again
_TEMPLATE_ARGS = ("messages", "tools", "documents", "add_generation_prompt", "template", "self")


def _sse_chunk(rid, obj, created, name, choice, usage, include_usage) -> str:
    """One streamed chunk as an SSE event: its one choice (none for the usage-only chunk) and, when the
    client asked for usage, a usage field (null until the last chunk, as OpenAI sends it)."""
    c = {"id": rid, "object": obj, "created": created, "model": name, "system_fingerprint": None,
         "choices": [choice] if choice is not None else []}
    if include_usage:
        c["usage"] = usage
    return f"data: {json_dumps(c)}\n\n"


def error_body(err: APIError) -> dict:
    kind = {
        401: "invalid_request_error",  # as OpenAI answers a bad key (code "invalid_api_key")
        403: "permission_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }.get(err.status, "server_error" if err.status >= 500 else "invalid_request_error")
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}


def usage_of(u: dict) -> dict:
    return {
        "prompt_tokens": u["prompt_tokens"],
        "completion_tokens": u["completion_tokens"],
        "total_tokens": u["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)},
    }


def _sampling(server, body: dict, max_tokens: int, stop: list[str]):
    return sampling_params(
        server.defaults,
        max_tokens,
        stop,
        temperature=get_number(body, "temperature", 0, 2),
        top_p=get_number(body, "top_p", 0, 1),
        top_k=(0 if body.get("top_k") == -1 else get_int(body, "top_k", 0)),  # -1: off, as in vLLM
        min_p=get_number(body, "min_p", 0, 1),
        repetition_penalty=get_number(body, "repetition_penalty"),
        presence_penalty=get_number(body, "presence_penalty", -2, 2),
        frequency_penalty=get_number(body, "frequency_penalty", -2, 2),
        seed=get_int(body, "seed"),
    )


def _common_checks(body: dict) -> None:
    n = get_int(body, "n", 1)
    if n not in (None, 1):
        raise bad("only n=1 is supported", param="n")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise bad("logprobs are not supported", param="logprobs")
    if body.get("logit_bias"):
        raise bad("logit_bias is not supported", param="logit_bias")
    for name in ("best_of",):
        if body.get(name) not in (None, 1):
            raise bad(f"'{name}' is not supported", param=name)


def _stream_options(body: dict) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", param="stream_options")
    return get_bool(opts, "include_usage")


# ---- chat ------------------------------------------------------------------------------------------


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object", param="messages")
        role = m.get("role")
        if role not in _ROLES:
            raise bad(f"{where}: unknown role {role!r}", param="messages")
        msg = {"role": "system" if role == "developer" else role, "content": text_of(m.get("content"), where)}
        if role == "assistant":
            for k in ("reasoning_content", "reasoning"):
                if isinstance(m.get(k), str):
                    msg["reasoning_content"] = m[k]
                    break
            calls = m.get("tool_calls")
            if calls:
                if not isinstance(calls, list) or not all(
                    isinstance(c, dict)
                    and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str)
                    for c in calls
                ):
                    raise bad(f"{where}.tool_calls must be a list of function calls", param="messages")
                msg["tool_calls"] = [
                    {
                        "id": c.get("id"),
                        "type": "function",
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": c["function"].get("arguments") or "{}",
                        },
                    }
                    for c in calls
                ]
        if role == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = m["tool_call_id"]
        if m.get("name") is not None:
            msg["name"] = m["name"]
        out.append(msg)
    return out


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None:
        functions = body.get("functions")  # the legacy form
        if functions is None:
            return None
        tools = (
            [{"type": "function", "function": f} for f in functions] if isinstance(functions, list) else None
        )
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", param="tools")
    out = []
    for t in tools:
        if (
            not isinstance(t, dict)
            or t.get("type", "function") != "function"
            or not isinstance(t.get("function"), dict)
            or not isinstance(t["function"].get("name"), str)
        ):
            raise bad('each tool must be {"type": "function", "function": {"name", ...}}', param="tools")
        out.append({"type": "function", "function": t["function"]})
    return out or None


def chat_job(server, body: dict) -> ChatJob:
    cfg = server.cfg
    check_model(body, cfg)
    require_tokenizer(server.model)
    _common_checks(body)
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise bad('response_format other than {"type": "text"} is not supported', param="response_format")
    messages = _messages(body)
    tools = _tools(body)
    params = _sampling(
        server,
        body,
        max_tokens_of(body, ("max_completion_tokens", "max_tokens"), cfg),
        get_stop(body, "stop"),
    )
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
    kwargs = dict(kwargs or {})
    taken = [k for k in _TEMPLATE_ARGS if k in kwargs]
    if taken:
        raise bad(f"chat_template_kwargs cannot set {', '.join(taken)}", param="chat_template_kwargs")
    thinking = kwargs.pop("enable_thinking", None)
    if thinking is None and isinstance(body.get("enable_thinking"), bool):
        thinking = body["enable_thinking"]
    choice = body.get("tool_choice", body.get("function_call"))
    job = ChatJob(messages, tools, tools, params, thinking, kwargs or None)
    if get_bool(body, "parallel_tool_calls", True) is False:
        job.single_tool_call = True
    if choice is None or choice == "auto":
        pass
    elif choice == "none":
        job.tools, job.drop_tool_calls = None, True
    elif choice == "required":
        if not tools:
            raise bad("tool_choice 'required' needs tools", param="tool_choice")
        job.response_prefix, job.enable_thinking = forced_prefix(server.model, None), False
    elif isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if not isinstance(name, str):
            raise bad(
                "tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", "
                '"function": {"name": ...}}',
                param="tool_choice",
            )
        if name not in {t["function"]["name"] for t in tools or ()}:
            raise bad(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        job.response_prefix, job.enable_thinking = forced_prefix(server.model, name), False
    else:
        raise bad(f"unknown tool_choice {choice!r}", param="tool_choice")
    return job


async def chat_completions(server, request):
    body = await read_json(request, server.cfg.max_body_bytes)
    # in a thread: checking a body of 16 MiB (300k messages...) takes a while, and Python code there
    # leaves the event loop its turns
    job = await run_in_threadpool(chat_job, server, body)
    stream = get_bool(body, "stream")
    include_usage = _stream_options(body) if stream else False
    engine_job = server.engine.submit(job.work(server.model))
    filt = DeltaFilter(job)
    rid, created, name = new_id("chatcmpl-"), now(), server.cfg.model_name

    if not stream:
        msg = {"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": []}
        finish, usage = None, None
        async with Watch(request, engine_job):
            try:
                async for raw in engine_job:
                    for d in filt.feed(raw):
                        if "content" in d:
                            msg["content"] += d["content"]
                        elif "reasoning_content" in d:
                            msg["reasoning_content"] = (msg["reasoning_content"] or "") + d[
                                "reasoning_content"
                            ]
                        elif "tool_calls" in d:
                            msg["tool_calls"] += [
                                {k: c[k] for k in ("id", "type", "function")} for c in d["tool_calls"]
                            ]
                        elif "finish_reason" in d:
                            finish, usage = d["finish_reason"], d["usage"]
            except Exception as e:
                raise engine_error(e) from None
        if finish is None:  # cancelled: the client is gone
            raise APIError(499, "the client closed the request")
        if not msg["tool_calls"]:
            del msg["tool_calls"]
        elif not msg["content"]:
            msg["content"] = None
        if msg["reasoning_content"] is None:
            del msg["reasoning_content"]
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": finish}],
                "usage": usage_of(usage),
                "system_fingerprint": None,
            }
        )

    def chunk(delta=None, finish=None, usage=None, choices=True):
        choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        return _sse_chunk(rid, "chat.completion.chunk", created, name, choice if choices else None,
                          usage, include_usage)

    first = await _first(request, engine_job)

    async def events():
        try:
            yield chunk({"role": "assistant", "content": ""})
            items = [first] if first is not None else []
            async for raw in _chain(items, engine_job):
                for d in filt.feed(raw):
                    if "finish_reason" in d:
                        yield chunk(None, d["finish_reason"])
                        if include_usage:
                            yield chunk(usage=usage_of(d["usage"]), choices=False)
                    else:
                        yield chunk(d)
            yield "data: [DONE]\n\n"
        except Exception as e:
            yield f"data: {json_dumps(error_body(engine_error(e)))}\n\n"
        finally:
            engine_job.cancel()  # a no-op when it is over; stops it when the client left

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def _first(request, job, prompt_param: str = "messages"):
    """The job's first item (None when it has none), waited for before any response is sent, so that an
    engine error (context too long, bad template) is answered with a status code."""
    async with Watch(request, job):
        try:
            return await job.next()
        except StopAsyncIteration:
            return None
        except Exception as e:
            raise engine_error(e, prompt_param) from None


async def _chain(items, job):
    for it in items:
        yield it
    async for it in job:
        yield it


# ---- completions -----------------------------------------------------------------------------------


def _prompt(server, body: dict):
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not p:
            raise bad("'prompt' is empty", param="prompt")
        require_tokenizer(server.model, chat=False)
        return p
    ctx = server.model.context_length
    if isinstance(p, list) and len(p) > ctx and isinstance(p[0], int):  # before looking at millions of them
        raise bad(f"the prompt has {len(p)} tokens but the context holds {ctx}", param="prompt",
                  code="context_length_exceeded")
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        vocab = int(server.model.config["vocab_size"])
        badid = next((t for t in p if not 0 <= t < vocab), None)
        if badid is not None:
            raise bad(f"token id {badid} is outside the vocabulary [0, {vocab})", param="prompt")
        return p
    if isinstance(p, list) and len(p) > 1:
        raise bad("only one prompt per request is supported", param="prompt")
    raise bad("'prompt' must be a string or a list of token ids", param="prompt")


async def completions(server, request):
    body = await read_json(request, server.cfg.max_body_bytes)
    check_model(body, server.cfg)
    _common_checks(body)
    if body.get("suffix"):
        raise bad("'suffix' is not supported", param="suffix")
    prompt = _prompt(server, body)
    params = _sampling(server, body, max_tokens_of(body, ("max_tokens",), server.cfg), get_stop(body, "stop"))
    echo = get_bool(body, "echo")
    if echo and not isinstance(prompt, str):
        require_tokenizer(server.model, chat=False)  # to echo the ids as text
    stream = get_bool(body, "stream")
    include_usage = _stream_options(body) if stream else False
    model = server.model

    def work(job):
        if echo:
            yield {"text": prompt if isinstance(prompt, str) else model.tokenizer.decode(prompt)}
        for c in model.stream(prompt, params, progress=job.progress):
            if c.finish_reason is not None:
                yield {"text": c.text, "finish_reason": c.finish_reason, "usage": c.usage}
            elif c.text:
                yield {"text": c.text}

    engine_job = server.engine.submit(work)
    rid, created, name = new_id("cmpl-"), now(), server.cfg.model_name

    if not stream:
        text, finish, usage = [], None, None
        async with Watch(request, engine_job):
            try:
                async for d in engine_job:
                    text.append(d["text"])
                    if "finish_reason" in d:
                        finish, usage = d["finish_reason"], d["usage"]
            except Exception as e:
                raise engine_error(e, "prompt") from None
        if finish is None:
            raise APIError(499, "the client closed the request")
        return JSONResponse(
            {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": finish}],
                "usage": usage_of(usage),
                "system_fingerprint": None,
            }
        )

    def chunk(text="", finish=None, usage=None, choices=True):
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return _sse_chunk(rid, "text_completion", created, name, choice if choices else None, usage,
                          include_usage)

    first = await _first(request, engine_job, "prompt")

    async def events():
        try:
            async for d in _chain([first] if first is not None else [], engine_job):
                if "finish_reason" in d:
                    yield chunk(d["text"], d["finish_reason"])
                    if include_usage:
                        yield chunk(usage=usage_of(d["usage"]), choices=False)
                elif d["text"]:
                    yield chunk(d["text"])
            yield "data: [DONE]\n\n"
        except Exception as e:
            yield f"data: {json_dumps(error_body(engine_error(e, 'prompt')))}\n\n"
        finally:
            engine_job.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def models_list(server) -> dict:
    return {"object": "list", "data": [model_card(server)]}


def model_card(server) -> dict:
    return {
        "id": server.cfg.model_name,
        "object": "model",
        "created": server.created,
        "owned_by": "flashmoe",
        "context_length": server.model.context_length,
        "max_model_len": server.model.context_length,
    }
