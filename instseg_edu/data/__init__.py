"""Data: the procedural shapes dataset, a COCO-format dataset, transforms and batching.

- :mod:`instseg_edu.data.shapes` draws images of circles, rectangles, stars, ... and writes them
  as PNG files plus a COCO instances JSON, so they load exactly like anyone's own data.
- :mod:`instseg_edu.data.coco` reads any COCO instances file through pycocotools into
  ``(image, Target)`` pairs.
- :mod:`instseg_edu.data.annotations` holds the rules that decide which annotations become
  objects (masks, box-only objects, crowd regions, drops, refusals), shared by the dataset and the
  ground truth of COCO evaluation; :mod:`instseg_edu.data.images` reads image files the way a
  careful reference reader does (EXIF orientation, every mode and bit depth).
- :mod:`instseg_edu.data.transforms` resizes, flips and jitters an image together with its boxes
  and masks, and :func:`instseg_edu.data.transforms.collate` pads a list of them into a ``Batch``.

Nothing heavy is imported here; import the submodule you need.
"""
