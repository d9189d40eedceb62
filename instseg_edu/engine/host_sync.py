"""Find the host synchronisations in a piece of PyTorch code — on any device, CPU included.

A GPU runs ahead of Python: ``loss = model.loss(...)`` only *queues* kernels, and the Python loop
moves on to the next batch while they run. Some operations end that: to answer them PyTorch must
wait for the GPU to finish everything queued so far and copy a result back to the host. Each such
**host synchronisation** drains the queue, and a training step with a dozen of them leaves the GPU
idle between kernels. They hide in innocent-looking code:

=============================================  =============================================
code                                           why the host must wait
=============================================  =============================================
``t.item()``, ``float(t)``, ``if t.any():``    the value itself is needed in Python
``t[mask]``, ``t[mask] = v``, ``t.nonzero()``  the result's *size* depends on the data
``torch.where(cond)`` (one argument)           same: it is ``nonzero``
``t.unique()``, ``torch.bincount(t)``          output size depends on the values
``repeat_interleave(counts)``                  same, unless ``output_size=`` is given
``t.tolist()``, ``t.cpu()``, ``t.numpy()``     a copy to the host
``torch.tensor(data, device=...)``             a blocking copy *to* the device
``t[:, [1, 0]]`` (a Python list as an index)   same: the list becomes a tensor, copied over
``torchvision.ops.nms``                        the greedy pass runs on the host
=============================================  =============================================

On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` turns every synchronisation into an error. This
module finds the same operations without a GPU, so the tests that guard the fast paths run on every
machine: :func:`count_host_syncs` watches every operator PyTorch dispatches (a
``TorchDispatchMode``) and records those that would synchronise on a GPU, with the line of
``instseg_edu`` code that called them::

    with count_host_syncs() as syncs:
        losses = model.loss(outputs, batch)
    print(syncs.count, syncs.summary())

Limits (the CUDA debug mode remains the ground truth): it recognises the operators in
:data:`SYNC_OPS` and the Python-level copies listed above. A copy written as ``t.to(device)``
is invisible when ``t`` is already there — on a CPU run that is every ``.to("cpu")`` and
``.to(images.device)``; on a GPU, moving a CPU tensor that way blocks (``non_blocking=True``
from pinned memory does not).
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "HostSyncs", "SyncEvent", "count_host_syncs"]

# Operator packet names (``aten.nonzero``) that synchronise on CUDA every time they run.
SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",  # .item(), float(t), int(t), bool(t), `if t:`
        "aten.nonzero",  # t.nonzero(), torch.where(cond)
        "aten.masked_select",
        "aten._unique",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.unique_dim_consecutive",
        "aten.bincount",
        "aten.equal",
        "torchvision.nms",
    }
)
# Operators that synchronise only for some arguments (see ``_syncs``).
_BOOL_INDEXED = frozenset(
    {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
)
# Python-level methods that copy to the host.
_HOST_COPIES = ("tolist", "cpu", "numpy")
# Python-level constructors that copy Python data to ``device=`` with a blocking copy (on a GPU the
# host waits for the stream); ``torch.full``, ``arange`` or a non-blocking ``.to`` do not.
_DEVICE_COPIES = ("tensor", "as_tensor")
# A tensor made from Python data: torch.tensor and as_tensor make one (and are watched above), and
# so does indexing with a Python list or a NumPy array, ``t[:, [1, 0]]``, whose index is built on
# the host and copied to ``t``'s device (``t.flip(1)`` or an index tensor already there is not).
# A Python scalar written into a tensor, ``t[i] = 0.0``, is lifted too, but as a 0-d tensor made
# on ``t``'s device: no copy.
_FRESH = "aten.lift_fresh"

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


@dataclass(frozen=True)
class SyncEvent:
    """One operation that would synchronise: ``op`` (e.g. ``aten.nonzero``) and ``where`` — the
    innermost ``instseg_edu`` line that led to it (``file.py:123 in function``), or the innermost
    caller outside PyTorch when no library code is involved."""

    op: str
    where: str


@dataclass
class HostSyncs:
    """What :func:`count_host_syncs` saw: ``events`` in order."""

    events: list[SyncEvent] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.events)

    def by_location(self) -> collections.Counter:
        """``Counter`` of ``(op, where)`` pairs."""
        return collections.Counter((e.op, e.where) for e in self.events)

    def summary(self) -> str:
        """One line per distinct ``(op, where)``, most frequent first."""
        if not self.events:
            return "no host synchronisation"
        return "\n".join(
            f"{n:4d} × {op:28s} {where}" for (op, where), n in self.by_location().most_common()
        )


def _packet(func) -> str:
    """``aten.nonzero.default`` → ``aten.nonzero``."""
    schema = func._schema
    ns, name = schema.name.split("::")
    return f"{ns}.{name}"


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
        for t in (indices or ())
        if t is not None
    )


def _syncs(name: str, args, kwargs) -> bool:
    if name in SYNC_OPS:
        return True
    if name == _FRESH:  # outside torch.tensor / as_tensor (those are watched themselves)
        return args[0].dim() > 0  # a 0-d one is a Python scalar, made on the device directly
    if name in _BOOL_INDEXED:  # a boolean mask index is turned into indices with nonzero
        return _has_bool_index(args)
    if name == "aten.repeat_interleave":  # needs the sum of the repeats unless it is given
        return isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None
    if name == "aten.histc":  # bins from the data's own min and max
        lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
        hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return lo == hi
    return False


def _caller() -> str:
    """The innermost frame in instseg_edu (not this module), else the innermost one outside the
    ``torch`` package (torchvision's models included)."""
    frames = traceback.extract_stack()[:-3]  # drop _caller, _record and the dispatch hook
    fallback = None
    for frame in reversed(frames):
        filename = frame.filename
        if filename == __file__:
            continue
        if filename.startswith(_PACKAGE_DIR):
            rel = Path(filename).relative_to(Path(_PACKAGE_DIR).parent)
            return f"{rel.as_posix()}:{frame.lineno} in {frame.name}"
        if fallback is None and "/torch/" not in filename:  # torchvision's models do count
            short = (
                filename.split("/site-packages/")[-1]
                if "/site-packages/" in filename
                else Path(filename).name
            )
            fallback = f"{short}:{frame.lineno} in {frame.name}"
    return fallback or "?"


class _SyncMode(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _packet(func)
        if _syncs(name, args, kwargs):
            self.record(name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[HostSyncs]:
    """Record every operation inside the ``with`` block that would make the host wait for a GPU.

    Works on any device (it looks at which operators run, not at the device). Yields a
    :class:`HostSyncs` that fills in as the block runs. Not thread-safe: it patches
    ``Tensor.tolist/cpu/numpy`` and ``torch.tensor/as_tensor`` for the duration of the block.

    It counts the GPU's code path: CPU-only fast paths, which may read sizes on the host because
    that costs nothing on a CPU (the matrix-product RoIAlign,
    :func:`~instseg_edu.ops.roi.roi_align_matmul`), are switched off inside the block.
    """
    from instseg_edu.ops.roi import kernel_roi_align

    result = HostSyncs()
    depth = 0  # a host copy made inside another recorded op is not counted twice

    def record(op: str) -> None:
        if depth == 0:
            result.events.append(SyncEvent(op, _caller()))

    def wrap(name, original, counts):
        def method(*args, **kwargs):
            nonlocal depth
            if counts(args, kwargs):
                record(name)
            depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth -= 1

        return method

    def always(args, kwargs):
        return True

    def to_a_device(args, kwargs):  # torch.tensor(python_data, device=...)
        return kwargs.get("device") is not None and not isinstance(args[0], torch.Tensor)

    patches = [(torch.Tensor, name, f"Tensor.{name}", always) for name in _HOST_COPIES]
    patches += [(torch, name, f"torch.{name}", to_a_device) for name in _DEVICE_COPIES]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _, _ in patches]
    for (owner, name, label, counts), (_, _, original) in zip(patches, originals):
        setattr(owner, name, wrap(label, original, counts))
    try:
        with kernel_roi_align(), _SyncMode(record):
            yield result
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
