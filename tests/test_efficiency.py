"""The data-efficiency costs (tokens, wall time, FLOPs) and the benchmark's smoke run."""

from __future__ import annotations

import json
import os
import sys

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


def test_benchmark_quick_mode_runs_end_to_end(tmp_path):
    sys.path.insert(0, BENCHMARKS)
    try:
        import data_efficiency
    finally:
        sys.path.remove(BENCHMARKS)
    arms = ['uniform', 'stratified', 'odm', 'mads']
    summary = data_efficiency.main(['--quick', '--arms', ','.join(arms), '--out', str(tmp_path)])
    assert list(summary['arms']) == arms and summary['label'] == 'evaluation'
    with open(os.path.join(tmp_path, 'results.json')) as f:
        runs = json.load(f)['runs']
    assert runs['mads'][0]['batches'] == runs['uniform'][0]['batches'] == 12
    assert os.path.getsize(os.path.join(tmp_path, 'results.png')) > 10_000
    assert 'wall time' in open(os.path.join(tmp_path, 'results.md')).read()
