"""The pass both influence computations share: one forward/backward that hands every covered
module call's input and output gradient to a callback, one module at a time.

The reference gradient sums what the callback receives; the probe pass contracts it with the
reference gradient. Gradients are taken with respect to activations only, never parameters.
See docs/architecture.md ("Ghost influence").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from streaming_mads.influence.base import Call, InfluenceError, PerSampleLoss, Target
from streaming_mads.influence.batches import leading_dim
from streaming_mads.influence.checkpointing import (Region, blocks_to_checkpoint, checkpointed, tracked,
                                                    wrapped_blocks)
from streaming_mads.influence.losses import per_sample_losses


@dataclass
class Options:
    """How a pass runs: micro-batch size, autocast dtype and activation checkpointing."""
    micro_batch: Optional[int] = None
    autocast_dtype: Optional[torch.dtype] = None
    checkpoint: bool = False


OnPair = Callable[[Call, Tensor, Tensor], None]
"""``on_pair(call, input, output_grad)``: consumes one module call; both tensors are dropped after."""


def pass_options(micro_batch: Optional[int], autocast_dtype: Optional[torch.dtype],
                 checkpoint: bool) -> Options:
    """The pass options, with ``micro_batch`` checked."""
    if micro_batch is not None and micro_batch < 1:
        raise InfluenceError(f'micro_batch must be >= 1, got {micro_batch}.')
    return Options(micro_batch, autocast_dtype, checkpoint)


def run_pass(net: nn.Module, batch: Any, loss_fn: PerSampleLoss,
             targets: 'Mapping[nn.Module, Target]', on_pair: OnPair, options: Options,
             extra_inputs: Sequence[Tensor] = (),
             check_functional: Sequence[nn.Parameter] = ()
             ) -> Tuple[Tensor, List[Call], List[Optional[Tensor]]]:
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
    expected_batch = leading_dim(batch)
    zeros: Dict[torch.device, Tensor] = {}
    calls: List[Call] = []
    versions: List[Tuple[Tensor, int]] = []
    current: List[Optional[Region]] = [None]
    backward = [False]
    expanded = [False]

    def pair(call: Call) -> None:
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
        call = Call(module, targets[module], None if region is not None else x)
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
    wrapped = wrapped_blocks(net)
    blocks = blocks_to_checkpoint(net) if options.checkpoint and not wrapped else []
    handles = [m.register_forward_hook(record, with_kwargs=True) for m in targets]
    try:
        with tracked(wrapped, current, backward), checkpointed(blocks, current):
            with autocast:
                losses = per_sample_losses(loss_fn, net, batch)
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


def _uncalled_but_used(losses: Tensor, calls: Sequence[Call],
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
