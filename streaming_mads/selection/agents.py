"""Agents: each selection method maps a sample's label to one of its values and keeps a memory.

An agent is the paper's unit of data-selection knowledge. It reads one sidecar label column,
turns the raw value into a *label value* id (a category, or the bin of a continuous score) and
holds a **memory**: one positive weight per label value. Its score of a sample is the centred
log of the weight of the sample's value (see :mod:`streaming_mads.selection.scores`).

An agent is also the one owner of how its memory is read and moved: the dataset's workers turn
each published memory into selection scores with :meth:`Agent.score_table`, and the console moves
the memory with :meth:`Agent.update` from the per-value reward estimates of
:mod:`streaming_mads.console.rewards`; a subclass that overrides either changes what the run does.
Adding a selection method is adding an agent over a new column::

    agents:
      - {name: perplexity, column: ppl_score, bins: [10, 20, 40, 80]}
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from numpy.typing import NDArray

from streaming_mads.labels import CATEGORICAL, SCORE, LabelError, LabelStore
from streaming_mads.score_bins import DEFAULT_QUALITY_EDGES, DEFAULT_SIMILARITY_EDGES
from streaming_mads.selection.scores import centred_log_weights
from streaming_mads.settings import check_numbers

__all__ = [
    'Agent', 'CategoricalAgent', 'BinnedAgent', 'QualityAgent', 'DomainAgent', 'TopicAgent',
    'SimilarityAgent', 'build_agent', 'build_agents', 'multiplicative_update', 'normalize_clipped'
]

#: ``init`` of an agent whose memory starts at ``1 / frequency``: equal shares of its values.
BALANCED = 'balanced'

#: An initial memory: positive weights, one per label value, or :data:`BALANCED`.
Init = Union[Sequence[float], str]


def multiplicative_update(weights: NDArray, mean_rewards: NDArray, lr: float, floor: float,
                          cap: float) -> NDArray[np.float64]:
    """Multiplicative-weights step on a memory, renormalised to mean 1 and clipped.

    ``w_k <- clip(w_k · exp(lr · r̄_k))``, in log space so extreme rewards cannot overflow.
    Values with no reward this round (``NaN`` in ``mean_rewards``) keep their weight relative to
    the others. Bounding the *normalised* weights to ``[floor, cap]`` (relative to the mean)
    keeps every value selectable and no value dominant, whatever the rewards.

    Args:
        weights (NDArray): Current positive weights.
        mean_rewards (NDArray): Mean standardised reward per value; ``NaN`` where unmeasured.
        lr (float): Learning rate ``η``.
        floor (float): Smallest weight relative to the mean weight (e.g. ``0.05``).
        cap (float): Largest weight relative to the mean weight (e.g. ``20``).
    """
    if not 0 < floor <= 1 <= cap:
        raise ValueError(f'Memory bounds need 0 < floor <= 1 <= cap, got floor={floor}, cap={cap}.')
    logw = np.log(np.asarray(weights, np.float64))
    r = np.asarray(mean_rewards, np.float64)
    seen = np.isfinite(r)
    logw[seen] += lr * r[seen]
    # Relative weights below floor/cap end at the floor anyway: bounding them avoids underflow.
    logw = np.maximum(logw - logw.max(), np.log(floor / cap) - 1.0)
    return normalize_clipped(np.exp(logw), floor, cap)


def normalize_clipped(w: NDArray, floor: float, cap: float) -> NDArray[np.float64]:
    """Scale ``w`` by ``c`` and clip to ``[floor, cap]`` so that the result has mean 1.

    ``mean(clip(c·w))`` grows monotonically with ``c``, so ``c`` is found by bisection (on
    ``log c``); the result keeps the order of ``w`` and respects both bounds exactly.
    """
    w = np.asarray(w, np.float64)
    lo, hi = np.log(floor / w.max()), np.log(cap / w.min())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.clip(np.exp(mid) * w, floor, cap).mean() < 1.0:
            lo = mid
        else:
            hi = mid
    return np.clip(np.exp(0.5 * (lo + hi)) * w, floor, cap)


class Agent:
    """A selection method over one label column.

    Args:
        name (str): Unique agent name (used in logs and checkpoints).
        column (str): Sidecar label column it reads.
    """

    kind: str = ''

    def __init__(self, name: str, column: str, init: Optional[Init] = None) -> None:
        for key, value in (('name', name), ('column', column)):
            if not isinstance(value, str) or not value:
                raise (ValueError if isinstance(value, str) else TypeError)(
                    f'Agent {key}={value!r} is not allowed: it must be a non-empty string.')
        self.name = name
        self.column = column
        self.balanced = isinstance(init, str)
        if self.balanced and init != BALANCED:
            raise ValueError(f'Agent {name!r}: `init` is a list of positive weights or '
                             f'{BALANCED!r}, got {init!r}.')
        self.init = None if init is None or self.balanced else check_numbers(
            init, f'Agent {name!r} init', low=0, low_open=True,
            hint=f'`init` is one positive weight per label value, or {BALANCED!r}.')
        self.value_names: tuple[str, ...] = ()
        self.freq: NDArray[np.int64] = np.zeros(0, np.int64)
        self.memory: NDArray[np.float64] = np.zeros(0)

    @property
    def num_values(self) -> int:
        """Number of label values (memory size)."""
        return len(self.value_names)

    def bind(self, store: LabelStore) -> None:
        """Learn label values and their frequencies from the dataset's labels; reset memory."""
        raise NotImplementedError

    def label_ids(self, raw: NDArray) -> NDArray[np.int64]:
        """Label value id of each raw column value (vectorised)."""
        raise NotImplementedError

    def score_table(self, memory: Optional[NDArray] = None) -> NDArray[np.float64]:
        """Score ``ŝ[k]`` of each label value under ``memory`` (default: the current memory).

        The dataset's workers call this on every published version (in the worker, on the
        memory read from the board), so it must be a pure function of the memory and the
        agent's fixed label statistics. Default: :func:`~streaming_mads.selection.scores.centred_log_weights`.
        """
        return centred_log_weights(self.memory if memory is None else memory, self.freq)

    def score(self, raw: NDArray) -> NDArray[np.float64]:
        """The agent's score ``ŝ(x)`` of each raw column value under its current memory."""
        return self.score_table()[self.label_ids(raw)]

    def update(self, value_rewards: NDArray, lr: float, floor: float,
               cap: float) -> NDArray[np.float64]:
        """Move the memory by a multiplicative-weights step on per-value reward estimates.

        The console calls this once per update with the estimates of
        :func:`streaming_mads.console.rewards.value_effects` (0 for a value no probe measured, which
        then keeps its weight relative to the mean). Returns the new memory.

        Args:
            value_rewards (NDArray): Estimated reward of each label value.
            lr (float): ``lr_memory``.
            floor (float): ``memory_floor``.
            cap (float): ``memory_cap``.
        """
        self.memory = multiplicative_update(self.memory, value_rewards, lr, floor, cap)
        return self.memory

    def settle(self, effects: NDArray, strength: float, floor: float,
               cap: float) -> NDArray[np.float64]:
        """Set the memory to the prior moved by accumulated evidence: ``w ∝ w₀ · exp(strength ·
        effects)``, renormalised to mean 1 and clipped (the console's ``evidence`` rule).

        Unlike :meth:`update` nothing of earlier updates is kept but the prior: the effects are
        already the gated estimate from every probe so far
        (:func:`streaming_mads.console.rewards.evidence_effects`), so the memory moves only as
        far as that evidence supports, and with none it is the agent's ``init``.

        Args:
            effects (NDArray): Gated effect of each label value (standardised reward units).
            strength (float): ``memory_strength``: log-weight per unit of effect.
            floor (float): ``memory_floor``.
            cap (float): ``memory_cap``.
        """
        self.memory = multiplicative_update(self.prior_memory(), effects, strength, floor, cap)
        return self.memory

    def prior_memory(self) -> NDArray[np.float64]:
        """The memory before any evidence: ones, the ``init`` weights, or ``1 / frequency``
        scaled to mean 1 (``balanced``)."""
        if self.balanced:
            # Weights 1/p_k: at temperature 1 every value is kept equally often (stratified).
            inv = 1.0 / np.maximum(self.freq, 1)
            return inv / inv.mean()
        return np.ones(len(self.value_names)) if self.init is None else self.init.copy()

    def _check_kind(self, store: LabelStore) -> Any:
        info = store.info(self.column)
        if info.kind != self.kind:
            hint = ('give it `bins`' if info.kind == SCORE else 'drop its `bins`')
            raise LabelError(f'Agent {self.name!r} expects a {self.kind} column but {self.column!r} '
                             f'is {info.kind}: {hint}.')
        return info

    def _reset(self, value_names: Sequence[str], freq: NDArray) -> None:
        self.value_names = tuple(value_names)
        self.freq = np.asarray(freq, np.int64)
        if self.init is not None and len(self.init) != len(self.value_names):
            raise ValueError(f'Agent {self.name!r}: `init` has {len(self.init)} weights for '
                             f'{len(self.value_names)} label values {list(self.value_names)}.')
        self.memory = self.prior_memory()

    def state_dict(self) -> dict[str, Any]:
        """Memory and the label values it refers to (checked on load)."""
        return {'name': self.name, 'values': list(self.value_names), 'memory': self.memory.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a memory saved by :meth:`state_dict` for the same label values."""
        if list(state['values']) != list(self.value_names):
            raise ValueError(f'Agent {self.name!r}: checkpoint has label values {state["values"]} '
                             f'but the data has {list(self.value_names)}.')
        self.memory = np.asarray(state['memory'], np.float64)

    def config(self) -> dict[str, Any]:
        """The spec that rebuilds this agent with :func:`build_agent`."""
        out: dict[str, Any] = {'name': self.name, 'column': self.column}
        if self.init is not None or self.balanced:
            out['init'] = BALANCED if self.balanced else self.init.tolist()
        return out

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.config()})'


class CategoricalAgent(Agent):
    """An agent over a categorical column (one label value per category)."""

    kind = CATEGORICAL

    def bind(self, store: LabelStore) -> None:
        info = self._check_kind(store)
        self._reset(info.values, info.counts)

    def label_ids(self, raw: NDArray) -> NDArray[np.int64]:
        return np.asarray(raw, np.int64)


class BinnedAgent(Agent):
    """An agent over a continuous score, cut into bins at ``edges``.

    Args:
        name (str): Agent name.
        column (str): Score column.
        edges (Sequence[float]): Increasing inner bin edges; ``n`` edges give ``n + 1`` bins,
            bin ``i`` holding ``edges[i-1] <= x < edges[i]``.
    """

    kind = SCORE

    def __init__(self, name: str, column: str, edges: Sequence[float],
                 init: Optional[Init] = None) -> None:
        super().__init__(name, column, init)
        self.edges = check_numbers(edges, f'Agent {name!r} bins',
                                   hint='`bins` are the inner edges of a score column\'s bins.')
        if np.any(np.diff(self.edges) <= 0):
            raise ValueError(f'Agent {name!r}: `bins` must be a non-empty increasing list of edges, '
                             f'got {list(edges)}.')

    def bind(self, store: LabelStore) -> None:
        self._check_kind(store)
        e = [f'{x:g}' for x in self.edges]
        names = [f'<{e[0]}'] + [f'[{a},{b})' for a, b in zip(e[:-1], e[1:])] + [f'>={e[-1]}']
        self._reset(names, store.binned_counts(self.column, self.edges))

    def label_ids(self, raw: NDArray) -> NDArray[np.int64]:
        return np.searchsorted(self.edges, raw, side='right').astype(np.int64)

    def config(self) -> dict[str, Any]:
        return {**super().config(), 'bins': self.edges.tolist()}


class QualityAgent(BinnedAgent):
    """The paper's quality agent: bins of a 0-5 quality score (column ``quality``)."""

    def __init__(self, name: str = 'quality', column: str = 'quality',
                 edges: Sequence[float] = DEFAULT_QUALITY_EDGES) -> None:
        super().__init__(name, column, edges)


class DomainAgent(CategoricalAgent):
    """The paper's domain agent: the data source (column ``domain``)."""

    def __init__(self, name: str = 'domain', column: str = 'domain') -> None:
        super().__init__(name, column)


class TopicAgent(CategoricalAgent):
    """The paper's topic agent: topic clusters (column ``topic``)."""

    def __init__(self, name: str = 'topic', column: str = 'topic') -> None:
        super().__init__(name, column)


class SimilarityAgent(BinnedAgent):
    """Reference similarity: bins of the percentile of a sample's likelihood ratio, reference
    to corpus (column ``similarity``, written by ``mads label --reference``; see
    :mod:`streaming_mads.labeling.similarity`). It carries a reference theme that no domain or topic holds."""

    def __init__(self, name: str = 'similarity', column: str = 'similarity',
                 edges: Sequence[float] = DEFAULT_SIMILARITY_EDGES) -> None:
        super().__init__(name, column, edges)


_PRESETS = {'quality': QualityAgent, 'domain': DomainAgent, 'topic': TopicAgent,
            'similarity': SimilarityAgent}

AgentSpec = Union[Agent, str, Mapping[str, Any]]


def build_agent(spec: AgentSpec) -> Agent:
    """An agent from a preset name (``'quality'``, ``'domain'``, ``'topic'``, ``'similarity'``),
    a dict, or itself.

    Dict keys: ``name``; ``column`` (defaults to ``name``); ``bins`` (edges, for a score column;
    omitted for a categorical one); ``init`` (initial memory, one positive weight per label value,
    or ``'balanced'`` for ``1 / frequency``: every value kept equally often at temperature 1, the
    stratified baseline; default uniform); or ``type`` naming a preset whose defaults the other keys override.
    """
    if isinstance(spec, Agent):
        return spec
    if isinstance(spec, str):
        if spec not in _PRESETS:
            raise ValueError(f'Unknown agent preset {spec!r}: use one of {sorted(_PRESETS)} or a '
                             'dict {name, column, bins}.')
        return _PRESETS[spec]()
    if not isinstance(spec, Mapping):
        raise TypeError(f'Agent spec {spec!r} is not allowed: use a preset name '
                        f'({", ".join(sorted(_PRESETS))}), a dict {{name, column, bins, init}} '
                        'or an Agent.')
    spec = dict(spec)
    unknown = set(spec) - {'name', 'column', 'bins', 'type', 'init'}
    if unknown:
        raise ValueError(f'Agent spec {spec} has unknown keys {sorted(unknown)}: use name, column, '
                         'bins, type, init.')
    init = spec.get('init')
    kind: Optional[str] = spec.pop('type', None)
    if kind is not None and (not isinstance(kind, str) or kind not in _PRESETS):
        raise ValueError(f'Unknown agent type {kind!r}: use one of {sorted(_PRESETS)}.')
    name = spec.get('name') or kind
    if not name:
        raise ValueError(f'Agent spec {spec} needs a `name` (or a `type`).')
    preset = _PRESETS[kind]() if kind else None
    column = spec.get('column') or (preset.column if preset else name)
    bins = spec.get('bins')
    if isinstance(preset, BinnedAgent) or (preset is None and bins is not None):
        edges = bins if bins is not None else preset.edges  # A binned preset's default bins.
        return BinnedAgent(name, column, edges, init)
    if bins is not None:
        raise ValueError(f'Agent {name!r} of type {kind!r} is categorical and takes no `bins`.')
    return CategoricalAgent(name, column, init)


def build_agents(specs: Optional[Sequence[AgentSpec]], store: LabelStore,
                 available: Sequence[str]) -> list[Agent]:
    """Agents from specs (default: a preset per label column present), bound to the labels.

    Args:
        specs (Sequence[AgentSpec], optional): Agent specs; ``None`` picks every preset whose
            column exists in the labels of every stream.
        store (LabelStore): The dataset's labels.
        available (Sequence[str]): Columns present in every stream.
    """
    if specs is None:
        specs = [name for name, cls in _PRESETS.items() if cls().column in available]
        if not specs:
            raise LabelError(f'No default agent applies: the labels have columns {list(available)} '
                             'but none of quality/domain/topic/similarity. Pass `agents=[...]` naming them.')
    agents = [build_agent(s) for s in specs]
    names = [a.name for a in agents]
    if len(set(names)) != len(names) or not agents:
        raise ValueError(f'Agent names must be unique and non-empty, got {names}.')
    for agent in agents:
        agent.bind(store)
    return agents
