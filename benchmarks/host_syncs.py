"""How often a training step and an inference pass make the host wait for the GPU: ours and
torchvision's, counted side by side on the same shapes batches.

On a GPU the Python loop only queues kernels; every host synchronisation (``.item()``,
boolean-mask indexing, ``nonzero``, ``unique``, a copy to the host, torchvision's NMS) stops it
until the device has caught up, so the GPU idles between kernels. The count is a property of the
code, not of the device: :func:`instseg_edu.engine.host_sync.count_host_syncs` records the
operations that synchronise on CUDA while the models run on any device. This script needs no GPU.

For each family and batch size: one training forward + loss (``model.train()``; the backward pass
runs in autograd's engine and is not counted — it has no data-dependent shapes in either model) and
one inference pass (``model.eval()``, forward + predict). The models are untrained, so inference
runs with the score thresholds at 0 on both sides: every candidate reaches NMS and mask assembly,
the largest amount of work the post-processing can see. RetinaNet and Mask R-CNN are compared with
torchvision's ``retinanet_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` (random init); SOLO and YOLACT
have no torchvision peer and are counted alone. ``--top`` lists where the syncs come from.

    python benchmarks/host_syncs.py                  # R50-FPN, 512², batch 2 and 8
    python benchmarks/host_syncs.py --smoke          # ResNet-18 presets, 128², batch 2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from _common import (
    build_torchvision,
    shapes_data,
    torchvision_inputs,
)

from instseg_edu.data.transforms import collate
from instseg_edu.engine.host_sync import HostSyncs, count_host_syncs

# Untrained models score about 0.01: thresholds at 0 let every candidate through at inference.
LENIENT_OURS = {
    "retinanet": lambda t: replace(t, score_thr=0.0),
    "mask_rcnn": lambda t: replace(t, rcnn=replace(t.rcnn, score_thr=0.0)),
    # SOLO's mask logits start at prior 0.01 too: a mask threshold below it keeps masks.
    "solo": lambda t: replace(t, score_thr=0.001, update_thr=1e-6, mask_thr=0.005),
    "yolact": lambda t: replace(t, score_thr=0.0),
}
LENIENT_TORCHVISION = {"retinanet": {"score_thresh": 0.0}, "mask_rcnn": {"box_score_thresh": 0.0}}


def build_ours(family: str, num_classes: int, smoke: bool) -> torch.nn.Module:
    if family == "retinanet":
        from instseg_edu.models import retinanet as m

        cfg, build = (
            (m.RETINANET_R18_SMALL if smoke else m.RETINANET_R50_FPN_SCRATCH),
            m.build_retinanet,
        )
    elif family == "mask_rcnn":
        from instseg_edu.models import mask_rcnn as m

        cfg, build = (m.MASK_RCNN_R18_SMALL if smoke else m.MASK_RCNN_R50_FPN), m.build_mask_rcnn
    elif family == "solo":
        from instseg_edu.models import solo as m

        cfg, build = (m.SOLO_R18_SMALL if smoke else m.SOLO_R50_FPN_SCRATCH), m.build_solo
    elif family == "yolact":
        from instseg_edu.models import yolact as m

        cfg, build = (m.YOLACT_R18_SMALL if smoke else m.YOLACT_R50_FPN), m.build_yolact
    else:
        raise ValueError(f"unknown family {family!r}")
    cfg = cfg.with_num_classes(num_classes)
    return build(replace(cfg, test_cfg=LENIENT_OURS[family](cfg.test_cfg)))


def count_ours(model, batch) -> tuple[HostSyncs, HostSyncs]:
    model.train()
    with count_host_syncs() as train_syncs:
        model.loss(model(batch.images), batch)
    model.eval()
    with torch.no_grad(), count_host_syncs() as infer_syncs:
        model.predict(model(batch.images), batch.image_sizes)
    return train_syncs, infer_syncs


def count_torchvision(model, batch, family: str) -> tuple[HostSyncs, HostSyncs]:
    images, targets = torchvision_inputs(batch, family)
    model.train()
    with count_host_syncs() as train_syncs:
        model(images, targets)
    model.eval()
    with torch.no_grad(), count_host_syncs() as infer_syncs:
        model(images)
    return train_syncs, infer_syncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--families", nargs="+", default=["retinanet", "mask_rcnn", "solo", "yolact"]
    )
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[2, 8])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--data", default="data/shapes512")
    parser.add_argument("--smoke", action="store_true", help="ResNet-18 presets, 128², batch 2")
    parser.add_argument("--top", type=int, default=0, help="list the N most frequent sync sites")
    args = parser.parse_args()
    if args.smoke:
        args.image_size, args.batch_sizes, args.data = 128, [2], args.data + "_smoke"
    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    train, _ = shapes_data(args.data, args.image_size, num_train=max(args.batch_sizes), num_val=2)
    num_classes = len(train.classes)
    print(
        f"host synchronisations per step (counted on the CPU, {time.strftime('%Y-%m-%d')}, "
        f"torch {torch.__version__}, {args.image_size}², "
        f"{'ResNet-18 presets' if args.smoke else 'R50-FPN'})"
    )
    print(f"{'family':10s} {'batch':>5s} {'side':12s} {'train step':>10s} {'inference':>10s}")
    for family in args.families:
        ours = build_ours(family, num_classes, args.smoke)
        peer = (
            build_torchvision(family, num_classes, args.image_size, **LENIENT_TORCHVISION[family])
            if family in LENIENT_TORCHVISION
            else None
        )
        for b in args.batch_sizes:
            batch = collate([train[i] for i in range(b)])
            sides = [("ours", count_ours(ours, batch))]
            if peer is not None:
                sides.append(("torchvision", count_torchvision(peer, batch, family)))
            for name, (tr, inf) in sides:
                print(f"{family:10s} {b:5d} {name:12s} {tr.count:10d} {inf.count:10d}")
                if args.top:
                    lines = tr.summary().splitlines()[: args.top]
                    print("\n".join("      train  " + line for line in lines))
            if peer is not None:
                (o_tr, o_inf), (p_tr, p_inf) = sides[0][1], sides[1][1]
                print(
                    f"{family:10s} {b:5d} {'ratio':12s} {p_tr.count / max(o_tr.count, 1):9.1f}x "
                    f"{p_inf.count / max(o_inf.count, 1):9.1f}x   (torchvision / ours)"
                )


if __name__ == "__main__":
    main()
