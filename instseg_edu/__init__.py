"""instseg_edu: detection and instance segmentation, rebuilt readably in PyTorch.

Four families — RetinaNet, Mask R-CNN, SOLO and YOLACT — built from small, tested pieces
(``instseg_edu.ops``, ``instseg_edu.losses``), trained by one loop (``instseg_edu.engine``), and
explained by the notebooks in ``notebooks/`` and the explorers in ``instseg_edu.widgets``.

Importing this package loads only torch, torchvision, numpy and pycocotools; plotting and widget
libraries are imported inside the functions that draw.
"""

from instseg_edu.structures import Batch, Detections, Target

__version__ = "0.1.0"
__all__ = ["Batch", "Detections", "Target", "__version__"]
