"""GGUF loading: tiny synthetic files written with gguf.GGUFWriter (``write_gguf``, tests/helpers.py), then the real
Gemma-3-270M Q4_K_M file.

Reference values come from three independent places: the HF-layout arrays the synthetic files were built from
(with llama.cpp's conversion rewrites applied by the helpers, the way convert_hf_to_gguf.py applies them),
transformers' own GGUF loader, and transformers' torch dequantization kernels (for K-quant blocks gguf cannot write).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from hyprec.errors import ModelLoadError, UnsupportedArchitectureError
from hyprec.loading.gguf import SUPPORTED_ARCHITECTURES, GGUFCheckpoint
from hyprec.loading.weights import load_weights
from tests.helpers import GGUF_FFN as FFN
from tests.helpers import GGUF_HEAD_DIM as HEAD_DIM
from tests.helpers import GGUF_HIDDEN as HIDDEN
from tests.helpers import GGUF_KV_HEADS as KV_HEADS
from tests.helpers import GGUF_LAYERS as LAYERS
from tests.helpers import GGUF_VOCAB as VOCAB
from tests.helpers import llama_permute, storage_type, write_gguf
from tests.helpers import stored_values as stored


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_gguf(path, "llama", chat_template="{{ messages[0]['content'] }}")


def hf_reference(path: Path, config: dict) -> dict:
    """transformers' GGUF loader: the function from_pretrained(gguf_file=...) gets its state dict from.

    from_pretrained itself needs accelerate for GGUF files, so the model it would load into is built here on
    the meta device; the loader only reads its parameter names.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if config["model_type"] == "mistral":
        # transformers names a llama file "mistral" but then finds no "mistral" in gguf's name tables and fails;
        # the tensors are those of the llama architecture the file declares (same parameter names).
        config = {**config, "model_type": "llama"}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)


def assert_config_matches(mine: dict, reference: dict) -> None:
    """Every field AutoConfig gives is in ours with the same value (ours adds architectures + flat RoPE)."""
    for key, value in reference.items():
        if key not in ("transformers_version", "_name_or_path", "_model_name_or_path", "architectures"):
            assert mine.get(key) == value, f"config field {key!r}: {mine.get(key)!r} != transformers' {value!r}"


# -- synthetic files ---------------------------------------------------------------------------------------------


def test_llama_qk_unpermute_round_trip(tiny_llama):
    path, weights = tiny_llama
    ckpt = GGUFCheckpoint(path)
    for i in range(LAYERS):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            expected = stored(weights[name], storage_type(name))
            assert torch.equal(ckpt.get(name), torch.from_numpy(expected)), name
    # k is stored exactly (F32), and permuted: the round trip must be exact, and the file really is permuted
    k = "model.layers.0.self_attn.k_proj.weight"
    raw = ckpt.raw_tensor(k).data
    assert not np.array_equal(raw, weights[k]) and np.array_equal(llama_permute(weights[k], KV_HEADS), raw)


def test_every_tensor_type_and_name(tiny_llama):
    path, weights = tiny_llama
    ckpt = GGUFCheckpoint(path)
    assert sorted(ckpt.names()) == sorted(weights)
    for name, w in weights.items():
        got = ckpt.get(name)
        assert got.dtype == torch.float32 and tuple(got.shape) == w.shape, name
        assert torch.equal(got, torch.from_numpy(stored(w, storage_type(name)))), name
    assert ckpt.tensor_type("model.layers.0.mlp.down_proj.weight") == "Q5_1"
    # the header reader skips arrays of strings (the vocabulary: the tokenizer reads it) and gives their length
    assert ckpt.metadata("tokenizer.ggml.tokens") == len(VOCAB) and ckpt.config["vocab_size"] == len(VOCAB)
    assert ckpt.metadata("tokenizer.ggml.scores")[4] == -0.0 and ckpt.metadata("general.alignment", 32) == 32
    assert "blk.0.attn_q.weight" in ckpt.source("model.layers.0.self_attn.q_proj.weight")
    assert ckpt.floating_dtype() == torch.float32  # quantized: dequantizes to float32
    with pytest.raises(KeyError, match="no tensor"):
        ckpt.get("model.layers.9.mlp.up_proj.weight")


@pytest.mark.parametrize(
    ("arch", "tied", "name"),
    [("llama", False, "tiny"), ("llama", True, "mistral"), ("qwen3", True, "tiny"), ("gemma3", True, "tiny")],
)
def test_matches_transformers(tmp_path, arch, tied, name):
    """Every tensor bit-identical to transformers' GGUF loader, every config field equal to its config."""
    from transformers import AutoConfig

    path = tmp_path / f"{arch}.gguf"
    weights = write_gguf(path, arch, tied=tied, name=name)
    ckpt = GGUFCheckpoint(path)
    reference = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name).to_dict()
    assert_config_matches(ckpt.config, reference)
    # a llama-architecture file is a MistralConfig only when literally named "mistral" (transformers' rule)
    assert ckpt.config["model_type"] == {"gemma3": "gemma3_text"}.get(arch, "mistral" if name == "mistral" else arch)
    assert ckpt.config["tie_word_embeddings"] is tied and ("lm_head.weight" in ckpt.names()) is not tied

    expected = hf_reference(path, ckpt.config)["tensors"]
    assert sorted(ckpt.names()) == sorted(n for n in expected if n in weights)
    for n in ckpt.names():
        assert torch.equal(ckpt.get(n), expected[n]), n
    if arch == "gemma3":  # stored as 1 + w; float32 rounding of (w + 1) - 1 is all that may remain
        norm = "model.layers.1.post_feedforward_layernorm.weight"
        # One rounding of 1 + w (|1 + w| < 2 for these 0.1-scale weights): at most u * 2 = 2^-23 absolute.
        np.testing.assert_allclose(ckpt.get(norm).numpy(), weights[norm], rtol=0, atol=2**-23)


def test_tokenizer_matches_autotokenizer(tiny_llama):
    from transformers import AutoTokenizer

    path, _ = tiny_llama
    ckpt = GGUFCheckpoint(path)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert type(ckpt.tokenizer) is type(reference)
    for text in ["abcd", "a b  cd", "zebra abcd e", ""]:
        assert ckpt.tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
    assert ckpt.chat_template == "{{ messages[0]['content'] }}" == ckpt.tokenizer.chat_template


def test_tokenizer_ignores_a_neighbouring_tokenizer_json(tiny_llama, tmp_path):
    """AutoTokenizer(dir, gguf_file=...) would silently take this file's vocabulary; the GGUF's is the model's."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    write_gguf(tmp_path / "m.gguf", "llama")
    Tokenizer(WordLevel({"x": 0}, unk_token="x")).save(str(tmp_path / "tokenizer.json"))
    tok, alone = GGUFCheckpoint(tmp_path / "m.gguf").tokenizer, GGUFCheckpoint(tiny_llama[0]).tokenizer
    assert tok.get_vocab() == alone.get_vocab() and tok("zebra abcd")["input_ids"] == alone("zebra abcd")["input_ids"]


def test_load_weights_into_a_transformers_model(tiny_llama):
    """GGUFCheckpoint is a WeightSource: load_weights fills a meta-device model with nothing left over."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, _ = tiny_llama
    ckpt = GGUFCheckpoint(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**ckpt.config))
    assert load_weights(model, ckpt, compute_dtype=torch.float32) == []
    assert torch.equal(model.lm_head.weight, ckpt.get("lm_head.weight"))


def test_k_quant_blocks_match_transformers_kernels(tmp_path):
    """gguf cannot write K-quants, so random blocks are checked against transformers' torch dequantization."""
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    rng = np.random.default_rng(1)
    types = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q4_0]
    modules = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    blocks = {}
    w = GGUFWriter(str(tmp_path / "k.gguf"), "qwen2")
    w.add_block_count(1)
    for qtype, module in zip(types, modules, strict=True):
        _, block_bytes = GGML_QUANT_SIZES[qtype]
        # two blocks per row; bytes below 0x7C keep every fp16 scale finite
        blocks[module] = rng.integers(0, 0x7C, size=(8, 2 * block_bytes), dtype=np.uint8)
        w.add_tensor(f"blk.0.{module}.weight", blocks[module], raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ckpt = GGUFCheckpoint(tmp_path / "k.gguf")
    for hf in ckpt.names():
        module = ckpt.source(hf).split("blk.0.")[1].split(".weight")[0]
        got = ckpt.get(hf)
        expected = torch_dequantize(torch.from_numpy(blocks[module]).flatten(), int(ckpt.raw_tensor(hf).tensor_type))
        assert torch.equal(got, expected.reshape(got.shape)), (hf, ckpt.tensor_type(hf))


def test_floating_dtype_of_half_files(tmp_path):
    weights = {"model.embed_tokens.weight": np.ones((len(VOCAB), HIDDEN), np.float32)}
    write_gguf(tmp_path / "h.gguf", "qwen2", weights=weights)  # embedding stored F16, nothing quantized
    assert GGUFCheckpoint(tmp_path / "h.gguf").floating_dtype() == torch.float16


def test_rope_scaling_and_unmapped_tensors(tmp_path, caplog):
    extra = {"rope_freqs.weight": (np.ones(HEAD_DIM // 2, np.float32), Q.F32)}
    write_gguf(tmp_path / "r.gguf", "llama", rope_scaling=4.0, extra=extra)
    ckpt = GGUFCheckpoint(tmp_path / "r.gguf")
    assert "rope_freqs.weight" in caplog.text and not any("rope_freqs" in n for n in ckpt.names())
    # transformers' GGUF tables drop linear RoPE scaling; hyprec keeps it
    assert ckpt.config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}


# -- errors ------------------------------------------------------------------------------------------------------


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelLoadError, match=r"model\.gguf is not a GGUF file"):
        GGUFCheckpoint(bad)
    with pytest.raises(ModelLoadError, match="not found"):
        GGUFCheckpoint(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_file(tiny_llama, tmp_path, keep):
    path, _ = tiny_llama
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf.*truncated"):
        GGUFCheckpoint(cut)


def test_unsupported_tensor_type(tmp_path):
    extra = {"blk.0.ffn_up.weight": (np.ones((FFN, 256), np.float32), Q.TQ1_0)}
    weights = {"model.embed_tokens.weight": np.ones((len(VOCAB), HIDDEN), np.float32)}
    write_gguf(tmp_path / "t.gguf", "qwen2", weights=weights, extra=extra)
    with pytest.raises(ModelLoadError, match=r"t\.gguf.*'blk\.0\.ffn_up\.weight'.*TQ1_0.*supported: .*Q4_K"):
        GGUFCheckpoint(tmp_path / "t.gguf")


def test_unknown_tensor_type_id(tmp_path):
    weights = {"model.embed_tokens.weight": np.ones((len(VOCAB), HIDDEN), np.float32)}
    path = tmp_path / "u.gguf"
    write_gguf(path, "qwen2", weights=weights)
    data = bytearray(path.read_bytes())
    # tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    at = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4 + 2 * 8
    data[at : at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"cannot read GGUF file .*u\.gguf.*99"):
        GGUFCheckpoint(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitectureError, match=r"gpt2\.gguf.*'gpt2'.*llama.*gemma3") as info:
        GGUFCheckpoint(path)
    assert all(arch in str(info.value) for arch in SUPPORTED_ARCHITECTURES)


# -- the real Gemma-3-270M Q4_K_M file ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(gemma_path) -> GGUFCheckpoint:
    return GGUFCheckpoint(gemma_path)


@pytest.fixture(scope="module")
def gemma_tensors(gemma) -> dict[str, torch.Tensor]:
    return {name: gemma.get(name) for name in gemma.names()}


def test_gemma_names_and_shapes(gemma, gemma_tensors):
    cfg = gemma.config
    assert len(gemma_tensors) == 2 + 13 * cfg["num_hidden_layers"]  # every GGUF tensor has an HF name
    assert "lm_head.weight" not in gemma_tensors and cfg["tie_word_embeddings"] is True
    heads, kv, head_dim, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], 640
    shapes = {
        "model.embed_tokens.weight": (262144, hidden),
        "model.norm.weight": (hidden,),
        "model.layers.17.self_attn.q_proj.weight": (heads * head_dim, hidden),
        "model.layers.17.self_attn.k_proj.weight": (kv * head_dim, hidden),
        "model.layers.17.self_attn.o_proj.weight": (hidden, heads * head_dim),
        "model.layers.17.self_attn.q_norm.weight": (head_dim,),
        "model.layers.17.mlp.down_proj.weight": (hidden, cfg["intermediate_size"]),
        "model.layers.17.pre_feedforward_layernorm.weight": (hidden,),
        "model.layers.17.post_feedforward_layernorm.weight": (hidden,),
    }
    for name, shape in shapes.items():
        assert tuple(gemma_tensors[name].shape) == shape, name
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in gemma_tensors.values())
    assert {gemma.tensor_type(n) for n in gemma.names()} == {"F32", "Q5_0", "Q4_K", "Q8_0", "Q6_K"}


def test_gemma_values_are_the_file_values_minus_the_norm_offset(gemma, gemma_tensors):
    """Against gguf's dequantize of the raw tensors: linear weights as stored, norms stored as 1 + w."""
    raw = {t.name: t for t in gemma.header.tensors}
    linear = {
        "model.layers.3.self_attn.q_proj.weight": "blk.3.attn_q.weight",  # Q5_0; gemma's q/k are not permuted
        "model.layers.3.self_attn.v_proj.weight": "blk.3.attn_v.weight",  # Q8_0
        "model.layers.3.self_attn.o_proj.weight": "blk.3.attn_output.weight",  # Q4_K
        "model.layers.3.mlp.down_proj.weight": "blk.3.ffn_down.weight",  # Q6_K
    }
    for hf, g in linear.items():
        assert torch.equal(gemma_tensors[hf], torch.from_numpy(dequantize(raw[g].data, raw[g].tensor_type))), hf
    norms = {
        "model.norm.weight": "output_norm.weight",
        "model.layers.3.self_attn.k_norm.weight": "blk.3.attn_k_norm.weight",
        "model.layers.3.post_attention_layernorm.weight": "blk.3.post_attention_norm.weight",
    }
    for hf, g in norms.items():
        assert torch.equal(gemma_tensors[hf], torch.from_numpy(np.array(raw[g].data)) - 1), hf


def test_gemma_config(gemma):
    cfg = gemma.config
    # google/gemma-3-270m's config.json values for everything the GGUF metadata determines or defaults
    expected = {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": 640,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "intermediate_size": 2048,
        "vocab_size": 262144,
        "max_position_embeddings": 32768,
        "sliding_window": 512,
        "query_pre_attn_scalar": 256,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }
    assert {k: cfg.get(k) for k in expected} == expected
    assert cfg["layer_types"] == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert cfg["rms_norm_eps"] == pytest.approx(1e-6)


def test_gemma_tokenizer(gemma):
    tok = gemma.tokenizer
    assert type(tok).__name__ == "GemmaTokenizer" and gemma.chat_template is None  # none in this file
    # ids from AutoTokenizer.from_pretrained(dir, gguf_file=...) on this file
    assert tok("Hello world!")["input_ids"] == [2, 9259, 1902, 236888]
    assert tok("<start_of_turn>user\nhi<end_of_turn>")["input_ids"] == [2, 105, 2364, 107, 2202, 106]
    assert tok.decode([9259, 1902, 236888]) == "Hello world!"


@pytest.mark.slow
def test_gemma_matches_transformers_everywhere(gemma, gemma_tensors, gemma_hf):
    """Every tensor and config field against transformers' GGUF loader: the config as it parses it, the tensors
    as ``from_pretrained(gguf_file=...)`` loaded them (the session's reference model, loaded once)."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(gemma.path), return_tensors=False)
    assert_config_matches(gemma.config, AutoConfig.for_model(**parsed["config"]).to_dict())
    expected = gemma_hf.state_dict()
    assert set(gemma_tensors) <= set(expected)
    assert set(expected) - set(gemma_tensors) <= {"lm_head.weight"}  # tied: transformers maps none either
    for name, tensor in gemma_tensors.items():
        assert torch.equal(tensor, expected[name]), name
