"""``python -m studies.fp16_training [--quick] [--out DIR] [--report DIR] [--only NAME ...] [--check-again]``

Trains each run of the grid, measures every checkpoint, appends one record per checkpoint to ``DIR/results.json``
(a run already recorded there is skipped, so an interrupted study resumes), then writes the tables and plots.
``--check-again`` first re-runs ``hyprec check`` on every recorded checkpoint (after check's rules changed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hyprec.hardware import cpu_model, describe_flags
from studies.fp16_training import measure, report
from studies.fp16_training.corpus import Texts, study_texts, token_stream, train_tokenizer
from studies.fp16_training.grid import RunConfig, default_grid, quick_grid
from studies.fp16_training.train import checkpoint_dir, train

QUICK_TEXTS = 4  # held-out texts per checkpoint in --quick


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "flags": describe_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def _held_out(texts: Texts, cfg: RunConfig) -> list[str]:
    """The calibration and evaluation text of ``cfg``'s checkpoints: whole pages (decoders) or paragraphs (BERT)."""
    return texts.held_out if cfg.kind == "decoder" else texts.paragraphs()


def check_again(results: dict[str, Any], out: Path, texts_per_checkpoint: int | None = None) -> None:
    """Re-run ``check`` on every recorded checkpoint (in ``out``), after its rules changed; the verdicts recorded when
    the study ran are kept once, as ``verdicts_at_training``."""
    texts = study_texts()
    for record in tqdm(results["records"], desc="check again"):
        cfg = RunConfig(**results["runs"][record["run"]]["config"])
        directory = checkpoint_dir(out / cfg.name, record["step"])
        record.setdefault("verdicts_at_training", record["verdicts"])
        record |= measure.check_again(directory, cfg, _held_out(texts, cfg)[:texts_per_checkpoint])


def _record(
    records: list[dict[str, Any]],
    cfg: RunConfig,
    texts: list[str],
    quiet: bool,
    step: int,
    directory: Path,
    loss: float,
) -> None:
    """Measure one checkpoint of ``cfg`` on ``texts`` and append its record."""
    record = {"run": cfg.name, "step": step, "loss": loss} | measure.measure(directory, cfg, texts, texts)
    records.append(record)
    if not quiet:
        act = record["activity"]
        tqdm.write(
            f"{cfg.name} step {step}: loss {loss:.3f}, residual {act['residual']:.4g}, "
            f"ffn {act['ffn']:.4g}, q/k/v {act['attention_inputs']:.4g}"
        )


def run_study(
    grid: list[RunConfig], out: Path, report_dir: Path, texts_per_checkpoint: int | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Train and measure every run of ``grid`` not yet in ``out/results.json``; write the report into
    ``report_dir``; return the results. ``texts_per_checkpoint``: measure on only the first held-out texts."""
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"records": [], "runs": {}}
    texts = study_texts()
    tokenizers: dict[tuple[str, int], Any] = {}
    started = time.perf_counter()
    for cfg in tqdm(grid, desc="runs", disable=quiet):
        if cfg.name in results["runs"]:
            continue
        key = (cfg.kind, cfg.vocab)
        if key not in tokenizers:
            tok = train_tokenizer(cfg.kind, texts.train, cfg.vocab)
            tokenizers[key] = (tok, token_stream(tok, texts.train))
        tok, stream = tokenizers[key]
        calibration = _held_out(texts, cfg)[:texts_per_checkpoint]
        run_started = time.perf_counter()

        on_checkpoint = functools.partial(_record, results["records"], cfg, calibration, quiet)
        seconds = train(cfg, stream, tok, out / cfg.name, on_checkpoint)
        results["runs"][cfg.name] = {
            "config": asdict(cfg),
            "train_seconds": seconds,
            "total_seconds": time.perf_counter() - run_started,
        }
        results_file.write_text(json.dumps(results, indent=1))
    # Grid order in the tables, also for runs added to the grid after the others were recorded.
    order = [c.name for c in grid if c.name in results["runs"]]
    results["runs"] = {name: results["runs"][name] for name in [*order, *results["runs"]]}
    results["machine"] = machine()
    results["study_seconds"] = time.perf_counter() - started
    results_file.write_text(json.dumps(results, indent=1))
    report.write(results, report_dir)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m studies.fp16_training", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="a smoke run on tiny shapes (under a minute)")
    parser.add_argument("--out", type=Path, default=None, help="checkpoints and results.json (default build/...)")
    parser.add_argument("--report", type=Path, default=None, help="tables and plots (default docs/fp16-study/)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these runs of the grid (names)")
    parser.add_argument(
        "--check-again", action="store_true", help="re-run hyprec check on the recorded checkpoints (no training)"
    )
    args = parser.parse_args(argv)
    grid = quick_grid() if args.quick else default_grid()
    if args.only:
        unknown = sorted(set(args.only) - {c.name for c in grid})
        if unknown:
            parser.error(f"--only: unknown runs {', '.join(unknown)}; the grid has {', '.join(c.name for c in grid)}")
        grid = [c for c in grid if c.name in args.only]
    out = args.out or Path("build") / ("fp16-study-quick" if args.quick else "fp16-study")
    report_dir = args.report or (out / "report" if args.quick else Path("docs") / "fp16-study")
    torch.set_num_threads(os.cpu_count() or 1)
    texts_per_checkpoint = QUICK_TEXTS if args.quick else None
    if args.check_again:
        results_file = out / "results.json"
        if not results_file.is_file():
            parser.error(f"--check-again: {results_file} does not exist; run the study into --out first")
        results = json.loads(results_file.read_text())
        check_again(results, out, texts_per_checkpoint)
        results_file.write_text(json.dumps(results, indent=1))
    run_study(grid, out, report_dir, texts_per_checkpoint)
    print(f"results: {out / 'results.json'}; report: {report_dir}")


if __name__ == "__main__":
    main()
