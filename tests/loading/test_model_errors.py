"""Bad input gets a typed error naming the offending file, field or value; good input gives stable results.

Broken model directories are built in tmp_path from symlinks to the embedded all-MiniLM-L6-v2 files, with only
the file under test replaced, so no test copies more than one weights file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from hyprec import LLM, resolve_policy
from hyprec.errors import (
    ConfigError,
    InputTypeError,
    InvalidInputError,
    ModelLoadError,
    ModelNotFoundError,
    NonFiniteOutputError,
    UnsupportedArchitectureError,
)

DIM = 384
DTYPE_NAMES = "auto, float32, float16, bfloat16, hybrid"
ATTN_NAMES = "auto, float32, float16, bfloat16"
QUERY_WEIGHT = "encoder.layer.0.attention.self.query.weight"
QUERY_BIAS = "encoder.layer.0.attention.self.query.bias"


# --------------------------------------------------------------------------------------------------- helpers


def model_copy(src: Path, dst: Path, replace: tuple[str, ...] = ()) -> Path:
    """``dst`` holding a symlink to each entry of ``src`` except those named in ``replace``."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.name not in replace:
            os.symlink(entry, dst / entry.name)
    return dst


def assert_same_rows(a: np.ndarray, b: np.ndarray) -> None:
    """Row by row: max abs diff <= 1e-5 or cosine >= 1 - 1e-6.

    For embeddings of the same inputs computed in different batches (or processes) under float16 attention: the
    float32 parts differ in their last bits (summation order), which can flip the rounding of float16 attention
    values by one unit (2^-11 relative). For unit vectors 1 - cos = |a - b|^2 / 2, so cos >= 1 - 1e-6 allows
    |a - b| <= 1.4e-3, about three such units; 1e-5 absolute admits the rows whose difference is pure float32
    noise (~100 float32 units of their |x| <= 1 values)."""
    assert a.shape == b.shape
    diff = np.abs(a - b).max(axis=1)
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    bad = [i for i in range(len(a)) if not (diff[i] <= 1e-5 or cos[i] >= 1 - 1e-6)]
    assert not bad, f"rows {bad} differ: max abs {diff[bad]}, cosine {cos[bad]}"


@pytest.fixture(scope="module")
def state_dict(minilm_dir):
    from safetensors.torch import load_file

    return load_file(str(minilm_dir / "model.safetensors"))


@pytest.fixture
def with_weights(minilm_dir, tmp_path):
    """Build a model directory whose model.safetensors holds the given tensors."""
    from safetensors.torch import save_file

    def build(tensors: dict[str, torch.Tensor]) -> Path:
        d = model_copy(minilm_dir, tmp_path / "model", replace=("model.safetensors",))
        save_file(tensors, str(d / "model.safetensors"))
        return d

    return build


@pytest.fixture
def with_json(minilm_dir, tmp_path):
    """Build a model directory in which one JSON file (relative path) has the given content."""

    def build(rel: str, content: object) -> Path:
        first = rel.split("/")[0]
        d = model_copy(minilm_dir, tmp_path / "model", replace=(first,))
        if "/" in rel:  # a module folder: copy its other files as symlinks
            model_copy(minilm_dir / first, d / first, replace=(rel.split("/", 1)[1],))
        text = content if isinstance(content, str) else json.dumps(content)
        (d / rel).write_text(text, encoding="utf-8")
        return d

    return build


@pytest.fixture(scope="module")
def bert_config(minilm_dir) -> dict:
    return json.loads((minilm_dir / "config.json").read_text())


# ------------------------------------------------------------------------------------------- embed() inputs


@pytest.mark.parametrize(
    ("texts", "names"),
    [
        pytest.param([1], ["texts[0]", "int", "expected str"], id="int-in-list"),
        pytest.param(["ok", None], ["texts[1]", "NoneType", "expected str"], id="none-in-list"),
        pytest.param(["ok", "fine", b"raw"], ["texts[2]", "bytes", "b'raw'"], id="bytes-in-list"),
        pytest.param([{"text": "hi"}], ["texts[0]", "dict", "expected str"], id="dict-in-list"),
        pytest.param(None, ["texts must be a string or a list of strings", "NoneType"], id="none"),
        pytest.param(42, ["texts must be a string or a list of strings", "int"], id="int"),
        pytest.param(b"raw bytes", ["texts must be a string or a list of strings", "bytes"], id="bytes"),
        pytest.param({"text": "hi"}, ["texts must be a string or a list of strings", "dict"], id="dict"),
        pytest.param({"a", "b"}, ["texts must be a string or a list of strings", "set"], id="set"),
    ],
)
def test_embed_rejects_non_string_texts(minilm_hybrid, texts, names):
    with pytest.raises(InputTypeError) as exc:
        minilm_hybrid.embed(texts)
    for name in names:
        assert name in str(exc.value)
    assert isinstance(exc.value, TypeError)  # still catchable the standard way


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        pytest.param({"dimensions": 0}, InvalidInputError, ["dimensions=0", "positive integer"], id="dim-0"),
        pytest.param({"dimensions": -1}, InvalidInputError, ["dimensions=-1", "positive integer"], id="dim-neg"),
        pytest.param(
            {"dimensions": DIM + 1},
            InvalidInputError,
            [f"dimensions={DIM + 1}", f"at most {DIM}"],
            id="dim-too-big",
        ),
        pytest.param({"dimensions": 8.0}, InputTypeError, ["dimensions=8.0", "positive integer"], id="dim-float"),
        pytest.param({"dimensions": True}, InputTypeError, ["dimensions=True"], id="dim-bool"),
        pytest.param({"batch_size": 0}, InvalidInputError, ["batch_size=0", "positive integer"], id="batch-0"),
        pytest.param(
            {"normalize": "yes"},
            InputTypeError,
            ["normalize", "'yes'", "True, False or None"],
            id="normalize-str",
        ),
        pytest.param(
            {"prompt_name": "query"},
            InvalidInputError,
            ["prompt_name='query'", "its prompts: none"],
            id="unknown-prompt",
        ),
        pytest.param(
            {"prompt": "query: ", "prompt_name": "query"},
            InvalidInputError,
            ["prompt", "prompt_name"],
            id="both-prompts",
        ),
        pytest.param({"prompt": 5}, InputTypeError, ["prompt must be a string", "int"], id="prompt-int"),
    ],
)
def test_embed_rejects_bad_parameters(minilm_hybrid, kwargs, error, names):
    with pytest.raises(error) as exc:
        minilm_hybrid.embed(["hello"], **kwargs)
    for name in names:
        assert name in str(exc.value)


def test_embed_accepts_numpy_integer_dimensions(minilm_hybrid):
    out = minilm_hybrid.embed(["hello"], dimensions=np.int64(8))
    assert out.shape == (1, 8)
    assert np.linalg.norm(out[0]) == pytest.approx(1.0, abs=2 * (8 + 2) * 2**-24)  # float32 norm of 8 values


# -------------------------------------------------------------------------------------------- dtype policy


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        pytest.param({"dtype": "float8"}, ["dtype='float8'", DTYPE_NAMES], id="dtype"),
        pytest.param({"dtype": 16}, ["dtype=16", DTYPE_NAMES], id="dtype-int"),
        pytest.param({"dtype": torch.float64}, ["dtype='float64'", DTYPE_NAMES], id="dtype-torch-f64"),
        pytest.param({"attn_dtype": "fp8"}, ["attn_dtype='fp8'", ATTN_NAMES], id="attn"),
        pytest.param({"attn_dtype": "hybrid"}, ["attn_dtype='hybrid'", ATTN_NAMES], id="attn-hybrid"),
        pytest.param({"kv_cache_dtype": "int8"}, ["kv_cache_dtype='int8'", ATTN_NAMES], id="kv"),
    ],
)
def test_invalid_dtype_names(minilm_dir, kwargs, names):
    with pytest.raises(ConfigError) as exc:
        LLM(minilm_dir, **kwargs)
    for name in names:
        assert name in str(exc.value)


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        pytest.param(
            {"dtype": "float32", "attn_dtype": "float16"},
            ["dtype='float32'", "attn_dtype", "'float16'", "dtype='hybrid'"],
            id="f32+attn-f16",
        ),
        pytest.param(
            {"dtype": "hybrid", "attn_dtype": "float32"},
            ["dtype='hybrid'", "attn_dtype='float32'", "dtype='float32'"],
            id="hybrid+attn-f32",
        ),
        pytest.param(
            {"dtype": "bfloat16", "attn_dtype": "float16"},
            ["dtype='bfloat16'", "'float16'"],
            id="bf16+attn-f16",
        ),
        pytest.param(
            {"dtype": "bf16", "attn_dtype": "fp16"},
            ["dtype='bfloat16'", "'float16'"],
            id="aliases-bf16+attn-fp16",
        ),
        pytest.param(
            {"dtype": "hybrid", "attn_dtype": "float16", "kv_cache_dtype": "bfloat16"},
            ["kv_cache_dtype='bfloat16'", "attn_dtype='float16'"],
            id="kv-bf16+attn-f16",
        ),
        pytest.param(
            {"dtype": "float16", "kv_cache_dtype": "bfloat16"},
            ["kv_cache_dtype='bfloat16'", "attn_dtype='float16'"],
            id="f16+kv-bf16",
        ),
    ],
)
def test_invalid_dtype_combinations(minilm_dir, kwargs, names):
    with pytest.raises(ConfigError) as exc:
        LLM(minilm_dir, **kwargs)
    for name in names:
        assert name in str(exc.value)


@pytest.mark.parametrize(
    ("args", "mode", "attn", "kv"),
    [
        (("fp16",), "float16", torch.float16, torch.float16),
        (("bf16",), "bfloat16", torch.bfloat16, torch.bfloat16),
        (("FP32",), "float32", torch.float32, torch.float32),
        (("half",), "float16", torch.float16, torch.float16),
        ((torch.float16,), "float16", torch.float16, torch.float16),
        (("hybrid", "bf16"), "hybrid", torch.bfloat16, torch.bfloat16),
        (("hybrid", "fp16", "fp32"), "hybrid", torch.float16, torch.float32),
        (("hybrid", "float16", "float16"), "hybrid", torch.float16, torch.float16),
    ],
)
def test_dtype_aliases_accepted(args, mode, attn, kv):
    policy = resolve_policy(*args)
    assert (policy.mode, policy.attn_dtype, policy.kv_cache_dtype) == (mode, attn, kv)


def test_dtype_alias_through_llm(minilm_dir):
    llm = LLM(minilm_dir, dtype="fp16")
    assert llm.policy.name == "float16"
    assert llm.policy.compute_dtype == torch.float16


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


# ------------------------------------------------------------------------------- empty and whitespace texts


def test_empty_and_whitespace_texts_match_sentence_transformers(minilm_hybrid, st_minilm):
    texts = ["", "   ", "\n\t", "x"]
    ours = minilm_hybrid.embed(texts)
    ref = st_minilm.encode(texts, convert_to_numpy=True)
    assert ours.shape == (4, DIM)
    assert np.isfinite(ours).all()
    cos = (ours * ref).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.99999, cos
    # ST strips whitespace, so the three blank inputs have the same token ids. Their vectors agree to the batch
    # noise of the default mode (float16 attention rounds last-bit GEMM differences between batch positions);
    # bit-identical vectors are what deterministic=True guarantees (test_batch_invariance.py).
    assert_same_rows(ours[[1, 2]], ours[[0, 0]])


@pytest.mark.parametrize(("kwargs", "dim"), [({}, DIM), ({"dimensions": 8}, 8)])
def test_empty_list_returns_empty_array(minilm_hybrid, kwargs, dim):
    out = minilm_hybrid.embed([], **kwargs)
    assert out.shape == (0, dim)
    assert out.dtype == np.float32


def test_single_string_is_one_text(minilm_hybrid):
    one = minilm_hybrid.embed("a single sentence")
    assert one.shape == (1, DIM)
    np.testing.assert_array_equal(one, minilm_hybrid.embed(["a single sentence"]))


# --------------------------------------------------------------------------------------- result invariance


@pytest.fixture(scope="module")
def mixed_texts(eval_texts) -> list[str]:
    """One long page (truncated), paragraphs and docstrings, short sentences, a single word, a duplicate."""
    picks = [eval_texts[i] for i in (0, 25, 60, 120, 165, -40, -20)]
    return [*picks, "GPU", eval_texts[-20]]


@pytest.fixture(scope="module")
def alone(minilm_hybrid, mixed_texts) -> np.ndarray:
    return np.concatenate([minilm_hybrid.embed([t]) for t in mixed_texts])


def test_batch_matches_one_at_a_time(minilm_hybrid, mixed_texts, alone):
    lengths = {len(ids) for ids in minilm_hybrid.engine.tokenize(mixed_texts)}
    assert max(lengths) >= 200 and min(lengths) <= 5  # really mixed lengths
    batched = minilm_hybrid.embed(mixed_texts)
    assert_same_rows(batched, alone)
    # A duplicate at another position of the same batch: equal up to the default mode's batch noise
    # (bit-identical only under deterministic=True, tested in test_batch_invariance.py).
    assert_same_rows(batched[[-1]], batched[[-3]])


def test_reversed_order(minilm_hybrid, mixed_texts, alone):
    out = minilm_hybrid.embed(mixed_texts[::-1])
    assert_same_rows(out[::-1], alone)


def test_tiny_batch_size(minilm_hybrid, mixed_texts, alone):
    out = minilm_hybrid.embed(mixed_texts, batch_size=3)
    assert minilm_hybrid.engine.last_stats.batches >= 3
    assert_same_rows(out, alone)


def test_tiny_token_budget(minilm_dir, mixed_texts, alone):
    small = LLM(minilm_dir, max_num_batched_tokens=64)
    out = small.embed(mixed_texts)
    assert small.engine.last_stats.batches >= 4
    assert_same_rows(out, alone)


def test_results_in_input_order(minilm_hybrid, mixed_texts, alone):
    # a permutation that interleaves long and short texts; row i must be the embedding of texts[i]
    order = [3, 8, 0, 6, 1, 7, 2, 5, 4]
    out = minilm_hybrid.embed([mixed_texts[i] for i in order], batch_size=2)
    assert_same_rows(out, alone[order])


# ------------------------------------------------------------------------------------------ non-finite guard


@pytest.fixture
def overflow_model(state_dict, with_weights, minilm_hybrid):
    """MiniLM with one token's embedding row set to 1e5: fine in float32, inf (then NaN) in float16."""
    token = minilm_hybrid.engine.tokenizer.encode(["zebra"])[0][1]
    words = state_dict["embeddings.word_embeddings.weight"].clone()
    words[token] = 1e5
    return with_weights({**state_dict, "embeddings.word_embeddings.weight": words})


def test_non_finite_output_raises_without_the_guard(overflow_model):
    texts = ["a quiet morning", "the zebra runs", "plain words here"]
    llm = LLM(overflow_model, dtype="float16", precision_guard=False)
    with pytest.raises(NonFiniteOutputError) as exc:
        llm.embed(texts)
    msg = str(exc.value)
    assert "inputs [1]" in msg  # only the text with the overflowing token
    assert "policy float16" in msg
    assert "dtype='float32'" in msg  # the suggested remedy
    assert isinstance(exc.value, FloatingPointError)
    # the remedy works
    ok = LLM(overflow_model, dtype="float32").embed(texts)
    assert np.isfinite(ok).all()


def test_guard_falls_back_to_hybrid_and_matches_float32(overflow_model, caplog):
    texts = ["a quiet morning", "the zebra runs", "plain words here"]
    llm = LLM(overflow_model, dtype="float16")
    with caplog.at_level("WARNING", logger="hyprec"):
        out = llm.embed(texts)
    assert np.isfinite(out).all()
    assert llm.policy.name == "hybrid-fp16"  # remembered for this instance
    event = llm.engine.guard_events[0]
    assert event.policy == "float16" and event.quantity == "residual stream" and event.layer.startswith("layer ")
    assert any("precision guard" in r.getMessage() and event.layer in r.getMessage() for r in caplog.records)
    ref = LLM(overflow_model, dtype="float32").embed(texts)
    assert (out * ref).sum(1).min() > 0.99999


def test_guard_raise_is_typed(overflow_model):
    from hyprec.precision.guard import PrecisionOverflowError

    llm = LLM(overflow_model, dtype="float16", on_nonfinite="raise")
    with pytest.raises(PrecisionOverflowError) as exc:
        llm.embed(["the zebra runs"])
    assert exc.value.event.layer in str(exc.value) and "float16" in str(exc.value)


def test_guard_records_stay_bounded_and_a_later_pass_is_still_checked(overflow_model):
    from hyprec.precision.guard import PrecisionOverflowError

    llm = LLM(overflow_model, dtype="float16", on_nonfinite="raise")
    guard = llm.engine.guard
    ids = llm.engine.tokenize(["a quiet morning"])
    for _ in range(50):
        llm.engine.last_hidden_states(ids)  # forward passes nobody asks the guard about
    assert len(guard._seen) <= 16 * len(guard.blocks)
    with pytest.raises(PrecisionOverflowError, match="residual stream"):
        llm.embed(["the zebra runs"])


def test_non_finite_guard_names_index_and_hybrid_policy(minilm_dir, monkeypatch):
    llm = LLM(minilm_dir, on_nonfinite="ignore")  # the guard only logs; the final barrier must still refuse
    engine = llm.engine
    marker = engine.tokenizer.encode(["zebra"])[0][1]
    real = engine._run_batch

    def poisoned(ids, *args):
        out = real(ids, *args).clone()
        for j, seq in enumerate(ids):
            if marker in seq:
                out[j, 0] = float("inf")
        return out

    monkeypatch.setattr(engine, "_run_batch", poisoned)
    with pytest.raises(NonFiniteOutputError) as exc:
        llm.embed(["one", "two", "three", "a zebra", "five"], batch_size=2)
    assert "inputs [3]" in str(exc.value)
    assert f"policy {llm.policy.name}" in str(exc.value)
