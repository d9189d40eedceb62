"""Classification pretraining of a detector's ResNet on object crops: the stand-in for ImageNet.

The detectors this library re-builds start, in their papers, from a ResNet trained to classify
ImageNet (RetinaNet, Sec. 4.1 "Initialization"; Mask R-CNN, SOLO and YOLACT alike): the
backbone already knows what things look like, and detection training teaches it where they are.
Nothing is downloaded here, so on the CPU tier the same ResNet first learns to classify the
training set's own objects:

1. :class:`ObjectCrops` cuts every ground-truth object out of the training images as a small
   square image (``32 x 32`` by default) labelled with its class;
2. :class:`CropClassifier` is the ResNet followed by global average pooling and one linear layer,
   the shape of an ImageNet classifier;
3. :func:`pretrain_backbone` trains it for a time budget (a minute on the CPU tier) with the
   library's one training loop (:func:`~instseg_edu.engine.train.train`), then drops the linear
   layer: the ResNet, trained in place, goes on inside the detector.

A minute of this, then three and a half of detection, beats four and a half minutes of detection
from random weights on the same two cores (``benchmarks/RESULTS.md``, "Pretraining the backbone on
object crops"): the classifier is what a detector trained from scratch learns last.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from instseg_edu.data.transforms import collate
from instseg_edu.models.backbone import ImageNormalize, resnet_out_channels
from instseg_edu.structures import Batch, Target

__all__ = [
    "CropClassifier",
    "ObjectCrops",
    "PRETRAIN_DEFAULTS",
    "Pretraining",
    "crop_accuracy",
    "pretrain_backbone",
]

#: The settings :func:`pretrain_backbone` uses unless told otherwise (measured on the CPU tier's
#: half-width ResNet-18: crop accuracy after a minute 0.65 at lr 2e-3, 0.72 at 4e-3; 48 px crops
#: gave the detector no more than 32 px ones at half the steps).
PRETRAIN_DEFAULTS = dict(crop_size=32, context=1.3, margin=4.0, batch_size=128, lr=4e-3,
                         weight_decay=0.05, warmup_steps=20, grad_clip=10.0)  # fmt: skip


class ObjectCrops(Dataset):
    """Every object of ``dataset`` cut out as a square image, with its class.

    A crop is centred on the object's box and is ``context`` times its longer side plus ``margin``
    pixels across, so the whole outline and some background are inside (an 8 px shape gets a
    14 px crop); it is resampled to ``crop_size x crop_size`` by torchvision's ``roi_align``
    (bilinear, ``aligned=True``; parts outside the image are black). The crops are cut once, when
    the dataset is built, and kept as ``uint8`` (15 000 crops of 32 px: 46 MB); each item is then
    flipped left-right with probability 0.5.

    Args:
        dataset: ``(image float32 [3, H, W] in [0, 1], Target)`` items, e.g. the training set of
            a recipe (its ``classes``, when it has them, become :attr:`classes`). Crowd and
            ignored regions are not cut out.
        crop_size: side of a crop, in pixels.
        context: crop side / the box's longer side (before ``margin``).
        margin: pixels added to every crop's side.

    Attributes:
        crops: ``uint8 [N, 3, crop_size, crop_size]``, every object's crop, in dataset order.
        labels: ``int64 [N]`` their classes.
        classes: the dataset's class names (empty when it has none).

    Items: ``(image float32 [3, crop_size, crop_size] in [0, 1], Target)`` with one box (the
    whole crop, xyxy), the object's label and an empty mask, so
    :func:`~instseg_edu.data.transforms.collate` and the training loop take them as they take
    detection images.

    Raises:
        ValueError: ``crop_size < 8``, ``context < 1`` or ``margin < 0``; a dataset without a
            single object.
    """

    def __init__(self, dataset, crop_size: int = 32, context: float = 1.3, margin: float = 4.0):
        from torchvision.ops import roi_align

        if crop_size < 8:
            raise ValueError(f"crop_size={crop_size} must be >= 8")
        if context < 1 or margin < 0:
            raise ValueError(f"context={context} must be >= 1 and margin={margin} >= 0")
        self.classes = tuple(getattr(dataset, "classes", ()))
        crops, labels = [], []
        for index in range(len(dataset)):
            image, target = dataset[index]
            boxes = target.boxes.float()  # [G, 4] xyxy
            if len(boxes) == 0:
                continue
            centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # [G, 2]
            side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1) * context + margin  # [G]
            half = side[:, None] / 2
            squares = torch.cat([centre - half, centre + half], dim=1)  # [G, 4]
            cut = roi_align(image[None].float(), [squares], (crop_size, crop_size), 1.0, 2, True)
            crops.append((cut.clamp(0, 1) * 255).round().to(torch.uint8))  # [G, 3, S, S]
            labels.append(target.labels)
        if not crops:
            raise ValueError("ObjectCrops: the dataset has no objects to crop")
        self.crops = torch.cat(crops)  # [N, 3, S, S]
        self.labels = torch.cat(labels)  # [N]
        s = float(crop_size)
        self._box = torch.tensor([[0.0, 0.0, s, s]])
        self._mask = torch.zeros(1, crop_size, crop_size, dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        crop = self.crops[index].float() / 255
        if torch.rand(()) < 0.5:
            crop = crop.flip(-1)
        return crop, Target(self._box, self.labels[index : index + 1], self._mask)


class CropClassifier(nn.Module):
    """``resnet`` + global average pooling + one linear layer: an image classifier.

    The ResNet is the detector's own module (not a copy), so training this trains the detector's
    backbone. Follows the models' protocol (``forward``, ``loss``), so the training loop trains it.

    Args:
        resnet: a :class:`~instseg_edu.models.backbone.ResNet`; its last output feeds the pooling.
        num_classes: classes of the crops.
    """

    def __init__(self, resnet: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.normalize = ImageNormalize()
        self.resnet = resnet
        self.fc = nn.Linear(resnet_out_channels(resnet.cfg)[-1], num_classes)

    def forward(self, images: Tensor) -> Tensor:
        """``float [B, 3, S, S]`` in ``[0, 1]`` → class logits ``float [B, num_classes]``."""
        features = self.resnet(self.normalize(images))[-1]  # [B, C, S / 32, S / 32]
        return self.fc(features.mean(dim=(2, 3)))

    def loss(self, logits: Tensor, batch: Batch) -> dict[str, Tensor]:
        """Cross-entropy with each crop's one label; ``accuracy`` is logged, not trained."""
        labels = torch.cat([t.labels for t in batch.targets])  # [B]
        return {
            "loss_cls": F.cross_entropy(logits, labels),
            "accuracy": (logits.argmax(dim=1) == labels).float().mean().detach(),
        }


@torch.no_grad()
def crop_accuracy(classifier: CropClassifier, crops: ObjectCrops, batch_size: int = 512) -> float:
    """The fraction of ``crops`` that ``classifier`` (in eval mode) names right."""
    classifier.eval()
    device = next(classifier.parameters()).device
    right = 0
    for start in range(0, len(crops), batch_size):
        images = crops.crops[start : start + batch_size].to(device).float() / 255
        labels = crops.labels[start : start + batch_size].to(device)
        right += int((classifier(images).argmax(dim=1) == labels).sum())
    return right / len(crops)


class Pretraining(NamedTuple):
    """What :func:`pretrain_backbone` did.

    Attributes:
        history: the training loop's :class:`~instseg_edu.engine.train.History` (``loss_cls``
            and ``accuracy`` per step).
        num_crops: training crops (objects of the training set).
        accuracy: fraction of the validation set's object crops named right after it, or
            ``None`` without a validation set.
    """

    history: object
    num_crops: int
    accuracy: float | None

    def describe(self) -> str:
        """One line: steps, seconds, loss from first to last step, validation accuracy."""
        steps = self.history.steps
        if not steps:
            return f"pretraining: no step on {self.num_crops} object crops"
        seconds = self.history.train_seconds
        line = (f"pretrained the ResNet as a classifier of {self.num_crops} object crops: "
                f"{len(steps)} steps in {seconds:.0f} s, cross-entropy {steps[0]['loss']:.2f} -> "
                f"{steps[-1]['loss']:.2f}")  # fmt: skip
        if self.accuracy is not None:
            line += f", {self.accuracy:.0%} of the validation objects named right"
        return line


def pretrain_backbone(
    model: nn.Module,
    train_set,
    seconds: float,
    val_set=None,
    *,
    device: str = "cpu",
    seed: int = 0,
    callbacks=(),
    progress: bool = False,
    **settings,
):
    """Train ``model.backbone.resnet`` as a classifier of ``train_set``'s object crops.

    The ResNet is trained in place (BatchNorm statistics included) for ``seconds`` of training,
    the learning rate following the clock (a cosine, as the CPU tier's detection training);
    the linear layer is discarded afterwards.

    Args:
        model: any of the four families (it has ``backbone.resnet``).
        train_set: the detector's training set (:class:`ObjectCrops` cuts its objects out).
        seconds: the time budget.
        val_set: when given, the accuracy on its objects' crops is measured at the end.
        device, seed, callbacks, progress: as in
            :class:`~instseg_edu.engine.train.TrainConfig` / :func:`~instseg_edu.engine.train.train`
            (``widgets.TrainingDashboard(thumbnails_every=0)`` shows ``loss_cls`` falling; its
            prediction thumbnails are a detector's).
        **settings: overrides of :data:`PRETRAIN_DEFAULTS`.

    Returns:
        A :class:`Pretraining`.

    Raises:
        ValueError: ``seconds`` not positive, an unknown setting.
    """
    from instseg_edu.engine.train import TrainConfig, make_loader, train

    if not seconds > 0:
        raise ValueError(f"seconds={seconds!r} must be > 0")
    unknown = sorted(set(settings) - set(PRETRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"pretrain_backbone: unknown settings {unknown}")
    s = {**PRETRAIN_DEFAULTS, **settings}
    crops = ObjectCrops(train_set, s["crop_size"], s["context"], s["margin"])
    classifier = CropClassifier(model.backbone.resnet, len(crops.classes))
    crops_collate = functools.partial(collate, size_divisor=1)  # 48 px crops stay 48 px
    loader = make_loader(crops, min(s["batch_size"], len(crops)), shuffle=True, seed=seed,
                         drop_last=True, collate_fn=crops_collate)  # fmt: skip
    cfg = TrainConfig(
        # The clock ends it; the steps are only a bound no CPU reaches (a step of 128 crops
        # takes about 0.1 s on two cores).
        max_steps=max(1, math.ceil(seconds * 100)),
        max_seconds=seconds,
        lr=s["lr"],
        optimizer="adamw",
        weight_decay=s["weight_decay"],
        warmup_steps=s["warmup_steps"],
        schedule="cosine",
        grad_clip=s["grad_clip"],
        seed=seed,
        device=device,
        progress=progress,
    )
    was_training = model.training
    history = train(classifier, loader, cfg, callbacks=callbacks)
    accuracy = None
    if val_set is not None:
        val_crops = ObjectCrops(val_set, s["crop_size"], s["context"], s["margin"])
        accuracy = crop_accuracy(classifier, val_crops)
    model.train(was_training)  # train() leaves its model, the ResNet here, in eval mode
    return Pretraining(history, len(crops), accuracy)
