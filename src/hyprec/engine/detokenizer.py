"""A sequence's output text, decoded one token at a time, and the stop strings found in it.

Decoding the whole output again for every new token costs O(length) per step, O(length^2) per sequence. The
``tokenizers`` library's ``DecodeStream`` (what vLLM's fast incremental detokenizer is built on) keeps a small window
of recent tokens and returns only the new text, holding back a token whose bytes do not yet form a whole UTF-8
character (byte-fallback pieces) and handling the decoders' word-boundary rules (a SentencePiece ``▁`` becomes a
space except at the start). The concatenated pieces equal the full decode (``tests/engine/test_detokenizer.py``
checks it token by token on real and random output).

Stop strings are searched only where a new one can be: in the new text and the ``len(stop) - 1`` characters
before it.
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """The text of one sequence's generated tokens, grown by :meth:`append`.

    Args:
        tokenizer: the fast tokenizer of the model.
        skip_special_tokens: leave special tokens out of the text (``SamplingParams.skip_special_tokens``).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""

    def append(self, token: int) -> str:
        """Add one generated token; returns the text it completed (empty while a character is still partial)."""
        piece = self._stream.step(self._tokenizer, token) or ""
        self.text += piece
        return piece


def find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[str, int] | None:
    """The first of ``stops`` (in their order, as vLLM checks them) that ends within the last ``new_chars`` characters
    of ``text``, and where it starts; or None. Earlier text was searched when it was new, so only the window a new
    match can touch is read."""
    for stop in stops:
        at = text.find(stop, max(0, len(text) - new_chars - len(stop) + 1))
        if at >= 0:
            return stop, at
    return None
