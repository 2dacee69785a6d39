"""Hardening of the command line and its tools (issue 9): Ray sizing, non-finite weights in ``hyprec check``,
output paths, precision-plan validation, decoder embeddings, and newcomer friction (help, -q, Ctrl-C, logs, the
terminal summary of ``hyprec embed``).

CLI calls run in-process through ``main(argv)``; only the Ray item, which is about a process that hangs, runs the
installed ``hyprec`` script in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from hyprec import LLM
from hyprec.entrypoints import cli
from hyprec.entrypoints.cli import build_parser, main
from hyprec.errors import ConfigError, InvalidInputError
from hyprec.precision.plan import PLAN_FORMAT, PLAN_VERSION, PrecisionPlan
from tests.helpers import assert_same_rows, model_copy, write_gguf

F32_EPS = float(np.finfo(np.float32).eps)
NAN_WEIGHT = "encoder.layer.2.attention.self.query.weight"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def minilm_loads(monkeypatch, minilm_hybrid):
    """The CLI's default model is the session's minilm (loading it again costs seconds); other models load."""
    real = cli.load_llm

    def load(args, model):
        default = model is None and (args.dtype, args.attn_dtype, args.kv_cache_dtype) == ("auto",) * 3
        return minilm_hybrid if default and args.precision_plan is None else real(args, model)

    monkeypatch.setattr(cli, "load_llm", load)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


# ------------------------------------------------------------------ 0: embed-dataset sized to the Ray runtime


def test_embed_dataset_with_one_actor_per_cpu_finishes(tmp_path, minilm_hybrid):
    """The README's example as a user runs it: its own local Ray runtime and --concurrency = the CPU count (2 x 1
    CPU actors used to take the whole runtime, and the read task waited forever). Bounded by a hard timeout."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    import pyarrow.parquet as pq

    cpus = os.cpu_count() or 1
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # a runtime of its own
    if cpus > 4:  # keep the test small on big machines: a 4-CPU runtime with one actor per CPU is the same case
        cpus = 4
        env["RAY_OVERRIDE_RESOURCES"] = json.dumps({"CPU": cpus})
    texts = [f"sentence number {i} about half precision" for i in range(24)]
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    script = Path(sys.executable).parent / "hyprec"
    command = [str(script), "-q", "embed-dataset", "--input", str(source), "--output", str(tmp_path / "out")]
    command += ["--concurrency", str(cpus), "--batch-size", "8"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session holds the driver and the Ray processes it started
        _, err = proc.communicate()
        pytest.fail(f"embed-dataset --concurrency {cpus} on {cpus} CPUs did not finish in 300 s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    table = pq.read_table(tmp_path / "out" / "embeddings.parquet")
    assert table.column("id").to_pylist() == list(range(len(texts)))
    got = np.array(table.column("embedding").to_pylist(), dtype=np.float32)
    assert got.shape == (len(texts), 384)
    # Actors run their own thread counts and batches: LLM.embed within the batch-invariance tolerance.
    assert_same_rows(got, minilm_hybrid.embed(texts))


def test_actors_are_sized_to_leave_room_for_reading():
    from hyprec.ray import plan_cpus

    for cpus, concurrency in [(1, 1), (2, 2), (2, 1), (3, 2), (4, 8), (16, 2)]:
        actor, read = plan_cpus(float(cpus), concurrency, None)
        assert 0 < actor <= 1 and 0 < read <= 1
        assert concurrency * actor + read <= cpus  # Ray can place all actors and a read task together
    assert plan_cpus(16.0, 2, None) == (1.0, 1.0)
    assert plan_cpus(2.0, 2, 0.5) == (0.5, 1.0)


@pytest.mark.parametrize(("cpus", "concurrency", "per_actor"), [(2.0, 2, 1.0), (4.0, 3, 1.5)])
def test_actor_requests_that_cannot_be_scheduled_are_refused(cpus, concurrency, per_actor):
    from hyprec.ray import plan_cpus

    with pytest.raises(InvalidInputError, match=r"leaves none of the Ray runtime's .* CPUs for reading"):
        plan_cpus(cpus, concurrency, per_actor)
    with pytest.raises(InvalidInputError, match="expected a positive number"):
        plan_cpus(cpus, concurrency, 0.0)


def test_a_stalled_dataset_says_what_ray_waits_for(caplog):
    from hyprec.ray import StallWarning

    described = threading.Event()

    def describe() -> str:
        described.set()
        return "Ray has 0 of 2 CPUs free"

    with caplog.at_level("WARNING", logger="hyprec"), StallWarning(0.01, describe):
        assert described.wait(timeout=60), "no stall warning"
    assert "no rows for" in caplog.text and "Ray has 0 of 2 CPUs free" in caplog.text


# ------------------------------------------------------------------ 6: non-finite weights fail `hyprec check`


@pytest.fixture
def minilm_with_nan(minilm_dir, tmp_path) -> Path:
    """all-MiniLM-L6-v2 with one NaN in layer 2's query projection."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(minilm_dir / "model.safetensors"))
    state[NAN_WEIGHT][3, 5] = float("nan")
    model = model_copy(minilm_dir, tmp_path / "nan-model", replace=("model.safetensors",))
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


@pytest.fixture
def calibration_file(tmp_path) -> Path:
    path = tmp_path / "calibration.txt"
    path.write_text("The cat sat on the mat.\nHalf precision overflows above 65504.\n")
    return path


def test_check_fails_every_policy_on_nan_weights(capsys, minilm_with_nan, calibration_file):
    rc, out, err = run_cli(capsys, "-q", "check", str(minilm_with_nan), "--texts", str(calibration_file))
    assert rc == cli.CHECK_FOUND_NON_FINITE, err
    assert "Traceback" not in err and NAN_WEIGHT in err and "layer 2" in err
    assert "NON-FINITE" in out and f"{NAN_WEIGHT} (layer 2): 1 NaN" in out
    verdict_lines = [line for line in out.splitlines() if line.split()[:1] in (["float16"], ["hybrid-fp16"])]
    assert len(verdict_lines) == 2 and all("fails" in line and NAN_WEIGHT in line for line in verdict_lines)
    assert "recommended  none" in out

    rc, out, _ = run_cli(capsys, "-q", "check", str(minilm_with_nan), "--texts", str(calibration_file), "--json")
    assert rc == cli.CHECK_FOUND_NON_FINITE

    def no_nan(token: str) -> float:
        raise AssertionError(f"--json printed {token}: not JSON")

    report = json.loads(out, parse_constant=no_nan)  # strict JSON: NaN statistics are null
    assert {v["verdict"] for v in report["verdicts"].values()} == {"fails"}
    detail = "1 NaN, 0 inf of 147456 values"
    assert report["non_finite"][0] == {"layer": "layer 2", "tensor": NAN_WEIGHT, "detail": detail}


def test_check_fails_on_a_decoder_whose_float32_logits_are_nan(tiny_dir, tmp_path, capsys):
    """Decoders refuse non-finite logits (NonFiniteOutputError): check reports it instead of crashing."""
    from safetensors.torch import load_file, save_file

    model = model_copy(tiny_dir, tmp_path / "nan-llama", replace=("model.safetensors",))
    state = load_file(str(tiny_dir / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    texts = tmp_path / "texts.txt"
    texts.write_text("w1 w2 w3 w4\nw5 w6 w7\n")
    rc, out, err = run_cli(capsys, "-q", "check", str(model), "--texts", str(texts))
    assert rc == cli.CHECK_FOUND_NON_FINITE, err
    assert "model.layers.1.mlp.down_proj.weight (layer 1): 0 NaN, 1 inf" in out
    assert "logits (output)" in out  # the calibration pass's own failure is listed too


# ------------------------------------------------------------------ 7: output paths checked before the work


def _forbid_work(monkeypatch) -> None:
    """Every command's expensive step fails the test if it is reached."""

    def work(*_args, **_kwargs):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(cli, "load_llm", work)
    monkeypatch.setattr("hyprec.tools.check.check", work)
    monkeypatch.setattr("hyprec.tools.repair.repair", work)
    try:
        import ray

        monkeypatch.setattr(ray, "init", work)
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
    except ImportError:
        pass


def _output_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    existing_dir = tmp / "taken.npy"
    existing_dir.mkdir()
    (tmp / "plan.json").mkdir()
    (tmp / "chart.png").mkdir()
    a_file = tmp / "file.txt"
    a_file.write_text("not a directory")
    corpus = tmp / "corpus.jsonl"
    corpus.write_text('{"text": "hi"}\n')
    cases = {
        "embed-into-directory": (["embed", "hi", "--output", str(existing_dir)], "is an existing directory"),
        "embed-under-a-file": (["embed", "hi", "--output", str(a_file / "v.npy")], "is not a directory"),
        "repair-into-directory": (["repair", "--output", str(tmp / "plan.json")], "is an existing directory"),
        "check-plot-into-directory": (["check", "--plot", str(tmp / "chart.png")], "is an existing directory"),
        "check-plot-missing-directory": (["check", "--plot", str(tmp / "no" / "c.png")], "does not exist"),
        "embed-dataset-onto-a-file": (
            ["embed-dataset", "--input", str(corpus), "--output", str(a_file)],
            "exists and is not a directory",
        ),
    }
    if Path("/proc").is_dir():  # a directory nobody can create files in, root included
        cases["embed-unwritable-directory"] = (["embed", "hi", "--output", "/proc/v.npy"], "cannot write in /proc")
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "embed-into-directory",
        "embed-under-a-file",
        "embed-unwritable-directory",
        "repair-into-directory",
        "check-plot-into-directory",
        "check-plot-missing-directory",
        "embed-dataset-onto-a-file",
    ],
)
def test_outputs_are_checked_before_the_work(monkeypatch, capsys, tmp_path, case):
    cases = _output_cases(tmp_path)
    if case not in cases:
        pytest.skip("no /proc on this system")
    if case.startswith("embed-dataset"):
        pytest.importorskip("ray", reason="the ray extra is not installed")
    argv, reason = cases[case]
    _forbid_work(monkeypatch)
    rc, out, err = run_cli(capsys, "-q", *argv)
    assert rc == 2, err
    assert err.startswith("hyprec: error: --") and reason in err and "Traceback" not in err
    assert out == ""


def test_a_late_write_failure_keeps_the_embeddings(monkeypatch, capsys, tmp_path, minilm_hybrid):
    """The output directory vanishes while the model works: the vectors go to a rescue file the error names."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rescue_dir = tmp_path / "rescue"
    rescue_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue_dir))

    def load_then_lose_the_directory(_args, _model):
        shutil.rmtree(out_dir)
        return minilm_hybrid

    monkeypatch.setattr(cli, "load_llm", load_then_lose_the_directory)
    rc, _, err = run_cli(capsys, "-q", "embed", "one", "two", "--output", str(out_dir / "v.npy"))
    assert rc == 2 and "Traceback" not in err
    assert f"cannot write the embeddings to {out_dir / 'v.npy'}" in err
    (rescued,) = rescue_dir.glob("hyprec-v-*.npy")
    assert f"saved it to {rescued} instead" in err
    np.testing.assert_array_equal(np.load(rescued), minilm_hybrid.embed(["one", "two"]))


def test_outputs_replace_a_file_only_when_complete(tmp_path):
    from hyprec.output_files import write_output

    target = tmp_path / "v.npy"
    np.save(target, np.zeros(3))

    def fail_halfway(path: Path) -> None:
        path.write_bytes(b"half")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        write_output(target, fail_halfway, "the vectors")
    np.testing.assert_array_equal(np.load(target), np.zeros(3))  # the old file stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npy"]  # no partial file left behind


# ------------------------------------------------------------------ 8: every field of a plan file is validated


def _plan_dict() -> dict:
    """A complete plan as `hyprec repair` writes it (two layers, every record filled)."""
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "model": {"name": "tiny", "architecture": "LlamaForCausalLM", "fingerprint": "ab" * 32},
        "target": "float16",
        "residual_scale_log2": -4,
        "ffn_scale_log2": [0, -1],
        "layers": [{"linear": "float16", "attention": "float16"}, {"linear": "float32", "attention": "bfloat16"}],
        "edges": "float16",
        "tolerance": {"metric": "top1_agreement", "min": 0.995, "search_margin": 0.0016},
        "calibration": {
            "sha256": "cd" * 32,
            "texts": 8,
            "tokens": 2048,
            "validation_sha256": "ef" * 32,
            "validation_texts": 8,
            "validation_tokens": 2040,
        },
        "measured": {
            "calibration": {"top1_agreement": 0.9966, "ppl_ratio": 1.001, "non_finite": 0, "tokens": 2040},
            "validation": {"top1_agreement": 0.9971, "ppl_ratio": float("nan"), "non_finite": 0, "tokens": 2032},
            "meets_tolerance": True,
        },
        "search": {
            "method": "greedy segment search with bisection",
            "validations": 3,
            "seconds": 12.5,
            "kept_out": ["1"],
            "safe_layers": "float32 weights, bfloat16 attention (bound)",
            "peak_residual_float32": 1.0e5,
            "trials": [{"units": "edges, 0-1", "accepted": False, "top1_agreement": 0.9}],
        },
    }


def test_a_complete_plan_file_loads(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan_dict()))
    plan = PrecisionPlan.load(path)
    assert plan.tolerance["min"] == 0.995 and plan.search["kept_out"] == ["1"]
    assert plan.as_dict().keys() == _plan_dict().keys()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(tolerance=5), "field 'tolerance' = 5: expected an object"),
        (lambda d: d.update(measured="abc"), "field 'measured' = 'abc': expected an object"),
        (lambda d: d["tolerance"].update(min="high"), "field 'tolerance.min' = 'high': expected a number in (0, 1]"),
        (lambda d: d["tolerance"].update(min=5), "field 'tolerance.min' = 5: expected a number in (0, 1]"),
        (lambda d: d["calibration"].update(texts=-1), "field 'calibration.texts' = -1: expected a non-negative"),
        (lambda d: d["measured"].update(meets_tolerance="yes"), "field 'measured.meets_tolerance' = 'yes'"),
        (lambda d: d["measured"].update(validation=[1]), "field 'measured.validation' = [1]: expected an object"),
        (lambda d: d["search"].update(trials=[1]), "field 'search.trials[0]' = 1: expected an object"),
        (lambda d: d["search"].update(kept_out="1"), "field 'search.kept_out' = '1': expected a list of strings"),
        (lambda d: d["search"].update(seconds="fast"), "field 'search.seconds' = 'fast'"),
        (lambda d: d["model"].update(name=3), "field 'model.name' = 3: expected a string"),
        (lambda d: d["model"].update(fingerprint=None), "field 'model.fingerprint' = None: expected a string"),
        (lambda d: d["tolerance"].update(mni=0.9), "field 'tolerance.mni': unknown"),
        (lambda d: d.update(tolerence={}), "unknown field(s) 'tolerence'"),
        (lambda d: d["layers"][1].update(extra=1), "layers[1] = "),
    ],
)
def test_malformed_plan_fields_are_named(tmp_path, edit, message):
    raw = _plan_dict()
    edit(raw)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        PrecisionPlan.load(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_a_malformed_plan_is_a_cli_error(capsys, tmp_path):
    raw = _plan_dict() | {"tolerance": 5}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    rc, out, err = run_cli(capsys, "-q", "embed", "hi", "--precision-plan", str(path))
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err.startswith(f"hyprec: error: {path}: field 'tolerance' = 5")


# ------------------------------------------------------------------ 10: decoder embeddings


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    return LLM(tiny_dir, dtype="float32", max_model_len=64, num_kv_blocks=16)


def test_decoder_dimensions_are_cut_then_renormalised(tiny_llm):
    texts = ["w1 w2 w3", "w4 w5", "w6"]
    raw = tiny_llm.embed(texts, normalize=False)
    cut = tiny_llm.embed(texts, dimensions=8)
    assert cut.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, rtol=0, atol=8 * F32_EPS)
    expected = raw[:, :8] / np.linalg.norm(raw[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, rtol=0, atol=8 * F32_EPS)
    np.testing.assert_array_equal(tiny_llm.embed(texts, dimensions=8, normalize=False), raw[:, :8])
    with pytest.raises(InvalidInputError, match="dimensions=49: expected at most 48"):
        tiny_llm.embed(texts, dimensions=49)


def test_decoder_prompts(tiny_llm):
    with pytest.raises(InvalidInputError, match=r"prompt_name='query': .* decoder model .* prompt=\.\.\."):
        tiny_llm.embed(["w1"], prompt_name="query")
    np.testing.assert_array_equal(tiny_llm.embed(["w1 w2"], prompt="w3 "), tiny_llm.embed(["w3 w1 w2"]))


# ------------------------------------------------------------------ 12: newcomer friction


def test_chat_help_and_readme_say_gemma_is_a_base_model():
    chat_help = _subcommands()["chat"].format_help()
    assert "not instruction-tuned" in " ".join(chat_help.split())
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    assert "base model (not instruction-tuned)" in readme


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    try:
        rc, out, err = run_cli(capsys, "info")
    except KeyboardInterrupt:  # escaping, it would also end this pytest session
        pytest.fail("KeyboardInterrupt escaped main()")
    assert rc == 130 and out == ""
    assert err.strip() == "hyprec: interrupted"


def test_quiet_goes_before_or_after_the_subcommand():
    parser = build_parser()
    assert parser.parse_args(["-q", "embed", "a"]).quiet
    assert parser.parse_args(["embed", "a", "-q"]).quiet
    assert parser.parse_args(["embed", "--quiet", "a"]).quiet
    assert not parser.parse_args(["embed", "a"]).quiet


def test_quiet_silences_the_progress_bar(monkeypatch, capsys, minilm_loads):
    monkeypatch.setattr(cli, "PROGRESS_THRESHOLD", 1)  # a bar from two texts on
    rc, _, err = run_cli(capsys, "embed", "a", "b")
    assert rc == 0 and "embed: 100%" in err
    rc, _, err = run_cli(capsys, "embed", "a", "b", "-q")
    assert rc == 0 and err == ""


def test_every_argument_has_help_with_its_default():
    for name, sub in _subcommands().items():
        if name == "serve":  # its options are someone else's work in progress
            continue
        for action in sub._actions:
            assert action.help, f"hyprec {name} {action.dest}: no help text"
    text = {name: " ".join(sub.format_help().split()) for name, sub in _subcommands().items()}
    for name in ("check", "compare", "repair", "info"):
        assert "model model directory, .gguf file or alias (default: minilm)" in text[name], name
        assert "--device DEVICE cpu or cuda[:N] (default: cpu)" in text[name], name
    assert "(default: float32)" in text["compare"].split("--reference REFERENCE")[-1].split("--")[0]
    assert "--max-tokens MAX_TOKENS most tokens to generate (default: 64)" in text["generate"]


def test_generate_on_an_embedding_model_names_the_embed_command(capsys, minilm_loads):
    rc, out, err = run_cli(capsys, "-q", "generate", "hi", "--model", "minilm")
    assert rc == 2 and out == ""
    assert "`hyprec embed --model minilm TEXT...`" in err and "embed()" not in err


def test_quantised_gguf_is_logged_as_such(tmp_path, caplog):
    pytest.importorskip("gguf", reason="the gguf extra is not installed")
    from gguf import LlamaFileType

    path = tmp_path / "mixed.gguf"
    write_gguf(path, "llama")  # Q8_0, Q4_0, Q5_0, ... without a general.file_type
    with caplog.at_level("INFO", logger="hyprec"):
        llm = LLM(path, max_model_len=64, num_kv_blocks=8)
    assert llm.policy.reason.startswith("GGUF Q")
    assert "checkpoint (a quantized float32 model) -> hybrid" in llm.policy.reason
    assert "float32 checkpoint" not in caplog.text and "a quantized float32 model" in caplog.text

    path = tmp_path / "q4_k_m.gguf"
    write_gguf(path, "llama", file_type=LlamaFileType.MOSTLY_Q4_K_M)  # what llama.cpp's quantizer records
    llm = LLM(path, max_model_len=64, num_kv_blocks=8)
    assert llm.policy.reason.startswith("GGUF Q4_K_M checkpoint (a quantized float32 model) -> hybrid")
    assert "GGUF Q4_K_M checkpoint" in LLM(path, dtype="float32", max_model_len=64, num_kv_blocks=8).policy.reason


def test_embed_on_a_terminal_prints_a_summary(monkeypatch, capsys, minilm_loads, minilm_hybrid):
    texts = ["hyprec keeps float32 where it matters.", "Attention runs in half precision."]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    rc, out, err = run_cli(capsys, "-q", "embed", *texts)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"2 x 384 float32 embeddings ({minilm_hybrid.policy.name})"
    assert len(lines) < 12 and len(out) < 2000  # not 768 raw floats
    vectors = minilm_hybrid.embed(texts)
    printed = 0.5e-4 + 10 * F32_EPS  # 4 decimals, and float32 rounding of the unit vectors' dot product
    cosine_row = [float(x) for x in lines[-2].split()[1:]]  # "  [1]    0.2312  1.0000"
    assert cosine_row[0] == pytest.approx(float(vectors[0] @ vectors[1]), abs=printed)
    first_values = [float(x) for x in lines[2].split("[")[-1].removesuffix(", ...]").split(",")]
    np.testing.assert_allclose(first_values, vectors[1, :4], rtol=0, atol=printed)  # a few values
    rc, out, _ = run_cli(capsys, "-q", "embed", *texts, "--json")  # JSON lines on request, as when piped
    assert rc == 0 and [json.loads(line)["index"] for line in out.splitlines()] == [0, 1]
