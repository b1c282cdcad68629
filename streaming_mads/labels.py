"""Sidecar labels: per-sample label columns stored beside a stream's ``index.json``.

Labels live in ``<stream>/<split>/mads/`` instead of inside the shards, so an existing MDS dataset of
any size is labelled without being rewritten. Each column is one ``.npy`` array (memory-mapped when
read, so every DataLoader worker on a node shares one copy through the page cache) and
``manifest.json`` names the columns, their vocabularies, the sample count and a fingerprint of the
stream's ``index.json``: if the shards are rewritten, the fingerprint no longer matches and the
labels are refused instead of silently mislabelling samples.

Labels are bound to shard *content*, not only to the index: ``mads convert`` records a hash of
every shard in ``index.json`` (so the fingerprint covers content), and for an index without shard
hashes the manifest records its own hash of each shard file, checked on the first local shard
when the labels are opened. Two corpora with the same sample count and a byte-identical
``index.json`` (e.g. uncompressed fixed-length samples) therefore do not share labels. Each column
file's checksum is in the manifest too, so a corrupted or truncated ``.npy`` is an error naming the
file, never plausible-looking labels.

Two kinds of column exist:

* ``categorical``: small integer ids into a vocabulary of value names (domain, topic cluster).
* ``score``: a float32 per sample (e.g. a 0-5 quality score); agents bin it.

The manifest also records what the labels were computed with, so a dataset mixing streams
labelled apart is refused instead of silently merged: the ``tokenizer`` that decoded token ids
(kind, size, EOS, vocabulary fingerprint; compared by :mod:`streaming_mads.checks`), and per column
its ``fit``: ``{'model': 'topics', 'id': ...}`` for a column read off a fitted model (the same value
name means the same thing only within one fit, so :class:`LabelStore` refuses streams whose fits
differ), or a description such as ``{'source': 'stream'}`` (domain) or ``{'scorer': ...}``.
Manifests written before these fields still load, with a warning where a check is skipped.
docs/architecture.md ("Labels") has the long form.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from numpy.typing import NDArray

from streaming_mads.remote import contained_path
from streaming_mads.shard_check import SHARD_FILE_KEYS as _SHARD_FILE_KEYS

__all__ = [
    'LABELS_DIRNAME', 'MANIFEST_NAME', 'LabelError', 'LabelColumn', 'ColumnInfo', 'StreamLabels',
    'LabelStore', 'categorical', 'score', 'write_labels', 'index_fingerprint', 'labels_dir',
    'shard_hashes', 'CONTENT_HASH', 'atomic_save_npy', 'atomic_save_npz', 'check_index_names',
    'read_manifest', 'describe_tokenizer', 'FITTED_COLUMNS', 'REUSE_OPTIONS'
]

LABELS_DIRNAME = 'mads'
MANIFEST_NAME = 'manifest.json'
INDEX_NAME = 'index.json'
FORMAT = 'mads-labels'
FORMAT_VERSION = 1
CATEGORICAL = 'categorical'
SCORE = 'score'
# Hash of column files and of shards (when index.json has none): fast (GB/s), in Streaming's deps.
CONTENT_HASH = 'xxh3_64'
_CHUNK = 1 << 24
#: Columns ``mads label`` reads off a model fitted on the data (their value names mean something
#: only within one fit); manifests from before fits were recorded are warned about for these.
FITTED_COLUMNS = ('topic', 'similarity')
#: ``mads label`` option that reuses another labelled dataset's model, per fitted column.
REUSE_OPTIONS = {'topic': '--topics-from', 'similarity': '--similarity-from'}


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


def read_manifest(split_dir: str) -> Optional[dict[str, Any]]:
    """The label manifest of the stream whose ``index.json`` is in ``split_dir``, or ``None``
    when it has none (read as it is: :class:`StreamLabels` validates it against the stream).

    Args:
        split_dir (str): Directory holding the stream's ``index.json``.

    Returns:
        dict[str, Any], optional: The parsed manifest.
    """
    path = os.path.join(labels_dir(split_dir), MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        manifest = json.load(f)
    if manifest.get('format') != FORMAT:
        raise LabelError(f'{path} is not a MADS label manifest.')
    return manifest


def _num_samples_in_index(split_dir: str) -> int:
    return int(sum(shard['samples'] for shard in _read_index(split_dir)['shards']))


def _read_index(split_dir: str) -> dict[str, Any]:
    with open(os.path.join(split_dir, INDEX_NAME)) as f:
        index = json.load(f)
    check_index_names(index, split_dir)
    return index


def check_index_names(index: dict[str, Any], split_dir: str,
                      error: type[Exception] = LabelError) -> None:
    """Refuse an ``index.json`` whose shard file names would reach outside ``split_dir``.

    Args:
        index (dict[str, Any]): The parsed index.
        split_dir (str): Directory holding it (the names are relative to it).
        error (type[Exception]): The caller's error class. Defaults to :class:`LabelError`.
    """
    source = f'a shard file name in {os.path.join(split_dir, INDEX_NAME)}'
    for shard in index.get('shards') or []:
        for key in _SHARD_FILE_KEYS:
            info = shard.get(key) if isinstance(shard, dict) else None
            if info:
                contained_path(split_dir, info.get('basename') if isinstance(info, dict) else info,
                               source, error)


def file_hash(path: str) -> str:
    """``CONTENT_HASH`` hex digest of a file, read in chunks (memory stays flat for any size)."""
    import xxhash
    digest = xxhash.xxh3_64()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _stored_file(shard: dict[str, Any]) -> dict[str, Any]:
    """The index entry of the file a shard is stored as (compressed if it is compressed)."""
    return shard.get('zip_data') or shard.get('raw_data') or {}


def shard_hashes(split_dir: str) -> Optional[dict[str, Any]]:
    """Content hashes binding labels to the stream's shards, for an index that records none.

    Returns ``None`` when every shard's hash is in ``index.json`` (``mads convert`` writes them:
    the index fingerprint then already changes with content) or no shard file is present locally
    (e.g. a remote stream's cache); otherwise ``{'algo', 'shards': {basename: hex}}`` over the
    shard files present.
    """
    shards = _read_index(split_dir).get('shards', [])
    if all(_stored_file(s).get('hashes') for s in shards):
        return None
    found = {}
    for shard in shards:
        name = _stored_file(shard).get('basename', '')
        path = os.path.join(split_dir, name)
        if name and os.path.isfile(path):
            found[name] = file_hash(path)
    return {'algo': CONTENT_HASH, 'shards': found} if found else None


@dataclass(frozen=True)
class LabelColumn:
    """One column to write: ``values`` per sample, and a vocabulary when categorical.

    Args:
        values (NDArray): Integer ids into ``vocab`` (categorical) or float scores (score).
        vocab (Sequence[str], optional): Value names of a categorical column; ``None`` for a score.
        fit (dict, optional): What produced the values (recorded in the manifest): with a
            ``model`` and its ``id`` for values read off a fitted model (streams must then share
            the fit), else a description (``{'source': 'stream'}``). Defaults to ``None``.
    """
    values: NDArray
    vocab: Optional[tuple[str, ...]] = None
    fit: Optional[dict[str, Any]] = None


def categorical(values: Union[Sequence[str], NDArray], vocab: Optional[Sequence[str]] = None,
                fit: Optional[dict[str, Any]] = None) -> LabelColumn:
    """A categorical column, from value names (vocabulary sorted) or from ids with their
    ``vocab``; ``fit`` as :class:`LabelColumn`'s."""
    arr = np.asarray(values)
    if vocab is None:
        if arr.dtype.kind not in 'UOS':
            raise LabelError('categorical(): pass value names, or integer ids together with `vocab`.')
        names, ids = np.unique(arr.astype(str), return_inverse=True)
        return LabelColumn(ids.astype(np.int64), tuple(str(n) for n in names), fit)
    if arr.dtype.kind not in 'iu':
        raise LabelError('categorical(): with `vocab`, `values` must be integer ids into it.')
    return LabelColumn(arr.astype(np.int64), tuple(str(v) for v in vocab), fit)


def score(values: Union[Sequence[float], NDArray], fit: Optional[dict[str, Any]] = None) -> LabelColumn:
    """A continuous score column (stored as float32); ``fit`` as :class:`LabelColumn`'s."""
    return LabelColumn(np.asarray(values, dtype=np.float32), None, fit)


def _id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.int32)


def atomic_save_npy(path: str, arr: NDArray) -> None:
    """Save ``arr`` as a ``.npy`` file at ``path`` without ever leaving a partial file there.

    The array is written to a uniquely named temporary file beside ``path`` and renamed into place,
    so readers (and an interrupted run resuming) see either the old file or the whole new one.

    Args:
        path (str): Destination file.
        arr (NDArray): The array (no pickled objects).
    """
    tmp = f'{path}.{uuid.uuid4().hex}.tmp.npy'
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, path)


def atomic_save_npz(path: str, **arrays: Any) -> None:
    """Save ``arrays`` as one uncompressed ``.npz`` file at ``path``, like :func:`atomic_save_npy`.

    Args:
        path (str): Destination file.
        **arrays (Any): The arrays, by name.
    """
    tmp = f'{path}.{uuid.uuid4().hex}.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def write_labels(split_dir: str, columns: Mapping[str, LabelColumn], merge: bool = True,
                 tokenizer: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Write sidecar label columns for the stream whose ``index.json`` is in ``split_dir``.

    Columns are written to temporary files and renamed, and the manifest is written last, so a
    crash never leaves a manifest pointing at a partial column.

    Args:
        split_dir (str): Directory holding the stream's ``index.json`` (``<local>/<split>``).
        columns (Mapping[str, LabelColumn]): Column name to column (see :func:`categorical` and
            :func:`score`). Every column must have one value per sample of the stream.
        merge (bool): Keep columns already labelled (same fingerprint) that are not in
            ``columns``. Defaults to ``True``.
        tokenizer (dict, optional): The tokenizer that decoded the stream's token ids
            (:func:`streaming_mads.tokenizer.tokenizer_identity`); ``None`` keeps the one recorded
            with the kept columns. Kept columns computed with another tokenizer are refused (one of
            the two decoded the shards wrongly). Defaults to ``None``.

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
    content = shard_hashes(split_dir)
    if content is not None:
        manifest['shard_hashes'] = content
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if merge and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            old = json.load(f)
        # Columns written for other shards are dropped; labels from before shard hashes are kept.
        same_shards = old.get('shard_hashes', content) == content
        if (old.get('index_fingerprint') == fingerprint and old.get('num_samples') == num_samples
                and same_shards):
            kept = {k: v for k, v in old.get('columns', {}).items() if k not in columns}
            for entry in kept.values():  # Kept, and uploaded beside a remote.
                contained_path(out_dir, entry.get('file'), f'a label file in {manifest_path}',
                               LabelError)
            _check_kept_tokenizer(old.get('tokenizer'), tokenizer, kept, split_dir)
            manifest['columns'].update(old.get('columns', {}))
            if tokenizer is None and old.get('tokenizer'):
                manifest['tokenizer'] = old['tokenizer']
    if tokenizer is not None:
        manifest['tokenizer'] = dict(tokenizer)
    for name, col in columns.items():
        if not name or os.sep in name or name.startswith('.'):
            raise LabelError(f'Invalid label column name {name!r}.')
        values = np.asarray(col.values)
        if values.ndim != 1 or len(values) != num_samples:
            raise LabelError(f'Label column {name!r} has shape {values.shape}, but the stream at '
                             f'{split_dir} has {num_samples} samples: give one value per sample.')
        entry: dict[str, Any] = {'file': f'{name}.npy'}
        if col.fit is not None:
            entry['fit'] = dict(col.fit)
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
        path = os.path.join(out_dir, entry['file'])
        atomic_save_npy(path, stored)
        entry['checksum'] = f'{CONTENT_HASH}:{file_hash(path)}'
        manifest['columns'][name] = entry
    tmp = f'{manifest_path}.{uuid.uuid4().hex}.tmp'
    with open(tmp, 'w') as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, manifest_path)
    return manifest


def describe_tokenizer(record: dict[str, Any]) -> str:
    """``record`` (kind, size, fingerprint) in a few words, for messages."""
    return (f'a {record.get("kind")} tokenizer of {record.get("vocab_size")} ids (fingerprint '
            f'{record.get("fingerprint")})')


def _check_kept_tokenizer(old: Optional[dict[str, Any]], new: Optional[dict[str, Any]],
                          kept: dict[str, Any], split_dir: str) -> None:
    """Refuse keeping columns decoded with another tokenizer than this run's: a stream's ids
    were encoded by one tokenizer, so one of the two decoded them wrongly."""
    if not kept or not old or not new or old.get('fingerprint') == new.get('fingerprint'):
        return
    raise LabelError(f'The labels of {split_dir} ({", ".join(sorted(kept))}) were computed with '
                     f'{describe_tokenizer(old)}, this run decodes with {describe_tokenizer(new)}: '
                     'one of them is not the tokenizer that encoded the stream. Relabel every '
                     f'column with the right one (`mads label {os.path.normpath(split_dir)} '
                     '--tokenizer TOKENIZER`, --columns naming all of them).')


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
        source (str, optional): What to give ``mads label`` to relabel the stream (its remote
            split directory for a remote stream). Defaults to ``split_dir``.
    """

    def __init__(self, split_dir: str, num_samples: int, stream_name: str,
                 source: Optional[str] = None) -> None:
        self.split_dir = split_dir
        self.stream_name = stream_name
        self.source = source if source is not None else os.path.normpath(split_dir)
        path = os.path.join(labels_dir(split_dir), MANIFEST_NAME)
        fix = (f'label it with `mads label {os.path.normpath(split_dir)}` (or '
               'streaming_mads.write_labels)')
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
            raise LabelError(f'Labels of stream {stream_name} are stale: its index.json is not the '
                             'one they were written for (shards rewritten, or labels copied from '
                             f'another dataset?). Re-{fix}.')
        self.manifest = manifest
        self.num_samples = num_samples
        self._check_content(path, fix)
        self._arrays: dict[str, NDArray] = {}
        self._verified: set[str] = set()  # Columns whose checksum matched (kept when pickled).

    def _check_content(self, manifest_path: str, fix: str) -> None:
        """Compare the first local shard with the hash the labels were written for.

        Why only one: hashing every shard at each dataset construction would read the whole
        dataset; one shard already tells two different corpora apart, and ``mads label`` (which
        reads every shard) rewrites the hashes.
        """
        content = self.manifest.get('shard_hashes')
        if not content:
            return
        if content.get('algo') != CONTENT_HASH:
            raise LabelError(f'{manifest_path} hashes shards with {content.get("algo")!r}, not '
                             f'{CONTENT_HASH}: {fix}.')
        for name, digest in content['shards'].items():
            path = contained_path(self.split_dir, name, f'a shard name in {manifest_path}',
                                  LabelError)
            if os.path.isfile(path):
                if file_hash(path) != digest:
                    raise LabelError(f'Labels of stream {self.stream_name} were written for other '
                                     f'shards: {path} does not match the content hash in '
                                     f'{manifest_path} (labels copied from another dataset, or the '
                                     f'shard rewritten under the same index.json?). Re-{fix}.')
                return

    @property
    def columns(self) -> dict[str, dict[str, Any]]:
        """Manifest entries by column name."""
        return self.manifest['columns']

    @property
    def tokenizer(self) -> Optional[dict[str, Any]]:
        """The tokenizer the labels were computed with (``None``: text, or written before
        tokenizers were recorded)."""
        return self.manifest.get('tokenizer')

    def array(self, column: str) -> NDArray:
        """The column's values, memory-mapped read-only, validated on first access."""
        arr = self._arrays.get(column)
        if arr is not None:
            return arr
        entry = self.columns.get(column)
        if entry is None:
            how = ('`mads label DATA --reference REF` (REF: the reference the console steers by)'
                   if column == 'similarity' else 'that column')
            raise LabelError(f'Stream {self.stream_name} has no label column {column!r} (it has '
                             f'{sorted(self.columns)}): label it with {how}, or drop the agent '
                             'or change its `column`.')
        ldir = labels_dir(self.split_dir)
        path = contained_path(ldir, entry.get('file'),
                              f'a label file in {os.path.join(ldir, MANIFEST_NAME)}', LabelError)
        if not os.path.isfile(path):
            raise LabelError(f'Label file {path} of stream {self.stream_name} is missing: '
                             f'{self._rewrite_fix(column)}.')
        self._verify_checksum(column, entry, path)
        try:
            arr = np.load(path, mmap_mode='r', allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:  # numpy's errors for a bad .npy file.
            raise LabelError(f'Label file {path} of stream {self.stream_name} is corrupt or '
                             f'truncated ({err}): {self._rewrite_fix(column)}.') from None
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

    def _rewrite_fix(self, column: str) -> str:
        """How to rewrite one column: ``mads label`` for its own columns, else the writer."""
        where = os.path.normpath(self.split_dir)
        if column in ('domain', 'quality', 'topic'):
            return f'rewrite it with `mads label {where} --columns {column}`'
        return f'rewrite it with streaming_mads.write_labels({where!r}, {{{column!r}: ...}})'

    def _verify_checksum(self, column: str, entry: dict[str, Any], path: str) -> None:
        """Refuse a column file whose bytes differ from those written (once per process
        tree: the set of verified columns travels to DataLoader workers with the object)."""
        expected = entry.get('checksum')
        if expected is None or column in self._verified:  # Labels written before checksums.
            return
        algo, _, digest = expected.partition(':')
        if algo != CONTENT_HASH or file_hash(path) != digest:
            raise LabelError(f'Label file {path} of stream {self.stream_name} is corrupt: its '
                             'bytes do not match the checksum in its manifest (damaged or edited '
                             f'after writing): {self._rewrite_fix(column)}.')
        self._verified.add(column)

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

    manifest_path = get(MANIFEST_NAME)
    with open(manifest_path) as f:
        manifest = json.load(f)
    files = [entry.get('file') for entry in manifest.get('columns', {}).values()]
    for name in files:  # Every name checked before any is fetched.
        contained_path(local_dir, name, f'a label file in {manifest_path}', LabelError)
    for name in files:
        get(name)


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
        self._check_fits(column)
        kind = kinds.pop()
        counts = np.zeros(len(vocab), np.int64)
        if kind == CATEGORICAL:
            for stream, remap in zip(self.streams, remaps):
                np.add.at(counts, remap, np.asarray(stream.columns[column]['counts'], np.int64))
            self._remaps[column] = remaps
        info = ColumnInfo(column, kind, tuple(vocab), counts)
        self._info[column] = info
        return info

    def _check_fits(self, column: str) -> None:
        """Refuse streams whose ``column`` comes from different fits, or whose domain comes
        from the same stream name (streams labelled apart, see the module docstring)."""
        if len(self.streams) < 2:
            return
        fits = [s.columns[column].get('fit') for s in self.streams]
        together = ' '.join(s.source for s in self.streams)
        if any(f is None for f in fits):
            if column in FITTED_COLUMNS or any(f and 'model' in f for f in fits):
                old = [s.stream_name for s, f in zip(self.streams, fits) if f is None]
                warnings.warn(f'The {column!r} labels of {", ".join(old)} record no fit '
                              '(written before mads label recorded fits, or by write_labels '
                              'without fit=): MADS cannot check that every stream\'s values come '
                              'from one fit (t03 of one topic fit is another topic in another). '
                              f'Relabel the streams together: `mads label {together}`.')
            return
        ids = [(f.get('model'), f.get('id')) for f in fits]
        models = [i for i, f in zip(ids, fits) if 'model' in f]
        if len(set(models)) > 1 or 0 < len(models) < len(fits):
            groups: dict[Any, list[str]] = {}
            for s, f in zip(self.streams, fits):
                groups.setdefault(f.get('id', f.get('source')), []).append(s.stream_name)
            desc = '; '.join(f'{key}: {", ".join(names)}' for key, names in groups.items())
            first = self.streams[0].source
            others = ' '.join(s.source for s, i in zip(self.streams, ids) if i != ids[0])
            reuse = REUSE_OPTIONS.get(column)
            alternative = (f', or relabel the others reusing the first\'s model: `mads label '
                           f'{others} --columns {column} {reuse} {first}`' if reuse else '')
            raise LabelError(f'Label column {column!r} of these streams comes from different fits '
                             f'({desc}): the same value means different things in each, so they '
                             f'cannot be merged. Label the streams together: `mads label '
                             f'{together}` (one fit over all){alternative}.')
        if column == 'domain':
            self._check_domain_names(fits, together)

    def _check_domain_names(self, fits: list[dict[str, Any]], together: str) -> None:
        """Two streams whose domain is their stream name must not share a name: labelled
        apart, both were probably named after their split folder."""
        seen: dict[str, str] = {}
        for s, f in zip(self.streams, fits):
            if f.get('source') != 'stream':
                continue
            for value in s.columns['domain']['values']:
                if value in seen:
                    raise LabelError(f'Streams {seen[value]} and {s.stream_name} both got domain '
                                     f'{value!r} from their stream name, so the domain agent would '
                                     'see them as one. Label them together, which names each '
                                     f'stream by its own directory: `mads label {together}` (or '
                                     'give --domain-from column:NAME).')
                seen[value] = s.stream_name

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
