"""The fp16 training study (``studies/fp16_training``): its ``--quick`` grid end to end, and its pieces."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from scipy.stats import spearmanr

from studies.fp16_training import report
from studies.fp16_training.__main__ import QUICK_TEXTS, check_again, main, run_study
from studies.fp16_training.corpus import train_tokenizer
from studies.fp16_training.grid import DECODER, ENCODER, RunConfig, default_grid, quick_grid
from studies.fp16_training.measure import HALF_POLICIES, MIN_COSINE, MIN_TOP1, damaged
from studies.fp16_training.report import confusion, spearman
from studies.fp16_training.train import build_model, lr_at, optimizer, save_checkpoint

VERDICTS = {"safe", "at-risk", "fails"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    return out, run_study(quick_grid(), out / "runs", out / "report", QUICK_TEXTS, quiet=True)


def test_quick_study_measures_every_checkpoint(quick):
    _, results = quick
    grid = quick_grid()
    assert list(results["runs"]) == [c.name for c in grid]
    for cfg in grid:
        records = [r for r in results["records"] if r["run"] == cfg.name]
        assert [r["step"] for r in records] == cfg.checkpoint_steps()
        for r in records:
            assert math.isfinite(r["loss"]) and r["loss"] > 0
            assert all(0 < v < 1e4 for v in r["activity"].values()), r["activity"]  # tiny, barely trained models
            assert [row["layer"] for row in r["layers"]] == ["embeddings"] + [f"layer {i}" for i in range(cfg.layers)]
            assert max(row["residual"] for row in r["layers"]) == r["activity"]["residual"]
            assert set(r["verdicts"]) == set(HALF_POLICIES) and set(r["verdicts"].values()) <= VERDICTS
            assert r["weights_certified_fp16"] is True  # q/k/v bounds of a few units, far below 65504 / 8
            for policy in HALF_POLICIES:
                row = r["damage"][policy]
                assert row["damaged"] == damaged(cfg.kind, row)
                if cfg.kind == "decoder":
                    assert 0 <= row["top1_agreement"] <= 1 and row["non_finite_logits"] == 0
                else:
                    assert -1 <= row["min_cos"] <= 1 + 1e-6 and row["non_finite"] == 0
            # The hybrid policies round only q/k/v: on these small activations float16 attention changes little.
            if cfg.kind == "encoder":
                assert r["damage"]["hybrid-fp16"]["min_cos"] >= MIN_COSINE


def test_quick_study_writes_the_report(quick):
    out, results = quick
    tables = (out / "report" / "tables.md").read_text()
    for cfg in quick_grid():
        assert f"| {cfg.name} |" in tables
    for png in ("growth-decoder.png", "growth-encoder.png", "layers-decoder.png", "layers-encoder.png", "maxima.png"):
        assert (out / "report" / png).read_bytes()[:4] == b"\x89PNG"
    cells = confusion(results)
    assert all(sum(c.values()) == len(results["records"]) for c in cells.values())
    saved = json.loads((out / "runs" / "results.json").read_text())
    assert saved["machine"]["flags"] and len(saved["records"]) == len(results["records"])


def test_a_recorded_run_is_not_trained_again(quick, tmp_path):
    out, results = quick
    again = run_study(quick_grid()[:1], out / "runs", tmp_path / "report", QUICK_TEXTS, quiet=True)
    assert len(again["records"]) == len(results["records"])


def test_check_runs_again_on_the_recorded_checkpoints(quick, tmp_path):
    out, results = quick
    again = json.loads(json.dumps(results))
    for r in again["records"]:
        r["verdicts"] = dict.fromkeys(HALF_POLICIES, "fails")  # stand-in for an older check's verdicts
    check_again(again, out / "runs", QUICK_TEXTS)
    for before, after in zip(results["records"], again["records"], strict=True):
        assert after["verdicts_at_training"] == dict.fromkeys(HALF_POLICIES, "fails")
        assert after["verdicts"] == before["verdicts"]  # the same check on the same checkpoint
        # The study's rule: whole-model bfloat16 is at risk for language models only.
        generative = again["runs"][after["run"]]["config"]["family"] != "bert"
        assert (after["verdicts"]["bfloat16"] == "at-risk") == generative
    report.write(again, tmp_path)
    tables = (tmp_path / "tables.md").read_text()
    assert "`check` as it was when the study ran" in tables
    assert sum(confusion(again, "verdicts_at_training")["float16"][k] for k in ("flagged, damaged", "flagged, clean"))


def test_check_again_needs_recorded_results(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--check-again", "--out", str(tmp_path / "nothing")])
    assert exit_info.value.code == 2
    assert "nothing/results.json does not exist" in capsys.readouterr().err


def test_unknown_run_names_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--only", "decoder-nonesuch"])
    assert exit_info.value.code == 2
    assert "decoder-nonesuch" in capsys.readouterr().err


def test_the_default_grid_varies_one_factor_at_a_time():
    grid = default_grid()
    by_name = {c.name: c for c in grid}
    assert len(by_name) == len(grid)
    for cfg in grid:
        if cfg.factor == "baseline":
            assert cfg.based_on is None and cfg in (DECODER, ENCODER)
            continue
        base = by_name[cfg.based_on]
        fields = set(RunConfig.__dataclass_fields__) - {"name", "factor", "based_on"}
        changed = {f for f in fields if getattr(cfg, f) != getattr(base, f)}
        if cfg.factor == "training length":
            assert changed == {"steps", "checkpoints"}
        elif cfg.factor == "embedding scale + sandwich norms":  # Gemma's bundle: its family and its activation
            assert changed == {"family", "activation"}
        else:
            assert len(changed) == 1, (cfg.name, changed)


@torch.no_grad()
def test_a_gemma_trained_without_its_embedding_scale_is_saved_as_it_computes(tmp_path):
    """Gemma-3 multiplies its embedding by sqrt(hidden); the run that trains it at 1 saves a table divided by that
    and an untied head, so the saved Gemma-3 computes what was trained."""
    import transformers

    cfg = next(c for c in quick_grid() if c.family == "gemma3")
    cfg = replace(cfg, embed_scale=False)
    model = build_model(cfg).eval()
    assert float(model.model.embed_tokens.embed_scale) == 1.0
    save_checkpoint(model, cfg, train_tokenizer(cfg.kind, ["a b c d e f g"] * 4, 64), tmp_path)
    saved = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path).eval()
    assert float(saved.model.embed_tokens.embed_scale) == pytest.approx(cfg.hidden**0.5)
    ids = torch.arange(3, 40)[None]
    # float32: one rounding of the table (u = 6e-8) carried through two layers stays far below 1e-5.
    torch.testing.assert_close(saved(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = DECODER
    assert lr_at(cfg, 0) == pytest.approx(cfg.lr / cfg.warmup)
    assert lr_at(cfg, cfg.warmup - 1) == pytest.approx(cfg.lr)
    assert lr_at(cfg, cfg.warmup) == pytest.approx(cfg.lr)
    assert lr_at(cfg, cfg.steps) == pytest.approx(0.1 * cfg.lr)
    assert all(lr_at(cfg, s) >= lr_at(cfg, s + 1) for s in range(cfg.warmup, cfg.steps))


@pytest.mark.parametrize("decay_norms", [False, True])
def test_weight_decay_reaches_norm_gains_only_when_asked(decay_norms):
    cfg = replace(quick_grid()[0], decay_norms=decay_norms, bias=True)
    model = build_model(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer(cfg, model).param_groups if g["weight_decay"] > 0 for p in g["params"]}
    gains = {n for n in names.values() if "norm" in n}
    assert gains and (gains <= decayed) == decay_norms and not (gains & decayed and not decay_norms)
    assert not any(n.endswith("bias") for n in decayed)
    assert "model.embed_tokens.weight" in decayed


def test_damage_thresholds():
    assert not damaged("decoder", {"non_finite_logits": 0, "top1_agreement": MIN_TOP1})
    assert damaged("decoder", {"non_finite_logits": 0, "top1_agreement": MIN_TOP1 - 1e-3})
    assert damaged("decoder", {"non_finite_logits": 1, "top1_agreement": 1.0})
    assert damaged("encoder", {"non_finite": 0, "min_cos": float("nan")})
    assert not damaged("encoder", {"non_finite": 0, "min_cos": MIN_COSINE})


def test_spearman_matches_scipy():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20, generator=gen).tolist()
    y = [v + 0.3 * w for v, w in zip(x, torch.rand(20, generator=gen).tolist(), strict=True)]
    y[3] = y[4]  # a tie
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert math.isnan(spearman([1.0, 2.0], [3.0, 4.0]))
