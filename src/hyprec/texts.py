"""Real evaluation and calibration text that ships with Python: no downloads.

The mix follows the shared baselines: long pydoc topic pages (truncated by every model), paragraphs of those
pages, standard-library docstrings, and short hand-written sentences (down to single words).
"""

from __future__ import annotations

import importlib
import inspect
from importlib import resources

_DOC_MODULES = (
    "json",
    "os",
    "itertools",
    "functools",
    "collections",
    "re",
    "math",
    "string",
    "textwrap",
    "statistics",
    "shutil",
    "pathlib",
    "random",
    "heapq",
    "bisect",
    "datetime",
)


def hand_written() -> list[str]:
    """Forty short sentences on varied topics, the last ones down to single words."""
    return resources.files("hyprec.data").joinpath("sentences.txt").read_text(encoding="utf-8").splitlines()


def pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def _paragraphs(text: str, min_chars: int = 80) -> list[str]:
    return [" ".join(p.split()) for p in text.split("\n\n") if len(" ".join(p.split())) >= min_chars]


def _topic_paragraphs(topics: dict[str, str]) -> list[str]:
    """The paragraphs of every pydoc topic page, each once, in topic order."""
    return list(dict.fromkeys(p for text in topics.values() for p in _paragraphs(text)))


def docstrings() -> list[str]:
    """First paragraphs of public standard-library function docstrings, in a fixed order."""
    out = []
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        for attr in sorted(dir(module)):
            doc = inspect.getdoc(getattr(module, attr)) if not attr.startswith("_") else None
            if doc and len(doc) > 40:
                out.append(" ".join(doc.split("\n\n")[0].split()))
    return list(dict.fromkeys(out))


def evaluation_texts(n: int = 200) -> list[str]:
    """``n`` real texts (n >= 40): 10% long pages, 40 short sentences, the rest paragraphs and docstrings."""
    if n < 40:
        raise ValueError(f"n={n}: expected at least 40")
    topics = pydoc_topics()
    n_long = n // 10
    long_pages = sorted(topics.values(), key=len, reverse=True)[:n_long]
    paragraphs = _topic_paragraphs(topics)
    docs = [d for d in docstrings() if d not in paragraphs]
    short = hand_written()[: n - n_long]  # for n < 44 the long pages eat into the sentences' share
    rest = n - n_long - len(short)
    n_par = rest - rest // 3
    return long_pages + _spread(paragraphs, n_par) + _spread(docs, rest - n_par) + short


def ranking_texts(queries: int = 5, documents: int = 20) -> tuple[list[str], list[str]]:
    """Queries and documents to score each against each (cross-encoders): ``queries`` short hand-written sentences
    on varied topics (single words left out) and ``documents`` paragraphs of the pydoc topic pages, each picked
    evenly across its pool."""
    sentences = [s for s in hand_written() if len(s.split()) > 3]
    return _spread(sentences, queries), _spread(_topic_paragraphs(pydoc_topics()), documents)


def _spread(items: list[str], k: int) -> list[str]:
    """``k`` items picked evenly across ``items`` so that every topic and module contributes."""
    if k > len(items):
        raise ValueError(f"asked for {k} texts from a pool of {len(items)}")
    return [items[i * len(items) // k] for i in range(k)]
