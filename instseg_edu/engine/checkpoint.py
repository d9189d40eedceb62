"""Checkpoints that are safe to write and safe to read.

- Writing is atomic: the state goes to a temporary file in the destination's folder, is flushed to
  disk, then ``os.replace`` renames it over the old file. A crash or Ctrl-C mid-write leaves the
  previous checkpoint intact, never half a file.
- Reading uses ``torch.load(..., weights_only=True)``, which refuses to unpickle arbitrary Python
  objects (a checkpoint from the internet cannot run code). So a checkpoint holds only tensors and
  plain containers of numbers and strings: configs are stored as dicts
  (:func:`dataclasses.asdict`) and rebuilt with :func:`config_from_dict`.
- A checkpoint of a model (``last.pt`` of ``instseg-edu train`` / ``demo``, or what a notebook
  saved with :func:`~instseg_edu.recipes.save_notebook_model`) names its family and config in
  ``meta``, so :func:`load_model` rebuilds the model without being told which one it was::

      model, meta = load_model("runs/demo/last.pt")
      meta["classes"]  # the class names, label k is meta["label_to_cat_id"][k] in COCO ids
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import pickle
import tempfile
import types
import typing
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, or holds unsafe objects)."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder + ``os.replace``).

    ``state`` should contain only tensors, numbers, strings, ``None`` and lists/tuples/dicts of
    those, so that :func:`load_checkpoint` can read it with ``weights_only=True``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a readable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{str(path)!r} is not a readable checkpoint: {msg}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(state).__name__}, expected a dict")
    return state


def model_from_checkpoint(ckpt: dict, source: str = "the checkpoint") -> torch.nn.Module:
    """Rebuild the model a loaded checkpoint describes and load its weights.

    ``ckpt["meta"]["model"]`` names the family (a key of
    :data:`instseg_edu.models.BUILDERS`) and ``ckpt["meta"]["model_config"]`` holds its config as
    plain data (:func:`config_to_dict`), so a later change of a preset cannot change the model.

    Args:
        ckpt: a dict from :func:`load_checkpoint`, with ``"model"`` (the state dict) and ``"meta"``.
        source: how to name the checkpoint in an error (e.g. its path).

    Returns:
        The model in eval mode, on the device its weights were loaded to.

    Raises:
        CheckpointError: ``meta`` does not describe a model, its config does not rebuild (e.g. a
            key from a newer version), or the weights do not fit the rebuilt model.
    """
    from instseg_edu.models import BUILDERS, build_model

    meta = ckpt.get("meta") or {}
    family = meta.get("model")
    if family not in BUILDERS or "model_config" not in meta or "model" not in ckpt:
        raise CheckpointError(
            f"{source} has no model description (meta.model / meta.model_config); was it "
            "written by `instseg-edu train`, `demo` or a notebook?"
        )
    module_name, _, config_name = BUILDERS[family]
    config_cls = getattr(importlib.import_module(module_name), config_name)
    try:
        cfg = config_from_dict(config_cls, meta["model_config"])
        model = build_model(family, cfg)
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{source}: cannot rebuild its {family} model ({first})") from e
    return model.eval()


def load_model(path: str | os.PathLike, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Read a model checkpoint and rebuild its model: :func:`load_checkpoint`, then
    :func:`model_from_checkpoint`.

    Args:
        path: a ``last.pt`` written by ``instseg-edu train`` or ``demo``, or a notebook's
            ``runs/notebooks/<tier>/<family>.pt``.
        device: where the model goes (a ``torch.device`` or its name).

    Returns:
        ``(model, meta)``: the model on ``device`` in eval mode, and the checkpoint's ``meta``
        (``model``, ``preset``, ``model_config``, ``classes``, ``label_to_cat_id``,
        ``image_size``; the CLI also stores the validation files and the recipe).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a readable checkpoint or describes no model.
    """
    ckpt = load_checkpoint(path, map_location="cpu")
    model = model_from_checkpoint(ckpt, source=str(path))
    return model.to(device), dict(ckpt.get("meta") or {})


def load_backbone(
    model: torch.nn.Module, path: str | os.PathLike, freeze: bool = False
) -> list[str]:
    """Start ``model``'s backbone from another trained model's: transfer learning.

    Detectors are almost never trained from random weights: the papers start their ResNet from
    ImageNet classification weights (:attr:`~instseg_edu.models.backbone.ResNetConfig.pretrained`)
    and learn only the heads from scratch. Without a download, the nearest thing is a backbone
    another model has already trained, e.g. the Mask R-CNN of notebook 06 for SOLO and YOLACT
    (notebooks 07 and 08 in their cpu tier).

    What is copied: the whole ResNet (``backbone.resnet.*``, BatchNorm statistics included), which
    must be the same network on both sides; and the FPN (``backbone.fpn.*``) only when all of its
    tensors have the same names and shapes on both sides, that is the same neck (Mask R-CNN's
    P2–P6 FPN into SOLO's). A neck built over other levels (YOLACT's P3–P7) keeps its own random
    weights: a conv that smooths P2 in one model would smooth P3 in the other. The heads are
    never touched.

    ``freeze=True`` keeps what was loaded as it is (:meth:`BackboneWithFPN.freeze
    <instseg_edu.models.backbone.BackboneWithFPN.freeze>`: the ResNet with its BatchNorm
    statistics, and the FPN when it was loaded): only the heads learn, and a training step skips
    the backbone's backward pass. SOLO's CPU recipe trains so from notebook 06's backbone
    (:attr:`~instseg_edu.recipes.Recipe.freeze_backbone`): about 1.7 times the steps in the same
    minutes, and more AP than fine-tuning everything (``benchmarks/RESULTS.md``, nineteenth
    round). A ResNet under a new FPN (YOLACT's) must still learn to feed it: it lost 0.1 mask
    AP50 frozen.

    Args:
        model: a model with a ``backbone`` (:class:`~instseg_edu.models.backbone.BackboneWithFPN`).
        path: a checkpoint of :func:`save_checkpoint` holding ``"model"`` (``instseg-edu train`` /
            ``demo``'s ``last.pt``, a notebook's ``runs/notebooks/<tier>/<family>.pt``).
        freeze: freeze the loaded parts after loading them.

    Returns:
        The names of the tensors loaded (``backbone.resnet.*``, then ``backbone.fpn.*`` if any).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a readable checkpoint, holds no ``"model"``, or its ResNet
            is not the same network as ``model``'s (naming the first tensor that differs).
    """
    ckpt = load_checkpoint(path)
    theirs = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(theirs, dict):
        raise CheckpointError(f"{str(path)!r} holds no model weights (no 'model' entry)")
    own = model.state_dict()
    differ = _first_difference(own, theirs, "backbone.resnet.")
    if differ is not None:
        found = tuple(theirs[differ].shape) if differ in theirs else "nothing"
        wanted = tuple(own[differ].shape) if differ in own else "nothing"
        raise CheckpointError(
            f"{str(path)!r}: its ResNet is not this model's ({differ}: {found} in the "
            f"checkpoint, {wanted} here); use a checkpoint with the same backbone config"
        )
    parts = ["backbone.resnet."]
    if _first_difference(own, theirs, "backbone.fpn.") is None:  # the same neck
        parts.append("backbone.fpn.")
    loaded = [k for part in parts for k in own if k.startswith(part)]
    model.load_state_dict({k: theirs[k] for k in loaded}, strict=False)
    if freeze:
        model.backbone.freeze(fpn="backbone.fpn." in parts)
    return loaded


def _first_difference(own: dict, theirs: dict, prefix: str) -> str | None:
    """The first tensor under ``prefix`` that only one state dict has or whose shapes differ."""
    for k in own:
        if k.startswith(prefix) and (k not in theirs or theirs[k].shape != own[k].shape):
            return k
    return next((k for k in theirs if k.startswith(prefix) and k not in own), None)


def describe_backbone_load(loaded: list[str], path: str | os.PathLike, frozen: bool = False) -> str:
    """One line on what :func:`load_backbone` returned ``loaded`` from ``path``: ResNet and FPN
    tensors counted, whether they stay ``frozen``, and what still starts from random weights."""
    fpn = sum(name.startswith("backbone.fpn.") for name in loaded)
    parts = f"ResNet ({len(loaded) - fpn} tensors)" + (f" and FPN ({fpn})" if fpn else "")
    rest = "the heads start" if fpn else "the FPN (built over other levels) and the heads start"
    kept = ", frozen (only the heads learn)" if frozen else ""
    return f"backbone: {parts} from {path}{kept}; {rest} from random weights"


def config_to_dict(cfg) -> dict:
    """A (nested) dataclass config → plain dict; tuples become lists so it is also JSON-ready."""
    return _lists(dataclasses.asdict(cfg))


def _lists(obj):
    if isinstance(obj, dict):
        return {k: _lists(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_lists(v) for v in obj]
    return obj


def config_from_dict(cls, d: dict):
    """Rebuild a (nested, frozen) dataclass config from :func:`config_to_dict`'s output.

    Fields that are dataclasses are rebuilt recursively; lists become tuples where the field is
    annotated as a tuple (also nested, e.g. ``tuple[tuple[int, int], ...]``); missing keys take the
    field's default. A key that a config class lists in its ``former_fields`` (old key → new key,
    dotted for a key that moved into a nested config) is read under its new name, so checkpoints
    written before a rename still load. An unknown key raises ``ValueError`` naming it, so a
    checkpoint from a newer version fails loudly instead of silently dropping a setting.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__}: expected a dict, got {type(d).__name__}")
    d = _renamed(cls, d)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    kwargs = {name: _convert(hints.get(name, typing.Any), value) for name, value in d.items()}
    return cls(**kwargs)


def _renamed(cls, d: dict) -> dict:
    """``d`` with the keys of ``cls.former_fields`` moved to their new (possibly nested) place."""
    former = getattr(cls, "former_fields", {})
    if not any(old in d for old in former):
        return d
    d = dict(d)
    for old, new in former.items():
        if old not in d:
            continue
        value = d.pop(old)
        *parents, last = new.split(".")
        place = d
        for name in parents:  # copies: the caller's dicts stay as they were
            place[name] = dict(place.get(name) or {})
            place = place[name]
        if last in place:
            raise ValueError(f"{cls.__name__}: both {old!r} and its new name {new!r} are given")
        place[last] = value
    return d


def _convert(tp, value):
    """Coerce a JSON-ish ``value`` to the annotated type ``tp`` (dataclasses, tuples, Optionals)."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return config_from_dict(tp, value)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        # Try the non-None members in order: a dict goes to a dataclass member, a list to a tuple.
        for arg in args:
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return config_from_dict(arg, value)
            if typing.get_origin(arg) in (tuple, list) and isinstance(value, (list, tuple)):
                return _convert(arg, value)
            if arg is tuple and isinstance(value, (list, tuple)):
                return tuple(value)
        return value
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            return value
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_convert(a, v) for a, v in zip(args, value))
        return tuple(value)
    if origin is list and isinstance(value, (list, tuple)):
        return [_convert(args[0], v) for v in value] if args else list(value)
    return value
