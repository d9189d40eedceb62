"""Model families. Each is one readable file with the same three public stages:

1. ``outputs = model(images)`` — ``images`` are ``float32 [B, 3, Hp, Wp]`` in ``[0, 1]`` (the model
   normalises them itself); ``outputs`` is a NamedTuple of raw head tensors with documented shapes.
2. ``targets = model.targets(outputs, batch)`` and ``losses = model.loss(outputs, batch)`` — the
   loss calls exactly ``targets``. ``losses`` is a ``dict[str, Tensor]``: keys starting with
   ``loss_`` are scalar terms the training loop sums and back-propagates; any other key (e.g.
   ``num_pos``) is a detached statistic the loop only logs.
3. ``detections = model.predict(outputs, image_sizes)`` — a list of
   :class:`instseg_edu.structures.Detections`, one per image.

The fast forms are batched and avoid host synchronisation; :mod:`instseg_edu.models.references`
writes the same steps per image and per level, as the papers describe them (read those first).

Beside the four family files: :mod:`~instseg_edu.models.backbone` (ResNet + FPN),
:mod:`~instseg_edu.models.dense_heads` (the anchor plumbing RetinaNet, YOLACT and the RPN share, as
plain functions), :mod:`~instseg_edu.models.rpn` and :mod:`~instseg_edu.models.roi_heads` (Mask
R-CNN's two stages), and :mod:`instseg_edu.models.configs` (each family's configuration and
presets, composed of the config pieces that live beside their ops; re-exported by the family
modules). Target encodings and the shape letters are those of :mod:`instseg_edu.structures`.

There is no registry: one ``build_<family>(cfg)`` per family (``build_retinanet``,
``build_mask_rcnn``, ``build_solo``, ``build_yolact``), and one plain table, :data:`BUILDERS`,
from a family name to its module, builder and config class. A checkpoint stores that name and the
config as plain data, so :func:`instseg_edu.engine.checkpoint.load_model` rebuilds the model from
it; the command line adds each family's presets in ``instseg_edu.cli.FAMILIES``.
"""

#: family name -> (module, builder, config class name); modules are imported only when used.
BUILDERS = {
    "retinanet": ("instseg_edu.models.retinanet", "build_retinanet", "RetinaNetConfig"),
    "mask_rcnn": ("instseg_edu.models.mask_rcnn", "build_mask_rcnn", "MaskRCNNConfig"),
    "solo": ("instseg_edu.models.solo", "build_solo", "SOLOConfig"),
    "yolact": ("instseg_edu.models.yolact", "build_yolact", "YOLACTConfig"),
}


def build_model(family: str, cfg):
    """``build_<family>(cfg)`` for a family name (a key of :data:`BUILDERS`), importing only that
    family's module.

    Raises:
        KeyError: ``family`` is not one of :data:`BUILDERS`.
    """
    import importlib

    module_name, builder, _ = BUILDERS[family]
    return getattr(importlib.import_module(module_name), builder)(cfg)
