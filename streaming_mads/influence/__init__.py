"""Influence of candidate samples on the reference loss, measured on the live model (console side).

``base`` (shared types, covered parameters), ``losses``, ``state`` (eval mode, FSDP), ``batches``,
``checkpointing`` and ``passes`` (the hooked forward/backward), ``reference`` (the reference
gradient), ``ghost`` and ``probes`` (per-sample influence), ``memory``, ``preconditioning`` (Adam).
See docs/architecture.md for the math and how it runs under DDP, FSDP and mixed precision.
"""

from streaming_mads.influence.base import (InfluenceError, PerSampleLoss, ReferenceGradient,
                                           covered_parameters, unwrap_ddp)
from streaming_mads.influence.losses import causal_lm_per_sample_loss
from streaming_mads.influence.memory import (InfluenceMemory, PeakMemory, influence_memory,
                                             reference_gradient_bytes)
from streaming_mads.influence.probes import compute_influence, per_sample_influence
from streaming_mads.influence.reference import reference_gradient
from streaming_mads.influence.state import influence_mode

__all__ = ['InfluenceError', 'PerSampleLoss', 'ReferenceGradient', 'covered_parameters',
           'unwrap_ddp', 'causal_lm_per_sample_loss', 'influence_mode', 'reference_gradient',
           'per_sample_influence', 'compute_influence', 'reference_gradient_bytes',
           'InfluenceMemory', 'influence_memory', 'PeakMemory']
