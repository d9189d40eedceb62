"""Readable references: the model steps as the papers and MMDetection describe them.

The fast forms in the family modules are written for a GPU: batched over images, every FPN level
in one tensor, and with sizes the host already knows instead of boolean indexing (candidates
picked with :func:`~instseg_edu.ops.indexing.first_k_true`, rejected ones parked at score
``-inf``), so that the host does not wait for the device at every step. That hides the algorithm.
The functions here are the same steps written the plain way — a loop over images, then over
levels, with ``nonzero`` and boolean masks where they read best. **Read these first**; each
returns exactly what its fast form returns (``tests/models/test_references.py`` checks it).

- :func:`solo_target_single_reference` — :func:`~instseg_edu.models.solo.solo_target_single`
  (SOLO's ``solo_target_single``);
- :func:`solo_targets_reference` — :meth:`SOLO.targets` (SOLO's ``solo_target``);
- :func:`solo_predict_reference` — :meth:`SOLO.predict` (SOLO's ``get_seg_single``);
- :func:`retinanet_predict_reference` — :meth:`RetinaNet.predict` (MMDetection's
  ``BaseDenseHead._predict_by_feat_single``);
- :func:`yolact_predict_reference` — :meth:`YOLACT.predict` (MMDetection's ``YOLACTBBoxHead`` and
  ``YOLACTProtonet``);
- :func:`rpn_proposals_reference` — :meth:`MaskRCNN.proposals` (MMDetection's ``RPNHead``).

Mask R-CNN's mask targets and mask paste have their references next to them in
:mod:`instseg_edu.models.roi_heads` (:func:`~instseg_edu.models.roi_heads.mask_targets_reference`,
:func:`~instseg_edu.models.roi_heads.paste_masks_reference`).

One rule keeps the references bit-exact on a CPU: an elementwise function with a transcendental
(sigmoid, softmax) is applied to the same tensor as in the fast form — once, to the whole head
output — and then sliced. A CPU's vectorised kernels may round an element in the last bit
differently depending on where it sits in the tensor; slicing first would expose that.

Shape legend: ``B`` images, ``G`` objects, ``C`` classes, ``N`` anchors (or SOLO grid cells) of
all levels, ``n`` of one level, ``K`` candidates, ``S`` a SOLO grid size, ``Hp, Wp`` the padded
input, ``h, w`` an image's true size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import nms

from instseg_edu.models.mask_rcnn import MaskRCNN, MaskRCNNOutputs, ProposalConfig
from instseg_edu.models.retinanet import RetinaNet, RetinaNetOutputs
from instseg_edu.models.solo import (
    BACKGROUND,
    MIN_MASK_AREA,
    SOLO,
    SOLOImageTargets,
    SOLOOutputs,
    SOLOTargets,
    masks_to_boxes,
    resize_masks,
)
from instseg_edu.models.yolact import YOLACT, YOLACTOutputs, assemble_masks
from instseg_edu.ops.nms import class_aware_nms, fast_nms_reference, matrix_nms, points_nms
from instseg_edu.structures import NO_GT, Batch, Detections, Target

__all__ = [
    "solo_target_single_reference",
    "solo_targets_reference",
    "solo_predict_reference",
    "retinanet_predict_reference",
    "yolact_predict_reference",
    "rpn_proposals_reference",
]


# --------------------------------------------------------------------------------------------------
# SOLO
# --------------------------------------------------------------------------------------------------


def solo_target_single_reference(
    target: Target, num_grids: tuple[int, ...], scale_ranges: tuple, sigma: float
) -> SOLOImageTargets:
    """SOLO's target loop for one image, level by level and object by object, in Python floats
    (Sec. 3.3.1; SOLO's ``solo_target_single``).

    Args:
        target: the image's ground truth; its masks ``[G, Hp, Wp]`` cover the padded input (as
            in a :class:`~instseg_edu.structures.Batch`).
        num_grids, scale_ranges, sigma: as in :class:`~instseg_edu.models.solo.SOLOHeadConfig`.

    Returns:
        What :func:`~instseg_edu.models.solo.solo_target_single` returns for
        ``(target.boxes, target.labels, target.masks, has_mask=target.has_mask)``; it vectorises
        the two loops.
    """
    gt_boxes, gt_labels, gt_masks = target.boxes, target.labels, target.masks
    device = gt_labels.device
    g = len(gt_labels)
    hp, wp = gt_masks.shape[-2:]
    has_mask = target.has_mask.cpu()
    centers = torch.zeros(g, 2, dtype=torch.float64)
    for k in range(g):
        x1, y1, x2, y2 = (float(v) for v in gt_boxes[k])
        if has_mask[k]:  # the centre of mass: the mean row and column of the mask's pixels
            ys, xs = gt_masks[k].cpu().nonzero(as_tuple=True)
            if len(ys):
                centers[k] = torch.stack([ys.double().mean(), xs.double().mean()])
        else:  # a box-only object: the centre of a mask filling its box
            centers[k] = torch.tensor([(y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5])

    def cell(pos: float, extent: int, num_grid: int) -> int:  # SOLO's own expression
        return int((pos / extent) // (1.0 / num_grid))

    cate_labels, gt_index = [], []
    levels = torch.zeros(g, len(num_grids), dtype=torch.bool)
    cells = torch.full((len(num_grids), g, 4), -1, dtype=torch.long)
    for level, (num_grid, (lo, hi)) in enumerate(zip(num_grids, scale_ranges)):
        cate = torch.full((num_grid, num_grid), BACKGROUND, dtype=torch.long)
        inds = torch.full((num_grid * num_grid,), NO_GT, dtype=torch.long)
        for k in range(g):  # in order: an object written later takes over a shared cell
            x1, y1, x2, y2 = (float(v) for v in gt_boxes[k])
            w, h = x2 - x1, y2 - y1
            area = int(gt_masks[k].sum()) if has_mask[k] else w * h
            if not (lo <= math.sqrt(w * h) <= hi) or area < MIN_MASK_AREA:
                continue
            cy, cx = (float(v) for v in centers[k])
            half_h, half_w = 0.5 * h * sigma, 0.5 * w * sigma
            coord_h, coord_w = cell(cy, hp, num_grid), cell(cx, wp, num_grid)
            # the centre region, clipped to the grid and to the centre cell's 3x3 neighbourhood
            top = max(0, cell(cy - half_h, hp, num_grid), coord_h - 1)
            down = min(num_grid - 1, cell(cy + half_h, hp, num_grid), coord_h + 1)
            left = max(0, cell(cx - half_w, wp, num_grid), coord_w - 1)
            right = min(num_grid - 1, cell(cx + half_w, wp, num_grid), coord_w + 1)
            levels[k, level] = True
            cells[level, k] = torch.tensor([top, down, left, right])
            for i in range(top, down + 1):
                for j in range(left, right + 1):
                    cate[i, j] = int(gt_labels[k])
                    inds[i * num_grid + j] = k  # mask channel i * S + j learns object k
        cate_labels.append(cate.to(device))
        gt_index.append(inds.to(device))
    return SOLOImageTargets(
        cate_labels, gt_index, centers.to(device), levels.to(device), cells.to(device)
    )


def solo_targets_reference(model: SOLO, outputs: SOLOOutputs, batch: Batch) -> SOLOTargets:
    """What :meth:`SOLO.targets` returns, image by image and level by level with boolean masks.

    Per image, :func:`solo_target_single_reference` gives each grid cell its object; per level the
    trained mask channels are the cells owned by an object that has a mask, and each learns that
    object's mask resized to the level's mask size. The fast form reads the channel counts once
    for the batch and selects with :func:`~instseg_edu.ops.indexing.first_k_true`.
    """
    head = model.cfg.bbox_head
    per_image = [
        solo_target_single_reference(t, head.num_grids, head.scale_ranges, head.sigma)
        for t in batch.targets
    ]
    cate_labels, ins_ind, gt_index, ins_masks, pos_inds = [], [], [], [], []
    num_pos = 0
    for level, logits in enumerate(outputs.mask_logits):
        size = tuple(logits.shape[-2:])  # this level's mask size
        trained_l, masks_l = [], []
        for target, image in zip(batch.targets, per_image):
            owner = image.gt_index[level]  # [S²] object of each cell, NO_GT for none
            owned = owner >= 0
            trained = owned.clone()
            trained[owned] = target.has_mask[owner[owned]]  # box-only objects: no mask target
            num_pos += int(owned.sum())
            trained_l.append(trained)
            masks_l.append(resize_masks(target.masks[owner[trained]], size))  # [P_b, h, w]
        cate_labels.append(torch.stack([image.cate_labels[level] for image in per_image]))
        gt_index.append(torch.stack([image.gt_index[level] for image in per_image]))
        ins_ind.append(torch.stack(trained_l))  # [B, S²]
        ins_masks.append(torch.cat(masks_l))  # [P_l, h, w], image-major
        pos_inds.append(ins_ind[-1].flatten().nonzero()[:, 0])  # rows b · S² + channel
    num_pos = torch.tensor(num_pos, device=ins_ind[0].device)
    return SOLOTargets(cate_labels, ins_ind, gt_index, ins_masks, num_pos, per_image, pos_inds)


def solo_predict_reference(
    model: SOLO, outputs: SOLOOutputs, image_sizes: list[tuple[int, int]]
) -> list[Detections]:
    """What :meth:`SOLO.predict` returns, one image at a time with boolean indexing
    (Sec. 3.4; SOLO's ``get_seg_single``)."""
    head, test = model.cfg.bbox_head, model.cfg.test_cfg
    c = model.num_classes
    size0 = tuple(outputs.mask_logits[0].shape[-2:])  # the finest mask size (stride 4)
    first_row = [0]  # first grid cell (row of the N axis) of each level
    for s in head.num_grids:
        first_row.append(first_row[-1] + s * s)
    # 2x2 peak picking on the category probabilities, [B, C, S, S] -> [B, S², C] per level
    cate = torch.cat(
        [
            points_nms(x.float().sigmoid()).permute(0, 2, 3, 1).reshape(x.shape[0], -1, c)
            for x in outputs.cate_logits
        ],
        dim=1,
    )  # [B, N, C]
    results = []
    for b, (h, w) in enumerate(image_sizes):
        # 1. candidates: every (cell, class) above score_thr
        keep = cate[b] > test.score_thr  # [N, C]
        rows, labels = keep.nonzero().unbind(1)  # [K] each
        # 2. their mask probabilities, every level's resized to the finest mask size (rows
        # ascend, so the candidates come level by level)
        probs, min_area = [], []
        for level, logits in enumerate(outputs.mask_logits):
            in_level = (rows >= first_row[level]) & (rows < first_row[level + 1])  # [K]
            p = logits[b, rows[in_level] - first_row[level]].float().sigmoid()  # [K_l, h_l, w_l]
            if len(p) == 0:
                p = p.new_zeros(0, *size0)
            elif p.shape[-2:] != size0:
                p = F.interpolate(p[None], size=size0, mode="bilinear", align_corners=False)[0]
            probs.append(p)  # [K_l, h0, w0]
            min_area.append(torch.full((len(p),), float(head.strides[level]), device=p.device))
        probs, min_area = torch.cat(probs), torch.cat(min_area)  # [K, h0, w0], [K]
        masks = probs > test.mask_thr
        area = masks.sum(dim=(1, 2)).float()  # [K]
        # 3. rescore by maskness (mean probability inside the mask); a mask needs more pixels
        # than its level's stride
        maskness = (probs * masks).sum(dim=(1, 2)) / area.clamp(min=1)  # [K]
        scores = cate[b][keep] * maskness  # [K]
        sel = (area > min_area).nonzero()[:, 0]
        sel = sel[scores[sel].argsort(descending=True, stable=True)[: test.nms_pre]]
        # 4. Matrix NMS decays the scores; keep those >= update_thr, the best max_per_img
        decayed = matrix_nms(masks[sel], labels[sel], scores[sel], test.kernel, test.sigma)
        sel, decayed = sel[decayed >= test.update_thr], decayed[decayed >= test.update_thr]
        order = decayed.argsort(descending=True, stable=True)[: test.max_per_img]
        if len(order) == 0:
            results.append(Detections.empty(cate.device, mask_size=(h, w)))
            continue
        # 5. masks at the padded input size, cut to the image, thresholded; boxes around them
        full = F.interpolate(
            probs[sel[order]][None], size=outputs.input_size, mode="bilinear", align_corners=False
        )[0]  # [K', Hp, Wp]
        final = full[:, :h, :w] > test.mask_thr  # [K', h, w]
        results.append(Detections(masks_to_boxes(final), decayed[order], labels[sel[order]], final))
    return results


# --------------------------------------------------------------------------------------------------
# RetinaNet and YOLACT: dense heads
# --------------------------------------------------------------------------------------------------


def retinanet_predict_reference(
    model: RetinaNet, outputs: RetinaNetOutputs, image_sizes: list[tuple[int, int]]
) -> list[Detections]:
    """What :meth:`RetinaNet.predict` returns, per image and per level as MMDetection's
    ``BaseDenseHead._predict_by_feat_single`` does it: on each level keep the (anchor, class)
    pairs above ``score_thr``, the ``nms_pre`` best of them; decode and clip their boxes; over
    all levels drop boxes not larger than ``min_bbox_size``, class-aware NMS, ``max_per_img``."""
    test = model.cfg.test_cfg
    anchors = model.anchors(outputs.featmap_sizes, outputs.cls_logits.device)  # [N, 4]
    probs = outputs.cls_logits.float().sigmoid()  # [B, N, C], once (see the module docstring)
    results = []
    for i, (h, w) in enumerate(image_sizes):
        boxes, scores, labels, start = [], [], [], 0
        for n in model.level_sizes(outputs.featmap_sizes):
            s = probs[i, start : start + n]  # [n, C] this level's anchors
            above = (s > test.score_thr).nonzero()  # [k, 2] (anchor, class)
            k = len(above) if test.nms_pre == -1 else min(test.nms_pre, len(above))
            order = s[above[:, 0], above[:, 1]].argsort(descending=True, stable=True)[:k]
            anchor, cls = above[order, 0] + start, above[order, 1]  # [k] each
            boxes.append(
                model.bbox_coder.decode(
                    anchors[anchor], outputs.bbox_deltas[i, anchor].float(), max_shape=(h, w)
                )
            )
            scores.append(probs[i, anchor, cls])
            labels.append(cls)
            start += n
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        wh = boxes[:, 2:] - boxes[:, :2]  # clipping can flatten a box
        big = (wh > test.min_bbox_size).all(dim=1)
        boxes, scores, labels = boxes[big], scores[big], labels[big]
        kept = class_aware_nms(boxes, scores, labels, test.nms.iou_threshold)[: test.max_per_img]
        results.append(Detections(boxes[kept], scores[kept], labels[kept]))
    return results


def yolact_predict_reference(
    model: YOLACT, outputs: YOLACTOutputs, image_sizes: list[tuple[int, int]]
) -> list[Detections]:
    """What :meth:`YOLACT.predict` returns, per image and per level (Sec. 3.3 and 5; MMDetection's
    ``YOLACTBBoxHead`` and ``YOLACTProtonet``): on each level the ``nms_pre`` anchors with the best
    foreground score, decoded and clipped; Fast NMS over the classes
    (:func:`~instseg_edu.ops.nms.fast_nms_reference`, the loop form); each kept detection's mask
    assembled from the prototypes, cropped by its box, upsampled and thresholded."""
    test = model.cfg.test_cfg
    c = model.num_classes
    anchors = model.anchors(outputs.featmap_sizes, outputs.cls_logits.device)  # [N, 4]
    probs = outputs.cls_logits.float().softmax(dim=2)[..., :c]  # [B, N, C] foreground, once
    hm, wm = outputs.prototypes.shape[-2:]
    padded = (hm * model.proto_stride, wm * model.proto_stride)
    results = []
    for i, (h, w) in enumerate(image_sizes):
        boxes, scores, coeffs, start = [], [], [], 0
        for n in model.level_sizes(outputs.featmap_sizes):
            best = probs[i, start : start + n].amax(dim=1)  # [n] best foreground score
            top = best.topk(min(test.nms_pre, n)).indices + start  # [k] anchors
            deltas = outputs.bbox_deltas[i, top].float()
            boxes.append(model.bbox_coder.decode(anchors[top], deltas, max_shape=(h, w)))
            scores.append(probs[i, top])  # [k, C]
            coeffs.append(outputs.coeffs[i, top].float())  # [k, P]
            start += n
        boxes, scores, coeffs = torch.cat(boxes), torch.cat(scores), torch.cat(coeffs)
        kept = fast_nms_reference(
            boxes,
            scores.T,  # [C, K]
            iou_threshold=test.iou_thr,
            top_k=test.top_k,
            score_threshold=test.score_thr,
            max_num=test.max_per_img,
        )
        if len(kept.indices) == 0:
            results.append(Detections.empty(boxes.device, mask_size=(h, w)))
            continue
        mask_probs = assemble_masks(
            outputs.prototypes[i].float(),
            coeffs[kept.indices.to(coeffs.device)],
            kept.boxes / model.proto_stride,
        )  # [K', Hm, Wm]: sigmoid(prototypes · coefficients), cropped by the box
        up = F.interpolate(mask_probs[None], size=padded, mode="bilinear", align_corners=False)[0]
        masks = up[:, :h, :w] > test.mask_thr  # [K', h, w]
        labels = kept.labels.to(boxes.device)
        results.append(Detections(kept.boxes, kept.scores.to(boxes.device), labels, masks))
    return results


# --------------------------------------------------------------------------------------------------
# Mask R-CNN: region proposals
# --------------------------------------------------------------------------------------------------


def rpn_proposals_reference(
    model: MaskRCNN, outputs: MaskRCNNOutputs, image_sizes, cfg: ProposalConfig
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """RPN proposals per image and per level, as MMDetection's ``RPNHead`` makes them
    (Faster R-CNN Sec. 3.1; FPN Sec. 4.1): on each level the ``nms_pre`` anchors with the highest
    objectness, their boxes decoded and clipped, boxes not larger than ``min_bbox_size`` dropped,
    NMS inside the level; then the ``max_per_img`` best of all levels.

    Returns:
        Per image ``(boxes float [P_i, 4], scores float [P_i], levels int64 [P_i])``, best first:
        the valid entries of :meth:`MaskRCNN.proposals` (which pads every image to
        ``max_per_img`` and runs the levels' NMS as one class-aware call per image).
    """
    probs = outputs.rpn_logits.detach().float().sigmoid()  # [B, N], once
    results = []
    for i, (h, w) in enumerate(image_sizes):
        boxes, scores, levels = [], [], []
        for level in range(len(outputs.features)):
            anchor = (outputs.anchor_levels == level).nonzero()[:, 0]  # [n] this level's anchors
            logits = outputs.rpn_logits[i, anchor].detach().float()  # [n]
            top = anchor[logits.topk(min(cfg.nms_pre, len(anchor))).indices]  # [k]
            deltas = outputs.rpn_deltas[i, top].detach().float()  # [k, 4]
            b = model.rpn_coder.decode(outputs.anchors[top], deltas, max_shape=(h, w))  # [k, 4]
            s = probs[i, top]  # [k]
            big = ((b[:, 2:] - b[:, :2]) > cfg.min_bbox_size).all(dim=1)
            b, s = b[big], s[big]
            kept = nms(b, s, cfg.nms.iou_threshold)
            boxes.append(b[kept])
            scores.append(s[kept])
            levels.append(torch.full((len(kept),), level, device=b.device))
        boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        best = scores.argsort(descending=True, stable=True)[: cfg.max_per_img]
        results.append((boxes[best], scores[best], levels[best]))
    return results
