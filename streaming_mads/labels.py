"""Sidecar labels: per-sample label columns stored beside a stream's ``index.json``.

Labels live in ``<stream>/<split>/mads/`` instead of inside the shards, so an existing MDS dataset of
any size is labelled without being rewritten. Each column is one ``.npy`` array (memory-mapped when
read, so every DataLoader worker on a node shares one copy through the page cache) and
``manifest.json`` names the columns, their vocabularies, the sample count and a fingerprint of the
stream's ``index.json``: if the shards are rewritten, the fingerprint no longer matches and the
labels are refused instead of silently mislabelling samples.

Two kinds of column exist:

* ``categorical``: small integer ids into a vocabulary of value names (domain, topic cluster).
* ``score``: a float32 per sample (e.g. a 0-5 quality score); agents bin it.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from numpy.typing import NDArray

__all__ = [
    'LABELS_DIRNAME', 'MANIFEST_NAME', 'LabelError', 'LabelColumn', 'ColumnInfo', 'StreamLabels',
    'LabelStore', 'categorical', 'score', 'write_labels', 'index_fingerprint', 'labels_dir'
]

LABELS_DIRNAME = 'mads'
MANIFEST_NAME = 'manifest.json'
INDEX_NAME = 'index.json'
FORMAT = 'mads-labels'
FORMAT_VERSION = 1
CATEGORICAL = 'categorical'
SCORE = 'score'


class LabelError(ValueError):
    """Sidecar labels are missing, stale or inconsistent with their stream."""


def labels_dir(split_dir: str) -> str:
    """Directory of the sidecar labels of the stream whose ``index.json`` is in ``split_dir``."""
    return os.path.join(split_dir, LABELS_DIRNAME)


def index_fingerprint(split_dir: str) -> str:
    """SHA-256 of the stream's ``index.json`` bytes: changes whenever its shards are rewritten."""
    path = os.path.join(split_dir, INDEX_NAME)
    if not os.path.isfile(path):
        raise LabelError(f'No MDS index at {path}: labels belong beside a stream\'s index.json.')
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def _num_samples_in_index(split_dir: str) -> int:
    with open(os.path.join(split_dir, INDEX_NAME)) as f:
        obj = json.load(f)
    return int(sum(shard['samples'] for shard in obj['shards']))


@dataclass(frozen=True)
class LabelColumn:
    """One column to write: ``values`` per sample, and a vocabulary when categorical.

    Args:
        values (NDArray): Integer ids into ``vocab`` (categorical) or float scores (score).
        vocab (Sequence[str], optional): Value names of a categorical column; ``None`` for a score.
    """
    values: NDArray
    vocab: Optional[tuple[str, ...]] = None


def categorical(values: Union[Sequence[str], NDArray], vocab: Optional[Sequence[str]] = None) -> LabelColumn:
    """A categorical column, from value names (vocabulary sorted) or from ids with their ``vocab``."""
    arr = np.asarray(values)
    if vocab is None:
        if arr.dtype.kind not in 'UOS':
            raise LabelError('categorical(): pass value names, or integer ids together with `vocab`.')
        names, ids = np.unique(arr.astype(str), return_inverse=True)
        return LabelColumn(ids.astype(np.int64), tuple(str(n) for n in names))
    if arr.dtype.kind not in 'iu':
        raise LabelError('categorical(): with `vocab`, `values` must be integer ids into it.')
    return LabelColumn(arr.astype(np.int64), tuple(str(v) for v in vocab))


def score(values: Union[Sequence[float], NDArray]) -> LabelColumn:
    """A continuous score column (stored as float32)."""
    return LabelColumn(np.asarray(values, dtype=np.float32), None)


def _id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32)


def _atomic_save(path: str, arr: NDArray) -> None:
    tmp = f'{path}.{uuid.uuid4().hex}.tmp.npy'
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, path)


def write_labels(split_dir: str, columns: Mapping[str, LabelColumn], merge: bool = True) -> dict[str, Any]:
    """Write sidecar label columns for the stream whose ``index.json`` is in ``split_dir``.

    Columns are written to temporary files and renamed, and the manifest is written last, so a
    crash never leaves a manifest pointing at a partial column.

    Args:
        split_dir (str): Directory holding the stream's ``index.json`` (``<local>/<split>``).
        columns (Mapping[str, LabelColumn]): Column name to column (see :func:`categorical` and
            :func:`score`). Every column must have one value per sample of the stream.
        merge (bool): Keep columns already labelled (same fingerprint) that are not in
            ``columns``. Defaults to ``True``.

    Returns:
        dict[str, Any]: The manifest written.
    """
    fingerprint = index_fingerprint(split_dir)
    num_samples = _num_samples_in_index(split_dir)
    out_dir = labels_dir(split_dir)
    os.makedirs(out_dir, exist_ok=True)
    manifest: dict[str, Any] = {
        'format': FORMAT,
        'version': FORMAT_VERSION,
        'num_samples': num_samples,
        'index_fingerprint': fingerprint,
        'columns': {},
    }
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if merge and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        if old.get('index_fingerprint') == fingerprint and old.get('num_samples') == num_samples:
            manifest['columns'].update(old.get('columns', {}))
    for name, col in columns.items():
        if not name or os.sep in name or name.startswith('.'):
            raise LabelError(f'Invalid label column name {name!r}.')
        values = np.asarray(col.values)
        if values.ndim != 1 or len(values) != num_samples:
            raise LabelError(f'Label column {name!r} has shape {values.shape}, but the stream at '
                             f'{split_dir} has {num_samples} samples: give one value per sample.')
        entry: dict[str, Any] = {'file': f'{name}.npy'}
        if col.vocab is not None:
            vocab = list(col.vocab)
            if len(set(vocab)) != len(vocab):
                raise LabelError(f'Label column {name!r} has duplicate vocabulary entries.')
            if len(values) and (values.min() < 0 or values.max() >= len(vocab)):
                raise LabelError(f'Label column {name!r} has ids outside its vocabulary of '
                                 f'{len(vocab)} values.')
            stored = values.astype(_id_dtype(len(vocab)))
            entry.update(kind=CATEGORICAL, values=vocab,
                         counts=np.bincount(stored, minlength=len(vocab)).tolist())
        else:
            stored = values.astype(np.float32)
            if not np.isfinite(stored).all():
                raise LabelError(f'Score column {name!r} has NaN or infinite values: score every '
                                 'sample with a finite number.')
            entry.update(kind=SCORE,
                         min=float(stored.min()) if len(stored) else 0.0,
                         max=float(stored.max()) if len(stored) else 0.0)
        entry['dtype'] = stored.dtype.name
        _atomic_save(os.path.join(out_dir, entry['file']), stored)
        manifest['columns'][name] = entry
    tmp = f'{manifest_path}.{uuid.uuid4().hex}.tmp'
    with open(tmp, 'w') as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, manifest_path)
    return manifest


@dataclass(frozen=True)
class ColumnInfo:
    """A label column as seen across all streams of a dataset.

    Args:
        name (str): Column name.
        kind (str): ``'categorical'`` or ``'score'``.
        values (tuple[str, ...]): Vocabulary (union over streams, in first-seen order); empty for
            scores.
        counts (NDArray): Samples per vocabulary value (categorical); empty for scores.
    """
    name: str
    kind: str
    values: tuple[str, ...]
    counts: NDArray


class StreamLabels:
    """The validated, memory-mapped sidecar labels of one stream.

    Args:
        split_dir (str): Local directory holding the stream's ``index.json``.
        num_samples (int): Samples in the stream (from its index).
        stream_name (str): How to name the stream in errors.
    """

    def __init__(self, split_dir: str, num_samples: int, stream_name: str) -> None:
        self.split_dir = split_dir
        self.stream_name = stream_name
        path = os.path.join(labels_dir(split_dir), MANIFEST_NAME)
        fix = f'label it with `mads label {split_dir}` (or streaming_mads.write_labels)'
        if not os.path.isfile(path):
            raise LabelError(f'Stream {stream_name} has no MADS labels ({path} is missing): {fix}.')
        with open(path) as f:
            manifest = json.load(f)
        if manifest.get('format') != FORMAT:
            raise LabelError(f'{path} is not a MADS label manifest.')
        if manifest.get('num_samples') != num_samples:
            raise LabelError(f'Labels of stream {stream_name} cover {manifest.get("num_samples")} '
                             f'samples but the stream has {num_samples}: re-{fix[0:]}.')
        if manifest.get('index_fingerprint') != index_fingerprint(split_dir):
            raise LabelError(f'Labels of stream {stream_name} are stale: its index.json changed '
                             f'since they were written (shards rewritten?). Re-{fix}.')
        self.manifest = manifest
        self.num_samples = num_samples
        self._arrays: dict[str, NDArray] = {}

    @property
    def columns(self) -> dict[str, dict[str, Any]]:
        """Manifest entries by column name."""
        return self.manifest['columns']

    def array(self, column: str) -> NDArray:
        """The column's values, memory-mapped read-only, validated on first access."""
        arr = self._arrays.get(column)
        if arr is not None:
            return arr
        entry = self.columns.get(column)
        if entry is None:
            raise LabelError(f'Stream {self.stream_name} has no label column {column!r} (it has '
                             f'{sorted(self.columns)}): label it with that column or change the '
                             'agent\'s `column`.')
        path = os.path.join(labels_dir(self.split_dir), entry['file'])
        if not os.path.isfile(path):
            raise LabelError(f'Label file {path} of stream {self.stream_name} is missing: '
                             f're-run `mads label {self.split_dir}`.')
        arr = np.load(path, mmap_mode='r', allow_pickle=False)
        if arr.shape != (self.num_samples,):
            raise LabelError(f'Label column {column!r} of stream {self.stream_name} has '
                             f'{arr.shape[0] if arr.ndim else 0} values for {self.num_samples} '
                             f'samples: re-run `mads label {self.split_dir}`.')
        if entry['kind'] == CATEGORICAL:
            if arr.dtype.kind not in 'iu':
                raise LabelError(f'Categorical column {column!r} of {self.stream_name} is not integer.')
            if self.num_samples and (int(arr.max()) >= len(entry['values']) or int(arr.min()) < 0):
                raise LabelError(f'Label column {column!r} of stream {self.stream_name} has value '
                                 f'id {int(arr.max())}, unknown to its vocabulary of '
                                 f'{len(entry["values"])} values: re-run `mads label '
                                 f'{self.split_dir}`.')
        elif not np.isfinite(arr).all():
            raise LabelError(f'Score column {column!r} of stream {self.stream_name} has NaN/inf '
                             f'values: re-run `mads label {self.split_dir}`.')
        self._arrays[column] = arr
        return arr

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_arrays'] = {}  # Memory maps are reopened lazily in each worker.
        return state


def fetch_labels(stream: Any) -> None:
    """Download a remote stream's sidecar labels next to its local ``index.json`` if missing.

    Uses Streaming's own downloader (every backend Streaming supports, with its retries), into a
    temporary name renamed into place, so several ranks of a node may race harmlessly.
    """
    from streaming_mads.streaming_internals import download_file
    if not stream.remote:
        return
    local_dir = labels_dir(os.path.join(stream.local, stream.split or ''))
    os.makedirs(local_dir, exist_ok=True)

    def get(basename: str) -> str:
        rel = f'{LABELS_DIRNAME}/{basename}'
        dest = os.path.join(local_dir, basename)
        if not os.path.isfile(dest):
            tmp = f'{rel}.{uuid.uuid4().hex}.tmp'
            try:
                os.replace(download_file(stream, rel, tmp), dest)
            except Exception as err:  # Streaming raises backend-specific errors.
                raise LabelError(f'Could not download MADS labels {rel} of stream '
                                 f'{stream.remote}: {err}. Label the remote stream with '
                                 f'`mads label {stream.remote}`.') from err
        return dest

    with open(get(MANIFEST_NAME)) as f:
        manifest = json.load(f)
    for entry in manifest.get('columns', {}).values():
        get(entry['file'])


class LabelStore:
    """Label columns of every stream of a dataset, addressed by global sample id.

    Categorical vocabularies are merged across streams (union, first-seen order) so that, for
    example, a ``domain`` column whose streams each hold one domain becomes one agent over all
    domains.

    Args:
        streams (Sequence[StreamLabels]): Labels of each stream, in dataset stream order.
        sample_offsets (NDArray[np.int64]): Global id of each stream's first sample.
    """

    def __init__(self, streams: Sequence[StreamLabels], sample_offsets: NDArray[np.int64]) -> None:
        self.streams = list(streams)
        self.offsets = np.asarray(sample_offsets, np.int64)
        self._info: dict[str, ColumnInfo] = {}
        self._remaps: dict[str, list[NDArray[np.int64]]] = {}

    def info(self, column: str) -> ColumnInfo:
        """The column's kind, merged vocabulary and value counts; errors name what is wrong."""
        if column in self._info:
            return self._info[column]
        kinds = set()
        vocab: dict[str, int] = {}
        remaps = []
        for stream in self.streams:
            stream.array(column)  # Validates presence, length and ids.
            entry = stream.columns[column]
            kinds.add(entry['kind'])
            if entry['kind'] == CATEGORICAL:
                remap = [vocab.setdefault(v, len(vocab)) for v in entry['values']]
                remaps.append(np.asarray(remap, np.int64))
        if len(kinds) != 1:
            raise LabelError(f'Label column {column!r} is categorical in some streams and a score '
                             'in others: label every stream the same way.')
        kind = kinds.pop()
        counts = np.zeros(len(vocab), np.int64)
        if kind == CATEGORICAL:
            for stream, remap in zip(self.streams, remaps):
                np.add.at(counts, remap, np.asarray(stream.columns[column]['counts'], np.int64))
            self._remaps[column] = remaps
        info = ColumnInfo(column, kind, tuple(vocab), counts)
        self._info[column] = info
        return info

    def gather(self, column: str, sample_ids: NDArray[np.int64]) -> NDArray:
        """Values of ``column`` for global ``sample_ids`` (merged ids for categorical columns)."""
        info = self.info(column)
        ids = np.asarray(sample_ids, np.int64)
        categorical_ = info.kind == CATEGORICAL
        out = np.empty(len(ids), np.int64 if categorical_ else np.float32)
        if len(self.streams) == 1:
            stream_of = np.zeros(len(ids), np.int64)
        else:
            stream_of = np.searchsorted(self.offsets, ids, side='right') - 1
        for s in (range(1) if len(self.streams) == 1 else np.unique(stream_of)):
            mask = stream_of == s if len(self.streams) > 1 else slice(None)
            vals = self.streams[s].array(column)[ids[mask] - self.offsets[s]]
            out[mask] = self._remaps[column][s][vals] if categorical_ else vals
        return out

    def binned_counts(self, column: str, edges: NDArray, chunk: int = 1 << 22) -> NDArray[np.int64]:
        """Samples per bin of a score column (bins as ``np.searchsorted(edges, x, 'right')``).

        Reads each stream's memory map in chunks, so it stays cheap in memory for any size.
        """
        edges = np.asarray(edges, np.float64)
        counts = np.zeros(len(edges) + 1, np.int64)
        for stream in self.streams:
            arr = stream.array(column)
            for start in range(0, len(arr), chunk):
                bins = np.searchsorted(edges, arr[start:start + chunk], side='right')
                counts += np.bincount(bins, minlength=len(counts))
        return counts
