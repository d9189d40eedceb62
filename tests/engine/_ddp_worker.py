"""Programs that tests/engine/test_distributed.py runs under ``torchrun --nproc_per_node=2`` (Gloo,
CPU), plus the pieces the tests rebuild in one process to compare against.

    python -m torch.distributed.run --standalone --nproc_per_node=2 _ddp_worker.py DATA OUT

runs every scenario and writes rank 0's results to ``OUT/*.pt``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from instseg_edu.data.coco import CocoDataset
from instseg_edu.data.shapes import make_shapes_splits
from instseg_edu.data.transforms import eval_transforms, train_transforms
from instseg_edu.engine.distributed import (
    all_gather_object,
    get_rank,
    is_main_process,
    process_group,
)
from instseg_edu.engine.evaluate import evaluate_model
from instseg_edu.engine.train import TrainConfig, make_loader, train

FAMILIES = ("retinanet", "mask_rcnn", "solo", "yolact")
IMAGE_SIZE = 64
NUM_TRAIN = 8
NUM_VAL = 3  # 2 processes: the DistributedSampler repeats one image, evaluation must drop it
PER_PROCESS_BATCH = 2
STEPS = 2


def shapes(root: Path) -> dict[str, Path]:
    return make_shapes_splits(root, NUM_TRAIN, NUM_VAL, image_size=IMAGE_SIZE, seed=0, workers=0)


def dataset(root: Path, augment: bool = False, split: str = "train") -> CocoDataset:
    paths = shapes(root)
    transforms = (train_transforms if augment else eval_transforms)(IMAGE_SIZE)
    return CocoDataset(paths[split], paths[split].parent / split, transforms)


def evaluate(model, val: CocoDataset) -> dict:
    loader = make_loader(val, 2, shuffle=False)  # a DistributedSampler under torchrun
    return evaluate_model(model, loader, val.coco, val.label_to_cat_id)  # on the model's device


def build(family: str, num_classes: int, frozen_bn: bool = True) -> torch.nn.Module:
    """The family's ``*_R18_SMALL`` model, identical in every process (seeded).

    ``frozen_bn``: BatchNorm in eval mode (``norm_eval=True``), so that its output does not depend
    on which images share a batch: per-process batch statistics would otherwise differ from those
    of the global batch (SyncBatchNorm fixes that on GPUs, but has no CPU kernel). Mask R-CNN's
    samplers are made large enough to take every candidate, so their random draws cannot differ
    between one process and two. The score threshold is lowered so that an untrained model still
    reports detections and its AP is not trivially 0.
    """
    import importlib

    module = importlib.import_module(f"instseg_edu.models.{family}")
    cfg = getattr(module, f"{family.upper()}_R18_SMALL").with_num_classes(num_classes)
    if frozen_bn:
        cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, norm_eval=True))
    if family == "mask_rcnn":
        train_cfg = cfg.train_cfg
        rcnn = dataclasses.replace(
            train_cfg.rcnn, sampler=dataclasses.replace(train_cfg.rcnn.sampler, num=100_000)
        )
        rpn = dataclasses.replace(
            train_cfg.rpn, sampler=dataclasses.replace(train_cfg.rpn.sampler, num=100_000)
        )
        cfg = dataclasses.replace(cfg, train_cfg=dataclasses.replace(train_cfg, rcnn=rcnn, rpn=rpn))
    if family == "mask_rcnn":
        rcnn = dataclasses.replace(cfg.test_cfg.rcnn, score_thr=0.001)
        cfg = dataclasses.replace(cfg, test_cfg=dataclasses.replace(cfg.test_cfg, rcnn=rcnn))
    else:
        cfg = dataclasses.replace(cfg, test_cfg=dataclasses.replace(cfg.test_cfg, score_thr=0.001))
    torch.manual_seed(0)
    return getattr(module, f"build_{family}")(cfg)


def config(**overrides) -> TrainConfig:
    base = dict(max_steps=STEPS, lr=0.01, optimizer="sgd", warmup_steps=0, schedule="constant",
                amp=False, device="cpu", progress=False, log_every=1, seed=0)  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def equality(data: Path, out: Path):
    """Two steps of every family, then COCO evaluation split over the processes; rank 0 saves the
    logged losses, the trained parameters and the metrics."""
    ds, val = dataset(data), dataset(data, split="val")
    results = {}
    for family in FAMILIES:
        model = build(family, len(ds.classes))
        loader = make_loader(ds, PER_PROCESS_BATCH, shuffle=False)  # a DistributedSampler
        history = train(model, loader, config())
        results[family] = {
            "steps": history.steps,
            "state": model.state_dict(),
            "metrics": evaluate(model, val),
        }
    try:  # SyncBatchNorm has no CPU kernel: a clear error before any collective
        train(build("retinanet", len(ds.classes)), loader, config(sync_bn=True))
        sync_bn_error = None
    except ValueError as e:
        sync_bn_error = str(e)
    results["sync_bn_error"] = sync_bn_error
    try:  # a time budget would follow each process's own clock: refused before any collective
        train(build("retinanet", len(ds.classes)), loader, config(max_seconds=60.0))
        max_seconds_error = None
    except ValueError as e:
        max_seconds_error = str(e)
    results["max_seconds_error"] = max_seconds_error
    if is_main_process():
        torch.save(results, out / "equality.pt")


class InterruptAt:
    """A loader that raises ``KeyboardInterrupt`` (Ctrl-C reaching every process) instead of
    yielding its ``n``-th batch of the run; everything else is the wrapped loader's."""

    def __init__(self, loader, n: int):
        self.loader, self.n, self.yielded = loader, n, 0

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.yielded += 1
            if self.yielded == self.n:
                raise KeyboardInterrupt
            yield batch


def resume(data: Path, out: Path):
    """Shuffled, augmented data (random flips drawn from each process's RNG), BatchNorm in train
    mode: 5 steps straight vs. 4 steps with a checkpoint at 3, Ctrl-C during step 4, resumed."""
    ds = dataset(data, augment=True)
    cfg = config(max_steps=5, checkpoint_every=3, checkpoint_dir=str(out / "resume"), lr=0.005)

    def run(cfg, wrap=None, resume=None):
        model = build("retinanet", len(ds.classes), frozen_bn=False)
        loader = make_loader(ds, PER_PROCESS_BATCH, shuffle=True, seed=1)
        history = train(model, wrap(loader) if wrap else loader, cfg, resume=resume)
        return history, model

    straight, straight_model = run(dataclasses.replace(cfg, checkpoint_dir=None))
    # BatchNorm statistics after training: each process updated its own, train() gives all rank 0's
    buffers = all_gather_object([b.clone() for b in straight_model.buffers()])
    part, _ = run(cfg, wrap=lambda loader: InterruptAt(loader, 4))
    resumed, resumed_model = run(cfg, resume=out / "resume" / "last.pt")
    if is_main_process():
        torch.save({
            "straight": straight.steps, "part": part.to_dict(), "resumed": resumed.steps,
            "straight_state": straight_model.state_dict(), "buffers": buffers,
            "resumed_state": resumed_model.state_dict(),
        }, out / "resume.pt")  # fmt: skip


def launched(device: torch.device, num_images: int) -> dict:
    """For :func:`instseg_edu.engine.distributed.launch`: two steps of the toy model; returns
    what rank 0 saw, including every process's share of the first epoch."""
    from _engine_toy import ToyBoxModel, ToyDataset

    from instseg_edu.engine.distributed import get_world_size

    torch.manual_seed(0)
    loader = make_loader(ToyDataset(num_images), PER_PROCESS_BATCH, shuffle=True)
    history = train(ToyBoxModel(dropout=0.0), loader, config(device=str(device)))
    loader.sampler.set_epoch(0)
    return {
        "rank": get_rank(),
        "world_size": get_world_size(),
        "steps": history.steps,
        "shares": all_gather_object(list(loader.sampler)),
    }


def uneven_masks(device: torch.device, families: list[str], data: str) -> dict:
    """For :func:`instseg_edu.engine.distributed.launch`: one loss and backward of each family where
    process 1's batch has only box-only objects (no mask to train), so its mask loss takes the
    no-positive branch while process 0's does not. Every loss divisor is summed over processes,
    so both must still join the same collectives; returns ``{family: [losses per process]}``."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "models"))
    from _box_only import without_masks

    from instseg_edu.data.transforms import collate

    torch.set_num_threads(1)
    train_set = dataset(Path(data))
    batch = collate([train_set[i] for i in range(PER_PROCESS_BATCH)]).to(device)
    if get_rank() == 1:
        batch = without_masks(batch, [list(range(len(t.labels))) for t in batch.targets])
    seen = {}
    for family in families:
        model = build(family, len(train_set.classes)).to(device)
        losses = model.loss(model(batch.images), batch)
        sum(v for k, v in losses.items() if k.startswith("loss_")).backward()
        seen[family] = all_gather_object({k: float(v.detach()) for k, v in losses.items()})
    return seen


def main(data: str, out: str):
    torch.set_num_threads(1)
    data, out = Path(data), Path(out)
    with process_group("cpu"):
        if is_main_process():
            shapes(data)
        torch.distributed.barrier()
        equality(data, out)
        resume(data, out)
        print(f"rank {get_rank()} done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
