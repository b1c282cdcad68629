"""Data efficiency of MADS against uniform sampling, single agents, static filtering and fixed θ.

Every arm trains the same model with the same optimizer, seeds and token budget on the same
labelled corpus (the demo corpus by default), evaluating the reference loss and per-domain
held-out losses as it goes:

1. ``uniform``: plain StreamingDataset (``yamls/random-baseline-cpu.yaml``),
2.-4. ``quality`` / ``domain`` / ``topic``: one agent, memory updated online,
5. ``static-quality``: static top-k by the initial quality score (a classifier filter: hard top-k
   over fine quality bins, no console),
6. ``fixed-theta``: all three agents with θ frozen at equal weights (no collaboration),
7. ``mads``: all three agents, dynamic θ (``yamls/quickstart-cpu.yaml``).

The data-efficiency ratio of an arm is the number of tokens it needs to reach uniform's final
reference loss (mean over seeds) divided by uniform's budget: lower is better, the paper reports
about 0.5. Writes ``results.md``, ``results.json`` and ``results.png`` into ``--out``.

Run: ``python benchmarks/data_efficiency.py [--seeds 3] [--budget 600ba] [--out runs/efficiency]``
(default budget: about 45 minutes on 2 CPU cores). ``--data DIR --reference DIR`` use any labelled
MDS dataset and reference set instead of the demo corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any, Optional

import numpy as np

from streaming_mads.demo import prepare_data, quiet, steps_to_reach, train_run

QUALITY_FINE = [0.5 * i for i in range(1, 10)]  # 10 bins over 0-5
ARMS: dict[str, tuple[str, list[str]]] = {
    'uniform': ('random-baseline-cpu.yaml', []),
    'quality': ('quickstart-cpu.yaml', ['train_loader.dataset.agents=[quality]']),
    'domain': ('quickstart-cpu.yaml', ['train_loader.dataset.agents=[domain]']),
    'topic': ('quickstart-cpu.yaml', ['train_loader.dataset.agents=[topic]']),
    'static-quality': ('quickstart-cpu.yaml', [
        'algorithms={}', 'train_loader.dataset.temperature=0',
        'train_loader.dataset.agents=[{type: quality, bins: ' + str(QUALITY_FINE) + ', init: ' +
        str([float(2**i) for i in range(10)]) + '}]']),
    'fixed-theta': ('quickstart-cpu.yaml', ['algorithms.mads_console.lr_theta=0']),
    'mads': ('quickstart-cpu.yaml', []),
}


def _interp(steps: list[int], losses: list[float], grid: np.ndarray) -> np.ndarray:
    return np.interp(grid, steps, losses)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per arm: final reference loss (mean, std), held-out losses, data-efficiency ratio."""
    uniform_final = float(np.mean([r['eval']['reference'][1][-1] for r in runs['uniform']]))
    budget = runs['uniform'][0]['batches']
    out: dict[str, Any] = {'uniform_final_reference_loss': uniform_final, 'arms': {}}
    for arm, seeds in runs.items():
        finals = [r['eval']['reference'][1][-1] for r in seeds]
        reach = [steps_to_reach(*r['eval']['reference'], uniform_final) for r in seeds]
        # Mean curve over seeds, then the step it reaches uniform's final loss.
        steps = seeds[0]['eval']['reference'][0]
        mean_curve = np.mean([_interp(*r['eval']['reference'], np.asarray(steps)) for r in seeds], 0)
        reach_mean = steps_to_reach(steps, mean_curve.tolist(), uniform_final)
        heldout = {k[len('heldout_'):]: float(np.mean([r['eval'][k][1][-1] for r in seeds]))
                   for k in seeds[0]['eval'] if k.startswith('heldout_')}
        out['arms'][arm] = {
            'final_mean': float(np.mean(finals)), 'final_std': float(np.std(finals)),
            'ratio': None if reach_mean is None else reach_mean / budget,
            'ratio_per_seed': [None if x is None else x / budget for x in reach],
            'heldout': heldout, 'curve_steps': steps, 'curve_mean': mean_curve.tolist(),
            'console_share': float(np.mean([r['console_time_s'] / r['wall_s'] for r in seeds])),
        }
    return out


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    domains = sorted(next(iter(summary['arms'].values()))['heldout'])
    head = '| arm | final ref loss (mean ± std) | data-efficiency ratio | ' + \
        ' | '.join(f'held-out {d}' for d in domains) + ' |'
    lines = [head, '|' + ' --- |' * (3 + len(domains))]
    for arm, s in summary['arms'].items():
        ratio = '> 1 (not reached)' if s['ratio'] is None else f'{s["ratio"]:.2f}'
        lines.append(f'| {arm} | {s["final_mean"]:.4f} ± {s["final_std"]:.4f} | {ratio} | ' +
                     ' | '.join(f'{s["heldout"][d]:.3f}' for d in domains) + ' |')
    lines.append('')
    lines.append(f'{meta["seeds"]} seeds per arm, {meta["budget_batches"]} batches x '
                 f'{meta["tokens_per_batch"]} tokens each; ratio = tokens to reach uniform\'s final '
                 f'reference loss ({summary["uniform_final_reference_loss"]:.4f}) / uniform\'s '
                 f'tokens, on the mean curve over seeds. Machine: {meta["machine"]}; '
                 f'{meta["minutes"]:.0f} min. Command: `{meta["command"]}`')
    return '\n'.join(lines)


def plot(summary: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, s in summary['arms'].items():
        ax.plot(s['curve_steps'], s['curve_mean'], label=arm, lw=2.5 if arm == 'mads' else 1.2,
                ls='--' if arm == 'uniform' else '-')
    ax.axhline(summary['uniform_final_reference_loss'], color='grey', lw=0.6)
    ax.set(xlabel='batch (equal tokens per batch in every arm)', ylabel='reference loss',
           title='reference loss, mean over seeds')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='runs/data-efficiency')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--budget', default=None, help='max_duration of every arm, e.g. 600ba')
    parser.add_argument('--arms', default=','.join(ARMS), help='comma-separated subset')
    parser.add_argument('--data', help='labelled MDS dataset (default: build the demo corpus)')
    parser.add_argument('--reference', help='reference MDS set (with --data)')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='extra override for every arm (repeatable)')
    parser.add_argument('--reuse', metavar='RESULTS_JSON',
                        help='take the runs of --reuse-arms from an earlier results.json (arms '
                        'whose configuration did not change, e.g. uniform)')
    parser.add_argument('--reuse-arms', default='uniform')
    args = parser.parse_args(argv)
    quiet()
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    if args.data:
        if not args.reference:
            parser.error('--data needs --reference')
        paths: dict[str, Any] = {'data': args.data, 'reference': args.reference, 'heldout': {}}
    else:
        paths = prepare_data(os.path.join(args.out, 'corpus'), 1_200_000, 128, 4096, False)
    arms = [a for a in args.arms.split(',') if a]
    if 'uniform' not in arms:
        parser.error('the uniform arm is the yardstick: keep it in --arms')
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    reused = set()
    if args.reuse:
        with open(args.reuse) as f:
            earlier = json.load(f)['runs']
        for arm in args.reuse_arms.split(','):
            if arm in runs and len(earlier.get(arm, [])) >= args.seeds:
                runs[arm] = earlier[arm][:args.seeds]
                reused.add(arm)
    for seed in range(args.seeds):
        for arm in [a for a in arms if a not in reused]:
            yaml_name, overrides = ARMS[arm]
            overrides = overrides + [f'seed={seed}', f'train_loader.dataset.shuffle_seed={seed}'] + \
                args.set + ([f'max_duration={args.budget}'] if args.budget else [])
            t0 = time.perf_counter()
            res = train_run(yaml_name, paths, overrides)
            runs[arm].append(res)
            print(f'[data-efficiency] seed {seed} {arm:<15} ref loss '
                  f'{res["eval"]["reference"][1][-1]:.4f} ({time.perf_counter() - t0:.0f}s)',
                  flush=True)
    summary = summarize(runs)
    meta = {'seeds': args.seeds, 'budget_batches': runs['uniform'][0]['batches'],
            'tokens_per_batch': runs['uniform'][0]['tokens'] // runs['uniform'][0]['batches'],
            'machine': f'{platform.machine()}, {os.cpu_count()} cores, {platform.system()}',
            'minutes': (time.perf_counter() - start) / 60,
            'command': 'python benchmarks/data_efficiency.py ' + ' '.join(argv or [])}
    table = markdown(summary, meta)
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
        f.write(table + '\n')
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump({'summary': summary, 'meta': meta, 'runs': runs}, f)
    plot(summary, os.path.join(args.out, 'results.png'))
    print(table)
    return summary


if __name__ == '__main__':
    import sys
    main(sys.argv[1:])
