"""A broken model directory gets a typed error naming the offending file, field or value.

Broken model directories are built in tmp_path from symlinks to the embedded all-MiniLM-L6-v2 files, with only
the file under test replaced (``with_weights``, ``with_json`` in tests/conftest.py), so no test copies more than one
weights file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from hyprec import LLM
from hyprec.errors import (
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedArchitectureError,
)
from tests.helpers import model_copy

DIM = 384
QUERY_WEIGHT = "encoder.layer.0.attention.self.query.weight"
QUERY_BIAS = "encoder.layer.0.attention.self.query.bias"


# ------------------------------------------------------------------------------------------- model paths


def test_nonexistent_model_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as exc:
        LLM(missing)
    assert str(missing) in str(exc.value)
    assert "neither a local directory" in str(exc.value) and "known alias" in str(exc.value)
    assert "minilm" in str(exc.value)  # lists the aliases


def test_model_path_is_a_file(minilm_dir):
    path = minilm_dir / "config.json"
    with pytest.raises(ModelNotFoundError) as exc:
        LLM(path)
    assert str(path) in str(exc.value)
    assert "expected a model directory" in str(exc.value)


def test_model_name_of_wrong_type():
    with pytest.raises(ModelNotFoundError, match=r"model=123"):
        LLM(123)


def test_empty_directory(tmp_path):
    with pytest.raises(ModelLoadError) as exc:
        LLM(tmp_path)
    assert str(tmp_path / "config.json") in str(exc.value)


def test_config_but_no_weights(minilm_dir, tmp_path):
    d = model_copy(minilm_dir, tmp_path / "m", replace=("model.safetensors",))
    with pytest.raises(ModelLoadError) as exc:
        LLM(d)
    msg = str(exc.value)
    assert f"no weights in {d}" in msg
    assert "model.safetensors" in msg
    assert "pytorch_model.bin" in msg


def _truncated_copy(src: Path, dst: Path, keep: int) -> None:
    with open(src, "rb") as f:
        data = f.read(keep)
    dst.write_bytes(data)


@pytest.mark.parametrize("where", ["header", "data"])
def test_truncated_safetensors(minilm_dir, tmp_path, where):
    src = minilm_dir / "model.safetensors"
    with open(src, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    keep = 100 if where == "header" else 8 + header_len + 4096
    d = model_copy(minilm_dir, tmp_path / "m", replace=("model.safetensors",))
    _truncated_copy(src, d / "model.safetensors", keep)
    with pytest.raises(ModelLoadError) as exc:
        LLM(d)
    assert str(d / "model.safetensors") in str(exc.value)
    assert "corrupt or truncated" in str(exc.value)


def test_garbage_pytorch_model_bin(minilm_dir, tmp_path):
    d = model_copy(minilm_dir, tmp_path / "m", replace=("model.safetensors",))
    (d / "pytorch_model.bin").write_bytes(b"this is not a pickle or a zip archive" * 10)
    with pytest.raises(ModelLoadError) as exc:
        LLM(d)
    assert str(d / "pytorch_model.bin") in str(exc.value)
    assert "cannot read weights file" in str(exc.value)


def test_pytorch_model_bin_not_a_state_dict(minilm_dir, tmp_path):
    d = model_copy(minilm_dir, tmp_path / "m", replace=("model.safetensors",))
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as exc:
        LLM(d)
    assert str(d / "pytorch_model.bin") in str(exc.value)
    assert "expected a state dict, got list" in str(exc.value)


def test_checkpoint_missing_one_tensor(state_dict, with_weights):
    d = with_weights({k: v for k, v in state_dict.items() if k != QUERY_WEIGHT})
    with pytest.raises(ModelLoadError) as exc:
        LLM(d, dtype="float32")
    msg = str(exc.value)
    assert "weights missing" in msg
    assert str(d / "model.safetensors") in msg
    assert QUERY_WEIGHT in msg
    assert QUERY_BIAS not in msg  # only the missing one is listed


def test_checkpoint_tensor_with_wrong_shape(state_dict, with_weights):
    d = with_weights({**state_dict, QUERY_BIAS: torch.zeros(DIM - 1)})
    with pytest.raises(ModelLoadError) as exc:
        LLM(d, dtype="float32")
    msg = str(exc.value)
    assert repr(QUERY_BIAS) in msg
    assert str(d / "model.safetensors") in msg
    assert f"shape ({DIM - 1},)" in msg
    assert f"expected ({DIM},)" in msg


@pytest.mark.parametrize(
    ("content", "names"),
    [
        pytest.param('{"model_type": "bert",', ["is not valid JSON"], id="truncated-json"),
        pytest.param("[1, 2]", ["expected a JSON object, got list"], id="json-list"),
    ],
)
def test_malformed_config_json(with_json, content, names):
    d = with_json("config.json", content)
    with pytest.raises(ModelLoadError) as exc:
        LLM(d)
    assert str(d / "config.json") in str(exc.value)
    for name in names:
        assert name in str(exc.value)


def test_config_missing_required_field(with_json, bert_config):
    d = with_json("config.json", {k: v for k, v in bert_config.items() if k != "hidden_size"})
    with pytest.raises(ModelLoadError) as exc:
        LLM(d)
    assert str(d / "config.json") in str(exc.value)
    assert "'hidden_size'" in str(exc.value)


def test_unknown_model_type(with_json, bert_config):
    d = with_json("config.json", {**bert_config, "model_type": "gpt2", "architectures": ["GPT2Model"]})
    with pytest.raises(UnsupportedArchitectureError) as exc:
        LLM(d)
    msg = str(exc.value)
    assert str(d / "config.json") in msg
    assert "model_type='gpt2'" in msg
    assert "GPT2Model" in msg
    assert all(name in msg for name in ("bert", "mpnet", "roberta", "xlm-roberta", "llama", "gemma3_text"))


def test_heads_do_not_divide_hidden_size(with_json, bert_config):
    d = with_json("config.json", {**bert_config, "num_attention_heads": 5})
    with pytest.raises(UnsupportedArchitectureError) as exc:
        LLM(d)
    assert "hidden_size=384" in str(exc.value)
    assert "num_attention_heads=5" in str(exc.value)


def test_bad_modules_json_module_type(with_json, minilm_dir):
    modules = json.loads((minilm_dir / "modules.json").read_text())
    modules[1]["type"] = "sentence_transformers.models.LSTM"
    d = with_json("modules.json", modules)
    with pytest.raises(ModelLoadError) as exc:
        LLM(d)
    msg = str(exc.value)
    assert str(d / "modules.json") in msg
    assert "'sentence_transformers.models.LSTM'" in msg
    assert "Transformer, Pooling, Dense or Normalize" in msg


def test_modules_json_without_transformer(with_json):
    d = with_json(
        "modules.json",
        [{"idx": 0, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}],
    )
    with pytest.raises(ModelLoadError) as exc:
        LLM(d)
    assert str(d / "modules.json") in str(exc.value)
    assert "first module must be a Transformer" in str(exc.value)


@pytest.mark.parametrize(
    ("pooling", "names"),
    [
        pytest.param({"pooling_mode": "median"}, ["'median'", "cls, max, mean"], id="unknown-mode"),
        pytest.param(
            {"word_embedding_dimension": 384, "pooling_mode_mean_tokens": False},
            ["pooling mode none"],
            id="no-mode",
        ),
        pytest.param('{"pooling_mode": ', ["is not valid JSON"], id="malformed"),
    ],
)
def test_bad_pooling_config(with_json, pooling, names):
    d = with_json("1_Pooling/config.json", pooling)
    with pytest.raises(ModelLoadError) as exc:
        LLM(d)
    assert str(d / "1_Pooling" / "config.json") in str(exc.value)
    for name in names:
        assert name in str(exc.value)


def test_bad_max_seq_length(with_json):
    d = with_json("sentence_bert_config.json", {"max_seq_length": "long", "do_lower_case": False})
    with pytest.raises(ModelLoadError) as exc:
        LLM(d)
    assert "max_seq_length='long'" in str(exc.value)


def test_corrupt_tokenizer_reported_on_first_use(with_json):
    d = with_json("tokenizer.json", "{not json")
    llm = LLM(d, dtype="float32")
    with pytest.raises(ModelLoadError) as exc:
        llm.embed(["hello"])
    assert str(d / "tokenizer.json") in str(exc.value)


# Wrong JSON *shapes* (valid JSON, wrong container or value type) name the file.
@pytest.mark.parametrize(
    ("rel", "content"),
    [
        pytest.param(
            "modules.json",
            {"0": "Transformer"},
            id="modules-object",
        ),
        pytest.param(
            "1_Pooling/config.json",
            ["mean"],
            id="pooling-list",
        ),
        pytest.param(
            "config.json",
            "HIDDEN_AS_STRING",
            id="hidden-size-string",
        ),
    ],
)
def test_wrong_json_shapes_raise_model_load_error(with_json, bert_config, rel, content):
    if content == "HIDDEN_AS_STRING":
        content = {**bert_config, "hidden_size": "384"}
    d = with_json(rel, content)
    with pytest.raises((ModelLoadError, UnsupportedArchitectureError)) as exc:
        LLM(d)
    assert rel.split("/")[-1] in str(exc.value)
