"""Pure functions of detection and instance segmentation, each in a small module.

- :mod:`~instseg_edu.ops.boxes` — IoU / IoF, format conversions, clipping (single and batched).
- :mod:`~instseg_edu.ops.anchors` — ``AnchorGenerator`` (RetinaNet, RPN).
- :mod:`~instseg_edu.ops.assign` — MaxIoU assignment, per image and batched, with a reason per box.
- :mod:`~instseg_edu.ops.coder` — the ``(dx, dy, dw, dh)`` box coder.
- :mod:`~instseg_edu.ops.sampling` — random positive/negative sampling with a fixed budget.
- :mod:`~instseg_edu.ops.roi` — readable RoIPool / RoIAlign next to torchvision's.
- :mod:`~instseg_edu.ops.nms` — Fast NMS (YOLACT), Matrix NMS (SOLOv2), points NMS (SOLO), mask NMS.
- :mod:`~instseg_edu.ops.indexing` — ``first_k_true``: ``nonzero()[:k]`` with a size the host knows.
- :mod:`~instseg_edu.ops.masks` — centre of mass, resizing, tight boxes and cropping of masks.

Boxes are ``xyxy`` absolute pixels everywhere. Nothing here keeps state or modifies its inputs.
"""
