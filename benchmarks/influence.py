"""Ghost influence vs a brute-force per-sample autograd loop, timed side by side.

Both compute ``<grad loss_i, G_R>`` for every probe sample of a small random-init GPT-2 at the same
parameters against the same reference gradient ``G_R`` (computed once, timed separately). The
brute force runs each sample alone: forward, ``torch.autograd.grad`` over the covered parameters,
dot with ``G_R``. The table also reports the largest disagreement, relative to the largest |I|.

Both do about the same arithmetic: the ghost pass is a forward, a backward to the activations only
(no weight gradients) and, per covered layer, one contraction as large as that layer's forward, so
it costs about one training step on the probe batch, like the loop. The speed-up is batching
efficiency: modest on a few CPU cores, where batch-1 matrix products already run near peak, and
large where a batch-1 loop is latency-bound (GPUs). The machine's load is printed because timings on
a shared host are noisy; rounds are interleaved so both methods see the same noise. The ``step``
column times one plain forward/backward of the probe batch's mean loss for scale: neither method
can beat it by much, since both do that much arithmetic.

    python benchmarks/influence.py                       # probe sizes 16 64 256
    python benchmarks/influence.py --sizes 64 --repeats 5 --vocab 4096
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
from torch import Tensor, nn

from streaming_mads.collate import IGNORE_INDEX
from streaming_mads.influence import (causal_lm_per_sample_loss, per_sample_influence,
                                      reference_gradient)


def make_model(args: argparse.Namespace) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                        vocab_size=args.vocab, n_positions=args.seq_len)
    return GPT2LMHeadModel(config).to(getattr(torch, args.dtype)).eval()


def make_batch(num: int, args: argparse.Namespace, gen: torch.Generator) -> Dict[str, Tensor]:
    """Random tokens, right-padded to ``seq_len`` from lengths in [seq_len / 2, seq_len]."""
    input_ids = torch.randint(0, args.vocab, (num, args.seq_len), generator=gen)
    lengths = torch.randint(args.seq_len // 2, args.seq_len + 1, (num,), generator=gen)
    mask = (torch.arange(args.seq_len)[None] < lengths[:, None]).long()
    return {'input_ids': input_ids, 'attention_mask': mask,
            'labels': input_ids.masked_fill(mask == 0, IGNORE_INDEX)}


def brute_force(model: nn.Module, batch: Dict[str, Tensor], grads: Dict[nn.Parameter, Tensor]) -> Tensor:
    params = list(grads)
    refs = list(grads.values())
    out = torch.empty(batch['input_ids'].shape[0], dtype=torch.float64)
    for i in range(out.numel()):
        loss = causal_lm_per_sample_loss(model, {k: v[i:i + 1] for k, v in batch.items()})[0]
        sample_grads = torch.autograd.grad(loss, params)
        out[i] = float(sum(torch.vdot(g.reshape(-1), r.reshape(-1)) for g, r in zip(sample_grads, refs)))
    return out


def training_step(model: nn.Module, batch: Dict[str, Tensor], params: List[nn.Parameter]) -> Tensor:
    """Forward and backward of the batch's mean loss: what one ordinary training step costs."""
    loss = causal_lm_per_sample_loss(model, batch).mean()
    torch.autograd.grad(loss, params)
    return loss.detach()


def timed_side_by_side(fns: List[Callable[[], Tensor]], repeats: int) -> List[tuple]:
    """Median time of each function over ``repeats`` interleaved rounds (shared machine noise)."""
    times: List[List[float]] = [[] for _ in fns]
    results: List[Tensor] = [torch.empty(0)] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            results[k] = fn()
            times[k].append(time.perf_counter() - start)
    return [(statistics.median(t), r) for t, r in zip(times, results)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[16, 64, 256], help='probe sizes')
    parser.add_argument('--n-layer', type=int, default=4)
    parser.add_argument('--n-head', type=int, default=4)
    parser.add_argument('--n-embd', type=int, default=128)
    parser.add_argument('--vocab', type=int, default=1024)
    parser.add_argument('--seq-len', type=int, default=64)
    parser.add_argument('--reference-size', type=int, default=8)
    parser.add_argument('--dtype', choices=['float32', 'float64'], default='float32')
    parser.add_argument('--repeats', type=int, default=3,
                        help='interleaved rounds (ghost, then brute force); medians are reported')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave default)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = make_model(args)
    num_params = sum(p.numel() for p in model.parameters())
    reference = make_batch(args.reference_size, args, gen)

    grads = reference_gradient(model, reference)
    # Warm up both paths (lazy initialisation, allocator) before timing anything.
    warm = make_batch(2, args, gen)
    per_sample_influence(model, warm, grads)
    brute_force(model, warm, grads)
    [(ref_time, _)] = timed_side_by_side([lambda: reference_gradient(model, reference)], args.repeats)
    print(f'GPT-2 n_layer={args.n_layer} n_embd={args.n_embd} vocab={args.vocab} '
          f'seq_len={args.seq_len} {args.dtype}: {num_params / 1e6:.2f}M parameters, '
          f'{len(grads)} covered tensors; torch {torch.__version__}, {torch.get_num_threads()} threads, '
          f'load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs')
    print(f'reference gradient ({args.reference_size} samples, computed once, shared by both): '
          f'{ref_time * 1e3:.1f} ms\n')

    header = f'{"probe":>6} {"ghost (s)":>10} {"brute (s)":>10} {"speed-up":>9} {"ghost ms/sample":>16} ' \
             f'{"brute ms/sample":>16} {"step (s)":>9} {"max rel err":>12}'
    print(header)
    print('-' * len(header))
    for size in args.sizes:
        probe = make_batch(size, args, gen)
        (ghost_time, ghost), (brute_time, brute), (step_time, _) = timed_side_by_side([
            lambda: per_sample_influence(model, probe, grads),
            lambda: brute_force(model, probe, grads),
            lambda: training_step(model, probe, list(grads)),
        ], args.repeats)
        err = float((ghost.double() - brute).abs().max() / brute.abs().max())
        print(f'{size:>6} {ghost_time:>10.3f} {brute_time:>10.3f} {brute_time / ghost_time:>8.1f}x '
              f'{ghost_time / size * 1e3:>16.2f} {brute_time / size * 1e3:>16.2f} {step_time:>9.3f} '
              f'{err:>12.2e}',
              flush=True)


if __name__ == '__main__':
    main()
