"""``LLM.embed``'s inputs: a typed error naming the offending text or parameter; empty, blank and single-string
inputs give the results sentence-transformers gives."""

from __future__ import annotations

import numpy as np
import pytest

from hyprec.errors import InputTypeError, InvalidInputError
from tests.helpers import assert_same_rows

DIM = 384


# ------------------------------------------------------------------------------------------- embed() inputs


@pytest.mark.parametrize(
    ("texts", "names"),
    [
        pytest.param([1], ["texts[0]", "int", "expected str"], id="int-in-list"),
        pytest.param(["ok", None], ["texts[1]", "NoneType", "expected str"], id="none-in-list"),
        pytest.param(["ok", "fine", b"raw"], ["texts[2]", "bytes", "b'raw'"], id="bytes-in-list"),
        pytest.param([{"text": "hi"}], ["texts[0]", "dict", "expected str"], id="dict-in-list"),
        pytest.param(None, ["texts must be a string or a list of strings", "NoneType"], id="none"),
        pytest.param(42, ["texts must be a string or a list of strings", "int"], id="int"),
        pytest.param(b"raw bytes", ["texts must be a string or a list of strings", "bytes"], id="bytes"),
        pytest.param({"text": "hi"}, ["texts must be a string or a list of strings", "dict"], id="dict"),
        pytest.param({"a", "b"}, ["texts must be a string or a list of strings", "set"], id="set"),
    ],
)
def test_embed_rejects_non_string_texts(minilm_hybrid, texts, names):
    with pytest.raises(InputTypeError) as exc:
        minilm_hybrid.embed(texts)
    for name in names:
        assert name in str(exc.value)
    assert isinstance(exc.value, TypeError)  # still catchable the standard way


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        pytest.param({"dimensions": 0}, InvalidInputError, ["dimensions=0", "positive integer"], id="dim-0"),
        pytest.param({"dimensions": -1}, InvalidInputError, ["dimensions=-1", "positive integer"], id="dim-neg"),
        pytest.param(
            {"dimensions": DIM + 1},
            InvalidInputError,
            [f"dimensions={DIM + 1}", f"at most {DIM}"],
            id="dim-too-big",
        ),
        pytest.param({"dimensions": 8.0}, InputTypeError, ["dimensions=8.0", "positive integer"], id="dim-float"),
        pytest.param({"dimensions": True}, InputTypeError, ["dimensions=True"], id="dim-bool"),
        pytest.param({"batch_size": 0}, InvalidInputError, ["batch_size=0", "positive integer"], id="batch-0"),
        pytest.param(
            {"normalize": "yes"},
            InputTypeError,
            ["normalize", "'yes'", "True, False or None"],
            id="normalize-str",
        ),
        pytest.param(
            {"prompt_name": "query"},
            InvalidInputError,
            ["prompt_name='query'", "its prompts: none"],
            id="unknown-prompt",
        ),
        pytest.param(
            {"prompt": "query: ", "prompt_name": "query"},
            InvalidInputError,
            ["prompt", "prompt_name"],
            id="both-prompts",
        ),
        pytest.param({"prompt": 5}, InputTypeError, ["prompt must be a string", "int"], id="prompt-int"),
    ],
)
def test_embed_rejects_bad_parameters(minilm_hybrid, kwargs, error, names):
    with pytest.raises(error) as exc:
        minilm_hybrid.embed(["hello"], **kwargs)
    for name in names:
        assert name in str(exc.value)


def test_embed_accepts_numpy_integer_dimensions(minilm_hybrid):
    out = minilm_hybrid.embed(["hello"], dimensions=np.int64(8))
    assert out.shape == (1, 8)
    assert np.linalg.norm(out[0]) == pytest.approx(1.0, abs=2 * (8 + 2) * 2**-24)  # float32 norm of 8 values


# ------------------------------------------------------------------------------- empty and whitespace texts


def test_empty_and_whitespace_texts_match_sentence_transformers(minilm_hybrid, st_minilm):
    texts = ["", "   ", "\n\t", "x"]
    ours = minilm_hybrid.embed(texts)
    ref = st_minilm.encode(texts, convert_to_numpy=True)
    assert ours.shape == (4, DIM)
    assert np.isfinite(ours).all()
    cos = (ours * ref).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.99999, cos
    # ST strips whitespace, so the three blank inputs have the same token ids. Their vectors agree to the batch
    # noise of the default mode (float16 attention rounds last-bit GEMM differences between batch positions);
    # bit-identical vectors are what deterministic=True guarantees (test_batch_invariance.py).
    assert_same_rows(ours[[1, 2]], ours[[0, 0]])


@pytest.mark.parametrize(("kwargs", "dim"), [({}, DIM), ({"dimensions": 8}, 8)])
def test_empty_list_returns_empty_array(minilm_hybrid, kwargs, dim):
    out = minilm_hybrid.embed([], **kwargs)
    assert out.shape == (0, dim)
    assert out.dtype == np.float32


def test_single_string_is_one_text(minilm_hybrid):
    one = minilm_hybrid.embed("a single sentence")
    assert one.shape == (1, DIM)
    np.testing.assert_array_equal(one, minilm_hybrid.embed(["a single sentence"]))
