"""`flashmoe generate` and `flashmoe chat`: run a packed model from the terminal."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import FlashMoEError

LONG_PROMPT = 256  # tokens to process before a prompt gets a progress bar


def add_model_options(p) -> None:
    p.add_argument("model", help="packed model directory (flashmoe convert)")
    p.add_argument("--memory-budget", help="memory for the engine, e.g. 40GB (default: half of RAM)")
    p.add_argument("--context-length", type=int, help="tokens of context (default: the model's, at most 4096)")
    p.add_argument("--threads", type=int, help="compute threads (default: one per core)")
    s = p.add_argument_group("sampling (defaults: the model's generation_config.json)")
    s.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most (default 256; chat 2048)")
    s.add_argument("--temperature", "--temp", type=float, help="0 = greedy")
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--min-p", type=float)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--presence-penalty", type=float)
    s.add_argument("--frequency-penalty", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _load(args):
    from .model import load

    opts = {k: v for k, v in (("memory_budget", args.memory_budget), ("context_length", args.context_length),
                              ("threads", args.threads)) if v is not None}
    return load(args.model, **opts)


def _sampling(model, args, default_max: int):
    params = model.default_sampling()
    for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "stop"):
        v = getattr(args, name)
        if v is not None:
            setattr(params, name, v)
    params.max_tokens = args.max_tokens if args.max_tokens is not None else default_max
    return params.validate()


class _Progress:
    """A progress bar for prompts of LONG_PROMPT tokens or more, on stderr."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None and total >= LONG_PROMPT:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tok", desc="prompt", file=sys.stderr, leave=False)
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
            if done >= total:
                self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def reply_stats_line(usage: dict, stats: dict) -> str:
    """One line after a reply: decode and prompt speed, expert cache hit rate, read bandwidth."""
    new = usage["prompt_tokens"] - usage["cached_tokens"]
    cached = f", {usage['cached_tokens']} cached" if usage["cached_tokens"] else ""
    return (f"[{usage['completion_tokens']} tokens, {stats['decode_tokens_per_second']:.1f} tok/s | prompt {new} "
            f"tokens{cached}, {stats['prompt_tokens_per_second']:.1f} tok/s | experts hit "
            f"{stats['expert_hit_rate']:.0%}, read {stats['read_gbps']:.2f} GB/s, prompt read "
            f"x{stats['prompt_read_amplification']:.2f} of its experts, {stats['backend']}]")


def cmd_generate(args) -> int:
    model = _load(args)
    params = _sampling(model, args, 256)
    progress = _Progress()
    out = sys.stdout
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        last = None
        for d in model.stream_chat(messages, enable_thinking=args.think, sampling=params, progress=progress):
            last = _print_delta(d, out, last)
            if "finish_reason" in d:
                usage, stats, finish = d["usage"], d["stats"], d["finish_reason"]
        out.write("\n")
    else:
        for c in model.stream(args.prompt, params, progress=progress):
            out.write(c.text)
            out.flush()
        usage, stats, finish = c.usage, c.stats, c.finish_reason
        out.write("\n")
    progress.close()
    print(f"{reply_stats_line(usage, stats)} finish: {finish}", file=sys.stderr)
    return 0


def _print_delta(d: dict, out, last: str | None) -> str | None:
    """Print one stream_chat delta; reasoning is marked off from the answer. Returns the kind printed."""
    if "reasoning_content" in d:
        if last != "reasoning":
            out.write("<think>\n")
        out.write(d["reasoning_content"])
        last = "reasoning"
    elif "content" in d:
        if last == "reasoning":
            out.write("\n</think>\n")
        out.write(d["content"])
        last = "content"
    elif "tool_calls" in d:
        for call in d["tool_calls"]:
            out.write(f"\n[tool call] {call['function']['name']}({call['function']['arguments']})\n")
        last = "tool"
    elif "finish_reason" in d and last == "reasoning":
        out.write("\n</think>")
    out.flush()
    return last


CHAT_HELP = "commands: /reset (new conversation), /system TEXT (set the system prompt), /stats, /exit"


def cmd_chat(args) -> int:
    model = _load(args)
    if model.tokenizer is None or model.tokenizer.chat_template is None:
        raise ValueError(f"{args.model} has no tokenizer with a chat template (tokenizer.json, "
                         f"tokenizer_config.json or chat_template.jinja)")
    params = _sampling(model, args, 2048)
    system = args.system
    messages: list[dict] = []
    print(f"flashmoe chat: {args.model} ({model.architecture}). {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = []
            model.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        if text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            messages = []
            print(f"[system prompt {'set' if system else 'cleared'}; conversation reset]", file=sys.stderr)
            continue
        if text == "/stats":
            s = model.stats
            print(json.dumps({k: s[k] for k in ("tokens", "expert_hits", "expert_misses", "hit_rate", "bytes_read",
                                                 "read_gbps") if k in s}, indent=1), file=sys.stderr)
            print(f"[memory: {json.dumps(model.memory)}; prompt cache {model.prompt_cache_bytes / 1e6:.1f} MB]",
                  file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        convo = ([{"role": "system", "content": system}] if system else []) + messages
        progress, last, reply = _Progress(), None, {"role": "assistant", "content": ""}
        try:
            for d in model.stream_chat(convo, enable_thinking=args.think, sampling=params, progress=progress):
                last = _print_delta(d, sys.stdout, last)
                if "content" in d:
                    reply["content"] += d["content"]
                if "tool_calls" in d:
                    reply.setdefault("tool_calls", []).extend(d["tool_calls"])
                if "finish_reason" in d:
                    sys.stdout.write("\n")
                    print(reply_stats_line(d["usage"], d["stats"]), file=sys.stderr)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            print("\n[interrupted]", file=sys.stderr)
        except FlashMoEError as exc:  # e.g. a failed read: the model is still consistent, so go on
            print(f"\n[error: {exc}; this turn is dropped, try again]", file=sys.stderr)
            messages.pop()
            continue
        finally:
            progress.close()
        messages.append(reply)


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="generate text after a prompt, streamed to stdout")
    add_model_options(g)
    g.add_argument("-p", "--prompt", required=True, help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--system", help="system prompt (with --chat)")
    g.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="the template's enable_thinking (default: the template's own)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat with a model in the terminal (streaming; /reset, /system, /stats)")
    add_model_options(c)
    c.add_argument("--system", help="system prompt")
    c.add_argument("--think", action=argparse.BooleanOptionalAction, default=None,
                   help="the template's enable_thinking (default: the template's own)")
    c.set_defaults(func=cmd_chat)

