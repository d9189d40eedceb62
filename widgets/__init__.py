"""Interactive explorers (ipywidgets + plotly), installed as ``instseg_edu.widgets``.

Each explorer calls the same library functions the models train with; it never re-implements a
computation.

- :class:`AnchorExplorer` — anchor generator config → anchors, coloured by best IoU.
- :class:`AssignerExplorer` — a model's MaxIoU thresholds → positive / ignored / negative anchors.
- :class:`RoIExplorer` — RoIPool vs RoIAlign cells and sampling points.
- :class:`SOLOGridExplorer` — SOLO's S×S grid targets: centre regions, cells, mask channels.
- :class:`PrototypeExplorer` — YOLACT's prototypes, coefficients and the assembled mask.
- :class:`TrainingDashboard` — a training-loop callback drawing losses, lr, img/s and predictions.
- :class:`EvaluationExplorer` — a model's mistakes as COCO counted them: true positives, four
  kinds of false positive, missed objects, precision–recall and confusion.

The classes are imported on first use, so ``import instseg_edu.widgets`` stays cheap.
"""

from __future__ import annotations

import importlib

__all__ = [
    "AnchorExplorer",
    "AssignerExplorer",
    "EvaluationExplorer",
    "PrototypeExplorer",
    "RoIExplorer",
    "SOLOGridExplorer",
    "TrainingDashboard",
]

_MODULES = {
    "AnchorExplorer": "anchor_explorer",
    "AssignerExplorer": "assigner_explorer",
    "RoIExplorer": "roi_explorer",
    "SOLOGridExplorer": "solo_explorer",
    "PrototypeExplorer": "yolact_explorer",
    "TrainingDashboard": "dashboard",
    "EvaluationExplorer": "evaluation_explorer",
}


def __getattr__(name: str):
    if name in _MODULES:
        module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
