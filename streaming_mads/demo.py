"""``mads demo``: the main job. Builds, labels and trains on an embedded corpus, MADS vs uniform.

Steps (all local, nothing downloaded):

1. write the demo corpus text (:mod:`streaming_mads.demo_corpus`),
2. ``mads convert`` it to MDS (a BPE tokenizer trained on it, one stream with a domain column),
   and the held-out sets and the reference set with the same tokenizer,
3. ``mads label`` it (domain, heuristic quality, 13 TF-IDF k-means topics),
4. train ``yamls/quickstart-cpu.yaml`` (MADS) and ``yamls/random-baseline-cpu.yaml`` (uniform)
   with the same seed, model and token budget, evaluating the reference loss as they go,
5. print a table and write ``results.json`` and ``results.png`` to the output folder.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from typing import Any, Optional, Sequence

__all__ = ['run_demo', 'steps_to_reach', 'prepare_data', 'train_run', 'quiet']

_REPO_YAMLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'yamls')


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
                 progress: bool) -> dict[str, Any]:
    """Corpus text -> tokenised MDS (train, held-out, reference) -> sidecar labels."""
    from streaming_mads.convert import convert
    from streaming_mads.demo_corpus import build_demo_text
    from streaming_mads.labeling import inspect_dataset, label_dataset

    text = build_demo_text(os.path.join(out, 'text'), code_bytes=code_bytes)
    data = os.path.join(out, 'data')
    summary = convert([f'{d}={p}' for d, p in text.train.items()], data, layout='single',
                      seq_len=seq_len, tokenizer='train', vocab_size=vocab_size, overwrite=True,
                      progress=progress)
    _say('converted:\n' + summary.table())
    tokenizer = os.path.join(data, 'tokenizer')
    heldout = os.path.join(out, 'heldout')
    convert([f'{d}={p}' for d, p in text.heldout.items()], heldout, layout='streams',
            seq_len=seq_len, tokenizer=tokenizer, overwrite=True, progress=progress)
    reference = os.path.join(out, 'reference')
    convert([f'reference={text.reference}'], reference, layout='single', seq_len=seq_len,
            tokenizer=tokenizer, overwrite=True, progress=progress)
    label_dataset(data, progress=progress)
    _say('labelled:\n' + inspect_dataset(data))
    return {'data': data, 'reference': reference,
            'heldout': {d: os.path.join(heldout, d) for d in text.heldout}}


def _series(mem: Any, key: str) -> tuple[list[int], list[float]]:
    pairs = mem.data.get(key, [])
    return [int(ts.batch.value) for ts, _ in pairs], [float(v) for _, v in pairs]


def train_run(yaml_name: str, paths: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Train one shipped YAML on prepared demo data; its evaluation curves and MADS metrics."""
    from composer.loggers import InMemoryLogger

    from streaming_mads.train import apply_overrides, build_trainer, load_config

    path = os.path.join(_REPO_YAMLS, yaml_name)
    cfg = load_config(path)
    cfg['train_loader']['dataset']['local'] = paths['data']
    evals = [{'label': 'reference', 'dataset': {'local': paths['reference']}}]
    evals += [{'label': f'heldout_{d}', 'dataset': {'local': p}}
              for d, p in sorted(paths['heldout'].items())]
    cfg['eval_loaders'] = evals
    if 'mads_console' in (cfg.get('algorithms') or {}):
        cfg['algorithms']['mads_console']['reference'] = paths['reference']
    cfg = apply_overrides(cfg, overrides)
    mem = InMemoryLogger()
    trainer = build_trainer(cfg, extra_loggers=[mem])
    start = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - start
    tokens = int(trainer.state.timestamp.token.value)
    batches = int(trainer.state.timestamp.batch.value)
    trainer.close()
    result: dict[str, Any] = {'run': cfg.get('run_name'), 'wall_s': wall, 'tokens': tokens,
                              'batches': batches, 'eval': {}, 'mads': {}}
    for key in mem.data:
        if key.startswith('metrics/') and key.endswith('/LanguageCrossEntropy'):
            result['eval'][key.split('/')[1]] = _series(mem, key)
        elif key.startswith('mads/') and not key.startswith('mads/update_time'):
            result['mads'][key] = _series(mem, key)
    result['console_time_s'] = sum(_series(mem, 'mads/update_time_s')[1])
    del trainer, mem
    gc.collect()
    return result


def _plot(results: dict[str, Any], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    mads, uni = results['mads'], results['uniform']
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for res, name in ((uni, 'uniform'), (mads, 'MADS')):
        steps, losses = res['eval']['reference']
        axes[0].plot(steps, losses, marker='o', ms=3, label=name)
    axes[0].set(title='reference loss', xlabel='batch', ylabel='cross-entropy')
    axes[0].legend()
    for key, (steps, values) in sorted(mads['mads'].items()):
        if key.startswith('mads/memory/domain/') or key.startswith('mads/memory/quality/'):
            axes[1].plot(steps, values, label=key.split('/', 2)[2])
        if key.startswith('mads/theta/'):
            axes[2].plot(steps, values, label=key.split('/')[-1])
    axes[1].set(title='agent memories (relative weight)', xlabel='batch', yscale='log')
    axes[1].legend(fontsize=7, ncol=2)
    axes[2].set(title='collaborative weights θ', xlabel='batch')
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report(results: dict[str, Any]) -> str:
    """The demo's table: reference loss over steps, efficiency, final weights."""
    mads, uni = results['mads'], results['uniform']
    u_steps, u_loss = uni['eval']['reference']
    m_steps, m_loss = mads['eval']['reference']
    lines = [f'{"batch":>6} {"uniform ref loss":>17} {"MADS ref loss":>14}']
    m_at = dict(zip(m_steps, m_loss))
    for s, l in zip(u_steps, u_loss):
        lines.append(f'{s:>6} {l:>17.4f} {m_at.get(s, float("nan")):>14.4f}')
    target = u_loss[-1]
    reach = steps_to_reach(m_steps, m_loss, target)
    lines.append('')
    if reach is None:
        lines.append(f'MADS did not reach uniform\'s final reference loss {target:.4f} within '
                     f'{mads["batches"]} batches.')
    else:
        lines.append(f'MADS reaches uniform\'s final reference loss {target:.4f} at batch '
                     f'{reach:.0f} of {uni["batches"]}: {reach / uni["batches"]:.2f}x the data '
                     f'(same tokens per batch).')
    for domain in sorted(k for k in uni['eval'] if k.startswith('heldout_')):
        lines.append(f'  {domain:<22} uniform {uni["eval"][domain][1][-1]:.4f}   MADS '
                     f'{mads["eval"][domain][1][-1]:.4f}')
    lines.append('')
    lines.append('final agent weights (relative to the agent\'s mean) and theta:')
    for key, (_, values) in sorted(mads['mads'].items()):
        if key.startswith('mads/memory/') or key.startswith('mads/theta/'):
            lines.append(f'  {key[5:]:<34} {values[-1]:.3f}')
    lines.append(f'console time {mads["console_time_s"]:.1f}s of {mads["wall_s"]:.1f}s training')
    return '\n'.join(lines)


def run_demo(out: str = 'mads-demo', budget: Optional[str] = None, code_bytes: int = 1_200_000,
             seq_len: int = 128, vocab_size: int = 4096, progress: bool = True,
             reuse_data: bool = True, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run the whole demo; returns every figure (also written to ``out/results.json``).

    Args:
        out (str): Output folder.
        budget (str, optional): Training duration override for both runs (e.g. ``'100ba'``).
        code_bytes (int): Source bytes scanned for the corpus.
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
    if not (reuse_data and os.path.isfile(ready)):
        for sub in ('text', 'data', 'heldout', 'reference'):
            shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        _say('building the corpus from this Python installation')
        paths = prepare_data(out, code_bytes, seq_len, vocab_size, progress)
        with open(os.path.join(out, 'paths.json'), 'w') as f:
            json.dump(paths, f)
    else:
        with open(os.path.join(out, 'paths.json')) as f:
            paths = json.load(f)
    common = [f'max_duration={budget}'] if budget else []
    if budget:
        common.append('scheduler.t_warmup=' + str(max(1, int(budget.rstrip('ba')) // 20)) + 'ba')
    _say('training MADS (quickstart-cpu.yaml)')
    mads = train_run('quickstart-cpu.yaml', paths, common + list(overrides))
    _say('training uniform (random-baseline-cpu.yaml), same seed and budget')
    uniform = train_run('random-baseline-cpu.yaml', paths,
                        common + [o for o in overrides if not o.startswith('algorithms')])
    results = {'mads': mads, 'uniform': uniform, 'seconds': time.perf_counter() - start}
    u_steps, u_loss = uniform['eval']['reference']
    m_steps, m_loss = mads['eval']['reference']
    reach = steps_to_reach(m_steps, m_loss, u_loss[-1])
    results['summary'] = {
        'uniform_final_reference_loss': u_loss[-1], 'mads_final_reference_loss': m_loss[-1],
        'mads_batches_to_uniform_final': reach,
        'data_efficiency_ratio': None if reach is None else reach / uniform['batches'],
        'tokens_per_run': uniform['tokens']}
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump(results, f, indent=1)
    text = report(results)
    with open(os.path.join(out, 'results.txt'), 'w') as f:
        f.write(text + '\n')
    plotted = _plot(results, os.path.join(out, 'results.png'))
    print(text)
    _say(f'wrote {out}/results.json, results.txt' + (', results.png' if plotted else
                                                       ' (pip install matplotlib for the PNG)') +
         f' in {results["seconds"]:.0f}s')
    return results
