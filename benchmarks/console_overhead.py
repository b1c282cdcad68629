"""Console cost: share of training wall time spent in AgentConsole updates, at default settings.

Trains the same model on the same MADSDataset twice, side by side in one run: without the console
and with it (default ``update_interval``, ``probe_size``, ``reference_size``). Reports the sum of
the console's own update times over the run's wall time, and the wall-time ratio of the two runs.

Goal: at most 5% on the CPU config (at most 2% on a GPU).

Run: ``python benchmarks/console_overhead.py [--batches 450] [--device cpu|gpu]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

from common import build_token_corpus

from streaming_mads.algorithms import AgentConsole
from streaming_mads import MADSDataset
from streaming_mads.collate import TokenCollator
from streaming_mads.models import build_causal_lm


def train(data: str, ref: str, args: argparse.Namespace, console: bool) -> tuple[float, float, int]:
    """Wall time of ``fit``, time inside console updates, number of updates."""
    ds = MADSDataset(local=data, batch_size=args.batch_size, pool_ratio=2, shuffle=True)
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=TokenCollator())
    model = build_causal_lm(args.vocab, args.seq_len, args.model, seed=0)
    mem = InMemoryLogger()
    algos = [AgentConsole(reference=ref)] if console else []
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f'{args.batches}ba',
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3), algorithms=algos,
                      loggers=[mem], device=args.device, progress_bar=False,
                      precision='amp_bf16' if args.device == 'gpu' else 'fp32')
    start = time.perf_counter()
    trainer.fit()
    if args.device == 'gpu':
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    updates = [v for _, v in mem.data.get('mads/update_time_s', [])]
    trainer.close()
    del trainer, loader, ds
    return wall, sum(updates), len(updates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batches', type=int, default=450)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--seq-len', type=int, default=128)
    parser.add_argument('--vocab', type=int, default=4096)
    parser.add_argument('--model', default='tiny', help='streaming_mads.models preset (tiny: the quickstart CPU config)')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'gpu'])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = build_token_corpus(os.path.join(tmp, 'data'),
                                  args.batches * args.batch_size * 2 + 1000, args.seq_len,
                                  args.vocab)
        ref = build_token_corpus(os.path.join(tmp, 'ref'), 256, args.seq_len, args.vocab, seed=1)
        warm = argparse.Namespace(**{**vars(args), 'batches': 20})
        train(data, ref, warm, console=False)  # Warm-up, so neither timed run pays first-run costs.
        base, _, _ = train(data, ref, args, console=False)
        wall, inside, n = train(data, ref, args, console=True)
    print(f'\n{"run":<16} {"wall s":>8} {"console s":>10} {"updates":>8}')
    print(f'{"no console":<16} {base:>8.1f} {"-":>10} {"-":>8}')
    print(f'{"AgentConsole":<16} {wall:>8.1f} {inside:>10.2f} {n:>8}')
    print(f'\nconsole share of wall time: {100 * inside / wall:.2f}% (goal <= 5% CPU, <= 2% GPU); '
          f'wall-time ratio with/without: {wall / base:.3f}; model={args.model}, '
          f'batch={args.batch_size}x{args.seq_len}, device={args.device}, '
          f'{args.batches} batches, default console settings')


if __name__ == '__main__':
    main()
