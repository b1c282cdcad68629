"""The reference gradient ``G = grad L_R``, formed from activations rather than ``.grad``.

Each covered call's weight gradient (``D^T X``, row sums for embeddings, ``D * xhat`` for
LayerNorm) is added to ``G`` as the backward reaches it, so no parameter gradient is asked of
autograd and the pass runs on sharded models; the per-rank sums are added across ranks.
See docs/architecture.md ("Ghost influence"; "The influence pass at scale").
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streaming_mads.distributed import all_reduce, all_reduce_many
from streaming_mads.influence.base import (CONV1D, EMBEDDING, LAYER_NORM, Call, InfluenceError,
                                           PerSampleLoss, ReferenceGradient, acc_dtype, covered_modules,
                                           select_params, unwrap_ddp)
from streaming_mads.influence.batches import lockstep, split
from streaming_mads.influence.losses import causal_lm_per_sample_loss
from streaming_mads.influence.passes import pass_options, run_pass
from streaming_mads.influence.state import check_supported, full_shapes, influence_mode, is_sharded


def _accumulate_gradient(call: Call, x: Tensor, dy: Tensor, acc: Dict[nn.Parameter, Tensor]) -> None:
    """Add this call's weight/bias gradient (summed over its samples) to ``acc``, in fp32 or wider.

    The same products a backward forms for the weight gradient, from the same input and output
    gradient; computing them here needs neither ``.grad`` nor the (possibly sharded) parameter.
    """
    target, module = call.target, call.module

    def add(param: Optional[nn.Parameter], grad: Callable[[torch.dtype], Tensor]) -> None:
        if param is not None:
            value = grad(acc_dtype(param))
            if param in acc:
                acc[param] += value
            else:
                acc[param] = value

    if target.kind == LAYER_NORM:
        shape = tuple(module.normalized_shape)
        add(target.weight, lambda d: (dy.to(d) * F.layer_norm(x.to(d), shape, eps=module.eps))
            .reshape(-1, *shape).sum(0))
        add(target.bias, lambda d: dy.to(d).reshape(-1, *shape).sum(0))
        return
    if target.kind == EMBEDDING and not x.is_floating_point():

        def rows(d: torch.dtype) -> Tensor:
            ids = x.reshape(-1)
            d_rows = dy.to(d).reshape(ids.numel(), -1)
            if module.padding_idx is not None:
                d_rows = d_rows.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
            return torch.zeros(module.num_embeddings, d_rows.shape[1], dtype=d,
                               device=d_rows.device).index_add_(0, ids, d_rows)

        add(target.weight, rows)
        return
    # Linear, Conv1D and an embedding called as the output layer: y = x @ W_io + b.
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    weight_io = (lambda d: x2.to(d).T @ dy2.to(d))  # (in, out)
    add(target.weight, weight_io if target.kind == CONV1D else (lambda d: weight_io(d).T))
    add(target.bias, lambda d: dy2.to(d).sum(0))


def reference_gradient(model: nn.Module,
                       reference_batch: Any,
                       loss_fn: PerSampleLoss = causal_lm_per_sample_loss,
                       params: Optional[Iterable[nn.Parameter]] = None,
                       num_samples: Optional[int] = None,
                       *,
                       micro_batch: Optional[int] = None,
                       autocast_dtype: Optional[torch.dtype] = None,
                       checkpoint: bool = False) -> ReferenceGradient:
    """Gradient of the reference loss (mean of per-sample losses) over the covered parameters.

    ``params`` restricts the set further (default: :func:`covered_parameters`). Runs forward/backward
    passes in eval mode that only take gradients with respect to activations: each covered module's
    weight gradient is formed from its input and output gradient (in fp32 or wider) and summed, so
    ``.grad`` is untouched and a sharded (FSDP) parameter never needs to be gathered beyond what
    its forward and backward gather anyway. Each returned gradient has the parameter's full
    (unsharded) shape and dtype ``promote(param.dtype, float32)``.

    Under an initialised ``torch.distributed`` process group every rank must call this (it is
    collective) with its own share of the reference set, and every rank gets the exact mean over
    *all* reference samples: each rank sums its per-sample gradients, the sums are added across
    ranks and divided by the total count. Shares may differ in size, and a rank with no share
    passes ``reference_batch=None``.

    Args:
        model (nn.Module): The live model (plain, DDP- or FSDP-wrapped).
        reference_batch (Any): This rank's reference batch, or ``None`` for none.
        loss_fn (PerSampleLoss): Per-sample loss adapter.
        params (Iterable[nn.Parameter], optional): Parameters to take the gradient of.
        num_samples (int, optional): Reference samples over all ranks, when known; otherwise
            counted with one extra all-reduce.
        micro_batch (int, optional): Most samples per forward/backward (``None``: all at once).
        autocast_dtype (torch.dtype, optional): Run the forward under ``torch.autocast`` with this
            dtype (e.g. ``torch.bfloat16`` for Composer's ``amp_bf16``); sums stay in fp32.
        checkpoint (bool): Activation checkpointing of the model's blocks during the pass.
    """
    net = unwrap_ddp(model)
    check_supported(net)
    selected = select_params(net, params)
    targets = covered_modules(net, selected)
    options = pass_options(micro_batch, autocast_dtype, checkpoint)
    device = next((p.device for p in net.parameters()), torch.device('cpu'))
    acc: Dict[nn.Parameter, Tensor] = {}
    chunks = split(reference_batch, options.micro_batch) if reference_batch is not None else []
    padded = lockstep(chunks, device) if is_sharded(net) else chunks
    local = 0
    with influence_mode(net):
        for k, chunk in enumerate(padded):
            own = k < len(chunks)
            losses, _, _ = run_pass(net, chunk, loss_fn, targets,
                                    (lambda c, x, dy: _accumulate_gradient(c, x, dy, acc)) if own
                                    else (lambda c, x, dy: None),
                                    options, check_functional=selected if k == 0 else ())
            local += int(losses.shape[0]) if own else 0
    shapes = full_shapes(net)
    out: ReferenceGradient = OrderedDict()
    for param in selected:
        grad = acc.pop(param, None)
        if grad is None:
            grad = torch.zeros(shapes.get(param, param.shape), dtype=acc_dtype(param), device=device)
        out[param] = grad
    if num_samples is None:  # Reference samples over all ranks.
        num_samples = int(all_reduce(torch.tensor([local], dtype=torch.float64, device=device)).item())
    if num_samples < 1:
        raise InfluenceError('The reference set is empty on every rank: give at least one '
                             'reference sample.')
    all_reduce_many(list(out.values()))
    for grad in out.values():
        grad.div_(num_samples)
    return out
