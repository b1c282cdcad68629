"""First-order influence of probe samples on a reference loss, in one forward/backward pass.

MADS scores candidate samples by how much a training step on them would lower the loss on a
reference set. To first order, one SGD step of size ``lr`` on probe sample ``x_i`` changes the
reference loss ``L_R`` by ``-lr * <grad loss(x_i), grad L_R>``, so the influence is

    I(x_i) = <grad loss(x_i), grad L_R>      (positive: a step on ``x_i`` lowers ``L_R``)

evaluated at the current parameters. The naive way needs one backward per probe sample. Here the
reference gradient ``G = grad L_R`` is computed once (:func:`reference_gradient`) and all ``I(x_i)``
come from ONE forward/backward over the probe batch (:func:`per_sample_influence`), without ever
materialising a per-sample gradient: forward hooks keep each covered layer's input ``X_i`` and
output ``Y_i``, one ``torch.autograd.grad`` yields the output gradients ``D_i = dL_i/dY_i``, and the
per-sample gradient is contracted with ``G`` analytically ("ghost" dot products):

* ``nn.Linear`` (``y = x W^T + b``): ``<D_i^T X_i, G_W> = sum((D_i G_W) * X_i)`` and
  ``<sum_t D_i[t], G_b>``.
* Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2; ``y = x W + b``, ``W`` is
  ``(d_in, d_out)``): the same with ``W`` transposed.
* ``nn.Embedding``: ``sum_t <D_i[t], G[id_t]>`` (a row gather; tokens equal to ``padding_idx``
  contribute nothing, as autograd gives that row no gradient).
* ``nn.LayerNorm`` (``y = xhat * w + b``): ``sum_t <D_i[t] * xhat_i[t], G_w> + <D_i[t], G_b>``, with
  ``xhat`` recomputed from the saved input.

Covered parameters: the ``weight``/``bias`` of the four module kinds above, provided EVERY module
that registers the parameter is one of them (so tied weights such as GPT-2's ``wte``/``lm_head`` are
covered: each use is contracted with the full ``G`` of the parameter and the uses are summed) and it
requires grad. Not covered: every other parameter (convolutions, BatchNorm/GroupNorm, custom
RMSNorm classes, ``nn.MultiheadAttention``'s projections, parameters used functionally, frozen
parameters) and embeddings with ``scale_grad_by_freq`` (their gradient mixes samples). Uncovered
parameters are excluded from BOTH the reference gradient and the influence, so the two sides always
use the same parameter set; :func:`covered_parameters` lists it. A GPT-2 is fully covered.

Activations must be batch-first in covered modules. A covered module whose input has leading
dimension 1 in a batch of ``B > 1`` (GPT-2's position embedding is fed ``position_ids`` of shape
``1 x T``) is taken to be shared by all samples and broadcast: its output is expanded to ``B`` so that
each sample's own share of the gradient is seen (the batch size is read off the probe batch's
``input_ids``, or its first tensor).

Losses are supplied by a per-sample adapter ``loss_fn(model, batch) -> Tensor[num_samples]``
(:data:`PerSampleLoss`); :func:`causal_lm_per_sample_loss` is the default for causal LMs. The
reference loss is the mean of the per-sample reference losses (each the mean over that sample's
valid tokens), so every reference sequence weighs the same whatever its length. The probe backward
runs on the SUM of the per-sample losses: its gradient with respect to sample ``i``'s activations is
``i``'s own, which requires that samples do not interact inside the model (no BatchNorm in train
mode, no in-batch contrastive losses, no mixture-of-experts capacity shared across samples).

Side effects: none. ``.grad`` is never written (only ``torch.autograd.grad`` is used, which also
keeps DistributedDataParallel's gradient hooks silent; DDP wrappers are unwrapped so its forward
hooks do not run either), parameters, buffers and optimizer state are untouched, the train/eval flag
of every submodule is restored, and the torch CPU/CUDA RNG state is restored. Both passes run in
eval mode so that dropout does not make the influence random. Under ``torch.distributed`` the
reference gradient is averaged across ranks (a collective: every rank must call it). FSDP-sharded
models are not supported.
"""

from __future__ import annotations

import contextlib
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    'InfluenceError', 'PerSampleLoss', 'ReferenceGradient', 'covered_parameters',
    'causal_lm_per_sample_loss', 'reference_gradient', 'per_sample_influence', 'compute_influence'
]

PerSampleLoss = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> Tensor[num_samples]``: one differentiable loss per sample."""

ReferenceGradient = Dict[nn.Parameter, Tensor]
"""Covered parameter -> gradient of the reference loss (detached, same shape as the parameter)."""

IGNORE_INDEX = -100

_LINEAR = 'linear'
_CONV1D = 'conv1d'
_EMBEDDING = 'embedding'
_LAYER_NORM = 'layer_norm'


class InfluenceError(ValueError):
    """The model, batch or loss cannot be scored by ghost influence."""


# --------------------------------------------------------------------------------------------------
# Which parameters are covered.


def _kind(module: nn.Module) -> Optional[str]:
    """Ghost rule of ``module``, or ``None`` if its parameters cannot be covered."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None  # nn.MultiheadAttention.out_proj: its weight is used functionally, never called.
    if isinstance(module, nn.Linear):
        return _LINEAR
    if isinstance(module, nn.Embedding):
        return None if module.scale_grad_by_freq else _EMBEDDING
    if isinstance(module, nn.LayerNorm):
        return _LAYER_NORM
    # Matched by name so that transformers is not imported (it is not a dependency).
    if type(module).__name__ == 'Conv1D' and type(module).__module__.startswith('transformers'):
        return _CONV1D
    return None


def _owners(model: nn.Module) -> 'OrderedDict[nn.Parameter, List[Tuple[nn.Module, str]]]':
    """Every parameter of ``model`` and the ``(module, attribute)`` pairs that register it."""
    owners: 'OrderedDict[nn.Parameter, List[Tuple[nn.Module, str]]]' = OrderedDict()
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                owners.setdefault(param, []).append((module, name))
    return owners


def covered_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of ``model`` that ghost influence covers, in registration order (see module doc)."""
    model = _unwrap_ddp(model)
    return [
        param for param, uses in _owners(model).items()
        if param.requires_grad and all(_kind(m) is not None and n in ('weight', 'bias') for m, n in uses)
    ]


def _select_params(model: nn.Module, params: Optional[Iterable[nn.Parameter]]) -> List[nn.Parameter]:
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


# --------------------------------------------------------------------------------------------------
# Losses.


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel so that neither its forward nor its reducer hooks run."""
    parallel = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, parallel):
        model = model.module
    return model


def _unwrap_composer_hf(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a Composer ``HuggingFaceModel`` (else ``model`` itself)."""
    # Composer is only consulted if already imported: a Composer model implies it is.
    composer_hf = sys.modules.get('composer.models.huggingface')
    wrapper = getattr(composer_hf, 'HuggingFaceModel', None)
    if wrapper is not None and isinstance(model, wrapper):
        return model.model
    return model


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and 'logits' in output:
        return output['logits']
    logits = getattr(output, 'logits', None)
    if isinstance(logits, Tensor):
        return logits
    raise InfluenceError(f'Cannot find logits in a model output of type {type(output).__name__}; '
                         'return a tensor, a mapping with "logits" or an object with .logits.')


def causal_lm_per_sample_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Per-sample next-token cross-entropy of a causal LM: the mean over each sample's valid tokens.

    ``batch`` holds ``input_ids`` (``B x T``) and optionally ``attention_mask`` and ``labels``
    (``-100`` is ignored). Without ``labels``, the inputs are the labels with padding (mask 0)
    ignored. Labels are shifted by one as Hugging Face does. ``model`` is a Hugging Face causal LM,
    a Composer ``HuggingFaceModel`` (its ``.model`` is called directly, skipping Composer's loss) or
    any module called as ``model(input_ids=..., attention_mask=...)`` that returns logits. A sample
    without a valid target token has loss 0 (and so no influence).
    """
    net = _unwrap_composer_hf(_unwrap_ddp(model))
    param = next(net.parameters(), None)
    device = param.device if param is not None else batch['input_ids'].device
    input_ids = batch['input_ids'].to(device)
    mask = batch.get('attention_mask')
    labels = batch.get('labels')
    kwargs: Dict[str, Any] = {'input_ids': input_ids}
    if mask is not None:
        mask = mask.to(device)
        kwargs['attention_mask'] = mask
    if getattr(getattr(net, 'config', None), 'use_cache', None) is not None:
        kwargs['use_cache'] = False  # A key/value cache is dead weight here.
    logits = _logits(net(**kwargs))
    if labels is None:
        labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels = labels.to(device)[:, 1:]
    logits = logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction='none').view(labels.shape)
    num_valid = (labels != IGNORE_INDEX).sum(dim=1).clamp_min(1)
    return token_loss.sum(dim=1) / num_valid


def _per_sample_losses(loss_fn: PerSampleLoss, model: nn.Module, batch: Any) -> Tensor:
    losses = loss_fn(model, batch)
    if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.numel() == 0:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise InfluenceError(f'loss_fn must return a non-empty 1-D tensor of per-sample losses, '
                             f'got {shape}.')
    if not losses.requires_grad:
        raise InfluenceError('The per-sample losses do not depend on any covered parameter.')
    return losses


# --------------------------------------------------------------------------------------------------
# State preservation.


@contextlib.contextmanager
def _influence_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on, RNG forked; train flags restored per submodule on exit."""
    modes = [(m, m.training) for m in model.modules()]
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


def _check_supported(model: nn.Module) -> None:
    for module in model.modules():
        if 'FullyShardedDataParallel' in type(module).__name__:
            raise InfluenceError('FSDP-sharded models are not supported by ghost influence.')
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise InfluenceError('nn.Embedding(max_norm=...) rewrites its weight during the forward; '
                                 'ghost influence would change the parameters, so it is refused.')


# --------------------------------------------------------------------------------------------------
# Reference gradient.


def _all_reduce_sum(grads: Sequence[Tensor]) -> None:
    """Sum ``grads`` in place across ranks, one flat buffer per (dtype, device)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buckets: 'OrderedDict[Tuple[torch.dtype, torch.device], List[Tensor]]' = OrderedDict()
    for grad in grads:
        buckets.setdefault((grad.dtype, grad.device), []).append(grad)
    for tensors in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        offset = 0
        for tensor in tensors:
            tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()


def _global_count(local: int, device: torch.device) -> int:
    """Reference samples over all ranks (``local`` without a process group)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    count = torch.tensor([local], dtype=torch.float64, device=device)
    dist.all_reduce(count)
    return int(count.item())


def reference_gradient(model: nn.Module,
                       reference_batch: Any,
                       loss_fn: PerSampleLoss = causal_lm_per_sample_loss,
                       params: Optional[Iterable[nn.Parameter]] = None,
                       num_samples: Optional[int] = None) -> ReferenceGradient:
    """Gradient of the reference loss (mean of per-sample losses) over the covered parameters.

    ``params`` restricts the set further (default: :func:`covered_parameters`). Runs one ordinary
    forward/backward in eval mode with ``torch.autograd.grad`` (``.grad`` untouched).

    Under an initialised ``torch.distributed`` process group every rank must call this (it is
    collective) with its own share of the reference set, and every rank gets the exact mean over
    *all* reference samples: each rank sums its per-sample gradients, the sums are added across
    ranks and divided by the total count. Shares may differ in size, and a rank with no share
    passes ``reference_batch=None``.

    Args:
        model (nn.Module): The live model.
        reference_batch (Any): This rank's reference batch, or ``None`` for none.
        loss_fn (PerSampleLoss): Per-sample loss adapter.
        params (Iterable[nn.Parameter], optional): Parameters to take the gradient of.
        num_samples (int, optional): Reference samples over all ranks, when known; otherwise
            counted with one extra all-reduce.
    """
    net = _unwrap_ddp(model)
    _check_supported(net)
    selected = _select_params(net, params)
    grads: Sequence[Optional[Tensor]] = [None] * len(selected)
    local = 0
    if reference_batch is not None:
        with _influence_mode(net):
            losses = _per_sample_losses(loss_fn, net, reference_batch)
            local = int(losses.shape[0])
            grads = torch.autograd.grad(losses.sum(), selected, allow_unused=True)
    out: ReferenceGradient = OrderedDict()
    for param, grad in zip(selected, grads):
        if grad is None:
            grad = torch.zeros_like(param)
        elif grad.is_sparse:
            grad = grad.to_dense()
        out[param] = grad.detach()
    total = num_samples if num_samples is not None else \
        _global_count(local, selected[0].device if selected else torch.device('cpu'))
    if total < 1:
        raise InfluenceError('The reference set is empty on every rank: give at least one '
                             'reference sample.')
    _all_reduce_sum(list(out.values()))
    for grad in out.values():
        grad.div_(total)
    return out


# --------------------------------------------------------------------------------------------------
# Ghost dot products.


@dataclass
class _Call:
    """One forward call of a covered module: the rule to apply and its input (detached)."""
    module: nn.Module
    kind: str
    input: Tensor


def _dense_dot(x: Tensor, dy: Tensor, g_io: Tensor) -> Tensor:
    """``sum_n <x[b, n] @ g_io, dy[b, n]>`` per ``b`` for ``x: (B, N, I)``, ``dy: (B, N, O)``."""
    if g_io.shape[0] >= g_io.shape[1]:
        return torch.einsum('bno,bno->b', x @ g_io, dy)  # Intermediate (B, N, O), the smaller.
    return torch.einsum('bni,bni->b', dy @ g_io.T, x)  # Intermediate (B, N, I).


def _ghost_dot(call: _Call, dy: Tensor, grads: ReferenceGradient, batch_size: int) -> Tensor:
    """``<per-sample gradient of this call's parameters, G>`` for every sample, shape ``(B,)``."""
    module, x = call.module, call.input
    min_dim = 1 if call.kind == _EMBEDDING else 2  # Token ids may be (B,); features are (B, ..., D).
    if x.dim() < min_dim or x.shape[0] != batch_size or dy.shape[0] != batch_size:
        raise InfluenceError(f'{type(module).__name__} saw an input of shape {tuple(x.shape)}, whose '
                             f'leading dimension is not the batch of {batch_size} samples: ghost '
                             'influence needs batch-first activations in covered modules.')
    g_weight = grads.get(module.weight) if isinstance(module.weight, nn.Parameter) else None
    bias = getattr(module, 'bias', None)
    g_bias = grads.get(bias) if isinstance(bias, nn.Parameter) else None
    dtype = torch.promote_types(dy.dtype, torch.float32)
    for g in (g_weight, g_bias):
        if g is not None:
            dtype = torch.promote_types(dtype, g.dtype)
    dy = dy.to(dtype)
    score = dy.new_zeros(batch_size)

    if call.kind == _EMBEDDING and x.is_floating_point():
        # A tied embedding called as the output layer (e.g. llm-foundry's SharedEmbedding with
        # unembed=True computes x @ W^T): the linear rule with the embedding matrix as W.
        if g_weight is None:
            return score
        x = x.to(dtype).reshape(batch_size, -1, x.shape[-1])
        return _dense_dot(x, dy.reshape(batch_size, -1, dy.shape[-1]), g_weight.to(dtype).T)

    if call.kind == _EMBEDDING:
        if g_weight is None:
            return score
        ids = x.reshape(batch_size, -1)
        rows = g_weight.to(dtype)[ids]  # (B, N, D)
        if module.padding_idx is not None:
            rows = rows.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
        return torch.einsum('bnd,bnd->b', rows, dy.reshape(rows.shape))

    if call.kind == _LAYER_NORM:
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
        score = score + _dense_dot(x, dy, g_io.T if call.kind == _LINEAR else g_io)
    if g_bias is not None:
        score = score + dy.sum(1) @ g_bias.to(dtype)
    return score


def _leading_dim(batch: Any) -> Optional[int]:
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


def _check_reference_grad(model: nn.Module, reference_grad: ReferenceGradient) -> List[nn.Parameter]:
    if not reference_grad:
        raise InfluenceError('reference_grad is empty.')
    params = list(reference_grad)
    _select_params(model, params)  # Raises for parameters that are not covered.
    for param, grad in reference_grad.items():
        if tuple(grad.shape) != tuple(param.shape):
            raise InfluenceError(f'reference_grad has shape {tuple(grad.shape)} for a parameter of '
                                 f'shape {tuple(param.shape)}.')
    return params


def per_sample_influence(model: nn.Module,
                         probe_batch: Any,
                         reference_grad: ReferenceGradient,
                         loss_fn: PerSampleLoss = causal_lm_per_sample_loss,
                         *,
                         verify: bool = False) -> Tensor:
    """``<grad loss_i, reference_grad>`` for every probe sample, from one forward/backward.

    The parameter set is the keys of ``reference_grad`` (from :func:`reference_gradient`). Returns a
    1-D CPU tensor (float64 for a float64 model or reference gradient, float32 otherwise).

    With ``verify=True`` the summed parameter gradient is also computed (about one extra backward's
    worth of matrix products) and ``sum_i I_i`` is checked against ``<sum_i grad loss_i, G>``; a
    mismatch means a covered parameter is also used outside its module (e.g. functionally) and
    raises :class:`InfluenceError`.
    """
    net = _unwrap_ddp(model)
    _check_supported(net)
    params = _check_reference_grad(net, reference_grad)
    wanted = set(params)
    modules: 'OrderedDict[nn.Module, str]' = OrderedDict()
    for param, uses in _owners(net).items():
        if param in wanted:
            for module, _ in uses:
                kind = _kind(module)
                assert kind is not None  # Guaranteed by _check_reference_grad.
                modules[module] = kind

    calls: List[_Call] = []
    outputs: List[Tensor] = []  # Module outputs in the graph: the backward's targets.
    versions: List[int] = []  # Their _version when recorded: a later in-place change voids them.
    expected_batch = _leading_dim(probe_batch)
    expanded: List[nn.Module] = []

    def record(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> Any:
        x = args[0] if args else kwargs.get('input')
        if not (isinstance(output, Tensor) and output.requires_grad and isinstance(x, Tensor)):
            return None
        x = x.detach()
        if expected_batch is not None and expected_batch > 1 and x.dim() >= 2 and x.shape[0] == 1:
            # Shared across the batch and broadcast later (GPT-2's position embedding is fed
            # position_ids of shape 1 x T): expand so that each sample's gradient share is seen.
            x = x.expand(expected_batch, *x.shape[1:])
            output = output.expand(expected_batch, *output.shape[1:])
            expanded.append(module)
        calls.append(_Call(module, modules[module], x))
        outputs.append(output)
        versions.append(output._version)
        return output  # The expanded output replaces the module's; otherwise it is the same tensor.

    with _influence_mode(net):
        handles = [m.register_forward_hook(record, with_kwargs=True) for m in modules]
        try:
            losses = _per_sample_losses(loss_fn, net, probe_batch)
        finally:
            for handle in handles:
                handle.remove()
        batch_size = losses.shape[0]
        if expanded and batch_size != expected_batch:
            raise InfluenceError(f'The probe batch looks like {expected_batch} samples but loss_fn '
                                 f'returned {batch_size} losses.')
        seen = {p for c in calls for p in c.module.parameters(recurse=False)}
        unseen = [p for p in params if p not in seen and bool(reference_grad[p].any())]
        if unseen:
            names = {p: n for n, p in net.named_parameters(remove_duplicate=False)}
            raise InfluenceError('No module call used ' + ', '.join(names.get(p, '?') for p in unseen) +
                                 ' in the probe forward although it has a reference gradient: it is '
                                 'probably used functionally. Exclude it with params=.')
        changed = [type(c.module).__name__ for c, y, v in zip(calls, outputs, versions) if y._version != v]
        if changed:
            raise InfluenceError(f'The output of {changed[0]} was modified in place after the module '
                                 'returned; its gradient cannot be captured.')
        targets = outputs + (list(params) if verify else [])
        grads: List[Optional[Tensor]] = []
        if targets:
            grads = list(torch.autograd.grad(losses.sum(), targets, allow_unused=True))
        outputs.clear()
        del targets

    acc_dtype = torch.float32
    for g in reference_grad.values():
        acc_dtype = torch.promote_types(acc_dtype, g.dtype)
    scores = torch.zeros(batch_size, dtype=acc_dtype, device=losses.device)
    for k, call in enumerate(calls):
        dy, grads[k] = grads[k], None  # Free each output gradient once it is used.
        if dy is not None:
            score = _ghost_dot(call, dy, reference_grad, batch_size)
            scores += score.to(device=scores.device, dtype=acc_dtype)
    if verify:
        _verify(scores, params, grads[len(calls):], reference_grad)
    return scores.detach().cpu()


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
                      verify: bool = False) -> Tensor:
    """First-order influence of every probe sample on the reference loss: ``Tensor[num_probe]``.

    Computes :func:`reference_gradient` over ``reference_batch`` (unless ``reference_grad`` is
    given, e.g. to reuse one across several probe batches at the same parameters; ``params`` is
    then ignored), then :func:`per_sample_influence` over ``probe_batch``.
    """
    if reference_grad is None:
        if reference_batch is None:
            raise InfluenceError('Pass a reference_batch or a precomputed reference_grad.')
        reference_grad = reference_gradient(model, reference_batch, loss_fn, params)
    return per_sample_influence(model, probe_batch, reference_grad, loss_fn, verify=verify)
