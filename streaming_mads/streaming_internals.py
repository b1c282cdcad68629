"""Every use of Streaming's private API, in one place, checked against the installed release.

MADSDataset rides on :class:`streaming.StreamingDataset` instead of replacing it, and that needs a
few of Streaming's internals: the per-iteration ``_Iterator`` and the three loops over it (download,
ready, yield), the shard states, the per-node shared-memory prefix and Streaming's segment names
(which ``mads clean-shm`` looks for), the worker world, a
stream's single-file download, and the loaded shards' file names. Streaming does not promise
these across releases, so they are used only here: :class:`SelectingStreamingDataset` holds the
overridden loops and thin accessors, :func:`check_shard_files` refuses shard file names from an
untrusted ``index.json`` before any download, a shard that cannot be read, downloaded or
decompressed is a :class:`ShardReadError` naming it and its stream (never an early end of the
epoch or a worker waiting forever on it), and :func:`check_streaming` verifies (in the test
suite, and when a dataset is built) that every field relied on is present, failing with a message
naming the supported releases.

Supported: mosaicml-streaming 0.12 and 0.13 (the test suite passes on 0.12.0 and 0.13.0).
"""

from __future__ import annotations

import inspect
import os
from importlib.metadata import version as _dist_version
from time import monotonic, sleep
from typing import Any, Iterator, Optional

import numpy as np
from numpy.typing import NDArray
from streaming import Stream, StreamingDataset
from streaming.base.dataset import _Iterator, _ShardState
from streaming.base.shared.memory import SharedMemory
from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN
from streaming.base.shared.prefix import _get_path

from streaming_mads.remote import contained_path
from streaming_mads.shard_check import ShardCheckError, verify_streams

__all__ = [
    'SUPPORTED', 'SharedMemory', 'SelectingStreamingDataset', 'ShardReadError',
    'StreamingInternalsError',
    'check_shard_files', 'check_streaming', 'download_file', 'parse_shared_memory_name',
    'read_samples',
    'shared_memory_name', 'streaming_filelock_names', 'streaming_segment_names',
    'streaming_version'
]

SUPPORTED = 'mosaicml-streaming >=0.12,<0.14 (tested: 0.12.0, 0.13.0)'

_TICK = 0.0005  # Waiting on the ready thread: finer than its own 7 ms tick.
_LOCAL, _REMOTE = int(_ShardState.LOCAL), int(_ShardState.REMOTE)
_PREPARING = int(_ShardState.PREPARING)

# What MADSDataset relies on: methods overridden or called, with their parameters.
_METHODS = {
    '_get_work': ('self', 'epoch', 'sample_in_epoch'),
    '_prepare_thread': ('self', 'it'),
    '_ready_thread': ('self', 'it'),
    '_each_sample_id': ('self', 'it'),
    'prepare_shard': ('self', 'shard_id', 'blocking'),
    'get_item': ('self', 'sample_id', 'retry'),
    'on_exception': ('self', 'future'),
    'state_dict': ('self', 'num_samples', 'from_beginning'),
    'load_state_dict': ('self', 'obj'),
}
# Attributes read from a constructed dataset (``_parallel_worker_world``, set per iteration, is a
# World like ``_unique_rank_world``, whose fields are checked).
_ATTRIBUTES = ('_unique_rank_world', '_parallel_rank_world', '_shm_prefix_int', '_shard_states',
               'sample_offset_per_shard', 'sample_offset_per_stream',
               'samples_per_stream', 'num_shards', 'predownload', 'length', 'streams',
               'epoch_size', 'shards', 'shard_offset_per_stream', 'shards_per_stream',
               'stream_per_shard', 'spanner')
_WORLD_FIELDS = ('rank_of_node', 'ranks_per_node', 'num_ranks', 'rank', 'workers_per_rank',
                 'worker_of_rank')
_ITERATOR_FIELDS = ('sample_ids', 'total', 'prepare_index', 'ready_index', 'yield_index')
_ITERATOR_METHODS = ('should_exit', 'on_exit')
_STREAM_FIELDS = ('choose', 'proportion', 'repeat', 'remote', 'local', 'split')


class StreamingInternalsError(RuntimeError):
    """The installed Streaming lacks an internal MADSDataset relies on."""


class ShardReadError(RuntimeError):
    """A shard could not be downloaded, decompressed or read; the message names it, its stream
    and the cause."""


def streaming_version() -> str:
    """The installed mosaicml-streaming release."""
    return _dist_version('mosaicml-streaming')


def _fail(what: str) -> StreamingInternalsError:
    return StreamingInternalsError(
        f'streaming-mads relies on Streaming internals that mosaicml-streaming '
        f'{streaming_version()} does not have ({what}). Supported: {SUPPORTED}: install one of '
        f'those (pip install "mosaicml-streaming>=0.12,<0.14").')


def check_streaming(dataset: Any = None) -> None:
    """Verify every Streaming internal MADSDataset uses; raise naming the supported releases.

    Args:
        dataset (StreamingDataset, optional): A constructed dataset whose instance attributes to
            check too (class-level fields are always checked).
    """
    for name, params in _METHODS.items():
        method = getattr(StreamingDataset, name, None)
        if method is None:
            raise _fail(f'StreamingDataset.{name}')
        got = tuple(inspect.signature(method).parameters)[:len(params)]
        if got != params:
            raise _fail(f'StreamingDataset.{name}{params} (found {got})')
    for name in _ITERATOR_METHODS:
        if not callable(getattr(_Iterator, name, None)):
            raise _fail(f'_Iterator.{name}')
    probe = _Iterator(np.arange(2, dtype=np.int64))
    for name in _ITERATOR_FIELDS:
        if not hasattr(probe, name):
            raise _fail(f'_Iterator.{name}')
    if not callable(getattr(Stream, '_download_file', None)):
        raise _fail('Stream._download_file')
    if dataset is None:
        return
    for name in _ATTRIBUTES:
        if not hasattr(dataset, name):
            raise _fail(f'StreamingDataset.{name}')
    for world in (dataset._unique_rank_world, dataset._parallel_rank_world):
        for name in _WORLD_FIELDS:
            if not hasattr(world, name):
                raise _fail(f'World.{name}')
    for stream in dataset.streams:
        for name in _STREAM_FIELDS:
            if not hasattr(stream, name):
                raise _fail(f'Stream.{name}')
    for shard in dataset.shards[:1]:
        if not hasattr(shard, 'file_pairs'):
            raise _fail('Reader.file_pairs')


def check_shard_files(dataset: StreamingDataset) -> None:
    """Refuse any stream whose ``index.json`` names a shard file outside the stream's folder.

    Streaming joins those names (every file of ``Reader.file_pairs``) to the local cache and the
    remote unchecked, to download, decompress and evict shards, so whoever wrote the index could
    have files outside the cache replaced or deleted. Call it once the indexes are loaded (after
    ``StreamingDataset.__init__``), before any shard is fetched; plain StreamingDatasets too.

    Args:
        dataset (StreamingDataset): A constructed dataset.

    Raises:
        UnsafePathError: Naming the index and the name (see
            :func:`streaming_mads.remote.contained_path`).
    """
    for stream_id, stream in enumerate(dataset.streams):
        split_dir = os.path.join(stream.local, stream.split or '')
        source = f'a shard file name in {os.path.join(split_dir, "index.json")}'
        begin = int(dataset.shard_offset_per_stream[stream_id])
        for shard in dataset.shards[begin:begin + int(dataset.shards_per_stream[stream_id])]:
            for pair in shard.file_pairs:
                for info in pair:
                    if info is not None:
                        contained_path(split_dir, info.basename, source)


def _split_dir(stream: Stream) -> str:
    """The local folder of a stream's ``index.json`` and shards."""
    return os.path.join(stream.local, stream.split) if stream.split else stream.local


def shared_memory_name(dataset: StreamingDataset, suffix: str) -> str:
    """A shared-memory name under the dataset's per-node prefix, unique to this rank."""
    rank_of_node = dataset._unique_rank_world.rank_of_node
    return _get_path(dataset._shm_prefix_int, f'{suffix}_{rank_of_node}')


def parse_shared_memory_name(name: str) -> Optional[tuple[int, str]]:
    """``(prefix, rest)`` of a shared-memory name made under a per-node prefix (Streaming's
    segments and :func:`shared_memory_name`), ``None`` for any other name."""
    head, sep, rest = name.partition('_')
    if not (sep and rest and head.isdigit()):
        return None
    prefix = int(head)
    return (prefix, rest) if _get_path(prefix, rest) == name else None


def streaming_segment_names() -> tuple[str, ...]:
    """The names (after ``<prefix>_``) of the shared memory Streaming makes per dataset."""
    return tuple(SHM_TO_CLEAN)


def streaming_filelock_names() -> tuple[str, ...]:
    """The names (after ``<prefix>_``) of the files Streaming locks per dataset in the temp dir."""
    return BARRIER_FILELOCK, CACHE_FILELOCK


def read_samples(dataset: StreamingDataset, indices: list[int]) -> list[dict[str, Any]]:
    """Samples by index, read in this process without leaving Streaming's cache lock behind.

    Streaming makes its cache lock the first time a process reads a sample and keeps it on the
    dataset; the lock cannot be pickled, so a dataset read once in the main process (a check of
    its first samples) could no longer start DataLoader workers under ``spawn``.
    """
    had = '_cache_filelock' in vars(dataset)
    try:
        return [dataset[i] for i in indices]
    finally:
        if not had:
            vars(dataset).pop('_cache_filelock', None)


def download_file(stream: Stream, rel: str, tmp: str) -> str:
    """Download ``rel`` (relative to the stream's split) with Streaming's retrying downloader."""
    return stream._download_file(rel, tmp)


class SelectingStreamingDataset(StreamingDataset):
    """A StreamingDataset whose iteration yields only the kept candidates of each pool.

    Subclasses set ``pool_size`` and ``device_batch_size`` and implement :meth:`select_pools`;
    with ``pool_size == device_batch_size`` iteration is exactly the parent's.

    Streaming's download and ready threads visit every candidate one at a time (a spanner lookup
    and a cache file lock each). At ``r`` candidates per yielded sample that per-candidate cost,
    multiplied by ``r``, would dominate the loader. When selecting, the overridden threads keep
    the parent's protocol (same indices, same predownload bound, same shard states and cache
    accounting) but advance over a span of candidates at a time, visiting each shard in the span
    once.

    At any pool size, a shard that fails to download, decompress or read raises
    :class:`ShardReadError` (naming the shard and its stream) from the iteration: the parent
    would end the epoch silently when its background thread failed, and leave the shard
    ``PREPARING`` for any other worker to wait on forever.
    """

    pool_size: int
    device_batch_size: int
    _work_epoch: int = 0
    _work_offset: int = 0

    # -- what the subclass provides --------------------------------------------------------

    def select_pools(self, sample_ids: NDArray[np.int64]) -> Iterator[tuple[int, NDArray]]:
        """For each pool of this worker's candidates: its start and the kept positions."""
        raise NotImplementedError

    # -- accessors -------------------------------------------------------------------------

    @property
    def work_position(self) -> tuple[int, int]:
        """``(epoch, sample_in_epoch)`` of the current iteration (candidates, all ranks)."""
        return self._work_epoch, self._work_offset

    @property
    def worker_layout(self) -> tuple[int, int, int, int]:
        """``(ranks, rank, workers per rank, worker of rank)`` of the calling process."""
        world = self._parallel_worker_world
        return world.num_ranks, world.rank, world.workers_per_rank, world.worker_of_rank

    def check_shard_files(self) -> None:
        """:func:`check_shard_files` of this dataset (before any shard is fetched)."""
        check_shard_files(self)

    def verify_local_shards(self) -> None:
        """Check the local shard files against their ``index.json`` (sizes, and hashes).

        The node's ranks share the work: each checks every ``ranks_per_node``-th shard, so each
        file is read once per node. Files not downloaded yet are skipped (Streaming checks
        downloads given ``validate_hash``).

        Raises:
            ShardCheckError: Naming every file (stream and basename) whose size or hash differs,
                or the streams whose index records no hash for files present.
        """
        world = self._unique_rank_world
        streams = []
        for stream in self.streams:
            streams.append((stream.remote or _split_dir(stream), _split_dir(stream)))
        report = verify_streams(streams, (world.rank_of_node, world.ranks_per_node))
        if report.bad:
            raise ShardCheckError(
                f'verify_shards: {len(report.bad)} local shard file(s) are not what their '
                f'index.json describes (modified or damaged; delete them to download them again, '
                f'or rewrite the stream):\n{report.problems()}')
        if report.unhashed:
            raise ShardCheckError(f'verify_shards: {report.unhashed_note()} Or drop '
                                  'verify_shards.')

    # -- shards that cannot be read --------------------------------------------------------

    def shard_read_error(self, shard_id: int, err: BaseException) -> ShardReadError:
        """The error for shard ``shard_id`` failing with ``err``: the shard, its stream, the fix."""
        stream = self.streams[int(self.stream_per_shard[shard_id])]
        raw, zipped = self.shards[shard_id].file_pairs[0]
        split_dir = _split_dir(stream)
        name = raw.basename + (f' (stored as {zipped.basename})' if zipped is not None else '')
        if stream.remote:
            where, fix = (f'stream {stream.remote} (cached in {split_dir})',
                          'delete it from the cache to download it again')
        else:
            where, fix = f'stream {split_dir}', 'restore it or rewrite the stream'
        return ShardReadError(
            f'Cannot read shard {name} of {where}: {type(err).__name__}: {err}. The file is '
            f'damaged, truncated or not the one its index.json describes: {fix} (`mads verify '
            f'{split_dir}` checks every local shard against the index\'s hashes).')

    def _raise_thread_failure(self) -> None:
        """Raise what stopped a background thread of this iteration, if one stopped."""
        event = self.__dict__.get('_event')
        if event is None or not event.is_set():
            return
        failure = self.__dict__.get('_mads_failure')
        if failure is not None:
            raise failure
        raise RuntimeError('A background thread of the dataset failed (its traceback is logged '
                           'above) before the epoch ended.')

    def on_exception(self, future: Any) -> None:
        """Keep a background thread's error for the yield loop to raise, then stop the others.

        The parent re-raises it inside the future's callback, where it is only logged, and its
        yield loop then ends the epoch early without an error.
        """
        error = future.exception()
        if error is not None:
            if self.__dict__.get('_mads_failure') is None:
                self._mads_failure = error  # Before the event: whoever sees the event finds it.
            self._event.set()

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """The parent's, but a failure is a :class:`ShardReadError` and releases the shard."""
        before = int(self._shard_states[shard_id])
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as err:
            if before != _PREPARING and int(self._shard_states[shard_id]) == _PREPARING:
                # This call's attempt failed. Left PREPARING, every worker needing the shard
                # would wait for it forever; as LOCAL, the next one to read it finds its files
                # missing or damaged and prepares it again itself (downloading what is missing),
                # meeting the error too. What a failed download left is not counted in the
                # cache's usage, so it goes (the next attempt counts what it fetches).
                if before == _REMOTE:
                    self.shards[shard_id].evict()
                self._shard_states[shard_id] = _LOCAL
            raise self.shard_read_error(shard_id, err) from err

    def get_item(self, sample_id: int, retry: int = 7) -> Any:
        """The parent's, but a failed read is a :class:`ShardReadError` naming the shard."""
        self._raise_thread_failure()
        try:
            return super().get_item(sample_id, retry)
        except ShardReadError:
            raise
        except Exception as err:
            self._raise_thread_failure()
            shard_id, _ = self.spanner[sample_id]
            raise self.shard_read_error(int(shard_id), err) from err

    # -- overridden internals --------------------------------------------------------------

    def _get_work(self, epoch: int, sample_in_epoch: int) -> NDArray[np.int64]:
        self._work_epoch, self._work_offset = epoch, sample_in_epoch
        return super()._get_work(epoch, sample_in_epoch)

    def _selecting(self) -> bool:
        return self.pool_size != self.device_batch_size

    def _shards_of(self, it: _Iterator) -> NDArray[np.int64]:
        shards = getattr(it, 'mads_shards', None)
        if shards is None:
            ids = np.asarray(it.sample_ids, np.int64)
            shards = np.searchsorted(self.sample_offset_per_shard, ids, side='right') - 1
            shards[ids < 0] = -1
            it.mads_shards = shards
        return shards

    def _span_end(self, it: _Iterator, index: int) -> int:
        """End of the next span of candidates from ``index``, within the predownload bound."""
        end = min(it.total, index + self.pool_size)
        if self.predownload is not None:
            end = min(end, it.yield_index + self.predownload + 1)
        return max(end, index + 1)

    def _prepare_thread(self, it: _Iterator) -> None:
        if not self._selecting():
            return super()._prepare_thread(it)
        shards = self._shards_of(it)
        states = self._shard_states.numpy()
        touched = np.full(self.num_shards, -np.inf)
        while not it.should_exit() and not self._event.is_set():
            if it.prepare_index == it.total or it.ready_index == it.total:
                it.prepare_index = it.total
                break
            if self.predownload is not None and \
                    self.predownload < it.prepare_index - it.yield_index:
                sleep(_TICK)
                continue
            end = self._span_end(it, it.prepare_index)
            now = monotonic()
            for shard in np.unique(shards[it.prepare_index:end]):
                # Re-touch a local shard at most every second (keeps its LRU time fresh).
                if shard >= 0 and (states[shard] != _LOCAL or now - touched[shard] > 1.0):
                    self.prepare_shard(int(shard), False)
                    touched[shard] = now
            it.prepare_index = end
        it.on_exit()

    def _ready_thread(self, it: _Iterator) -> None:
        if not self._selecting():
            return super()._ready_thread(it)
        shards = self._shards_of(it)
        states = self._shard_states.numpy()
        while not it.should_exit() and not self._event.is_set():
            if it.ready_index == it.total:
                break
            if self.predownload is not None and \
                    self.predownload < it.ready_index - it.yield_index:
                sleep(_TICK)
                continue
            end = self._span_end(it, it.ready_index)
            for shard in np.unique(shards[it.ready_index:end]):
                if shard < 0:
                    continue
                if states[shard] == _REMOTE:  # Evicted meanwhile: fetch it again.
                    self.prepare_shard(int(shard), False)
                while states[shard] != _LOCAL and not self._event.is_set():
                    sleep(_TICK)
            it.ready_index = end
        it.on_exit()

    def _each_sample_id(self, it: _Iterator) -> Iterator[int]:
        """Yield the kept candidates of each pool, once downloaded (parent's loop otherwise).

        Ends early only for a new epoch (``it.should_exit()``); a failed background thread
        raises its error here.
        """
        if not self._selecting():
            yield from super()._each_sample_id(it)
            if it.yield_index < it.total and not it.should_exit():
                self._raise_thread_failure()  # The parent's loop stops silently on it.
            return
        stopped = False
        for start, keep in self.select_pools(it.sample_ids):
            for pos in keep:
                index = start + int(pos)
                while it.ready_index <= index and not stopped:
                    stopped = it.should_exit()
                    if not stopped:
                        self._raise_thread_failure()
                    sleep(_TICK)
                if stopped or it.should_exit():
                    stopped = True
                    break
                it.yield_index = index
                yield int(it.sample_ids[index])
            if stopped:
                break
            it.yield_index = min(start + self.pool_size, it.total)
        it.on_exit()
