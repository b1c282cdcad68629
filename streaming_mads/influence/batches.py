"""Micro-batches: cutting a batch of any structure, and keeping ranks in step under FSDP.

Both passes run in micro-batches of at most a training step's size. FSDP forwards are collective,
so every rank must run as many of them: :func:`lockstep` pads the ranks that have fewer.
See docs/architecture.md ("The influence pass at scale").
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional

import torch
from torch import Tensor

from streaming_mads.distributed import all_gather_object, all_reduce, get_world_size
from streaming_mads.influence.base import InfluenceError


def leading_dim(batch: Any) -> Optional[int]:
    """Batch size guessed from the first tensor of ``batch`` (``input_ids`` first if present)."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        values = ([batch['input_ids']] if 'input_ids' in batch else []) + list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        return None
    for value in values:
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)((k, _map_tensors(v, fn)) for k, v in batch.items())  # type: ignore[call-arg]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def _to_device(batch: Any, device: torch.device) -> Any:
    return _map_tensors(batch, lambda t: t.to(device))


def split(batch: Any, size: Optional[int]) -> List[Any]:
    """``batch`` cut into micro-batches of at most ``size`` samples along every batch-first tensor."""
    total = leading_dim(batch)
    if size is None or total is None or total <= size:
        return [batch]
    if size < 1:
        raise InfluenceError(f'micro_batch must be >= 1, got {size}.')
    return [
        _map_tensors(batch, lambda t, s=start: t[s:s + size]
                     if t.dim() > 0 and t.shape[0] == total else t)
        for start in range(0, total, size)
    ]


def lockstep(chunks: List[Any], device: torch.device) -> List[Any]:
    """Pad this rank's micro-batches so that every rank runs as many (FSDP forwards are collective).

    A rank with fewer micro-batches repeats its last one; a rank with none runs one sample of the
    first rank that has some. The caller discards the results of the padding passes. Collective:
    every rank calls it (``chunks`` unchanged without a process group).
    """
    if get_world_size() == 1:
        return chunks
    counts = all_reduce(torch.tensor([len(chunks), -len(chunks)], dtype=torch.int64, device=device),
                        op='max')
    most, fewest = int(counts[0]), -int(counts[1])
    if fewest == 0 and most > 0:
        mine = _to_device(split(chunks[0], 1)[0], torch.device('cpu')) if chunks else None
        filler = next(b for b in all_gather_object(mine) if b is not None)
        if not chunks:
            chunks = [_to_device(filler, device)]
    return chunks + chunks[-1:] * (most - len(chunks))
