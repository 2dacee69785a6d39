"""The process allocator settings (``hyprec.allocator``)."""

from __future__ import annotations

import platform

import pytest

from hyprec.allocator import MMAP_THRESHOLD, tune_malloc


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_engines_set_glibc_thresholds_and_info_says_so(minilm_fp32):
    done = tune_malloc()
    assert done.startswith("glibc ") and f"mmap threshold {MMAP_THRESHOLD >> 20} MiB" in done
    assert minilm_fp32.info()["malloc"] == done


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("HYPREC_TUNE_MALLOC", "0")
    assert tune_malloc.__wrapped__() == "unchanged (HYPREC_TUNE_MALLOC=0)"
