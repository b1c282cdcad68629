"""Loader cost: samples/s of MADSDataset (r = 1 and r = 4) vs a plain StreamingDataset.

All three read the same local MDS shards (zstd, written here by Streaming's MDSWriter) and are
measured side by side in one run, alternating, best of ``--repeats``. The figure of merit is
yielded samples per second; for r = 4 every yielded sample costs four candidates of
partitioning, labels and scoring but only one decode.

Goals: r = 1 at least 0.95 of plain, r = 4 at least 0.85 of plain per yielded sample.

Run: ``python benchmarks/loader_throughput.py [--samples 100000] [--workers 0]``
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time

from streaming import StreamingDataset
from torch.utils.data import DataLoader

from common import build_token_corpus

from streaming_mads import MADSDataset


def measure(make, batch_size: int, workers: int) -> tuple[float, int]:
    """Yielded samples per second over one epoch."""
    ds = make()
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers,
                        persistent_workers=False)
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += len(batch['tokens'])
    elapsed = time.perf_counter() - start
    del loader, ds
    gc.collect()
    return n / elapsed, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--samples', type=int, default=100_000)
    parser.add_argument('--seq-len', type=int, default=512)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--workers', type=int, default=0,
                        help='DataLoader workers (0 measures the dataset alone)')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, 'data')
        t0 = time.perf_counter()
        build_token_corpus(data, args.samples, args.seq_len)
        print(f'wrote {args.samples} samples x {args.seq_len} tokens in '
              f'{time.perf_counter() - t0:.1f}s')
        common = dict(local=data, batch_size=args.batch_size, shuffle=True, shuffle_seed=1)
        arms = {
            'plain': lambda: StreamingDataset(**common),
            'mads r=1': lambda: MADSDataset(pool_ratio=1, **common),
            'mads r=4': lambda: MADSDataset(pool_ratio=4, temperature=1.0, **common),
        }
        best = {name: 0.0 for name in arms}
        counts = {}
        for _ in range(args.repeats):
            for name, make in arms.items():
                rate, n = measure(make, args.batch_size, args.workers)
                best[name] = max(best[name], rate)
                counts[name] = n
    print(f'\n{"loader":<10} {"samples/s":>12} {"yielded":>9} {"vs plain":>9}')
    for name, rate in best.items():
        print(f'{name:<10} {rate:>12,.0f} {counts[name]:>9} {rate / best["plain"]:>9.3f}')
    print(f'\ngoal: r=1 >= 0.95 (got {best["mads r=1"] / best["plain"]:.3f}), '
          f'r=4 >= 0.85 (got {best["mads r=4"] / best["plain"]:.3f}) per yielded sample; '
          f'workers={args.workers}, batch={args.batch_size}, seq_len={args.seq_len}')


if __name__ == '__main__':
    main()
