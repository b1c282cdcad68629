"""Activation checkpointing inside an influence pass: which module call a recomputation repeats.

With checkpointing a block's inputs exist only when the backward recomputes it, so the pass' hooks
must tell a first run from its recomputation and hand each recomputed input to the call it
repeats. A block is either checkpointed here (``checkpoint=True``) or already wrapped by the model
(torch's ``CheckpointWrapper``). See docs/architecture.md ("The influence pass at scale", memory).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from torch import nn

from streaming_mads.influence.base import Call


class Region:
    """One call of a checkpointed block; its second run is the recomputation in the backward."""

    def __init__(self) -> None:
        self.runs = 0
        self.index = 0
        self.calls: List[Call] = []


def wrapped_blocks(model: nn.Module) -> List[nn.Module]:
    """Blocks the model checkpoints itself (torch's ``CheckpointWrapper``, as Composer's and
    llm-foundry's ``activation_checkpointing`` apply): the modules each wrapper recomputes."""
    return [m._checkpoint_wrapped_module for m in model.modules()
            if 'CheckpointWrapper' in type(m).__name__ and hasattr(m, '_checkpoint_wrapped_module')]


@contextlib.contextmanager
def tracked(blocks: Sequence[nn.Module], current: List[Optional[Region]],
            backward: List[bool]) -> Iterator[None]:
    """Track the model's own checkpointed blocks as regions: each forward call opens one; in the
    backward, a recomputation reopens the latest one of that block not yet recomputed (blocks are
    recomputed in reverse order)."""
    pending: Dict[nn.Module, List[Region]] = {}
    outer: List[Optional[Region]] = []

    def enter(module: nn.Module, args: Any) -> None:
        if backward[0]:
            region = pending[module].pop()
            region.index = 0
        else:
            region = Region()
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


def blocks_to_checkpoint(model: nn.Module) -> List[nn.Module]:
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
def checkpointed(blocks: Sequence[nn.Module], current: List[Optional[Region]]) -> Iterator[None]:
    """Run every block under non-reentrant activation checkpointing; ``current[0]`` is the region
    (block call) executing, so hooks know which calls a recomputation repeats."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:

        def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
            region = Region()

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
