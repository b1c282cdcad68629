"""One-shot GPU check: influence speed, console share, memory at 1B, loader speed, FSDP1.

Prints one table. ``--cpu-smoke`` runs every row with tiny sizes on the CPU (the test suite runs
it, so the script is known to work before a GPU ever sees it); without it the sizes are the GPU
YAMLs': the 125M config of ``yamls/gpu-125m.yaml`` (its console settings and micro-batch, bf16
autocast) and ``llama-1b`` with 2048-token probes.

Rows:

* influence, ghost vs a per-sample loop (``benchmarks/influence.py``), at 16/64/256 probes.
* training tokens/s without and with the console (one GPU, the YAML's micro-batch as the batch,
  ``update_interval`` shortened so updates happen), and the console's share of wall time, measured
  and extrapolated to the YAML's ``update_interval`` and global batch on one GPU.
* peak memory of the influence pass at 1B (reference and probes at the YAML's micro-batch,
  2048 tokens, checkpointing on) next to a training step's at the same micro-batch.
* MADSDataset at pool ratio 1 and 4 vs a plain StreamingDataset, samples/s with 8 workers.
* FSDP1 (``tests/test_fsdp.py``, GPU only): influence under FULL_SHARD/SHARD_GRAD_OP equals the
  unsharded model's and leaves parameters, gradients and optimizer state untouched.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

from common import build_token_corpus  # noqa: E402

from streaming_mads.influence import (PeakMemory, influence_memory, per_sample_influence,  # noqa: E402
                                      reference_gradient)


@dataclass
class Sizes:
    """Everything the GPU and smoke runs differ in."""
    device: str
    preset_125m: str
    preset_1b: str
    vocab: int
    seq_len: int
    probes: List[int]
    train_batches: int
    update_interval: int
    console: Dict[str, Any]
    loader_samples: int
    loader_seq_len: int
    workers: int
    autocast: Optional[torch.dtype]


def sizes(smoke: bool) -> Sizes:
    from streaming_mads.run.config import load_config
    cfg = load_config(os.path.join(ROOT, 'yamls', 'gpu-125m.yaml'))
    console = {k: v for k, v in cfg['algorithms']['mads_console'].items()
               if not k.startswith('reference') or k == 'reference_size'}
    if smoke:
        console.update(probe_size=8, probe_pool=64, reference_size=4)
        return Sizes('cpu', 'tiny', 'tiny', 512, 64, [4, 8, 16], 12, 6, console, 2000, 64, 2, None)
    return Sizes('gpu', 'gpt2-125m', 'llama-1b', 50304, 2048,
                 [16, 64, 256], 80, 20, console, 50_000, 512, 8, torch.bfloat16)


def _model(preset: str, s: Sizes) -> torch.nn.Module:
    from streaming_mads.models import build_causal_lm
    device = 'cuda' if s.device == 'gpu' else 'cpu'
    return build_causal_lm(s.vocab, s.seq_len, preset, seed=0).model.to(device)


def _batch(num: int, s: Sizes, seed: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, s.vocab, (num, s.seq_len), generator=gen)
    return {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids.clone()}


def _sync(s: Sizes) -> None:
    if s.device == 'gpu':
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], s: Sizes) -> tuple[float, Any]:
    _sync(s)
    start = time.perf_counter()
    out = fn()
    _sync(s)
    return time.perf_counter() - start, out


def influence_rows(s: Sizes, micro: int) -> List[List[str]]:
    from influence import brute_force
    model = _model(s.preset_125m, s).eval()
    options = dict(micro_batch=micro, autocast_dtype=s.autocast, checkpoint=True)
    grad = reference_gradient(model, _batch(8, s, 1), **options)
    per_sample_influence(model, _batch(2, s, 2), grad, **options)  # Warm-up.
    rows = []
    for num in s.probes:
        probe = _batch(num, s, 3 + num)
        ghost_s, ghost = _timed(lambda: per_sample_influence(model, probe, grad, **options), s)
        with torch.autocast(model.device.type, dtype=s.autocast, enabled=s.autocast is not None):
            loop_s, loop = _timed(lambda: brute_force(model, probe, grad), s)
        err = float((ghost.double() - loop).abs().max() / loop.abs().max())
        rows.append([f'influence, {num} probes', f'{s.preset_125m}, {s.seq_len} tok',
                     f'ghost {ghost_s:.2f}s, loop {loop_s:.2f}s ({loop_s / ghost_s:.1f}x), '
                     f'max rel diff {err:.1e}'])
    return rows


def _train(data: str, ref: str, s: Sizes, micro: int, console: bool) -> tuple[float, float, int]:
    """Wall time of ``fit``, seconds inside console updates, updates done."""
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from torch.utils.data import DataLoader

    from streaming_mads.algorithms import AgentConsole
    from streaming_mads import MADSDataset
    from streaming_mads.collate import TokenCollator
    from streaming_mads.models import build_causal_lm
    ds = MADSDataset(local=data, batch_size=micro, pool_ratio=2, shuffle=True)
    loader = DataLoader(ds, batch_size=micro, num_workers=s.workers, collate_fn=TokenCollator(),
                        drop_last=True)
    model = build_causal_lm(s.vocab, s.seq_len, s.preset_125m, seed=0)
    mem = InMemoryLogger()
    algos = [AgentConsole(reference=ref, **{**s.console, 'update_interval': s.update_interval})] \
        if console else []
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f'{s.train_batches}ba',
                      optimizers=torch.optim.AdamW(model.parameters(), lr=1e-4), algorithms=algos,
                      loggers=[mem], device=s.device, progress_bar=False, log_to_console=False,
                      precision='amp_bf16' if s.device == 'gpu' else 'fp32',
                      device_train_microbatch_size=micro)
    wall, _ = _timed(trainer.fit, s)
    updates = [v for _, v in mem.data.get('mads/update_time_s', [])]
    trainer.close()
    return wall, sum(updates), len(updates)


def training_rows(s: Sizes, micro: int, global_batch: int, interval: int) -> List[List[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        data = build_token_corpus(os.path.join(tmp, 'data'), s.train_batches * micro * 3 + 500,
                                  s.seq_len, s.vocab)
        ref = build_token_corpus(os.path.join(tmp, 'ref'), 256, s.seq_len, s.vocab, seed=1)
        _train(data, ref, Sizes(**{**vars(s), 'train_batches': 4}), micro,
               console=False)  # Warm-up (kernels, allocator, first-run costs).
        base, _, _ = _train(data, ref, s, micro, console=False)
        wall, inside, updates = _train(data, ref, s, micro, console=True)
    tokens = s.train_batches * micro * s.seq_len
    per_update = inside / max(updates, 1)
    step = (wall - inside) / s.train_batches * (global_batch // micro)  # One GPU, YAML batch.
    share = per_update / (per_update + interval * step)
    setting = f'{s.preset_125m}, batch {micro}x{s.seq_len}, {s.train_batches} batches'
    return [
        ['train tokens/s, no console', setting, f'{tokens / base:,.0f}'],
        ['train tokens/s, console', setting + f', W={s.update_interval}',
         f'{tokens / wall:,.0f} ({updates} updates, {per_update:.2f}s each)'],
        ['console share', f'W={interval}, global batch {global_batch} on 1 device',
         f'{100 * share:.2f}% (measured at W={s.update_interval}: {100 * inside / wall:.1f}%)'],
    ]


def _size(num: Optional[int]) -> str:
    if num is None:
        return 'n/a'
    return f'{num / 2**30:.2f} GiB' if num >= 2**30 else f'{num / 2**20:.1f} MiB'


def memory_row(s: Sizes, micro: int) -> List[List[str]]:
    model = _model(s.preset_1b, s)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step_batch = _batch(micro, s, 5)
    device = next(model.parameters()).device

    def train_step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=s.autocast, enabled=s.autocast is not None):
            loss = model(**step_batch).loss
        loss.backward()
        opt.step()

    train_step()  # Gradients and optimizer state exist, as at the end of a batch.
    with PeakMemory(device) as step:
        train_step()
    options = dict(micro_batch=micro, autocast_dtype=s.autocast, checkpoint=True)
    estimate = influence_memory(model, _batch(micro, s, 6), autocast_dtype=s.autocast,
                                checkpoint=True)
    with PeakMemory(device) as influence:
        grad = reference_gradient(model, _batch(micro, s, 7), **options)
        per_sample_influence(model, _batch(micro, s, 8), grad, **options)
        del grad
    return [['influence peak memory', f'{s.preset_1b}, micro-batch {micro}x{s.seq_len}',
             f'{_size(influence.bytes)} (FIT_START estimate {_size(estimate.peak)}) vs '
             f'training step {_size(step.bytes)}']]


def loader_rows(s: Sizes) -> List[List[str]]:
    from loader_throughput import measure
    from streaming import StreamingDataset

    from streaming_mads import MADSDataset
    with tempfile.TemporaryDirectory() as tmp:
        data = build_token_corpus(os.path.join(tmp, 'data'), s.loader_samples, s.loader_seq_len)
        common = dict(local=data, batch_size=32, shuffle=True, shuffle_seed=1)
        arms = {'plain StreamingDataset': lambda: StreamingDataset(**common),
                'MADSDataset r=1': lambda: MADSDataset(pool_ratio=1, **common),
                'MADSDataset r=4': lambda: MADSDataset(pool_ratio=4, temperature=1.0, **common)}
        rates = {name: measure(make, 32, s.workers)[0] for name, make in arms.items()}
    plain = rates['plain StreamingDataset']
    return [[f'loader {name}', f'{s.workers} workers, {s.loader_seq_len} tok',
             f'{rate:,.0f} samples/s ({rate / plain:.2f} of plain)'] for name, rate in rates.items()]


def fsdp1_row(s: Sizes) -> List[List[str]]:
    if s.device != 'gpu':
        return [['FSDP1 influence = unsharded', '-', 'skipped (FSDP1 needs a GPU)']]
    run = subprocess.run([sys.executable, '-m', 'pytest', '-q', 'tests/test_fsdp.py', '-k', 'fsdp1'],
                         cwd=ROOT, capture_output=True, text=True)
    last = (run.stdout.strip().splitlines() or ['no output'])[-1]
    return [['FSDP1 influence = unsharded', 'FULL_SHARD, SHARD_GRAD_OP', last]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cpu-smoke', action='store_true', help='tiny sizes on the CPU')
    args = parser.parse_args()
    s = sizes(args.cpu_smoke)
    from streaming_mads.run.config import load_config
    cfg = load_config(os.path.join(ROOT, 'yamls', 'gpu-125m.yaml'))
    cfg_1b = load_config(os.path.join(ROOT, 'yamls', 'gpu-1b.yaml'))
    micro = 4 if args.cpu_smoke else cfg['device_train_microbatch_size']
    micro_1b = 2 if args.cpu_smoke else cfg_1b['device_train_microbatch_size']
    start = time.perf_counter()
    rows: List[List[str]] = []
    for part in (lambda: influence_rows(s, micro),
                 lambda: training_rows(s, micro, cfg['global_train_batch_size'],
                                       cfg['algorithms']['mads_console']['update_interval']),
                 lambda: memory_row(s, micro_1b), lambda: loader_rows(s), lambda: fsdp1_row(s)):
        rows += part()
        if s.device == 'gpu':
            torch.cuda.empty_cache()
    widths = [max(len(r[k]) for r in rows + [['check', 'setting', 'result']]) for k in range(3)]
    line = lambda r: ' | '.join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    device = torch.cuda.get_device_name() if s.device == 'gpu' else 'cpu'
    print(f'\nMADS GPU check ({"cpu smoke" if args.cpu_smoke else "gpu"}: {device}, torch '
          f'{torch.__version__}, {time.perf_counter() - start:.0f}s)')
    print(line(['check', 'setting', 'result']))
    print('-+-'.join('-' * w for w in widths))
    for row in rows:
        print(line(row))


if __name__ == '__main__':
    main()
