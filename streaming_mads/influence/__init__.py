"""Influence of candidate samples on the reference loss, measured on the live model (console side).

See docs/architecture.md for the math and how it runs under DDP, FSDP and mixed precision.
"""

from streaming_mads.influence.influence import (InfluenceError, PerSampleLoss, ReferenceGradient,
                                                compute_influence, reference_gradient)

__all__ = [InfluenceError, PerSampleLoss, ReferenceGradient, compute_influence,
           reference_gradient]
