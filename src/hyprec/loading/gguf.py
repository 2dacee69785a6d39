"""GGUF checkpoints (llama.cpp's single-file format) read as Hugging Face-named float32 weights.

A ``.gguf`` file carries everything a model directory would: weights (often block-quantized), the model's
hyper-parameters and its tokenizer, all under llama.cpp's names. :class:`GGUFCheckpoint` exposes it the way
the rest of hyprec expects a Hugging Face checkpoint:

* tensors under HF names (``model.layers.0.self_attn.q_proj.weight``), dequantized lazily to float32 in HF
  layout, with llama.cpp's conversion-time rewrites undone exactly as transformers undoes them
  (``transformers/modeling_gguf_pytorch_utils.py``): the rotary row interleave of Llama's q/k projections and
  Gemma's ``1 + w`` norm weights;
* ``config``: a ``config.json``-style dict built from the metadata, matching ``AutoConfig.from_pretrained(dir,
  gguf_file=...)``;
* ``tokenizer`` / ``chat_template``: the tokenizer transformers builds from the metadata.

``gguf`` (llama.cpp's own Python package) does the dequantization and names the types, :mod:`hyprec.loading.gguf_header`
reads the header (gguf-py's reader takes 11 s over a 262k-token vocabulary); ``transformers`` supplies the
metadata-name tables and the tokenizer conversion, so both stay the single source of truth.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from hyprec.errors import ModelLoadError, UnsupportedArchitectureError
from hyprec.loading.gguf_header import GGUFHeader, read_header

if TYPE_CHECKING:
    from transformers import TokenizersBackend

    from hyprec.loading.gguf_header import HeaderTensor

log = logging.getLogger(__name__)

SUPPORTED_TYPES: tuple[QType, ...] = (
    QType.F32,
    QType.F16,
    QType.BF16,
    QType.Q8_0,
    QType.Q4_0,
    QType.Q4_1,
    QType.Q5_0,
    QType.Q5_1,
    QType.Q2_K,
    QType.Q3_K,
    QType.Q4_K,
    QType.Q5_K,
    QType.Q6_K,
)
_FLOAT_TYPES = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}
# Rows are dequantized in chunks of about this many values: numpy's per-block temporaries then stay in cache,
# which makes a 262144x640 Q8_0 embedding ~3x faster than dequantizing it in one call.
_CHUNK_VALUES = 1 << 20


@dataclass(frozen=True)
class _Arch:
    """How llama.cpp converted one ``general.architecture`` from its Hugging Face original."""

    model_type: str  # the HF model_type transformers gives such a file
    permute_qk: bool = False  # q/k rows interleaved for llama.cpp's rotary layout (LlamaModel.permute)
    norm_offset: float = 0.0  # norm weights stored as ``w + offset`` (Gemma's RMSNorm computes ``x * (1 + w)``)


# Mistral checkpoints are converted to the "llama" architecture, so they are covered by that entry.
ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch("llama", permute_qk=True),
    "qwen2": _Arch("qwen2"),
    "qwen3": _Arch("qwen3"),
    "gemma3": _Arch("gemma3_text", norm_offset=1.0),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# The HF module names of a Llama-style decoder. gguf's own name table (gguf.tensor_mapping) turns each into its
# GGUF name for a given architecture, or None where that architecture has no such tensor; the reverse of that
# is our GGUF -> HF map. Which HF norm is which GGUF norm differs per architecture (Llama's
# post_attention_layernorm is llama.cpp's ffn_norm, Gemma's is post_attention_norm); the table knows that.
_HF_GLOBAL_MODULES = ("model.embed_tokens", "model.norm", "lm_head")
_HF_LAYER_MODULES = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.q_norm",
    "self_attn.k_norm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# Bookkeeping fields of a transformers config object that do not describe the model.
_CONFIG_NOISE = ("transformers_version", "_name_or_path", "_model_name_or_path")


class GGUFCheckpoint:
    """One ``.gguf`` file as a :class:`~hyprec.loading.weights.WeightSource` with Hugging Face tensor names.

    Opening parses the header (memory-mapped, no tensor data is read) and checks the architecture, every tensor
    type and that every tensor lies inside the file. :meth:`get` dequantizes one tensor on demand.

    Raises:
        ModelLoadError: not a GGUF file, truncated or corrupt, or a tensor type hyprec cannot dequantize.
        UnsupportedArchitectureError: a ``general.architecture`` outside :data:`SUPPORTED_ARCHITECTURES`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.files: list[Path] = [self.path]
        self.header: GGUFHeader = _open_header(self.path)  # the parsed header: metadata and tensor entries
        self.architecture: str = self._string_field("general.architecture")
        self._arch = ARCHITECTURES.get(self.architecture)
        if self._arch is None:
            raise UnsupportedArchitectureError(
                f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self.num_layers = self._int_field(f"{self.architecture}.block_count")
        self._tensors: dict[str, HeaderTensor] = {}  # HF name -> GGUF tensor
        self._index_tensors()

    # -- WeightSource -----------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """HF names of every tensor in the file, in file order."""
        return list(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        """The float32 tensor ``name`` in HF layout ([out, in] for linear weights)."""
        tensor = self.raw_tensor(name)
        try:
            values = _dequantize(tensor)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise ModelLoadError(f"cannot dequantize {self.source(name)}: {exc}") from None
        return torch.from_numpy(self._undo_conversion(tensor.name, values))

    def stored(self, name: str) -> tuple[str, torch.Tensor] | None:
        """A 2-D tensor as the file stores it: its format name (``"Q4_K"``, ``"F16"`` ...) and its raw rows, uint8
        ``[out, row bytes]`` in HF row order (llama.cpp's row interleave of Llama's q/k undone: it moves whole rows,
        and a row's blocks run along it). None for float32 tensors and for tensors the converter rewrote in value
        (Gemma's ``1 + w`` norms), which only a dequantised copy can undo."""
        tensor = self.raw_tensor(name)
        if tensor.tensor_type == QType.F32 or len(tensor.shape) != 2 or self._offset_norm(tensor.name):
            return None
        raw = np.asarray(tensor.data).view(np.uint8).reshape(int(tensor.shape[1]), -1)
        if self._permuted_qk(tensor.name):
            raw = _unpermute_rotary_rows(raw, self._rotary_heads(tensor.name))
        return tensor.tensor_type.name, torch.from_numpy(np.array(raw))  # a copy in memory, not the file's pages

    def source(self, name: str) -> str:
        """Where a tensor comes from, for error messages: the file, its GGUF name and storage type."""
        tensor = self.raw_tensor(name)
        return f"{self.path} (GGUF tensor {tensor.name!r}, {tensor.tensor_type.name})"

    def floating_dtype(self) -> torch.dtype:
        """The float type the weights were written in: the half type of an unquantized F16/BF16 file, else
        float32 (a quantized file has no float type of its own: it dequantizes to float32). The same rule as
        transformers' ``GgufHeader.dtype``."""
        types = {t.tensor_type for t in self._tensors.values()}
        if not types <= set(_FLOAT_TYPES):
            return torch.float32
        # Norms are F32 even in a half-precision file, so any half type present is the model's.
        for half in (QType.BF16, QType.F16):
            if half in types:
                return _FLOAT_TYPES[half]
        return torch.float32

    def storage(self) -> str | None:
        """For a quantized file, its quantization (``general.file_type``, else the quantized tensor types, most
        frequent first): ``GGUF Q4_K_M checkpoint (a quantized float32 model)``. None for F32/F16/BF16 files, whose
        :meth:`floating_dtype` says it all."""
        counts = Counter(t.tensor_type for t in self._tensors.values())
        quantized = [qtype.name for qtype, _ in counts.most_common() if qtype not in _FLOAT_TYPES]
        if not quantized:
            return None
        try:
            name = gguf.LlamaFileType(self.metadata("general.file_type")).name.removeprefix("MOSTLY_")
        except (ValueError, TypeError):  # absent, or a file type this gguf release does not know
            name = "/".join(quantized)
        return f"GGUF {name} checkpoint (a quantized float32 model)"

    # -- metadata ---------------------------------------------------------------------------------------------

    def metadata(self, key: str, default: Any = None) -> Any:
        """A raw GGUF metadata value (``"gemma3.context_length"``, ``"tokenizer.ggml.eos_token_id"`` ...)."""
        return self.header.metadata.get(key, default)

    def tensor_type(self, name: str) -> str:
        """The GGUF storage type of a tensor (``"Q8_0"``, ``"F32"`` ...)."""
        return self.raw_tensor(name).tensor_type.name

    @functools.cached_property
    def config(self) -> dict[str, Any]:
        """A Hugging Face ``config.json``-style dict for the model, as ``AutoConfig.from_pretrained(dir,
        gguf_file=...)`` builds it, plus ``architectures`` and the legacy flat RoPE fields (``rope_theta``,
        Gemma 3's ``rope_local_base_freq``) that transformers folds into ``rope_parameters``."""
        return _complete_config(self._config_fields(), self.path)

    @functools.cached_property
    def tokenizer(self) -> TokenizersBackend:
        """The fast tokenizer transformers builds from the GGUF vocabulary (the class ``AutoTokenizer`` picks,
        e.g. ``GemmaTokenizer``; the ``tokenizers.Tokenizer`` is its ``backend_tokenizer``)."""
        stat = self.path.stat()
        key = (self.path.resolve(), stat.st_size, stat.st_mtime_ns, str(self.config["model_type"]))
        # Converting a 262k-token vocabulary takes ~5 s; a copy of the converted one ~1.7 s. Each checkpoint gets
        # its own copy: a tokenizer has settings (padding, truncation) that its user may change.
        return copy.deepcopy(_converted_tokenizer(*key))

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template in ``tokenizer.chat_template``, or None when the file has none."""
        return self.metadata("tokenizer.chat_template")

    def raw_tensor(self, name: str) -> HeaderTensor:
        """The file's entry for HF tensor ``name``: its GGUF name, storage type, shape and data exactly as stored
        (memory-mapped; no permutation or offset undone). KeyError naming the file if there is none."""
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    # -- internals --------------------------------------------------------------------------------------------

    def _string_field(self, key: str) -> str:
        value = self.metadata(key)
        if not isinstance(value, str):
            raise ModelLoadError(f"{self.path}: GGUF metadata {key!r} = {value!r}: expected a string")
        return value

    def _int_field(self, key: str, default: int | None = None) -> int:
        value = self.metadata(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelLoadError(f"{self.path}: GGUF metadata {key!r} = {value!r}: expected an integer")
        return value

    def _index_tensors(self) -> None:
        """Map every GGUF tensor to its HF name, checking its type and that its data lies inside the file."""
        hf_names = _gguf_to_hf_names(self.architecture, self.num_layers)
        file_size = self.header.size
        unmapped = []
        for tensor in self.header.tensors:
            if tensor.data_offset + tensor.n_bytes > file_size:
                raise ModelLoadError(
                    f"{self.path} is truncated: tensor {tensor.name!r} ends at byte "
                    f"{tensor.data_offset + tensor.n_bytes}, the file has {file_size}"
                )
            if tensor.tensor_type not in SUPPORTED_TYPES:
                raise ModelLoadError(
                    f"{self.path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which hyprec cannot "
                    f"dequantize; supported: {', '.join(t.name for t in SUPPORTED_TYPES)}"
                )
            if tensor.name in hf_names:
                self._tensors[hf_names[tensor.name]] = tensor
            else:
                unmapped.append(tensor.name)
        if unmapped:
            # e.g. llama 3's rope_freqs.weight, which transformers ignores as well
            log.warning("%s: ignoring %d GGUF tensors with no HF name: %s", self.path, len(unmapped), unmapped[:8])

    def _config_fields(self) -> dict[str, Any]:
        """Metadata renamed to transformers config fields with transformers' own tables, as
        ``load_gguf_checkpoint(path)["config"]`` does it, without parsing the header a second time."""
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

        model_type = self._arch.model_type
        if self.architecture == "llama" and self.metadata("general.name") == "mistral":
            # transformers' rule, verbatim: only a file literally named "mistral" becomes a MistralConfig
            model_type = "mistral"
        tables = {
            "tokenizer": GGUF_CONFIG_MAPPING["tokenizer"],  # bos/eos/unk/pad ids
            self.architecture: GGUF_CONFIG_MAPPING["mistral" if model_type == "mistral" else self.architecture],
        }
        fields: dict[str, Any] = {}
        for key, value in self.header.metadata.items():
            prefix, _, rest = key.partition(".")
            target = tables.get(prefix, {}).get(rest)
            if target is not None and target != -1:  # None/-1: metadata transformers deliberately skips
                fields[target] = value
        fields["model_type"] = model_type
        # llama.cpp writes output.weight only when the LM head is not the embedding matrix
        fields["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        if "vocab_size" not in fields and "tokenizer.ggml.tokens" in self.header.metadata:
            fields["vocab_size"] = self.header.metadata["tokenizer.ggml.tokens"]  # its length (gguf_header)
        fields.update(self._rope_scaling())
        return fields

    def _rope_scaling(self) -> dict[str, Any]:
        """Linear RoPE scaling (``{arch}.rope.scaling.*``), which transformers' GGUF tables drop, as the legacy
        ``rope_scaling`` field: the config class applies it where the model does (Gemma 3: global layers)."""
        kind = self.metadata(f"{self.architecture}.rope.scaling.type")
        factor = self.metadata(f"{self.architecture}.rope.scaling.factor")
        if kind in (None, "none") or factor in (None, 1.0):
            return {}
        if kind != "linear":
            log.warning("%s: ignoring RoPE scaling %r (x%s): only linear is read from GGUF", self.path, kind, factor)
            return {}
        return {"rope_scaling": {"rope_type": "linear", "factor": float(factor)}}

    def _offset_norm(self, gguf_name: str) -> bool:
        return bool(self._arch.norm_offset) and gguf_name.endswith("norm.weight")

    def _permuted_qk(self, gguf_name: str) -> bool:
        return bool(self._arch.permute_qk) and (".attn_q." in gguf_name or ".attn_k." in gguf_name)

    def _undo_conversion(self, gguf_name: str, values: np.ndarray) -> np.ndarray:
        """Reverse llama.cpp's convert_hf_to_gguf.py rewrites of one tensor (values is float32, owned)."""
        if self._offset_norm(gguf_name):
            values -= self._arch.norm_offset  # in float32, as transformers' Gemma2TensorProcessor does
        if self._permuted_qk(gguf_name):
            values = _unpermute_rotary_rows(values, self._rotary_heads(gguf_name))
        return values

    def _rotary_heads(self, gguf_name: str) -> int:
        """The heads whose rows llama.cpp interleaved in a q or k projection."""
        heads = self._int_field(f"{self.architecture}.attention.head_count")
        if ".attn_k." in gguf_name:
            # llama.cpp's default when the key is absent; transformers would skip the permutation instead
            heads = self._int_field(f"{self.architecture}.attention.head_count_kv", heads)
        return heads


def _open_header(path: Path) -> GGUFHeader:
    """``path``'s parsed header (:mod:`hyprec.loading.gguf_header`), its errors turned into ModelLoadError.

    Headers are shared within a process while the file is unchanged (same size and modification time); they are
    read-only."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file not found: {path}")
    stat = path.stat()
    return _parsed_header(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parsed_header(path: Path, size: int, mtime_ns: int) -> GGUFHeader:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    try:
        return read_header(path)
    except Exception as exc:  # struct/enum/index errors from a cut or corrupt header, or an unknown type id
        raise ModelLoadError(f"cannot read GGUF file {path} (truncated or corrupt?): {exc}") from None


@functools.cache
def _gguf_to_hf_names(architecture: str, num_layers: int) -> dict[str, str]:
    """``{"blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight", ...}`` for one architecture."""
    table = gguf.get_tensor_name_map(_model_arch(architecture), num_layers)
    modules = list(_HF_GLOBAL_MODULES)
    modules += [f"model.layers.{i}.{m}" for i in range(num_layers) for m in _HF_LAYER_MODULES]
    mapping = {}
    for hf in modules:
        gguf_name = table.get_name(hf)
        if gguf_name is not None:
            for suffix in (".weight", ".bias"):
                mapping[gguf_name + suffix] = hf + suffix
    return mapping


def _model_arch(architecture: str) -> gguf.MODEL_ARCH:
    for arch, name in gguf.MODEL_ARCH_NAMES.items():
        if name == architecture:
            return arch
    raise UnsupportedArchitectureError(f"the installed gguf package does not know architecture {architecture!r}")


def _dequantize(tensor: HeaderTensor) -> np.ndarray:
    """A tensor's values as a new float32 array in numpy order (= HF layout), a chunk of rows at a time."""
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists dimensions fastest-moving first
    rows = tensor.data.reshape(-1, tensor.data.shape[-1])  # raw rows: values, or the bytes of a row's blocks
    out = np.empty((rows.shape[0], shape[-1]), dtype=np.float32)
    step = max(1, _CHUNK_VALUES // shape[-1])
    for start in range(0, rows.shape[0], step):
        out[start : start + step] = dequantize(rows[start : start + step], tensor.tensor_type)
    return out.reshape(shape)


def _unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``LlamaModel.permute`` of a q/k projection (weight or bias).

    HF orders each head's rows as two halves (the rotate_half layout); llama.cpp interleaves them into pairs
    for its rotary kernel, i.e. stores rows as ``(heads, half, 2)`` where HF has ``(heads, 2, half)``.
    """
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _complete_config(fields: dict[str, Any], path: Path) -> dict[str, Any]:
    """``fields`` completed with the config class's defaults, exactly as AutoConfig completes them."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.for_model(**fields).to_dict()
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot build a {fields['model_type']} config from its metadata: {exc}") from None
    for key in _CONFIG_NOISE:
        config.pop(key, None)
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    # Legacy flat RoPE fields, as the model's own config.json spells them; transformers accepts both forms.
    rope = config.get("rope_parameters") or {}
    if "full_attention" in rope:  # per-layer-type RoPE (Gemma 3: local layers use their own base)
        config["rope_theta"] = rope["full_attention"]["rope_theta"]
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    elif "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    return config


@functools.lru_cache(maxsize=2)
def _converted_tokenizer(path: Path, size: int, mtime_ns: int, model_type: str) -> TokenizersBackend:
    """:func:`_hf_tokenizer`, once per process for an unchanged file (``size``/``mtime_ns`` key the cache)."""
    return _hf_tokenizer(path, model_type)


def _hf_tokenizer(path: Path, model_type: str) -> TokenizersBackend:
    """What ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` returns, built directly from the file.

    Going through ``from_pretrained`` would re-parse the whole header for the config, and would prefer a
    ``tokenizer.json`` lying next to the GGUF file over the GGUF vocabulary.
    """
    from transformers import TokenizersBackend
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    try:
        architecture, vocabulary, tokenizer_config = get_gguf_tokenizer(str(path))
        backend, extra = convert_gguf_tokenizer(architecture, vocabulary)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot build a tokenizer from the metadata of {path}: {exc}") from None
    class_name = TOKENIZER_MAPPING_NAMES.get(model_type)
    cls = (class_name and tokenizer_class_from_name(class_name)) or TokenizersBackend
    return cls(tokenizer_object=backend, **tokenizer_config, **extra)
