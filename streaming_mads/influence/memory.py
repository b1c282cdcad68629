"""What the influence pass costs in memory, so the console can report it before training.

The reference gradient is held in full, in fp32 or wider, on every rank (even under FSDP), and
a probe micro-batch's forward/backward peaks on top of it; :func:`influence_memory` measures
both. See docs/architecture.md ("The influence pass at scale", memory).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn

from streaming_mads.influence.base import (PerSampleLoss, ReferenceGradient, acc_dtype, select_params,
                                           unwrap_ddp)
from streaming_mads.influence.losses import causal_lm_per_sample_loss
from streaming_mads.influence.probes import per_sample_influence
from streaming_mads.influence.state import full_shapes


def reference_gradient_bytes(model: nn.Module, params: Optional[Iterable[nn.Parameter]] = None) -> int:
    """Bytes of :func:`reference_gradient`'s result on every rank (full shapes, fp32 or wider)."""
    net = unwrap_ddp(model)
    shapes = full_shapes(net)
    return sum(math.prod(shapes.get(p, p.shape)) * acc_dtype(p).itemsize
               for p in select_params(net, params))


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
    net = unwrap_ddp(model)
    grad: ReferenceGradient = OrderedDict()
    shapes = full_shapes(net)
    device = next((p.device for p in net.parameters()), torch.device('cpu'))
    for param in select_params(net, None):
        grad[param] = torch.zeros(shapes.get(param, param.shape), dtype=acc_dtype(param), device=device)
    with PeakMemory(device) as peak:
        per_sample_influence(model, sample_batch, grad, loss_fn, autocast_dtype=autocast_dtype,
                             checkpoint=checkpoint)
    return InfluenceMemory(reference_gradient_bytes(model), peak.bytes)
