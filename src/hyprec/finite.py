"""Which rows of a result are finite: the one check every output path runs before anything reaches a user."""

from __future__ import annotations

import torch

from hyprec.errors import NonFiniteOutputError


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D tensor, whether every value is finite (bool ``[rows]``).

    A row is finite iff its max and min are (NaN propagates into both), so no boolean temporary of the whole tensor is
    made. Measured on [8, 262144] logits: amax + amin 0.3 ms, ``isfinite().all(dim=1)`` 2.8 ms (2% of a decode step),
    ``aminmax(dim=1)`` 1.9 ms.
    """
    if x.shape[1] == 0:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.isfinite(x.amax(dim=1)) & torch.isfinite(x.amin(dim=1))


def refuse_nonfinite(rows: torch.Tensor, inputs: list[int], what: str, policy: str) -> None:
    """Raise :class:`NonFiniteOutputError` naming the ``inputs`` (indices into the caller's input list, one per row
    of ``rows``) whose ``what`` (embeddings, logits) hold NaN/inf under the policy named ``policy``."""
    finite = finite_rows(rows)
    if not finite.all():
        bad = [inputs[j] for j in torch.nonzero(~finite).flatten().tolist()]
        raise NonFiniteOutputError(
            f"non-finite {what} for inputs {bad[:10]} under policy {policy}; retry with dtype='float32' or "
            "dtype='hybrid'"
        )
