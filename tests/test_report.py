"""What the selection did: the console's line per update, the weight history, the summary and
``mads report`` (a real ``mads train`` run with its progress bar, then the PNG)."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest
from lm_corpus import write_corpus, write_reference

from streaming_mads.console.history import (HISTORY_FILE, History, read_history, update_line,
                                            weights_record)
from streaming_mads.run.cli import main
from streaming_mads.run.train import train
from streaming_mads.run.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'yamls', 'quickstart-cpu.yaml')


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp('report')
    return write_corpus(os.path.join(root, 'data')), write_reference(os.path.join(root, 'ref'))


def _theta_as_documented(theta: dict, rule: str) -> bool:
    """θ per the update rule's documentation: shares summing to 1 (``paper``), else 1 each."""
    values = np.array(list(theta.values()))
    return bool(np.isclose(values.sum(), 1.0) if rule == 'paper' else np.allclose(values, 1.0))


def test_mads_train_prints_updates_writes_history_and_mads_report_draws_it(
        corpus, tmp_path, monkeypatch, capfd):
    data, ref = corpus
    monkeypatch.chdir(tmp_path)  # mads train's run folder is <run_name>/ in the working dir.
    trainer = train(QUICKSTART, [
        f'train_loader.dataset.local={data}', f'algorithms.mads_console.reference={ref}',
        'eval_loaders=null', 'eval_interval=1', 'model.vocab_size=32', 'max_seq_len=16', 'model.n_embd=32',
        'global_train_batch_size=8', 'algorithms.mads_console.update_interval=4',
        'scheduler.t_warmup=2ba', 'max_duration=10ba', 'progress_bar=true'])
    algo = trainer.state.algorithms[0]
    agents = trainer.state.train_dataloader.dataset.agents
    trainer.close()
    captured = capfd.readouterr()
    run_name = load_config(QUICKSTART)['run_name']
    path = os.path.join(run_name, HISTORY_FILE)
    records = read_history(run_name)  # The run folder names the file.

    # Version 0 at the start, then one per update: v published at 4v - lead (3: one worker).
    assert [r['version'] for r in records] == [0, 1, 2, 3]
    assert [r['batch'] for r in records] == [0, 1, 5, 9]
    assert [r['update_time_s'] is None for r in records] == [True, False, False, False]
    rule = getattr(algo.config, 'rule', 'paper')
    for r in records:
        assert _theta_as_documented(r['theta'], rule), r['theta']
        assert {a.name: list(a.value_names) for a in agents} == \
            {a: list(m) for a, m in r['memory'].items()}
        for shares in r['kept_share'].values():
            assert abs(sum(shares.values()) - 1) < 1e-9
    assert any(r['kept_share'] for r in records[1:]), 'the loader kept samples and counted them'
    last = records[-1]
    assert list(last['theta'].values()) == pytest.approx(list(algo.console.theta))
    for agent in agents:
        assert list(last['memory'][agent.name].values()) == \
            pytest.approx(list(agent.memory / agent.memory.mean()))

    # Composer's progress bar and the update lines share its stream; tqdm clears the bar (carriage
    # return, cursor moves), writes the line whole, and draws the bar again.
    segments = re.split(r'[\r\n]', re.sub(r'\x1b\[[0-9;]*[A-Za-z]', '', captured.err))
    assert any(re.search(r'train .*\| *\d+/10 ', s) for s in segments), captured.err[-2000:]
    for prev, rec in zip(records, records[1:]):
        assert update_line(rec, prev) in segments, (update_line(rec, prev), captured.err[-3000:])
    assert '[mads] 3 console update(s); version 3 published at batch 9' in captured.err
    assert f'[mads] weight history: {path}' in captured.err

    assert main(['report', run_name]) == 0
    out = capfd.readouterr().out
    png = os.path.join(run_name, 'mads_history.png')
    assert f'wrote {png}' in out and '[mads] theta:' in out
    with open(png, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(png) > 20_000  # Five panels of curves, not an empty canvas.
    other = os.path.join(tmp_path, 'plots', 'weights.png')
    assert main(['report', path, '-o', other]) == 0 and os.path.getsize(other) > 20_000


def _record(version: int, batch: int, memory: list) -> dict:
    class Agent:
        name, value_names = 'domain', ('a', 'b')

    Agent.memory = np.asarray(memory, np.float64)
    return {'version': version, 'batch': batch, 'skipped': False,
            **weights_record([Agent], [1.0], [[3, 1]])}


def test_resume_keeps_the_history_up_to_its_checkpoint_and_a_fresh_run_replaces_it(tmp_path):
    path = os.path.join(tmp_path, 'h.jsonl')
    with open(path, 'w') as f:
        for v, b in ((0, 0), (1, 5), (2, 11), (3, 17)):
            f.write(json.dumps(_record(v, b, [1, 1 + v])) + '\n')
    history = History(path)
    history.start(path, 12, 2, _record(2, 12, [1, 3]))  # Resumed from a checkpoint at batch 12.
    assert [r['batch'] for r in read_history(path)] == [0, 5, 11]
    line = history.add(17, 3, _record(3, 17, [1, 6]), {'mads/update_time_s': 0.5})
    # Memories relative to the mean: a 0.5 -> 0.286 moved more (by ratio) than b 1.5 -> 1.71.
    assert line == '[mads] version 3 at batch 17 (0.50s): theta domain 1.000; memory ' \
        'domain:a 0.5->0.286, domain:b 1.5->1.71'
    assert [r['version'] for r in read_history(path)] == [0, 1, 2, 3]
    assert read_history(path)[-1]['kept_share'] == {'domain': {'a': 0.75, 'b': 0.25}}
    History(path).start(path, 0, 0, _record(0, 0, [1, 1]))  # A fresh run.
    assert [r['batch'] for r in read_history(path)] == [0]


def test_history_setting_is_checked_at_construction_and_false_writes_nothing(tmp_path):
    from streaming_mads.algorithms import AgentConsole, DomainBandit

    with pytest.raises(TypeError, match=r'mads_console history=3 .*file path, true .* or false'):
        AgentConsole(reference=[], history=3)
    with pytest.raises(TypeError, match='domain_bandit history='):
        DomainBandit(history='')
    assert History(False).path_for('run', str(tmp_path)) is None
    assert History(None).path_for('run', None) is None
    assert History(True).path_for('run', str(tmp_path)) == os.path.join(tmp_path, HISTORY_FILE)
    assert History('out/{run_name}/w.jsonl').path_for('r1', None) == 'out/r1/w.jsonl'


def test_mads_report_errors_name_the_fix(tmp_path, capsys, monkeypatch):
    assert main(['report', str(tmp_path / 'nowhere')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    assert main(['report', str(tmp_path)]) == 2
    assert f'holds no {HISTORY_FILE}' in capsys.readouterr().err
    bad = tmp_path / HISTORY_FILE
    bad.write_text(json.dumps(_record(0, 0, [1, 1])) + '\n{"version": 1, "batch"\n')
    assert main(['report', str(tmp_path)]) == 2
    assert 'line 2 is not JSON' in capsys.readouterr().err
    bad.write_text(json.dumps(_record(0, 0, [1, 1])) + '\n')
    # An uninstalled package: Python's import system refuses a name mapped to None.
    for name in [m for m in sys.modules if m == 'matplotlib' or m.startswith('matplotlib.')]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    assert main(['report', str(tmp_path)]) == 2
    assert "pip install 'streaming-mads[plot]'" in capsys.readouterr().err
