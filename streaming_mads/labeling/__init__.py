"""Offline labelling: ``mads label`` and ``mads inspect`` (domain, quality, topic, similarity).

Streams are found and read in ``streams``, the two passes run in ``jobs`` over the work files of
``work``, and the labels are uploaded beside a remote index by ``upload``. See docs/architecture.md.
"""

from streaming_mads.labeling.inspect import inspect_dataset
from streaming_mads.labeling.label import LabelReport, label_dataset
from streaming_mads.labeling.streams import LabelingError

__all__ = ['label_dataset', 'inspect_dataset', 'LabelReport', 'LabelingError']
