"""Every use of Streaming's private API, in one place, checked against the installed release.

MADSDataset rides on :class:`streaming.StreamingDataset` instead of replacing it, and that needs a
few of Streaming's internals: the per-iteration ``_Iterator`` and the three loops over it (download,
ready, yield), the shard states, the per-node shared-memory prefix, the worker world, a
stream's single-file download, and the loaded shards' file names. Streaming does not promise
these across releases, so they are used only here: :class:`SelectingStreamingDataset` holds the
overridden loops and thin accessors, :func:`check_shard_files` refuses shard file names from an
untrusted ``index.json`` before any download, and :func:`check_streaming` verifies (in the test
suite, and when a dataset is built) that every field relied on is present, failing with a message
naming the supported releases.

Supported: mosaicml-streaming 0.12 and 0.13 (the test suite passes on 0.12.0 and 0.13.0).
"""

from __future__ import annotations

import inspect
import os
from importlib.metadata import version as _dist_version
from time import monotonic, sleep
from typing import Any, Iterator

import numpy as np
from numpy.typing import NDArray
from streaming import Stream, StreamingDataset
from streaming.base.dataset import _Iterator, _ShardState
from streaming.base.shared.memory import SharedMemory
from streaming.base.shared.prefix import _get_path

from streaming_mads.remote import contained_path

__all__ = [
    'SUPPORTED', 'SharedMemory', 'SelectingStreamingDataset', 'StreamingInternalsError',
    'check_shard_files', 'check_streaming', 'download_file', 'shared_memory_name',
    'streaming_version'
]

SUPPORTED = 'mosaicml-streaming >=0.12,<0.14 (tested: 0.12.0, 0.13.0)'

_TICK = 0.0005  # Waiting on the ready thread: finer than its own 7 ms tick.
_LOCAL, _REMOTE = int(_ShardState.LOCAL), int(_ShardState.REMOTE)

# What MADSDataset relies on: methods overridden or called, with their parameters.
_METHODS = {
    '_get_work': ('self', 'epoch', 'sample_in_epoch'),
    '_prepare_thread': ('self', 'it'),
    '_ready_thread': ('self', 'it'),
    '_each_sample_id': ('self', 'it'),
    'prepare_shard': ('self', 'shard_id', 'blocking'),
    'state_dict': ('self', 'num_samples', 'from_beginning'),
    'load_state_dict': ('self', 'obj'),
}
# Attributes read from a constructed dataset (``_parallel_worker_world``, set per iteration, is a
# World like ``_unique_rank_world``, whose fields are checked).
_ATTRIBUTES = ('_unique_rank_world', '_parallel_rank_world', '_shm_prefix_int', '_shard_states',
               'sample_offset_per_shard', 'sample_offset_per_stream',
               'samples_per_stream', 'num_shards', 'predownload', 'length', 'streams',
               'epoch_size', 'shards', 'shard_offset_per_stream', 'shards_per_stream')
_WORLD_FIELDS = ('rank_of_node', 'num_ranks', 'rank', 'workers_per_rank', 'worker_of_rank')
_ITERATOR_FIELDS = ('sample_ids', 'total', 'prepare_index', 'ready_index', 'yield_index')
_ITERATOR_METHODS = ('should_exit', 'on_exit')
_STREAM_FIELDS = ('choose', 'proportion', 'repeat', 'remote', 'local', 'split')


class StreamingInternalsError(RuntimeError):
    """The installed Streaming lacks an internal MADSDataset relies on."""


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


def shared_memory_name(dataset: StreamingDataset, suffix: str) -> str:
    """A shared-memory name under the dataset's per-node prefix, unique to this rank."""
    rank_of_node = dataset._unique_rank_world.rank_of_node
    return _get_path(dataset._shm_prefix_int, f'{suffix}_{rank_of_node}')


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
        """Yield the kept candidates of each pool, once downloaded (parent's loop otherwise)."""
        if not self._selecting():
            yield from super()._each_sample_id(it)
            return
        stopped = False
        for start, keep in self.select_pools(it.sample_ids):
            for pos in keep:
                index = start + int(pos)
                while it.ready_index <= index and not stopped:
                    stopped = it.should_exit() or self._event.is_set()
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
