"""The types every influence module shares, and which parameters ghost influence covers.

A parameter is covered when every module that registers it has a ghost rule (``nn.Linear``,
``nn.Embedding``, ``nn.LayerNorm``, transformers' ``Conv1D``); the reference gradient and the
influence both use exactly that set. See docs/architecture.md ("Ghost influence") for the rules.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

PerSampleLoss = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> Tensor[num_samples]``: one differentiable loss per sample."""

ReferenceGradient = Dict[nn.Parameter, Tensor]
"""Covered parameter -> gradient of the reference loss (detached, same shape as the parameter)."""

LINEAR = 'linear'
CONV1D = 'conv1d'
EMBEDDING = 'embedding'
LAYER_NORM = 'layer_norm'


class InfluenceError(ValueError):
    """The model, batch or loss cannot be scored by ghost influence."""


@dataclass(frozen=True)
class Target:
    """A covered module: its ghost rule and the covered parameters it registers."""
    kind: str
    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]


@dataclass
class Call:
    """One forward call of a covered module, waiting for its input and its output gradient."""
    module: nn.Module
    target: Target
    input: Optional[Tensor] = None  # None until a checkpointed block is recomputed.
    grad: Optional[Tensor] = None


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel so that neither its forward nor its reducer hooks run."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, parallel):
        model = model.module
    return model


def acc_dtype(param: Tensor) -> torch.dtype:
    """The dtype sums over ``param``'s gradient are taken in: fp32, or the parameter's if wider."""
    return torch.promote_types(param.dtype, torch.float32)


def module_kind(module: nn.Module) -> Optional[str]:
    """Ghost rule of ``module``, or ``None`` if its parameters cannot be covered."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None  # nn.MultiheadAttention.out_proj: its weight is used functionally, never called.
    if isinstance(module, nn.Linear):
        return LINEAR
    if isinstance(module, nn.Embedding):
        return None if module.scale_grad_by_freq else EMBEDDING
    if isinstance(module, nn.LayerNorm):
        return LAYER_NORM
    # Matched by name so that transformers is not imported (it is not a dependency).
    if type(module).__name__ == 'Conv1D' and type(module).__module__.startswith('transformers'):
        return CONV1D
    return None


def owners(model: nn.Module) -> 'OrderedDict[nn.Parameter, List[Tuple[nn.Module, str]]]':
    """Every parameter of ``model`` and the ``(module, attribute)`` pairs that register it."""
    found: 'OrderedDict[nn.Parameter, List[Tuple[nn.Module, str]]]' = OrderedDict()
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                found.setdefault(param, []).append((module, name))
    return found


def covered_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of ``model`` that ghost influence covers, in registration order (see module doc)."""
    model = unwrap_ddp(model)
    return [
        param for param, uses in owners(model).items()
        if param.requires_grad and all(module_kind(m) is not None and n in ('weight', 'bias')
                                       for m, n in uses)
    ]


def select_params(model: nn.Module, params: Optional[Iterable[nn.Parameter]]) -> List[nn.Parameter]:
    """``params`` (default: every covered parameter), checked to be covered and not empty."""
    covered = covered_parameters(model)
    if params is None:
        selected = covered
    else:
        allowed = set(covered)
        selected = list(OrderedDict.fromkeys(params))
        bad = [p for p in selected if p not in allowed]
        if bad:
            names = {p: n for n, p in model.named_parameters(remove_duplicate=False)}
            listed = ', '.join(names.get(p, f'<tensor {tuple(p.shape)}>') for p in bad)
            raise InfluenceError(f'Parameters not covered by ghost influence (not in the model, '
                                 f'frozen, or owned by an unsupported module): {listed}.')
    if not selected:
        raise InfluenceError(f'{type(model).__name__} has no parameter covered by ghost influence '
                             '(requires_grad weight/bias of nn.Linear, nn.Embedding, nn.LayerNorm '
                             'or transformers Conv1D).')
    return selected


def covered_modules(model: nn.Module,
                    params: Iterable[nn.Parameter]) -> 'OrderedDict[nn.Module, Target]':
    """Every module that registers one of ``params`` (all covered), with its rule."""
    wanted = set(params)
    out: 'OrderedDict[nn.Module, Target]' = OrderedDict()
    for param, uses in owners(model).items():
        if param in wanted:
            for module, _ in uses:
                if module not in out:
                    kind = module_kind(module)
                    assert kind is not None  # Guaranteed by select_params.
                    weight = module._parameters.get('weight')
                    bias = module._parameters.get('bias')
                    out[module] = Target(kind, weight if weight in wanted else None,
                                         bias if bias in wanted else None)
    return out
