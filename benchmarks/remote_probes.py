"""Bytes downloaded per console update against a remote dataset on a local S3-compatible server.

A moto S3 server on 127.0.0.1 (started here) holds the MDS shards; every run reads them through
Streaming's S3 downloader into its own empty cache (no ``cache_limit``, so nothing is evicted and
the cache lists exactly what was downloaded). Side by side, on the same data and batches:

* **loader only**: MADSDataset at the pool ratio, no console: what training downloads anyway;
* **console**: the same run with AgentConsole (probes from the pools the rank already read);
* **random-position probes**: the loader-only run plus ``probe_size`` reads at uniformly random
  sample ids per update, which is what a console that draws probes over the whole dataset costs.

The shuffle block is a tenth of the dataset, as for a corpus of 10^7 samples with Streaming's
default block of 262,144, so a run reads a small part of the shards in its first batches.
Goal: 0 extra shard downloads per console update.

Run: ``python benchmarks/remote_probes.py [--batches 120] [--samples 20000]``
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
import torch
from composer import Trainer
from torch.utils.data import DataLoader

from common import build_token_corpus, cached_shards, local_s3, upload_dir

from streaming_mads.algorithms import AgentConsole
from streaming_mads import MADSDataset
from streaming_mads.collate import TokenCollator
from streaming_mads.models import build_causal_lm


def _dataset(args: argparse.Namespace, cache: str) -> MADSDataset:
    return MADSDataset(remote='s3://data/corpus', local=cache, batch_size=args.batch_size,
                       pool_ratio=4, shuffle=True, shuffle_seed=1,
                       shuffle_block_size=args.samples // 10)


def run(args: argparse.Namespace, ref: str, cache: str, console: bool) -> int:
    """Train (or just load) ``args.batches`` batches from the remote data; the updates run."""
    ds = _dataset(args, cache)
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=2,
                        collate_fn=TokenCollator())
    if not console:
        for b, _ in enumerate(loader, 1):
            if b == args.batches:
                break
        return 0
    model = build_causal_lm(args.vocab, args.seq_len, 'tiny', seed=0)
    algo = AgentConsole(reference=ref, update_interval=args.interval)
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f'{args.batches}ba',
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
                      algorithms=[algo], device='cpu', progress_bar=False, log_to_console=False)
    trainer.fit()
    trainer.close()
    return algo.console.latest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--samples', type=int, default=20000)
    parser.add_argument('--batches', type=int, default=120)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--interval', type=int, default=30, help='update_interval W')
    parser.add_argument('--probe-size', type=int, default=64)
    parser.add_argument('--seq-len', type=int, default=128)
    parser.add_argument('--vocab', type=int, default=4096)
    parser.add_argument('--json', help='also write the figures here')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, local_s3('data') as s3:
        data = build_token_corpus(os.path.join(tmp, 'data'), args.samples, args.seq_len,
                                  args.vocab, size_limit=1 << 16)
        ref = build_token_corpus(os.path.join(tmp, 'ref'), 64, args.seq_len, args.vocab, seed=1)
        upload_dir(s3, data, 'data', 'corpus')
        with open(os.path.join(data, 'index.json')) as f:
            zipped = [s['zip_data']['bytes'] for s in json.load(f)['shards']]
        caches = {k: os.path.join(tmp, k) for k in ('loader', 'console', 'random')}
        run(args, ref, caches['loader'], console=False)
        updates = run(args, ref, caches['console'], console=True)
        run(args, ref, caches['random'], console=False)
        ds = _dataset(args, caches['random'])
        rng = np.random.default_rng(0)
        for i in rng.integers(0, ds.num_samples, args.probe_size * updates):
            ds[int(i)]
        shards = {k: cached_shards(c) for k, c in caches.items()}
    base = shards['loader']
    print(f'\n{len(zipped)} shards of about {np.mean(zipped) / 1024:.0f} KiB (zstd) on S3, '
          f'{args.samples} samples, {args.batches} batches of {args.batch_size} at pool ratio 4, '
          f'{updates} console updates (W={args.interval}, probe_size={args.probe_size})\n')
    print(f'{"run":<26} {"shards":>7} {"MiB":>8} {"extra shards/update":>20} '
          f'{"extra MiB/update":>17}')
    figures = {}
    for name, label in (('loader', 'loader only'), ('console', 'console (logged pools)'),
                        ('random', 'random-position probes')):
        got = shards[name]
        extra = got - base
        mib = sum(zipped[s] for s in got) / 2**20
        extra_mib = sum(zipped[s] for s in extra) / 2**20
        per = len(extra) / max(updates, 1)
        figures[name] = {'shards': len(got), 'extra_shards_per_update': per,
                         'extra_mib_per_update': extra_mib / max(updates, 1)}
        print(f'{label:<26} {len(got):>7} {mib:>8.2f} {per:>20.2f} '
              f'{extra_mib / max(updates, 1):>17.3f}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(figures, f, indent=1)


if __name__ == '__main__':
    main()
