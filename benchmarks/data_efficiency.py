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
paper reports about 0.5 in tokens. Seeds vary the shuffle, selection and console seeds together
and every arm runs the same seeds, so each arm's final loss is compared with uniform's and MADS'
as a *paired* difference (mean over seeds ± its standard error). Writes ``results.md``,
``results.json`` and ``results.png`` into ``--out``.

The regime (docs/results.md, "Benchmark regime"): each corpus holds about 100k samples of 128
tokens, many times what an arm reads (the benchmark prints the fraction of the corpus each arm's
candidates cover and refuses a run above 1), uniform's final loss is compared with the corpus'
unigram entropy (a model that learned only token frequencies), and the evaluation set is large
enough that its own standard error is under 0.01 nats (measured and printed). Corpora are built
once per environment and cached (``--cache``, default ``~/.cache/streaming-mads/corpora``). The
full run, the nine headline arms (all but the static filters) × 5 seeds, is one command per
corpus (``--resume`` continues an interrupted one)::

    python benchmarks/data_efficiency.py --corpus demo --out runs/efficiency-demo
    python benchmarks/data_efficiency.py --corpus packages --out runs/efficiency-packages
    python benchmarks/data_efficiency.py --corpus collab --out runs/efficiency-collab

``--tune`` picks MADS' pool ratio, update interval and probe size on the *reference* loss (seeds
100 and up, never the evaluation set). ``--data DIR --reference DIR --evaluation DIR`` use any
labelled MDS dataset, reference set and evaluation set instead of an embedded corpus.
"""

from __future__ import annotations

import argparse
import gc
import glob
import hashlib
import importlib.metadata
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Optional

import numpy as np

from streaming_mads.run.demo import (costs_to_reach, prepare_data, process_cpu_s, quiet,
                                     run_process_init, train_run, train_wall)
from streaming_mads.run.config import apply_overrides, load_config

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
    # The evidence rule (docs/architecture.md "The evidence rule") against the paper's.
    'mads-evidence': ('quickstart-cpu.yaml', ['algorithms.mads_console.rule=evidence']),
}
#: The headline arms, 5 seeds each in the full run; the static filters and the console's
#: ablations run on request (``--arms``), to keep a corpus' full run within an hour on 2 cores.
DEFAULT_ARMS = [a for a in ARMS if not a.startswith(('mads-', 'static-'))]


COSTS = ('tokens', 'wall', 'flops')

#: The full run's regime (docs/results.md, "Benchmark regime"): tokens per sample, the BPE
#: vocabulary trained on the corpus, and each corpus' builder options. About 100k samples each;
#: the evaluation set (about 1,800 samples; a sample's loss spreads by about 0.3 nats) keeps its
#: own standard error under 0.01 nats at a third of the training's compute per evaluation.
SEQ_LEN, VOCAB = 128, 1024
_SETS = dict(heldout=0.002, reference_bytes=100_000, evaluation_bytes=600_000)
CORPORA: dict[str, dict[str, Any]] = {
    'demo': dict(code_bytes=40_000_000, garbled_copies=5, **_SETS),
    'packages': dict(code_bytes=25_000_000, **_SETS),
    'collab': dict(code_bytes=25_000_000, **_SETS),
}
#: Batches per arm and the settings every arm shares (warm-up, learning rate, evaluations).
BUDGET = '320ba'
REGIME = ['eval_interval=80ba', 'scheduler.t_warmup=16ba', 'optimizer.lr=0.006']
SEEDS = 5
QUICK_CORPUS = dict(code_bytes=150_000, reference_bytes=15_000, evaluation_bytes=20_000)
QUICK = ['eval_interval=6ba', 'scheduler.t_warmup=1ba']
#: ``--tune``: MADS settings tried, each judged by its final *reference* loss on seeds 100+.
TUNE_GRID = {'train_loader.dataset.pool_ratio': [2, 4],
             'algorithms.mads_console.update_interval': [20, 40],
             'algorithms.mads_console.probe_size': [32, 64]}
TUNE_SEED = 100
#: Cores' worth of CPU that other processes may use during a run (averaged over the run) before
#: its wall time is flagged as not an idle machine's.
OTHER_CPU = 0.25


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


# --- The corpus: built once per environment, cached ------------------------------------------

def _source_digest() -> str:
    """Digest of the code that writes a corpus (builders, converter, labellers, tokenizer)."""
    import streaming_mads
    root = os.path.dirname(streaming_mads.__file__)
    h = hashlib.sha1()
    for sub in ('corpora', 'convert', 'labeling'):
        for path in sorted(glob.glob(os.path.join(root, sub, '*.py'))):
            h.update(open(path, 'rb').read())
    for name in ('tokenizer.py', 'labels.py'):
        h.update(open(os.path.join(root, name), 'rb').read())
    return h.hexdigest()


def corpus_key(corpus: str, options: dict[str, Any], seq_len: int, vocab: int) -> str:
    """The cache key of a corpus: its settings, this Python, every installed distribution's
    version and the code that writes it, so an entry is reused only where the same bytes would
    be built again."""
    dists = sorted(f'{d.metadata["Name"]}=={d.version}' for d in importlib.metadata.distributions()
                   if d.metadata['Name'])
    blob = json.dumps([corpus, options, seq_len, vocab, sys.version, dists, _source_digest()],
                      sort_keys=True)
    return f'{corpus}-{hashlib.sha1(blob.encode()).hexdigest()[:16]}'


def cached_corpus(cache: str, corpus: str, options: dict[str, Any], seq_len: int,
                  vocab: int) -> dict[str, Any]:
    """The prepared corpus under ``cache`` (built there first if absent); its paths.

    Built in a temporary folder and renamed into place, so an interrupted build is never reused.
    """
    where = os.path.join(cache, corpus_key(corpus, options, seq_len, vocab))
    paths_file = os.path.join(where, 'paths.json')
    if not os.path.isfile(paths_file):
        tmp = f'{where}.tmp-{os.getpid()}'
        shutil.rmtree(tmp, ignore_errors=True)
        start = time.perf_counter()
        print(f'[data-efficiency] building the {corpus} corpus in {where} (once per environment)',
              flush=True)
        paths = prepare_data(tmp, progress=False, corpus=corpus, seq_len=seq_len,
                             vocab_size=vocab, code_bytes=options['code_bytes'],
                             options={k: v for k, v in options.items() if k != 'code_bytes'})
        shutil.rmtree(os.path.join(tmp, 'text'), ignore_errors=True)  # The MDS copy is kept.
        with open(os.path.join(tmp, 'paths.json'), 'w') as f:
            json.dump({'paths': _relative(paths, tmp),
                       'build_s': time.perf_counter() - start}, f)
        shutil.rmtree(where, ignore_errors=True)
        os.replace(tmp, where)
    with open(paths_file) as f:
        return _absolute(json.load(f)['paths'], where)


def _relative(paths: dict[str, Any], root: str) -> dict[str, Any]:
    return {k: ({d: os.path.relpath(p, root) for d, p in v.items()} if isinstance(v, dict)
                else os.path.relpath(v, root)) for k, v in paths.items()}


def _absolute(paths: dict[str, Any], root: str) -> dict[str, Any]:
    return {k: ({d: os.path.join(root, p) for d, p in v.items()} if isinstance(v, dict)
                else os.path.join(root, v)) for k, v in paths.items()}


def samples_in(mds: str) -> int:
    """Samples of an MDS dataset, from its ``index.json``."""
    with open(os.path.join(mds, 'index.json')) as f:
        return sum(shard['samples'] for shard in json.load(f)['shards'])


def _tokens(mds: str) -> np.ndarray:
    from streaming import StreamingDataset
    ds = StreamingDataset(local=mds, shuffle=False, batch_size=1)
    tokens = np.concatenate([np.asarray(ds[i]['tokens']) for i in range(ds.num_samples)])
    del ds  # Its shared memory is released now, not reported as leaked at exit.
    gc.collect()
    return tokens


def unigram_floor(train: str, evaluation: str) -> dict[str, float]:
    """What a model that learned only token frequencies scores: the training corpus' unigram
    entropy, and the evaluation set's cross-entropy under those frequencies (add-one smoothed),
    both in nats per token (the same token shift as the training loss is ignored: one token in
    128)."""
    train_tokens, eval_tokens = _tokens(train), _tokens(evaluation)
    size = int(max(train_tokens.max(), eval_tokens.max())) + 1
    counts = np.bincount(train_tokens, minlength=size).astype(np.float64)
    p = counts / counts.sum()
    smoothed = (counts + 1) / (counts.sum() + size)
    return {'entropy': float(-(p[p > 0] * np.log(p[p > 0])).sum()),
            'evaluation_cross_entropy': float(-np.log(smoothed[eval_tokens]).mean())}


def evaluation_se(checkpoints: str, evaluation: str, preset: str, seq_len: int) -> dict[str, Any]:
    """The evaluation set's own sampling error: the standard error of the mean loss over its
    samples, for the model a run saved in ``checkpoints`` (its last checkpoint)."""
    import torch
    import torch.nn.functional as F
    from streaming import StreamingDataset

    from streaming_mads.models import build_causal_lm

    path = max(glob.glob(os.path.join(checkpoints, '*.pt')), key=os.path.getmtime)
    weights = torch.load(path, map_location='cpu', weights_only=False)['state']['model']
    vocab = next(w.shape[0] for k, w in weights.items() if k.endswith('wte.weight'))
    model = build_causal_lm(vocab_size=vocab, max_seq_len=seq_len, preset=preset, seed=0)
    model.load_state_dict(weights)
    model.eval()
    ds = StreamingDataset(local=evaluation, shuffle=False, batch_size=1)
    losses = []
    with torch.no_grad():
        for start in range(0, ds.num_samples, 64):
            x = torch.as_tensor(np.stack([np.asarray(ds[i]['tokens'], dtype=np.int64) for i in
                                          range(start, min(ds.num_samples, start + 64))]))
            logits = model.model(input_ids=x).logits[:, :-1]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                 reduction='none')
            losses += ce.view(len(x), -1).mean(1).tolist()
    del ds
    gc.collect()
    return {'samples': len(losses), 'mean': float(np.mean(losses)),
            'se': float(np.std(losses, ddof=1) / np.sqrt(len(losses)))}


# --- The regime's checks ---------------------------------------------------------------------

def arm_config(arm: str, extra: list[str]) -> dict[str, Any]:
    """The run config an arm trains with (shipped YAML, the arm's and the run's overrides)."""
    yaml_name, overrides = ARMS[arm]
    return apply_overrides(load_config(yaml_name), overrides + extra)


def candidates_per_sample(cfg: dict[str, Any]) -> int:
    """Samples an arm's loader reads per sample trained: its pool ratio (1: plain streaming)."""
    loader = cfg['train_loader']
    return int(loader['dataset'].get('pool_ratio', 1)) if loader.get('name') == 'mads' else 1


def fraction_read(arms: list[str], extra: list[str], batches: int, corpus_samples: int
                  ) -> dict[str, float]:
    """Per arm, the candidates it reads (pool ratio × samples trained) over the corpus' samples:
    under 1, no arm needs to repeat a sample; the regime keeps it under a quarter."""
    out = {}
    for arm in arms:
        cfg = arm_config(arm, extra)
        out[arm] = (candidates_per_sample(cfg) * batches * int(cfg['global_train_batch_size']) /
                    corpus_samples)
    return out


def machine_cpu_s() -> Optional[float]:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``; ``None``
    elsewhere)."""
    try:
        with open('/proc/stat') as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user, nice, system, (idle, iowait), irq, softirq, steal.
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf('SC_CLK_TCK')


class OtherWork:
    """Whether processes other than the benchmark's used the CPU during a span: the machine's
    busy CPU time minus the benchmark's own, per second of wall time. A load average cannot
    tell: the benchmark's own trainer threads and DataLoader worker put it above the core count
    on an idle machine. The benchmark's own: this process and the children it waited for, plus
    what its runs report (``elsewhere_s``): a run's process comes from a fork server, so no
    wait of this process collects its time."""

    def __init__(self) -> None:
        self.start = (machine_cpu_s(), process_cpu_s(), time.perf_counter())

    def cores(self, elsewhere_s: float = 0.0) -> Optional[float]:
        """Cores' worth of CPU other processes used since the span began (``None`` without
        ``/proc/stat``); ``elsewhere_s``: CPU seconds the benchmark's own runs used in processes
        that are not its children (each run's ``cpu_s``)."""
        machine0, own0, t0 = self.start
        machine1, wall = machine_cpu_s(), time.perf_counter() - t0
        if machine0 is None or machine1 is None or wall <= 0:
            return None
        own = process_cpu_s() - own0 + elsewhere_s
        return max(machine1 - machine0 - own, 0.0) / wall

    def warning(self, elsewhere_s: float = 0.0) -> Optional[str]:
        """A warning when others used more than :data:`OTHER_CPU` cores on average."""
        other = self.cores(elsewhere_s)
        if other is None or other <= OTHER_CPU:
            return None
        return (f'other processes used {other:.2f} of {os.cpu_count()} cores during a run: wall '
                f'times and console shares are not measured on an idle machine')


# --- Statistics ------------------------------------------------------------------------------

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


def paired(a: list[float], b: list[float]) -> Optional[dict[str, float]]:
    """The paired difference ``a - b`` over seeds (same seed, same position): mean and standard
    error (``None`` for the SE with one seed). The seed's own effect (shuffle, initialisation),
    which both arms share, cancels, so this resolves far smaller gaps than two unpaired means."""
    n = min(len(a), len(b))
    if n == 0:
        return None
    d = np.asarray(a[:n]) - np.asarray(b[:n])
    se = float(np.std(d, ddof=1) / np.sqrt(n)) if n > 1 else None
    return {'mean': float(d.mean()), 'se': se, 'seeds': n}


def summarize(runs: dict[str, list[dict[str, Any]]], label: str = 'evaluation') -> dict[str, Any]:
    """Per arm: final loss (mean, std), its paired gaps to uniform and MADS, held-out losses, the
    three costs to reach uniform and the console's share of the training wall time."""
    uniform = runs['uniform']
    target = float(np.mean([r['eval'][label][1][-1] for r in uniform]))
    budget_tokens = int(np.mean([r['tokens'] for r in uniform]))
    budget_wall = float(np.mean([train_wall(r) for r in uniform]))
    out: dict[str, Any] = {'label': label, 'target': target, 'arms': {}}
    finals_of = {arm: [r['eval'][label][1][-1] for r in seeds] for arm, seeds in runs.items()}
    for arm, seeds in runs.items():
        finals = finals_of[arm]
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
            'finals': finals,
            'vs_uniform': None if arm == 'uniform' else paired(finals, finals_of['uniform']),
            'vs_mads': None if arm == 'mads' or 'mads' not in runs else
            paired(finals, finals_of['mads']),
            'costs': costs, 'heldout': heldout, 'curve_steps': steps,
            'curve_mean': mean_curve.tolist(),
            'curve_tokens': [s * seeds[0]['tokens'] / seeds[0]['batches'] for s in steps],
            'curve_wall': np.mean([[r['clock'][s] for s in steps] for r in seeds], 0).tolist(),
            'wall_s': float(np.mean([train_wall(r) for r in seeds])),
            'console_share': float(np.mean([r['console_time_s'] / train_wall(r) for r in seeds])),
        }
    return out


def _cell(cost: dict[str, Any]) -> str:
    if cost['mean'] is None:
        return '> 1 (not reached)'
    missed = f' ({cost["missed"]} seeds > 1)' if cost['missed'] else ''
    return f'{cost["mean"]:.2f} ± {cost["std"]:.2f}{missed}'


def _gap(gap: Optional[dict[str, float]]) -> str:
    """A paired gap, ``*`` when it exceeds two standard errors."""
    if gap is None:
        return ''
    if gap['se'] is None:
        return f'{gap["mean"]:+.3f} (1 seed)'
    star = ' *' if abs(gap['mean']) > 2 * gap['se'] else ''
    return f'{gap["mean"]:+.3f} ± {gap["se"]:.3f}{star}'


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    # Arms reused from a run with held-out sets beside new ones without: a blank cell.
    domains = sorted({d for s in summary['arms'].values() for d in s['heldout']})
    head = (f'| arm | final {summary["label"]} loss (mean ± std) | vs uniform (paired) | '
            f'vs MADS (paired) | tokens | wall time | FLOPs | console share | corpus read | ' +
            ' | '.join(f'held-out {d}' for d in domains) + ' |')
    lines = [head, '|' + ' --- |' * (9 + len(domains))]
    fraction = meta.get('fraction_read', {})
    for arm, s in summary['arms'].items():
        read = f'{fraction[arm]:.3f}' if arm in fraction else ''
        lines.append(f'| {arm} | {s["final_mean"]:.4f} ± {s["final_std"]:.4f} | '
                     f'{_gap(s["vs_uniform"])} | {_gap(s["vs_mads"])} | ' +
                     ' | '.join(_cell(s['costs'][c]) for c in COSTS) +
                     f' | {s["console_share"]:.1%} | {read} | ' +
                     ' | '.join(f'{s["heldout"][d]:.3f}' if d in s['heldout'] else ''
                                for d in domains) + ' |')
    lines.append('')
    lines.append(f'{meta["seeds"]} seeds per arm, the same for every arm; {meta["budget_batches"]} '
                 f'batches x {meta["tokens_per_batch"]} tokens each. Gaps are paired by seed '
                 f'(mean ± standard error of the per-seed differences of final '
                 f'{summary["label"]} loss; * beyond two standard errors; negative is better). '
                 f'Each cost is what an arm needs to reach uniform\'s final {summary["label"]} '
                 f'loss ({summary["target"]:.4f}, mean over seeds), as a share of uniform\'s '
                 f'whole run. Corpus read: candidates (pool ratio x samples trained) / corpus '
                 f'samples. Machine: {meta["machine"]}; {meta["minutes"]:.0f} min. Command: '
                 f'`{meta["command"]}`')
    for line in meta.get('regime', []):
        lines.append(f'- {line}')
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


def _seed_overrides(yaml_name: str, overrides: list[str], seed: int, quick: bool) -> list[str]:
    """Seeds varied together: model and shuffle, and for MADS-loader arms selection and console."""
    seeds = [f'seed={seed}', f'train_loader.dataset.shuffle_seed={seed}']
    if yaml_name == 'quickstart-cpu.yaml':
        seeds.append(f'train_loader.dataset.selection_seed={seed}')
        console = _console_key(overrides)
        if console:
            seeds.append(f'algorithms.{console}.seed={seed}')
            if quick:
                seeds.append(f'algorithms.{console}.update_interval=5')
    return seeds


def tune(paths: dict[str, Any], extra: list[str], seeds: int, quick: bool,
         out: str) -> dict[str, Any]:
    """Choose MADS' pool ratio, update interval and probe size on the *reference* loss.

    Every combination of :data:`TUNE_GRID` trains the ``mads`` arm on seeds ``TUNE_SEED`` and up
    (never the benchmark's seeds); the evaluation set is not even loaded (its slot holds the
    reference), so nothing reported by the benchmark is chosen on it.
    """
    steer = {**paths, 'evaluation': paths['reference'], 'heldout': {}}
    keys = list(TUNE_GRID)
    combos = list(itertools.product(*TUNE_GRID.values()))[:2 if quick else None]
    yaml_name, overrides = ARMS['mads']
    scores = []
    for combo in combos:
        chosen = [f'{k}={v}' for k, v in zip(keys, combo)]
        finals = []
        for seed in range(TUNE_SEED, TUNE_SEED + seeds):
            run = isolated_run(yaml_name, steer, overrides + _seed_overrides(
                yaml_name, overrides, seed, quick) + extra + chosen)
            finals.append(run['eval']['reference'][1][-1])
        scores.append({'settings': dict(zip(keys, combo)), 'reference_loss': float(np.mean(finals)),
                       'per_seed': finals})
        print(f'[data-efficiency] tune {" ".join(chosen)}: reference loss '
              f'{np.mean(finals):.4f}', flush=True)
    best = min(scores, key=lambda s: s['reference_loss'])
    result = {'grid': scores, 'best': best, 'seeds': list(range(TUNE_SEED, TUNE_SEED + seeds))}
    with open(os.path.join(out, 'tune.json'), 'w') as f:
        json.dump(result, f, indent=1)
    print(f'[data-efficiency] lowest reference loss: {best["settings"]}', flush=True)
    return result


def _regime_lines(corpus_samples: int, fraction: dict[str, float], floor: dict[str, float],
                  uniform_final: float, se: Optional[dict[str, Any]],
                  busy: list[str]) -> list[str]:
    lines = [f'corpus: {corpus_samples} training samples; fraction read per arm (candidates / '
             f'corpus): ' + ', '.join(f'{a} {f:.3f}' for a, f in fraction.items()),
             f'uniform\'s final evaluation loss {uniform_final:.4f} against the corpus\' unigram '
             f'entropy {floor["entropy"]:.4f} (the evaluation set under the corpus\' unigram '
             f'frequencies: {floor["evaluation_cross_entropy"]:.4f}) nats per token']
    if se is not None:
        lines.append(f'evaluation set: {se["samples"]} samples; standard error of its mean loss '
                     f'(uniform, seed 0) {se["se"]:.4f} nats')
    if busy:
        lines.append('WARNING: ' + busy[0] + f' ({len(busy)} times during the run)')
    return lines


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='runs/data-efficiency')
    parser.add_argument('--seeds', type=int, default=SEEDS)
    parser.add_argument('--budget', default=BUDGET, help='max_duration of every arm, in batches')
    parser.add_argument('--arms', default=','.join(DEFAULT_ARMS),
                        help=f'comma-separated, of {", ".join(ARMS)}')
    parser.add_argument('--data', help='labelled MDS dataset (default: build the demo corpus)')
    parser.add_argument('--reference', help='reference MDS set, steers the console (with --data)')
    parser.add_argument('--evaluation', help='evaluation MDS set, only measured (with --data)')
    parser.add_argument('--corpus', choices=tuple(CORPORA), default='demo',
                        help='embedded corpus built without --data: Python\'s docs (demo), the '
                        'installed packages\' docs and code with a theme across domains '
                        '(packages), or a target only agents together find (collab)')
    parser.add_argument('--cache', default=os.path.join(
        os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'streaming-mads',
        'corpora'), help='where built corpora are kept between runs (default %(default)s; '
        '--quick: under --out)')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='extra override for every arm (repeatable)')
    parser.add_argument('--reuse', metavar='RESULTS_JSON',
                        help='take the runs of --reuse-arms from an earlier results.json (arms '
                        'whose configuration did not change, e.g. uniform)')
    parser.add_argument('--reuse-arms', default='uniform')
    parser.add_argument('--resume', action='store_true',
                        help='keep the runs an interrupted benchmark saved in --out')
    parser.add_argument('--tune', action='store_true',
                        help='instead of the benchmark: choose MADS\' pool ratio, update interval '
                        'and probe size on the reference loss (seeds 100+, --seeds of them)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke run: a small corpus, 1 seed, 12 batches, uniform and mads '
                        '(unless --arms) (checks the pipeline; its figures mean nothing)')
    args = parser.parse_args(argv)
    corpus, seq_len, vocab = CORPORA[args.corpus], SEQ_LEN, VOCAB
    extra = list(REGIME)
    if args.quick:
        corpus, seq_len, vocab = QUICK_CORPUS, 64, 512
        args.seeds, args.budget = 1, '12ba'
        if args.arms == parser.get_default('arms'):
            args.arms = 'uniform,mads'
        if args.cache == parser.get_default('cache'):
            args.cache = os.path.join(args.out, 'cache')
        extra = list(QUICK)
    if not args.budget.endswith('ba') or not args.budget[:-2].isdigit():
        parser.error(f'--budget must be a number of batches such as 320ba, not {args.budget!r}')
    if args.seeds < 1:
        parser.error('--seeds must be at least 1')
    batches = int(args.budget[:-2])
    extra += [f'max_seq_len={seq_len}', f'max_duration={args.budget}'] + args.set
    quiet()
    start, probe = time.perf_counter(), OtherWork()  # Corpus build and checks: a span.
    os.makedirs(args.out, exist_ok=True)
    if args.data:
        if not (args.reference and args.evaluation):
            parser.error('--data needs --reference and --evaluation (disjoint documents)')
        paths: dict[str, Any] = {'data': args.data, 'reference': args.reference,
                                 'evaluation': args.evaluation, 'heldout': {}}
    else:
        paths = cached_corpus(args.cache, args.corpus, corpus, seq_len, vocab)
    arms = [a for a in args.arms.split(',') if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f'unknown arm {unknown[0]!r}: use some of {", ".join(ARMS)}')
    corpus_samples = samples_in(paths['data'])
    fraction = fraction_read(['mads'] if args.tune else arms, extra, batches, corpus_samples)
    for arm, f in fraction.items():
        print(f'[data-efficiency] {arm}: reads {f:.3f} of the corpus ({corpus_samples} samples)',
              flush=True)
    over = {a: f for a, f in fraction.items() if f > 1}
    if over:
        parser.error(f'{", ".join(over)} would read more candidates than the corpus holds '
                     f'({max(over.values()):.2f}x its {corpus_samples} samples), so it would '
                     f'repeat samples: lower --budget or the pool ratio, or use a larger corpus')
    if max(fraction.values()) > 0.25 and not args.quick:
        warnings.warn(f'an arm reads {max(fraction.values()):.2f} of the corpus: the regime keeps '
                      f'it under 0.25 (docs/results.md, "Benchmark regime")')
    busy = [w for w in [probe.warning()] if w]
    for w in busy:
        print(f'[data-efficiency] WARNING: {w}', flush=True)
    if args.tune:
        return tune(paths, extra, args.seeds, args.quick, args.out)
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
    # Uniform's seed-0 model is kept to measure the evaluation set's own standard error.
    checkpoints = os.path.join(args.out, 'checkpoints', 'uniform-0')
    for seed in range(args.seeds):
        for arm in [a for a in arms if a not in reused and len(runs[a]) <= seed]:
            yaml_name, overrides = ARMS[arm]
            run_overrides = overrides + _seed_overrides(yaml_name, overrides, seed, args.quick) + \
                extra
            if arm == 'uniform' and seed == 0:
                shutil.rmtree(checkpoints, ignore_errors=True)
                run_overrides += [f'save_folder={checkpoints}', f'save_interval={args.budget}',
                                  'save_num_checkpoints_to_keep=1']
            t0, span = time.perf_counter(), OtherWork()
            res = isolated_run(yaml_name, paths, run_overrides)
            busy += [w for w in [span.warning(res.get('cpu_s', 0.0))] if w]
            runs[arm].append(res)
            with open(partial, 'w') as f:  # A crash later loses nothing (--resume).
                json.dump(runs, f)
            print(f'[data-efficiency] seed {seed} {arm:<17} eval loss '
                  f'{res["eval"]["evaluation"][1][-1]:.4f} ({time.perf_counter() - t0:.0f}s, '
                  f'console {res["console_time_s"] / train_wall(res):.0%} of training)',
                  flush=True)
    summary = summarize(runs)
    floor = _floor(paths, args.data is None)
    se = None
    if glob.glob(os.path.join(checkpoints, '*.pt')):
        se = evaluation_se(checkpoints, paths['evaluation'],
                      arm_config('uniform', extra)['model'].get('preset', 'tiny'), seq_len)
    summary['regime'] = {'corpus_samples': corpus_samples, 'fraction_read': fraction,
                         'unigram': floor, 'evaluation_se': se, 'busy': busy}
    meta = {'seeds': args.seeds, 'budget_batches': runs['uniform'][0]['batches'],
            'tokens_per_batch': runs['uniform'][0]['tokens'] // runs['uniform'][0]['batches'],
            'machine': f'{platform.machine()}, {os.cpu_count()} cores, {platform.system()}',
            'minutes': (time.perf_counter() - start) / 60,
            'command': 'python benchmarks/data_efficiency.py ' + ' '.join(argv or []),
            'reused': sorted(reused), 'fraction_read': fraction,
            'regime': _regime_lines(corpus_samples, fraction, floor,
                                    summary['arms']['uniform']['final_mean'], se, busy)}
    table = markdown(summary, meta)
    with open(os.path.join(args.out, 'results.md'), 'w') as f:
        f.write(table + '\n')
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump({'summary': summary, 'meta': meta, 'runs': runs}, f)
    plot(summary, os.path.join(args.out, 'results.png'))
    print(table)
    if args.seeds == 1:
        print('[data-efficiency] one seed is not a result: run --seeds 5 or more', flush=True)
    return summary


def _floor(paths: dict[str, Any], cached: bool) -> dict[str, float]:
    """:func:`unigram_floor` of the run's data, kept beside a cached corpus."""
    where = os.path.join(os.path.dirname(paths['data']), 'unigram.json')
    if cached and os.path.isfile(where):
        with open(where) as f:
            return json.load(f)
    floor = unigram_floor(paths['data'], paths['evaluation'])
    if cached:
        with open(where, 'w') as f:
            json.dump(floor, f)
    return floor


if __name__ == '__main__':
    main(sys.argv[1:])
