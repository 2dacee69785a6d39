"""Which rows of a result are finite: the one check every output path runs before anything reaches a user."""

from __future__ import annotations

import torch


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D tensor, whether every value is finite (bool ``[rows]``).

    A row is finite iff its max and min are (NaN propagates into both), so no boolean temporary of the whole tensor is
    made. Measured on [8, 262144] logits: amax + amin 0.3 ms, ``isfinite().all(dim=1)`` 2.8 ms (2% of a decode step),
    ``aminmax(dim=1)`` 1.9 ms.
    """
    if x.shape[1] == 0:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.isfinite(x.amax(dim=1)) & torch.isfinite(x.amin(dim=1))
