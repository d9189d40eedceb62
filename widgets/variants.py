"""A model that shares another's weights and code but runs with a different config.

An explorer's controls change one config value at a time (a threshold, ``sigma``, a scale range)
and show what the model's own ``targets`` makes of it. Rather than rebuilding the model — or
re-implementing its target function — the explorer calls ``targets`` on a shallow copy whose only
difference is its ``cfg`` attribute.
"""

from __future__ import annotations

import copy

from torch import nn

__all__ = ["with_config"]


def with_config(model: nn.Module, cfg) -> nn.Module:
    """A shallow copy of ``model`` whose ``cfg`` is ``cfg``: the same parameters, buffers and
    caches (nothing is copied or re-initialised), and ``model`` itself is left unchanged.

    Only what reads ``self.cfg`` at call time follows the new config (target building, the loss,
    ``predict``); layers built from the config in ``__init__`` stay as they are, so change only
    values that do not shape a layer (thresholds, ``sigma``, scale ranges — not channel counts).
    """
    variant = copy.copy(model)  # a new object with a new __dict__; submodules are shared
    variant.cfg = cfg  # a plain attribute: set on the copy only
    return variant
