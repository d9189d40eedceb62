"""Training on several GPUs (or CPU processes): ``torchrun`` and DistributedDataParallel.

Data-parallel training runs ``W`` copies of the same program, one per device. ``torchrun`` starts
them and tells each its place through environment variables: ``RANK`` (0..W-1 over all machines),
``LOCAL_RANK`` (its device on this machine), ``WORLD_SIZE`` and where to meet
(``MASTER_ADDR``/``MASTER_PORT``). Each process then

1. joins the *process group* (:func:`init_process_group`: NCCL between GPUs, Gloo between CPU
   processes) and takes device ``cuda:LOCAL_RANK``;
2. reads its own share of every epoch (a ``DistributedSampler``: process ``r`` takes items
   ``r, r + W, r + 2W, ...`` of the epoch's shuffled order, so the ``W`` batches of a step together
   are one *global* batch of ``W x batch_size`` images);
3. computes the loss of its share; ``DistributedDataParallel`` averages the gradients over the
   processes during ``backward``, so every copy applies the same update and stays identical.

For step 3 to equal one process over the global batch, every loss divisor that counts things in the
batch (positives, sampled RoIs, mask pixels) must count the *global* batch:
:func:`instseg_edu.losses.global_avg_factor` does that inside each model's ``loss``.

:func:`instseg_edu.engine.train.train` needs no other change: under an initialised process group
it wraps the model in DDP, logs losses averaged over the processes, and lets only rank 0 draw the
progress bar, call the callbacks and write checkpoints; evaluation predicts on every process and
scores the gathered results once (:func:`instseg_edu.engine.evaluate.evaluate_model`).

Three ways to start it::

    torchrun --standalone --nproc_per_node=4 -m instseg_edu train ...    # command line

    with process_group() as device:          # a script started by torchrun
        train(model, make_loader(dataset, 8), TrainConfig(..., device=str(device)))

    launch(my_module.run, nprocs=2)          # from Python / a notebook (no torchrun)

Source: PyTorch's "Getting started with DistributedDataParallel" and torchvision's detection
references (``references/detection/utils.py`` ``init_distributed_mode``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "all_gather_object",
    "broadcast_buffers",
    "broadcast_object",
    "claim_failure",
    "destroy_process_group",
    "get_rank",
    "get_world_size",
    "init_process_group",
    "is_distributed",
    "is_main_process",
    "launch",
    "launched_by_torchrun",
    "process_group",
]

#: Environment variables ``torchrun`` sets for every process it starts.
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

_FAILURE_KEY = "instseg_edu/failures"
#: Seconds a process whose collective failed (because another one failed) waits for the
#: launcher to stop it, so that the launcher names the process that failed first.
PEER_FAILURE_WAIT = 5.0


def launched_by_torchrun() -> bool:
    """True in a process started by ``torchrun`` (or :func:`launch`): its variables are set."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def is_distributed() -> bool:
    """True when a process group is initialised (``torch.distributed``)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0: the process that prints, draws progress, writes files and calls callbacks."""
    return get_rank() == 0


def init_process_group(device: str = "auto") -> torch.device:
    """Join the process group described by torchrun's environment; return this process's device.

    ``device``: ``"auto"`` (CUDA when present), ``"cuda"`` or ``"cpu"``. On CUDA the process takes
    ``cuda:LOCAL_RANK`` and the NCCL backend; on the CPU, Gloo. Already initialised: only returns
    the device.

    Raises:
        RuntimeError: not started by ``torchrun`` (its variables are missing), or CUDA was asked
            for but ``LOCAL_RANK`` has no GPU on this machine.
    """
    if not launched_by_torchrun():
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        raise RuntimeError(
            f"no torchrun environment ({', '.join(missing)} unset): start the program with "
            "`torchrun --nproc_per_node=N ...` or use instseg_edu.engine.distributed.launch"
        )
    kind = torch.device(device).type if device != "auto" else None
    if kind is None:
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = int(os.environ["LOCAL_RANK"])
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} "
                "GPU(s): start at most that many processes per node (--nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if not is_distributed():
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
    return target


def destroy_process_group():
    """Leave the process group (a no-op without one)."""
    if is_distributed():
        dist.destroy_process_group()


def claim_failure() -> bool:
    """Record that this process failed; True if it is the first of the group to do so.

    Only the first failing process shows its error: the others usually failed *because* of it
    (their collective operation lost its peer), or hit the same error (a bad option fails
    everywhere), so a second copy of the message would only hide the first. Uses the process
    group's key-value store, which ``torchrun`` keeps alive while its processes come and go.
    Without a process group (or if the store is unreachable) every failure is a first one.
    """
    if not is_distributed():
        return True
    try:
        store = dist.distributed_c10d._get_default_store()
        return store.add(_FAILURE_KEY, 1) == 1
    except Exception:  # the store is gone: better a duplicate message than none
        return True


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every process (``obj`` itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0):
    """Give every process rank ``src``'s buffers (BatchNorm running statistics, ...).

    DDP copies rank 0's buffers to the others at the start of each forward, and then each process
    updates its BatchNorm statistics with its own images: after a training step the copies differ.
    Evaluation and the saved checkpoint must see one model, rank 0's. A no-op in one process.
    """
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=src)


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[torch.device]:
    """``with process_group() as device:`` runs the block in torchrun's process group.

    Started by ``torchrun``: joins the group (:func:`init_process_group`) and yields this process's
    device; the group is destroyed when the block ends, whether it succeeded, raised or was
    interrupted (Ctrl-C). Otherwise it yields ``resolve_device(device)`` and does nothing else, so
    the same script runs with and without ``torchrun``.

    Errors: the first process to fail re-raises its exception (one traceback); a process that
    fails afterwards (its peer is gone) stays silent, waits briefly for the launcher to stop it
    (so ``torchrun``'s summary names the process that failed first) and exits with status 1.
    """
    if not launched_by_torchrun():
        from instseg_edu.engine.train import resolve_device

        yield resolve_device(device)
        return
    target = init_process_group(device)
    try:
        yield target
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        if claim_failure():
            raise
        wait_for_launcher()
        raise SystemExit(1) from None
    finally:
        destroy_process_group()


def wait_for_launcher(seconds: float = PEER_FAILURE_WAIT):
    """Sleep up to ``seconds``: the launcher, which saw another process fail, stops this one."""
    logger.debug("rank %d: another process failed first; waiting to be stopped", get_rank())
    time.sleep(seconds)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launched(local_rank: int, fn, args, nprocs: int, port: int, device: str, result_file):
    os.environ.update({
        "RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(nprocs),
        "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })  # fmt: skip
    with process_group(device) as target:
        result = fn(target, *args)
        if local_rank == 0:
            with open(result_file, "wb") as f:
                pickle.dump(result, f)


def launch(fn: Callable, *args, nprocs: int = 2, device: str = "auto"):
    """Run ``fn(device, *args)`` in ``nprocs`` new processes on this machine, as ``torchrun
    --standalone --nproc_per_node=nprocs`` would, and return what rank 0's call returned.

    Each process joins the process group (:func:`process_group`) before calling ``fn``, so
    :func:`~instseg_edu.engine.train.train` inside it trains with DDP; ``device`` is the process's
    own (``cuda:rank`` or the CPU). ``fn`` and ``args`` are sent to fresh processes
    (``torch.multiprocessing`` with ``spawn``), so ``fn`` must be importable — a function of a
    ``.py`` module, not one defined in a notebook cell — and its return value picklable (a
    :class:`~instseg_edu.engine.train.History` is).

    Raises:
        torch.multiprocessing.ProcessRaisedException: a process raised; the message holds its
            traceback. The other processes are stopped.
    """
    import tempfile

    import torch.multiprocessing as mp

    if nprocs < 1:
        raise ValueError(f"nprocs={nprocs} must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.pkl")
        spawn_args = (fn, args, nprocs, _free_port(), device, result_file)
        mp.spawn(_launched, args=spawn_args, nprocs=nprocs)
        with open(result_file, "rb") as f:
            return pickle.load(f)
