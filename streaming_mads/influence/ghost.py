"""Ghost dot products: ``<per-sample gradient, G>`` from a module call's input and output gradient.

The per-sample gradient of a covered call is never formed for the influence itself: it is
contracted with the reference gradient ``G`` analytically, one rule per module kind. The cosine
reward's gradient norms need the per-sample gradients, materialised one call at a time.
See docs/architecture.md ("Ghost influence") for the formulas.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streaming_mads.influence.base import (CONV1D, EMBEDDING, LAYER_NORM, LINEAR, Call, InfluenceError,
                                           ReferenceGradient)


def _dense_dot(x: Tensor, dy: Tensor, g_io: Tensor) -> Tensor:
    """``sum_n <x[b, n] @ g_io, dy[b, n]>`` per ``b`` for ``x: (B, N, I)``, ``dy: (B, N, O)``."""
    if g_io.shape[0] >= g_io.shape[1]:
        return torch.einsum('bno,bno->b', x @ g_io, dy)  # Intermediate (B, N, O), the smaller.
    return torch.einsum('bni,bni->b', dy @ g_io.T, x)  # Intermediate (B, N, I).


def ghost_dot(call: Call, x: Tensor, dy: Tensor, grads: ReferenceGradient,
              batch_size: int) -> Tensor:
    """``<per-sample gradient of this call's parameters, G>`` for every sample, shape ``(B,)``.

    Computed in fp32 (or the reference gradient's wider dtype) whatever the activations' dtype, so
    under autocast only the activations themselves carry reduced precision.
    """
    module, target = call.module, call.target
    min_dim = 1 if target.kind == EMBEDDING else 2  # Token ids may be (B,); features are (B, ..., D).
    if x.dim() < min_dim or x.shape[0] != batch_size or dy.shape[0] != batch_size:
        raise InfluenceError(f'{type(module).__name__} saw an input of shape {tuple(x.shape)}, whose '
                             f'leading dimension is not the batch of {batch_size} samples: ghost '
                             'influence needs batch-first activations in covered modules.')
    g_weight = grads.get(target.weight) if target.weight is not None else None
    g_bias = grads.get(target.bias) if target.bias is not None else None
    dtype = torch.promote_types(dy.dtype, torch.float32)
    for g in (g_weight, g_bias):
        if g is not None:
            dtype = torch.promote_types(dtype, g.dtype)
    dy = dy.to(dtype)
    score = dy.new_zeros(batch_size)

    if target.kind == EMBEDDING and x.is_floating_point():
        # A tied embedding called as the output layer (e.g. llm-foundry's SharedEmbedding with
        # unembed=True computes x @ W^T): the linear rule with the embedding matrix as W.
        if g_weight is None:
            return score
        x = x.to(dtype).reshape(batch_size, -1, x.shape[-1])
        return _dense_dot(x, dy.reshape(batch_size, -1, dy.shape[-1]), g_weight.to(dtype).T)

    if target.kind == EMBEDDING:
        if g_weight is None:
            return score
        ids = x.reshape(batch_size, -1)
        rows = g_weight.to(dtype)[ids]  # (B, N, D)
        if module.padding_idx is not None:
            rows = rows.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
        return torch.einsum('bnd,bnd->b', rows, dy.reshape(rows.shape))

    if target.kind == LAYER_NORM:
        # Per token the weight gradient is dy * xhat and the bias gradient dy: dot both at once.
        coeff: Any = 0
        if g_weight is not None:
            xhat = F.layer_norm(x.to(dtype), module.normalized_shape, eps=module.eps)
            coeff = xhat * g_weight.to(dtype)
        if g_bias is not None:
            coeff = coeff + g_bias.to(dtype)
        return (dy * coeff).reshape(batch_size, -1).sum(1)

    # Linear (weight: out x in) and Conv1D (weight: in x out): y = x @ W_io + b.
    x = x.to(dtype).reshape(batch_size, -1, x.shape[-1])
    dy = dy.reshape(batch_size, -1, dy.shape[-1])
    if g_weight is not None:
        g_io = g_weight.to(dtype)
        score = score + _dense_dot(x, dy, g_io.T if target.kind == LINEAR else g_io)
    if g_bias is not None:
        score = score + dy.sum(1) @ g_bias.to(dtype)
    return score


def sample_grads(call: Call, x: Tensor, dy: Tensor,
                 batch_size: int) -> List[Tuple[nn.Parameter, Tensor]]:
    """This call's share of every sample's parameter gradient: ``(parameter, Tensor[B, ...])``.

    Materialised (``B`` copies of the parameter's shape, one micro-batch at a time) for the
    gradient norms of the cosine reward; the dot products never need it. Integer-id embeddings
    give ``B x num_embeddings x D``: a cost only for an embedding shared with another module
    (a tied output layer), whose norm needs the two uses summed; see :func:`add_sq_norms`.
    """
    module, target = call.module, call.target
    dtype = torch.promote_types(dy.dtype, torch.float32)
    dy = dy.to(dtype)
    out: List[Tuple[nn.Parameter, Tensor]] = []
    if target.kind == EMBEDDING and not x.is_floating_point():
        if target.weight is not None:
            ids = x.reshape(batch_size, -1)
            d = dy.reshape(batch_size, ids.shape[1], -1)
            if module.padding_idx is not None:
                d = d.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
            g = d.new_zeros(batch_size, module.num_embeddings, d.shape[-1])
            out.append((target.weight, g.scatter_add_(1, ids.unsqueeze(-1).expand_as(d), d)))
        return out
    if target.kind == LAYER_NORM:
        width = math.prod(module.normalized_shape)
        d = dy.reshape(batch_size, -1, width)
        if target.weight is not None:
            xhat = F.layer_norm(x.to(dtype), module.normalized_shape, eps=module.eps)
            out.append((target.weight, (d * xhat.reshape(d.shape)).sum(1)))
        if target.bias is not None:
            out.append((target.bias, d.sum(1)))
        return out
    # Linear, Conv1D and a tied embedding used as the output layer: y = x @ W_io + b.
    x = x.to(dtype).reshape(batch_size, -1, x.shape[-1])
    d = dy.reshape(batch_size, -1, dy.shape[-1])
    if target.weight is not None:
        g = torch.einsum('bno,bni->boi', d, x)  # (out, in): Linear's and Embedding's layout.
        out.append((target.weight, g.transpose(1, 2) if target.kind == CONV1D else g))
    if target.bias is not None:
        out.append((target.bias, d.sum(1)))
    return out


def add_sq_norms(grads: List[Tuple[nn.Parameter, Tensor]], params: ReferenceGradient,
                 shared: set, seen: set, pending: Dict[nn.Parameter, Tensor], out: Tensor) -> None:
    """Add each covered parameter's per-sample squared gradient norm to ``out``.

    A parameter registered by one module and called once is squared at once; one in ``shared``
    (tied weights, embeddings) is summed over its uses in ``pending`` and squared at the end of
    the pass, since its norm includes the uses' cross terms. Another module called twice per
    forward would need the same, so it is refused.
    """
    for param, g in grads:
        if param not in params:
            continue
        if param in shared:
            pending[param] = pending[param] + g if param in pending else g
            continue
        if param in seen:
            raise InfluenceError('The cosine reward needs per-sample gradient norms, but a module '
                                 'is called more than once per forward: use reward: inner.')
        seen.add(param)
        out += g.reshape(g.shape[0], -1).pow(2).sum(1).to(out.dtype)
