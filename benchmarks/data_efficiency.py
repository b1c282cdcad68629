"""Data efficiency of MADS against uniform sampling, single agents, static filtering and fixed θ.

Every arm trains the same model with the same optimizer, seeds and token budget on the same
labelled corpus (the demo corpus by default), evaluating the evaluation, reference and
per-domain held-out losses as it goes:

1. ``uniform``: plain StreamingDataset (``yamls/random-baseline-cpu.yaml``),
2. ``stratified``: an equal share per domain (domain memory ``1 / frequency``, no console),
3. ``odm``: an online EXP3 bandit over domains rewarded by training loss, in the style of ODM
   (``algorithms.DomainBandit``, same probes, board and schedule as MADS),
4.-7. ``quality`` / ``domain`` / ``topic`` / ``similarity``: one agent, memory updated online,
8. ``static-quality``: static top-k by the initial quality score (a classifier filter: hard top-k
   over fine quality bins, no console),
9. ``static-similarity``: static top-k by reference similarity (DSIR-style importance filtering:
   hard top-k over 20 percentile bins of ``mads label --reference``'s score, no console),
10. ``fixed-theta``: all four agents with θ frozen at equal weights (no collaboration),
11. ``mads``: all four agents, dynamic θ (``yamls/quickstart-cpu.yaml``).

Every ratio is measured on the **evaluation set**: documents of the reference's kind that the
console never sees (the reference set only steers it). An arm's costs to reach uniform's final
evaluation loss (mean over seeds) are reported as ratios to uniform's whole run, in three units:
tokens, training wall time (loader at the pool ratio and console updates included, evaluation
excluded) and FLOPs (training plus the console's forward/backward passes); lower is better, the
paper reports about 0.5 in tokens. Seeds vary the shuffle, selection and console seeds together;
a gap to full MADS is marked when it exceeds two standard errors of the per-seed ratios. Writes
``results.md``, ``results.json`` and ``results.png`` into ``--out``.

The full run is both corpora, every default arm (11), 3 seeds, 250 batches each (about 35 minutes
per corpus on 2 CPU cores, one command each)::

    python benchmarks/data_efficiency.py --corpus demo --out runs/efficiency-demo
    python benchmarks/data_efficiency.py --corpus packages --out runs/efficiency-packages

``--data DIR --reference DIR --evaluation DIR`` use any labelled MDS dataset, reference set and
evaluation set instead of an embedded corpus.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Optional

import numpy as np

from streaming_mads.run.demo import (costs_to_reach, prepare_data, quiet, run_process_init, train_run,
                                 train_wall)

QUALITY_FINE = [0.5 * i for i in range(1, 10)]  # 10 bins over 0-5
SIMILARITY_FINE = [round(0.05 * i, 2) for i in range(1, 20)]  # 20 bins over the percentile
SIMILARITY = '{type: similarity, init: [0.5, 1, 2, 4, 8]}'  # as in quickstart-cpu.yaml


def _static(agent_type: str, edges: list[float]) -> list[str]:
    """A static filter: hard top-k over fine bins of one score, no console."""
    init = [float(2**i) for i in range(len(edges) + 1)]
    return ['algorithms={}', 'train_loader.dataset.temperature=0',
            f'train_loader.dataset.agents=[{{type: {agent_type}, bins: {edges}, init: {init}}}]']


ARMS: dict[str, tuple[str, list[str]]] = {
    'uniform': ('random-baseline-cpu.yaml', []),
    'quality': ('quickstart-cpu.yaml', ['train_loader.dataset.agents=[quality]']),
    'domain': ('quickstart-cpu.yaml', ['train_loader.dataset.agents=[domain]']),
    'topic': ('quickstart-cpu.yaml', ['train_loader.dataset.agents=[topic]']),
    'similarity': ('quickstart-cpu.yaml', [f'train_loader.dataset.agents=[{SIMILARITY}]']),
    'static-quality': ('quickstart-cpu.yaml', _static('quality', QUALITY_FINE)),
    'static-similarity': ('quickstart-cpu.yaml', _static('similarity', SIMILARITY_FINE)),
    'stratified': ('quickstart-cpu.yaml', [
        'algorithms={}', 'train_loader.dataset.temperature=1',
        'train_loader.dataset.agents=[{type: domain, init: balanced}]']),
    'odm': ('quickstart-cpu.yaml', [
        # EXP3 needs many rounds (its exploration ε_t = min(1/K, sqrt(ln K / (K t))) is still
        # 0.2 after 8): updates every 5 batches on 16 probes, about MADS' console cost.
        'algorithms={domain_bandit: {update_interval: 5, probe_size: 16}}',
        'train_loader.dataset.temperature=1', 'train_loader.dataset.agents=[domain]']),
    'fixed-theta': ('quickstart-cpu.yaml', ['algorithms.mads_console.lr_theta=0']),
    'mads': ('quickstart-cpu.yaml', []),
    # Ablations of the console's rule (not in the default run): the other rewards, no repeat
    # penalty, and nearly no shrinkage of rarely probed values.
    'mads-cosine': ('quickstart-cpu.yaml', ['algorithms.mads_console.reward=cosine']),
    'mads-adam': ('quickstart-cpu.yaml', ['algorithms.mads_console.reward=adam']),
    'mads-no-repeat': ('quickstart-cpu.yaml', ['algorithms.mads_console.repeat_penalty=0']),
    'mads-no-shrink': ('quickstart-cpu.yaml', ['algorithms.mads_console.value_prior=0.001']),
}
DEFAULT_ARMS = [a for a in ARMS if not a.startswith('mads-')]


COSTS = ('tokens', 'wall', 'flops')


def _int_clock(run: dict[str, Any]) -> dict[str, Any]:
    """A run read back from JSON, whose clock's batch numbers became strings."""
    return {**run, 'clock': {int(b): t for b, t in run['clock'].items()}}


def isolated_run(yaml_name: str, paths: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """:func:`train_run` in a fresh process: every arm starts from the same state (nothing a
    previous arm left behind) and returns every dataset's shared memory and file handles when it
    exits, whatever a long benchmark's run count. The processes come from a fork server that
    imported the training stack once (cheap to start, and safe: a plain fork of a process with
    threads running, as under pytest, can deadlock)."""
    ctx = multiprocessing.get_context('forkserver')
    ctx.set_forkserver_preload(['streaming_mads.run.demo'])
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=run_process_init) as pool:
        return pool.submit(train_run, yaml_name, paths, overrides).result()


def _console_key(overrides: list[str]) -> Optional[str]:
    """The arm's algorithm key under ``algorithms`` (``None``: no console)."""
    for o in overrides:
        if o.startswith('algorithms='):
            return None if o == 'algorithms={}' else o[len('algorithms={'):].split(':')[0].strip()
    return 'mads_console'


def _interp(steps: list[int], losses: list[float], grid: np.ndarray) -> np.ndarray:
    return np.interp(grid, steps, losses)


def _mean_std(values: list[Optional[float]]) -> tuple[Optional[float], float, int]:
    """Mean and std of the reached ratios, and how many seeds never reached the target."""
    reached = [v for v in values if v is not None]
    missed = len(values) - len(reached)
    if not reached:
        return None, 0.0, missed
    return float(np.mean(reached)), float(np.std(reached, ddof=1) if len(reached) > 1 else 0.0), \
        missed


def summarize(runs: dict[str, list[dict[str, Any]]], label: str = 'evaluation') -> dict[str, Any]:
    """Per arm: final loss (mean, std), held-out losses, and the three costs to reach uniform."""
    uniform = runs['uniform']
    target = float(np.mean([r['eval'][label][1][-1] for r in uniform]))
    budget_tokens = int(np.mean([r['tokens'] for r in uniform]))
    budget_wall = float(np.mean([train_wall(r) for r in uniform]))
    out: dict[str, Any] = {'label': label, 'target': target, 'arms': {}}
    for arm, seeds in runs.items():
        finals = [r['eval'][label][1][-1] for r in seeds]
        per_seed = [costs_to_reach(r, label, target, budget_tokens, budget_wall) for r in seeds]
        steps = seeds[0]['eval'][label][0]
        mean_curve = np.mean([_interp(*r['eval'][label], np.asarray(steps)) for r in seeds], 0)
        heldout = {k[len('heldout_'):]: float(np.mean([r['eval'][k][1][-1] for r in seeds]))
                   for k in seeds[0]['eval'] if k.startswith('heldout_')}
        costs = {}
        for cost in COSTS:
            mean, std, missed = _mean_std([c[cost] for c in per_seed])
            costs[cost] = {'mean': mean, 'std': std, 'missed': missed,
                           'per_seed': [c[cost] for c in per_seed]}
        out['arms'][arm] = {
            'final_mean': float(np.mean(finals)), 'final_std': float(np.std(finals)),
            'costs': costs, 'heldout': heldout, 'curve_steps': steps,
            'curve_mean': mean_curve.tolist(),
            'curve_tokens': [s * seeds[0]['tokens'] / seeds[0]['batches'] for s in steps],
            'curve_wall': np.mean([[r['clock'][s] for s in steps] for r in seeds], 0).tolist(),
            'console_share': float(np.mean([r['console_time_s'] / train_wall(r) for r in seeds])),
        }
    return out


def _gap_beyond_two_se(a: dict[str, Any], b: dict[str, Any]) -> Optional[bool]:
    """Whether two arms' mean token ratios differ by more than two standard errors."""
    x = [v for v in a['costs']['tokens']['per_seed'] if v is not None]
    y = [v for v in b['costs']['tokens']['per_seed'] if v is not None]
    if len(x) < 2 or len(y) < 2:
        return None
    se = np.sqrt(np.var(x, ddof=1) / len(x) + np.var(y, ddof=1) / len(y))
    return bool(abs(np.mean(x) - np.mean(y)) > 2 * se)


def _cell(cost: dict[str, Any]) -> str:
    if cost['mean'] is None:
        return '> 1 (not reached)'
    missed = f' ({cost["missed"]} seeds > 1)' if cost['missed'] else ''
    return f'{cost["mean"]:.2f} ± {cost["std"]:.2f}{missed}'


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    # Arms reused from a run with held-out sets beside new ones without: a blank cell.
    domains = sorted({d for s in summary['arms'].values() for d in s['heldout']})
    head = (f'| arm | final {summary["label"]} loss (mean ± std) | tokens | wall time | FLOPs | '
            f'gap to MADS > 2 SE | ' + ' | '.join(f'held-out {d}' for d in domains) + ' |')
    lines = [head, '|' + ' --- |' * (6 + len(domains))]
    mads = summary['arms'].get('mads')
    for arm, s in summary['arms'].items():
        gap = '' if mads is None or arm == 'mads' else _gap_beyond_two_se(s, mads)
        gap_text = '' if gap == '' else ('n/a' if gap is None else ('yes' if gap else 'no'))
        lines.append(f'| {arm} | {s["final_mean"]:.4f} ± {s["final_std"]:.4f} | ' +
                     ' | '.join(_cell(s['costs'][c]) for c in COSTS) + f' | {gap_text} | ' +
                     ' | '.join(f'{s["heldout"][d]:.3f}' if d in s['heldout'] else ''
                                for d in domains) + ' |')
    lines.append('')
    lines.append(f'{meta["seeds"]} seeds per arm (mean ± std over seeds), {meta["budget_batches"]} '
                 f'batches x {meta["tokens_per_batch"]} tokens each; each cost is what an arm '
                 f'needs to reach uniform\'s final {summary["label"]} loss '
                 f'({summary["target"]:.4f}, mean over seeds), as a share of uniform\'s whole run. '
                 f'Machine: {meta["machine"]}; {meta["minutes"]:.0f} min. Command: '
                 f'`{meta["command"]}`')
    if meta.get('reused'):
        lines.append(f'Arms taken from an earlier run of the same code and corpus (their '
                     f'configuration did not change): {", ".join(meta["reused"])}.')
    return '\n'.join(lines)


def plot(summary: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    colors = plt.get_cmap('tab20').colors  # Distinct for up to 20 arms (the default cycle has 10).
    for i, (arm, s) in enumerate(summary['arms'].items()):
        style = dict(label=arm, lw=2.5 if arm == 'mads' else 1.2,
                     color='black' if arm == 'mads' else colors[2 * i % 20 + i // 10],
                     ls='--' if arm == 'uniform' else '-')
        axes[0].plot(np.asarray(s['curve_tokens']) / 1e6, s['curve_mean'], **style)
        axes[1].plot(s['curve_wall'], s['curve_mean'], **style)
    for ax, xlabel in zip(axes, ('tokens (M)', 'training wall time (s)')):
        ax.axhline(summary['target'], color='grey', lw=0.6)
        ax.set(xlabel=xlabel, ylabel=f'{summary["label"]} loss',
               title=f'{summary["label"]} loss (never seen by the console), mean over seeds')
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='runs/data-efficiency')
    parser.add_argument('--seeds', type=int, default=3)
    parser.add_argument('--budget', default='250ba', help='max_duration of every arm')
    parser.add_argument('--arms', default=','.join(DEFAULT_ARMS),
                        help=f'comma-separated, of {", ".join(ARMS)}')
    parser.add_argument('--data', help='labelled MDS dataset (default: build the demo corpus)')
    parser.add_argument('--reference', help='reference MDS set, steers the console (with --data)')
    parser.add_argument('--evaluation', help='evaluation MDS set, only measured (with --data)')
    parser.add_argument('--corpus', choices=('demo', 'packages'), default='demo',
                        help='embedded corpus built without --data: Python\'s docs (demo) or the '
                        'installed packages\' docs and code, reference across domains (packages)')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='extra override for every arm (repeatable)')
    parser.add_argument('--reuse', metavar='RESULTS_JSON',
                        help='take the runs of --reuse-arms from an earlier results.json (arms '
                        'whose configuration did not change, e.g. uniform)')
    parser.add_argument('--reuse-arms', default='uniform')
    parser.add_argument('--resume', action='store_true',
                        help='keep the runs an interrupted benchmark saved in --out')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: a small corpus, 1 seed, 12 batches, uniform and mads '
                        '(unless --arms) '
                        '(checks the pipeline; its figures mean nothing)')
    args = parser.parse_args(argv)
    corpus = dict(code_bytes=1_200_000, seq_len=128, vocab_size=4096)
    if args.quick:
        corpus = dict(code_bytes=150_000, seq_len=64, vocab_size=512)
        args.seeds, args.budget = 1, '12ba'
        if args.arms == parser.get_default('arms'):
            args.arms = 'uniform,mads'
        args.set = args.set + ['eval_interval=6ba', 'scheduler.t_warmup=1ba']
    quiet()
    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    if args.data:
        if not (args.reference and args.evaluation):
            parser.error('--data needs --reference and --evaluation (disjoint documents)')
        paths: dict[str, Any] = {'data': args.data, 'reference': args.reference,
                                 'evaluation': args.evaluation, 'heldout': {}}
    else:
        paths = prepare_data(os.path.join(args.out, 'corpus'), progress=False,
                             corpus=args.corpus, **corpus)
    arms = [a for a in args.arms.split(',') if a]
    if 'uniform' not in arms:
        parser.error('the uniform arm is the yardstick: keep it in --arms')
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    reused = set()
    if args.reuse:
        with open(args.reuse) as f:
            earlier = json.load(f)['runs']
        for arm in args.reuse_arms.split(','):
            usable = [r for r in earlier.get(arm, []) if 'clock' in r and 'evaluation' in r['eval']]
            usable = [_int_clock(r) for r in usable]
            if arm in runs and len(usable) >= args.seeds:
                runs[arm] = usable[:args.seeds]
                reused.add(arm)
    partial = os.path.join(args.out, 'runs-partial.json')
    if args.resume and os.path.isfile(partial):
        with open(partial) as f:
            for arm, done in json.load(f).items():
                if arm in runs and arm not in reused:
                    runs[arm] = [_int_clock(r) for r in done]
    for seed in range(args.seeds):
        for arm in [a for a in arms if a not in reused and len(runs[a]) <= seed]:
            yaml_name, overrides = ARMS[arm]
            seeds = [f'seed={seed}', f'train_loader.dataset.shuffle_seed={seed}']
            if yaml_name == 'quickstart-cpu.yaml':
                seeds.append(f'train_loader.dataset.selection_seed={seed}')
                console = _console_key(overrides)
                if console:
                    seeds.append(f'algorithms.{console}.seed={seed}')
                    if args.quick:
                        seeds.append(f'algorithms.{console}.update_interval=5')
            overrides = overrides + seeds + args.set + \
                ([f'max_duration={args.budget}'] if args.budget else [])
            t0 = time.perf_counter()
            res = isolated_run(yaml_name, paths, overrides)
            runs[arm].append(res)
            with open(partial, 'w') as f:  # A crash later loses nothing (--resume).
                json.dump(runs, f)
            print(f'[data-efficiency] seed {seed} {arm:<15} eval loss '
                  f'{res["eval"]["evaluation"][1][-1]:.4f} ({time.perf_counter() - t0:.0f}s)',
                  flush=True)
    summary = summarize(runs)
    meta = {'seeds': args.seeds, 'budget_batches': runs['uniform'][0]['batches'],
            'tokens_per_batch': runs['uniform'][0]['tokens'] // runs['uniform'][0]['batches'],
            'machine': f'{platform.machine()}, {os.cpu_count()} cores, {platform.system()}',
            'minutes': (time.perf_counter() - start) / 60,
            'command': 'python benchmarks/data_efficiency.py ' + ' '.join(argv or []),
            'reused': sorted(reused)}
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
