"""Metric names every logger accepts, built from agent and label-value names.

The console logs one metric per agent and value (``mads/memory/<agent>/<value>``, ...), and value
names are free text (``[1,2)``, ``a/b``); MLflow drops a whole batch of metrics over one bad
name, so every level is reduced to a safe token here. docs/configuration.md lists the metrics.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

__all__ = ['metric_token', 'metric_tokens', 'weight_metrics']

_BIN_RE = re.compile(r'^(?:<(?P<lt>[^,]+)|>=(?P<ge>[^,]+)|\[(?P<lo>[^,]+),(?P<hi>[^,]+)\))$')
_UNSAFE_RE = re.compile(r'[^A-Za-z0-9_.-]')


def _number_token(text: str) -> str:
    """A bin edge as a token: a leading minus becomes ``m``, so ``-`` only joins edges."""
    text = text.strip()
    return 'm' + text[1:] if text.startswith('-') else text


def metric_token(name: str) -> str:
    """``name`` (an agent or label value) as one level of a metric name every logger accepts.

    MLflow refuses a whole batch of metrics (the trainer's loss included) if one name holds a
    character outside letters, digits, ``_ - . / :`` and space; TensorBoard and W&B accept less
    still. So value names are reduced to letters, digits, ``_``, ``-`` and ``.``: bins read
    ``<1`` -> ``lt1``, ``[1,2)`` -> ``1-2``, ``>=4`` -> ``ge4``; any other character, a ``/``
    included (it would add a level to the name), becomes ``_``.
    """
    match = _BIN_RE.match(name.strip())
    if match:
        if match['lt'] is not None:
            name = 'lt' + _number_token(match['lt'])
        elif match['ge'] is not None:
            name = 'ge' + _number_token(match['ge'])
        else:
            name = f'{_number_token(match["lo"])}-{_number_token(match["hi"])}'
    return _UNSAFE_RE.sub('_', name) or '_'


def metric_tokens(names: Sequence[str]) -> list[str]:
    """:func:`metric_token` of each name, made unique (``_<position>`` added on a clash)."""
    tokens = [metric_token(n) for n in names]
    seen: dict[str, int] = {}
    for t in tokens:
        seen[t] = seen.get(t, 0) + 1
    return [f'{t}_{k}' if seen[t] > 1 else t for k, t in enumerate(tokens)]


def weight_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A :func:`~streaming_mads.console.history.weights_record` as flat metrics.

    ``mads/theta/<agent>``, ``mads/memory/<agent>/<value>`` and, where samples were counted,
    ``mads/selected_share/<agent>/<value>``: the history file and the loggers hold the same
    numbers, under names every logger accepts.
    """
    out: dict[str, float] = {}
    for agent, theta in record['theta'].items():
        name = metric_token(agent)
        out[f'mads/theta/{name}'] = theta
        for kind, key in (('memory', 'memory'), ('kept_share', 'selected_share')):
            values = record[kind].get(agent)
            if values:
                for token, value in zip(metric_tokens(list(values)), values.values()):
                    out[f'mads/{key}/{name}/{token}'] = value
    return out
