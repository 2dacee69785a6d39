"""``hyprec score``, ``rerank`` and ``classify``, called in-process via ``main(argv)`` on a tiny random cross-encoder
and a tiny three-label classifier: what they print equals what :class:`hyprec.LLM` gives, and bad inputs are
errors (exit status 2, one line)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import pytest

from hyprec import LLM
from hyprec.entrypoints import cli
from hyprec.entrypoints.cli import main
from tests.helpers import RERANK_DOCUMENTS as DOCUMENTS
from tests.helpers import RERANK_QUERY as QUERY
from tests.helpers import tiny_cross_encoder

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, LLM]:
    """The cross-encoder (``ce``) and the classifier (``nli``), loaded once: the CLI runs these same instances."""
    root = tmp_path_factory.mktemp("scoring")
    return {
        "ce": LLM(tiny_cross_encoder(root / "ce"), dtype="float32"),
        "nli": LLM(tiny_cross_encoder(root / "nli", labels=3, seed=1), dtype="float32"),
    }


@pytest.fixture(autouse=True)
def cli_models(monkeypatch, models):
    """MODEL ``ce`` or ``nli`` runs the loaded model; any other goes through the real loader."""
    real = cli.load_llm
    monkeypatch.setattr(cli, "load_llm", lambda args, model: models[model] if model in models else real(args, model))


@pytest.fixture
def docs_file(tmp_path):
    """DOCUMENTS[1:] as .jsonl: objects with a "text" field, as `hyprec embed --input` reads them."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCUMENTS[1:])))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, list[dict], str]:
    rc = main(["-q", *argv])
    out, err = capsys.readouterr()
    return rc, [json.loads(line) for line in out.splitlines()], err


def test_score_prints_each_documents_score(capsys, models, docs_file):
    # DOCUMENT arguments after the options (parsed intermixed), then those of --input
    rc, records, err = run_cli(capsys, "score", "ce", "--query", QUERY, DOCUMENTS[0], "--input", str(docs_file))
    assert rc == 0, err
    scores = models["ce"].score(QUERY, DOCUMENTS)
    assert records == [{"index": i, "score": float(s)} for i, s in enumerate(scores)]  # JSON carries them exactly


@pytest.mark.parametrize("return_documents", [False, True])
def test_rerank_prints_results_best_first(capsys, models, docs_file, return_documents):
    flags = ["--return-documents"] if return_documents else []
    rc, records, err = run_cli(
        capsys, "rerank", "ce", "--query", QUERY, DOCUMENTS[0], "--input", str(docs_file), "--top-n", "3", *flags
    )
    assert rc == 0, err
    want = models["ce"].rerank(QUERY, DOCUMENTS, top_n=3, return_documents=return_documents)
    assert len(records) == 3
    assert records == [{k: v for k, v in asdict(r).items() if v is not None} for r in want]
    assert ("document" in records[0]) is return_documents


def test_classify_prints_label_and_probabilities(capsys, models):
    rc, records, err = run_cli(capsys, "classify", "nli", *DOCUMENTS)
    assert rc == 0, err
    want = models["nli"].classify(DOCUMENTS)
    assert records == [{"index": i, "label": o.label, "probs": o.probs} for i, o in enumerate(want)]
    assert {r["label"] for r in records} <= {"LABEL_0", "LABEL_1", "LABEL_2"}


def test_output_file(capsys, models, tmp_path):
    target = tmp_path / "ranked.jsonl"
    rc, records, err = run_cli(capsys, "rerank", "ce", "--query", QUERY, *DOCUMENTS, "--output", str(target))
    assert rc == 0 and records == []  # the results go to the file, not stdout
    assert f"wrote 4 results to {target}" in err
    written = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in written] == [r.index for r in models["ce"].rerank(QUERY, DOCUMENTS)]


def test_a_terminal_gets_a_table(monkeypatch, capsys, models):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["-q", "rerank", "ce", "--query", QUERY, *DOCUMENTS]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"4 of 4 documents, best first, for {QUERY!r} (float32)"
    assert lines[1].split() == ["index", "relevance_score", "text"]
    best = models["ce"].rerank(QUERY, DOCUMENTS)[0]
    index, score, text = lines[2].split(maxsplit=2)
    assert (int(index), float(score), text) == (best.index, round(best.relevance_score, 4), repr(DOCUMENTS[best.index]))


ERRORS = {  # case: (arguments, what the message says); EMPTY stands for an input file without texts
    "empty-input": (["score", "ce", "--query", QUERY, "--input", "EMPTY"], "no documents: give DOCUMENT"),
    "no-texts": (["classify", "nli"], "no texts: give TEXT arguments or --input FILE"),
    "score-with-a-classifier": (["score", "nli", "--query", QUERY, "a"], "score needs a cross-encoder with one"),
    "classify-with-embeddings": (["classify", "minilm", "a"], "classify needs a sequence-classification model"),
    "bad-top-n": (["rerank", "ce", "--query", QUERY, "a", "--top-n", "0"], "top_n=0"),
    "bad-output": (["score", "ce", "--query", QUERY, "a", "--output", "scores.npy"], "expected a .jsonl"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_exit_2_with_one_line(capsys, tmp_path, case):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    argv, message = ERRORS[case]
    rc = main(["-q", *(str(empty) if a == "EMPTY" else a for a in argv)])
    out, err = capsys.readouterr()
    assert (rc, out) == (2, "")
    assert err.startswith("hyprec: error: ") and message in err and "Traceback" not in err


def test_a_missing_query_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["-q", "rerank", "ce", "a", "b"])
    assert exc.value.code == 2
    assert "the following arguments are required: --query" in capsys.readouterr().err
