"""The study's text and tokenizers: Python's pydoc topic pages and standard-library docstrings, nothing downloaded.

About a million characters: the 79 pydoc topic pages (~465k) and the docstrings of the public objects of
:data:`DOC_MODULES` (~545k on Python 3.11), ~240k tokens at a 4,096-token vocabulary.

Every tenth topic page (in sorted order) is held out: the calibration and evaluation text of every checkpoint.
The tokenizers are trained here on the training text, so a model's vocabulary fits its small size.
"""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from hyprec.texts import hand_written, pydoc_topics

HELD_OUT_EVERY = 10
SPECIAL_DECODER = ["<pad>", "<s>", "</s>"]
SPECIAL_ENCODER = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
#: Standard-library modules whose docstrings are training text (importing them has no side effects).
DOC_MODULES = [
    "argparse",
    "asyncio",
    "collections",
    "concurrent.futures",
    "contextlib",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "enum",
    "fractions",
    "functools",
    "http.client",
    "http.server",
    "importlib",
    "inspect",
    "io",
    "itertools",
    "json",
    "logging",
    "math",
    "multiprocessing",
    "os",
    "pathlib",
    "pickle",
    "random",
    "re",
    "shutil",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "xml.etree.ElementTree",
    "zipfile",
    "zoneinfo",
]


@dataclass(frozen=True)
class Texts:
    train: list[str]
    held_out: list[str]  # whole topic pages

    def paragraphs(self) -> list[str]:
        """The held-out pages' paragraphs and hyprec's short hand-written sentences (the encoders' evaluation)."""
        paras = [" ".join(p.split()) for page in self.held_out for p in page.split("\n\n") if len(p.split()) >= 8]
        return paras + hand_written()


def stdlib_docstrings(min_chars: int = 80) -> list[str]:
    """The docstrings of :data:`DOC_MODULES`, their public objects and their classes' public members, each once,
    in a fixed order."""
    seen: dict[str, None] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io) warn when touched
        for name in DOC_MODULES:
            module = importlib.import_module(name)
            for obj in [module, *(getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_"))]:
                names = sorted(vars(obj)) if inspect.isclass(obj) else []
                for item in [obj, *(getattr(obj, a, None) for a in names if not a.startswith("_"))]:
                    doc = inspect.getdoc(item) if item is not None else None
                    if doc and len(doc) >= min_chars:
                        seen.setdefault(doc)
    return list(seen)


def study_texts() -> Texts:
    pages = list(pydoc_topics().values())
    held = [p for i, p in enumerate(pages) if i % HELD_OUT_EVERY == 0]
    train = [p for i, p in enumerate(pages) if i % HELD_OUT_EVERY != 0] + stdlib_docstrings()
    return Texts(train, held)


def train_tokenizer(kind: str, texts: list[str], vocab: int) -> Tokenizer:
    """A byte-level BPE for decoders (``<s>`` prepended), a lower-cased WordPiece for BERT (``[CLS] ... [SEP]``)."""
    if kind == "decoder":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=SPECIAL_DECODER, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return tok
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=SPECIAL_ENCODER))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


def save_tokenizer(tok: Tokenizer, kind: str, directory: Path, max_length: int) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` naming the special tokens, as transformers saves them."""
    tok.save(str(directory / "tokenizer.json"))
    if kind == "decoder":
        config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    else:
        config = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]"}
        config |= {"unk_token": "[UNK]", "do_lower_case": True}
    config["model_max_length"] = max_length
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def token_stream(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """All training text as one stream of token ids (no special tokens), pages in order."""
    ids = [i for enc in tok.encode_batch(texts, add_special_tokens=False) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)
