"""Pure functions of detection and instance segmentation, each in a small module.

- :mod:`~instseg_edu.ops.boxes` — IoU / IoF, format conversions, clipping (single and batched).
- :mod:`~instseg_edu.ops.anchors` — ``AnchorGenerator`` (RetinaNet, YOLACT, RPN) and its config.
- :mod:`~instseg_edu.ops.assign` — MaxIoU assignment, per image and batched, with a reason per box,
  and its config.
- :mod:`~instseg_edu.ops.grid_assign` — SOLO's grid assignment (centre region, scale ranges).
- :mod:`~instseg_edu.ops.coder` — the ``(dx, dy, dw, dh)`` box coder (its own config).
- :mod:`~instseg_edu.ops.sampling` — random positive/negative sampling with a fixed budget and its
  config; OHEM (hardest negatives).
- :mod:`~instseg_edu.ops.roi` — readable RoIPool / RoIAlign next to torchvision's.
- :mod:`~instseg_edu.ops.nms` — Fast NMS (YOLACT), Matrix NMS (SOLOv2), points NMS (SOLO), mask NMS;
  the ``nms`` config of box NMS.
- :mod:`~instseg_edu.ops.indexing` — ``first_k_true``: ``nonzero()[:k]`` with a size the host knows.
- :mod:`~instseg_edu.ops.masks` — centre of mass, resizing, tight boxes and cropping of masks.

Boxes are ``xyxy`` absolute pixels everywhere. Nothing here keeps state or modifies its inputs.
Each config piece is a frozen dataclass beside the op it configures, validated once there
(:mod:`instseg_edu.config`).
"""
