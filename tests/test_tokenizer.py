"""flashmoe.tokenizer against a tiny byte-level BPE written by text_fixtures (no download)."""

from __future__ import annotations

import json
import os
import random

import pytest

from flashmoe.errors import FlashMoEError
from flashmoe.tokenizer import StreamDecoder, Tokenizer
from text_fixtures import ADDED, EXTRA_TEXT, SPECIAL, write_tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "café naïve déjà vu, crème brûlée",
    "中文 日本語 你好世界",
    "emoji 😀🎉👍 and a fox " + EXTRA_TEXT + EXTRA_TEXT + " → ✓",
    "def add(a, b):\n    return a + b\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nhmm\n</think>\n\nok<tool_call>\n{}\n</tool_call><|im_end|>",
    "",
    " ",
    "\n\n",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_vocab_fits_the_tiny_models(tok, tmp_path):
    assert tok.vocab_size == 251
    assert Tokenizer.from_dir(write_tokenizer(tmp_path, vocab_size=300)).vocab_size <= 300


def test_special_and_added_tokens(tok):
    for t in SPECIAL + ADDED:
        i = tok.token_to_id(t)
        assert i is not None and tok.id_to_token(i) == t
        assert tok.encode(t) == [i]  # written in text, an added token is one id
        assert tok.added_tokens[i] == (t, t in SPECIAL)
    text = "<|im_start|>assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call><|im_end|><|endoftext|>"
    # <think> and <tool_call> are not special in this family: they survive skip_special_tokens
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "assistant\n<think>\nx\n</think>\n\n<tool_call>y</tool_call>"
    assert tok.encode("<|im_start|>", add_special_tokens=True) == [tok.token_to_id("<|im_start|>")]  # no BOS added


def test_config_fields(tok):
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert tok.eos_token_ids == (im_end, eot)
    assert "<|im_start|>" in tok.chat_template


def test_eos_from_config_json_and_template_file(tmp_path):
    d = write_tokenizer(tmp_path, template="qwen3-next", template_file=True)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["eos_token"] = {"content": "<|endoftext|>", "special": True}  # AddedToken form
    cfg["chat_template"] = [{"name": "default", "template": "overridden by chat_template.jinja"},
                            {"name": "tool_use", "template": "other"}]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    os.remove(os.path.join(d, "generation_config.json"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"eos_token_id": 7}, f)
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_ids == (tok.token_to_id("<|endoftext|>"), 7)
    assert "Function signatures" in tok.chat_template  # the .jinja file wins, as in transformers
    assert tok.chat_templates["tool_use"] == "other"


def test_template_list_picks_default(tmp_path):
    d = write_tokenizer(tmp_path)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    assert Tokenizer.from_dir(d).chat_template == "D"


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FlashMoEError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FlashMoEError, match="cannot load"):
        Tokenizer.from_dir(tmp_path)


def _stream(tok, ids, skip=False):
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.flush())
    return deltas


def test_emoji_is_split_across_tokens(tok):
    ids = tok.encode(EXTRA_TEXT)
    assert len(ids) >= 2 and tok.decode(ids[:1]).endswith("\ufffd")  # the case the decoder must hold back
    deltas = _stream(tok, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and "".join(deltas) == EXTRA_TEXT


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder_joins_to_decode(tok, text, skip):
    ids = tok.encode(text)
    deltas = _stream(tok, ids, skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)


def test_stream_decoder_random_ids(tok):
    """Any id sequence, even one that is not valid UTF-8: the deltas still join to decode()."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        deltas = _stream(tok, ids)
        assert "".join(deltas) == tok.decode(ids)


def test_stream_decoder_long_sequence_stays_small(tok):
    ids = tok.encode(" ".join(TEXTS[:4]) * 60)
    dec = StreamDecoder(tok)
    out = [dec.push(i) for i in ids]
    assert len(dec._ids) <= StreamDecoder._TRIM + 16  # the window is trimmed: O(1) work per token
    assert "".join(out) + dec.flush() == tok.decode(ids)


# ---- min_tokens: a lower bound on the token count, without tokenizing ------------------------------

BOUND_TEXTS = TEXTS + [
    "x" * 5000,
    "eather" * 300,  # the longest vocabulary token of the 300-token fixture, over and over
    "<|endoftext|>" * 100,  # the longest token of all (13 bytes), one token each
    "<|im_start|>user\n" + "Paris " * 200 + "<|im_end|>",
    # texts that Unicode normalization shrinks: e + combining acute -> é (3 -> 2 bytes), a Hangul
    # syllable from its three jamo (9 -> 3), the Angstrom sign -> Å (3 -> 2), > + combining long solidus
    # overlay -> ≯ (an ASCII character becoming the base of a composed one)
    "e\u0301" * 400,
    "\u1100\u1161\u11a8" * 300,
    "\u212b" * 300,
    ">\u0338" * 300 + "=\u0338" * 300,
    "\ufb01 \u2460 \uff21" * 200,  # NFKC: ﬁ -> fi, ① -> 1, Ａ -> A
    "中文" * 500 + "a",
]


def _backend_variant(vocab_size=300, normalizer="NFC", truncate=False, rstrip=False):
    """The fixture's BPE with its normalizer swapped (or truncation / an added token eating spaces)."""
    from tokenizers import AddedToken, normalizers

    from text_fixtures import build_tokenizer

    backend = build_tokenizer(vocab_size)
    if normalizer != "NFC":
        backend.normalizer = None if normalizer is None else getattr(normalizers, normalizer)()
    if truncate:
        backend.enable_truncation(64)
    if rstrip:
        backend.add_tokens([AddedToken("<sep>", rstrip=True)])
    return backend


@pytest.mark.parametrize("normalizer,rule",
                         [("NFC", "ascii"), ("NFKC", "ascii"), ("NFD", "ascii"), (None, "bytes")])
def test_min_tokens_never_exceeds_the_count(normalizer, rule):
    tok = Tokenizer(_backend_variant(normalizer=normalizer))
    assert tok._length_rule == (rule, len("<|endoftext|>"))
    for text in BOUND_TEXTS:
        n = len(tok.encode(text))
        assert tok.min_tokens(text) <= n == tok.count_tokens(text), (normalizer, text[:40])
    # tight for a text of the longest token; bytes / 13 for any ASCII text
    assert tok.min_tokens("<|endoftext|>" * 100) == 100
    text = "The quick brown fox jumps over the lazy dog. " * 100
    assert tok.min_tokens(text) == -(-len(text) // 13)


@pytest.mark.parametrize("variant", [
    dict(vocab_size=251),  # the byte alphabet is incomplete: a byte outside it is dropped, no token at all
    dict(truncate=True),
    dict(rstrip=True),  # an added token that swallows the spaces after it
    dict(normalizer="Lowercase"),  # a normalizer that is not a Unicode normal form
])
def test_min_tokens_gives_no_bound_it_cannot_prove(variant):
    tok = Tokenizer(_backend_variant(**variant))
    assert tok._length_rule is None and tok.min_tokens("x" * 10000) == 0


def test_min_tokens_of_other_models_is_zero():
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    backend = Backend(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    assert Tokenizer(backend).min_tokens("a " * 1000) == 0
