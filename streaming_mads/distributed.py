"""Rank helpers that do nothing without a process group.

One place for ``torch.distributed``: the console, influence and bandit call these whether or not
Composer started a process group, so a single-process run (tests, notebooks, the demo) takes the
same code path with a world of one.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ['is_distributed', 'get_rank', 'get_world_size', 'rank_world', 'broadcast_object',
           'all_gather_object', 'all_reduce', 'all_reduce_many']


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """The number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without a process group."""
    return get_rank(), get_world_size()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (``value`` itself without a process group)."""
    if get_world_size() == 1:
        return value
    box = [value if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (just ``[value]`` without a process group)."""
    world = get_world_size()
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce(tensor: torch.Tensor, op: str = 'sum') -> torch.Tensor:
    """Reduce ``tensor`` in place across ranks (``'sum'`` or ``'max'``); a no-op on one rank."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op={'sum': dist.ReduceOp.SUM, 'max': dist.ReduceOp.MAX}[op])
    return tensor


def all_reduce_many(tensors: Sequence[torch.Tensor], op: str = 'sum') -> None:
    """Reduce every tensor of ``tensors`` in place across ranks, with one collective per (dtype,
    device) on a flat copy; a no-op on one rank. Every rank passes the same shapes in the same order.
    """
    if get_world_size() == 1:
        return
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}  # Insertion-ordered.
    for tensor in tensors:
        buckets.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for bucket in buckets.values():
        flat = all_reduce(torch.cat([t.reshape(-1) for t in bucket]), op)
        offset = 0
        for tensor in bucket:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
