"""Turn some objects of a batch into box-only objects (their annotation had no segmentation)."""

from dataclasses import replace

from instseg_edu.structures import Batch


def without_masks(batch: Batch, which: list[list[int]]) -> Batch:
    """A copy of ``batch`` where object ``k`` of image ``i`` is box-only for each ``k in
    which[i]``: ``has_mask`` False and an all-zero mask row, as ``CocoDataset`` makes them."""
    targets = []
    for target, objects in zip(batch.targets, which):
        masks, has_mask = target.masks.clone(), target.has_mask.clone()
        masks[objects] = False
        has_mask[objects] = False
        targets.append(replace(target, masks=masks, has_mask=has_mask))
    return Batch(batch.images, list(batch.image_sizes), targets)
