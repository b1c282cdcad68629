"""Every metric the console logs is a name MLflow, TensorBoard and W&B accept.

MLflow refuses a whole batch of metrics when one name is invalid, and Composer logs the console's
metrics with the trainer's, so one bad bin name (``<1``) used to lose the training loss too.
"""

from __future__ import annotations

import os
import re

import pytest
from lm_corpus import make_trainer, write_corpus, write_reference

from streaming_mads.console.metrics import metric_token

SAFE = re.compile(r'^[A-Za-z0-9_./-]+$')


@pytest.mark.parametrize('value,token', [
    ('<1', 'lt1'), ('[1,2)', '1-2'), ('>=4', 'ge4'), ('[-1,0.5)', 'm1-0.5'), ('<-2', 'ltm2'),
    ('web', 'web'), ('t03', 't03'), ('a b/c', 'a_b_c'), ('', '_'), ('topic 3: ünï', 'topic_3___n_'),
])
def test_metric_token(value, token):
    assert metric_token(value) == token
    assert SAFE.match(token) and '/' not in token


def test_mlflow_file_store_records_loss_and_every_console_metric(tmp_path, monkeypatch):
    pytest.importorskip('mlflow')
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')  # MLflow 3 asks to opt in to it.
    from composer.loggers import InMemoryLogger, MLFlowLogger
    from mlflow.tracking import MlflowClient

    data = write_corpus(os.path.join(tmp_path, 'data'), n=400)
    ref = write_reference(os.path.join(tmp_path, 'ref'))
    store = f'file://{tmp_path}/mlruns'
    mlf = MLFlowLogger(experiment_name='mads', run_name='names', tracking_uri=store,
                       synchronous=True, log_system_metrics=False)
    mem = InMemoryLogger()
    trainer, algo, _ = make_trainer(data, ref, max_duration='8ba', loggers=[mlf, mem])
    trainer.fit()
    trainer.close()
    logged = {k for k in mem.data if k.startswith('mads/')}
    assert {'mads/memory/quality/lt1', 'mads/memory/quality/1-2', 'mads/memory/quality/ge4',
            'mads/selected_share/domain/ref', 'mads/theta/quality'} <= logged, sorted(logged)
    assert all(SAFE.match(k) for k in mem.data), [k for k in mem.data if not SAFE.match(k)]

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name('mads').experiment_id])
    recorded = set(run.data.metrics)
    assert 'loss/train/total' in recorded
    assert logged <= recorded, sorted(logged - recorded)
    history = client.get_metric_history(run.info.run_id, 'mads/memory/quality/lt1')
    assert [m.value for m in history] == [v for _, v in mem.data['mads/memory/quality/lt1']]
