"""The files ``mads label`` keeps between its passes, and the check of what it finally wrote.

A run is resumable because every finished shard leaves a file under ``<split>/mads/.work/``;
those files are only reused if they were made with the same settings, which is what the keys here
decide. The helpers that turn the per-shard files back into whole-stream columns, and that re-read
the written labels to compare them with what was computed, sit beside them.
See docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
from numpy.typing import NDArray

from streaming_mads.labeling.streams import StreamRef
from streaming_mads.labels import LabelColumn, LabelError, StreamLabels, categorical, labels_dir
from streaming_mads.labeling.topics import TermRows

__all__ = ['WORK_DIRNAME', 'TOPICS_DIRNAME', 'SIMILARITY_DIRNAME', 'WORK_VERSION', 'work_key', 'prepare_work',
           'merge_domains', 'concat_rows', 'validate_labels']

WORK_DIRNAME = '.work'
TOPICS_DIRNAME = 'topics'
SIMILARITY_DIRNAME = 'similarity'
WORK_VERSION = 1


def work_key(obj: Any) -> str:
    """A stable hash of ``obj`` (JSON with sorted keys; other objects by ``str``).

    Args:
        obj (Any): The settings a work file depends on.

    Returns:
        str: Hex SHA-256.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def prepare_work(work: str, key: str, restart: bool, prefix: str) -> None:
    """Keep the work files of ``prefix`` only if made with the same ``key``.

    Args:
        work (str): The work directory (created if missing).
        key (str): :func:`work_key` of the settings of this run.
        restart (bool): Discard the files whatever their key.
        prefix (str): The pass (``score``, ``topic``) whose files ``<prefix>-*`` are kept or
            removed.
    """
    os.makedirs(work, exist_ok=True)
    state_path = os.path.join(work, f'{prefix}.key')
    old = None
    if os.path.isfile(state_path):
        with open(state_path) as f:
            old = f.read().strip()
    if restart or old != key:
        for name in os.listdir(work):
            if name.startswith(prefix + '-'):
                os.remove(os.path.join(work, name))
        with open(state_path, 'w') as f:
            f.write(key)


def merge_domains(parts: list[tuple[NDArray, NDArray]]) -> LabelColumn:
    """One categorical column (sorted vocabulary) from per-shard vocabularies and ids.

    Args:
        parts (list[tuple[NDArray, NDArray]]): Per shard, its vocabulary and its samples' ids.

    Returns:
        LabelColumn: The stream's domain column.
    """
    vocab = np.unique(np.concatenate([v for v, _ in parts]))
    ids = [np.searchsorted(vocab, v).astype(np.int64)[i] for v, i in parts]
    return categorical(np.concatenate(ids), vocab=[str(v) for v in vocab])


def concat_rows(parts: list[TermRows], names: dict[int, str]) -> TermRows:
    """The term rows of several shards as one (CSR offsets shifted), with the given bucket names.

    Args:
        parts (list[TermRows]): Per shard, the term rows of its topic-fit samples.
        names (dict[int, str]): Display word of each hashed bucket.

    Returns:
        TermRows: All rows, in order.
    """
    if not parts:
        return TermRows(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), names)
    indptr = [np.zeros(1, np.int64)]
    offset = 0
    for p in parts:
        indptr.append(p.indptr[1:] + offset)
        offset += int(p.indptr[-1])
    return TermRows(np.concatenate(indptr), np.concatenate([p.buckets for p in parts]),
                    np.concatenate([p.counts for p in parts]), names)


def validate_labels(s: StreamRef, cols: dict[str, LabelColumn]) -> None:
    """Re-open the written labels and check they hold exactly what was computed.

    Args:
        s (StreamRef): The stream labelled.
        cols (dict[str, LabelColumn]): The columns written to it.
    """
    labels = StreamLabels(s.local, s.num_samples, s.name)
    for name, col in cols.items():
        arr = np.asarray(labels.array(name))
        entry = labels.columns[name]
        if col.vocab is not None:
            ok = (tuple(entry['values']) == col.vocab and
                  np.array_equal(arr.astype(np.int64), col.values))
        else:
            ok = np.array_equal(arr, col.values.astype(np.float32))
        if not ok:
            raise LabelError(f'Label column {name!r} of stream {s.name} does not read back as '
                             'written (disk full, or another process writing '
                             f'{labels_dir(s.local)}?): re-run mads label.')
