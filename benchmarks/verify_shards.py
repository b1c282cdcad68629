"""Cost of ``verify_shards`` / ``mads verify``: hashing every local shard file against its index.

Writes a corpus as ``mads convert`` leaves it (Streaming's MDSWriter, zstd, an ``xxh3_64`` hash of
every file in ``index.json``), then measures, in one run:

* the check of the stored (compressed) shards, as before the first epoch of a local dataset;
* one epoch of reading with ``MADSDataset`` (``pool_ratio=1``, no workers), which decompresses
  every shard beside its compressed file;
* the check again, now of the compressed and the raw files (what a later run checks).

Each check is best of ``--repeats`` with the files in the page cache (a cold read adds the disk's
time, which the epoch pays as well). Prints MB/s and seconds for each, and each check's time as a
fraction of the epoch's.

Run: ``python benchmarks/verify_shards.py [--samples 100000] [--seq-len 512] [--json out.json]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import numpy as np
from streaming import MDSWriter
from torch.utils.data import DataLoader

from streaming_mads import MADSDataset, categorical, write_labels
from streaming_mads.shard_check import VerifyReport, verify_streams


def build(out: str, samples: int, seq_len: int, size_limit: int) -> None:
    rng = np.random.default_rng(0)
    with MDSWriter(out=out, columns={'tokens': 'ndarray:uint16'}, compression='zstd',
                   hashes=['xxh3_64'], size_limit=size_limit) as writer:
        for _ in range(samples):
            writer.write({'tokens': rng.integers(0, 50000, seq_len, dtype=np.uint16)})
    write_labels(out, {'domain': categorical(rng.integers(0, 7, samples),
                                             [f'd{i}' for i in range(7)])})


def check(data: str, repeats: int) -> VerifyReport:
    best = None
    for _ in range(repeats):
        report = verify_streams([('data', data)])
        assert not report.bad and not report.unhashed, report.summary()
        if best is None or report.seconds < best.seconds:
            best = report
    assert best is not None
    return best


def epoch(data: str, batch_size: int) -> tuple[float, int]:
    ds = MADSDataset(local=data, batch_size=batch_size, agents=['domain'])
    start = time.perf_counter()
    n = sum(len(batch['tokens']) for batch in DataLoader(ds, batch_size=batch_size))
    seconds = time.perf_counter() - start
    del ds
    gc.collect()
    return seconds, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--samples', type=int, default=100_000)
    parser.add_argument('--seq-len', type=int, default=512)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--size-limit', type=int, default=1 << 24, help='shard bytes (16 MiB)')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--json', help='also write the figures here')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, 'data')
        t0 = time.perf_counter()
        build(data, args.samples, args.seq_len, args.size_limit)
        print(f'wrote {args.samples} samples x {args.seq_len} tokens in '
              f'{time.perf_counter() - t0:.1f} s')
        stored = check(data, args.repeats)
        epoch_s, n = epoch(data, args.batch_size)
        both = check(data, args.repeats)
    figures = {
        'samples': n, 'epoch_s': epoch_s, 'epoch_samples_per_s': n / epoch_s,
        'stored_mb': stored.bytes / 1e6, 'stored_s': stored.seconds,
        'stored_mb_per_s': stored.bytes / 1e6 / stored.seconds,
        'all_mb': both.bytes / 1e6, 'all_s': both.seconds,
        'all_mb_per_s': both.bytes / 1e6 / both.seconds,
    }
    print(f'one epoch (MADSDataset, pool_ratio=1, no workers): {n} samples in {epoch_s:.2f} s')
    print(f'check of the compressed shards: {figures["stored_mb"]:.0f} MB in {stored.seconds:.3f} s '
          f'({figures["stored_mb_per_s"]:.0f} MB/s), {100 * stored.seconds / epoch_s:.1f}% of the '
          'epoch')
    print(f'check of compressed + raw shards: {figures["all_mb"]:.0f} MB in {both.seconds:.3f} s '
          f'({figures["all_mb_per_s"]:.0f} MB/s), {100 * both.seconds / epoch_s:.1f}% of the epoch')
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(figures, f, indent=1)


if __name__ == '__main__':
    main()
