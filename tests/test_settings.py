"""Every setting of MADSDataset, the agents and the console is checked when it is constructed.

A NaN or infinite weight, an impossible floor, a string or a fraction where a count is meant: each
fails at once with the setting's name and what is allowed, instead of starving training (a NaN
score reads as padding, so a pool keeps nothing) or failing at the first update.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from streaming_mads import MADSDataset
from streaming_mads.console import Console, ConsoleConfig
from streaming_mads.selection.agents import CategoricalAgent, build_agent
from streaming_mads.selection.board import Weights
from streaming_mads.selection.step import version_tables

NAN, INF = math.nan, math.inf

DATASET_CASES = [
    ({'agents': [{'type': 'quality', 'init': [NAN, 1, 1, 1, 1]}]}, ValueError, r"init\[0\]=nan"),
    ({'agents': [{'type': 'quality', 'init': [INF, 1, 1, 1, 1]}]}, ValueError, r"init\[0\]=inf"),
    ({'agents': [{'type': 'quality', 'init': [1, '2', 1, 1, 1]}]}, TypeError, r"init\[1\]='2'"),
    ({'agents': [{'name': 'q', 'column': 'quality', 'bins': [1, NAN]}]}, ValueError,
     r"bins\[1\]=nan"),
    ({'agents': [{'name': 'q', 'column': 'quality', 'bins': 'abc'}]}, TypeError, "bins='abc'"),
    ({'agents': 'quality'}, TypeError, "agents='quality'"),
    ({'agents': [{'name': 7}]}, TypeError, 'name=7'),
    ({'pool_ratio': INF}, ValueError, 'pool_ratio=inf .*>= 1'),
    ({'pool_ratio': NAN}, ValueError, 'pool_ratio=nan'),
    ({'pool_ratio': '2'}, TypeError, "pool_ratio='2'"),
    ({'temperature': NAN}, ValueError, 'temperature=nan .*>= 0'),
    ({'temperature': INF}, ValueError, 'temperature=inf'),
    ({'selection_seed': -1}, ValueError, 'selection_seed=-1 .*int >= 0'),
    ({'selection_seed': 1.5}, TypeError, 'selection_seed=1.5 .*int'),
    ({'version_timeout': NAN}, ValueError, 'version_timeout=nan'),
    ({'version_timeout': 0}, ValueError, 'version_timeout=0 .*positive'),
    ({'board_capacity': True}, TypeError, 'board_capacity=True'),
    ({'board_capacity': 1}, ValueError, 'board_capacity=1 .*int >= 2'),
    ({'batch_size': '4'}, TypeError, "batch_size='4'"),
    ({'batch_size': 4.0}, TypeError, 'batch_size=4.0'),
    ({'agents': [], 'pool_ratio': 2}, ValueError, r'agents=\[\] with pool_ratio > 1'),
]


@pytest.mark.parametrize('kwargs,error,match', DATASET_CASES,
                         ids=[str(c[0]) for c in DATASET_CASES])
def test_bad_dataset_settings_fail_at_construction(mds_dir, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        MADSDataset(local=mds_dir, **{'batch_size': 4, 'pool_ratio': 2, **kwargs})
    if 'agents' not in kwargs:
        assert 'MADSDataset' in str(info.value) and 'not allowed: it must be' in str(info.value)


CONSOLE_CASES = [
    ({'lr_theta': INF}, ValueError, 'mads_console lr_theta=inf .*finite number >= 0'),
    ({'lr_memory': NAN}, ValueError, 'mads_console lr_memory=nan'),
    ({'seed': -1}, ValueError, 'mads_console seed=-1 .*int >= 0'),
    ({'theta_floor': -1}, ValueError, r'theta_floor=-1 .*\[0, 1\)'),
    ({'theta_floor': 1}, ValueError, r'theta_floor=1 .*\[0, 1\)'),
    ({'update_interval': 1.5}, TypeError, 'update_interval=1.5 .*int'),
    ({'update_interval': 1}, ValueError, 'update_interval=1 .*int >= 2'),
    ({'probe_size': '64'}, TypeError, "probe_size='64' .*int"),
    ({'probe_size': True}, TypeError, 'probe_size=True'),
    ({'probe_pool': 32}, ValueError, 'probe_pool=32 .*int >= 64'),
    ({'reference_size': 0}, ValueError, 'reference_size=0'),
    ({'value_prior': INF}, ValueError, 'value_prior=inf'),
    ({'repeat_penalty': NAN}, ValueError, 'repeat_penalty=nan'),
    ({'memory_floor': 0}, ValueError, r'memory_floor=0 .*\(0, 1\]'),
    ({'memory_cap': INF}, ValueError, 'memory_cap=inf'),
    ({'lead': 150}, ValueError, r'lead=150 .*\[1, 149\]'),
    ({'probe_micro_batch': 0.5}, TypeError, 'probe_micro_batch=0.5'),
    ({'activation_checkpointing': 'yes'}, TypeError, 'activation_checkpointing'),
]


@pytest.mark.parametrize('kwargs,error,match', CONSOLE_CASES,
                         ids=[str(c[0]) for c in CONSOLE_CASES])
def test_bad_console_settings_fail_at_construction(kwargs, error, match):
    from streaming_mads.algorithms import AgentConsole
    with pytest.raises(error, match=match):
        ConsoleConfig(**kwargs)
    with pytest.raises(error, match=match):  # The Composer algorithm, as a YAML builds it.
        AgentConsole(reference='unused', **kwargs)


def test_bad_bandit_settings_name_their_section():
    from streaming_mads.algorithms import DomainBandit
    with pytest.raises(ValueError, match='domain_bandit seed=-1 '):
        DomainBandit(seed=-1)
    with pytest.raises(ValueError, match=r'domain_bandit decay=nan .*\[0, 1\)'):
        DomainBandit(decay=NAN)
    with pytest.raises(TypeError, match="domain_bandit decay='0.5'"):
        DomainBandit(decay='0.5')
    with pytest.raises(TypeError, match='domain_bandit agent=3'):
        DomainBandit(agent=3)


def _attach(ds: MADSDataset, **settings) -> None:
    Console(ConsoleConfig(**settings), list, None).attach(ds, depth=0, reference=[{'id': 0}])


def test_settings_that_depend_on_the_dataset_fail_when_the_console_attaches(mds_dir):
    ds = MADSDataset(local=mds_dir, batch_size=4, pool_ratio=2, agents=['domain', 'quality'])
    # A window of 6 batches logs at most 6 x 8 candidates (the whole pool of 2 x 4) on one rank.
    with pytest.raises(ValueError, match=r'probe_size=49 cannot be drawn: .*at most 48 .*'
                                         r'probe_size <= 48'):
        _attach(ds, update_interval=6, probe_size=49)
    with pytest.raises(ValueError, match=r'theta_floor=0.6 is impossible for 2 agents: .*1/2'):
        _attach(ds, update_interval=6, probe_size=48, theta_floor=0.6)
    _attach(ds, update_interval=6, probe_size=48, theta_floor=0.5)  # Both at their limits.


def test_nonfinite_weights_never_reach_selection(mds_dir):
    ds = MADSDataset(local=mds_dir, batch_size=4, pool_ratio=2, agents=['domain'])
    for theta, memory, match in (([NAN], [1, 1, 1, 1.0], 'theta'),
                                 ([1.0], [1, INF, 1, 1], 'memory'),
                                 ([1.0], [1, -1, 1, 1.0], 'memory'),
                                 ([-1.0], [1, 1, 1, 1], 'theta')):
        with pytest.raises(ValueError, match=f'Weight version 1 is not publishable: {match}'):
            ds.publish(1, np.array(theta), [np.array(memory)])
    assert ds.weights(1) is None

    class NanScores(CategoricalAgent):
        def score_table(self, memory=None):
            return np.full(4, NAN)

    agent = NanScores('domain', 'domain')
    with pytest.raises(ValueError, match="Agent 'domain' scores weight version 0 .*finite"):
        version_tables([agent], Weights(0, np.array([1.0]), (np.ones(4),)))


def test_good_settings_are_kept_as_plain_numbers():
    config = ConsoleConfig(update_interval=np.int64(20), lr_theta=2, probe_size=8, lead=3)
    assert type(config.update_interval) is int and type(config.lr_theta) is float
    init = build_agent({'type': 'quality', 'init': np.arange(1, 6)}).init
    assert init.tolist() == [1, 2, 3, 4, 5]
