"""``benchmarks/gpu_check.sh --cpu-smoke``: the GPU check runs end to end with tiny sizes."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ('influence, 4 probes', 'influence, 8 probes', 'influence, 16 probes',
        'train tokens/s, no console', 'train tokens/s, console', 'console share',
        'influence peak memory', 'loader plain StreamingDataset', 'loader MADSDataset r=1',
        'loader MADSDataset r=4', 'FSDP1 influence = unsharded')


def test_gpu_check_cpu_smoke() -> None:
    run = subprocess.run(['bash', os.path.join(ROOT, 'benchmarks', 'gpu_check.sh'), '--cpu-smoke'],
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout[run.stdout.index('MADS GPU check'):].splitlines()
    assert table[1].split(' | ')[0].strip() == 'check'
    labels = [line.split(' | ')[0].strip() for line in table[3:]]
    assert labels == list(ROWS)
    by_label = {line.split(' | ')[0].strip(): line.split(' | ')[2] for line in table[3:]}
    for k in (4, 8, 16):  # Ghost and loop agree (fp32).
        err = float(by_label[f'influence, {k} probes'].split('max rel diff ')[1])
        assert err < 1e-4
    assert '2 updates' in by_label['train tokens/s, console']
    assert 'n/a' not in by_label['influence peak memory']
