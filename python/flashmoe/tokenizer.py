"""The tokenizer of a model directory (HF's tokenizer.json and friends) and incremental detokenization.

Only the `tokenizers` library is needed, not transformers: tokenizer.json holds the whole pipeline, and
the few facts the chat side needs (template, special tokens, stop ids) come from the small JSON files HF
checkpoints ship next to it. `flashmoe convert` copies those files into the packed directory.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence

from .errors import FormatError

TOKENIZER_FILE = "tokenizer.json"
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def read_json(path: str) -> dict:
    """The object in `path`, or {} when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value) -> str | None:
    """A special token as HF configs write it: a string, or a serialized AddedToken {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    """eos_token_id as configs write it: an int, a list of ints, or absent."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _load_chat_templates(model_dir: str, tok_config: dict) -> dict[str, str]:
    """Named chat templates, with the precedence transformers uses: chat_template.jinja (and the
    chat_templates/ folder) over tokenizer_config.json's entry over the legacy chat_template.json."""
    templates: dict[str, str] = {}
    entry = tok_config.get("chat_template")
    if isinstance(entry, str):
        templates["default"] = entry
    elif isinstance(entry, list):
        for item in entry:
            if isinstance(item, dict) and isinstance(item.get("template"), str):
                templates[str(item.get("name"))] = item["template"]
    if not templates:
        legacy = read_json(os.path.join(model_dir, "chat_template.json")).get("chat_template")
        if isinstance(legacy, str):
            templates["default"] = legacy
    folder = os.path.join(model_dir, "chat_templates")
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".jinja"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    templates[name[: -len(".jinja")]] = f.read()
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            templates["default"] = f.read()
    return templates


def _component(part) -> dict:
    """A tokenizers pipeline component (normalizer, pre-tokenizer) as its JSON, {} for none."""
    return {} if part is None else json.loads(part.__getstate__())


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and stop tokens.

    `encode` and `decode` are tokenizer.json's pipeline as is: special tokens written in the text (such
    as "<|im_start|>") are recognised, which is what a rendered chat template needs, and no BOS/EOS is
    added unless asked (this family adds none anyway).
    """

    def __init__(self, backend, config: dict | None = None, generation_config: dict | None = None,
                 model_config: dict | None = None, chat_templates: dict[str, str] | None = None):
        self._tok = backend
        config = config or {}
        self.config = config
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        # `None` when the model ships no template; render_chat_template needs one
        self.chat_template: str | None = self.chat_templates.get("default")
        if self.chat_template is None and len(self.chat_templates) == 1:
            self.chat_template = next(iter(self.chat_templates.values()))
        self.special_tokens: dict[str, str] = {
            name: text for name in _SPECIAL_NAMES if (text := _token_text(config.get(name))) is not None}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        # id -> (content, special) for every added token the backend knows, config entries filling gaps
        self.added_tokens: dict[int, tuple[str, bool]] = {
            i: (t.content, t.special) for i, t in backend.get_added_tokens_decoder().items()}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("content"), str) and str(key).isdigit():
                self.added_tokens.setdefault(int(key), (entry["content"], bool(entry.get("special", False))))
        eos: list[int] = []
        if self.eos_token is not None and (i := backend.token_to_id(self.eos_token)) is not None:
            eos.append(i)
        for source in (generation_config or {}, model_config or {}):
            eos += _ids(source.get("eos_token_id"))
        # the tokens that end generation: the tokenizer's eos first, then generation_config's list (Qwen
        # chat models stop on both <|im_end|> and <|endoftext|>)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, the chat template and the stop ids of `model_dir`
        (an HF checkpoint or a packed flashmoe directory)."""
        from tokenizers import Tokenizer as _Backend

        model_dir = os.fspath(model_dir)
        path = os.path.join(model_dir, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FormatError(f"{path}: missing (the tokenizer; copy tokenizer.json and tokenizer_config.json"
                              f" from the original checkpoint into {model_dir})")
        try:
            backend = _Backend.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON or an unknown model
            raise FormatError(f"{path}: cannot load the tokenizer ({e})") from None
        config = read_json(os.path.join(model_dir, "tokenizer_config.json"))
        return cls(backend, config,
                   generation_config=read_json(os.path.join(model_dir, "generation_config.json")),
                   model_config=read_json(os.path.join(model_dir, "config.json")),
                   chat_templates=_load_chat_templates(model_dir, config))

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, added tokens included (often below the model's
        vocab_size, whose embedding rows are padded)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._encoding(text, add_special_tokens).ids

    def count_tokens(self, text: str, add_special_tokens: bool = False) -> int:
        """len(encode(text)), without making the list."""
        return len(self._encoding(text, add_special_tokens))

    def _encoding(self, text: str, add_special_tokens: bool = False):
        """The backend's Encoding of text; its .ids is encode's list (built when asked for: millions of
        Python ints for a long text)."""
        # encode_batch(_fast) rather than encode: encode holds the GIL for the whole text (20 s for 15 MB,
        # stalling every other thread, such as a server's event loop), the batch calls release it. The
        # fast one also skips the offsets, which cost time and memory for nothing here.
        batch = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        return batch([text], add_special_tokens=add_special_tokens)[0]

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)), found without tokenizing (0 when there is none to give).

        For a byte-level BPE whose vocabulary holds all 256 bytes, the tokens of a text decode to its
        normalized bytes, each token to at most max_token_bytes of them, so there are at least
        bytes / max_token_bytes tokens. Without a normalizer the bytes are the text's. Under a Unicode
        normal form (NFC...) they are at least the text's ASCII characters: no normal form removes an ASCII
        character or merges two (one can only become the base of a composed character, of more bytes).
        Linear in the text, but a single pass in C: a way to refuse a prompt that cannot fit a context
        before spending seconds and gigabytes on tokenizing it."""
        if self._length_rule is None:
            return 0
        rule, max_token_bytes = self._length_rule
        if text.isascii():  # O(1) in CPython; then bytes == characters == ASCII characters
            n = len(text)
        elif rule == "bytes":
            n = len(text.encode("utf-8", "surrogatepass"))
        else:
            n = len(text.encode("ascii", "ignore"))
        return -(-n // max_token_bytes)

    @functools.cached_property
    def _length_rule(self) -> tuple[str, int] | None:
        """What min_tokens counts, "bytes" or "ascii" (under a Unicode normal form), and the most bytes a
        token stands for; None when this tokenizer gives no bound."""
        from tokenizers import models, pre_tokenizers

        tok = self._tok
        if not isinstance(tok.model, models.BPE) or tok.truncation is not None:
            return None
        pre = _component(tok.pre_tokenizer)
        steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
        # every byte of the text must reach the BPE as one of the 256 byte symbols: a ByteLevel step,
        # only steps that never drop text, and the whole byte alphabet in the vocabulary (a byte outside
        # it would be dropped, and a text of such bytes would be no tokens at all)
        keeps_text = ("ByteLevel", "Split", "Digits", "Punctuation")
        if not any(s.get("type") == "ByteLevel" for s in steps) or any(
            s.get("type") not in keeps_text or s.get("behavior") == "Removed" for s in steps
        ):
            return None
        vocab = tok.get_vocab(with_added_tokens=True)
        if any(c not in vocab for c in pre_tokenizers.ByteLevel.alphabet()):
            return None
        added = tok.get_added_tokens_decoder()
        if any(t.lstrip or t.rstrip for t in added.values()):  # such a token also eats the spaces around it
            return None
        norm = _component(tok.normalizer)
        forms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
        if any(f.get("type") not in ("NFC", "NFD", "NFKC", "NFKD") for f in forms):
            return None
        # the most bytes one token stands for: a vocabulary token's symbols are one byte each, an added
        # token is its text
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        max_token_bytes = max(
            len(added[i].content.encode()) if i in added
            else sum(1 if c in alphabet else len(c.encode()) for c in token)
            for token, i in vocab.items()
        )
        return ("ascii" if forms else "bytes"), max_token_bytes

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    def apply_chat_template(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                            add_generation_prompt: bool = True, enable_thinking: bool | None = None,
                            **extra) -> str:
        """The prompt text of `messages` under this model's template (see chat.render_chat_template),
        with the special tokens transformers passes (bos_token, eos_token, pad_token, ...)."""
        from .chat import render_chat_template

        if self.chat_template is None:
            raise FormatError("this tokenizer has no chat template (no chat_template.jinja, no chat_template "
                              "in tokenizer_config.json)")
        kwargs = {**self.special_tokens, **extra}
        return render_chat_template(self.chat_template, messages, tools=tools,
                                    add_generation_prompt=add_generation_prompt,
                                    enable_thinking=enable_thinking, **kwargs)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenization: push generated ids one at a time, get the text they complete.

    Decoding each token alone is wrong (byte-level BPE tokens can hold part of a UTF-8 character, and
    some decoders treat the first token of a string specially), and decoding everything every step is
    quadratic. So the decoder keeps a short window: `prefix` tokens already emitted, for context, and the
    pending ones after them. The delta is decode(prefix + pending) minus decode(prefix), emitted only
    when it does not end in U+FFFD (an incomplete character); then the window slides forward. The
    deltas joined equal tokenizer.decode(all ids) (flush() returns whatever is still held).
    """

    _TRIM = 256  # drop ids before the window once this many have accumulated

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # end of what has been emitted
        self._prefix_text = ""  # decode(ids[prefix:read]), kept until the window moves

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly completed text ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._prefix_text
        text = self._tokenizer.decode(self._ids[self._prefix:], self._skip)
        if len(text) <= len(prefix_text) or (text.endswith("\ufffd") and not final):
            return ""
        delta = text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._tokenizer.decode(self._ids[self._prefix:self._read], self._skip)
        if self._prefix > self._TRIM:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta
