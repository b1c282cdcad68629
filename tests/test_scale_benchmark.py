"""Smoke test of benchmarks/scale.py: the quick run completes and worker count changes no pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks',
                      'scale.py')


def test_scale_quick(tmp_path) -> None:
    out = tmp_path / 'scale.json'
    proc = subprocess.run([sys.executable, SCRIPT, '--quick', '--workdir', str(tmp_path / 'work'),
                           '--json', str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    worker_variants = report['config']['layouts'][1:]
    assert worker_variants
    for result in report['results']:
        for name in worker_variants:
            layout = result['layouts'][name]
            # Every pool of every rank, and the sampled pools located by content, agree.
            assert layout['differing'] == 0, (result['n'], name, layout)
            assert layout['mismatches'] == 0, (result['n'], name, layout)
            assert layout['sampled'] > 0
    assert 'sampled mismatches' in proc.stdout
