"""Engine options (``hyprec.config``): a bad device, token budget or sequence limit gets a ConfigError naming the
option and its value."""

from __future__ import annotations

import pytest
import torch

from hyprec import LLM
from hyprec.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        pytest.param({"device": "tpu"}, ["device='tpu'", "'cpu', 'cuda' or 'cuda:N'"], id="tpu"),
        pytest.param({"device": "meta"}, ["device='meta'", "'cpu', 'cuda' or 'cuda:N'"], id="meta"),
        pytest.param({"device": None}, ["device=None"], id="none"),
        pytest.param({"max_num_batched_tokens": 0}, ["max_num_batched_tokens=0", "positive integer"], id="budget-0"),
        pytest.param({"max_num_seqs": 1.5}, ["max_num_seqs=1.5", "positive integer"], id="seqs-float"),
    ],
)
def test_invalid_engine_options(minilm_dir, kwargs, names):
    with pytest.raises(ConfigError) as exc:
        LLM(minilm_dir, **kwargs)
    for name in names:
        assert name in str(exc.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_device(minilm_dir, device):
    with pytest.raises(ConfigError) as exc:
        LLM(minilm_dir, device=device)
    assert f"device={device!r}" in str(exc.value)
    assert "no CUDA device" in str(exc.value)
