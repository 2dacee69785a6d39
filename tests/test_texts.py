"""The built-in real evaluation text."""

from __future__ import annotations

import pytest

from hyprec.texts import evaluation_texts, ranking_texts


@pytest.mark.parametrize("n", [40, 41, 43, 44, 64, 200, 400])
def test_evaluation_texts_gives_n_distinct_texts(n):
    texts = evaluation_texts(n)
    assert len(texts) == n and len(set(texts)) == n
    assert all(isinstance(t, str) and t for t in texts)


def test_the_mix_has_long_and_very_short_texts():
    texts = evaluation_texts(200)
    assert sum(len(t) > 3000 for t in texts) >= 20  # truncated by every model
    assert min(map(len, texts)) <= 3  # single words
    with pytest.raises(ValueError, match="at least 40"):
        evaluation_texts(39)


def test_ranking_texts_are_short_queries_and_longer_documents():
    queries, documents = ranking_texts(4, 12)
    assert len(set(queries)) == 4 and len(set(documents)) == 12
    assert all(len(q.split()) > 3 for q in queries)  # sentences, not single words
    assert max(map(len, queries)) < min(map(len, documents))
