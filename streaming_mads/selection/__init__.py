"""Selection in the DataLoader workers: agents score candidates, pools keep the best ``B`` of ``r*B``.

``dataset`` (``MADSDataset``) reads the published weights from the ``board`` by the ``schedule``,
forms ``pools`` of candidates and keeps by the combined ``scores`` of the ``agents`` in the
selection ``step``. See docs/architecture.md.
"""

from streaming_mads.selection.agents import Agent, build_agent, build_agents
from streaming_mads.selection.board import VersionTimeoutError, WeightBoard, Weights
from streaming_mads.selection.dataset import MADSDataset
from streaming_mads.selection.schedule import Schedule

__all__ = ['MADSDataset', 'Agent', 'build_agent', 'build_agents', 'WeightBoard', 'Weights',
           'VersionTimeoutError', 'Schedule']
