"""``mads report RUN``: what the selection did over a run, drawn from its weight history.

One PNG from the console's ``mads_history.jsonl`` (:mod:`streaming_mads.console.history`): θ over
the batches, and per agent its memories (relative to the agent's mean, log scale) and the shares
of the samples the loader kept, value by value. Weights are drawn as steps: a version's hold
from the batch it was published at to the next one's. ``mads demo`` draws its weights with the
same functions. Needs matplotlib (``pip install 'streaming-mads[plot]'``). docs/configuration.md,
"Weight history".
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from streaming_mads.console.history import history_file, read_history, summary

__all__ = ['ReportError', 'pyplot', 'plot_theta', 'plot_memory', 'plot_kept', 'draw_history',
           'write_report']

Records = Sequence[dict[str, Any]]


class ReportError(RuntimeError):
    """The report cannot be drawn here (matplotlib is missing)."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or a :class:`ReportError` naming the extra.

    Agg draws without a display (servers, CI); the figures are only written to files.
    """
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ReportError('Drawing the weight history needs matplotlib: pip install '
                          '\'streaming-mads[plot]\'.') from err
    return plt


def _agents(records: Records) -> list[str]:
    """The agents of a history, in the order the run listed them."""
    return list(records[-1]['memory'])


def _series(records: Records, kind: str, agent: str) -> dict[str, tuple[list[int], list[float]]]:
    """``value -> (batches, numbers)`` of one agent's ``kind`` (``memory`` or ``kept_share``)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for value, number in (r.get(kind) or {}).get(agent, {}).items():
            batches, numbers = out.setdefault(value, ([], []))
            batches.append(r['batch'])
            numbers.append(number)
    return out


def _legend(ax: Any, entries: int) -> None:
    if entries:
        ax.legend(fontsize=6 if entries > 6 else 7, ncol=2 if entries > 6 else 1)


def plot_theta(ax: Any, records: Records) -> None:
    """θ of every agent over the batches at which each version was published."""
    batches = [r['batch'] for r in records]
    for agent in _agents(records):
        ax.plot(batches, [r['theta'].get(agent) for r in records], marker='o', ms=3,
                drawstyle='steps-post', label=agent)
    ax.set(title='collaborative weights θ', xlabel='batch')
    _legend(ax, len(_agents(records)))


def plot_memory(ax: Any, records: Records, agent: str) -> None:
    """One agent's memories (each value's weight over the agent's mean), log scale."""
    series = _series(records, 'memory', agent)
    for value, (batches, numbers) in series.items():
        ax.plot(batches, numbers, marker='o', ms=2.5, drawstyle='steps-post', label=value)
    ax.set(title=f'{agent} memory (relative weight)', xlabel='batch', yscale='log')
    _legend(ax, len(series))


def plot_kept(ax: Any, records: Records, agent: str) -> None:
    """The share of each of one agent's values among the samples the loader kept between two
    versions' publications (drawn over that span)."""
    series = _series(records, 'kept_share', agent)
    for value, (batches, numbers) in series.items():
        ax.plot(batches, numbers, marker='.', drawstyle='steps-pre', label=value)
    ax.set(title=f'{agent} kept share', xlabel='batch', ylim=(0, None))
    if not series:
        ax.text(0.5, 0.5, 'not counted', ha='center', va='center', transform=ax.transAxes)
    _legend(ax, len(series))


def draw_history(fig: Any, records: Records) -> None:
    """θ (left, full height), then per agent its memories (top) and kept shares (bottom).

    Args:
        fig (matplotlib.figure.Figure or SubFigure): Where to draw (the demo gives a subfigure).
        records (Records): The weight history (:func:`~streaming_mads.console.history.read_history`).
    """
    agents = _agents(records)
    grid = fig.add_gridspec(2, len(agents) + 1)
    plot_theta(fig.add_subplot(grid[:, 0]), records)
    for i, agent in enumerate(agents, 1):
        plot_memory(fig.add_subplot(grid[0, i]), records, agent)
        plot_kept(fig.add_subplot(grid[1, i]), records, agent)


def write_report(source: str, out: Optional[str] = None) -> tuple[str, str]:
    """Draw a run's weight history into a PNG.

    Args:
        source (str): The run folder holding ``mads_history.jsonl``, or the file itself.
        out (str, optional): The PNG to write. Defaults to ``mads_history.png`` beside the
            history file.

    Returns:
        tuple[str, str]: The PNG's path and the run's summary (as printed at the end of the fit).
    """
    path = history_file(source)
    records = read_history(path)
    plt = pyplot()
    out = out or os.path.join(os.path.dirname(path), 'mads_history.png')
    fig = plt.figure(figsize=(4.2 * (len(_agents(records)) + 1), 7), layout='constrained')
    draw_history(fig, records)
    fig.suptitle(f'MADS weights: {path}', fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out, '\n'.join(summary(records))
