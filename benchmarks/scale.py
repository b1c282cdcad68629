"""Cluster scale by simulation: 10^8 labels, 128 nodes x 8 ranks x 8 workers, on one small machine.

What a large run needs from MADS cannot be measured by running one, so this benchmark measures the
pieces whose cost or correctness could change with scale, each with the real code path:

1. **Label store of n samples.** Sidecar labels only need each stream's ``index.json`` (sample
   count and fingerprint), so the streams here are synthetic MDS indexes (valid ones: Streaming's
   own ``StreamingDataset`` opens them and counts n samples) over 3 unequal streams, with real
   ``write_labels`` columns ``domain`` (5 values, each stream holding its own subset, so the
   vocabulary merge is exercised), ``quality`` (0-5 float32) and ``topic`` (13 values). Reported:
   time to write, bytes on disk per sample, and the time a process takes to open and validate them
   (every DataLoader worker does this once, since memory maps reopen lazily after pickling).
2. **Worker-count invariance at 128 x 8 x 8.** Streaming's own partition
   (``get_partitions``, relaxed, py1e shuffle, 128 canonical nodes, pool ``r·B = 32``) is
   computed in-process for each layout, one at a time. Every rank's pools are numbered with
   :mod:`streaming_mads.selection.pools` and compared with the 8-worker layout for every pool (exhaustive)
   and, for a random sample of pools, located *by content* in the other layout and compared in
   (rank, batch, noise key, global batch, weight version). Worker count must not change any of
   them (mismatches must be 0). A same-world layout with another nodes x ranks split
   (64 x 16 x 8) is reported as Streaming makes it: per-rank sequences differ, global batches don't.
3. **Selection cost per pool** for n = 10^6, 10^7, 10^8 on real pools of that partition, run
   through the dataset workers' own selection step
   (:func:`streaming_mads.selection.step.pool_selections`): labels of 64 pools gathered in one
   vectorised read, then per pool the version of its batch, the combined scores, Gumbel noise
   with the pool's noise key, Gumbel-top-k, the kept counts and the probe log write on a real
   weight board. Reported: the whole, and the label gather in it. *Cold* is the first pass after
   the label files are dropped from the page cache (``madvise`` + ``posix_fadvise``; reads come
   from disk; best of two), *warm* the best of three passes after it; wall time, and the warm
   pass's CPU time too, which is less disturbed by other processes on a busy machine. The goal is a cost flat in n.
4. **Probe draw** per console update: 4096 uniform candidate ids in [0, n), their labels and
   ``stratified_probe`` to 64 probes (influence is measured elsewhere), cold and warm.
5. **Memory per node**: the weight board's shared memory for every rank of a node, the sidecar
   bytes the page cache holds once for all workers of a node, and the RSS growth of reading the
   whole store through the memory maps, split into anonymous (copies: should be ~0) and
   file-backed (shared page cache) memory.

Peak memory stays within a few GiB at n = 10^8: labels are generated per stream, partitions are
computed one layout at a time and kept as int32 per-rank sequences.

Run: ``python benchmarks/scale.py [--sizes 1e6,1e7,1e8] [--quick] [--workdir DIR] [--keep]
[--json PATH]``
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from numpy.typing import NDArray
from streaming import Stream, StreamingDataset
from streaming.base.partition import get_partitions
from streaming.base.shuffle import get_shuffle

from streaming_mads.selection.agents import Agent, build_agents
from streaming_mads.selection.board import WeightBoard, Weights
from streaming_mads.labels import LabelColumn, LabelStore, StreamLabels, labels_dir, score, \
    write_labels
from streaming_mads.selection.pools import batch_in_epoch, noise_key
from streaming_mads.selection.schedule import Schedule
from streaming_mads.selection.step import BLOCK_POOLS, gather_label_ids, pool_selections, \
    version_tables
from streaming_mads.console.rewards import stratified_probe

BATCH = 8  # Device batch size B.
RATIO = 4  # Pool ratio r: a pool holds r·B candidates.
POOL = RATIO * BATCH
LOG_WIDTH = 32  # Candidates of a pool written to the console's probe log.
TEMPERATURE = 1.0
SELECTION_SEED = 0
SHUFFLE_SEED = 9176  # Streaming's default shuffle seed.
EPOCH = 0
UPDATE_INTERVAL = 150  # W: the console's default batches per weight version.
BOARD_CAPACITY = 16
PROBE_POOL, PROBE_SIZE = 4096, 64
SAMPLES_PER_SHARD = 1 << 15
STREAM_FRACTIONS = (0.5, 0.3, 0.2)  # Three unequal streams.
STREAM_DOMAINS = (('web', 'code'), ('books', 'news'), ('wiki',))  # 5 domains over the streams.
TOPICS = tuple(f't{i:02d}' for i in range(13))
MB = 1 << 20


@dataclass(frozen=True)
class Layout:
    """A cluster shape: physical nodes x ranks per node x DataLoader workers per rank."""
    nodes: int
    ranks: int
    workers: int

    @property
    def name(self) -> str:
        return f'{self.nodes}x{self.ranks}x{self.workers}'

    @property
    def num_ranks(self) -> int:
        return self.nodes * self.ranks


# -- the label store --------------------------------------------------------------------------


def write_index(split_dir: str, samples: int, per_shard: int) -> None:
    """A valid MDS ``index.json`` (as ``MDSWriter`` writes it) for ``samples`` samples, no shards.

    Sidecar labels and Streaming's partitioning read only the index, so the shard files need not
    exist for anything this benchmark measures.
    """
    os.makedirs(split_dir, exist_ok=True)
    shards = []
    for i, start in enumerate(range(0, samples, per_shard)):
        count = min(per_shard, samples - start)
        raw = count * 24  # Plausible sizes; nothing reads them here.
        shards.append({
            'column_encodings': ['ndarray:uint16'], 'column_names': ['tokens'],
            'column_sizes': [None], 'compression': 'zstd', 'format': 'mds', 'hashes': [],
            'raw_data': {'basename': f'shard.{i:05d}.mds', 'bytes': raw, 'hashes': {}},
            'samples': count, 'size_limit': 1 << 26, 'version': 2,
            'zip_data': {'basename': f'shard.{i:05d}.mds.zstd', 'bytes': raw // 3, 'hashes': {}},
        })
    with open(os.path.join(split_dir, 'index.json'), 'w') as f:
        json.dump({'shards': shards, 'version': 2}, f)


def stream_sizes(n: int) -> list[int]:
    sizes = [int(n * f) for f in STREAM_FRACTIONS[:-1]]
    return sizes + [n - sum(sizes)]


def write_store(root: str, n: int, seed: int) -> tuple[list[str], dict[str, float]]:
    """Write 3 synthetic streams of n samples in all with their sidecar labels.

    Labels are generated in chunks into their stored dtypes, and each stream is written with its
    own ``write_labels`` call, so peak memory is about 6 bytes per sample of the largest stream
    (``categorical()`` would widen ids to int64 first, hence ``LabelColumn`` with uint8 ids).
    """
    rng = np.random.default_rng(seed)
    chunk = 1 << 24
    dirs, gen_s, write_s = [], 0.0, 0.0
    for s, size in enumerate(stream_sizes(n)):
        split_dir = os.path.join(root, f'stream{s}')
        write_index(split_dir, size, SAMPLES_PER_SHARD)
        t0 = time.perf_counter()
        domain = np.empty(size, np.uint8)
        quality = np.empty(size, np.float32)
        topic = np.empty(size, np.uint8)
        for lo in range(0, size, chunk):
            hi = min(size, lo + chunk)
            domain[lo:hi] = rng.integers(0, len(STREAM_DOMAINS[s]), hi - lo, dtype=np.uint8)
            quality[lo:hi] = rng.random(hi - lo, dtype=np.float32) * np.float32(5.0)
            topic[lo:hi] = rng.integers(0, len(TOPICS), hi - lo, dtype=np.uint8)
        t1 = time.perf_counter()
        write_labels(split_dir, {
            'domain': LabelColumn(domain, STREAM_DOMAINS[s]),
            'quality': score(quality),
            'topic': LabelColumn(topic, TOPICS),
        })
        t2 = time.perf_counter()
        gen_s += t1 - t0
        write_s += t2 - t1
        del domain, quality, topic
        dirs.append(split_dir)
    disk = sum(
        os.stat(os.path.join(labels_dir(d), f)).st_blocks * 512 for d in dirs
        for f in os.listdir(labels_dir(d)))
    return dirs, {'generate_s': gen_s, 'write_s': write_s, 'disk_bytes': disk,
                  'bytes_per_sample': disk / n}


def streaming_shard_sizes(dirs: Sequence[str], n: int, canonical_nodes: int) -> NDArray[np.int64]:
    """Open the synthetic streams with Streaming itself; return its per-shard sample counts.

    Proves the indexes are valid MDS and gives the shuffle units Streaming would shuffle (with no
    stream proportions, ``resample_streams`` yields one unit per shard and the identity mapping,
    checked where that is cheap).
    """
    ds = StreamingDataset(streams=[Stream(local=d) for d in dirs], batch_size=POOL, shuffle=True,
                          shuffle_algo='py1e', num_canonical_nodes=canonical_nodes)
    try:
        if ds.num_samples != n:
            raise RuntimeError(f'Streaming counts {ds.num_samples} samples, expected {n}.')
        units = np.asarray(ds.samples_per_shard, np.int64)
        if n <= 10**7:
            res_units, mapping = ds.resample_streams(EPOCH)
            assert np.array_equal(res_units, units) and np.array_equal(mapping, np.arange(n))
        return units
    finally:
        del ds
        gc.collect()


def open_store(dirs: Sequence[str]) -> LabelStore:
    """The dataset's label store over the streams, every column validated (as a worker does)."""
    sizes = []
    for d in dirs:
        with open(os.path.join(d, 'index.json')) as f:
            sizes.append(sum(shard['samples'] for shard in json.load(f)['shards']))
    streams = [StreamLabels(d, size, d) for d, size in zip(dirs, sizes)]
    store = LabelStore(streams, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
    for column in ('domain', 'quality', 'topic'):
        store.info(column)
    return store


def _column_files(store: LabelStore) -> list[tuple[NDArray, str]]:
    return [(stream.array(col), os.path.join(labels_dir(stream.split_dir), entry['file']))
            for stream in store.streams for col, entry in stream.columns.items()]


def unmap_pages(store: LabelStore) -> None:
    """Drop the label pages from this process's page tables (the page cache keeps them)."""
    for arr, _ in _column_files(store):
        mm = getattr(arr, '_mmap', None)  # np.memmap's mapping; absent on plain arrays.
        if mm is not None:
            mm.madvise(mmap.MADV_DONTNEED)


def drop_page_cache(store: LabelStore) -> None:
    """Evict the label files from the page cache, so the next reads come from disk."""
    unmap_pages(store)
    for _, path in _column_files(store):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # Dirty pages cannot be dropped.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def release_free_memory() -> None:
    """Return freed heap to the OS (glibc keeps large freed temporaries), so RSS shows live data."""
    gc.collect()
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass  # Not glibc: RSS may then include freed temporaries.


def memory_status() -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of this process, in bytes."""
    out = {}
    with open('/proc/self/status') as f:
        for line in f:
            key, _, rest = line.partition(':')
            if key in ('RssAnon', 'RssFile', 'VmHWM'):
                out[key] = int(rest.split()[0]) * 1024
    return out


# -- partitions and the layout check ----------------------------------------------------------


def epoch_shuffle(shard_sizes: NDArray[np.int64], canonical_nodes: int) -> NDArray[np.int64]:
    """Streaming's py1e permutation of the epoch, at the dataset's default block size."""
    block = max(4_000_000 // canonical_nodes, 1 << 18)
    return get_shuffle('py1e', shard_sizes, canonical_nodes, SHUFFLE_SEED, EPOCH, block)


def batches_per_epoch(n: int, num_ranks: int) -> int:
    """Pools per rank per epoch, as ``MADSDataset`` counts them."""
    return math.ceil(math.ceil(n / num_ranks) / POOL)


def batch_grid(workers: int, pools_per_worker: int) -> NDArray[np.int64]:
    """``grid[w, p]``: the rank's batch of worker ``w``'s ``p``-th pool (:func:`batch_in_epoch`)."""
    w = np.arange(workers)[:, None]
    p = np.arange(pools_per_worker)[None, :]
    grid = batch_in_epoch(0, p, workers, w)
    if not np.array_equal(np.sort(grid.ravel()), np.arange(grid.size)):
        raise RuntimeError('batch_in_epoch does not number the rank\'s pools one to one.')
    return grid


def rank_sequences(part: NDArray[np.int64], layout: Layout) -> NDArray[np.int32]:
    """``seq[g, b]``: contents of rank ``g``'s pool numbered ``b`` by pools.py (big ids, int32)."""
    k, per_worker = part.shape[2], part.shape[3]
    grid = batch_grid(k, per_worker)
    seq = np.empty((layout.num_ranks, k * per_worker, POOL), np.int32)
    view = seq.reshape(layout.nodes, layout.ranks, k * per_worker, POOL)
    for w in range(k):
        view[:, :, grid[w], :] = part[:, :, w]
    return seq


def pool_tuple(g: int, b: int, num_ranks: int, schedule: Schedule) -> tuple:
    """What selection derives from a pool's place: rank, batch, noise key, global batch, version."""
    gb = schedule.global_batch(EPOCH, b)
    key = noise_key(SELECTION_SEED, EPOCH, b, g, num_ranks)
    return (g, b, key, gb, schedule.version_for_batch(gb))


def locate(part: NDArray[np.int64], layout: Layout, anchors: NDArray[np.int64],
           n: int) -> dict[int, list[tuple[int, int, int, int, int]]]:
    """Where each anchor (big id) sits in ``part``: (rank, worker, pool, slot, batch), by content.

    Independent of pools.py numbering: a boolean table over ids marks the anchors and one pass
    over the partition finds them (padding ``-1`` indexes the table's extra False entry).
    """
    mark = np.zeros(n + 1, bool)
    mark[anchors] = True
    flat = np.flatnonzero(mark[part])
    del mark
    node, r, w, p, slot = np.unravel_index(flat, part.shape)
    found: dict[int, list[tuple[int, int, int, int, int]]] = {}
    for i in range(len(flat)):
        g = int(node[i]) * layout.ranks + int(r[i])
        b = int(batch_in_epoch(0, int(p[i]), part.shape[2], int(w[i])))
        found.setdefault(int(part[node[i], r[i], w[i], p[i], slot[i]]), []).append(
            (g, int(w[i]), int(p[i]), int(slot[i]), b))
    return found


def check_layouts(n: int, shuffle: NDArray[np.int64], layouts: Sequence[Layout], same_world: Layout,
                  canonical_nodes: int, samples: int, schedule: Schedule,
                  rng: np.random.Generator) -> tuple[NDArray[np.int32], dict[str, Any]]:
    """Compare every layout with the first (reference); return its rank sequences and results."""
    ref = layouts[0]
    bpe = batches_per_epoch(n, ref.num_ranks)
    schedule = schedule.with_epoch(bpe)
    out: dict[str, Any] = {'batches_per_epoch': bpe}
    seq_ref: Optional[NDArray[np.int32]] = None
    picks: list[tuple[int, int]] = []
    want: list[tuple] = []
    for layout in list(layouts) + [same_world]:
        t0 = time.perf_counter()
        part = get_partitions('relaxed', n, canonical_nodes, layout.nodes, layout.ranks,
                              layout.workers, POOL)
        part_s = time.perf_counter() - t0
        seq = rank_sequences(part, layout)
        if (seq[:, bpe:] >= 0).any():
            raise RuntimeError(f'{layout.name}: real samples beyond batch {bpe} of the epoch.')
        seq = seq[:, :bpe]
        if seq_ref is None:
            seq_ref = seq
            out[f'partition_{layout.name}_s'] = part_s
            # Sample pools uniformly over (rank, batch), plus the partial last pool of some ranks.
            g = rng.integers(0, layout.num_ranks, samples)
            b = rng.integers(0, bpe, samples)
            b[:min(16, samples)] = bpe - 1
            picks = [(int(x), int(y)) for x, y in zip(g, b) if seq[x, y, 0] >= 0]
            want = [(pool_tuple(x, y, layout.num_ranks, schedule),
                     np.where(seq[x, y] >= 0, shuffle[seq[x, y]], -1)) for x, y in picks]
            del part
            gc.collect()
            continue
        # Exhaustive: every pool of every rank, as numbered by pools.py, in chunks of ranks.
        differing = 0
        for lo in range(0, ref.num_ranks, 64):
            differing += int(np.any(seq[lo:lo + 64] != seq_ref[lo:lo + 64], axis=2).sum())
        del seq
        # Sampled: find each sampled pool by its first sample, compare what selection derives.
        anchors = np.array([seq_ref[x, y, 0] for x, y in picks], np.int64)
        found = locate(part, layout, anchors, n)
        mismatches, same_global = 0, 0
        for (x, y), anchor, (tup, contents) in zip(picks, anchors, want):
            hits = found.get(int(anchor), [])
            ok = False
            for g2, w2, p2, slot, b2 in hits:
                here = part[g2 // layout.ranks, g2 % layout.ranks, w2, p2]
                here = np.where(here >= 0, shuffle[here], -1)
                if slot == 0 and np.array_equal(here, contents) and \
                        pool_tuple(g2, b2, layout.num_ranks, schedule) == tup:
                    ok = True
            same_global += any(schedule.global_batch(EPOCH, h[4]) == tup[3] for h in hits)
            mismatches += not ok
        del part
        gc.collect()
        out[layout.name] = {
            'partition_s': part_s, 'pools': int(seq_ref.shape[0] * bpe), 'differing': differing,
            'sampled': len(picks), 'mismatches': mismatches, 'same_global_batch': same_global,
            'same_world_other_split': layout == same_world,
        }
    assert seq_ref is not None
    return seq_ref, out


# -- selection, probes, whole-store reads ------------------------------------------------------


def timing_pools(seq: NDArray[np.int32], shuffle: NDArray[np.int64], workers: int, count: int,
                 rng: np.random.Generator) -> tuple[NDArray[np.int64], NDArray[np.int64],
                                                    NDArray[np.int64]]:
    """``count`` real pools in worker order: a random worker's pools from a random 64-pool block,
    then another worker's, ... (blocks of 64 then span workers where a worker has fewer pools).

    Returns sample ids ``(count, POOL)`` (-1 padding), and each pool's rank and batch.
    """
    num_ranks, bpe = seq.shape[0], seq.shape[1]
    ids, ranks, batches = [], [], []
    total = 0
    while total < count:
        g, w = int(rng.integers(num_ranks)), int(rng.integers(workers))
        mine = np.arange(w, bpe, workers)  # This worker's batches, in the order it builds them.
        if len(mine) == 0:
            continue
        start = int(rng.integers(0, max(1, math.ceil(len(mine) / BLOCK_POOLS)))) * BLOCK_POOLS
        take = mine[start:start + min(BLOCK_POOLS, count - total)]
        big = seq[g, take].astype(np.int64)
        ids.append(np.where(big >= 0, shuffle[big], -1))
        ranks.append(np.full(len(take), g))
        batches.append(take)
        total += len(take)
    return np.concatenate(ids), np.concatenate(ranks), np.concatenate(batches)


def time_selection(store: LabelStore, agents: Sequence[Agent], board: WeightBoard,
                   schedule: Schedule, tables: dict[int, list[NDArray]], pools: NDArray[np.int64],
                   ranks: NDArray[np.int64], batches: NDArray[np.int64],
                   num_ranks: int) -> dict[str, float]:
    """One pass of the workers' selection step over ``pools``: seconds in the label gather and in
    the rest (version, scores, noise, top-k, kept counts, probe log)."""
    gather = 0.0

    def timed_label_ids(ids: NDArray[np.int64]) -> list[NDArray]:
        nonlocal gather
        t0 = time.perf_counter()
        out = gather_label_ids(store, agents, ids)
        gather += time.perf_counter() - t0
        return out

    kept = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for _, keep in pool_selections(pools.ravel(), batches, ranks, EPOCH, pool=POOL, keep=BATCH,
                                   temperature=TEMPERATURE, seed=SELECTION_SEED,
                                   num_ranks=num_ranks, schedule=schedule,
                                   label_ids=timed_label_ids,
                                   tables_for=lambda version, _batch: tables[version],
                                   board=board, row=0):
        kept += len(keep)
    total = time.perf_counter() - t0
    return {'gather': gather, 'select': total - gather, 'kept': kept,
            'cpu': time.process_time() - cpu0}


def probe_draw(store: LabelStore, agents: Sequence[Agent], n: int, version: int) -> NDArray:
    """One update's probe set, as the console draws it (uniform ids in [0, n), stratified)."""
    rng = np.random.default_rng((SELECTION_SEED, version))
    cand = rng.permutation(n)[:PROBE_POOL] if n <= 4 * PROBE_POOL else \
        np.unique(rng.integers(0, n, 2 * PROBE_POOL))[:PROBE_POOL]
    cand = rng.permutation(cand)
    labels = gather_label_ids(store, agents, cand)
    return cand[stratified_probe(labels, [a.num_values for a in agents], PROBE_SIZE, rng)]


def time_probes(store: LabelStore, agents: Sequence[Agent], n: int, versions: range) -> float:
    t0 = time.perf_counter()
    for v in versions:
        probe_draw(store, agents, n, v)
    return (time.perf_counter() - t0) / len(versions)


def whole_store_read(store: LabelStore, n: int) -> dict[str, float]:
    """Read every label of every sample through the maps; RSS growth split anon / file-backed."""
    unmap_pages(store)
    release_free_memory()
    before = memory_status()
    t0 = time.perf_counter()
    chunk = 1 << 20
    for lo in range(0, n, chunk):
        ids = np.arange(lo, min(n, lo + chunk), dtype=np.int64)
        for column in ('domain', 'quality', 'topic'):
            store.gather(column, ids)
    elapsed = time.perf_counter() - t0
    release_free_memory()
    after = memory_status()
    return {'labels_per_s': 3 * n / elapsed,
            'anon_growth_bytes': after['RssAnon'] - before['RssAnon'],
            'file_growth_bytes': after['RssFile'] - before['RssFile']}


# -- one size ----------------------------------------------------------------------------------


def run_size(n: int, root: str, layouts: Sequence[Layout], same_world: Layout,
             args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement at dataset size ``n``."""
    rng = np.random.default_rng(n)
    res: dict[str, Any] = {'n': n}
    canonical_nodes = layouts[0].nodes
    dirs, res['store'] = write_store(root, n, seed=n % (1 << 32))
    units = streaming_shard_sizes(dirs, n, canonical_nodes)

    t0 = time.perf_counter()
    store = open_store(dirs)
    res['store']['open_validate_s'] = time.perf_counter() - t0
    t0 = time.perf_counter()
    agents = build_agents(None, store, ['domain', 'quality', 'topic'])
    res['store']['bind_agents_s'] = time.perf_counter() - t0
    res['agent_sizes'] = [a.num_values for a in agents]
    # The rank's weight board, as the dataset creates it for these agents; it numbers versions.
    board = WeightBoard(f'mads_scale_{os.getpid()}', res['agent_sizes'], BOARD_CAPACITY,
                        create=True, log_width=LOG_WIDTH)
    try:
        board.configure(UPDATE_INTERVAL, 1)
        res['board_bytes_per_rank'] = board._size
        _measure(n, res, units, store, agents, board, layouts, same_world, args, rng)
    finally:
        board.cleanup()
        del store, agents
        gc.collect()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return res


def _measure(n: int, res: dict[str, Any], units: NDArray[np.int64],
             store: LabelStore, agents: Sequence[Agent], board: WeightBoard,
             layouts: Sequence[Layout], same_world: Layout, args: argparse.Namespace,
             rng: np.random.Generator) -> None:
    canonical_nodes = layouts[0].nodes
    t0 = time.perf_counter()
    shuffle = epoch_shuffle(units, canonical_nodes)
    res['shuffle_s'] = time.perf_counter() - t0
    seq, res['layouts'] = check_layouts(n, shuffle, layouts, same_world, canonical_nodes,
                                        args.sample_pools, board.schedule, rng)
    bpe = res['layouts']['batches_per_epoch']
    pools, ranks, batches = timing_pools(seq, shuffle, layouts[0].workers, args.pools, rng)
    del seq, shuffle
    gc.collect()

    # Score tables of every version the timing pools touch (the dataset caches them per version).
    schedule = board.schedule.with_epoch(bpe)
    mem_rng = np.random.default_rng(1)
    theta = np.full(len(agents), 1.0 / len(agents))
    tables: dict[int, list[NDArray]] = {}
    for gb in np.unique(schedule.global_batch(EPOCH, batches)):
        version = schedule.version_for_batch(int(gb))
        memories = tuple(mem_rng.uniform(0.2, 5.0, a.num_values) for a in agents)
        tables.setdefault(version, version_tables(agents, Weights(version, theta, memories)))

    def selection() -> dict[str, float]:
        return time_selection(store, agents, board, schedule, tables, pools, ranks, batches,
                              layouts[0].num_ranks)

    def best(runs: list[dict[str, float]]) -> dict[str, float]:
        return min(runs, key=lambda t: sum(t[p] for p in parts))

    def cold_selection() -> dict[str, float]:
        drop_page_cache(store)
        return selection()

    parts = ('gather', 'select')
    drop_page_cache(store)
    res['probe_cold_ms'] = 1e3 * time_probes(store, agents, n, range(1000, 1000 + args.cold_probes))
    cold = best([cold_selection() for _ in range(2)])
    warm = best([selection() for _ in range(3)])
    labels = 3 * pools.size  # Candidate label values gathered per pass (3 columns).
    for name, t in (('cold', cold), ('warm', warm)):
        res[f'pool_{name}_us'] = 1e6 * sum(t[p] for p in parts) / len(pools)
        res[f'pool_{name}_cpu_us'] = 1e6 * t['cpu'] / len(pools)
        for p in parts:
            res[f'{p}_{name}_us'] = 1e6 * t[p] / len(pools)
        res[f'gather_{name}_labels_per_s'] = labels / t['gather']
    res['timing_pools'] = len(pools)
    res['whole_store'] = whole_store_read(store, n)
    res['probe_warm_ms'] = 1e3 * time_probes(store, agents, n, range(args.probes))


# -- report ------------------------------------------------------------------------------------


def _n(n: int) -> str:
    e = int(round(math.log10(n)))
    return f'1e{e}' if 10**e == n else f'{n:,}'


def table(results: Sequence[dict[str, Any]], layouts: Sequence[Layout], same_world: Layout,
          board_node_bytes: int) -> str:
    """The report: one row per figure, one column per dataset size."""
    ref = layouts[0]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fmt) -> None:
        rows.append((label, [fmt(r) for r in results]))

    def lay(name: str, key: str):
        total = 'pools' if key == 'differing' else 'sampled'
        return lambda r: f'{r["layouts"][name][key]:,}/{r["layouts"][name][total]:,}'

    row('labels: generate (s)', lambda r: f'{r["store"]["generate_s"]:.2f}')
    row('labels: write_labels, 3 streams (s)', lambda r: f'{r["store"]["write_s"]:.2f}')
    row('sidecar on disk (bytes/sample)', lambda r: f'{r["store"]["bytes_per_sample"]:.3f}')
    row('open + validate labels, per process (s)', lambda r: f'{r["store"]["open_validate_s"]:.3f}')
    row('bind agents, rank main only (s)', lambda r: f'{r["store"]["bind_agents_s"]:.3f}')
    row('py1e shuffle (s)', lambda r: f'{r["shuffle_s"]:.2f}')
    row(f'partition {ref.name} (s)', lambda r: f'{r["layouts"][f"partition_{ref.name}_s"]:.2f}')
    row('pools per rank per epoch', lambda r: f'{r["layouts"]["batches_per_epoch"]:,}')
    for layout in layouts[1:]:
        row(f'{layout.name} vs {ref.name}: pools differing', lay(layout.name, 'differing'))
        row(f'{layout.name} vs {ref.name}: sampled mismatches', lay(layout.name, 'mismatches'))
    row(f'{same_world.name} vs {ref.name}: pools differing', lay(same_world.name, 'differing'))
    row(f'{same_world.name}: sampled in same global batch',
        lay(same_world.name, 'same_global_batch'))
    row('per pool, cold (us)', lambda r: f'{r["pool_cold_us"]:.1f}')
    row('per pool, warm (us)', lambda r: f'{r["pool_warm_us"]:.1f}')
    row('per pool, warm, CPU time (us)', lambda r: f'{r["pool_warm_cpu_us"]:.1f}')
    row('  labels (gather, 1/64 of a block read)', lambda r: f'{r["gather_warm_us"]:.1f}')
    row('  version, scores, noise, top-k, probe log', lambda r: f'{r["select_warm_us"]:.1f}')
    row('label gather, cold (labels/s)', lambda r: f'{r["gather_cold_labels_per_s"]:.3g}')
    row('label gather, warm (labels/s)', lambda r: f'{r["gather_warm_labels_per_s"]:.3g}')
    row('probe draw, cold (ms/update)', lambda r: f'{r["probe_cold_ms"]:.2f}')
    row('probe draw, warm (ms/update)', lambda r: f'{r["probe_warm_ms"]:.2f}')
    row('whole-store read (labels/s)', lambda r: f'{r["whole_store"]["labels_per_s"]:.3g}')
    row('  RSS growth anon / file-backed (MB)',
        lambda r: f'{r["whole_store"]["anon_growth_bytes"] / MB:.1f}/'
                  f'{r["whole_store"]["file_growth_bytes"] / MB:.0f}')
    row(f'weight boards per node, {ref.ranks} ranks (KB)',
        lambda r: f'{board_node_bytes / 1024:.1f}')
    row('sidecar page cache per node (MB)', lambda r: f'{r["store"]["disk_bytes"] / MB:.1f}')

    width = max(len(label) for label, _ in rows)
    cols = [max(len(_n(r['n'])) + 2, *(len(v[i]) for _, v in rows)) for i, r in
            enumerate(results)]
    lines = [f'{"metric":<{width}} ' + ' '.join(f'{"n=" + _n(r["n"]):>{c}}'
                                                 for r, c in zip(results, cols))]
    lines += [f'{label:<{width}} ' + ' '.join(f'{v:>{c}}' for v, c in zip(values, cols))
              for label, values in rows]
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='1e6,1e7,1e8',
                        help='comma-separated dataset sizes (default 1e6,1e7,1e8)')
    parser.add_argument('--quick', action='store_true',
                        help='sizes 1e5,1e6 on a 4x2x2 layout (a smoke run)')
    parser.add_argument('--workdir', default=None, help='where to write the synthetic streams')
    parser.add_argument('--keep', action='store_true', help='keep the synthetic streams')
    parser.add_argument('--json', default=None, help='also write the results here')
    parser.add_argument('--pools', type=int, default=None,
                        help='pools timed per size (default 8192; 1024 with --quick)')
    parser.add_argument('--sample-pools', type=int, default=None,
                        help='pools located by content per layout (default 2000; 300 --quick)')
    parser.add_argument('--probes', type=int, default=None,
                        help='warm probe draws timed per size (default 50; 10 --quick)')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.quick:
        sizes = [10**5, 10**6]
        layouts = [Layout(4, 2, 2), Layout(4, 2, 1)]
        same_world = Layout(2, 4, 2)
    else:
        sizes = [int(float(s)) for s in args.sizes.split(',')]
        layouts = [Layout(128, 8, 8), Layout(128, 8, 4), Layout(128, 8, 1)]
        same_world = Layout(64, 16, 8)
    args.pools = args.pools or (1024 if args.quick else 8192)
    args.sample_pools = args.sample_pools or (300 if args.quick else 2000)
    args.probes = args.probes or (10 if args.quick else 50)
    args.cold_probes = 3 if args.quick else 5
    if max(sizes) >= 2**31:
        parser.error('sizes must be below 2^31 (pool contents are kept as int32)')

    workdir = args.workdir or tempfile.mkdtemp(prefix='mads_scale_')
    os.makedirs(workdir, exist_ok=True)
    results = []
    try:
        for n in sizes:
            t0 = time.perf_counter()
            results.append(run_size(n, os.path.join(workdir, f'n{n}'), layouts, same_world, args))
            print(f'n={_n(n)} done in {time.perf_counter() - t0:.1f}s', file=sys.stderr)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    board_bytes = results[-1]['board_bytes_per_rank']
    board_node = board_bytes * layouts[0].ranks
    wall = time.perf_counter() - start
    peak = memory_status()['VmHWM']

    ref = layouts[0]
    print(f'\nMADS at cluster scale, simulated: {ref.name} (nodes x ranks x workers), '
          f'{ref.nodes} canonical nodes, relaxed partition, py1e shuffle, B={BATCH}, r={RATIO} '
          f'(pool {POOL}), {BLOCK_POOLS} pools per label read, W={UPDATE_INTERVAL}')
    print(table(results, layouts, same_world, board_node))
    print(f'\npools differing: every pool of every rank, numbered by pools.py, vs {ref.name}; '
          f'sampled mismatches: pools found by content whose (rank, batch, noise key, global '
          f'batch, version, contents) differ. per pool: {results[0]["timing_pools"]} real pools, '
          f'labels of 3 agents; cold = best of 2 passes, each after evicting the label pages from '
          f'the page cache; warm = best of 3 passes after them. board: agents '
          f'{results[0]["agent_sizes"]}, capacity '
          f'{BOARD_CAPACITY}, {board_bytes:,} bytes per rank.')
    print(f'wall time {wall:.1f}s, peak RSS {peak / 2**30:.2f} GiB (incl. file-backed pages)')

    if args.json:
        with open(args.json, 'w') as f:
            json.dump({
                'config': {'layouts': [l.name for l in layouts], 'same_world': same_world.name,
                           'batch': BATCH, 'ratio': RATIO, 'pool': POOL,
                           'block_pools': BLOCK_POOLS, 'update_interval': UPDATE_INTERVAL,
                           'samples_per_shard': SAMPLES_PER_SHARD, 'quick': args.quick},
                'results': results, 'board_bytes_per_rank': board_bytes,
                'board_bytes_per_node': board_node, 'wall_s': wall, 'peak_rss_bytes': peak,
            }, f, indent=1, default=lambda o: o.item() if hasattr(o, 'item') else str(o))
    return 0


if __name__ == '__main__':
    sys.exit(main())
