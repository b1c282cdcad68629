"""``mads demo``: the main job. Builds, labels and trains on an embedded corpus, MADS vs uniform.

Steps (all local, nothing downloaded):

1. write the demo corpus text (:mod:`streaming_mads.corpora.demo`),
2. ``mads convert`` it to MDS (a BPE tokenizer trained on it, one stream with a domain column),
   and the held-out sets, the reference set (which steers the console) and the evaluation set
   (documents of the reference's kind the console never sees) with the same tokenizer,
3. ``mads label`` it (domain, heuristic quality, 13 TF-IDF k-means topics),
4. train ``yamls/quickstart-cpu.yaml`` (MADS) and ``yamls/random-baseline-cpu.yaml`` (uniform)
   with the same seed, model and token budget, evaluating as they go,
5. print a table and write ``results.json`` and ``results.png`` to the output folder (its weight
   panels drawn by :mod:`streaming_mads.run.report` from the MADS run's ``mads_history.jsonl``).

Data efficiency is reported on the evaluation set (and, for comparison, on the reference set)
in three costs to reach uniform's final loss: tokens, training wall time (loader at the pool
ratio and console updates included, evaluation excluded) and FLOPs (training plus the console's
forward/backward passes).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from typing import Any, Optional, Sequence

import numpy as np
from composer import Callback

from streaming_mads.console.config import ConsoleConfig
from streaming_mads.console.history import HISTORY_FILE

__all__ = ['run_demo', 'steps_to_reach', 'costs_to_reach', 'train_wall', 'prepare_data',
           'train_run', 'quiet', 'run_process_init', 'TrainClock', 'process_cpu_s']



def steps_to_reach(steps: Sequence[float], losses: Sequence[float], target: float) -> Optional[float]:
    """First step at which a loss curve reaches ``target`` (linear interpolation), else ``None``."""
    prev_s, prev_l = None, None
    for s, l in zip(steps, losses):
        if l <= target:
            if prev_l is None or prev_l == l:
                return float(s)
            return float(prev_s + (s - prev_s) * (prev_l - target) / (prev_l - l))
        prev_s, prev_l = s, l
    return None


class TrainClock(Callback):
    """Training wall time after each batch, evaluation excluded (console updates included).

    Composer's own ``total_wct`` also counts the time spent evaluating, which is the same for
    every arm and would blur the ratio of two arms' times to a target loss.
    """

    def __init__(self) -> None:
        self.start = 0.0
        self.in_eval = 0.0
        self._eval_start = 0.0
        self.times: dict[int, float] = {}

    def fit_start(self, state: Any, logger: Any) -> None:
        self.start = time.perf_counter()

    def eval_start(self, state: Any, logger: Any) -> None:
        self._eval_start = time.perf_counter()

    def eval_end(self, state: Any, logger: Any) -> None:
        self.in_eval += time.perf_counter() - self._eval_start

    def batch_end(self, state: Any, logger: Any) -> None:
        # Algorithms (the console) run before callbacks at BATCH_END: their time is counted.
        self.times[int(state.timestamp.batch)] = time.perf_counter() - self.start - self.in_eval


def train_wall(run: dict[str, Any]) -> float:
    """A run's training wall time (evaluation excluded) over its whole budget."""
    return max(run['clock'].values())


def costs_to_reach(run: dict[str, Any], label: str, target: float, budget_tokens: int,
                   budget_wall: float) -> dict[str, Any]:
    """Tokens, wall time and FLOPs ``run`` needs to bring its ``label`` loss down to ``target``.

    Each as a ratio to a budget (uniform's whole run: lower is better; ``None`` if the target is
    never reached). Wall time is interpolated on :class:`TrainClock`. FLOPs count
    ``6 · parameters`` per token for training and for every console update's reference and
    probe tokens (one forward and one backward each), so the ratio needs no parameter count:
    ``(tokens to target + console tokens before it) / budget tokens``.

    Args:
        run (dict[str, Any]): A :func:`train_run` result.
        label (str): Evaluation set.
        target (float): Loss to reach (uniform's final loss).
        budget_tokens (int): Tokens of the yardstick run.
        budget_wall (float): Training wall time of the yardstick run (seconds).
    """
    reach = steps_to_reach(*run['eval'][label], target)
    out: dict[str, Any] = {'target': target, 'batches': reach, 'tokens': None, 'wall': None,
                           'flops': None}
    if reach is None:
        return out
    clock = sorted((int(b), t) for b, t in run['clock'].items())
    wall = float(np.interp(reach, [b for b, _ in clock], [t for _, t in clock]))
    tokens_per_batch = run['tokens'] / run['batches']
    updates = sum(1 for s in run['mads'].get('mads/version', ([], []))[0] if s <= reach)
    console_tokens = updates * run.get('console_tokens_per_update', 0)
    out.update(tokens=reach * tokens_per_batch / budget_tokens, wall=wall / budget_wall,
               flops=(reach * tokens_per_batch + console_tokens) / budget_tokens)
    return out


def run_process_init() -> None:
    """Start a fresh training process as ``mads train`` runs: quiet, DataLoader workers *forked*.

    A fork-server child (as the benchmark runs each arm) inherits ``forkserver`` as its default
    start method, so without this every DataLoader worker (one per epoch: workers are not
    persistent) would start through the fork server and unpickle the dataset there, about 7 s
    per epoch on a 2-core CPU, charged to the training wall time of every arm that reads more
    than one epoch of candidates.
    """
    import multiprocessing
    quiet()
    multiprocessing.set_start_method('fork', force=True)


def quiet() -> None:
    """Silence the known, harmless noise of tiny CPU runs (HF tokenizer notes, last-batch splits)."""
    import logging
    import warnings
    warnings.filterwarnings('ignore', message='Cannot split tensor of length')
    warnings.filterwarnings('ignore', message='.*non-writable tensors')
    for name in ('composer.models.huggingface', 'transformers'):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def _say(msg: str) -> None:
    print(f'[mads demo] {msg}', flush=True)


def prepare_data(out: str, code_bytes: int, seq_len: int, vocab_size: int,
                 progress: bool, corpus: str = 'demo',
                 options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Corpus text -> tokenised MDS (train, held-out, reference) -> sidecar labels.

    ``corpus`` picks the text: ``'demo'`` (:mod:`streaming_mads.corpora.demo`), ``'packages'``
    (:mod:`streaming_mads.corpora.packages`, a reference across domains) or ``'collab'`` (a
    target only agents together can find); ``options`` are the builder's other arguments.
    """
    from streaming_mads.convert.convert import convert
    from streaming_mads.corpora import build_collab_text, build_demo_text, build_packages_text
    from streaming_mads.labeling import inspect_dataset, label_dataset

    builders = {'demo': build_demo_text, 'packages': build_packages_text,
                'collab': build_collab_text}
    if corpus not in builders:
        raise ValueError(f'corpus must be one of {sorted(builders)}, not {corpus!r}')
    text = builders[corpus](os.path.join(out, 'text'), code_bytes=code_bytes, **(options or {}))
    data = os.path.join(out, 'data')
    summary = convert([f'{d}={p}' for d, p in text.train.items()], data, layout='single',
                      seq_len=seq_len, tokenizer='train', vocab_size=vocab_size, overwrite=True,
                      progress=progress)
    _say('converted:\n' + summary.table())
    tokenizer = os.path.join(data, 'tokenizer')
    heldout = os.path.join(out, 'heldout')
    convert([f'{d}={p}' for d, p in text.heldout.items()], heldout, layout='streams',
            seq_len=seq_len, tokenizer=tokenizer, overwrite=True, progress=progress)
    sets = {}
    for name in ('reference', 'evaluation'):
        sets[name] = os.path.join(out, name)
        convert([f'{name}={getattr(text, name)}'], sets[name], layout='single', seq_len=seq_len,
                tokenizer=tokenizer, overwrite=True, progress=progress)
    label_dataset(data, reference=sets['reference'], progress=progress)
    _say('labelled:\n' + inspect_dataset(data))
    return {'data': data, **sets, 'heldout': {d: os.path.join(heldout, d) for d in text.heldout}}


def _series(mem: Any, key: str) -> tuple[list[int], list[float]]:
    pairs = mem.data.get(key, [])
    return [int(ts.batch.value) for ts, _ in pairs], [float(v) for _, v in pairs]


def process_cpu_s() -> float:
    """CPU seconds of this process and of the children it has waited for (finished DataLoader
    workers): what a run used, for a benchmark that must tell its own load from others'."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def train_run(yaml_name: str, paths: dict[str, Any], overrides: Sequence[str],
              history: Optional[str] = None) -> dict[str, Any]:
    """Train one shipped YAML on prepared demo data; its evaluation curves and MADS metrics.

    ``history``: where a console run writes its weight history (read back into the result's
    ``history``); ``None``: no file.
    """
    from composer.loggers import InMemoryLogger

    from streaming_mads.console.history import read_history
    from streaming_mads.run.train import build_trainer
    from streaming_mads.run.config import apply_overrides, load_config

    cfg = load_config(yaml_name)
    cfg['train_loader']['dataset']['local'] = paths['data']
    evals = [{'label': name, 'dataset': {'local': paths[name]}}
             for name in ('evaluation', 'reference')]
    evals += [{'label': f'heldout_{d}', 'dataset': {'local': p}}
              for d, p in sorted(paths['heldout'].items())]
    cfg['eval_loaders'] = evals
    if 'mads_console' in (cfg.get('algorithms') or {}):
        cfg['algorithms']['mads_console']['reference'] = paths['reference']
        cfg['algorithms']['mads_console']['history'] = history or False
    cfg = apply_overrides(cfg, overrides)
    mem = InMemoryLogger()
    clock = TrainClock()
    trainer = build_trainer(cfg, extra_loggers=[mem], extra_callbacks=[clock])
    start, cpu = time.perf_counter(), process_cpu_s()
    trainer.fit()
    wall = time.perf_counter() - start
    tokens = int(trainer.state.timestamp.token.value)
    batches = int(trainer.state.timestamp.batch.value)
    trainer.close()
    result: dict[str, Any] = {'run': cfg.get('run_name'), 'wall_s': wall, 'tokens': tokens,
                              'batches': batches, 'eval': {}, 'mads': {}, 'clock': clock.times,
                              'cpu_s': process_cpu_s() - cpu}
    algos = cfg.get('algorithms') or {}
    per_sample = tokens / max(batches, 1) / cfg['global_train_batch_size']
    if algos.get('mads_console'):
        sizes = {**vars(ConsoleConfig()), **algos['mads_console']}
        result['console_tokens_per_update'] = per_sample * (sizes['reference_size'] +
                                                            sizes['probe_size'])
    elif algos.get('domain_bandit'):
        # A forward pass over the probes only: a third of a training step's FLOPs per token.
        sizes = {**vars(ConsoleConfig()), **algos['domain_bandit']}
        result['console_tokens_per_update'] = per_sample * sizes['probe_size'] / 3
    for key in mem.data:
        if key.startswith('metrics/') and key.endswith('/LanguageCrossEntropy'):
            result['eval'][key.split('/')[1]] = _series(mem, key)
        elif key.startswith('mads/') and not key.startswith('mads/update_time'):
            result['mads'][key] = _series(mem, key)
    result['console_time_s'] = sum(_series(mem, 'mads/update_time_s')[1])
    if history and algos.get('mads_console'):
        result['history'] = read_history(history)
    del trainer, mem
    gc.collect()
    return result


def _plot(results: dict[str, Any], path: str) -> bool:
    """Evaluation loss over tokens and wall time (top), MADS' weights as ``mads report`` draws
    them (below); ``False`` without matplotlib."""
    from streaming_mads.run.report import ReportError, draw_history, pyplot
    try:
        plt = pyplot()
    except ReportError:
        return False
    mads, uni = results['mads'], results['uniform']
    agents = len(mads['history'][-1]['memory'])
    fig = plt.figure(figsize=(4.2 * (agents + 1), 11), layout='constrained')
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.6])
    axes = top.subplots(1, 2)
    for res, name in ((uni, 'uniform'), (mads, 'MADS')):
        steps, losses = res['eval']['evaluation']
        tokens = [s * res['tokens'] / res['batches'] / 1e6 for s in steps]
        clock = [res['clock'][s] for s in steps]
        axes[0].plot(tokens, losses, marker='o', ms=3, label=name)
        axes[1].plot(clock, losses, marker='o', ms=3, label=name)
    axes[0].set(title='evaluation loss (never seen by the console)', xlabel='tokens (M)',
                ylabel='cross-entropy')
    axes[1].set(title='evaluation loss', xlabel='training wall time (s)')
    axes[0].legend()
    draw_history(bottom, mads['history'])
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _costs_line(costs: dict[str, Any], batches: int) -> str:
    if costs['batches'] is None:
        return f'not reached within {batches} batches'
    return (f'tokens {costs["tokens"]:.2f}x, wall time {costs["wall"]:.2f}x, FLOPs '
            f'{costs["flops"]:.2f}x (batch {costs["batches"]:.0f} of {batches})')


def report(results: dict[str, Any]) -> str:
    """The demo's table: losses over steps, the three costs to reach uniform, final weights."""
    mads, uni = results['mads'], results['uniform']
    u_steps, u_eval = uni['eval']['evaluation']
    m_eval = dict(zip(*mads['eval']['evaluation']))
    u_ref = dict(zip(*uni['eval']['reference']))
    m_ref = dict(zip(*mads['eval']['reference']))
    lines = [f'{"batch":>6} {"uniform eval":>13} {"MADS eval":>10} {"uniform ref":>12} '
             f'{"MADS ref":>9}']
    nan = float('nan')
    for s, l in zip(u_steps, u_eval):
        lines.append(f'{s:>6} {l:>13.4f} {m_eval.get(s, nan):>10.4f} {u_ref.get(s, nan):>12.4f} '
                     f'{m_ref.get(s, nan):>9.4f}')
    lines.append('')
    lines.append('MADS cost to reach uniform\'s final loss, as a share of uniform\'s whole run:')
    for label, what in (('evaluation', 'evaluation set (never seen by the console)'),
                        ('reference', 'reference set (steers the console)')):
        costs = results['summary'][label]
        lines.append(f'  {what}, target {costs["target"]:.4f}: '
                     f'{_costs_line(costs, uni["batches"])}')
    for domain in sorted(k for k in uni['eval'] if k.startswith('heldout_')):
        lines.append(f'  {domain:<22} uniform {uni["eval"][domain][1][-1]:.4f}   MADS '
                     f'{mads["eval"][domain][1][-1]:.4f}')
    lines.append('')
    lines.append('final agent weights (relative to the agent\'s mean) and theta:')
    for key, (_, values) in sorted(mads['mads'].items()):
        if key.startswith('mads/memory/') or key.startswith('mads/theta/'):
            lines.append(f'  {key[5:]:<34} {values[-1]:.3f}')
    lines.append(f'training wall time: MADS {train_wall(mads):.1f}s (console '
                 f'{mads["console_time_s"]:.1f}s), uniform {train_wall(uni):.1f}s')
    return '\n'.join(lines)


#: The demo's default budget and corpus: the corpus holds at least :data:`DEMO_CORPUS_RATIO`
#: times the candidates MADS reads (the benchmark's rule, docs/results.md "Benchmark regime").
DEMO_BUDGET = '150ba'
DEMO_CORPUS_RATIO = 4


def corpus_read_ratio(data: str, cfg: dict[str, Any]) -> tuple[int, int]:
    """The samples of the MDS dataset ``data`` and the candidates a run of ``cfg`` reads (pool
    ratio × batches × batch size)."""
    with open(os.path.join(data, 'index.json')) as f:
        samples = sum(shard['samples'] for shard in json.load(f)['shards'])
    pool = cfg['train_loader']['dataset'].get('pool_ratio', 1)
    batches = int(str(cfg['max_duration']).rstrip('ba'))
    return samples, int(pool * batches * cfg['global_train_batch_size'])


def run_demo(out: str = 'mads-demo', budget: Optional[str] = None, code_bytes: int = 12_000_000,
             seq_len: int = 128, vocab_size: int = 1024, progress: bool = True,
             reuse_data: bool = True, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the whole demo; returns every figure (also written to ``out/results.json``).

    Args:
        out (str): Output folder.
        budget (str, optional): Training duration of both runs in batches (e.g. ``'100ba'``;
            default :data:`DEMO_BUDGET`); the corpus must hold :data:`DEMO_CORPUS_RATIO` times
            the candidates MADS reads in it.
        code_bytes (int): Source bytes scanned for the corpus (the default, about 40k samples,
            is four times what MADS reads in the default budget).
        seq_len (int): Tokens per sample.
        vocab_size (int): BPE vocabulary trained on the corpus.
        progress (bool): Show progress bars.
        reuse_data (bool): Keep an already prepared corpus in ``out``.
        overrides (Sequence[str]): Extra ``key=value`` overrides for both runs
            (``algorithms...`` ones for the MADS run only).
    """
    quiet()
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    ready = os.path.join(out, 'data', 'mads', 'manifest.json')
    paths_file = os.path.join(out, 'paths.json')
    if reuse_data and os.path.isfile(ready) and os.path.isfile(paths_file):
        with open(paths_file) as f:
            paths = json.load(f)
    else:
        paths = {}
    if 'evaluation' not in paths:  # Not prepared yet, or prepared by an older release.
        for sub in ('text', 'data', 'heldout', 'reference', 'evaluation'):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        _say('building the corpus from this Python installation')
        paths = prepare_data(out, code_bytes, seq_len, vocab_size, progress)
        with open(paths_file, 'w') as f:
            json.dump(paths, f)
    from streaming_mads.run.config import apply_overrides, load_config
    budget = budget or DEMO_BUDGET
    common = [f'max_duration={budget}']
    samples, read = corpus_read_ratio(paths['data'], apply_overrides(
        load_config('quickstart-cpu.yaml'), common + list(overrides)))
    if samples < DEMO_CORPUS_RATIO * read:
        raise ValueError(f'the corpus holds {samples} samples, under {DEMO_CORPUS_RATIO}x the '
                         f'{read} candidates MADS reads in {budget}: a selection would repeat '
                         f'samples. Use a smaller budget, or rebuild a larger corpus (mads demo '
                         f'--rebuild; code_bytes).')
    _say(f'MADS reads {read} candidates, {read / samples:.2f} of the corpus ({samples} samples)')
    # The demo prints the console's lines and its own results: Composer's metric dump (its
    # default where the output is not a terminal) would bury them.
    common.append('log_to_console=false')
    if not progress:
        common.append('progress_bar=false')
    common.append('scheduler.t_warmup=' + str(max(1, int(budget.rstrip('ba')) // 20)) + 'ba')
    _say('training MADS (quickstart-cpu.yaml)')
    mads = train_run('quickstart-cpu.yaml', paths, common + list(overrides),
                     history=os.path.join(out, HISTORY_FILE))
    _say('training uniform (random-baseline-cpu.yaml), same seed and budget')
    uniform = train_run('random-baseline-cpu.yaml', paths,
                        common + [o for o in overrides if not o.startswith('algorithms')])
    results = {'mads': mads, 'uniform': uniform, 'seconds': time.perf_counter() - start}
    results['summary'] = {
        label: costs_to_reach(mads, label, uniform['eval'][label][1][-1], uniform['tokens'],
                              train_wall(uniform))
        for label in ('evaluation', 'reference')}
    results['summary']['tokens_per_run'] = uniform['tokens']
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    text = report(results) + ('\nOne seed is not a result: these ratios vary from seed to seed by '
                              'more than many gaps between arms; benchmarks/data_efficiency.py '
                              'runs 5 seeds per arm and reports paired gaps (docs/results.md).')
    with open(os.path.join(out, 'results.txt'), 'w') as f:
        f.write(text + '\n')
    plotted = _plot(results, os.path.join(out, 'results.png'))
    print(text)
    _say(f'wrote {out}/results.json, results.txt, {HISTORY_FILE}' +
         (', results.png' if plotted else ' (pip install \'streaming-mads[plot]\' for the PNG)') +
         f' in {results["seconds"]:.0f}s')
    return results
