"""A tiny tokenizer and two chat templates of the Qwen3.5 / Qwen3-Next kind, written to a directory.

write_tokenizer(dir) drops tokenizer.json, tokenizer_config.json and generation_config.json into `dir`
(next to a converted tiny model, say), built without any download: a byte-level BPE trained here on a
small corpus, with the family's added tokens at the top of the vocabulary. As in the real tokenizers,
<|endoftext|>, <|im_start|> and <|im_end|> are special (dropped by skip_special_tokens) while <think>,
</think>, <tool_call> and </tool_call> are added but not special (they survive it).

Every token id must be below the vocab_size of a model that reads them, so `vocab_size` (the tokenizer's
size, added tokens included; the result is at most that) must be <= the model's vocab_size. The default,
251, is the smallest vocabulary of the tiny test models (hf_fixtures). Below 256 + 7 the byte alphabet
is only the bytes of the corpus: every printable ASCII character, tab, newline, and the multi-byte
characters of CORPUS (é, ï, ü, 中文, 日本語, emoji...). Bytes outside it are dropped when encoding, so
tests should stay within that text; from vocab_size 300 up the alphabet has all 256 bytes.
"""

from __future__ import annotations

import json
import os
import string

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED = ("<tool_call>", "</tool_call>", "<think>", "</think>")  # added, not special
EXTRA_TEXT = "🦊"  # in the corpus once: its four bytes are never merged into one token

CORPUS = [
    string.printable,
    "Hello, world! How are you today? I am fine, thank you.",
    "The weather in Paris is sunny, 21 degrees. Tomorrow it will rain in London.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}',
    "<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>",
    "Let me think about this step by step. First, the user wants the weather.",
    "café, naïve, über, résumé, déjà vu, crème brûlée",
    "中文 中文 日本語 日本語 你好 你好 世界",
    "emoji 😀 😀 🎉 🎉 👍 👍 → → ✓ ✓ " + EXTRA_TEXT,
    "The quick brown fox jumps over the lazy dog. 0123456789 3.14 -42 true false null",
] * 3


def build_tokenizer(vocab_size: int = 251):
    """The tokenizers.Tokenizer: NFC, byte-level pre-tokenizer and decoder (like Qwen's), BPE merges,
    then the added tokens, which get the highest ids in the order of SPECIAL + ADDED."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    n_added = len(SPECIAL) + len(ADDED)
    if vocab_size < 140:
        raise ValueError(f"vocab_size {vocab_size} cannot hold the corpus alphabet and the added tokens")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if vocab_size >= 300 else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_added, min_frequency=2, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    assert tok.get_vocab_size() <= vocab_size
    return tok


# Qwen3.5 style: tools as JSON in the system turn, calls in the XML form, tool results as
# <tool_response> in a user turn, thinking on unless enable_thinking is false, and the reasoning of
# assistant turns after the last user query kept in the history.
QWEN35_TEMPLATE = r"""
{%- set thinking = enable_thinking is not defined or enable_thinking %}
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
{%- else %}
    {%- set system = none %}
{%- endif %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if system %}
        {{- system + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call the functions below.\n\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nTo call one, reply in exactly this form:\n\n<tool_call>\n<function=NAME>\n<parameter=ARGUMENT>\nVALUE\n</parameter>\n</function>\n</tool_call><|im_end|>\n' }}
{%- elif system is not none %}
    {{- '<|im_start|>system\n' + system + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' and not (message.content is string and message.content.startswith('<tool_response>')) %}
        {%- set ns.last_query = loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('The system message must come first.') }}
        {%- endif %}
    {%- elif message.role == 'user' %}
        {{- '<|im_start|>user\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {%- set content = content.strip('\n') %}
        {{- '<|im_start|>assistant\n' }}
        {%- if loop.index0 > ns.last_query and reasoning %}
            {{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' }}
        {%- endif %}
        {{- content }}
        {%- for call in message.tool_calls | default([]) %}
            {%- set fn = call.function if call.function is defined else call %}
            {%- if not loop.first or content %}
                {{- '\n\n' if loop.first else '\n' }}
            {%- endif %}
            {{- '<tool_call>\n<function=' + fn.name + '>\n' }}
            {%- if fn.arguments is mapping %}
                {%- for name, value in fn.arguments | items %}
                    {{- '<parameter=' + name + '>\n' }}
                    {{- value if value is string else value | tojson }}
                    {{- '\n</parameter>\n' }}
                {%- endfor %}
            {%- endif %}
            {{- '</function>\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {{- '<think>\n' if thinking else '<think>\n\n</think>\n\n' }}
{%- endif %}
"""

# Qwen3-Next style: Hermes JSON tool calls, arguments written with tojson, no thinking switch.
QWEN3_NEXT_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions.\n\nFunction signatures, within <tools></tools>:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each call, return a JSON object with the name and arguments within <tool_call></tool_call>:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for call in message.tool_calls | default([]) %}
            {%- set fn = call.function if call.function is defined else call %}
            {{- '\n<tool_call>\n{"name": "' + fn.name + '", "arguments": ' }}
            {{- fn.arguments if fn.arguments is string else fn.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

TEMPLATES = {"qwen3.5": QWEN35_TEMPLATE, "qwen3-next": QWEN3_NEXT_TEMPLATE}


def write_tokenizer(dir: str | os.PathLike, template: str = "qwen3.5", vocab_size: int = 251,
                    template_file: bool = False) -> str:
    """Write tokenizer.json, tokenizer_config.json (with the chat template of `template`, "qwen3.5" or
    "qwen3-next") and generation_config.json (eos ids <|im_end|> and <|endoftext|>) into `dir`.
    template_file=True writes the template to chat_template.jinja instead, as newer checkpoints do.
    Returns `dir`. All ids are < vocab_size, which must be <= the vocab_size of a model using them."""
    dir = os.fspath(dir)
    os.makedirs(dir, exist_ok=True)
    tok = build_tokenizer(vocab_size)
    tok.save(os.path.join(dir, "tokenizer.json"))
    decoder = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": t in SPECIAL}
               for t in SPECIAL + ADDED}
    config = {"tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
              "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 131072,
              "split_special_tokens": False, "added_tokens_decoder": decoder}
    text = TEMPLATES[template]
    if template_file:
        with open(os.path.join(dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(text)
    else:
        config["chat_template"] = text
    with open(os.path.join(dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    generation = {"eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
                  "pad_token_id": tok.token_to_id("<|endoftext|>")}
    with open(os.path.join(dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
    return dir
