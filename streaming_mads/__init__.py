"""streaming-mads: online multi-agent collaborative data selection for Streaming and Composer.

The public API; the layers behind it are described in docs/architecture.md ("Layout").
"""

from streaming_mads.collate import TokenCollator
from streaming_mads.labels import LabelError, categorical, score, write_labels
from streaming_mads.selection.agents import (Agent, BinnedAgent, CategoricalAgent, DomainAgent,
                                             QualityAgent, TopicAgent, build_agent)
from streaming_mads.selection.board import VersionTimeoutError, WeightBoard, Weights
from streaming_mads.selection.dataset import MADSDataset

__version__ = '0.1.0'

__all__ = [
    'MADSDataset', 'Agent', 'BinnedAgent', 'CategoricalAgent', 'QualityAgent', 'DomainAgent',
    'TopicAgent', 'build_agent', 'WeightBoard', 'Weights', 'VersionTimeoutError', 'LabelError',
    'categorical', 'score', 'write_labels', 'TokenCollator'
]
