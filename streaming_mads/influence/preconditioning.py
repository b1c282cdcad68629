"""Influence under Adam: the reference gradient seen through the optimizer's preconditioner.

The first-order influence ``⟨∇ℓ(x), ∇L_R⟩`` (:mod:`streaming_mads.influence`) is the change in the
reference loss after an SGD step on ``x``. The model trains with Adam, whose step on ``x`` is
about ``-lr · P ∇ℓ(x)`` with the diagonal ``P = 1 / (sqrt(v̂) + ε)`` (``v̂`` the bias-corrected
second moment), so the change it causes is ``-lr · ⟨P ∇ℓ(x), ∇L_R⟩ = -lr · ⟨∇ℓ(x), P ∇L_R⟩``:
the same one-pass influence with the reference gradient multiplied by ``P`` once per update
(so it costs what ``reward: inner`` costs). It matters because the raw inner
product is dominated by the coordinates whose gradients are large and frequent (common tokens'
embeddings, for garbled text as much as for good text), which Adam moves least per unit of
gradient; ``P`` weighs each coordinate by how far Adam actually moves it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from streaming_mads.influence.base import InfluenceError, ReferenceGradient

__all__ = ['check_adam', 'adam_preconditioned']


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2 keeps optimizer state sharded); a tensor as it is."""
    return t.full_tensor() if hasattr(t, 'full_tensor') else t


def check_adam(optimizer: Any) -> None:
    """Refuse anything but an Adam-family optimizer (param groups with ``betas`` and ``eps``).

    The console calls it at ``FIT_START`` too, so a run with ``reward: adam`` and another
    optimizer fails before its first batch rather than at its first update.

    Raises:
        InfluenceError: No optimizer, or one whose param groups lack ``betas`` or ``eps``.
    """
    if optimizer is None:
        raise InfluenceError('reward: adam needs the trainer\'s optimizer (an Adam-family one); '
                             'the trainer has none: give it one, or use reward: inner.')
    if not optimizer.param_groups or \
            any('betas' not in g or 'eps' not in g for g in optimizer.param_groups):
        raise InfluenceError(f'reward: adam needs an Adam-family optimizer (param groups with '
                             f'betas and eps); {type(optimizer).__name__} has none: use '
                             'reward: inner.')


def adam_preconditioned(grad: ReferenceGradient, optimizer: Any) -> ReferenceGradient:
    """``P · ∇L_R`` per parameter, ``P = 1 / (sqrt(v / (1 - β₂^t)) + ε)`` from Adam's state.

    A parameter the optimizer holds no second moment for (frozen, not among its parameters, or
    not stepped yet) counts zero, as Adam does not move it.

    Args:
        grad (ReferenceGradient): Reference gradient of every covered parameter.
        optimizer (torch.optim.Optimizer): The trainer's Adam/AdamW-family optimizer (state keys
            ``exp_avg_sq`` and ``step``, group keys ``betas`` and ``eps``).

    Raises:
        InfluenceError: Not an Adam-family optimizer (:func:`check_adam`), no Adam second moment
            for any parameter, or one in another shape than the gradient (FSDP1's flattened
            parameters).
    """
    check_adam(optimizer)
    groups = {p: g for g in optimizer.param_groups for p in g['params']}
    out: ReferenceGradient = OrderedDict()
    stepped = 0
    for param, g in grad.items():
        state = optimizer.state.get(param, {})
        if 'exp_avg_sq' not in state or float(state.get('step', 0)) <= 0:
            out[param] = torch.zeros_like(g)
            continue
        group = groups[param]
        v = _full(state['exp_avg_sq']).to(g.device, g.dtype)
        if v.shape != g.shape:
            raise InfluenceError(f'reward: adam needs Adam\'s second moment in each parameter\'s '
                                 f'shape, got {tuple(v.shape)} for a {tuple(g.shape)} parameter '
                                 '(FSDP1 flattens them: use FSDP2 or reward: inner).')
        v_hat = v / (1.0 - group['betas'][1]**float(state['step']))
        out[param] = g / (v_hat.sqrt() + group['eps'])
        stepped += 1
    if not stepped and grad:
        raise InfluenceError('reward: adam found no Adam second moment for any covered '
                             'parameter: is the optimizer the one training this model?')
    return out
