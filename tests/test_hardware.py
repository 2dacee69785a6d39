"""The hardware-aware ``auto`` policy: capability detection, the cached kernel probe, and the choice it drives."""

from __future__ import annotations

import json

import pytest
import torch

from hyprec import hardware
from hyprec.errors import ConfigError
from hyprec.hardware import KernelProfile
from hyprec.layers import gemm_probe
from hyprec.precision.policy import SPEED_MARGIN, resolve_policy


def profile(attention: dict[str, float], linear: dict[str, float] | None = None) -> KernelProfile:
    return KernelProfile(
        device="cpu",
        hardware="test CPU",
        threads=2,
        torch_version=torch.__version__,
        linear_ms=linear or {"float32": 1.0, "float16": 1.0, "bfloat16": 1.0},
        attention_ms=attention,
        source="test",
    )


# Attention milliseconds per dtype on the three kinds of machines seen so far.
AMX = {"float32": 1.5, "float16": 1.9, "bfloat16": 0.9}  # Intel AMX-BF16 + AVX512-FP16 (measured here)
ZEN4 = {"float32": 1.0, "float16": 2.5, "bfloat16": 0.6}  # AVX512-BF16 only: float16 is converted in software
NO_HALF = {"float32": 1.0, "float16": 3.0, "bfloat16": 1.5}  # AVX2 only: neither half format has a path
FP16_FAST = {"float32": 3.0, "float16": 1.0, "bfloat16": 1.0}  # a GPU: both halves fast, float16 more accurate


def certified(evidence: str = "bound 47"):
    return lambda: (True, evidence)


def refused():
    return lambda: (False, "q bound 1e6 at layer 3")


@pytest.mark.parametrize(("speeds", "expected"), [(AMX, "hybrid-bf16"), (ZEN4, "hybrid-bf16")])
def test_auto_never_picks_float16_where_it_is_slow(speeds, expected):
    p = resolve_policy(fp16_attention_safe=certified(), kernel_speeds=lambda: profile(speeds))
    assert p.name == expected and p.compute_dtype == torch.float32
    assert "fastest on this cpu" in p.reason and "bf16 " in p.reason  # the measured numbers are the reason


def test_auto_keeps_float32_where_no_half_format_is_faster():
    p = resolve_policy(fp16_attention_safe=certified(), kernel_speeds=lambda: profile(NO_HALF))
    assert p.name == "float32" and p.attn_dtype == torch.float32
    assert "no half format is faster" in p.reason and "fp32 1.00 ms" in p.reason


def test_explicit_hybrid_picks_the_fastest_half_format():
    # dtype='hybrid' excludes float32; among the halves bfloat16 wins where float16 is slow.
    assert resolve_policy("hybrid", fp16_attention_safe=certified(), kernel_speeds=lambda: profile(NO_HALF)).name == (
        "hybrid-bf16"
    )


def test_float16_is_picked_when_fast_and_certified_only():
    fast = lambda: profile(FP16_FAST)  # noqa: E731
    assert resolve_policy(fp16_attention_safe=certified(), kernel_speeds=fast).name == "hybrid-fp16"
    p = resolve_policy(fp16_attention_safe=refused(), kernel_speeds=fast)
    assert p.name == "hybrid-bf16" and "not certified" in p.reason and "layer 3" in p.reason


def test_a_less_accurate_format_needs_the_margin():
    # bfloat16 just below the margin: float16 (more accurate) stays.
    near = {"float32": 3.0, "float16": 1.0, "bfloat16": 1.0 / SPEED_MARGIN + 1e-3}
    assert resolve_policy(fp16_attention_safe=certified(), kernel_speeds=lambda: profile(near)).name == "hybrid-fp16"
    # bfloat16 only slightly faster than float32: float32 stays.
    near32 = {"float32": 1.0, "float16": 2.0, "bfloat16": 0.95}
    assert resolve_policy(fp16_attention_safe=certified(), kernel_speeds=lambda: profile(near32)).name == "float32"


def test_the_certificate_is_not_computed_when_float16_cannot_win():
    def boom():
        raise AssertionError("must not be called")

    assert resolve_policy(fp16_attention_safe=boom, kernel_speeds=lambda: profile(ZEN4)).name == "hybrid-bf16"


def test_explicit_choices_ignore_the_speeds():
    def boom():
        raise AssertionError("must not be called")

    assert resolve_policy("hybrid", "float16", kernel_speeds=boom).name == "hybrid-fp16"
    assert resolve_policy("float32", kernel_speeds=boom).name == "float32"
    assert resolve_policy(checkpoint_dtype=torch.bfloat16, kernel_speeds=boom).name == "bfloat16"


@pytest.fixture
def real_device(monkeypatch, tmp_path):
    """The real probe, cached in a fresh directory."""
    monkeypatch.delenv("HYPREC_KERNEL_PROFILE", raising=False)
    monkeypatch.setenv("HYPREC_CACHE", str(tmp_path))
    return tmp_path


def test_probe_measures_once_then_reads_the_cache(real_device, monkeypatch):
    first = hardware.kernel_profile("cpu")
    assert first.source.startswith("measured")
    assert set(first.attention_ms) == {"float32", "float16", "bfloat16"}
    assert set(first.linear_ms) - {hardware.BF16X3, hardware.FLOAT32_ONEDNN} == {"float32", "float16", "bfloat16"}
    assert all(t > 0 for t in [*first.linear_ms.values(), *first.attention_ms.values()])
    assert first.threads == torch.get_num_threads() and first.torch_version == torch.__version__
    [cached] = (real_device / "kernel-profiles").glob("cpu-*.json")
    assert json.loads(cached.read_text())["attention_ms"] == first.attention_ms

    hardware.clear_profile_memo()  # a new process: must not measure again
    monkeypatch.setattr(hardware, "measure", lambda device: pytest.fail("measured twice"))
    again = hardware.kernel_profile("cpu")
    assert again == first and again.source.startswith("cached in")


def test_a_damaged_cache_file_is_measured_again(real_device):
    hardware.kernel_profile("cpu")
    [cached] = (real_device / "kernel-profiles").glob("cpu-*.json")
    cached.write_text('{"version": 1, "linear_ms": {}}')
    hardware.clear_profile_memo()
    assert hardware.kernel_profile("cpu").source.startswith("measured")


def test_real_default_policy_is_consistent_with_the_measured_speeds(real_device):
    from hyprec import LLM

    llm = LLM("minilm")
    prof = hardware.kernel_profile("cpu")
    attn = str(llm.policy.attn_dtype).removeprefix("torch.")
    times = prof.attention_ms
    # Whatever the machine: the choice is never slower than float32 attention, never float16 where it is slower
    # than float32, and never less accurate than hybrid-bf16 (no whole-model half precision).
    assert times[attn] <= times["float32"]
    assert llm.policy.compute_dtype == torch.float32
    if times["float16"] >= times["float32"]:
        assert attn != "float16"
    info = llm.info()
    assert info["hardware"] == prof.hardware and "attention fp32" in info["kernel_speeds"]


def test_pinned_profile_must_be_valid(monkeypatch, tmp_path):
    bad = tmp_path / "profile.json"
    bad.write_text("{not json")
    monkeypatch.setenv("HYPREC_KERNEL_PROFILE", str(bad))
    with pytest.raises(ConfigError, match=r"HYPREC_KERNEL_PROFILE=.*profile\.json"):
        hardware.kernel_profile("cpu")


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch):
    lines = ["processor\t: 0", "model name\t: Test CPU 9000", "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile"]
    monkeypatch.setattr(hardware, "cpuinfo_lines", lambda: lines)
    assert hardware.cpu_model() == "Test CPU 9000"
    assert hardware.cpu_flags() >= {"avx2", "avx512_bf16"}
    assert hardware.describe_flags() == "avx2 avx512f avx512_bf16 -avx512_fp16 -amx_bf16 -amx_fp16 amx_tile"


def test_native_half_follows_the_measured_linear_speed(monkeypatch):
    zen4 = profile(ZEN4, linear={"float32": 1.0, "float16": 4.3, "bfloat16": 0.38})
    monkeypatch.setattr(hardware, "kernel_profile", lambda device="cpu": zen4)
    assert hardware.native_half(torch.bfloat16) and not hardware.native_half(torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# The GEMM probe: the model's own float32 linear layers, per kernel
# ---------------------------------------------------------------------------------------------------------------


def test_linear_shapes_are_the_models_float32_layers_with_counts(minilm_fp32):
    shapes = gemm_probe.linear_shapes(minilm_fp32.engine.model)
    # MiniLM: 6 layers of query/key/value/attention output (384 -> 384), FFN up with GELU, FFN down.
    assert shapes == (
        gemm_probe.LinearShape(384, 384, True, "", 24),
        gemm_probe.LinearShape(384, 1536, True, "gelu", 6),
        gemm_probe.LinearShape(1536, 384, True, "", 6),
    )
    from hyprec.layers.linear import Linear

    mixed = torch.nn.Sequential(Linear(8, 8).to(torch.bfloat16), Linear(8, 4, bias=False, activation="relu"))
    assert gemm_probe.linear_shapes(mixed) == (gemm_probe.LinearShape(8, 4, False, "relu", 1),)  # half layers: no GEMM


def test_gemm_probe_measures_each_shape_set_once_then_reads_the_cache(real_device, monkeypatch):
    shapes = (gemm_probe.LinearShape(64, 96, True, "gelu", 3), gemm_probe.LinearShape(96, 64, False, "", 1))
    first = gemm_probe.gemm_profile(shapes)
    assert first.source.startswith("measured") and first.rows == gemm_probe.GEMM_ROWS
    assert "float32" in first.ms and set(first.ms) <= set(hardware.GEMM_KERNELS)
    assert all(t > 0 for t in first.ms.values())
    assert "model GEMMs (1024 rows) fp32" in first.describe()

    assert gemm_probe.gemm_profile(shapes[:1]).source.startswith("measured")  # another model: its own probe
    assert len(list((real_device / "kernel-profiles").glob("cpu-gemm-*.json"))) == 2

    gemm_probe.clear_profile_memo()  # a new process: must not measure again
    with monkeypatch.context() as m:
        m.setattr(gemm_probe, "measure_gemms", lambda *a, **k: pytest.fail("measured twice"))
        again = gemm_probe.gemm_profile(shapes)
    assert again.ms == first.ms and again.source.startswith("cached in")

    for path in (real_device / "kernel-profiles").glob("cpu-gemm-*.json"):
        path.write_text('{"version": 4, "rows": 1024, "ms": {"float32": -1}}')  # damaged: measured again
    gemm_probe.clear_profile_memo()
    assert gemm_probe.gemm_profile(shapes).source.startswith("measured")


def test_gemm_probe_counts_every_layer_of_a_shape(monkeypatch):
    calls = []

    def fake(fns, device, repeats=0):
        calls.extend(fn() for fn in fns.values())
        return dict.fromkeys(fns, 2.0)

    monkeypatch.setattr(gemm_probe, "interleaved_ms", fake)
    one, four = gemm_probe.LinearShape(8, 8, True, "", 1), gemm_probe.LinearShape(8, 16, False, "relu", 4)
    times = gemm_probe.measure_gemms([one, four], torch.device("cpu"), rows=4)
    assert times["float32"] == 2.0 * 1 + 2.0 * 4
    assert [tuple(c.shape) for c in calls] == [(4, 8)] * len(times) + [(4, 16)] * len(times)
    assert (calls[len(times)] >= 0).all()  # the second shape's ReLU ran


def test_pinned_profile_pins_the_gemm_probe_too():
    pinned = gemm_probe.gemm_profile((gemm_probe.LinearShape(8, 8, True, "", 1),))
    assert pinned.source.startswith("HYPREC_KERNEL_PROFILE=") and pinned.ms["float32"] == 1.0


def test_real_default_gemms_are_consistent_with_the_model_probe(real_device):
    from hyprec import LLM
    from hyprec.precision.policy import GEMM_MARGIN

    llm = LLM("minilm")
    probe = gemm_probe.gemm_profile(gemm_probe.linear_shapes(llm.engine.model))
    times = probe.ms
    # bf16x3 only where it measured SPEED_MARGIN faster than the fastest exact float32 GEMM on the model's own
    # shapes; oneDNN only where GEMM_MARGIN faster than F.linear.
    exact = min(times["float32"], times.get(hardware.FLOAT32_ONEDNN, float("inf")))
    chose_x3 = llm.policy.matmul == "high"
    assert chose_x3 == (hardware.BF16X3 in times and times[hardware.BF16X3] * SPEED_MARGIN < exact)
    if not chose_x3 and llm.policy.float32_gemm == "onednn":
        assert times[hardware.FLOAT32_ONEDNN] * GEMM_MARGIN < times["float32"]
    assert "model GEMMs (1024 rows)" in llm.policy.reason
