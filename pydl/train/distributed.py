"""Data parallelism under ``torchrun``: process group from the environment, DDP, sharded data.

One process (plain ``python -m pydl.train``) and N processes (``torchrun --nproc-per-node N -m
pydl.train``, or ``--nnodes``/``--rdzv-endpoint`` across machines) run the same code: torchrun
sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, and
``init_process_group`` reads them (``env://``). The backend is NCCL on CUDA, gloo on CPU.

``--batch-size`` is the global batch: each of the W processes takes ``batch_size / W`` samples.
Shuffling uses ``DistributedSampler`` (one permutation per (seed, epoch), rank r takes every
W-th index), so with equal per-rank batches the W ranks together see exactly the global batches
a single process would see. Evaluation shards the split without padding and all-reduces sums,
so validation/test numbers are exact at every W. Rank 0 alone logs, plots and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str, backend: str | None = None) -> tuple[DistInfo, torch.device]:
    """Initialise the process group when launched by torchrun; returns (info, this rank's device).

    ``device`` is "cpu", "cuda" or "cuda:N" (already resolved from "auto"); under torchrun a CUDA
    process takes the GPU of its ``LOCAL_RANK``.
    """
    world = env_world_size()
    if world == 1 and "RANK" not in os.environ:
        return DistInfo(), torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        kw = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kw)
    return DistInfo(rank, local_rank, dist.get_world_size(), backend), dev


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel over the process group (parameters broadcast from rank 0)."""
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "require_backward_grad_sync") else model


class _Sized:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def steps_per_epoch(n: int, global_batch: int, limit: int | None = None) -> int:
    """Optimizer steps in one epoch: full global batches only (the same at every world size)."""
    steps = n // global_batch
    return min(steps, limit) if limit else steps


def train_batches(n: int, global_batch: int, info: DistInfo, *, seed: int, epoch: int,
                  limit: int | None = None) -> list[torch.Tensor]:
    """This rank's index batches (``global_batch / W`` each) for one training epoch: the
    permutation of ``DistributedSampler`` for (seed, epoch), rank r taking every W-th index, so
    that the ranks' batches of step k together are the single-process global batch k."""
    per_rank = global_batch // info.world_size
    sampler = DistributedSampler(_Sized(n), num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    idx = torch.tensor(list(sampler), dtype=torch.long)
    steps = steps_per_epoch(n, global_batch, limit)
    return list(idx[: steps * per_rank].split(per_rank))


def eval_batches(n: int, batch_size: int, info: DistInfo, limit: int | None = None) -> list[torch.Tensor]:
    """This rank's share of an evaluation split, without padding (rank r: r, r + W, ...)."""
    idx = torch.arange(info.rank, n, info.world_size)
    if limit:
        idx = idx[: limit * batch_size]
    return list(idx.split(batch_size)) if len(idx) else []


def all_reduce_sum(values: list[float], device: torch.device, info: DistInfo) -> list[float]:
    """Sums of float64 accumulators across ranks (identity in one process)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's ``obj`` (on every rank); ``[obj]`` in one process."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
