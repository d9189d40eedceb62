"""Mask R-CNN: a two-stage detector that also paints a mask inside every box.

The story (He et al., "Mask R-CNN", ICCV 2017, building on Ren et al., "Faster R-CNN", NeurIPS 2015,
and Lin et al., "Feature Pyramid Networks", CVPR 2017):

1. **Backbone + FPN** turn the image into five feature maps P2-P6 (strides 4, 8, 16, 32, 64).
2. **Region Proposal Network** (Faster R-CNN Sec. 3.1; :mod:`instseg_edu.models.rpn`). A 3x3 conv
   then two 1x1 convs predict, for each of the ``A = 3`` anchors (``scales=(8,)``, ratios
   0.5/1/2) at every location of every level, an objectness logit and four box deltas. Training:
   anchors are assigned with MaxIoU (0.7 / 0.3, low-quality matches rescued at 0.3), 256 anchors
   per image are sampled (at most half positive), binary cross-entropy on objectness + L1 on
   deltas, both divided by the number of sampled anchors.
3. **Proposals**: per image and level keep the ``nms_pre`` highest-scoring anchors, decode them,
   clip to the image, drop boxes with a side ``<= min_bbox_size``, NMS at 0.7 (run separately per
   FPN level, as MMDetection does: its ``batched_nms`` takes the level as the group id), keep the
   best ``max_per_img`` of the image (2000/1000 in training, 1000/1000 at test time).
4. **RoI stage** (Mask R-CNN Sec. 3; :mod:`instseg_edu.models.roi_heads`). During training the
   ground-truth boxes are added to the proposals, which are assigned at 0.5 / 0.5 (no low-quality
   matches) and sampled (512 per image, a quarter positive). Each RoI reads a 7x7 (box) or 14x14
   (mask) grid with RoIAlign from one FPN level chosen by its size (FPN Eq. 1, see
   :func:`map_rois_to_levels`). The box head (two fc layers of 1024) scores ``C + 1`` classes
   (column ``C`` is background) and regresses class-specific deltas; the mask head (four 3x3
   convs, a 2x deconv) predicts one 28x28 mask per class, and only the ground-truth class's mask is
   trained (per-pixel BCE), decoupling masks from classification. A positive RoI of a box-only
   object (``Target.has_mask`` False) trains the box head and the RPN like any other, but not the
   mask head.
5. **Predict**: softmax scores, class-specific decoding, ``score_thr`` 0.05, per-class NMS 0.5,
   100 detections per image, then the mask head runs on the kept boxes and the 28x28 masks are
   pasted into the image with one batched separable bilinear resampling (:func:`paste_masks`).

Everything that is trained on is public so that notebooks and explorers show exactly it:
``model.targets(outputs, batch)`` returns the RPN assignment and sampled anchors, the proposals
before and after NMS, the sampled RoIs with their labels and the mask targets. Target encodings
are the library's (:mod:`instseg_edu.structures`): a background RoI's label is ``BACKGROUND``
(the box head's softmax moves it to column ``C``), ``gt_index`` is ``NO_GT`` where there is none.
Config keys follow MMDetection's ``mask_rcnn_r50_fpn``; the classes and presets are in
:mod:`instseg_edu.models.configs.mask_rcnn` (importable from here too). Walkthrough:
``notebooks/06_mask_rcnn.py``.

Shape legend: ``B`` images, ``N`` anchors (all levels), ``A`` anchors per location, ``G`` ground
truth (padded per image, or of the whole batch), ``K`` candidates or detections, ``R`` proposals
per image (``[B, R, 4]``) or RoIs of the batch (``[R, 5]``), ``M`` positive RoIs (of which
``M_mask`` have a mask), ``C`` classes, ``F`` FPN channels, ``T`` the mask head's output size (28),
``L`` FPN levels, ``Hp, Wp`` the padded input size, ``h, w`` an image's true size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg_edu.losses import global_avg_factor
from instseg_edu.models import dense_heads
from instseg_edu.models.backbone import ImageNormalize, build_backbone
from instseg_edu.models.configs.mask_rcnn import (
    MASK_RCNN_R18_CPU,
    MASK_RCNN_R18_SMALL,
    MASK_RCNN_R50_FPN,
    MaskRCNNConfig,
    ProposalConfig,
    RCNNTestConfig,
    RCNNTrainConfig,
    RoIHeadConfig,
    RPNHeadConfig,
    RPNTrainConfig,
    TestCfg,
    TrainCfg,
)
from instseg_edu.models.roi_heads import (
    BoxHead,
    MaskHead,
    map_rois_to_levels,
    mask_targets,
    multiscale_roi_align,
    paste_masks,
)
from instseg_edu.models.rpn import Proposals, RPNHead, RPNTargets, rpn_proposals, rpn_targets
from instseg_edu.ops.anchors import AnchorGeneratorConfig
from instseg_edu.ops.assign import Assignment, MaxIoUAssignerConfig, max_iou_assign_padded
from instseg_edu.ops.boxes import clip_boxes
from instseg_edu.ops.indexing import first_k_true
from instseg_edu.ops.nms import class_aware_nms
from instseg_edu.ops.sampling import SamplerConfig, random_sample_batched
from instseg_edu.structures import (
    BACKGROUND,
    NO_GT,
    Batch,
    Detections,
    image_sizes_tensor,
    pad_targets,
    softmax_labels,
)

#: Former names of the shared config pieces Mask R-CNN composes.
AnchorConfig = AnchorGeneratorConfig
AssignerConfig = MaxIoUAssignerConfig


# --------------------------------------------------------------------------------------------------
# What each stage returns
# --------------------------------------------------------------------------------------------------


class MaskRCNNOutputs(NamedTuple):
    """``model(images)``: backbone features and raw RPN outputs (the RoI stage needs proposals).

    Attributes:
        features: ``L`` FPN maps ``[B, F, H_l, W_l]`` (P2-P6).
        rpn_logits: ``float [B, N]`` objectness logits, levels concatenated, each level in (row,
            column, anchor) order — the order of ``anchors``.
        rpn_deltas: ``float [B, N, 4]`` encoded ``(dx, dy, dw, dh)`` per anchor.
        anchors: ``float [N, 4]`` xyxy pixels, shared by the batch.
        anchor_levels: ``int64 [N]`` FPN level index (0 = P2) of each anchor.
        input_size: ``(Hp, Wp)`` of the padded input (``pad_shape`` is its former name).
    """

    features: tuple[Tensor, ...]
    rpn_logits: Tensor
    rpn_deltas: Tensor
    anchors: Tensor
    anchor_levels: Tensor
    input_size: tuple[int, int]

    @property
    def pad_shape(self) -> tuple[int, int]:
        """The former name of ``input_size`` (read-only)."""
        return self.input_size


class RoITargets(NamedTuple):
    """Sampled RoIs and what the box head is trained on (Mask R-CNN Sec. 3, Faster R-CNN Sec. 3.2).

    Attributes:
        candidates: ``float [B, G + R, 4]`` ground-truth boxes (first ``G`` columns) then the
            image's proposals.
        candidate_valid: ``bool [B, G + R]``.
        assignment: :class:`~instseg_edu.ops.assign.Assignment` of the candidates, ``[B, G + R]``
            fields (``gt_index`` a column of the padded ground truth).
        pos_mask, neg_mask: ``bool [B, G + R]``, the sampled candidates.
        rois: ``float [R, 5]`` the sampled RoIs of the batch ``(batch_index, x1, y1, x2, y2)``,
            image-major.
        labels: ``int64 [R]``: the class ``0..C-1`` of positives, ``BACKGROUND`` (-1) for
            negatives (the loss moves it to the softmax's background column ``C``).
        bbox_targets: ``float [R, 4]`` deltas (stds 0.1, 0.1, 0.2, 0.2); zeros for background.
        gt_index: ``int64 [R]`` the matched object in the batch's concatenated ground truth
            (image 0's objects first), ``NO_GT`` (-1) for background.
        is_gt: ``bool [R]``, the RoI is a ground-truth box added as a proposal.
        pos_index: ``int64 [M]``, the positive RoIs (``labels >= 0``) in order.
        mask_index: ``int64 [M_mask]``, the positive RoIs whose object has a mask, in order: the
            mask head's RoIs. Equal to ``pos_index`` unless the batch has box-only objects.
    """

    candidates: Tensor
    candidate_valid: Tensor
    assignment: Assignment
    pos_mask: Tensor
    neg_mask: Tensor
    rois: Tensor
    labels: Tensor
    bbox_targets: Tensor
    gt_index: Tensor
    is_gt: Tensor
    pos_index: Tensor
    mask_index: Tensor


class MaskTargets(NamedTuple):
    """Mask head targets: one ``T x T`` binary crop per positive RoI (Mask R-CNN Sec. 3) whose
    object has a mask (``RoITargets.mask_index``; a box-only object trains no mask).

    Attributes:
        rois: ``float [M_mask, 5]`` positive RoIs; labels: ``int64 [M_mask]`` their class (the
            mask channel trained); gt_index: ``int64 [M_mask]`` their object in the batch's
            concatenated ground truth.
        masks: ``float [M_mask, T, T]`` in ``{0, 1}``: the object's mask inside the RoI.
    """

    rois: Tensor
    labels: Tensor
    gt_index: Tensor
    masks: Tensor


class MaskRCNNTargets(NamedTuple):
    """Everything :meth:`MaskRCNN.loss` compares against, stage by stage: the RPN's targets, the
    proposals they were built from, the sampled RoIs and the mask targets."""

    rpn: RPNTargets
    proposals: Proposals
    roi: RoITargets
    mask: MaskTargets


# --------------------------------------------------------------------------------------------------
# The model (the RPN lives in rpn.py, the RoI heads in roi_heads.py)
# --------------------------------------------------------------------------------------------------


class MaskRCNN(nn.Module):
    """Mask R-CNN with the three public stages (``forward``, ``targets``/``loss``, ``predict``).

    Images are ``float32 [B, 3, Hp, Wp]`` in ``[0, 1]`` (a :class:`~instseg_edu.structures.Batch`'s
    ``images``); the model normalises them with the ImageNet mean and std itself.
    """

    def __init__(self, cfg: MaskRCNNConfig):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.backbone = build_backbone(cfg.backbone, cfg.neck)
        self.anchor_generator = cfg.rpn_head.anchor_generator.build()
        num_anchors = self.anchor_generator.num_base_anchors[0]
        channels = cfg.neck.out_channels
        self.rpn_head = RPNHead(channels, cfg.rpn_head.feat_channels, num_anchors)
        r = cfg.roi_head
        self.bbox_head = BoxHead(channels, r.bbox_roi_size, r.fc_out_channels, cfg.num_classes)
        self.mask_head = MaskHead(channels, r.conv_out_channels, r.num_convs, cfg.num_classes)
        self.rpn_coder = cfg.rpn_head.bbox_coder
        self.bbox_coder = r.bbox_coder
        self.normalize = ImageNormalize()
        self._anchor_cache: dict = {}  # see instseg_edu.models.dense_heads

    # ---- stage 1 ---------------------------------------------------------------------------------

    def anchors(self, featmap_sizes: list[tuple[int, int]], device) -> tuple[Tensor, Tensor]:
        """All anchors ``float32 [N, 4]`` and their level ``int64 [N]``, cached per sizes."""
        gen, cache = self.anchor_generator, self._anchor_cache
        anchors = dense_heads.all_anchors(gen, featmap_sizes, device, cache)
        return anchors, dense_heads.anchor_levels(gen, featmap_sizes, device, cache)

    def anchor_valid(self, featmap_sizes, image_sizes, device) -> Tensor:
        """``bool [B, N]``: the anchor's cell starts inside its image (not in the padding)."""
        return dense_heads.anchor_valid(
            self.anchor_generator, featmap_sizes, image_sizes, device, self._anchor_cache
        )

    def forward(self, images: Tensor) -> MaskRCNNOutputs:
        """Backbone, FPN and RPN head.

        Args:
            images: ``float32 [B, 3, Hp, Wp]`` in ``[0, 1]`` (normalised here with ImageNet stats).

        Returns:
            :class:`MaskRCNNOutputs`; the RoI heads run in :meth:`loss` and :meth:`predict`, on
            proposals.
        """
        x = self.normalize(images)
        features = tuple(self.backbone(x))
        logits, deltas = self.rpn_head(features)  # [B, N], [B, N, 4]
        sizes = [tuple(f.shape[-2:]) for f in features]
        anchors, levels = self.anchors(sizes, images.device)
        return MaskRCNNOutputs(
            features,
            logits,
            deltas,
            anchors,
            levels,
            (int(images.shape[-2]), int(images.shape[-1])),
        )

    # ---- proposals ---------------------------------------------------------------------------

    @torch.no_grad()
    def proposals(
        self, outputs: MaskRCNNOutputs, image_sizes, cfg: ProposalConfig, trim: bool = False
    ) -> Proposals:
        """RPN proposals for the whole batch: top ``nms_pre`` per level, decode, clip, NMS per
        level, best ``max_per_img`` (:func:`~instseg_edu.models.rpn.rpn_proposals`; ``trim``:
        only as many slots as the image with the most proposals needs, for inference). The same
        steps per image and per level:
        :func:`~instseg_edu.models.references.rpn_proposals_reference`."""
        sizes = [tuple(f.shape[-2:]) for f in outputs.features]
        return rpn_proposals(
            outputs.rpn_logits,
            outputs.rpn_deltas,
            outputs.anchors,
            outputs.anchor_levels,
            dense_heads.level_sizes(self.anchor_generator, sizes),
            image_sizes,
            self.rpn_coder,
            cfg,
            trim=trim,
        )

    # ---- stage 2: targets and loss -----------------------------------------------------------

    def rpn_targets(self, outputs: MaskRCNNOutputs, batch: Batch, gt=None) -> RPNTargets:
        """Assign every anchor (MaxIoU 0.7 / 0.3, low-quality matches) and sample 256 per image
        (:func:`~instseg_edu.models.rpn.rpn_targets`); padding anchors are ignored."""
        device = outputs.rpn_logits.device
        gt = gt if gt is not None else _padded_targets(batch, device)
        sizes = [tuple(f.shape[-2:]) for f in outputs.features]
        valid = self.anchor_valid(sizes, batch.image_sizes, device)  # [B, N]
        return rpn_targets(outputs.anchors, valid, gt, self.rpn_coder, self.cfg.train_cfg.rpn)

    def roi_targets(self, batch: Batch, proposals: Proposals, gt=None) -> RoITargets:
        """The R-CNN stage's training RoIs (``train_cfg.rcnn``; MMDetection's
        ``StandardRoIHead``): add the ground truth to each image's proposals, assign them
        (MaxIoU 0.5 / 0.5, no low-quality matches), sample 512 per image with at most a quarter
        positive, and encode each positive's box (class labels ``BACKGROUND`` for negatives).

        Args:
            batch: the padded batch; proposals: the training proposals.
            gt: the batch's padded ground truth, when already built.

        Returns:
            :class:`RoITargets`. One host synchronisation: the number of sampled RoIs (and of
            positives), which sizes the RoI tensors.
        """
        cfg = self.cfg.train_cfg.rcnn
        device = proposals.boxes.device
        gt = gt if gt is not None else _padded_targets(batch, device)
        if cfg.sampler.add_gt_as_proposals:
            cands = torch.cat([gt.boxes, proposals.boxes], 1)  # [B, G+R, 4]
            cand_valid = torch.cat([gt.valid, proposals.valid], 1)  # [B, G+R]
            is_gt = torch.cat([gt.valid, torch.zeros_like(proposals.valid)], 1)
        else:
            cands, cand_valid = proposals.boxes, proposals.valid
            is_gt = torch.zeros_like(proposals.valid)
        assignment = max_iou_assign_padded(cands, gt, cfg.assigner, cand_valid)
        s = cfg.sampler
        pos, neg = random_sample_batched(assignment, s.num, s.pos_fraction, s.neg_pos_ub)
        # The RoI stage's one wait for the device: how many RoIs (and positives) were sampled.
        # With the counts on the host, the sampled entries are picked by first_k_true instead
        # of `nonzero` (same image-major order) and the positives likewise further down.
        sampled = pos | neg  # [B, G+R]
        gt_col = assignment.gt_index.clamp(min=0)  # [B, G+R] column in padded gt (0: none)
        with_mask = pos & gt.has_mask.gather(1, gt_col)  # [B, G+R]: box-only objects train no mask
        num_rois, num_pos, num_mask = torch.stack(
            [sampled.sum(), pos.sum(), with_mask.sum()]
        ).tolist()
        flat = first_k_true(sampled.flatten(), num_rois)  # [R] into B*(G+R)
        img, col = flat // sampled.shape[1], flat % sampled.shape[1]  # [R] each, image-major
        boxes = cands[img, col]  # [R, 4]
        is_pos = pos[img, col]  # [R]
        gt_col = gt_col[img, col]  # [R]
        labels = torch.where(is_pos, gt.labels[img, gt_col], BACKGROUND)  # [R]
        matched = torch.where(is_pos[:, None], gt.boxes[img, gt_col], boxes)  # [R, 4]
        bbox_targets = self.bbox_coder.encode(boxes, matched)  # [R, 4]
        offsets = torch.cumsum(gt.valid.sum(1), 0) - gt.valid.sum(1)  # [B] first gt of image
        gt_index = torch.where(is_pos, offsets[img] + gt_col, NO_GT)  # [R]
        rois = torch.cat([img[:, None].to(boxes.dtype), boxes], 1)  # [R, 5]
        pos_index = first_k_true(is_pos, num_pos)  # [M] into the R RoIs
        mask_index = first_k_true(with_mask[img, col], num_mask)  # [M_mask]
        return RoITargets(
            cands,
            cand_valid,
            assignment,
            pos,
            neg,
            rois,
            labels,
            bbox_targets,
            gt_index,
            is_gt[img, col],
            pos_index,
            mask_index,
        )

    def targets(
        self, outputs: MaskRCNNOutputs, batch: Batch, proposals: Proposals | None = None
    ) -> MaskRCNNTargets:
        """Everything the losses compare against, in the order the losses need it.

        1. :meth:`rpn_targets`: every anchor assigned (0.7 / 0.3), 256 sampled per image.
        2. The training proposals (``train_cfg.rpn_proposal``: 2000 per level before NMS, 1000
           per image after) — or ``proposals`` when given.
        3. :meth:`roi_targets`: the ground truth added to the proposals, assigned (0.5 / 0.5),
           512 RoIs sampled per image, a quarter positive; class labels and box deltas.
        4. Mask targets (Mask R-CNN Sec. 3, "Mask Representation"): for each positive RoI whose
           object has a mask, that mask cropped to the RoI and resampled to ``T x T`` (28) with
           RoIAlign, binarised at 0.5 (:func:`~instseg_edu.models.roi_heads.mask_targets`).

        Args:
            outputs: from ``forward``.
            batch: the padded batch with its targets.
            proposals: proposals to train the RoI heads on (default: the training proposals).

        Returns:
            :class:`MaskRCNNTargets` (``rpn``, ``proposals``, ``roi``, ``mask``). The one wait for
            the device is in :meth:`roi_targets` (how many RoIs were sampled); the proposals'
            NMS waits once per image.
        """
        gt = _padded_targets(batch, outputs.rpn_logits.device)  # [B, Gmax, ...], built once
        rpn = self.rpn_targets(outputs, batch, gt)
        if proposals is None:
            proposals = self.proposals(outputs, batch.image_sizes, self.cfg.train_cfg.rpn_proposal)
        roi = self.roi_targets(batch, proposals, gt)
        pos = roi.mask_index  # [M_mask]: positives whose object has a mask
        device = roi.rois.device
        gt_masks = _concat_masks(batch, device)  # [ΣG, Hp, Wp]
        masks = mask_targets(
            gt_masks, roi.rois[pos], roi.gt_index[pos], self.cfg.train_cfg.rcnn.mask_size
        )  # [M_mask, T, T]
        mask = MaskTargets(roi.rois[pos], roi.labels[pos], roi.gt_index[pos], masks)
        return MaskRCNNTargets(rpn, proposals, roi, mask)

    def _roi_features(self, features, rois: Tensor, output_size: int) -> Tensor:
        """RoIAlign of ``[R, 5]`` RoIs on their FPN level: ``[R, F, S, S]``, ``S = output_size``."""
        r = self.cfg.roi_head
        return multiscale_roi_align(
            features, rois, r.featmap_strides, output_size, r.sampling_ratio, r.aligned,
            r.finest_scale,
        )  # fmt: skip

    def box_forward(self, features, rois: Tensor) -> tuple[Tensor, Tensor]:
        """Box head on ``[R, 5]`` RoIs: ``([R, C+1] logits, [R, 4C] deltas)``."""
        return self.bbox_head(self._roi_features(features, rois, self.cfg.roi_head.bbox_roi_size))

    def mask_forward(self, features, rois: Tensor, labels: Tensor | None = None) -> Tensor:
        """Mask head on ``[R, 5]`` RoIs: ``[R, C, T, T]`` logits, or with ``labels`` (``int64
        [R]``) only each RoI's class: ``[R, T, T]``."""
        roi_features = self._roi_features(features, rois, self.cfg.roi_head.mask_roi_size)
        return self.mask_head(roi_features, labels)

    def loss(self, outputs: MaskRCNNOutputs, batch: Batch) -> dict[str, Tensor]:
        """The five losses of Mask R-CNN (Faster R-CNN Sec. 3.1.2, Eq. 1; Mask R-CNN Sec. 3), all
        from :meth:`targets`, with MMDetection's normalisations; each is multiplied by its
        config's ``loss_weight`` (all 1).

        Returns:
            ``loss_rpn_cls``: binary cross-entropy of the objectness of the sampled anchors,
            divided by their number; ``loss_rpn_bbox``: L1 on the deltas of the sampled positive
            anchors, same divisor; ``loss_cls``: softmax cross-entropy over ``C + 1`` of the
            sampled RoIs, divided by their number ``R``; ``loss_bbox``: L1 on the ground-truth
            class's deltas of the positive RoIs, divided by ``R``; ``loss_mask``: per-pixel
            binary cross-entropy of the ground-truth class's ``T x T`` mask of the positive RoIs
            with a mask, averaged over those RoIs and pixels (0, still attached to the graph,
            without any); ``num_pos`` (positive RoIs), ``num_rpn_pos`` (sampled positive
            anchors) and ``acc`` (box-head accuracy in %, over the sampled RoIs): detached
            statistics.

        Every divisor is a count of the whole batch: under DDP, of every process's share
        (:func:`~instseg_edu.losses.global_avg_factor`).
        """
        t = self.targets(outputs, batch)
        rpn_cfg, roi_cfg = self.cfg.rpn_head, self.cfg.roi_head
        # RPN: BCE over sampled anchors + L1 over positive ones, both / number of sampled anchors.
        sampled = (t.rpn.pos_mask | t.rpn.neg_mask).float()  # [B, N]
        num_samples = global_avg_factor(t.rpn.num_samples)
        logits = outputs.rpn_logits.float()
        loss_rpn_cls = (
            F.binary_cross_entropy_with_logits(logits, t.rpn.labels, reduction="none") * sampled
        ).sum() / num_samples
        l1 = (outputs.rpn_deltas.float() - t.rpn.bbox_targets).abs().sum(-1)  # [B, N]
        loss_rpn_bbox = (l1 * t.rpn.pos_mask).sum() / num_samples

        # Box head: CE over all sampled RoIs; L1 on the GT class's deltas of positives / R.
        cls_logits, deltas = self.box_forward(outputs.features, t.roi.rois)
        cls_logits = cls_logits.float()
        labels = softmax_labels(t.roi.labels, self.num_classes)  # [R]: background is column C
        num_rois = global_avg_factor(labels.numel(), clamp_min=1)
        loss_cls = F.cross_entropy(cls_logits, labels, reduction="sum") / num_rois
        pos = t.roi.pos_index  # [M]
        deltas = deltas.float().view(deltas.shape[0], self.num_classes, 4)  # [R, C, 4]
        pos_deltas = deltas[pos, t.roi.labels[pos]]  # [M, 4]
        loss_bbox = (pos_deltas - t.roi.bbox_targets[pos]).abs().sum() / num_rois

        # Mask head: per-pixel BCE of the GT class's channel, mean over positives and pixels.
        # Positives of box-only objects are not among t.mask's RoIs: no mask term for them.
        mask_logits = self.mask_forward(outputs.features, t.mask.rois).float()  # [M_mask, C, T, T]
        num_mask = t.mask.labels.shape[0]
        picked = mask_logits[
            torch.arange(num_mask, device=pos.device), t.mask.labels
        ]  # [M_mask, T, T]
        # The mean over the batch's mask positives and their T*T pixels; counted on every process,
        # even one without positives, because the count is summed over processes.
        mask_pixels = global_avg_factor(picked.numel())
        if picked.numel() > 0:
            bce = F.binary_cross_entropy_with_logits(picked, t.mask.masks, reduction="sum")
            loss_mask = bce / mask_pixels
        else:  # no positive RoI: a zero that keeps the graph connected
            loss_mask = mask_logits.sum() * 0.0
        if cls_logits.shape[0] == 0:
            loss_cls = cls_logits.sum() * 0.0
        with torch.no_grad():
            acc = (cls_logits.argmax(1) == labels).float().mean() * 100
        return {
            "loss_rpn_cls": rpn_cfg.loss_cls.loss_weight * loss_rpn_cls,
            "loss_rpn_bbox": rpn_cfg.loss_bbox.loss_weight * loss_rpn_bbox,
            "loss_cls": roi_cfg.loss_cls.loss_weight * loss_cls,
            "loss_bbox": roi_cfg.loss_bbox.loss_weight * loss_bbox,
            "loss_mask": roi_cfg.loss_mask.loss_weight * loss_mask,
            "num_pos": torch.full((), float(len(pos)), device=pos.device),  # a fill, no copy
            "num_rpn_pos": t.rpn.pos_mask.sum().float(),
            "acc": acc.detach() if cls_logits.shape[0] else cls_logits.new_zeros(()),
        }

    # ---- stage 3 -----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, outputs: MaskRCNNOutputs, image_sizes) -> list[Detections]:
        """Detections with masks (Mask R-CNN Sec. 3.1, "Inference"; MMDetection's ``test_cfg``).

        1. Proposals (``test_cfg.rpn``: 1000 per level before NMS, 1000 per image after).
        2. The box head on every proposal: softmax over ``C + 1`` (background dropped),
           class-specific deltas decoded on the proposal and clipped to the image's true size.
        3. Per image: the (proposal, class) pairs above ``score_thr``, class-aware NMS at
           ``nms.iou_threshold``, the best ``max_per_img``.
        4. The mask head on the kept boxes (not on the proposals: a mask follows the refined box);
           the ``T x T`` mask of the detection's class is pasted into the image
           (:func:`~instseg_edu.models.roi_heads.paste_masks`, bilinear) and thresholded at
           ``mask_thr_binary``.

        One host synchronisation for the candidates' counts of the batch, plus NMS's per image.

        Args:
            outputs: from ``forward``.
            image_sizes: each image's true ``(h, w)`` inside the padded batch.

        Returns:
            One :class:`Detections` per image: ``boxes float32 [K, 4]`` xyxy in input pixels,
            ``scores [K]`` descending, ``labels int64 [K]``, ``masks bool [K, h, w]``.
        """
        cfg = self.cfg.test_cfg.rcnn
        c = self.num_classes
        b = len(image_sizes)
        device = outputs.rpn_logits.device
        props = self.proposals(outputs, image_sizes, self.cfg.test_cfg.rpn, trim=True)
        # Every proposal slot goes through the box head, padding included (its scores are zeroed
        # below): B * R RoIs with R the largest count of an image, known on the host from NMS,
        # so no further host read is needed to build them.
        p = props.boxes.shape[1]  # R proposals per image
        img = torch.arange(b, device=device).repeat_interleave(p)  # [B*R] image of each RoI
        rois = torch.cat([img[:, None].float(), props.boxes.reshape(-1, 4)], 1)  # [B*R, 5]
        cls_logits, deltas = self.box_forward(outputs.features, rois)
        scores = F.softmax(cls_logits.float(), dim=1)[:, :c]  # [B*R, C] (background dropped)
        scores = scores * props.valid.reshape(-1, 1)  # [B*R, C]; padding slots score 0
        r = rois.shape[0]
        boxes = self.bbox_coder.decode(
            rois[:, None, 1:].expand(r, c, 4), deltas.float().view(r, c, 4)
        )  # [B*R, C, 4]
        sizes = image_sizes_tensor(image_sizes, device)  # [B, 2] = (h, w)
        boxes = clip_boxes(boxes.view(b, p * c, 4), sizes[:, None])  # [B, R*C, 4]
        scores = scores.view(b, p * c)  # [B, R*C]: row-major over (proposal, class)
        labels = torch.arange(c, device=device).repeat(p)  # [R*C] class of each column

        # Per image: candidates above score_thr, class-aware NMS, the best max_per_img. One host
        # read gives every image's candidate count; first_k_true picks them, in order.
        keep = scores > cfg.score_thr  # [B, R*C]
        counts = keep.sum(1).tolist()  # B ints
        kept = []
        for i, n in enumerate(counts):
            idx = first_k_true(keep[i], n)  # [n] candidates of image i
            order = class_aware_nms(
                boxes[i, idx], scores[i, idx], labels[idx], cfg.nms.iou_threshold, cfg.max_per_img
            )
            kept.append(idx[order])  # [K_i] best first, K_i <= max_per_img
        num_dets = [len(k) for k in kept]  # tensor sizes: known on the host
        det_img = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(num_dets)])
        det_cols = torch.cat(kept)  # [K_all] columns into R*C, grouped by image
        det_boxes = boxes[det_img, det_cols]  # [K_all, 4]
        det_scores = scores[det_img, det_cols]  # [K_all]
        det_labels = labels[det_cols]  # [K_all]

        det_rois = torch.cat([det_img[:, None].float(), det_boxes], 1)  # [K_all, 5]
        # [K_all, T, T]: each detection's own class only
        probs = self.mask_forward(outputs.features, det_rois, det_labels).float().sigmoid()

        results = []
        for i, (bx, sc, lb, pr) in enumerate(
            zip(
                det_boxes.split(num_dets),
                det_scores.split(num_dets),
                det_labels.split(num_dets),
                probs.split(num_dets),
            )
        ):
            h, w = image_sizes[i]
            masks = paste_masks(pr, bx, (h, w)) >= cfg.mask_thr_binary  # [K, h, w]
            results.append(Detections(bx, sc, lb, masks))
        return results


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _padded_targets(batch: Batch, device):
    """``pad_targets`` with at least one (invalid) column, so empty batches need no special case."""
    gt = pad_targets(batch.targets, device)
    if gt.boxes.shape[1] == 0:
        b = len(batch.targets)
        gt.boxes = torch.zeros(b, 1, 4, device=device)
        gt.labels = torch.full((b, 1), -1, dtype=torch.long, device=device)
        gt.valid = torch.zeros(b, 1, dtype=torch.bool, device=device)
        gt.has_mask = gt.valid.clone()
    return gt


def _concat_masks(batch: Batch, device) -> Tensor:
    """The batch's ground-truth masks ``[G_total, Hp, Wp]``, image 0's objects first."""
    hp, wp = batch.images.shape[-2:]
    masks = [t.masks.to(device) for t in batch.targets if len(t) > 0]
    if not masks:
        return torch.zeros(0, hp, wp, dtype=torch.bool, device=device)
    return torch.cat(masks)


def build_mask_rcnn(cfg: MaskRCNNConfig = MASK_RCNN_R50_FPN) -> MaskRCNN:
    """Build a :class:`MaskRCNN` from its config (no registry, no ``type=`` strings)."""
    return MaskRCNN(cfg)


__all__ = [
    "MASK_RCNN_R18_CPU",
    "MASK_RCNN_R18_SMALL",
    "MASK_RCNN_R50_FPN",
    "AnchorConfig",
    "AssignerConfig",
    "BoxHead",
    "MaskHead",
    "MaskRCNN",
    "MaskRCNNConfig",
    "MaskRCNNOutputs",
    "MaskRCNNTargets",
    "MaskTargets",
    "ProposalConfig",
    "Proposals",
    "RCNNTestConfig",
    "RCNNTrainConfig",
    "RPNHead",
    "RPNHeadConfig",
    "RPNTargets",
    "RPNTrainConfig",
    "RoIHeadConfig",
    "RoITargets",
    "SamplerConfig",
    "TestCfg",
    "TrainCfg",
    "build_mask_rcnn",
    "map_rois_to_levels",
    "mask_targets",
    "multiscale_roi_align",
    "paste_masks",
]
