"""The console's settings (the ``mads_console`` YAML keys) and their validation.

One place for every setting's default: ``AgentConsole`` and ``DomainBandit`` take theirs from
:class:`ConsoleConfig`, and :func:`console_config` names a misspelt key. See
docs/configuration.md for the table and docs/architecture.md for what each number steers.
"""

from __future__ import annotations

import difflib
from dataclasses import InitVar, dataclass, fields
from typing import Any, Iterable, Optional

import numpy as np

from streaming_mads.console.rewards import REWARDS, RULES, TRANSFORMS
from streaming_mads.settings import check_number

__all__ = ['ConsoleConfig', 'console_config']


@dataclass
class ConsoleConfig:
    """Settings of the agent console (every field is a YAML key of ``mads_console``).

    Args:
        update_interval (int): ``W``: batches per weight version. Defaults to ``150`` (the
            console then costs under 5% of a small CPU run's time; see
            ``benchmarks/console_overhead.py``).
        lead (int, optional): ``L``: a version is published ``L`` batches before its first batch;
            must exceed the DataLoader's ``num_workers x prefetch_factor`` and be below ``W``.
            ``None``: that prefetch depth + 1. Defaults to ``None``.
        probe_size (int): Probe samples per update, over all ranks. Defaults to ``64``.
        probe_pool (int): Most candidates, over all ranks, the probe set is stratified from; they
            are a uniform subset of the pools the ranks read since the last update. Defaults to
            ``4096``.
        reference_size (int): Reference samples used for ``∇L_R`` at each update, over all ranks:
            a fresh draw from the whole reference set each update (seeded by ``seed`` and the
            version, the same on every rank). Defaults to ``32``.
        reward (str): ``'inner'`` (influence ``⟨∇ℓ(x), ∇L_R⟩``), ``'cosine'`` (divided by
            ``|∇ℓ(x)|``, so high-loss samples with large gradients do not dominate) or ``'adam'``
            (the influence of an Adam step: the reference gradient preconditioned by the
            trainer's Adam second moments; :mod:`streaming_mads.influence.preconditioning`). Defaults to
            ``'inner'``.
        rule (str): ``'evidence'``: each agent's memory is its prior moved by the effects fitted
            on every probe so far (its own fit, so it moves as it would alone), gated by their
            reliability (an agent whose labels carry nothing stays at its prior), and θ is 1 for
            every agent, so the agents add at full strength; ``'paper'``: the paper's
            multiplicative memory steps per update and θ shares moved by predictiveness. See
            docs/architecture.md "The update rule". Defaults to ``'paper'``.
        reward_transform (str): ``'none'`` (standardise), ``'rank'`` (standardised ranks) or
            ``'winsorize'`` (clip at 3 robust deviations, then standardise): what one
            heavy-tailed influence can do to an update. Defaults to ``'none'``.
        memory_strength (float): ``evidence`` rule: log-weight of the memory per unit of gated
            effect (in standardised reward units). Defaults to ``8``.
        evidence_decay (float): ``evidence`` rule: weight of past probes, per update, in the
            accumulated evidence (``1`` never forgets; ``0.95`` remembers about 20 updates).
            Defaults to ``0.95``.
        value_prior (float): Pseudo-probes of reward 0 behind every label value's estimate, so a
            value seen in few probes moves its memory little. Defaults to ``4``.
        repeat_penalty (float): ``ρ``: a value's published weight is its memory divided by
            ``1 + ρ · e``, ``e`` the times each of its samples was kept on average so far (the
            paper's ``1 + 0.1 · count``, per label value). ``0`` turns it off. Defaults to
            ``0.1``.
        lr_memory (float): ``η`` of the agents' memories (``paper`` rule). Defaults to ``0.5``.
        lr_theta (float): ``η_θ`` of the collaborative weights (``paper`` rule). Defaults to ``1.0``.
        memory_floor (float): Smallest memory weight relative to the mean. Defaults to ``0.05``.
        memory_cap (float): Largest memory weight relative to the mean. Defaults to ``20``.
        theta_floor (float): Smallest share of θ per agent (``paper`` rule). Defaults to ``0.05``.
        seed (int): Seed of probe draws (with the version number). Defaults to ``0``.
        probe_micro_batch (int, optional): Most samples per forward/backward of the influence
            pass (reference and probes), so it needs no more activation memory than a training
            step. ``None``: the trainer's ``device_train_microbatch_size``. Defaults to ``None``.
        activation_checkpointing (bool): Recompute the model's blocks in the influence pass'
            backward instead of keeping their activations (about a third more influence compute,
            activation memory of about one block). Defaults to ``True``.
    """
    update_interval: int = 150
    lead: Optional[int] = None
    probe_size: int = 64
    probe_pool: int = 4096
    reference_size: int = 32
    reward: str = 'inner'
    rule: str = 'paper'
    reward_transform: str = 'none'
    memory_strength: float = 8.0
    evidence_decay: float = 0.95
    value_prior: float = 4.0
    repeat_penalty: float = 0.1
    lr_memory: float = 0.5
    lr_theta: float = 1.0
    memory_floor: float = 0.05
    memory_cap: float = 20.0
    theta_floor: float = 0.05
    seed: int = 0
    probe_micro_batch: Optional[int] = None
    activation_checkpointing: bool = True

    #: The YAML section named in errors (not a setting).
    section: InitVar[str] = 'mads_console'

    def __post_init__(self, section: str) -> None:
        """Check every setting's type and range (each error names the setting and the range)."""
        def number(name: str, **bounds: Any) -> None:
            setattr(self, name, check_number(getattr(self, name), f'{section} {name}', **bounds))

        number('update_interval', integer=True, low=2,
               hint='It is batches per weight version, and lead (>= 1) must be below it.')
        if self.lead is not None:
            number('lead', integer=True, low=1, high=self.update_interval - 1,
                   hint=f'It must be below update_interval={self.update_interval} and exceed the '
                        f'DataLoader\'s num_workers x prefetch_factor (leave it unset for that '
                        f'+ 1).')
        number('probe_size', integer=True, low=2)
        number('probe_pool', integer=True, low=self.probe_size,
               hint=f'It is the most candidates probe_size={self.probe_size} probes are drawn '
                    f'from.')
        number('reference_size', integer=True, low=1)
        if self.reward not in REWARDS:
            raise ValueError(f'{section} reward={self.reward!r}: use one of {list(REWARDS)}.')
        for name, allowed in (('rule', RULES), ('reward_transform', TRANSFORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f'{section} {name}={getattr(self, name)!r}: use one of '
                                 f'{list(allowed)}.')
        number('memory_strength', low=0)
        number('evidence_decay', low=0, high=1, low_open=True,
               hint='It is the weight of past probes per update (1 never forgets).')
        number('value_prior', low=0, low_open=True)
        number('repeat_penalty', low=0, hint='0 turns it off.')
        number('lr_memory', low=0)
        number('lr_theta', low=0)
        number('memory_floor', low=0, high=1, low_open=True,
               hint='It is relative to the mean memory weight.')
        number('memory_cap', low=1, hint='It is relative to the mean memory weight.')
        number('theta_floor', low=0, high=1, high_open=True,
               hint='It is the smallest share of θ per agent (at most 1 / agents).')
        number('seed', integer=True, low=0)
        if self.probe_micro_batch is not None:
            number('probe_micro_batch', integer=True, low=1)
        if not isinstance(self.activation_checkpointing, (bool, np.bool_)):
            raise TypeError(f'{section} activation_checkpointing='
                            f'{self.activation_checkpointing!r} is not allowed: it must be true '
                            'or false.')


def console_config(settings: dict[str, Any], where: str = 'mads_console',
                   allowed: Optional[Iterable[str]] = None) -> ConsoleConfig:
    """A :class:`ConsoleConfig` of ``settings`` (the rest at their defaults), a misspelt key named.

    Args:
        settings (dict[str, Any]): Fields of :class:`ConsoleConfig`.
        where (str): The section named in errors. Defaults to ``'mads_console'``.
        allowed (Iterable[str], optional): The fields this caller takes. Defaults to all.
    """
    known = list(allowed) if allowed is not None else [f.name for f in fields(ConsoleConfig)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f'did you mean {close[0]!r}?' if close else \
            f'the settings are {", ".join(known)} (see docs/configuration.md).'
        raise ValueError(f'{where} has no setting {unknown[0]!r}: {hint}')
    return ConsoleConfig(**settings, section=where)
