"""What the selection did: one line per console update, the weight-history file, a summary.

The console's metrics go to Composer's loggers, which a plain run does not show. So rank 0 also
prints one line per published version (θ per agent and the memories that moved most), appends
the version's record (θ, every memory, the kept shares) to a JSON-lines file, and prints a
summary when the fit ends; ``mads report`` draws the file (:mod:`streaming_mads.run.report`).
docs/configuration.md ("Weight history") has the record format and where the file goes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from typing import Any, Optional, Sequence, TextIO, Union

import numpy as np
import tqdm

from streaming_mads.distributed import get_rank

__all__ = ['HISTORY_FILE', 'HistoryError', 'HistorySetting', 'History', 'weights_record',
           'update_line', 'summary', 'history_file', 'read_history']

#: The weight-history file's name in a run folder.
HISTORY_FILE = 'mads_history.jsonl'
#: The memory entries an update line shows (those that moved most).
MOVED = 3
#: Keys every record holds.
_REQUIRED = ('version', 'batch', 'theta', 'memory')

#: The ``history`` setting: a path, ``None``/``True`` (the run's save folder), ``False`` (none).
HistorySetting = Union[str, bool, None]


class HistoryError(ValueError):
    """A weight-history file that cannot be read (missing, empty or not JSON lines)."""


def weights_record(agents: Sequence[Any], theta: Sequence[float],
                   kept: Sequence[Sequence[int]]) -> dict[str, Any]:
    """θ, the memories and the kept shares of one moment, keyed by agent and value names.

    Args:
        agents (Sequence[Agent]): The dataset's agents (``name``, ``value_names``, ``memory``).
        theta (Sequence[float]): θ, one per agent.
        kept (Sequence[Sequence[int]]): Per agent, the samples of each value the loader kept since
            the previous record.

    Returns:
        dict[str, Any]: ``theta`` ({agent: θ}), ``memory`` ({agent: {value: memory / the agent's
        mean memory}}), ``kept_share`` ({agent: {value: share}}, an agent left out when nothing
        was counted) and ``kept_samples`` (the samples counted).
    """
    record: dict[str, Any] = {'theta': {}, 'memory': {}, 'kept_share': {}, 'kept_samples': 0}
    for agent, t, counts in zip(agents, theta, kept):
        counts = np.asarray(counts, np.float64)
        memory = np.asarray(agent.memory, np.float64)
        record['theta'][agent.name] = float(t)
        record['memory'][agent.name] = dict(zip(agent.value_names,
                                                (memory / memory.mean()).tolist()))
        if counts.sum() > 0:
            record['kept_share'][agent.name] = dict(zip(agent.value_names,
                                                        (counts / counts.sum()).tolist()))
            record['kept_samples'] = int(counts.sum())
    return record


def _theta_text(record: dict[str, Any]) -> str:
    return ', '.join(f'{a} {t:.3f}' for a, t in record['theta'].items())


def update_line(record: dict[str, Any], previous: Optional[dict[str, Any]]) -> str:
    """The line one update prints: version, batch, θ and the :data:`MOVED` memories that moved most.

    "Most" is by the ratio new / old (a memory halving moves as much as one doubling), against
    ``previous`` (the record of the version before; none: no memory column).
    """
    head = f'[mads] version {record["version"]} at batch {record["batch"]}'
    if record.get('update_time_s') is not None:
        head += f' ({record["update_time_s"]:.2f}s)'
    if record.get('skipped'):
        head += ', skipped (weights unchanged)'
    text = f'{head}: theta {_theta_text(record)}'
    if previous is None:
        return text
    moves = []
    for agent, values in record['memory'].items():
        before = previous['memory'].get(agent, {})
        for value, new in values.items():
            old = before.get(value)
            if old is not None and old > 0 and new > 0:
                moves.append((abs(math.log(new / old)), f'{agent}:{value} {old:.3g}->{new:.3g}'))
    moves.sort(key=lambda m: -m[0])
    moved = [m for _, m in moves[:MOVED]] if moves and moves[0][0] > 0 else []
    return text + '; memory ' + (', '.join(moved) if moved else 'unchanged')


def _ranked(values: dict[str, float], top: int = 3) -> str:
    """``value weight`` pairs, highest first; the middle left out beyond ``2 * top`` values."""
    order = sorted(values.items(), key=lambda kv: -kv[1])
    text = lambda pairs: ', '.join(f'{v} {w:.3g}' for v, w in pairs)  # noqa: E731
    if len(order) <= 2 * top:
        return text(order)
    return f'highest {text(order[:top])}; lowest {text(order[-top:])}'


def _kept_over(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each agent's kept share over ``records``: their shares weighted by the samples counted."""
    totals: dict[str, dict[str, float]] = {}
    for r in records:
        for agent, shares in (r.get('kept_share') or {}).items():
            into = totals.setdefault(agent, {})
            for value, share in shares.items():
                into[value] = into.get(value, 0.0) + share * r.get('kept_samples', 0)
    return {a: {v: c / max(sum(t.values()), 1e-300) for v, c in t.items()}
            for a, t in totals.items() if sum(t.values()) > 0}


def summary(records: Sequence[dict[str, Any]], fit_seconds: Optional[float] = None,
            console_seconds: Optional[float] = None) -> list[str]:
    """The end-of-run summary of a weight history, as lines.

    Args:
        records (Sequence[dict]): The history, oldest first (:func:`read_history`).
        fit_seconds (float, optional): Wall time of the fit, for the console's share of it.
        console_seconds (float, optional): The console updates' time within that fit.
    """
    if not records:
        return ['[mads] no weight version was recorded']
    last = records[-1]
    updates = [r for r in records if r.get('update_time_s') is not None]
    skipped = sum(1 for r in updates if r.get('skipped'))
    lines = [f'[mads] {len(updates)} console update(s)' + (f', {skipped} skipped' if skipped else '')
             + f'; version {last["version"]} published at batch {last["batch"]}']
    if fit_seconds and console_seconds is not None:
        lines[0] += (f'; console {console_seconds:.1f}s = {100 * console_seconds / fit_seconds:.1f}% '
                     f'of the fit\'s {fit_seconds:.1f}s')
    lines.append(f'[mads] theta: {_theta_text(last)}')
    for agent, memory in last['memory'].items():
        lines.append(f'[mads] {agent} memory: {_ranked(memory)}')
    for agent, shares in _kept_over(records).items():
        lines.append(f'[mads] {agent} kept share: {_ranked(shares)}')
    return lines


def _write(text: str, stream: Optional[TextIO]) -> None:
    """Print ``text`` to ``stream`` (``None``: stdout) without garbling a progress bar: tqdm
    clears its bars on the terminal, writes, and draws them again."""
    stream = stream or sys.stdout
    tqdm.tqdm.write(text, file=stream)
    stream.flush()


class History:
    """Prints and records every version a console publishes (rank 0 only; the others ignore it).

    Args:
        setting (HistorySetting): Where the weight history goes: a path (``{run_name}`` is
            replaced by the run's name), ``None`` or ``True`` (``mads_history.jsonl`` in the
            Trainer's local save folder, none without one), or ``False`` (no file; the lines and
            the summary are still printed).
        where (str): The YAML section named in errors. Defaults to ``'mads_console'``.
    """

    def __init__(self, setting: HistorySetting = None, where: str = 'mads_console') -> None:
        if not (setting is None or isinstance(setting, bool) or
                (isinstance(setting, str) and setting.strip())):
            raise TypeError(f'{where} history={setting!r} is not allowed: give a file path, true '
                            '(mads_history.jsonl in the save folder) or false (no file).')
        self.setting = setting
        self.path: Optional[str] = None
        self.records: list[dict[str, Any]] = []
        self._previous: Optional[dict[str, Any]] = None
        self._stream: Optional[TextIO] = None
        self._fit_start = 0.0
        self._console_seconds = 0.0

    def path_for(self, run_name: str, save_folder: Optional[str]) -> Optional[str]:
        """The file of a run named ``run_name`` saving checkpoints to the local ``save_folder``."""
        if self.setting is False:
            return None
        if isinstance(self.setting, str):
            return self.setting.replace('{run_name}', run_name)
        return os.path.join(save_folder, HISTORY_FILE) if save_folder else None

    def start(self, path: Optional[str], batch: int, version: int, record: dict[str, Any],
              stream: Optional[TextIO] = None) -> None:
        """Begin a fit at ``batch`` with ``version`` (and ``record``) published; print to
        ``stream`` (the trainer's console stream; ``None``: stdout).

        A fresh fit (batch 0) replaces an old file at ``path``; a resumed one keeps the records up
        to its checkpoint's batch (later ones are of the run that was interrupted, and are
        recomputed) and adds the restored version's if it is not there.
        """
        self.path, self._stream = path, stream
        self._fit_start, self._console_seconds = time.perf_counter(), 0.0
        self._previous = {'version': version, 'batch': batch, 'skipped': False, **record,
                          'update_time_s': None, 'reward_mean': None}
        self.records = self._kept(batch) if batch > 0 and get_rank() == 0 else []
        if not self.records or self.records[-1]['version'] != version:
            self.records.append(self._previous)
        if self.path is not None and get_rank() == 0:
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, exist_ok=True)
            with open(self.path, 'w', encoding='utf-8') as f:
                f.writelines(json.dumps(r) + '\n' for r in self.records)

    def _kept(self, batch: int) -> list[dict[str, Any]]:
        """The records of the file at :attr:`path` up to ``batch`` (a resumed run's past)."""
        if self.path is None or not os.path.isfile(self.path):
            return []
        try:
            return [r for r in read_history(self.path) if r['batch'] <= batch]
        except HistoryError as err:
            warnings.warn(f'{err} It is started afresh from the resumed batch {batch}.')
            return []

    def add(self, batch: int, version: int, record: dict[str, Any], metrics: dict[str, float],
            skipped: bool = False) -> str:
        """Record ``version``, published after ``batch`` batches; print and return its line.

        Args:
            batch (int): Batches done when it was published.
            version (int): The version.
            record (dict[str, Any]): Its :func:`weights_record`.
            metrics (dict[str, float]): The update's metrics (``mads/update_time_s``,
                ``mads/reward/mean``).
            skipped (bool): The update rule left the weights unchanged.
        """
        entry = {'version': version, 'batch': batch, 'skipped': bool(skipped), **record,
                 'update_time_s': metrics.get('mads/update_time_s'),
                 'reward_mean': metrics.get('mads/reward/mean')}
        self._console_seconds += entry['update_time_s'] or 0.0
        line = update_line(entry, self._previous)
        self.records.append(entry)
        self._previous = entry
        if get_rank() == 0:
            if self.path is not None:
                with open(self.path, 'a', encoding='utf-8') as f:
                    f.write(json.dumps(entry) + '\n')
            _write(line, self._stream)
        return line

    def finish(self) -> list[str]:
        """Print (rank 0) and return the summary of the fit that ends now."""
        lines = summary(self.records, time.perf_counter() - self._fit_start,
                        self._console_seconds)
        if self.path is not None:
            lines.append(f'[mads] weight history: {self.path} (draw it: mads report {self.path})')
        if get_rank() == 0:
            _write('\n'.join(lines), self._stream)
        return lines


def history_file(path: str) -> str:
    """The history file ``path`` names: the file itself, or a run folder's :data:`HISTORY_FILE`."""
    if os.path.isdir(path):
        found = os.path.join(path, HISTORY_FILE)
        if not os.path.isfile(found):
            raise HistoryError(
                f'{path} holds no {HISTORY_FILE}: give the run\'s folder (its save_folder, or '
                f'<run_name> for mads train) or the file itself. A Trainer of your own writes one '
                f'only into its local save_folder or where the console\'s history setting says.')
        return found
    if not os.path.isfile(path):
        raise HistoryError(f'{path} does not exist: give a run folder holding {HISTORY_FILE} or '
                           'the history file itself.')
    return path


def read_history(path: str) -> list[dict[str, Any]]:
    """The records of a weight-history file (or run folder), oldest first.

    Raises:
        HistoryError: The file is missing, empty, or a line is not a record (named by number).
    """
    path = history_file(path)
    records = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise HistoryError(f'{path} line {number} is not JSON ({err.msg}): the file is '
                                   'not a weight history, or was cut short.') from err
            missing = [k for k in _REQUIRED if not isinstance(record, dict) or k not in record]
            if missing:
                raise HistoryError(f'{path} line {number} is not a weight-history record (no '
                                   f'{", ".join(missing)}).')
            records.append(record)
    if not records:
        raise HistoryError(f'{path} holds no records: the run published no weight version yet.')
    return records
