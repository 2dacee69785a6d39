"""Pooling, Dense and Normalize: the sentence-transformers head, always in float32.

A mean pool accumulated in half precision and a half-precision output cast are documented sources of lost
retrieval quality (numerics notes), so hidden states are cast to float32 before any reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hyprec.layers.linear import Linear
from hyprec.loading.st_pipeline import DenseSpec, PipelineSpec, PoolingSpec
from hyprec.loading.weights import Checkpoint, load_weights

_DENSE_ACTIVATIONS = {
    "Identity": nn.Identity,
    "Tanh": nn.Tanh,
    "ReLU": nn.ReLU,
    "GELU": nn.GELU,
    "Sigmoid": nn.Sigmoid,
    "SiLU": nn.SiLU,
}


def _pool_one(h: torch.Tensor, start: int, mode: str) -> torch.Tensor:
    """Pool one sequence's hidden states ``h`` [L, d]; tokens before ``start`` (a prompt) are left out."""
    body = h[start:]
    if mode == "cls":
        return body[0]  # ST >= 6: the first token not excluded as prompt
    if mode == "max":
        return body.max(dim=0).values
    if mode == "mean":
        return body.mean(dim=0)
    if mode == "mean_sqrt_len_tokens":
        return body.sum(dim=0) / body.shape[0] ** 0.5
    if mode == "weightedmean":
        # ST weighs by absolute position (1-based), prompt positions included in the numbering.
        w = torch.arange(start + 1, h.shape[0] + 1, dtype=h.dtype, device=h.device)[:, None]
        return (body * w).sum(dim=0) / w.sum()
    if mode == "lasttoken":
        return h[-1]
    raise ValueError(f"unknown pooling mode {mode!r}")


def pool(hidden: torch.Tensor, seq_lens: list[int], spec: PoolingSpec, prompt_lens: list[int]) -> torch.Tensor:
    """Packed hidden states ``[N, d]`` -> one float32 vector per sequence ``[B, d * len(modes)]``."""
    hidden = hidden.float()
    out = []
    for h, n_prompt in zip(torch.split(hidden, seq_lens), prompt_lens, strict=True):
        start = 0 if spec.include_prompt else min(n_prompt, h.shape[0] - 1)
        out.append(torch.cat([_pool_one(h, start, m) for m in spec.modes]))
    return torch.stack(out)


class Dense(nn.Module):
    """sentence-transformers' Dense module: ``activation(linear(x))`` in float32."""

    def __init__(self, spec: DenseSpec):
        super().__init__()
        with torch.device("meta"):
            self.linear = Linear(spec.in_features, spec.out_features, bias=spec.bias)
            if spec.residual and spec.in_features != spec.out_features:
                self.residual = Linear(spec.in_features, spec.out_features, bias=False)
        load_weights(self, Checkpoint.open(spec.path), compute_dtype=torch.float32)
        self.activation = _DENSE_ACTIVATIONS[spec.activation]()
        self.use_residual = spec.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (self.residual(x) if hasattr(self, "residual") else x)
        return out


class EmbeddingHead(nn.Module):
    """Everything after the transformer: pooling, Dense layers, optional L2 normalisation, Matryoshka cut."""

    def __init__(self, spec: PipelineSpec):
        super().__init__()
        self.spec = spec
        self.dense = nn.ModuleList(Dense(d) for d in spec.dense)

    def forward(
        self,
        hidden: torch.Tensor,
        seq_lens: list[int],
        prompt_lens: list[int],
        *,
        normalize: bool | None = None,
        dimensions: int | None = None,
    ) -> torch.Tensor:
        x = pool(hidden, seq_lens, self.spec.pooling, prompt_lens)
        for layer in self.dense:
            x = layer(x)
        return truncate_and_normalize(x, dimensions, self.spec.normalize if normalize is None else normalize)


def truncate_and_normalize(x: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    """The end of every embedding: Matryoshka truncation to the leading ``dimensions``, then L2 normalisation,
    in that order (as sentence-transformers does), so that truncated unit vectors are unit vectors again."""
    if dimensions is not None:
        x = x[:, :dimensions]
    return F.normalize(x, p=2, dim=1) if normalize else x
