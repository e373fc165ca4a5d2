"""Scale-out on torch.distributed: one process per device under ``torchrun``, NCCL on GPUs, gloo on CPUs.

- :func:`init_from_env` joins the process group that torchrun describes (``WORLD_SIZE`` > 1);
  every ``fvvae`` stage calls it, so ``torchrun --nproc-per-node N -m fvvae_fast <stage> ...`` runs
  unchanged (multi-node with torchrun's usual rendezvous flags); :func:`shutdown`, run at exit,
  leaves the group.
- Training (:func:`fvvae_fast.train`): DistributedDataParallel over the sets of each global batch.
- Extraction and encoding: shard k of the store belongs to rank k mod world; every rank writes its
  shards and their journals, rank 0 records them in the manifest
  (:class:`fvvae_fast.pipelines.sharded.ShardedStage`).
- Fisher information: :meth:`fvvae_fast.FisherInformation.all_reduce` merges the ranks' estimators.
"""

from __future__ import annotations

import atexit
import datetime
import importlib
import os

import torch
import torch.distributed as dist


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (once); True when running distributed.

    backend: None picks NCCL when CUDA is available, else gloo. On CUDA each process takes the
    device ``LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Imported before the group exists: imported after it (our ops import it on first call), torch
    # 2.14 keeps a reference to the default group that outlives destroy_process_group (see shutdown).
    importlib.import_module("torch._dynamo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    atexit.register(shutdown)
    return dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group and join its threads (no-op outside one); run at exit by :func:`init_from_env`.

    Left to interpreter shutdown, a gloo worker thread that drops the last reference to a tensor
    Python created needs the GIL when no thread may take it any more, and the process aborts
    (SIGABRT) after its work is done: torchrun would report the run failed.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and outside a process group): the process that prints and writes shared files."""
    return rank_world()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if rank_world()[1] > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (on the process group's device) and return it."""
    if rank_world()[1] > 1:
        dev = _comm_device()
        buf = t.to(dev)
        dist.all_reduce(buf)
        t.copy_(buf)
    return t


def total(count: int) -> int:
    """``count`` summed over ranks (itself outside a process group)."""
    return int(all_reduce_sum(torch.tensor([count], dtype=torch.int64))[0])


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype on all ranks), in rank order, on ``t``'s device."""
    if rank_world()[1] == 1:
        return [t]
    dev = _comm_device()
    parts = [torch.empty_like(t, device=dev) for _ in range(rank_world()[1])]
    dist.all_gather(parts, t.to(dev).contiguous())
    return [p.to(t.device) for p in parts]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def my_shards(shards: list[int]) -> list[int]:
    """This rank's share of a store's shards: shard k belongs to rank k mod world (deterministic)."""
    rank, world = rank_world()
    return [s for s in shards if s % world == rank]


def broadcast_object(objects: list) -> None:
    """Rank 0's picklable ``objects`` (a list, replaced in place) on every rank."""
    dist.broadcast_object_list(objects, src=0)
