"""Architecture parity with transformers, and proof that attention runs in the declared dtype.

Small randomly initialised models are built with transformers' own classes and saved into a temporary
directory (each once per module). hyprec at dtype="float32" must reproduce transformers' float32 last hidden
states on every real token; the hybrid policies must stay close to that reference. A dispatch-mode recorder
then shows which aten ops actually ran, and in which dtypes: the fused SDPA kernel in the attention dtype,
every matmul in the compute dtype.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hyprec.engine.embedding_engine import EmbeddingEngine
from hyprec.errors import UnsupportedArchitectureError

HALF = (torch.float16, torch.bfloat16)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of rounding one real number to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def fp32_tol(config: dict, scale: float) -> float:
    """Largest |difference| allowed between two float32 computations of the same hidden states (hyprec against
    transformers, or one sequence in two batch compositions), whose largest |value| is ``scale``.

    Both compute the same float32 maths and differ only in the order of their sums (GEMM blocking, single-row GEMV
    vs GEMM, the fused attention kernel's vectorised reductions over the padded key length, LayerNorm statistics).
    An n-term sum evaluated in two orders differs by at most 2 n u sum|terms|; these sums have mixed signs, whose
    rounding errors are random (typically sqrt(n) u sum|terms|), so n u scale per sum is a safe figure, with n the
    widest sum (hidden or intermediate size). Each layer adds its own share to what it passes on: layers + 1 (the
    embeddings) of them, and x4 for LayerNorm, whose 1/std scaling can amplify an absolute error a few times.
    Wiring faults (a lost padding mask or position bias, positions off by one) move states by O(scale).
    """
    n = max(config["hidden_size"], config["intermediate_size"])
    return 4 * (config["num_hidden_layers"] + 1) * n * unit_roundoff(torch.float32) * scale


def hybrid_tol(config: dict, attn: str, scale: float) -> float:
    """Largest |hybrid - float32| allowed for hidden states of largest |value| ``scale`` when attention runs in
    ``attn`` (float16 or bfloat16).

    Per layer, q, k and v (and MPNet's position bias) are rounded to ``attn`` on the way into the fused kernel and
    its output on the way out: four roundings of relative size u each, which move the attention output by about
    4 u of its scale. A layer passes its error on through the residual stream and adds its own, so layers x 4 u,
    and x2 for the FFN and LayerNorm after it. Measured differences stay below a fifth of this (the largest:
    MPNet, whose position bias is a fifth rounding); wiring faults exceed it many times over.
    """
    return 2 * config["num_hidden_layers"] * 4 * unit_roundoff(getattr(torch, attn)) * scale


_FAMILIES = {
    "bert": ("BertConfig", "BertModel", "BertForMaskedLM"),
    "roberta": ("RobertaConfig", "RobertaModel", "RobertaForMaskedLM"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", "XLMRobertaForMaskedLM"),
    "mpnet": ("MPNetConfig", "MPNetModel", "MPNetForMaskedLM"),
}


@dataclass(frozen=True)
class Case:
    """One tiny checkpoint: family, config overrides, head class and serialisation format."""

    name: str
    family: str
    config: dict[str, Any] = field(default_factory=dict)
    masked_lm: bool = False  # save the *ForMaskedLM class: weights carry a "bert."/"roberta."/... prefix
    safetensors: bool = True  # False: pytorch_model.bin

    @property
    def pad_id(self) -> int:
        # transformers' MPNet hard-codes padding_idx = 1 (for positions); the others read config.pad_token_id.
        return 1 if self.family == "mpnet" else self.config["pad_token_id"]

    @property
    def max_len(self) -> int:
        """Longest sequence the position table addresses (RoBERTa/MPNet positions start at pad_id + 1)."""
        offset = 0 if self.family == "bert" else self.pad_id + 1
        return self.config["max_position_embeddings"] - offset


def _cfg(hidden: int, heads: int, layers: int, inter: int, act: str, max_pos: int, **extra: Any) -> dict:
    return {
        "vocab_size": extra.pop("vocab_size", 150),
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "hidden_act": act,
        "max_position_embeddings": max_pos,
        # Larger than the default 0.02 so attention is peaked and positions matter: a wrong mask or position
        # offset then moves the outputs far beyond the tolerance.
        "initializer_range": 0.2,
        **extra,
    }


CASES = [
    Case("bert-h60x4-gelu", "bert", _cfg(60, 4, 2, 50, "gelu", 40, pad_token_id=0)),
    Case(
        "bert-h72x8-gelu_new-3l",
        "bert",
        _cfg(72, 8, 3, 100, "gelu_new", 33, pad_token_id=0, layer_norm_eps=1e-5, type_vocab_size=3),
    ),
    Case("bert-mlm-h32x2-relu", "bert", _cfg(32, 2, 1, 37, "relu", 24, pad_token_id=0), masked_lm=True),
    Case(
        "bert-bin-h48x6-gelu_new",
        "bert",
        _cfg(48, 6, 2, 64, "gelu_new", 30, pad_token_id=0, vocab_size=101),
        safetensors=False,
    ),
    Case("roberta-pad1-h40x5-gelu", "roberta", _cfg(40, 5, 2, 80, "gelu", 36, pad_token_id=1, type_vocab_size=1)),
    Case("roberta-pad0-h72x8-relu", "roberta", _cfg(72, 8, 1, 48, "relu", 40, pad_token_id=0, type_vocab_size=1)),
    Case(
        "roberta-mlm-bin-pad3-h60x4-gelu_new",
        "roberta",
        _cfg(60, 4, 2, 90, "gelu_new", 34, pad_token_id=3, layer_norm_eps=1e-5),
        masked_lm=True,
        safetensors=False,
    ),
    Case("xlmr-h60x4-gelu_new-3l", "xlm-roberta", _cfg(60, 4, 3, 70, "gelu_new", 40, pad_token_id=1)),
    Case("xlmr-mlm-h36x4-relu", "xlm-roberta", _cfg(36, 4, 1, 50, "relu", 28, pad_token_id=1), masked_lm=True),
    Case("mpnet-h60x4-gelu", "mpnet", _cfg(60, 4, 2, 50, "gelu", 40, pad_token_id=1)),
    Case("mpnet-h72x8-relu-3l", "mpnet", _cfg(72, 8, 3, 40, "relu", 36, pad_token_id=1)),
    Case(
        "mpnet-mlm-bin-h48x3-gelu_new",
        "mpnet",
        _cfg(48, 3, 1, 64, "gelu_new", 30, pad_token_id=1),
        masked_lm=True,
        safetensors=False,
    ),
]
CASE_BY_NAME = {c.name: c for c in CASES}
ROBERTA_CASES = [c for c in CASES if c.family in ("roberta", "xlm-roberta")]


@dataclass
class Built:
    """A saved checkpoint, the transformers encoder it came from, and its float32 reference on the test batch."""

    case: Case
    path: Path
    encoder: torch.nn.Module  # the bare *Model (the base model of a *ForMaskedLM)
    seqs: list[list[int]]
    reference: list[torch.Tensor]  # transformers' last hidden state of each sequence, real tokens only
    _hyprec_fp32: list[torch.Tensor] | None = None

    def hyprec_fp32(self) -> list[torch.Tensor]:
        """hyprec's dtype="float32" hidden states of ``seqs`` (computed once)."""
        if self._hyprec_fp32 is None:
            eng = _engine(self.path, "float32")
            assert eng.policy.compute_dtype == torch.float32 and eng.policy.attn_dtype == torch.float32
            self._hyprec_fp32 = eng.hidden_states(self.seqs)
        return self._hyprec_fp32


def _random_seqs(case: Case, lens: list[int], seed: int) -> list[list[int]]:
    """Random ids in [0, vocab) avoiding the pad id (transformers derives RoBERTa/MPNet positions from it)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = case.config["vocab_size"]
    allowed = torch.tensor([i for i in range(vocab) if i != case.pad_id])
    return [allowed[torch.randint(len(allowed), (n,), generator=gen)].tolist() for n in lens]


def transformers_hidden(
    encoder: torch.nn.Module, seqs: list[list[int]], pad_id: int, position_ids: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """transformers' float32 last hidden states on a right-padded batch, unpadded again."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    with torch.no_grad():
        out = encoder(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
    return [out[i, : len(s)].float() for i, s in enumerate(seqs)]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _build(case: Case, root: Path) -> Built:
    conf_cls, base_cls, mlm_cls = (getattr(transformers, n) for n in _FAMILIES[case.family])
    config = conf_cls(**case.config)
    torch.manual_seed(sum(map(ord, case.name)))
    model = (mlm_cls if case.masked_lm else base_cls)(config).float().eval()
    path = root / case.name
    model.save_pretrained(path)
    if not case.safetensors:
        # transformers 5 writes safetensors only (safe_serialization=False is ignored), so write the legacy
        # format as transformers 4 did: torch.save of the full state dict, with the position-id buffer that
        # older versions saved too.
        state = model.state_dict()
        prefix = f"{model.base_model_prefix}." if case.masked_lm else ""
        state[f"{prefix}embeddings.position_ids"] = torch.arange(case.config["max_position_embeddings"])[None]
        torch.save(state, path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    weights = "model.safetensors" if case.safetensors else "pytorch_model.bin"
    assert sorted(p.name for p in path.iterdir()) == sorted(["config.json", weights])
    encoder = model.base_model if case.masked_lm else model
    # A length-1 sequence, one at the position table's limit, and two in between: a ragged batch of four.
    seqs = _random_seqs(case, [9, case.max_len, 1, 14], seed=len(case.name))
    return Built(case, path, encoder, seqs, transformers_hidden(encoder, seqs, case.pad_id))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """``built(case_name)``: the checkpoint of that case, saved once per module."""
    root = tmp_path_factory.mktemp("arch_parity")
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            cache[name] = _build(CASE_BY_NAME[name], root)
        return cache[name]

    return get


def _engine(path: Path, dtype: str, attn_dtype: str = "auto") -> EmbeddingEngine:
    return EmbeddingEngine(path, dtype=dtype, attn_dtype=attn_dtype)


# ---------------------------------------------------------------------------------------------------------------
# 1. Numerical parity
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_float32_matches_transformers(built, name):
    b = built(name)
    out = b.hyprec_fp32()
    assert all(o.dtype == torch.float32 for o in out)
    diff = max_abs_diff(out, b.reference)
    scale = max(r.abs().max().item() for r in b.reference)
    tol = fp32_tol(b.case.config, scale)
    print(f"{name}: fp32 max|diff| {diff:.2e} (max|h| {scale:.2f}, tolerance {tol:.2e})")
    assert diff <= tol, f"{name}: max |hyprec - transformers| = {diff:.3e} > {tol:.3e}"


@pytest.mark.parametrize("attn", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_hybrid_close_to_float32_reference(built, name, attn):
    b = built(name)
    eng = _engine(b.path, "hybrid", attn)
    assert eng.policy.mode == "hybrid"
    assert eng.policy.compute_dtype == torch.float32
    assert eng.policy.attn_dtype == getattr(torch, attn)
    out = eng.hidden_states(b.seqs)
    assert all(o.dtype == torch.float32 for o in out)
    scale = max(r.abs().max().item() for r in b.reference)
    diff, tol = max_abs_diff(out, b.reference), hybrid_tol(b.case.config, attn, scale)
    print(f"{name}: hybrid-{attn} max|diff| {diff:.2e} (tolerance {tol:.2e})")
    assert diff <= tol, f"{name} hybrid {attn}: max diff {diff:.3e} > {tol:.3e}"
    # Half-precision attention must actually have happened: output bit-identical to hyprec's own float32 run
    # would mean it did not.
    assert max_abs_diff(out, b.hyprec_fp32()) > 0, (
        f"{name} hybrid {attn}: identical to float32; attention not in {attn}?"
    )


def _batch_composition_diff(eng: EmbeddingEngine, seqs: list[list[int]], longest: list[int]) -> float:
    """Worst change of any sequence's hidden states between running alone and running in a batch: every
    order of ``seqs``, and next to ``longest`` (more padding than any of the others)."""
    alone = [eng.hidden_states([s])[0] for s in seqs]
    worst = 0.0
    for order in itertools.permutations(range(len(seqs))):
        out = eng.hidden_states([seqs[i] for i in order])
        worst = max(worst, max_abs_diff(out, [alone[i] for i in order]))
    out = eng.hidden_states([seqs[1], longest, *seqs[2:], seqs[0]])
    return max(worst, max_abs_diff(out, [alone[1], eng.hidden_states([longest])[0], *alone[2:], alone[0]]))


@pytest.mark.parametrize(
    "name", ["bert-h60x4-gelu", "roberta-pad0-h72x8-relu", "xlmr-h60x4-gelu_new-3l", "mpnet-h60x4-gelu"]
)
def test_batch_composition_does_not_change_float32_results(built, name):
    """A sequence's hidden states do not depend on its batch-mates, their lengths, or its place in the batch."""
    b = built(name)
    seqs = [b.seqs[0], b.seqs[2], b.seqs[3]]  # lengths 9, 1, 14
    worst = _batch_composition_diff(_engine(b.path, "float32"), seqs, b.seqs[1])
    tol = fp32_tol(b.case.config, max(r.abs().max().item() for r in b.reference))
    print(f"{name} float32: batch-composition max|diff| {worst:.2e} (tolerance {tol:.2e})")
    assert worst <= tol, f"{name}: batch composition changed hidden states by {worst:.3e}"


@pytest.mark.parametrize(("name", "attn"), [("bert-h60x4-gelu", "float16"), ("mpnet-h60x4-gelu", "bfloat16")])
def test_batch_composition_in_hybrid_mode_stays_within_half_precision_rounding(built, name, attn):
    """In hybrid mode the kernel rounds its output to half precision, so the last-bit float32 differences above
    can flip roundings (one fp16/bf16 unit each): within the hybrid tolerance, whose roundings these are; more
    would mean batch-mates leak into each other."""
    b = built(name)
    seqs = [b.seqs[0], b.seqs[2], b.seqs[3]]
    worst = _batch_composition_diff(_engine(b.path, "hybrid", attn), seqs, b.seqs[1])
    tol = hybrid_tol(b.case.config, attn, max(r.abs().max().item() for r in b.reference))
    print(f"{name} hybrid-{attn}: batch-composition max|diff| {worst:.2e} (tolerance {tol:.2e})")
    assert worst <= tol


@pytest.mark.parametrize("name", [c.name for c in ROBERTA_CASES])
def test_roberta_positions_follow_pad_token_id(built, name):
    """transformers numbers RoBERTa positions from pad_token_id + 1; hyprec must do the same for any pad id,
    and the parity check must be sensitive to an off-by-one there."""
    b = built(name)
    pad = b.case.config["pad_token_id"]
    assert b.encoder.embeddings.padding_idx == pad  # transformers honours the configured pad id
    width = max(map(len, b.seqs))
    expected = (torch.arange(width) + pad + 1).expand(len(b.seqs), -1)
    explicit = transformers_hidden(b.encoder, b.seqs, pad, position_ids=expected)
    assert max_abs_diff(explicit, b.reference) == 0.0
    # Shifted by one (what pad_token_id=1 would give a pad-0 model, or 0-based positions a pad-1 one):
    # far from hyprec. The longest sequence would overflow the table, so compare the others only.
    short = [s for s in b.seqs if len(s) < b.case.max_len]
    width = max(map(len, short))
    shifted_ids = (torch.arange(width) + pad + 2).expand(len(short), -1)
    shifted = transformers_hidden(b.encoder, short, pad, position_ids=shifted_ids)
    out = _engine(b.path, "float32").hidden_states(short)
    scale = max(r.abs().max().item() for r in b.reference)
    assert max_abs_diff(out, shifted) > 10 * fp32_tol(b.case.config, scale)


def test_mlm_checkpoint_has_prefixed_names(built):
    """The *ForMaskedLM cases really exercise prefix stripping (and the .bin cases the torch.load path)."""
    from safetensors import safe_open

    b = built("bert-mlm-h32x2-relu")
    with safe_open(str(b.path / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert names and all(n.startswith(("bert.", "cls.")) for n in names), names[:5]
    b = built("mpnet-mlm-bin-h48x3-gelu_new")
    assert not (b.path / "model.safetensors").exists()
    names = list(torch.load(b.path / "pytorch_model.bin", weights_only=True, map_location="cpu"))
    assert any(n.startswith("mpnet.encoder.layer.0.") for n in names), names[:5]


# ---------------------------------------------------------------------------------------------------------------
# 2. Which kernels ran, in which dtypes
# ---------------------------------------------------------------------------------------------------------------

FUSED_SDPA = "aten._scaled_dot_product_flash_attention_for_cpu"
# Linear layers: F.linear's addmm, or oneDNN's GEMM where the engine chose it for float32 (layers/onednn.py).
LINEAR_OPS = ("aten.addmm", "mkldnn._linear_pointwise")
MATMUL_OPS = (*LINEAR_OPS, "aten.mm", "aten.bmm", "aten.linear", "aten.matmul", "aten.baddbmm")
# Ops that may see half-precision tensors in hybrid mode: the attention call itself and moving/casting
# q/k/v/mask into and out of the padded [B, H, T, D] layout. Anything else means half precision leaked.
HYBRID_HALF_OK = (
    "aten.scaled_dot_product_attention",
    FUSED_SDPA,
    "aten._to_copy",
    "aten.to",
    "aten.copy_",
    "aten.new_zeros",
    "aten.zeros",
    "aten.index_put_",
    "aten.index_copy_",  # packed rows into the padded buffer (attention_backends._pad)
    "aten.index_select",  # and back (_unpad)
    "aten.index",
    "aten.transpose",
    "aten.view",
    "aten.reshape",
    "aten.unsqueeze",
    "aten.select",
    "aten.slice",
    "aten.expand",
    "aten.permute",
    "aten.clone",
    "aten.contiguous",
    "aten.where",
    "aten.scalar_tensor",
    "aten.detach",
    "aten.alias",
    "aten._unsafe_view",
    "aten.as_strided",
    "aten.cat",
    "aten.stack",
    "aten.split",
    "aten.split_with_sizes",
    "aten.unbind",
    "aten.narrow",
    "aten.constant_pad_nd",
    "aten.empty",
    "aten.new_empty",
    "aten.new_full",
    "aten.full",
    "aten.fill_",
    "aten.masked_fill",
    "aten.index_select",
    "aten.gather",
)


@dataclass
class Call:
    op: str  # overload packet name, e.g. "aten.addmm"
    args: dict[str, Any]  # schema argument name -> value
    out: Any

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in tree_leaves((self.args, self.out)) if isinstance(t, torch.Tensor)]

    def float_dtypes(self) -> set[torch.dtype]:
        return {t.dtype for t in self.tensors() if t.is_floating_point()}


class OpRecorder(TorchDispatchMode):
    """Records every aten op with its arguments bound to schema names.

    Composite ops (``aten.linear``, ``aten.scaled_dot_product_attention``) reach a Python mode undecomposed
    under inference mode; they are recorded and then decomposed here exactly as the dispatcher would, so the
    kernels they select (``addmm``, the fused CPU flash kernel) are recorded too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bound = {a.name: v for a, v in zip(func._schema.arguments, args, strict=False)}  # trailing defaults omitted
        bound.update(kwargs)
        out = NotImplemented
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:
                out = func.decompose(*args, **kwargs)
        if out is NotImplemented:
            out = func(*args, **kwargs)
        self.calls.append(Call(str(func.overloadpacket), bound, out))
        return out

    def named(self, *ops: str) -> list[Call]:
        return [c for c in self.calls if c.op in ops]


def record(eng: EmbeddingEngine, seqs: list[list[int]]) -> OpRecorder:
    with OpRecorder() as rec:
        eng.hidden_states(seqs)
    return rec


@pytest.fixture(scope="module")
def dispatch_models(built, minilm_dir):
    """name -> (model dir, number of layers, uses an additive bias mask, a ragged batch of token ids)."""
    bert, mpnet = built("bert-h60x4-gelu"), built("mpnet-h60x4-gelu")
    return {
        "bert": (bert.path, 2, False, [bert.seqs[0], bert.seqs[3], bert.seqs[2]]),
        "mpnet": (mpnet.path, 2, True, [mpnet.seqs[0], mpnet.seqs[3], mpnet.seqs[2]]),
        # all-MiniLM-L6-v2: [CLS] ... [SEP] with word ids from its 30522-token vocabulary.
        "minilm": (minilm_dir, 6, False, [[101, 7592, 2088, 102], [101, 1037, 2062, 2146, 6251, 1012, 102]]),
    }


@pytest.mark.parametrize(
    ("dtype", "attn", "expected"),
    [
        ("float32", "auto", torch.float32),
        ("hybrid", "float16", torch.float16),
        ("hybrid", "bfloat16", torch.bfloat16),
        ("bfloat16", "auto", torch.bfloat16),
    ],
    ids=["float32", "hybrid-fp16", "hybrid-bf16", "bfloat16"],
)
@pytest.mark.parametrize("model", ["bert", "mpnet", "minilm"])
def test_fused_attention_runs_in_declared_dtype(dispatch_models, model, dtype, attn, expected):
    path, layers, biased, seqs = dispatch_models[model]
    eng = _engine(path, dtype, attn)
    assert eng.policy.attn_dtype == expected
    rec = record(eng, seqs)

    fused = rec.named(FUSED_SDPA)
    assert len(fused) == layers, f"expected the fused CPU SDPA kernel once per layer, ran {len(fused)} times"
    for call in fused:
        got = {k: call.args[k].dtype for k in ("query", "key", "value")}
        assert got == dict.fromkeys(got, expected), f"fused SDPA inputs {got}, expected {expected}"
        assert call.out[0].dtype == expected
        mask = call.args.get("attn_mask")
        assert mask is not None and mask.dtype == expected  # ragged batch: padded keys are masked
    # No unfused fallback: the math path materialises the scores and runs a separate softmax.
    ran = {c.op for c in rec.calls}
    assert not ran & {"aten._scaled_dot_product_attention_math", "aten._softmax", "aten.softmax"}, ran

    for call in rec.named("aten.scaled_dot_product_attention"):  # the mask exactly as hyprec passes it
        mask = call.args["attn_mask"]
        if biased:  # MPNet: relative position bias as an additive float mask in the attention dtype
            assert mask.dtype == expected and mask.shape[-2:] == (max(map(len, seqs)),) * 2
            assert torch.isinf(mask).any() and not torch.isnan(mask).any()
        else:  # key-padding mask only
            assert mask.dtype == torch.bool


@pytest.mark.parametrize("attn", ["float16", "bfloat16"])
@pytest.mark.parametrize("model", ["bert", "mpnet", "minilm"])
def test_hybrid_keeps_everything_but_attention_in_float32(dispatch_models, model, attn):
    path, layers, _, seqs = dispatch_models[model]
    rec = record(_engine(path, "hybrid", attn), seqs)

    matmuls = rec.named(*MATMUL_OPS)
    assert len(rec.named(*LINEAR_OPS)) >= 6 * layers  # q, k, v, attention out, FFN in, FFN out
    bad = [(c.op, c.float_dtypes()) for c in matmuls if c.float_dtypes() != {torch.float32}]
    assert not bad, f"matmuls outside float32 in hybrid mode: {bad[:5]}"
    for c in rec.named("aten.native_layer_norm", "aten.gelu", "aten.relu", "aten.embedding", "aten.add"):
        assert c.float_dtypes() <= {torch.float32}, (c.op, c.float_dtypes())

    half = getattr(torch, attn)
    leaked = sorted({c.op for c in rec.calls if c.float_dtypes() & set(HALF)} - set(HYBRID_HALF_OK))
    assert not leaked, f"ops that saw half-precision tensors outside attention: {leaked}"
    for c in rec.named(FUSED_SDPA):
        assert {c.args[k].dtype for k in ("query", "key", "value", "attn_mask")} == {half}


def test_whole_model_bfloat16_runs_matmuls_in_bfloat16(dispatch_models):
    path, layers, _, seqs = dispatch_models["bert"]
    eng = _engine(path, "bfloat16")
    assert eng.policy.compute_dtype == torch.bfloat16
    rec = record(eng, seqs)
    addmm = rec.named("aten.addmm")
    assert len(addmm) >= 6 * layers
    assert all(c.float_dtypes() == {torch.bfloat16} for c in addmm), {frozenset(c.float_dtypes()) for c in addmm}
    # Norms compute in float32 under every policy (their input is upcast, their params stay float32).
    norms = rec.named("aten.native_layer_norm")
    assert norms and all(c.args["input"].dtype == torch.float32 for c in norms)
    assert all(c.args["weight"].dtype == torch.float32 for c in norms)


# ---------------------------------------------------------------------------------------------------------------
# 3. Unsupported architectures
# ---------------------------------------------------------------------------------------------------------------


def _config_dir(path: Path, config: dict) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))  # so only the config can be at fault
    return path


def test_unknown_model_type_names_it_and_the_supported_ones(tmp_path):
    from hyprec.models.registry import supported_architectures

    supported = supported_architectures()
    assert {"bert", "mpnet", "roberta", "xlm-roberta"} <= set(supported)
    model_type = "gpt2" if "gpt2" not in supported else "no-such-arch"
    d = _config_dir(
        tmp_path / "unknown",
        {"model_type": model_type, "architectures": ["GPT2LMHeadModel"], "n_embd": 32, "vocab_size": 50},
    )
    with pytest.raises(UnsupportedArchitectureError) as err:
        EmbeddingEngine(d, dtype="float32")
    msg = str(err.value)
    assert repr(model_type) in msg and "GPT2LMHeadModel" in msg and str(d / "config.json") in msg
    assert ", ".join(supported) in msg  # the full sorted list, encoders included
    assert isinstance(err.value, ValueError)  # part of the documented hierarchy


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [({"position_embedding_type": "relative_key"}, "relative_key"), ({"num_attention_heads": 7}, "divisible")],
)
def test_unsupported_bert_variants_are_rejected(tmp_path, overrides, needle):
    cfg = {"model_type": "bert", **_cfg(32, 4, 1, 40, "gelu", 16, pad_token_id=0), **overrides}
    d = _config_dir(tmp_path / "bert", cfg)
    with pytest.raises(UnsupportedArchitectureError, match=needle):
        EmbeddingEngine(d, dtype="float32")
