"""The live model's state around an influence pass, and what FSDP changes about it.

The passes run on the model the trainer is training, so they must leave it exactly as they found
it (train flags, ``.grad``, RNG) and see through FSDP (full shapes, FSDP1's gradient handling).
See docs/architecture.md ("Ghost influence", side effects; "The influence pass at scale").
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List

import torch
from torch import nn

from streaming_mads.influence.base import InfluenceError


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP (``FullyShardedDataParallel`` or ``fully_shard``) wraps part of ``model``."""
    return any(cls.__name__ in ('FullyShardedDataParallel', 'FSDPModule')
               for module in model.modules() for cls in type(module).__mro__)


def _fsdp1_handles(model: nn.Module) -> List[Any]:
    """The flat-parameter handles of every ``FullyShardedDataParallel`` unit in ``model``."""
    handles = []
    for module in model.modules():
        if type(module).__name__ == 'FullyShardedDataParallel':
            handle = getattr(module, '_handle', None)
            if handle is not None:
                handles.append(handle)
    return handles


def full_shapes(model: nn.Module) -> Dict[nn.Parameter, torch.Size]:
    """Unsharded shapes of FSDP1's original parameters (FSDP2's DTensors report theirs)."""
    shapes: Dict[nn.Parameter, torch.Size] = {}
    for handle in _fsdp1_handles(model):
        flat = handle.flat_param
        for param, shape in zip(getattr(flat, '_params', None) or [], flat._shapes):
            shapes[param] = shape
    return shapes


@contextlib.contextmanager
def influence_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on, RNG forked; train flags and ``.grad`` references restored on exit.

    ``.grad`` is never written here, but FSDP1 moves a unit's sharded gradient aside before its
    backward and only puts it back when its own post-backward hook ran, which a backward to
    activations does not trigger; restoring the references (no copy) keeps every gradient as it was.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters()) + [h.flat_param for h in _fsdp1_handles(model)]
    grads = [(p, p.grad) for p in params]
    devices: List[int] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == 'cuda'})
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
        for param, grad in grads:
            if param.grad is not grad:
                param.grad = grad
        for handle in _fsdp1_handles(model):
            if hasattr(handle.flat_param, '_saved_grad_shard'):
                delattr(handle.flat_param, '_saved_grad_shard')


def check_supported(model: nn.Module) -> None:
    """Refuse wrappers and modules the passes cannot run on without changing the model."""
    for module in model.modules():
        if type(module).__name__ == 'FullyShardedDataParallel' and \
                not getattr(module, '_use_orig_params', True):
            raise InfluenceError('FSDP with use_orig_params=False hides the original parameters; set '
                                 'fsdp_config.use_orig_params: true (Composer\'s default).')
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise InfluenceError('nn.Embedding(max_norm=...) rewrites its weight during the forward; '
                                 'ghost influence would change the parameters, so it is refused.')
