"""Tokenisation with the Hugging Face ``tokenizers`` library, configured like sentence-transformers does."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.implementations import BertWordPieceTokenizer

from hyprec.config import read_json
from hyprec.errors import ModelLoadError


class TextTokenizer:
    """Turns texts into token-id lists truncated to ``max_length`` (special tokens included).

    Args:
        directory: folder holding ``tokenizer.json`` (or a BERT ``vocab.txt``).
        max_length: truncation length in tokens, special tokens included (ST's ``max_seq_length``).
    """

    def __init__(self, directory: Path, max_length: int):
        self.directory = directory
        self.max_length = max_length
        self._tok = self._load(directory)
        # tokenizer.json files often carry their own truncation/padding settings (all-MiniLM-L6-v2's says 128);
        # the pipeline's max_seq_length governs instead, and padding is the engine's business.
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=max_length)

    @staticmethod
    def _load(directory: Path) -> Tokenizer:
        if (directory / "tokenizer.json").exists():
            try:
                return Tokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as exc:  # the Rust side raises a bare Exception
                raise ModelLoadError(f"cannot read tokenizer {directory / 'tokenizer.json'}: {exc}") from None
        if (directory / "vocab.txt").exists():
            cfg = {}
            if (directory / "tokenizer_config.json").exists():
                cfg = read_json(directory / "tokenizer_config.json", "tokenizer config")
            return BertWordPieceTokenizer(
                str(directory / "vocab.txt"), lowercase=bool(cfg.get("do_lower_case", True))
            )._tokenizer
        raise ModelLoadError(f"no tokenizer in {directory}: expected tokenizer.json or vocab.txt")

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.encode_with_flags(texts)[0]

    def encode_with_flags(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids, and for each text whether it was truncated to ``max_length``."""
        encodings = self._tok.encode_batch(texts)
        return [enc.ids for enc in encodings], [bool(enc.overflowing) for enc in encodings]

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]], list[bool]]:
        """Token ids of text pairs (``[CLS] a [SEP] b [SEP]`` for BERT), their segment ids (0 for ``a``, 1 for ``b``),
        and whether each pair was truncated; the longer text loses tokens first, as transformers' tokenizers and
        sentence-transformers' ``CrossEncoder`` truncate."""
        encodings = self._tok.encode_batch(pairs)
        return [e.ids for e in encodings], [e.type_ids for e in encodings], [bool(e.overflowing) for e in encodings]

    def count(self, text: str) -> int:
        """Tokens of one text, special tokens included, after truncation (as ST measures prompt lengths)."""
        return len(self._tok.encode(text).ids)
