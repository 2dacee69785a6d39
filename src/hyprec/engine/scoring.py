"""Teacher-forced scoring: what a model predicts at every position of a known token sequence.

Perplexity, top-1 agreement and the precision tools (``compare``, ``repair``, ``check``) all read the same three
facts per position: the most likely next token, the log-probability of the actual next token, and whether the
logits were finite. :func:`score_logits` computes them once for a chunk of logits; :class:`TokenScores` carries
them for a whole sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from hyprec.finite import finite_rows


class TokenScores(NamedTuple):
    """Per predicted position ``i`` of a sequence (``0 .. len - 2``; position ``i`` predicts token ``i + 1``)."""

    argmax: torch.Tensor  # int64: the most likely next token
    target_logprobs: torch.Tensor  # float32: log-probability of the actual next token
    finite: torch.Tensor  # bool: the position's logits were all finite (else the two above are meaningless)

    def nll(self) -> float:
        """Negative log-likelihood of the targets over the finite positions, summed in float64."""
        return -float(self.target_logprobs[self.finite].double().sum())

    @classmethod
    def cat(cls, parts: list[TokenScores]) -> TokenScores:
        """The scores of consecutive chunks as one."""
        return cls(*(torch.cat(column) for column in zip(*parts, strict=True)))


def score_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, TokenScores]:
    """Float32 log-probabilities of ``logits`` ``[rows, vocab]`` and their :class:`TokenScores` against ``targets``
    ``[rows]`` (on the CPU)."""
    log_probs = torch.log_softmax(logits.float(), dim=1)
    target = log_probs.gather(1, targets[:, None].to(log_probs.device))[:, 0]
    return log_probs, TokenScores(log_probs.argmax(dim=1).cpu(), target.cpu(), finite_rows(logits).cpu())
