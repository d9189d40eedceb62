"""Time to accuracy: ours against torchvision's model, trained for the same wall-clock time.

Both models train on the same shapes train split from loaders with the same seed (the same images
in the same order), for ``--minutes`` of training time each, and are evaluated at the same points
(every ``--eval-every`` minutes, or ``--evals`` points spread evenly over the run) with the same
pycocotools evaluation on the val split; evaluation time is not counted as training time. The
script prints both AP curves, point by point, and the two questions the project asks:

- how long did ours need to reach torchvision's final AP?
- is our AP at least torchvision's, at the end and at every evaluation point?

Two protocols, chosen by the device:

- **GPU** (``--device cuda``): ResNet-50-FPN on both sides, random init, 512², SGD, one side after
  the other (the GPU is not shared with anything else).
- **CPU** (``--device cpu``): the CPU recipe of the family (``instseg_edu.recipes``: RetinaNet
  ``RETINANET_R18_CPU``, Mask R-CNN ``MASK_RCNN_R18_CPU``; 128 px images kept in memory, its
  optimiser, learning rate, warm-up and gradient clipping) against torchvision's model of the same
  family built on the **same small backbone**: torchvision's own ResNet-18 with the same stages,
  an FPN of the same width and levels, the same anchors, RoI sizes, sampled RoIs and detection
  limits, as far as torchvision's constructors allow (:func:`torchvision_like`). The two sides run
  **interleaved** in time slices of ``--slice-seconds`` of training, so whatever else the machine
  is doing slows both alike.

On both protocols the learning rate stays constant after the warm-up, so that every evaluation
point is the model in the middle of its training. ``--schedule cosine`` decays it instead over
``--minutes``, following the clock as a notebook's time-budgeted training does
(``Recipe.max_minutes``): both sides then have the same rate after the same seconds of training,
whatever their steps.

    python benchmarks/time_to_ap.py --family retinanet --device cuda
    python benchmarks/time_to_ap.py --family mask_rcnn --device cuda
    python benchmarks/time_to_ap.py --family mask_rcnn --device cpu --minutes 4 --evals 4
    python benchmarks/time_to_ap.py --family retinanet --device cpu --smoke   # seconds-long check

Each side runs in its best precision. On CUDA: ours in bf16 autocast, torchvision's in the
precision it trains fastest in there (``GPU_TV_PRECISION``: float32 for RetinaNet, bf16 for
Mask R-CNN; ``--tv-precision`` to choose); on the CPU the precision of the cpu recipe
(``Recipe.cpu_amp``): bf16 for both on a CPU with bf16 instructions, float32 elsewhere
(``--cpu-fp32``: float32 on any CPU; ``--cpu-bf16``: bf16 even when the recipe says otherwise).
On the CPU both sides' strided convolutions on one-pixel-wide inputs run in float32
(``engine.train.float32_for_one_wide_inputs``: a oneDNN bf16 bug). On CUDA ours also runs
channels-last, as ``instseg_edu``'s training loop runs it there (and on the CPU in bf16);
torchvision's model runs as torchvision builds it.
Only the training steps count as training time (the loader's waits and the evaluations do not);
``--max-wall-minutes`` also stops a side after that much wall-clock time outside evaluation, so a
loader-bound run still ends on time (its curve then ends short of ``--minutes``).

``parse_args`` and ``run`` are importable: ``benchmarks/gpu_check.py`` runs the same protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import torch
from _common import (
    Timer,
    autocast,
    build_torchvision,
    loss_total,
    shapes_data,
    torchvision_detections,
    torchvision_inputs,
)
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from train_throughput import build_ours

from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.memory import InMemoryDataset
from instseg_edu.data.shapes import SHAPES_PER_IMAGE, make_shapes_dataset, split_name
from instseg_edu.data.transforms import eval_transforms, train_transforms
from instseg_edu.engine.evaluate import detections_to_coco, evaluate_coco
from instseg_edu.engine.train import (
    TrainConfig,
    cpu_has_native_bf16,
    float32_for_one_wide_inputs,
    lr_at,
    lr_mult_groups,
    make_loader,
)
from instseg_edu.recipes import recipe

# Settings of each protocol that the command line does not set (None there means "from here").
GPU_DEFAULTS = dict(
    data="data/shapes512", image_size=512, num_train=4000, num_val=200, batch_size=8, workers=8,
    minutes=10.0, eval_every=2.0, lr=0.02, optimizer="sgd", weight_decay=1e-4, warmup_steps=300,
    grad_clip=10.0, slice_seconds=0.0, in_memory=False,
)  # fmt: skip
#: torchvision's fastest training precision on a GPU, as measured on an H200 (512², batch 8,
#: R50-FPN; benchmarks/RESULTS.md, "First GPU check"): its RetinaNet trains 104-112 img/s in
#: float32 (TF32 convolutions) and 92-95 in bf16 autocast; its Mask R-CNN 76-79 in bf16, 72-76 in
#: float32.
GPU_TV_PRECISION = {"retinanet": "fp32", "mask_rcnn": "bf16"}
#: The parameters of torchvision's detectors that a recipe's ``lr_mult`` key names in ours.
TORCHVISION_KEYS = {
    "bbox_head": ("roi_heads.box_head", "roi_heads.box_predictor"),
    "mask_head": ("roi_heads.mask_head", "roi_heads.mask_predictor"),
    "rpn_head": ("rpn.head",),
}
CPU_DEFAULTS = dict(
    data="data/shapes128", workers=0, minutes=4.0, eval_every=1.0, slice_seconds=15.0
)  # the rest comes from the family's CPU recipe


# ----------------------------------------------------------------------- torchvision, small
def _torchvision_resnet_fpn(backbone_cfg, neck_cfg, extra_blocks):
    """torchvision's ResNet (random init, trainable BatchNorm) with an FPN over the same stages and
    of the same width as our ``backbone_cfg`` / ``neck_cfg`` (torchvision's ``BackboneWithFPN``;
    a ResNet narrower than torchvision's, ``base_channels != 64``, is ours, built from
    torchvision's blocks)."""
    import torchvision
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    end = len(neck_cfg.in_channels) if neck_cfg.end_level == -1 else neck_cfg.end_level + 1
    used = range(neck_cfg.start_level, end)  # indices of the stages the FPN reads (0 = layer1)
    if backbone_cfg.base_channels == 64:
        body = getattr(torchvision.models, f"resnet{backbone_cfg.depth}")(
            weights=None, zero_init_residual=backbone_cfg.zero_init_residual
        )
    else:  # torchvision's ResNet class has no width setting for BasicBlocks: the same network
        # from our ResNet, which is made of torchvision's blocks under torchvision's names
        from instseg_edu.models.backbone import ResNet

        body = ResNet(backbone_cfg)
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i + 1}": str(k) for k, i in enumerate(used)},
        in_channels_list=[neck_cfg.in_channels[i] for i in used],
        out_channels=neck_cfg.out_channels,
        extra_blocks=extra_blocks,
    )


class _OnlyP6(ExtraFPNBlock):
    """torchvision's ``LastLevelP6P7`` without its P7: one extra level, P6 = a stride-2 conv on C5
    (or P5), as our FPN's one extra ``on_input`` level."""

    def __init__(self, p6p7) -> None:
        super().__init__()
        self.p6, self.use_P5 = p6p7.p6, p6p7.use_P5

    def forward(self, p, c, names):
        p.append(self.p6(p[-1] if self.use_P5 else c[-1]))
        names.append("p6")
        return p, names


def torchvision_like(family: str, cfg, image_size: int) -> torch.nn.Module:
    """torchvision's RetinaNet / Mask R-CNN built to mirror our config ``cfg`` (random init).

    Same: ResNet depth and the stages used (torchvision's ``IntermediateLayerGetter`` stops after
    the last stage the FPN reads, as our ``num_stages`` does), FPN width and levels, anchor sizes
    and ratios, RetinaNet's number of head convs (torchvision fixes 4; the towers are cut to
    ``stacked_convs``) and their GroupNorm (``norm_num_groups``: torchvision's ``norm_layer``),
    Mask R-CNN's RPN and RoI sampling, proposal counts, RoIAlign sizes, the box head's fc width,
    the mask head's convs and the detection limits, and the loss weights
    (torchvision's constructors take none: the model gets a ``loss_weights`` dict, torchvision's
    loss names to ours' ``loss_weight``, which the training step applies). Different, because
    torchvision's API has no setting for it: RetinaNet's extra levels take a ReLU between P6 and
    P7, torchvision's FPN starts from Kaiming-uniform weights (ours: Xavier-uniform), its
    ``Matcher`` gives a low-quality match to the ground truth the anchor overlaps most, its
    RetinaNet loss is normalised per image, and its anchors, box coder and sampler are its own
    implementations.
    ``image_size`` pins torchvision's internal resize to the benchmark's size.
    """
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    common = dict(min_size=image_size, max_size=image_size)
    if family == "retinanet":
        from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead

        neck, head_cfg, anchors = cfg.neck, cfg.bbox_head, cfg.bbox_head.anchor_generator
        if neck.add_extra_convs != "on_input":
            raise ValueError("torchvision_like: RetinaNet's extra levels must be 'on_input'")
        end = len(neck.in_channels) if neck.end_level == -1 else neck.end_level + 1
        num_extra = neck.num_outs - (end - neck.start_level)
        if num_extra not in (1, 2):
            raise ValueError("torchvision_like: RetinaNet needs one or two extra FPN levels")
        extra = LastLevelP6P7(neck.in_channels[end - 1], neck.out_channels)
        if num_extra == 1:  # P6 only (RETINANET_R18_CPU: P3-P5 from C3-C5, then P6)
            extra = _OnlyP6(extra)
        backbone = _torchvision_resnet_fpn(cfg.backbone, neck, extra)
        octave = [anchors.octave_base_scale * 2 ** (k / anchors.scales_per_octave)
                  for k in range(anchors.scales_per_octave)]  # fmt: skip
        sizes = tuple(tuple(s * o for o in octave) for s in anchors.strides)
        generator = AnchorGenerator(sizes, (tuple(anchors.ratios),) * len(sizes))
        groups = head_cfg.norm_num_groups  # GroupNorm in the towers, as torchvision's v2 head
        norm = None if groups is None else functools.partial(torch.nn.GroupNorm, groups)
        head = RetinaNetHead(neck.out_channels, generator.num_anchors_per_location()[0],
                             head_cfg.num_classes, norm_layer=norm)  # fmt: skip
        for tower in (head.classification_head, head.regression_head):
            tower.conv = tower.conv[: head_cfg.stacked_convs]
        test = cfg.test_cfg
        model = RetinaNet(
            backbone, head_cfg.num_classes, anchor_generator=generator, head=head,
            score_thresh=test.score_thr, nms_thresh=test.nms.iou_threshold,
            detections_per_img=test.max_per_img, topk_candidates=test.nms_pre, **common,
        )  # fmt: skip
        model.loss_weights = {"classification": head_cfg.loss_cls.loss_weight,
                              "bbox_regression": head_cfg.loss_bbox.loss_weight}  # fmt: skip
        return model
    if family == "mask_rcnn":
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
        from torchvision.models.detection.mask_rcnn import (
            MaskRCNN,
            MaskRCNNHeads,
            MaskRCNNPredictor,
        )
        from torchvision.models.detection.rpn import RPNHead
        from torchvision.ops import MultiScaleRoIAlign

        neck, roi, train, test = cfg.neck, cfg.roi_head, cfg.train_cfg, cfg.test_cfg
        backbone = _torchvision_resnet_fpn(cfg.backbone, neck, LastLevelMaxPool())
        anchors = cfg.rpn_head.anchor_generator
        sizes = tuple(tuple(s * k for k in anchors.scales) for s in anchors.strides)
        generator = AnchorGenerator(sizes, (tuple(anchors.ratios),) * len(sizes))
        names = [str(k) for k in range(len(roi.featmap_strides))]
        width, classes = neck.out_channels, cfg.num_classes + 1  # torchvision: 0 is background
        model = MaskRCNN(
            backbone, num_classes=None, rpn_anchor_generator=generator,
            rpn_head=RPNHead(width, generator.num_anchors_per_location()[0]),
            rpn_pre_nms_top_n_train=train.rpn_proposal.nms_pre,
            rpn_post_nms_top_n_train=train.rpn_proposal.max_per_img,
            rpn_pre_nms_top_n_test=test.rpn.nms_pre, rpn_post_nms_top_n_test=test.rpn.max_per_img,
            rpn_nms_thresh=test.rpn.nms.iou_threshold,
            rpn_fg_iou_thresh=train.rpn.assigner.pos_iou_thr,
            rpn_bg_iou_thresh=train.rpn.assigner.neg_iou_thr,
            rpn_batch_size_per_image=train.rpn.sampler.num,
            rpn_positive_fraction=train.rpn.sampler.pos_fraction,
            box_roi_pool=MultiScaleRoIAlign(names, roi.bbox_roi_size, roi.sampling_ratio),
            box_head=TwoMLPHead(width * roi.bbox_roi_size**2, roi.fc_out_channels),
            box_predictor=FastRCNNPredictor(roi.fc_out_channels, classes),
            box_score_thresh=test.rcnn.score_thr, box_nms_thresh=test.rcnn.nms.iou_threshold,
            box_detections_per_img=test.rcnn.max_per_img,
            box_fg_iou_thresh=train.rcnn.assigner.pos_iou_thr,
            box_bg_iou_thresh=train.rcnn.assigner.neg_iou_thr,
            box_batch_size_per_image=train.rcnn.sampler.num,
            box_positive_fraction=train.rcnn.sampler.pos_fraction,
            mask_roi_pool=MultiScaleRoIAlign(names, roi.mask_roi_size, roi.sampling_ratio),
            mask_head=MaskRCNNHeads(width, [roi.conv_out_channels] * roi.num_convs, dilation=1),
            mask_predictor=MaskRCNNPredictor(roi.conv_out_channels, roi.conv_out_channels, classes),
            **common,
        )  # fmt: skip
        rpn = cfg.rpn_head
        model.loss_weights = {
            "loss_objectness": rpn.loss_cls.loss_weight,
            "loss_rpn_box_reg": rpn.loss_bbox.loss_weight,
            "loss_classifier": roi.loss_cls.loss_weight,
            "loss_box_reg": roi.loss_bbox.loss_weight,
            "loss_mask": roi.loss_mask.loss_weight,
        }
        return model
    raise ValueError(f"unknown family {family!r}")


# ---------------------------------------------------------------------------------- one side
def predict(name, model, family, batch, precision, device):
    with torch.inference_mode(), autocast(device, precision):
        if name == "ours":
            outputs = model(batch.images)
            outputs = type(outputs)(
                *(o.float() if torch.is_tensor(o) and o.is_floating_point() else o for o in outputs)
            )
            return model.predict(outputs, batch.image_sizes)
        images, _ = torchvision_inputs(batch, family)
        return torchvision_detections(model(images), family)


def evaluate(name, model, family, val_loader, val_set, precision, device):
    model.eval()
    results = []
    for batch in val_loader:
        batch = batch.to(device)
        detections = [d.to("cpu") for d in predict(name, model, family, batch, precision, device)]
        targets = [t.to("cpu") for t in batch.targets]
        results.extend(
            detections_to_coco(detections, targets, batch.image_sizes, val_set.label_to_cat_id)
        )
    model.train()
    iou_types = ("bbox", "segm") if family == "mask_rcnn" else ("bbox",)
    metrics = evaluate_coco(val_set.coco, results, iou_types)
    return {t: metrics[t]["AP"] for t in iou_types}


class SideRun:
    """One side's model, optimiser and loader, trained a slice at a time.

    ``trained`` counts seconds inside training steps only; ``wall`` the seconds spent in
    :meth:`train_until` (steps plus the loader's waits), which ``--max-wall-minutes`` limits.
    """

    def __init__(self, name, model, family, args, train_loader, device):
        self.name, self.family, self.args, self.device = name, family, args, device
        self.model = model.to(device).train()
        self.loader, self.batches = train_loader, None  # started at the first step
        self.precision = args.precision if name == "ours" else args.tv_precision
        # As engine.train does: channels-last on CUDA, and on the CPU in bf16.
        self.channels_last = name == "ours" and (device.type == "cuda" or self.precision == "bf16")
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if device.type == "cpu" and self.precision == "bf16":  # oneDNN's bf16 bug, both sides
            float32_for_one_wide_inputs(self.model)  # as engine.train does
        self.lr = args.lr if name == "ours" else args.tv_lr
        # The decay follows the clock: the same rate after the same seconds on both sides.
        self.schedule = TrainConfig(max_steps=1, lr=1.0, warmup_steps=0, schedule=args.schedule,
                                    max_seconds=60 * args.minutes)  # fmt: skip
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        # Both sides update with PyTorch's fused kernel, as instseg_edu's training loop does
        # (make_optimizer), with the recipe's lr_mult on the same heads: the same update, so only
        # the models differ.
        lr_mult = getattr(args, "lr_mult", None)
        if lr_mult and name != "ours":
            lr_mult = {tv: m for key, m in lr_mult.items() for tv in TORCHVISION_KEYS[key]}
        groups = lr_mult_groups(named, lr_mult) if lr_mult else self.params
        if args.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(groups, lr=self.lr, fused=True,
                                               weight_decay=args.weight_decay)  # fmt: skip
        else:
            self.optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=0.9, fused=True,
                                             weight_decay=args.weight_decay)  # fmt: skip
        self.timer = Timer(device)
        self.trained = self.wall = 0.0
        self.step = 0
        self.curve: list[dict] = []
        self.stopped = False  # by --max-wall-minutes

    def _next_batch(self):
        batch = None if self.batches is None else next(self.batches, None)
        if batch is None:  # a new epoch: the loader's seeded generator gives the next order
            self.batches = iter(self.loader)
            batch = next(self.batches)
        return batch

    def lr_factor(self) -> float:
        """The learning rate's factor for the next step: a linear warm-up over
        ``--warmup-steps`` times ``--schedule`` at ``trained`` seconds of ``--minutes``
        (``engine.train.lr_at`` with a time budget)."""
        warm = min(1.0, (self.step + 1) / max(1, self.args.warmup_steps))
        return warm * lr_at(0, self.schedule, num_steps=1, seconds=self.trained)

    def train_until(self, trained_s: float) -> None:
        """Train steps until ``trained >= trained_s`` (or the wall-clock limit is reached)."""
        max_wall = self.args.max_wall_minutes * 60 if self.args.max_wall_minutes else float("inf")
        start = time.perf_counter()
        while self.trained < trained_s and not self.stopped:
            batch = self._next_batch().to(self.device, non_blocking=True)
            if self.channels_last:
                images = batch.images.contiguous(memory_format=torch.channels_last)
                batch = dataclasses.replace(batch, images=images)
            self.timer.start()
            lr = self.lr * self.lr_factor()
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            with autocast(self.device, self.precision):
                if self.name == "ours":
                    losses = self.model.loss(self.model(batch.images), batch)
                else:
                    images, targets = torchvision_inputs(batch, self.family)
                    losses = self.model(images, targets)
                    weights = getattr(self.model, "loss_weights", {})  # torchvision_like's
                    losses = {k: v * weights.get(k, 1.0) for k, v in losses.items()}
                total = loss_total(losses, ours=self.name == "ours")
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            if self.args.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
            self.optimizer.step()
            self.trained += self.timer.elapsed()
            self.step += 1
            self.stopped = self.wall + time.perf_counter() - start >= max_wall
        self.wall += time.perf_counter() - start

    def evaluate(self, val_loader, val_set) -> dict:
        ap = evaluate(self.name, self.model, self.family, val_loader, val_set, self.precision,
                      self.device)  # fmt: skip
        point = {"minutes": self.trained / 60, "step": self.step, **ap}
        self.curve.append(point)
        print(f"{self.family} {self.name:11s} {self.trained / 60:5.2f} min  step {self.step:6d}  "
              + "  ".join(f"{k} AP {v:.3f}" for k, v in ap.items()), flush=True)  # fmt: skip
        return point


def datasets(args):
    """The shapes train and val splits; read once into memory when ``args.in_memory``."""
    if not args.in_memory:
        return shapes_data(args.data, args.image_size, args.num_train, args.num_val)
    # The CPU protocol trains both sides on the recipe's training split (for Mask R-CNN, images
    # with 10-20 shapes); both are scored on the standard validation split, at the training
    # size (the recipe's test_size is left out: torchvision's model resizes its input itself).
    shapes = getattr(args, "train_shapes_per_image", SHAPES_PER_IMAGE)
    split = split_name("train", shapes)
    size = args.image_size
    train_json = make_shapes_dataset(args.data, args.num_train, size, split=split,
                                     shapes_per_image=shapes)  # fmt: skip
    val_json = make_shapes_dataset(args.data, args.num_val, size, split="val")
    train = CocoDataset(train_json, train_json.parent / split, eval_transforms(size))
    val = CocoDataset(val_json, val_json.parent / "val", eval_transforms(size))
    augment = train_transforms(size, jitter=getattr(args, "color_jitter", True))
    return InMemoryDataset(train, augment), InMemoryDataset(val)


def eval_points(minutes: float, eval_every: float) -> list[float]:
    """Training seconds at which both sides are evaluated: every ``eval_every`` minutes, and at
    the end. Example: ``eval_points(4, 1.5) == [90, 180, 240]``."""
    points, t = [], eval_every
    while t < minutes - 1e-9:
        points.append(t * 60)
        t += eval_every
    return [*points, minutes * 60]


def time_to_reach(curve, key, value):
    for point in curve:
        if point[key] >= value:
            return point["minutes"]
    return None


# ------------------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv``), with the protocol's defaults and
    ``--smoke`` applied."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["retinanet", "mask_rcnn"], default="retinanet")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--data", default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--num-train", type=int, default=None)
    parser.add_argument("--num-val", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=None, help="training minutes per side")
    parser.add_argument(
        "--max-wall-minutes",
        type=float,
        default=None,
        help="also stop a side after this much wall-clock time outside evaluation",
    )
    parser.add_argument("--eval-every", type=float, default=None, help="minutes between evals")
    parser.add_argument("--evals", type=int, default=None,
                        help="evaluation points spread evenly over --minutes (overrides "
                        "--eval-every)")  # fmt: skip
    parser.add_argument(
        "--slice-seconds",
        type=float,
        default=None,
        help="interleave the sides in slices of this much training time "
        "(0: one side after the other; default 15 on the CPU, 0 on a GPU)",
    )
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--tv-lr", type=float, default=None, help="default: --lr")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default=None)
    parser.add_argument("--weight-decay", type=float, default=None)
    parser.add_argument("--warmup-steps", type=int, default=None)
    parser.add_argument("--grad-clip", type=float, default=None)
    parser.add_argument("--schedule", choices=["constant", "cosine", "step"], default="constant",
                        help="the learning rate's decay over --minutes of training, following the "
                        "clock (engine.train.lr_at)")  # fmt: skip
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--tv-precision", choices=["bf16", "fp32"], default=None,
                        help="torchvision's precision on a GPU (default: its fastest for the "
                        "family, GPU_TV_PRECISION)")  # fmt: skip
    cpu_precision = parser.add_mutually_exclusive_group()
    cpu_precision.add_argument("--cpu-bf16", action="store_true",
                               help="CPU protocol: bf16 autocast for both sides on a CPU with "
                               "bf16 instructions (default: as the cpu recipe, "
                               "Recipe.cpu_amp)")  # fmt: skip
    cpu_precision.add_argument("--cpu-fp32", dest="cpu_bf16", action="store_false",
                               help="CPU protocol: float32 for both sides")  # fmt: skip
    parser.set_defaults(cpu_bf16=None)  # neither: as the recipe
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--sides", nargs="+", default=["torchvision", "ours"])
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights (the same on both sides) and data order")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, small models, CPU-fast")
    parser.add_argument("--json", help="also write both curves here")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.protocol = "gpu" if torch.device(args.device).type == "cuda" else "cpu"
    if args.protocol == "cpu":
        r = recipe(args.family, "cpu")
        defaults = dict(
            image_size=r.image_size, num_train=r.num_train, num_val=r.num_val,
            batch_size=r.batch_size, lr=r.lr, optimizer=r.optimizer,
            weight_decay=r.weight_decay, warmup_steps=r.warmup_steps, grad_clip=r.grad_clip,
            lr_mult=r.lr_mult,
            in_memory=r.in_memory, color_jitter=r.color_jitter, model=r.model,
            train_shapes_per_image=r.train_shapes_per_image, **CPU_DEFAULTS,
        )  # fmt: skip
        if args.cpu_bf16 is None:
            args.cpu_bf16 = r.cpu_amp
        if not (args.cpu_bf16 and cpu_has_native_bf16()):  # emulated bf16 is slower
            args.precision = args.tv_precision = "fp32"
        defaults["tv_precision"] = args.precision  # the same on both sides
    else:
        defaults = dict(GPU_DEFAULTS, model=None, tv_precision=GPU_TV_PRECISION[args.family])
    if args.evals is not None and args.eval_every is not None:
        parser.error("give --evals or --eval-every, not both")
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.tv_lr is None:
        args.tv_lr = args.lr
    if args.smoke:
        args.image_size, args.num_train, args.num_val, args.batch_size = 128, 8, 4, 2
        args.minutes, args.eval_every, args.workers, args.warmup_steps = 0.1, 0.05, 0, 5
        if args.protocol == "cpu":
            args.slice_seconds = 1.0
        args.data = args.data + "_smoke"
    if args.evals is not None:
        if args.evals < 1:
            parser.error(f"--evals {args.evals} must be >= 1")
        args.eval_every = args.minutes / args.evals
    return args


def build_side(name: str, args, num_classes: int) -> torch.nn.Module:
    if args.protocol == "gpu":
        if name == "ours":
            return build_ours(args.family, num_classes, args.smoke)
        return build_torchvision(args.family, num_classes, args.image_size)
    r = recipe(args.family, "cpu")
    if name == "ours":
        return r.build_model(num_classes)
    return torchvision_like(args.family, r.model_config(num_classes), args.image_size)


def run(args: argparse.Namespace, on_point=None, slices: list | None = None) -> dict:
    """Train and evaluate every side of ``args.sides``; returns ``{side: curve}``.

    ``on_point(side, point)`` is called after each evaluation. With ``args.slice_seconds`` the
    sides take turns every that many seconds of training; without, one runs after the other.
    ``slices``, when given, receives one ``{"side", "wall_s", "trained_s", "step"}`` per turn
    (``wall_s`` since the start of training) to show how the sides shared the machine."""
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = False
    if args.threads:
        torch.set_num_threads(args.threads)
    train_set, val_set = datasets(args)
    # One loader per side, same seed: the same images in the same order on both sides.
    # Persistent workers: a new epoch (or evaluation) does not wait for workers to start.
    persistent = args.workers > 0

    def loader(dataset, shuffle):
        return make_loader(dataset, args.batch_size, shuffle=shuffle, workers=args.workers,
                           seed=args.seed, persistent_workers=persistent)  # fmt: skip

    val_loader = loader(val_set, False)
    num_classes = len(train_set.classes)
    runs = {}
    for name in args.sides:
        torch.manual_seed(args.seed)
        model = build_side(name, args, num_classes)
        runs[name] = SideRun(name, model, args.family, args, loader(train_set, True), device)

    def point_done(run):
        if run.curve and run.curve[-1]["step"] == run.step:
            # Not trained since its last evaluation (it stopped early): the same model gives the
            # same AP, so the point is repeated instead of evaluated again. Every side thus has a
            # point at every evaluation time, however the load split the machine between them.
            point = {**run.curve[-1], "minutes": run.trained / 60}
            run.curve.append(point)
        else:
            point = run.evaluate(val_loader, val_set)
        if on_point is not None:
            on_point(run.name, point)

    start = time.perf_counter()

    def train_until(r: SideRun, target: float) -> None:
        r.train_until(target)
        if slices is not None:
            slices.append({"side": r.name, "wall_s": time.perf_counter() - start,
                           "trained_s": r.trained, "step": r.step})  # fmt: skip

    points = eval_points(args.minutes, args.eval_every)
    if args.slice_seconds > 0:  # interleaved: machine noise hits every side alike
        for target in points:
            while any(r.trained < target and not r.stopped for r in runs.values()):
                for r in runs.values():
                    if r.trained < target and not r.stopped:
                        train_until(r, min(r.trained + args.slice_seconds, target))
            for r in runs.values():
                point_done(r)
    else:  # one side after the other (a GPU to itself)
        for r in runs.values():
            for target in points:
                train_until(r, target)
                if not r.curve or r.curve[-1]["step"] != r.step:
                    point_done(r)
                if r.stopped:
                    break
            r.batches = r.loader = None  # its loader's workers can go
            if device.type == "cuda":
                r.model.cpu()
                torch.cuda.empty_cache()
    return {name: r.curve for name, r in runs.items()}


def compare(curves: dict, family: str) -> dict:
    """Point-by-point comparison (the points are the same evaluations of both sides)."""
    ours, peer = curves["ours"], curves["torchvision"]
    keys = ["bbox", "segm"] if family == "mask_rcnn" else ["bbox"]
    rows = [{"minutes": o["minutes"], **{f"ours_{k}": o[k] for k in keys},
             **{f"torchvision_{k}": p[k] for k in keys}} for o, p in zip(ours, peer)]  # fmt: skip
    above = {k: all(o[k] > p[k] for o, p in zip(ours, peer)) for k in keys}
    return {"points": rows, "ours_above_at_every_point": above}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}; {args.protocol} protocol: {args.family}"
        + (f" {args.model} against torchvision's on the same ResNet-18" if args.model else "")
        + f", {args.image_size} px, batch {args.batch_size}, {args.optimizer} lr {args.lr:g}"
        + "".join(f" ({key} x {m:g})" for key, m in (getattr(args, "lr_mult", None) or {}).items())
        + f" ({args.schedule} rate)"
        + f", {args.minutes:g} min per side, evaluated every {args.eval_every:g} min"
        + (f", interleaved every {args.slice_seconds:g} s" if args.slice_seconds > 0 else "")
    )
    slices: list[dict] = []
    curves = run(args, slices=slices)

    summary = None
    if {"ours", "torchvision"} <= curves.keys():
        key = "segm" if args.family == "mask_rcnn" else "bbox"
        peer_final = curves["torchvision"][-1][key]
        reach = time_to_reach(curves["ours"], key, peer_final)
        print(
            f"torchvision's final {key} AP {peer_final:.3f}; ours reached it after "
            + (f"{reach:.2f} min" if reach is not None else "never (within the budget)")
        )
        for k in [k for k in ("bbox", "segm") if k in curves["ours"][-1]]:
            ours, peer = curves["ours"][-1][k], curves["torchvision"][-1][k]
            ratio = f"{ours / peer:.2f}" if peer > 0 else "n/a (torchvision at 0)"
            print(f"final {k} AP: ours {ours:.3f}  torchvision {peer:.3f}  ratio {ratio}")
        summary = compare(curves, args.family)
        for k, above in summary["ours_above_at_every_point"].items():
            print(f"ours above torchvision at every evaluation point ({k} AP): "
                  + ("yes" if above else "no"))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "curves": curves, "summary": summary,
                       "slices": slices}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
