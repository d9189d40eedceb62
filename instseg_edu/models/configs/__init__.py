"""The four families' configurations, one module each, as MMDetection keeps its ``configs/``
beside its model code.

A family's config composes the shared pieces — each defined once, beside the op it configures
(see :mod:`instseg_edu.config`) — with its own head sizes, ``train_cfg`` and ``test_cfg``, and the
module ends with the presets (``RETINANET_R50_FPN``, ``MASK_RCNN_R18_SMALL``, ...). Every family
config has ``num_classes`` and ``with_num_classes(n)``; the family module
(:mod:`instseg_edu.models.retinanet`, ...) imports and re-exports all of it.
"""
