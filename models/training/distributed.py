"""Data-parallel training on ``torch.distributed`` (gloo on CPU, NCCL on GPU), as ``torchrun`` sets it up.

Every rank holds the whole model and graph, starts from the same seed (so from the same weights and
the same shuffling and negatives) and takes a disjoint shard of each mini-batch
(:func:`shard`, ``batch[rank::world]``). Before every optimiser step the gradients are averaged
over the ranks (:func:`average_gradients`); a task scales each rank's batch-mean loss by its
shard's share (:func:`shard_weight`), so the averaged gradient is the gradient of the whole
batch's mean loss -- what one process computes -- and the ranks' weights never drift apart.
Decisions that must agree (validation figures, early stopping, the time budget) are taken on
rank 0 and broadcast (:func:`broadcast`).

What this does and does not buy: the per-pair work of a batch (scores, losses, their backward)
splits across ranks; a graph model's whole-graph propagation runs on every rank, so on CPU its
epoch is not faster, while the batch-bound parts (BPR-MF, a KG step's triples) are. Without
an initialised process group every function here is a no-op for a world of one.

Joining: :func:`process_group` initialises the group from the environment ``torchrun`` sets
(``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...) and is a no-op without it; ``kgrec train --nproc N``
re-executes itself under ``torchrun`` (:mod:`kgrec.models.tracking.standalone`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def device_for(device: torch.device) -> torch.device:
    """A rank's own GPU (``cuda:LOCAL_RANK``) when training on CUDA with several ranks."""
    if device.type == "cuda" and world_size() > 1 and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(batch: Tensor) -> Tensor:
    """This rank's share of a mini-batch's indices."""
    world = world_size()
    return batch if world == 1 else batch[rank() :: world]


def shard_weight(shard_size: int, batch_size: int) -> float:
    """Factor on a shard's batch-mean loss so that the gradients' average over the ranks is the
    gradient of the whole batch's mean loss."""
    return shard_size * world_size() / batch_size


def average_gradients(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """Optimiser step pre-hook: replace every gradient by its mean over the ranks (one flat
    all-reduce). A parameter without a gradient on this rank counts as a zero gradient, so every
    rank reduces buffers of the same layout."""
    world = world_size()
    if world == 1:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world
    for p, averaged in zip(params, _unflatten_dense_tensors(flat, grads)):
        if p.grad is None:
            p.grad = averaged
        else:
            p.grad.copy_(averaged)


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Element-wise sums of a few scalars over the ranks (e.g. an epoch's loss total and count)."""
    if world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return tuple(t.tolist())


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launched_world() -> int:
    """The world size ``torchrun`` announced to this process (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device: str = "auto", timeout_s: float = 1800.0) -> Iterator[None]:
    """Join the process group ``torchrun`` set up (gloo on CPU, NCCL when training on CUDA) for
    the duration of the block; a no-op in a world of one or inside an existing group."""
    if launched_world() <= 1 or dist.is_initialized():
        yield
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
