"""First-order influence of probe samples on a reference loss, in one forward/backward pass.

MADS scores candidate samples by how much a training step on them would lower the loss on a
reference set. To first order, one SGD step of size ``lr`` on probe sample ``x_i`` changes the
reference loss ``L_R`` by ``-lr * <grad loss(x_i), grad L_R>``, so the influence is

    I(x_i) = <grad loss(x_i), grad L_R>      (positive: a step on ``x_i`` lowers ``L_R``)

evaluated at the current parameters. The naive way needs one backward per probe sample. Here the
reference gradient ``G = grad L_R`` is computed once (:func:`reference_gradient`) and all ``I(x_i)``
come from ONE forward/backward over the probe batch (:func:`per_sample_influence`), without ever
materialising a per-sample gradient: forward hooks keep each covered layer's input ``X_i``, a
backward taken with respect to activations only hands each output gradient ``D_i = dL_i/dY_i`` to
a hook as soon as it exists, and the per-sample gradient is contracted with ``G`` analytically
("ghost" dot products), after which ``X_i`` and ``D_i`` are released:

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

The reference gradient is formed the same way, from activations: each covered call's weight
gradient ``D^T X`` (row sums for embeddings, ``D * xhat`` for LayerNorm) is added to ``G`` as the
backward reaches it. No parameter gradient is ever asked of autograd, which is what lets both
passes run on sharded models.

Memory and precision. Both passes run in micro-batches (``micro_batch``: the console uses the
trainer's ``device_train_microbatch_size``), so their activations are those of a training step at
that size or less; with ``checkpoint=True`` the model's blocks (Hugging Face ``_no_split_modules``,
else the longest ``nn.ModuleList``) are recomputed in the backward, and blocks the model already
wraps in torch's ``CheckpointWrapper`` (Composer's ``activation_checkpointing``) are followed
likewise, so the hooks take each block's inputs only when its recomputation makes them, and the
pass keeps about one block's activations plus the block boundaries. ``G`` itself is held in fp32
(or wider) in full on every rank: :func:`reference_gradient_bytes`, and :func:`influence_memory`
measures a probe micro-batch's peak on top. ``autocast_dtype`` runs the forwards under
``torch.autocast`` (the run's ``amp_bf16``); every sum (``G`` and the dot products) is taken in
fp32 whatever the activations' dtype, also for bf16 weights.

Sharding. Under FSDP (FSDP1 ``FullyShardedDataParallel`` with ``use_orig_params=True`` and FSDP2
``fully_shard``, any sharding strategy) the forward and backward gather parameters exactly as a
training step's do, nothing more: the hooks see full activations, ``G`` is computed from them with
the parameters' full shapes and summed across ranks like any reference gradient. FSDP forwards are
collective, so both passes are then collective: ranks run the same number of micro-batches (a
rank with fewer repeats one, a rank with none runs a sample of another's, results dropped), and
every rank must call :func:`per_sample_influence` (``probe_batch=None`` for none).

Side effects: none. ``.grad`` is never written (gradients are only taken with respect to
activations, which also keeps DistributedDataParallel's gradient hooks silent; DDP wrappers are
unwrapped so its forward hooks do not run either; FSDP1, which moves a unit's gradient aside before
its backward, gets the same gradient tensors back), parameters, buffers and optimizer state are
untouched, the train/eval flag of every submodule is restored, and the torch CPU/CUDA RNG state is
restored. Both passes run in eval mode so that dropout does not make the influence random. Under
``torch.distributed`` the reference gradient is averaged across ranks (a collective: every rank
must call it).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streaming_mads.collate import IGNORE_INDEX

__all__ = [
    'InfluenceError', 'PerSampleLoss', 'ReferenceGradient', 'covered_parameters',
    'causal_lm_per_sample_loss', 'reference_gradient', 'per_sample_influence', 'compute_influence',
    'reference_gradient_bytes', 'InfluenceMemory', 'influence_memory', 'PeakMemory'
]

PerSampleLoss = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> Tensor[num_samples]``: one differentiable loss per sample."""

ReferenceGradient = Dict[nn.Parameter, Tensor]
"""Covered parameter -> gradient of the reference loss (detached, same shape as the parameter)."""

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
# State preservation and sharding.


def _is_sharded(model: nn.Module) -> bool:
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


def _full_shapes(model: nn.Module) -> Dict[nn.Parameter, torch.Size]:
    """Unsharded shapes of FSDP1's original parameters (FSDP2's DTensors report theirs)."""
    shapes: Dict[nn.Parameter, torch.Size] = {}
    for handle in _fsdp1_handles(model):
        flat = handle.flat_param
        for param, shape in zip(getattr(flat, '_params', None) or [], flat._shapes):
            shapes[param] = shape
    return shapes


@contextlib.contextmanager
def _influence_mode(model: nn.Module) -> Iterator[None]:
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


def _check_supported(model: nn.Module) -> None:
    for module in model.modules():
        if type(module).__name__ == 'FullyShardedDataParallel' and \
                not getattr(module, '_use_orig_params', True):
            raise InfluenceError('FSDP with use_orig_params=False hides the original parameters; set '
                                 'fsdp_config.use_orig_params: true (Composer\'s default).')
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            raise InfluenceError('nn.Embedding(max_norm=...) rewrites its weight during the forward; '
                                 'ghost influence would change the parameters, so it is refused.')


# --------------------------------------------------------------------------------------------------
# Collectives.


def _dist_world() -> int:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _all_reduce_sum(grads: Sequence[Tensor]) -> None:
    """Sum ``grads`` in place across ranks, one flat buffer per (dtype, device)."""
    import torch.distributed as dist
    if _dist_world() == 1:
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
    if _dist_world() == 1:
        return local
    count = torch.tensor([local], dtype=torch.float64, device=device)
    dist.all_reduce(count)
    return int(count.item())


def _lockstep(chunks: List[Any], device: torch.device) -> List[Any]:
    """Pad this rank's micro-batches so that every rank runs as many (FSDP forwards are collective).

    A rank with fewer micro-batches repeats its last one; a rank with none runs one sample of the
    first rank that has some. The caller discards the results of the padding passes.
    """
    import torch.distributed as dist
    if _dist_world() == 1:
        return chunks
    counts = torch.tensor([len(chunks), -len(chunks)], dtype=torch.int64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    most, fewest = int(counts[0]), -int(counts[1])
    if fewest == 0 and most > 0:
        mine = _to_device(_split(chunks[0], 1)[0], torch.device('cpu')) if chunks else None
        gathered: List[Any] = [None] * _dist_world()
        dist.all_gather_object(gathered, mine)
        filler = next(b for b in gathered if b is not None)
        if not chunks:
            chunks = [_to_device(filler, device)]
    return chunks + [chunks[-1]] * (most - len(chunks))


# --------------------------------------------------------------------------------------------------
# Micro-batches.


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


def _split(batch: Any, size: Optional[int]) -> List[Any]:
    """``batch`` cut into micro-batches of at most ``size`` samples along every batch-first tensor."""
    total = _leading_dim(batch)
    if size is None or total is None or total <= size:
        return [batch]
    if size < 1:
        raise InfluenceError(f'micro_batch must be >= 1, got {size}.')
    return [
        _map_tensors(batch, lambda t, s=start: t[s:s + size]
                     if t.dim() > 0 and t.shape[0] == total else t)
        for start in range(0, total, size)
    ]


# --------------------------------------------------------------------------------------------------
# The pass: every covered module call's input and output gradient, one module at a time.


@dataclass(frozen=True)
class _Target:
    """A covered module: its ghost rule and the covered parameters it registers."""
    kind: str
    weight: Optional[nn.Parameter]
    bias: Optional[nn.Parameter]


@dataclass
class _Call:
    """One forward call of a covered module, waiting for its input and its output gradient."""
    module: nn.Module
    target: _Target
    input: Optional[Tensor] = None  # None until a checkpointed block is recomputed.
    grad: Optional[Tensor] = None


@dataclass
class _Options:
    """How a pass runs: micro-batch size, autocast dtype and activation checkpointing."""
    micro_batch: Optional[int] = None
    autocast_dtype: Optional[torch.dtype] = None
    checkpoint: bool = False


OnPair = Callable[[_Call, Tensor, Tensor], None]
"""``on_pair(call, input, output_grad)``: consumes one module call; both tensors are dropped after."""


def _targets(model: nn.Module, params: Iterable[nn.Parameter]) -> 'OrderedDict[nn.Module, _Target]':
    """Every module that registers one of ``params`` (all covered), with its rule."""
    wanted = set(params)
    out: 'OrderedDict[nn.Module, _Target]' = OrderedDict()
    for param, uses in _owners(model).items():
        if param in wanted:
            for module, _ in uses:
                if module not in out:
                    kind = _kind(module)
                    assert kind is not None  # Guaranteed by _select_params.
                    weight = module._parameters.get('weight')
                    bias = module._parameters.get('bias')
                    out[module] = _Target(kind, weight if weight in wanted else None,
                                          bias if bias in wanted else None)
    return out


class _Region:
    """One call of a checkpointed block; its second run is the recomputation in the backward."""

    def __init__(self) -> None:
        self.runs = 0
        self.index = 0
        self.calls: List[_Call] = []


def _wrapped_blocks(model: nn.Module) -> List[nn.Module]:
    """Blocks the model checkpoints itself (torch's ``CheckpointWrapper``, as Composer's and
    llm-foundry's ``activation_checkpointing`` apply): the modules each wrapper recomputes."""
    return [m._checkpoint_wrapped_module for m in model.modules()
            if 'CheckpointWrapper' in type(m).__name__ and hasattr(m, '_checkpoint_wrapped_module')]


@contextlib.contextmanager
def _tracked(blocks: Sequence[nn.Module], current: List[Optional[_Region]],
             backward: List[bool]) -> Iterator[None]:
    """Track the model's own checkpointed blocks as regions: each forward call opens one; in the
    backward, a recomputation reopens the latest one of that block not yet recomputed (blocks are
    recomputed in reverse order)."""
    pending: Dict[nn.Module, List[_Region]] = {}
    outer: List[Optional[_Region]] = []

    def enter(module: nn.Module, args: Any) -> None:
        if backward[0]:
            region = pending[module].pop()
            region.index = 0
        else:
            region = _Region()
            pending.setdefault(module, []).append(region)
        outer.append(current[0])
        current[0] = region

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        region = current[0]
        current[0] = outer.pop()
        if region is not None:
            region.runs += 1

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(enter),
                                          b.register_forward_hook(leave))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _blocks(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks to checkpoint: Hugging Face's ``_no_split_modules`` classes, else the
    modules of the longest ``nn.ModuleList``."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, '_no_split_modules', None) or [])
    if names:
        return [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def _checkpointed(blocks: Sequence[nn.Module], current: List[Optional[_Region]]) -> Iterator[None]:
    """Run every block under non-reentrant activation checkpointing; ``current[0]`` is the region
    (block call) executing, so hooks know which calls a recomputation repeats."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:

        def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
            region = _Region()

            def run(*a: Any, **k: Any) -> Any:
                outer, current[0], region.index = current[0], region, 0
                try:
                    return forward(*a, **k)
                finally:
                    current[0] = outer
                    region.runs += 1

            return checkpoint(run, *args, use_reentrant=False, **kwargs)

        return checkpointed_forward

    saved = [(block, vars(block).get('forward')) for block in blocks]
    try:
        for block in blocks:
            block.forward = wrap(block.forward)
        # Recompute whole blocks: an early stop would skip the forward hooks of their last modules.
        with set_checkpoint_early_stop(False):
            yield
    finally:
        for block, forward in saved:
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _run_pass(net: nn.Module, batch: Any, loss_fn: PerSampleLoss,
              targets: 'Mapping[nn.Module, _Target]', on_pair: OnPair, options: _Options,
              extra_inputs: Sequence[Tensor] = (),
              check_functional: Sequence[nn.Parameter] = ()
              ) -> Tuple[Tensor, List[_Call], List[Optional[Tensor]]]:
    """One forward/backward of ``batch`` that hands each covered call to ``on_pair`` in the backward.

    Forward hooks keep each call's input (or, inside a checkpointed block, wait for its
    recomputation) and hook its output; the output gradient reaches ``on_pair`` as soon as the
    backward produces it, and both are released right after, so at most a few layers' output
    gradients exist at once, as in a training step. To make the backward visit every hooked output
    without asking for (or writing) any parameter gradient, each output gets a zero scalar leaf
    added (values unchanged) and the backward is taken with respect to those leaves.

    Returns the per-sample losses (detached), the calls seen, and the gradients of
    ``extra_inputs`` (for ``verify``). Raises if one of ``check_functional`` is in the loss' graph
    without any covered module call using it.
    """
    expected_batch = _leading_dim(batch)
    zeros: Dict[torch.device, Tensor] = {}
    calls: List[_Call] = []
    versions: List[Tuple[Tensor, int]] = []
    current: List[Optional[_Region]] = [None]
    backward = [False]
    expanded = [False]

    def pair(call: _Call) -> None:
        if call.input is not None and call.grad is not None:
            x, dy = call.input, call.grad
            call.input = call.grad = None
            # A recomputation runs under the forward's autocast; the sums must not.
            with torch.autocast(dy.device.type, enabled=False):
                on_pair(call, x, dy)

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
            expanded[0] = True
        zero = zeros.get(output.device)
        if zero is None:
            zero = zeros[output.device] = torch.zeros((), device=output.device, requires_grad=True)
        output = output + zero  # Same values; puts the output on the backward's path.
        region = current[0]
        if backward[0]:
            # A recomputation in the backward: hand the input to the call it repeats.
            if region is not None and region.runs > 0:
                call = region.calls[region.index]
                region.index += 1
                call.input = x
                pair(call)
            return output
        call = _Call(module, targets[module], None if region is not None else x)
        if region is not None:
            region.calls.append(call)

        def on_grad(dy: Tensor) -> None:
            call.grad = dy
            pair(call)

        output.register_hook(on_grad)
        calls.append(call)
        versions.append((output, output._version))
        return output

    device = next((p.device for p in net.parameters()), torch.device('cpu'))
    autocast = torch.autocast(device.type, dtype=options.autocast_dtype) \
        if options.autocast_dtype is not None else contextlib.nullcontext()
    wrapped = _wrapped_blocks(net)
    blocks = _blocks(net) if options.checkpoint and not wrapped else []
    handles = [m.register_forward_hook(record, with_kwargs=True) for m in targets]
    try:
        with _tracked(wrapped, current, backward), _checkpointed(blocks, current):
            with autocast:
                losses = _per_sample_losses(loss_fn, net, batch)
            if expanded[0] and losses.shape[0] != expected_batch:
                raise InfluenceError(f'The probe batch looks like {expected_batch} samples but '
                                     f'loss_fn returned {losses.shape[0]} losses.')
            changed = [type(c.module).__name__ for c, (y, v) in zip(calls, versions) if y._version != v]
            if changed:
                raise InfluenceError(f'The output of {changed[0]} was modified in place after the '
                                     'module returned; its gradient cannot be captured.')
            versions.clear()
            functional = _uncalled_but_used(losses, calls, check_functional)
            if functional:
                raise _functional_error(net, functional)
            inputs = list(zeros.values()) + list(extra_inputs)
            backward[0] = True
            grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True) if inputs else ()
    finally:
        for handle in handles:
            handle.remove()
    if any(c.grad is not None for c in calls):
        raise InfluenceError('A checkpointed block was not recomputed in the backward; run without '
                             'activation checkpointing.')
    for call in calls:
        call.input = None
    return losses.detach(), calls, list(grads[len(zeros):])


def _uncalled_but_used(losses: Tensor, calls: Sequence[_Call],
                       params: Sequence[nn.Parameter]) -> List[nn.Parameter]:
    """Parameters in ``losses``' graph that no covered module call used (functional uses)."""
    called = {p for c in calls for p in (c.target.weight, c.target.bias) if p is not None}
    missing = {p for p in params if p not in called}
    if not missing or losses.grad_fn is None:
        return []
    found: List[nn.Parameter] = []
    seen, stack = set(), [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, 'variable', None)
        if variable is not None and variable in missing:
            found.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _functional_error(net: nn.Module, params: Iterable[nn.Parameter]) -> InfluenceError:
    names = {p: n for n, p in net.named_parameters(remove_duplicate=False)}
    return InfluenceError('No module call used ' + ', '.join(names.get(p, '?') for p in params) +
                          ' although the loss depends on it: it is probably used functionally. '
                          'Exclude it with params=.')


# --------------------------------------------------------------------------------------------------
# Reference gradient.


def _acc_dtype(param: Tensor) -> torch.dtype:
    return torch.promote_types(param.dtype, torch.float32)


def _accumulate_gradient(call: _Call, x: Tensor, dy: Tensor, acc: Dict[nn.Parameter, Tensor]) -> None:
    """Add this call's weight/bias gradient (summed over its samples) to ``acc``, in fp32 or wider.

    The same products a backward forms for the weight gradient, from the same input and output
    gradient; computing them here needs neither ``.grad`` nor the (possibly sharded) parameter.
    """
    target, module = call.target, call.module

    def add(param: Optional[nn.Parameter], grad: Callable[[torch.dtype], Tensor]) -> None:
        if param is not None:
            value = grad(_acc_dtype(param))
            if param in acc:
                acc[param] += value
            else:
                acc[param] = value

    if target.kind == _LAYER_NORM:
        shape = tuple(module.normalized_shape)
        add(target.weight, lambda d: (dy.to(d) * F.layer_norm(x.to(d), shape, eps=module.eps))
            .reshape(-1, *shape).sum(0))
        add(target.bias, lambda d: dy.to(d).reshape(-1, *shape).sum(0))
        return
    if target.kind == _EMBEDDING and not x.is_floating_point():

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
    add(target.weight, weight_io if target.kind == _CONV1D else (lambda d: weight_io(d).T))
    add(target.bias, lambda d: dy2.to(d).sum(0))


def _options(micro_batch: Optional[int], autocast_dtype: Optional[torch.dtype],
             checkpoint: bool) -> _Options:
    if micro_batch is not None and micro_batch < 1:
        raise InfluenceError(f'micro_batch must be >= 1, got {micro_batch}.')
    return _Options(micro_batch, autocast_dtype, checkpoint)


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
    net = _unwrap_ddp(model)
    _check_supported(net)
    selected = _select_params(net, params)
    targets = _targets(net, selected)
    options = _options(micro_batch, autocast_dtype, checkpoint)
    device = next((p.device for p in net.parameters()), torch.device('cpu'))
    acc: Dict[nn.Parameter, Tensor] = {}
    sharded = _is_sharded(net)
    chunks = _split(reference_batch, options.micro_batch) if reference_batch is not None else []
    padded = _lockstep(chunks, device) if sharded else chunks
    local = 0
    with _influence_mode(net):
        for k, chunk in enumerate(padded):
            own = k < len(chunks)
            losses, _, _ = _run_pass(net, chunk, loss_fn, targets,
                                     (lambda c, x, dy: _accumulate_gradient(c, x, dy, acc)) if own
                                     else (lambda c, x, dy: None),
                                     options, check_functional=selected if k == 0 else ())
            local += int(losses.shape[0]) if own else 0
    shapes = _full_shapes(net)
    out: ReferenceGradient = OrderedDict()
    for param in selected:
        grad = acc.pop(param, None)
        if grad is None:
            grad = torch.zeros(shapes.get(param, param.shape), dtype=_acc_dtype(param), device=device)
        out[param] = grad
    total = num_samples if num_samples is not None else _global_count(local, device)
    if total < 1:
        raise InfluenceError('The reference set is empty on every rank: give at least one '
                             'reference sample.')
    _all_reduce_sum(list(out.values()))
    for grad in out.values():
        grad.div_(total)
    return out


# --------------------------------------------------------------------------------------------------
# Ghost dot products.


def _dense_dot(x: Tensor, dy: Tensor, g_io: Tensor) -> Tensor:
    """``sum_n <x[b, n] @ g_io, dy[b, n]>`` per ``b`` for ``x: (B, N, I)``, ``dy: (B, N, O)``."""
    if g_io.shape[0] >= g_io.shape[1]:
        return torch.einsum('bno,bno->b', x @ g_io, dy)  # Intermediate (B, N, O), the smaller.
    return torch.einsum('bni,bni->b', dy @ g_io.T, x)  # Intermediate (B, N, I).


def _ghost_dot(call: _Call, x: Tensor, dy: Tensor, grads: ReferenceGradient,
               batch_size: int) -> Tensor:
    """``<per-sample gradient of this call's parameters, G>`` for every sample, shape ``(B,)``.

    Computed in fp32 (or the reference gradient's wider dtype) whatever the activations' dtype, so
    under autocast only the activations themselves carry reduced precision.
    """
    module, target = call.module, call.target
    min_dim = 1 if target.kind == _EMBEDDING else 2  # Token ids may be (B,); features are (B, ..., D).
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

    if target.kind == _EMBEDDING and x.is_floating_point():
        # A tied embedding called as the output layer (e.g. llm-foundry's SharedEmbedding with
        # unembed=True computes x @ W^T): the linear rule with the embedding matrix as W.
        if g_weight is None:
            return score
        x = x.to(dtype).reshape(batch_size, -1, x.shape[-1])
        return _dense_dot(x, dy.reshape(batch_size, -1, dy.shape[-1]), g_weight.to(dtype).T)

    if target.kind == _EMBEDDING:
        if g_weight is None:
            return score
        ids = x.reshape(batch_size, -1)
        rows = g_weight.to(dtype)[ids]  # (B, N, D)
        if module.padding_idx is not None:
            rows = rows.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
        return torch.einsum('bnd,bnd->b', rows, dy.reshape(rows.shape))

    if target.kind == _LAYER_NORM:
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
        score = score + _dense_dot(x, dy, g_io.T if target.kind == _LINEAR else g_io)
    if g_bias is not None:
        score = score + dy.sum(1) @ g_bias.to(dtype)
    return score


def _sample_grads(call: _Call, x: Tensor, dy: Tensor,
                  batch_size: int) -> List[Tuple[nn.Parameter, Tensor]]:
    """This call's share of every sample's parameter gradient: ``(parameter, Tensor[B, ...])``.

    Materialised (``B`` copies of the parameter's shape, one micro-batch at a time) for the
    gradient norms of the cosine reward; the dot products never need it. Integer-id embeddings
    give ``B x num_embeddings x D``: a cost only for an embedding shared with another module
    (a tied output layer), whose norm needs the two uses summed; see :func:`_add_sq_norms`.
    """
    module, target = call.module, call.target
    dtype = torch.promote_types(dy.dtype, torch.float32)
    dy = dy.to(dtype)
    out: List[Tuple[nn.Parameter, Tensor]] = []
    if target.kind == _EMBEDDING and not x.is_floating_point():
        if target.weight is not None:
            ids = x.reshape(batch_size, -1)
            d = dy.reshape(batch_size, ids.shape[1], -1)
            if module.padding_idx is not None:
                d = d.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
            g = d.new_zeros(batch_size, module.num_embeddings, d.shape[-1])
            out.append((target.weight, g.scatter_add_(1, ids.unsqueeze(-1).expand_as(d), d)))
        return out
    if target.kind == _LAYER_NORM:
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
        out.append((target.weight, g.transpose(1, 2) if target.kind == _CONV1D else g))
    if target.bias is not None:
        out.append((target.bias, d.sum(1)))
    return out


def _add_sq_norms(grads: List[Tuple[nn.Parameter, Tensor]], params: ReferenceGradient,
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


def _check_reference_grad(model: nn.Module, reference_grad: ReferenceGradient) -> List[nn.Parameter]:
    if not reference_grad:
        raise InfluenceError('reference_grad is empty.')
    params = list(reference_grad)
    _select_params(model, params)  # Raises for parameters that are not covered.
    shapes = _full_shapes(model)
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
    net = _unwrap_ddp(model)
    _check_supported(net)
    params = _check_reference_grad(net, reference_grad)
    targets = _targets(net, params)
    options = _options(micro_batch, autocast_dtype, checkpoint)
    sharded = _is_sharded(net)
    if verify and sharded:
        raise InfluenceError('verify=True needs parameter gradients, which FSDP shards; verify on '
                             'an unsharded copy of the model.')
    acc_dtype = torch.float32
    for g in reference_grad.values():
        acc_dtype = torch.promote_types(acc_dtype, g.dtype)
    device = next((p.device for p in net.parameters()), torch.device('cpu'))
    chunks = _split(probe_batch, options.micro_batch) if probe_batch is not None else []
    padded = _lockstep(chunks, device) if sharded else chunks
    parts: List[Tensor] = []
    norm_parts: List[Tensor] = []
    # Summed over a pass before squaring: tied weights, and every embedding (llm-foundry's shared
    # embedding is one module called twice, as input and output layer).
    shared = {p for p, owners in _owners(net).items()
              if len(owners) > 1 or any(isinstance(m, nn.Embedding) for m, _ in owners)} \
        if return_norms else set()
    with _influence_mode(net):
        for k, chunk in enumerate(padded):
            own = k < len(chunks)
            size = _leading_dim(chunk)
            scores: List[Tensor] = []
            sq: List[Tensor] = []
            seen: set = set()
            pending: Dict[nn.Parameter, Tensor] = {}

            def on_pair(call: _Call, x: Tensor, dy: Tensor) -> None:
                if own:
                    b = dy.shape[0] if size is None else size
                    score = _ghost_dot(call, x, dy, reference_grad, b)
                    scores.append(score.to(device=device, dtype=acc_dtype))
                    if return_norms:
                        if not sq:
                            sq.append(torch.zeros(b, dtype=acc_dtype, device=device))
                        _add_sq_norms(_sample_grads(call, x, dy, b), reference_grad, shared, seen,
                                      pending, sq[0])

            losses, _, summed = _run_pass(net, chunk, loss_fn, targets, on_pair, options,
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


# --------------------------------------------------------------------------------------------------
# Memory.


def reference_gradient_bytes(model: nn.Module, params: Optional[Iterable[nn.Parameter]] = None) -> int:
    """Bytes of :func:`reference_gradient`'s result on every rank (full shapes, fp32 or wider)."""
    net = _unwrap_ddp(model)
    shapes = _full_shapes(net)
    return sum(math.prod(shapes.get(p, p.shape)) * _acc_dtype(p).itemsize
               for p in _select_params(net, params))


class PeakMemory:
    """Peak memory allocated inside a ``with`` block, above what was allocated when it began.

    On CUDA, the caching allocator's statistics of the current device; on a CPU, the process'
    resident-set high-water mark (Linux ``/proc``; reset on entry), which is exact for large
    tensors when glibc returns them to the system (``MALLOC_MMAP_THRESHOLD_`` small) and otherwise
    counts only what the allocator could not reuse. ``bytes`` is ``None`` where neither exists.
    """

    _STATUS = '/proc/self/status'

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: Optional[int] = None
        self._start = 0

    @classmethod
    def _proc(cls, field: str) -> Optional[int]:
        try:
            with open(cls._STATUS) as f:
                for line in f:
                    if line.startswith(field + ':'):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def __enter__(self) -> 'PeakMemory':
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')  # Resets VmHWM to the current resident set.
            except OSError:
                pass
            self._start = self._proc('VmRSS') or 0
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            peak = self._proc('VmHWM')
            self.bytes = None if peak is None else max(0, peak - self._start)


@dataclass
class InfluenceMemory:
    """What the influence pass adds to a rank's memory (bytes).

    Args:
        reference_gradient (int): The reference gradient, held through the probe passes.
        probe_pass (int, optional): Peak of one probe micro-batch's forward/backward above the
            memory in use before it (measured; ``None`` where it cannot be).
    """
    reference_gradient: int
    probe_pass: Optional[int]

    @property
    def peak(self) -> Optional[int]:
        return None if self.probe_pass is None else self.reference_gradient + self.probe_pass


def influence_memory(model: nn.Module, sample_batch: Any,
                     loss_fn: PerSampleLoss = causal_lm_per_sample_loss,
                     *,
                     autocast_dtype: Optional[torch.dtype] = None,
                     checkpoint: bool = False) -> InfluenceMemory:
    """Measure the influence pass' memory on one probe micro-batch (``sample_batch``, as large as
    the micro-batches will be), with a zero reference gradient. Collective under FSDP."""
    net = _unwrap_ddp(model)
    grad: ReferenceGradient = OrderedDict()
    shapes = _full_shapes(net)
    device = next((p.device for p in net.parameters()), torch.device('cpu'))
    for param in _select_params(net, None):
        grad[param] = torch.zeros(shapes.get(param, param.shape), dtype=_acc_dtype(param), device=device)
    with PeakMemory(device) as peak:
        per_sample_influence(model, sample_batch, grad, loss_fn, autocast_dtype=autocast_dtype,
                             checkpoint=checkpoint)
    return InfluenceMemory(reference_gradient_bytes(model), peak.bytes)
