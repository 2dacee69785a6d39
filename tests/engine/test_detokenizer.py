"""Incremental detokenisation and stop-string search (``hyprec.engine.detokenizer``) on Gemma's real tokenizer."""

from __future__ import annotations

import itertools
import random

import pytest

from hyprec.engine.detokenizer import IncrementalDetokenizer, find_stop

TEXTS = [
    "Ünïcödé — “quotes”, 🙂🎉 emoji, 中文字符 and 日本語\n\n  indented  ",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
]


@pytest.fixture(scope="module")
def tokenizer(gemma_fp32):
    return gemma_fp32.engine.tokenizer.tokenizer


def test_streamed_text_is_the_full_decode_at_every_complete_character(tokenizer):
    from hyprec.texts import pydoc_topics

    for text in [*TEXTS, *list(pydoc_topics().values())[:2]]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        stream = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
        for n, token in enumerate(ids, 1):
            piece = stream.append(token)
            assert stream.text.endswith(piece)
            full = tokenizer.decode(ids[:n], skip_special_tokens=True)
            if not full.endswith("\ufffd"):  # a partial UTF-8 character is held back, not shown as U+FFFD
                assert stream.text == full
        assert stream.text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("skip", [True, False])
def test_random_tokens_stream_to_the_full_decode(tokenizer, skip):
    rng = random.Random(0)
    vocab = tokenizer.get_vocab_size()
    for _ in range(200):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        stream = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
        for token in ids:
            stream.append(token)
        assert stream.text == tokenizer.decode(ids, skip_special_tokens=skip)


def test_a_character_split_over_byte_tokens_is_held_back_until_complete(tokenizer):
    dash = [tokenizer.token_to_id(f"<0x{b:02X}>") for b in "—".encode()]  # U+2014 as three byte tokens
    stream = IncrementalDetokenizer(tokenizer, skip_special_tokens=True)
    stream.append(tokenizer.token_to_id("▁lever"))
    assert [stream.append(t) for t in dash] == ["", "", "—"]
    assert stream.text == " lever—" == tokenizer.decode([tokenizer.token_to_id("▁lever"), *dash])
    stream.append(dash[0])  # an unfinished character stays out of the text; the full decode shows U+FFFD
    assert stream.text == " lever—" and tokenizer.decode([*dash, dash[0]]).endswith("\ufffd")


def test_stop_strings_are_searched_only_where_a_new_one_can_end():
    text = "alpha STOP beta ST"
    assert find_stop(text, 2, ["STOP"]) is None  # "STOP" lies wholly in text already searched
    assert find_stop(text + "OP", 2, ["STOP"]) == ("STOP", 16)  # spans the old and the new text
    assert find_stop("x END y", 7, ["y", "END"]) == ("y", 6)  # list order, as vLLM checks them
    assert find_stop("abc", 0, ["c"]) is None


def test_streamed_generation_grows_by_prefixes_and_ends_as_the_full_decode(gemma_fp32):
    from hyprec import SamplingParams

    params = SamplingParams(temperature=0.8, seed=3, max_tokens=40, logprobs=2)
    texts, last = [], None
    for out in gemma_fp32.stream("Emoji and accents: café, naïve, 🙂 —", params):
        texts.append(out.outputs[0].text)
        last = out.outputs[0]
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))
    tok = gemma_fp32.engine.tokenizer
    assert last.text == tok.decode(last.token_ids) and len(last.logprobs) == len(last.token_ids) == 40
    chosen = [entry[token] for entry, token in zip(last.logprobs, last.token_ids, strict=True)]
    assert last.cumulative_logprob == pytest.approx(sum(chosen))
