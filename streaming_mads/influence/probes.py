"""Per-sample influence of probe samples: ``<grad loss_i, G>`` for a whole batch in one pass.

The probe side of the console's update: given the reference gradient, every probe's influence
comes from one forward/backward per micro-batch, through the ghost dot products, optionally with
the gradient norms the cosine reward needs. See docs/architecture.md ("Ghost influence").
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

from streaming_mads.influence.base import (Call, InfluenceError, PerSampleLoss, ReferenceGradient,
                                           covered_modules, owners, select_params, unwrap_ddp)
from streaming_mads.influence.batches import leading_dim, lockstep, split
from streaming_mads.influence.ghost import add_sq_norms, ghost_dot, sample_grads
from streaming_mads.influence.losses import causal_lm_per_sample_loss
from streaming_mads.influence.passes import pass_options, run_pass
from streaming_mads.influence.reference import reference_gradient
from streaming_mads.influence.state import check_supported, full_shapes, influence_mode, is_sharded


def _check_reference_grad(model: nn.Module, reference_grad: ReferenceGradient) -> List[nn.Parameter]:
    if not reference_grad:
        raise InfluenceError('reference_grad is empty.')
    params = list(reference_grad)
    select_params(model, params)  # Raises for parameters that are not covered.
    shapes = full_shapes(model)
    for param, grad in reference_grad.items():
        shape = tuple(shapes.get(param, param.shape))
        if tuple(grad.shape) != shape:
            raise InfluenceError(f'reference_grad has shape {tuple(grad.shape)} for a parameter of '
                                 f'shape {shape}.')
    return params


def per_sample_influence(model: nn.Module,
                         probe_batch: Any,
                         reference_grad: ReferenceGradient,
                         loss_fn: PerSampleLoss = causal_lm_per_sample_loss,
                         *,
                         verify: bool = False,
                         micro_batch: Optional[int] = None,
                         autocast_dtype: Optional[torch.dtype] = None,
                         checkpoint: bool = False,
                         return_norms: bool = False) -> Any:
    """``<grad loss_i, reference_grad>`` for every probe sample, one forward/backward per micro-batch.

    The parameter set is the keys of ``reference_grad`` (from :func:`reference_gradient`). Returns a
    1-D CPU tensor (float64 for a float64 model or reference gradient, float32 otherwise; empty
    for ``probe_batch=None``). ``micro_batch``, ``autocast_dtype`` and ``checkpoint`` are as in
    :func:`reference_gradient`. Under FSDP this is collective (its forwards gather parameters):
    every rank calls it, a rank without probes with ``probe_batch=None``.

    With ``verify=True`` the summed parameter gradient is also computed (about one extra backward's
    worth of matrix products) and ``sum_i I_i`` is checked against ``<sum_i grad loss_i, G>``; a
    mismatch means a covered parameter is also used outside its module (e.g. functionally) and
    raises :class:`InfluenceError`. Not available under FSDP.

    With ``return_norms=True`` it returns ``(influence, norms)``, ``norms[i] = |grad loss_i|`` over
    the same parameters (for the cosine reward), from per-sample gradients materialised one
    call at a time in the same backward (about one more backward's matrix products).
    """
    net = unwrap_ddp(model)
    check_supported(net)
    params = _check_reference_grad(net, reference_grad)
    targets = covered_modules(net, params)
    options = pass_options(micro_batch, autocast_dtype, checkpoint)
    sharded = is_sharded(net)
    if verify and sharded:
        raise InfluenceError('verify=True needs parameter gradients, which FSDP shards; verify on '
                             'an unsharded copy of the model.')
    acc_dtype = torch.float32
    for g in reference_grad.values():
        acc_dtype = torch.promote_types(acc_dtype, g.dtype)
    device = next((p.device for p in net.parameters()), torch.device('cpu'))
    chunks = split(probe_batch, options.micro_batch) if probe_batch is not None else []
    padded = lockstep(chunks, device) if sharded else chunks
    parts: List[Tensor] = []
    norm_parts: List[Tensor] = []
    # Summed over a pass before squaring: tied weights, and every embedding (llm-foundry's shared
    # embedding is one module called twice, as input and output layer).
    shared = {p for p, uses in owners(net).items()
              if len(uses) > 1 or any(isinstance(m, nn.Embedding) for m, _ in uses)} \
        if return_norms else set()
    with influence_mode(net):
        for k, chunk in enumerate(padded):
            own = k < len(chunks)
            size = leading_dim(chunk)
            scores: List[Tensor] = []
            sq: List[Tensor] = []
            seen: set = set()
            pending: Dict[nn.Parameter, Tensor] = {}

            def on_pair(call: Call, x: Tensor, dy: Tensor) -> None:
                if own:
                    b = dy.shape[0] if size is None else size
                    score = ghost_dot(call, x, dy, reference_grad, b)
                    scores.append(score.to(device=device, dtype=acc_dtype))
                    if return_norms:
                        if not sq:
                            sq.append(torch.zeros(b, dtype=acc_dtype, device=device))
                        add_sq_norms(sample_grads(call, x, dy, b), reference_grad, shared, seen,
                                     pending, sq[0])

            losses, _, summed = run_pass(net, chunk, loss_fn, targets, on_pair, options,
                                         extra_inputs=params if verify else (),
                                         check_functional=params if k == 0 else ())
            if not own:
                continue
            total = torch.zeros(losses.shape[0], dtype=acc_dtype, device=device)
            for score in scores:
                if score.shape != total.shape:
                    raise InfluenceError(f'The probe batch looks like {size} samples but loss_fn '
                                         f'returned {losses.shape[0]} losses.')
                total += score
            if verify:
                _verify(total, params, summed, reference_grad)
            parts.append(total.detach().cpu())
            if return_norms:
                norms = sq[0] if sq else torch.zeros_like(total)
                for g in pending.values():
                    norms += g.reshape(g.shape[0], -1).pow(2).sum(1).to(norms.dtype)
                norm_parts.append(norms.sqrt().detach().cpu())
    influence = torch.cat(parts) if parts else torch.zeros(0, dtype=acc_dtype)
    if return_norms:
        return influence, torch.cat(norm_parts) if norm_parts else torch.zeros(0, dtype=acc_dtype)
    return influence


def _verify(scores: Tensor, params: Sequence[nn.Parameter], summed: Sequence[Optional[Tensor]],
            reference_grad: ReferenceGradient) -> None:
    dtype = scores.dtype
    expected = scores.new_zeros(())
    for param, grad in zip(params, summed):
        if grad is not None:
            grad = grad.to_dense() if grad.is_sparse else grad
            expected += (grad.to(dtype) * reference_grad[param].to(dtype)).sum().to(expected.device)
    got = scores.sum()
    scale = scores.abs().sum() + expected.abs()
    tolerance = 10 * torch.finfo(dtype).eps**0.5 * float(scale) + torch.finfo(dtype).tiny
    if abs(float(got - expected)) > tolerance:
        raise InfluenceError(f'Ghost influence does not add up: sum of per-sample influences {float(got):.6g} '
                             f'vs summed-gradient influence {float(expected):.6g}. A covered parameter '
                             'is probably also used outside its module; exclude it with params=.')


def compute_influence(model: nn.Module,
                      probe_batch: Any,
                      reference_batch: Any = None,
                      loss_fn: PerSampleLoss = causal_lm_per_sample_loss,
                      params: Optional[Iterable[nn.Parameter]] = None,
                      *,
                      reference_grad: Optional[ReferenceGradient] = None,
                      verify: bool = False,
                      micro_batch: Optional[int] = None,
                      autocast_dtype: Optional[torch.dtype] = None,
                      checkpoint: bool = False,
                      return_norms: bool = False) -> Any:
    """First-order influence of every probe sample on the reference loss: ``Tensor[num_probe]``.

    Computes :func:`reference_gradient` over ``reference_batch`` (unless ``reference_grad`` is
    given, e.g. to reuse one across several probe batches at the same parameters; ``params`` is
    then ignored), then :func:`per_sample_influence` over ``probe_batch``; ``micro_batch``,
    ``autocast_dtype`` and ``checkpoint`` apply to both. ``return_norms``: also the probes'
    gradient norms, as ``(influence, norms)`` (see :func:`per_sample_influence`).
    """
    options: Dict[str, Any] = dict(micro_batch=micro_batch, autocast_dtype=autocast_dtype,
                                   checkpoint=checkpoint)
    if reference_grad is None:
        if reference_batch is None:
            raise InfluenceError('Pass a reference_batch or a precomputed reference_grad.')
        reference_grad = reference_gradient(model, reference_batch, loss_fn, params, **options)
    return per_sample_influence(model, probe_batch, reference_grad, loss_fn, verify=verify,
                                return_norms=return_norms, **options)
