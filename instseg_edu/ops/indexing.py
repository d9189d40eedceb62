"""Indexing with sizes the host already knows.

``mask.nonzero()`` returns a tensor whose length depends on the data, so on a GPU the host waits
for the device before it can even allocate the result. The fast model steps avoid it wherever the
count is already known on the host (read once for a whole batch): they select the first ``k``
True entries with a stable sort, :func:`first_k_true`. The readable references in
:mod:`instseg_edu.models.references` use ``nonzero`` and boolean indexing instead; tests check that
both give the same indices.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["first_k_true"]


def first_k_true(mask: Tensor, k: int) -> Tensor:
    """Indices of the first ``k`` True entries of a 1-D mask, ascending: ``mask.nonzero()[:k, 0]``
    with a size known in advance.

    A stable sort of ``~mask`` puts the True entries (``~mask`` False) first, in their original
    order. Example: ``mask = [F, T, T, F, T]``, ``k = 2`` → ``[1, 2]``.

    Args:
        mask: ``bool [N]``.
        k: how many indices to return, ``0 <= k <= N``; with ``k <= mask.sum()`` every index
            returned is a True entry (a larger ``k`` appends False entries, in order).

    Returns:
        ``int64 [k]``.
    """
    return torch.argsort(~mask, stable=True)[:k]
