"""``hyprec check``: verdicts on real models and on the zoo of constructed failures."""

from __future__ import annotations

import json

import pytest
import torch

from hyprec.entrypoints.cli import main
from hyprec.tools.check import check
from tests.helpers import ZOO, ZooModel, study_decoder

pytestmark = pytest.mark.usefixtures("single_thread")
TOKENS = [list(range(3, 60)), list(range(10, 90, 2)), [5, 6, 7, 8] * 10]


def _zoo_report(tmp_path, entry: ZooModel):
    from hyprec import LLM

    entry.build(tmp_path)
    llm = LLM(tmp_path, dtype="float32", max_model_len=128, num_kv_blocks=16)
    # Random models have no tokenizer: calibrate on token ids through the engine directly.
    from hyprec.tools.check import add_weight_facts, judge, record_activity

    with record_activity(llm.engine.model) as rows, torch.no_grad():
        for ids in TOKENS:
            if llm.is_generative:
                llm.engine.score(ids)
            else:
                llm.engine.hidden_states([ids])
    add_weight_facts(llm.engine.model, rows)
    return judge(rows)


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_zoo_models_are_flagged_for_the_right_reason(tmp_path, entry):
    verdicts, recommended = _zoo_report(tmp_path, entry)
    for policy, (verdict, quantity) in entry.expected.items():
        got = verdicts[policy]
        assert got.verdict == verdict, f"{entry.name} {policy}: {got.verdict} ({got.reason})"
        if quantity is not None:
            assert got.quantity == quantity, f"{entry.name} {policy}: blamed {got.quantity} ({got.reason})"
    if all(v == ("safe", None) for v in entry.expected.values()):
        assert recommended == "hybrid-fp16"


def test_minilm_is_safe_in_float16():
    report = check("minilm")
    assert report.verdicts["float16"].verdict == "safe"
    assert report.verdicts["hybrid-fp16"].verdict == "safe"
    assert report.verdicts["bfloat16"].verdict == "safe"  # the language-model rule below leaves encoders alone
    assert report.recommended == "hybrid-fp16"
    assert report.calibration_texts == 64 and len(report.layers) == 7  # embeddings + 6 layers


def test_whole_bfloat16_is_at_risk_for_a_language_model(tmp_path):
    """The fp16 training study's rule (docs/fp16-study.md), on a checkpoint the study trains: whole-model bfloat16
    changes next-token choices through precision, which no activation range shows."""
    checkpoint, ids = study_decoder(tmp_path)
    report = check(str(checkpoint), texts=ids)
    bf16 = report.verdicts["bfloat16"]
    assert (bf16.verdict, bf16.quantity) == ("at-risk", "precision") and "fp16-study" in bf16.reason
    # Range: nothing near either limit, so the other policies stay safe and hybrid-fp16 is recommended.
    assert {p: report.verdicts[p].verdict for p in ("float16", "hybrid-fp16", "hybrid-bf16")} == dict.fromkeys(
        ("float16", "hybrid-fp16", "hybrid-bf16"), "safe"
    )
    assert report.recommended == "hybrid-fp16"


@pytest.mark.slow
def test_mpnet_is_safe_in_float16(mpnet_fp32):
    report = check(mpnet_fp32)  # the session's float32 engine: check() calibrates a loaded float32 LLM as is
    assert report.verdicts["float16"].verdict == "safe"


def test_cli_json_and_plot(tmp_path, capsys):
    texts = tmp_path / "calib.txt"
    texts.write_text("The cat sat on the mat.\nHalf precision overflows above 65504.\n")
    plot = tmp_path / "chart.png"
    assert main(["-q", "check", "minilm", "--texts", str(texts), "--json", "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["verdicts"]) == {"float16", "bfloat16", "hybrid-fp16", "hybrid-bf16"}
    assert all(v["verdict"] in ("safe", "at-risk", "fails") for v in report["verdicts"].values())
    assert report["calibration_texts"] == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_check_errors(tmp_path, capsys):
    assert main(["-q", "check", "minilm", "--plot", str(tmp_path / "chart.jpg")]) == 2
    assert "expected a .png" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["-q", "check", "minilm", "--texts", str(empty)]) == 2
    assert "no texts" in capsys.readouterr().err
