"""The ``hyprec`` command line, called in-process via ``main(argv)``, plus one run of the installed script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hyprec.entrypoints import cli
from hyprec.entrypoints.cli import main
from tests.helpers import assert_same_rows

DIM = 384
# The CLI runs the same engine (the cached minilm_hybrid) on the same inputs in the same batch as the in-process
# reference, and JSON carries float32 values exactly (tolist() gives the exact double, json writes its shortest
# round-trip repr). Only a float32 re-rounding of the parsed value could differ: at most one float32 unit of
# these |x| <= 1 values (float32 eps = 1.2e-7).
SAME_RUN_TOL = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def _llm_cache() -> dict:
    return {}


@pytest.fixture(autouse=True)
def reuse_models(monkeypatch, minilm_hybrid, _llm_cache):
    """Load each (model, dtype options) once per module; the default CLI model is the session's minilm_hybrid.

    Options the cache has not seen go through the real ``cli.load_llm`` (so bad options still fail there).
    """
    real = cli.load_llm
    _llm_cache.setdefault((None, "auto", "auto", "auto", "cpu"), minilm_hybrid)

    def cached(args, model):
        key = (model, args.dtype, args.attn_dtype, args.kv_cache_dtype, args.device)
        if key not in _llm_cache:
            _llm_cache[key] = real(args, model)
        return _llm_cache[key]

    monkeypatch.setattr(cli, "load_llm", cached)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["-q", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def parse_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def embeddings_of(records: list[dict]) -> np.ndarray:
    assert [r["index"] for r in records] == list(range(len(records)))
    return np.array([r["embedding"] for r in records], dtype=np.float32)


# ------------------------------------------------------------------------------------------------- embed


def test_embed_arguments_print_json_lines(capsys, minilm_hybrid):
    rc, out, err = run_cli(capsys, "embed", "a", "b")
    assert rc == 0, err
    records = parse_lines(out)
    assert len(out.splitlines()) == 2
    assert set(records[0]) == {"index", "embedding"}
    got = embeddings_of(records)
    np.testing.assert_allclose(got, minilm_hybrid.embed(["a", "b"]), rtol=0, atol=SAME_RUN_TOL)


def test_embed_input_txt(capsys, tmp_path, minilm_hybrid):
    path = tmp_path / "texts.txt"
    path.write_text("first line of text\nsecond line\nthird, with a comma\n", encoding="utf-8")
    rc, out, err = run_cli(capsys, "embed", "from the argument", "--input", str(path))
    assert rc == 0, err
    texts = ["from the argument", "first line of text", "second line", "third, with a comma"]  # args first
    np.testing.assert_allclose(embeddings_of(parse_lines(out)), minilm_hybrid.embed(texts), rtol=0, atol=SAME_RUN_TOL)


def test_embed_input_jsonl(capsys, tmp_path, minilm_hybrid):
    path = tmp_path / "texts.jsonl"
    lines = ['"a plain JSON string"', '{"text": "an object with text", "id": 7}', "", '{"text": "ünïcödé ✓"}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rc, out, err = run_cli(capsys, "embed", "--input", str(path))
    assert rc == 0, err
    texts = ["a plain JSON string", "an object with text", "ünïcödé ✓"]  # blank line skipped
    np.testing.assert_allclose(embeddings_of(parse_lines(out)), minilm_hybrid.embed(texts), rtol=0, atol=SAME_RUN_TOL)


def test_embed_output_npy(capsys, tmp_path, minilm_hybrid):
    target = tmp_path / "vectors.npy"
    rc, out, err = run_cli(capsys, "embed", "one", "two", "three", "--output", str(target))
    assert rc == 0, err
    assert out == ""  # vectors go to the file, not stdout
    assert f"wrote 3 x {DIM} embeddings to {target}" in err
    got = np.load(target)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, minilm_hybrid.embed(["one", "two", "three"]))


def test_embed_output_jsonl(capsys, tmp_path, minilm_hybrid):
    target = tmp_path / "vectors.jsonl"
    rc, out, err = run_cli(capsys, "embed", "one", "two", "--output", str(target))
    assert rc == 0, err
    assert out == ""
    assert f"wrote 2 x {DIM} embeddings to {target}" in err
    got = embeddings_of(parse_lines(target.read_text(encoding="utf-8")))
    np.testing.assert_allclose(got, minilm_hybrid.embed(["one", "two"]), rtol=0, atol=SAME_RUN_TOL)


def test_embed_dimensions(capsys, minilm_hybrid):
    rc, out, err = run_cli(capsys, "embed", "a", "b", "--dimensions", "8")
    assert rc == 0, err
    got = embeddings_of(parse_lines(out))
    assert got.shape == (2, 8)
    # Re-normalised: a float32 norm of 8 values is within (8 + 2) u of exact (u = 2^-24), doubled.
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=0, atol=2 * (8 + 2) * 2**-24)
    np.testing.assert_allclose(got, minilm_hybrid.embed(["a", "b"], dimensions=8), rtol=0, atol=SAME_RUN_TOL)


def test_embed_no_normalize(capsys, minilm_hybrid):
    rc, out, err = run_cli(capsys, "embed", "a longer sentence here", "--no-normalize")
    assert rc == 0, err
    got = embeddings_of(parse_lines(out))
    assert abs(float(np.linalg.norm(got[0])) - 1.0) > 1e-3
    expected = minilm_hybrid.embed(["a longer sentence here"], normalize=False)  # not unit-norm: relative
    np.testing.assert_allclose(got, expected, rtol=SAME_RUN_TOL, atol=0)


# -------------------------------------------------------------------------------------------------- info


def test_info_text(capsys):
    rc, out, err = run_cli(capsys, "info")
    assert rc == 0, err
    fields = {line.split()[0]: line.split(maxsplit=1)[-1] for line in out.splitlines() if line.strip()}
    assert fields["architecture"] == "BertModel"
    assert fields["embedding_dimension"] == str(DIM)
    assert fields["pipeline"] == "Transformer(max_seq_length=256) -> Pooling(mean) -> Normalize"
    assert "policy" in out.splitlines()  # section header
    assert fields["policy"] == "hybrid-fp16"  # the indented policy name under the header
    assert "attn_dtype" in fields


def test_info_json(capsys, minilm_dir):
    rc, out, err = run_cli(capsys, "info", str(minilm_dir), "--json", "--dtype", "float32")
    assert rc == 0, err
    info = json.loads(out)
    assert info["architecture"] == "BertModel"
    assert info["embedding_dimension"] == DIM
    assert info["pipeline"].startswith("Transformer(")
    assert info["policy"]["policy"] == "float32"
    assert info["policy"]["attn_dtype"] == "float32"


# ------------------------------------------------------------------------------------------------ errors


def _error_cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    csv = tmp / "texts.csv"
    csv.write_text("a,b\n")
    bad_jsonl = tmp / "bad.jsonl"
    bad_jsonl.write_text('"fine"\n{"text": oops}\n')
    no_text = tmp / "notext.jsonl"
    no_text.write_text('{"body": "no text field"}\n')
    empty = tmp / "empty.txt"
    empty.write_text("")
    missing = tmp / "missing.txt"
    return {
        "missing-input": (["embed", "--input", str(missing)], [f"--input {missing}", "file not found"]),
        "unsupported-suffix": (["embed", "--input", str(csv)], [f"--input {csv}", ".txt or .jsonl"]),
        "bad-jsonl-line": (["embed", "--input", str(bad_jsonl)], [f"{bad_jsonl}:2:", "invalid JSON"]),
        "jsonl-without-text": (["embed", "--input", str(no_text)], [f"{no_text}:1:", '"text"']),
        "no-texts": (["embed"], ["no texts", "TEXT", "--input"]),
        "empty-input-file": (["embed", "--input", str(empty)], ["no texts"]),
        "bad-dtype": (
            ["embed", "hi", "--dtype", "fp8"],
            ["dtype='fp8'", "auto, float32, float16, bfloat16, hybrid"],
        ),
        "bad-combination": (
            ["embed", "hi", "--dtype", "float32", "--attn-dtype", "float16"],
            ["dtype='float32'", "attn_dtype"],
        ),
        "bad-device": (["embed", "hi", "--device", "tpu"], ["device='tpu'"]),
        "bad-output-suffix": (
            ["embed", "hi", "--output", str(tmp / "v.csv")],
            [f"--output {tmp / 'v.csv'}", ".npy or .jsonl"],
        ),
        "bad-dimensions": (["embed", "hi", "--dimensions", "0"], ["dimensions=0"]),
        "unknown-prompt": (["embed", "hi", "--prompt-name", "query"], ["prompt_name='query'"]),
        "missing-model": (["info", str(tmp / "nope")], [str(tmp / "nope"), "neither a local directory"]),
    }


ERROR_IDS = [
    "missing-input",
    "unsupported-suffix",
    "bad-jsonl-line",
    "jsonl-without-text",
    "no-texts",
    "empty-input-file",
    "bad-dtype",
    "bad-combination",
    "bad-device",
    "bad-output-suffix",
    "bad-dimensions",
    "unknown-prompt",
    "missing-model",
]


@pytest.mark.parametrize("case", ERROR_IDS)
def test_errors_exit_2_with_message(capsys, tmp_path, case):
    cases = _error_cases(tmp_path)
    assert set(cases) == set(ERROR_IDS)
    argv, names = cases[case]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert err.startswith("hyprec: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["embed", "hi", "--dimensions", "abc"])
    assert exc.value.code == 2
    assert "argument --dimensions: invalid int value: 'abc'" in capsys.readouterr().err


def test_output_into_missing_directory(capsys, tmp_path):
    target = tmp_path / "no-such-dir" / "v.npy"
    rc, _, err = run_cli(capsys, "embed", "hi", "--output", str(target))
    assert rc == 2
    assert err.startswith("hyprec: error: ") and str(target) in err


# ------------------------------------------------------------------------------------------ console script


def test_installed_console_script(minilm_hybrid):
    script = Path(sys.executable).parent / "hyprec"
    assert script.exists(), f"console script not installed next to {sys.executable}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [str(script), "-q", "embed", "hi"], capture_output=True, text=True, env=env, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stderr
    records = parse_lines(proc.stdout)
    assert len(records) == 1
    got = embeddings_of(records)
    assert got.shape == (1, DIM)
    # Another process: the same kernels, but nothing pins its thread count or library state to this one's, so
    # compare with the tolerance for last-bit float32 differences under float16 attention (see assert_same_rows).
    assert_same_rows(got, minilm_hybrid.embed(["hi"]))
