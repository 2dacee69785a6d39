"""benchmarks/gpu.py and benchmarks/gpu_setup.sh, on a machine without a GPU: the plan of a run, the report rendered
from fake measurements, the exit without CUDA, and the set-up script's driver check against a stand-in nvidia-smi."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "benchmarks" / "gpu_setup.sh"


@pytest.fixture(scope="module")
def gpu():
    """benchmarks/gpu.py as a module (the benchmarks import their siblings by name, as scripts do)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name)
        sys.path.remove(str(ROOT / "benchmarks"))


def test_plan_runs_the_tests_then_the_seam_then_each_model(gpu):
    steps = gpu.plan(["minilm", "gemma", "mpnet"])
    assert [(s.kind, s.name) for s in steps] == [
        ("tests", "pytest -m cuda"),
        ("seam", "attention seam"),
        ("model", "minilm"),
        ("model", "gemma"),
        ("model", "mpnet"),
    ]
    assert [s.kind for s in gpu.plan(["mpnet"], tests=False, seam=False)] == ["model"]
    with pytest.raises(ValueError, match=r"unknown model.*bert.*choose from minilm, gemma, mpnet"):
        gpu.plan(["minilm", "bert"])


def test_the_default_run_fits_a_ten_minute_command(gpu):
    steps = gpu.plan(list(gpu.MODELS))
    assert sum(s.estimate_s for s in steps) <= gpu.DEFAULT_BUDGET_S < 600
    step = gpu.Step("model", "minilm", 60.0)
    assert gpu.fits(step, 480.0, 540.0)  # ends exactly at the budget
    assert not gpu.fits(step, 480.5, 540.0)


def test_ratio(gpu):
    assert gpu.ratio(300.0, 200.0) == "1.50x"
    assert gpu.ratio(None, 200.0) == gpu.ratio(300.0, None) == gpu.ratio(1.0, 0.0) == "–"


def fake_results() -> dict:
    embed = [
        {"variant": "hyprec float32", "policy": "float32", "texts_per_s": 200.0, "min_cos": 1.0, "top10": 1.0},
        {"variant": "hyprec hybrid-fp16", "policy": "hybrid-fp16", "texts_per_s": 300.0, "min_cos": 0.9999991},
        {"variant": "sentence-transformers float32", "policy": "float32, attention sdpa", "texts_per_s": 150.0},
    ]
    for row in embed:
        row.update(resident_mib=90.0, pass_peak_mib=512.0)
    generate = [
        {"variant": "hyprec float32", "policy": "float32", "prefill_tok_s": 1000.0, "decode_tok_s": 100.0},
        {"variant": "hyprec float16", "policy": "hybrid-fp16", "prefill_tok_s": 4000.0, "decode_tok_s": 150.0},
        {"variant": "transformers float32", "policy": "float32", "prefill_tok_s": 500.0, "decode_tok_s": 50.0},
    ]
    for row in generate:
        row.update(top1=0.9995, non_finite=0, resident_mib=1100.0, pass_peak_mib=300.0)
    return {
        "machine": {
            "gpu": "NVIDIA H100 80GB HBM3",
            "capability": "9.0",
            "gpu_memory_gib": 79.2,
            "driver": "580.159.04",
            "torch": "2.13.0",
            "cuda": "13.0",
            "flash_attn": "not installed (SDPA's own kernels)",
            "cpu": "Xeon",
            "cores": 16,
            "cpu_flags": "avx2 avx512f",
            "python": "3.12.3",
            "versions": {"hyprec": "0.1.0"},
        },
        "budget_s": 540.0,
        "elapsed_s": 420.0,
        "load_at_start": "0.10 / 0.20 / 0.30",
        "tests": {"command": "pytest -q -m cuda tests/layers/test_cuda.py", "rc": 0, "summary": "4 passed in 9.1s"},
        "flash_accepts": {"float32": False, "float16": True, "bfloat16": True},
        "seam": [
            {
                "tokens": 32768,
                "ms": {"float32": 80.0, "float16": 10.0, "bfloat16": 16.0},
                "backend": {"float32": "sdpa", "float16": "sdpa", "bfloat16": "sdpa"},
                "extra_mib": {"float32": 96.0, "float16": 48.0, "bfloat16": 48.0},
            }
        ],
        "models": {
            "minilm": {"kind": "embed", "workload": "480 texts", "rows": embed},
            "gemma": {"kind": "generate", "workload": "batch 16", "rows": generate, "notes": ["the guard moved it"]},
        },
        "skipped": ["mpnet: ~140 s left no room in the budget"],
    }


def table_rows(report: str, first_cell: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in report.splitlines() if line.startswith(f"| {first_cell}")]
    return [[cell.strip() for cell in row] for row in rows]


def test_report_from_fake_measurements(gpu):
    report = gpu.render(fake_results())
    assert "NVIDIA H100 80GB HBM3 (compute capability 9.0)" in report and "driver 580.159.04" in report
    assert "exit status 0, 4 passed in 9.1s" in report
    assert "accepts: float32 no, float16 yes, bfloat16 yes" in report
    # The seam: speed-ups are float32's time over the half format's.
    (seam,) = table_rows(report, "32,768")
    assert seam[1:6] == ["80.000", "10.000", "16.000", "8.00x", "5.00x"]
    # Embeddings: throughput against hyprec float32 and against sentence-transformers float32.
    (hybrid,) = table_rows(report, "hyprec hybrid-fp16")
    assert hybrid[2:6] == ["300.0", "1.50x", "2.00x", "0.999999"]
    assert hybrid[6] == "–"  # not measured: shown as such, not as 0
    (st,) = table_rows(report, "sentence-transformers float32")
    assert st[3:5] == ["0.75x", "1.00x"]
    # Generation: prefill and decode, each against float32 and transformers.
    (half,) = table_rows(report, "hyprec float16")
    assert half[2:8] == ["4000", "4.00x", "8.00x", "150", "1.50x", "3.00x"]
    assert half[8:10] == ["0.9995", "0"]
    assert "- the guard moved it" in report
    assert "- mpnet: ~140 s left no room in the budget" in report
    for line in report.splitlines():  # every table row has as many cells as its header
        if line.startswith("|"):
            assert line.count("|") in {10, 13}, line


def test_without_cuda_it_exits_with_one_line(gpu, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        gpu.main(["--json", str(tmp_path / "gpu.json"), "--markdown", str(tmp_path / "gpu.md")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpu.py: no CUDA device here (torch ")
    assert "benchmarks/gpu_setup.sh" in err
    assert not list(tmp_path.iterdir())  # no report of a run that did not happen


def test_the_seam_step_runs_the_attention_seam_on_any_device(gpu):
    rows = gpu.seam_timings([8, 24], repeats=1, device="cpu")
    assert [r["tokens"] for r in rows] == [8, 24]
    for r in rows:
        assert set(r["ms"]) == {"float32", "float16", "bfloat16"} and all(t > 0 for t in r["ms"].values())
        assert r["backend"] == dict.fromkeys(r["ms"], "sdpa")  # select_backend's choice on the CPU
        assert r["extra_mib"] == dict.fromkeys(r["ms"])  # the GPU allocator's numbers: none off the GPU


def cuda_marked(path: Path) -> bool:
    """Whether a test file uses the ``cuda`` marker (``pytest.mark.cuda``), read from its syntax tree."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        value = getattr(node, "value", None)
        if isinstance(node, ast.Attribute) and node.attr == "cuda" and getattr(value, "attr", None) == "mark":
            return True
    return False


def test_the_run_covers_every_cuda_test_file(gpu):
    marked = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py") if cuda_marked(p)}
    assert marked == set(gpu.CUDA_TEST_FILES)


# --- benchmarks/gpu_setup.sh ------------------------------------------------------------------------------------


def test_setup_script_parses():
    subprocess.run(["bash", "-n", str(SETUP)], check=True)


def run_setup(tmp_path: Path, banner: str | None, *args: str, status: int = 0) -> subprocess.CompletedProcess:
    """The set-up script with ``PATH`` holding the basic tools and, when ``banner`` is given, an nvidia-smi that
    prints it and exits with ``status``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("sed", "head", "sort", "dirname", "cat"):
        if not (bin_dir / tool).exists():
            os.symlink(shutil.which(tool), bin_dir / tool)
    if banner is not None:
        (tmp_path / "banner.txt").write_text(banner + "\n")
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\ncat '{tmp_path / 'banner.txt'}'\nexit {status}\n")
        smi.chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return subprocess.run(
        [shutil.which("bash"), str(SETUP), *args], capture_output=True, text=True, env=env, timeout=30
    )


BANNER = "| NVIDIA-SMI 580.159.04    Driver Version: 580.159.04    CUDA Version: {} |"


@pytest.mark.parametrize("version", ["13.0", "13.2", "14.0"])
def test_setup_accepts_a_driver_for_cuda_13(tmp_path, version):
    done = run_setup(tmp_path, BANNER.format(version), "--check-driver")
    assert done.returncode == 0, done.stderr
    assert f"the driver supports CUDA {version} (>= 13.0)" in done.stdout


@pytest.mark.parametrize("version", ["12.4", "12.10"])
def test_setup_refuses_a_driver_older_than_the_wheel(tmp_path, version):
    done = run_setup(tmp_path, BANNER.format(version), "--check-driver")
    assert done.returncode == 1
    assert f"the driver supports CUDA {version}, but PyPI's torch==2.13.0 is built for CUDA 13.0" in done.stderr
    assert "PyPI has no CUDA 12 build" in done.stderr


def test_setup_stops_where_there_is_no_gpu(tmp_path):
    done = run_setup(tmp_path, None)
    assert done.returncode == 1
    assert done.stderr.strip() == "gpu_setup: no nvidia-smi: this is not a GPU machine (benchmarks/gpu.py needs one)"
    failure = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    done = run_setup(tmp_path, failure, status=9)
    assert done.returncode == 1 and done.stderr.strip() == f"gpu_setup: nvidia-smi failed: {failure}"
    done = run_setup(tmp_path, "No devices were found")
    assert done.returncode == 1 and "printed no 'CUDA Version'" in done.stderr
