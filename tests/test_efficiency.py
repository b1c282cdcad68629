"""The data-efficiency costs (tokens, wall time, FLOPs) and the benchmark's smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from streaming_mads.run.demo import costs_to_reach

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'benchmarks')


def _run(losses: list[float], seconds_per_batch: float, console_tokens: int = 0) -> dict:
    steps = [25, 50, 75, 100]
    return {'eval': {'evaluation': (steps, losses)}, 'tokens': 100 * 1000, 'batches': 100,
            'clock': {b: b * seconds_per_batch for b in range(1, 101)},
            'mads': {'mads/version': ([10, 40, 70], [1.0, 2.0, 3.0])} if console_tokens else {},
            'console_tokens_per_update': console_tokens}


def test_costs_in_tokens_wall_time_and_flops():
    # Reaches the target 3.0 halfway between batches 50 (3.5) and 75 (2.5): batch 62.5.
    run = _run([4.0, 3.5, 2.5, 2.0], seconds_per_batch=2.0, console_tokens=5000)
    costs = costs_to_reach(run, 'evaluation', 3.0, budget_tokens=100_000, budget_wall=100.0)
    assert costs['batches'] == pytest.approx(62.5)
    assert costs['tokens'] == pytest.approx(0.625)
    assert costs['wall'] == pytest.approx(1.25)  # Slower per batch: more wall time than uniform.
    assert costs['flops'] == pytest.approx((62_500 + 2 * 5000) / 100_000)  # Updates at 10, 40.
    never = costs_to_reach(_run([4.0, 3.9, 3.8, 3.7], 1.0), 'evaluation', 3.0, 100_000, 100.0)
    assert never['batches'] is None and never['tokens'] is None and never['wall'] is None


def _benchmark():
    sys.path.insert(0, BENCHMARKS)
    try:
        import data_efficiency
    finally:
        sys.path.remove(BENCHMARKS)
    return data_efficiency


def test_paired_gap_and_its_standard_error():
    bench = _benchmark()
    a, b = [6.1, 6.3, 6.0, 6.4], [6.2, 6.5, 6.05, 6.6]
    gap = bench.paired(a, b)
    d = np.subtract(a, b)
    assert gap['mean'] == pytest.approx(d.mean()) and gap['seeds'] == 4
    assert gap['se'] == pytest.approx(d.std(ddof=1) / 2)
    # The seeds' shared effect cancels: far below the unpaired standard error.
    assert gap['se'] < np.sqrt(np.var(a, ddof=1) / 4 + np.var(b, ddof=1) / 4) / 3
    assert bench.paired([6.0], [6.5])['se'] is None


BURN = 'import time\nt = time.process_time()\nwhile time.process_time() - t < 1.5: pass'


def test_other_work_counts_other_processes_not_the_benchmarks_own():
    """A run's own process (waited for) is not other work; a process running beside it is."""
    bench = _benchmark()
    before = bench.process_cpu_s()
    subprocess.run([sys.executable, '-c', BURN], check=True)
    assert bench.process_cpu_s() - before >= 1.4  # Subtracted from the machine's busy time.
    other = subprocess.Popen([sys.executable, '-c', BURN])
    try:
        beside = bench.OtherWork()
        time.sleep(1.0)
        assert beside.cores() > 0.4  # About 1 core on an idle machine.
        assert 'other processes used' in beside.warning()
    finally:
        other.wait()


def test_other_work_takes_a_runs_reported_cpu_as_the_benchmarks_own():
    """A run's process comes from a fork server, so this process never waits for it: the CPU
    it reports (``cpu_s``) is the benchmark's own, not other work."""
    bench = _benchmark()
    span = bench.OtherWork()
    # A grandchild, as the fork server's run process is: its time never reaches this process.
    code = f'import subprocess, sys; subprocess.Popen([sys.executable, "-c", {BURN!r}])'
    subprocess.run([sys.executable, '-c', code], check=True)
    time.sleep(2.0)  # It burns 1.5 s of CPU and exits.
    assert span.cores() > 0.4
    assert span.cores(elsewhere_s=1.5) < span.cores() - 0.4


def test_full_regime_reads_under_a_quarter_of_each_corpus():
    """The full run's arithmetic: at the 100k samples the corpora are sized for, no default arm's
    candidates cover a quarter of the corpus."""
    bench = _benchmark()
    batches = int(bench.BUDGET[:-2])
    fraction = bench.fraction_read(bench.DEFAULT_ARMS, bench.REGIME, batches, 100_000)
    assert fraction['uniform'] < fraction['mads'] < 0.25
    assert max(fraction.values()) < 0.25
    assert bench.SEEDS >= 5


def test_benchmark_quick_mode_runs_end_to_end(tmp_path, capsys):
    bench = _benchmark()
    arms = ['uniform', 'odm', 'mads']
    out = str(tmp_path / 'run')
    summary = bench.main(['--quick', '--arms', ','.join(arms), '--out', out])
    assert list(summary['arms']) == arms and summary['label'] == 'evaluation'
    with open(os.path.join(out, 'results.json')) as f:
        runs = json.load(f)['runs']
    assert runs['mads'][0]['batches'] == runs['uniform'][0]['batches'] == 12
    # Each run reports the CPU its process used (the benchmark's own load, not other work).
    assert all(r['cpu_s'] > 0.3 * r['wall_s'] for arm in arms for r in runs[arm])
    assert os.path.getsize(os.path.join(out, 'results.png')) > 10_000
    table = open(os.path.join(out, 'results.md')).read()
    assert 'wall time' in table and 'unigram entropy' in table and 'console share' in table
    # Paired gaps, the fraction read, the unigram floor and the evaluation set's own error.
    mads = summary['arms']['mads']
    assert mads['vs_uniform']['mean'] == pytest.approx(
        mads['finals'][0] - summary['arms']['uniform']['finals'][0])
    regime = summary['regime']
    assert 0 < regime['fraction_read']['uniform'] < regime['fraction_read']['mads'] < 1
    assert regime['unigram']['entropy'] > 0 and regime['unigram']['evaluation_cross_entropy'] > 0
    se = regime['evaluation_se']
    assert se['samples'] > 10 and 0 < se['se'] < 1
    assert abs(se['mean'] - summary['arms']['uniform']['final_mean']) < 0.05
    assert 'one seed is not a result' in capsys.readouterr().out
    # The corpus is cached: a second use builds nothing.
    cache = os.path.join(out, 'cache')
    (entry,) = os.listdir(cache)
    stamp = os.path.getmtime(os.path.join(cache, entry, 'paths.json'))
    paths = bench.cached_corpus(cache, 'demo', bench.QUICK_CORPUS, 64, 512)
    assert os.path.getmtime(os.path.join(cache, entry, 'paths.json')) == stamp
    # mads demo's rule uses the same count: candidates = pool ratio x batches x batch size.
    from streaming_mads.run.demo import corpus_read_ratio
    from streaming_mads.run.config import apply_overrides, load_config
    cfg = apply_overrides(load_config('quickstart-cpu.yaml'), ['max_duration=12ba'])
    samples, read = corpus_read_ratio(paths['data'], cfg)
    assert samples == regime['corpus_samples']
    assert read / samples == pytest.approx(regime['fraction_read']['mads'])
    # A configuration reading more candidates than the corpus holds is refused before training.
    with pytest.raises(SystemExit):
        bench.main(['--data', paths['data'], '--reference', paths['reference'], '--evaluation',
                    paths['evaluation'], '--arms', 'uniform,mads', '--budget', '100000ba',
                    '--out', str(tmp_path / 'refused')])
    assert 'repeat samples' in capsys.readouterr().err
    assert not os.path.exists(os.path.join(tmp_path, 'refused', 'runs-partial.json'))


def test_corpus_cache_key_follows_the_settings():
    bench = _benchmark()
    key = bench.corpus_key('demo', {'code_bytes': 1}, 128, 1024)
    assert key == bench.corpus_key('demo', {'code_bytes': 1}, 128, 1024)
    assert key != bench.corpus_key('demo', {'code_bytes': 2}, 128, 1024)
    assert key != bench.corpus_key('packages', {'code_bytes': 1}, 128, 1024)
    assert key.startswith('demo-')
