"""The runs: a baseline per model kind and one-factor-at-a-time variants of it."""

from __future__ import annotations

from dataclasses import dataclass, replace

#: The Hugging Face architectures a run can train, and whether each is a decoder LM or a mean-pooled encoder.
FAMILIES = {"llama": "decoder", "qwen3": "decoder", "gemma3": "decoder", "bert": "encoder"}


@dataclass(frozen=True)
class RunConfig:
    """One training run. Every field but ``name`` and ``factor`` is a knob; a variant changes one of them."""

    name: str
    factor: str  # the factor this run varies against the run it is based on ("baseline" for the baselines)
    family: str = "llama"  # a key of FAMILIES
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 384  # intermediate size (the gated FFN's width for decoders)
    vocab: int = 4096
    seq_len: int = 128  # also the window of each text that check and compare read
    batch: int = 8
    steps: int = 600
    checkpoints: int = 3  # evenly spaced along the run, the last at ``steps``
    lr: float = 1e-3
    warmup: int = 60  # linear warm-up steps, then cosine decay to 10% of ``lr``
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices and embeddings; biases never
    decay_norms: bool = False  # also decay the norm gains
    tied: bool = False
    bias: bool = False  # q/k/v/o and FFN biases (decoders; BERT always has them)
    activation: str = "silu"  # the FFN gate's activation (decoders; BERT uses GELU)
    dropout: float = 0.0
    embed_scale: bool = True  # Gemma-3 only: False trains it with its embedding multiplier sqrt(hidden) at 1
    clip: float = 1.0  # gradient-norm clipping
    seed: int = 0
    based_on: str | None = None  # the run this one varies (None: a baseline)

    @property
    def kind(self) -> str:
        return FAMILIES[self.family]

    def checkpoint_steps(self) -> list[int]:
        return [round(self.steps * (i + 1) / self.checkpoints) for i in range(self.checkpoints)]


DECODER = RunConfig("decoder-baseline", "baseline")
ENCODER = RunConfig("encoder-baseline", "baseline", family="bert", ffn=512, activation="gelu")


def _variant(base: RunConfig, name: str, factor: str, **change) -> RunConfig:
    """``base`` with ``change``, named ``<kind>-<name>``; ``based_on`` records ``base``'s name."""
    return replace(base, name=f"{base.kind}-{name}", factor=factor, based_on=base.name, **change)


def default_grid() -> list[RunConfig]:
    """The study's grid (~45 minutes on 2 cores): see ``docs/fp16-study.md`` for why each variant is there."""
    d, e = DECODER, ENCODER
    gemma = _variant(d, "gemma", "embedding scale + sandwich norms", family="gemma3", activation="gelu_pytorch_tanh")
    return [
        d,
        _variant(d, "seed1", "seed", seed=1),
        _variant(d, "tied", "tied embeddings", tied=True),
        _variant(d, "bias", "bias terms", bias=True),
        _variant(d, "geglu", "activation", activation="gelu_pytorch_tanh"),
        _variant(d, "qk-norm", "qk-norm", family="qwen3"),
        gemma,
        _variant(gemma, "gemma-no-scale", "embedding scale", embed_scale=False),
        _variant(d, "lr-3e-3", "learning rate", lr=3e-3),
        _variant(d, "lr-1e-2", "learning rate", lr=1e-2),
        _variant(d, "lr-3e-2", "learning rate", lr=3e-2),
        _variant(d, "lr-3e-4", "learning rate", lr=3e-4),
        _variant(d, "no-warmup", "warm-up", warmup=0),
        _variant(d, "eps-1e-5", "Adam epsilon", eps=1e-5),
        _variant(d, "beta2-0.999", "Adam beta2", beta2=0.999),
        _variant(d, "no-wd", "weight decay", weight_decay=0.0),
        _variant(d, "wd-norms", "norm-gain weight decay", decay_norms=True),
        _variant(d, "long", "training length", steps=1800, checkpoints=6),
        e,
        _variant(e, "lr-3e-3", "learning rate", lr=3e-3),
        _variant(e, "no-wd", "weight decay", weight_decay=0.0),
        _variant(e, "wd-norms", "norm-gain weight decay", decay_norms=True),
        _variant(e, "dropout", "dropout", dropout=0.1),
    ]


def quick_grid() -> list[RunConfig]:
    """A smoke run for CI: every family's code path on tiny shapes, a few steps each."""
    tiny = dict(hidden=32, layers=2, heads=2, ffn=64, vocab=512, seq_len=32, batch=4, steps=6, checkpoints=2, warmup=2)
    d, e = replace(DECODER, **tiny), replace(ENCODER, **tiny)
    return [
        d,
        _variant(d, "qk-norm", "qk-norm", family="qwen3"),
        _variant(d, "gemma", "embedding scale + sandwich norms", family="gemma3"),
        e,
    ]
