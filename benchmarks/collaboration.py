"""Does the agents' combination beat each of them? A synthetic world driven by the real rule.

A labelled corpus of ``--samples`` samples (real MDS shards and sidecar labels, read through
``LabelStore`` and the real agents) carries four labels: ``quality`` (a 0-5 score), ``domain``
(7 sources of unequal size), ``topic`` (13 clusters) and ``similarity`` (a percentile). A
*target* is a set of samples defined by some of the labels; a probe's reward is ``1`` for a
target sample plus Gaussian noise of ``--noise`` standard deviations, so the labels outside the
target's definition carry nothing. Three worlds:

* ``a``: the target is the top tenth of ``similarity``: one informative agent, three not;
* ``b``: the target is the top tenth of ``similarity`` or the domain ``d5`` (8%): split across
  two agents, so neither alone can find all of it;
* ``c``: no target (pure noise): every agent is uninformative, and any change of the kept mix
  is drift.

Each run is ``--updates`` console updates at the demo's settings (``yamls/quickstart-cpu.yaml``:
pools of 64 keeping 16 at temperature 0.25, 48 probes stratified from the 960 candidates a window
of 30 batches logs, ``lr_memory`` 1). Every step is the project's own code: the probe draw
(``inclusion_probabilities``, ``systematic_sample``), the rule (``apply_rule``: memories, θ,
gates, evidence), the score tables of the published weights (``version_tables``) and the
selection (``simulate_keep``, pools through ``gumbel_topk``). The repeat penalty is off: the
corpus is large beside what a run keeps. After each update the new version selects from fresh
candidates; the *kept share of the target* is over the run's kept samples. Arms: each agent
alone, θ frozen (the paper's rule at ``lr_theta`` 0), and all four agents under each rule
(``mads-paper``, ``mads-evidence``).

``--tails`` adds world ``a`` with heavy-tailed influence: each probe's influence is its reward
times a gradient norm (log-normal; one probe in 20 "garbled", 30 times larger), compared for the
reward transforms ``none``, ``rank`` and ``winsorize`` on the inner product, and for ``cosine``
(divided by the norm).

The last line is ``collaboration: mads/best-single (a) X.XX (b) Y.YY; uninformative drift (c)
Z.ZZ`` for the ``evidence`` rule (before it: the same for the paper's, each rule's mean per-run
drift in world c, and the evidence rule over its own best single agent): MADS' kept target share over the best single
agent's (under either rule) in worlds a and b, and the KL divergence (nats) of the kept domain mix
from the data's in world c.
The ratios' standard errors (delta method over the seeds) are printed before it: at 24 seeds
about 0.03 in a and 0.04 in b, so 12 seeds cannot tell 1.08 from 1.13. ``--quick`` runs fewer
seeds and samples (the tests' setting)::

    python benchmarks/collaboration.py            # 24 seeds, about two minutes on one core
    python benchmarks/collaboration.py --tails
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
from numpy.typing import NDArray
from streaming import MDSWriter

from streaming_mads.console.config import ConsoleConfig
from streaming_mads.console.rewards import (RULES, Evidence, apply_rule,
                                            inclusion_probabilities, systematic_sample)
from streaming_mads.labels import LabelStore, StreamLabels, categorical, score, write_labels
from streaming_mads.selection.agents import build_agents
from streaming_mads.selection.board import Weights
from streaming_mads.selection.scores import combined_scores, simulate_keep
from streaming_mads.selection.step import gather_label_ids, version_tables

AGENTS = ('quality', 'domain', 'topic', 'similarity')
DOMAIN_MIX = (0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.05)
TOPICS = 13
POOL, KEEP, TEMPERATURE = 64, 16, 0.25  # quickstart-cpu.yaml: pool_ratio 4, batch 16.
WINDOW = 960  # Candidates a window logs: 30 batches x 32.
MEASURE = 4096  # Fresh candidates each version selects from when measured.
GARBLED, GARBLED_SCALE = 0.05, 30.0


@dataclass
class World:
    """The corpus' labels (real sidecars) and which samples are the target of each world."""
    store: LabelStore
    targets: dict[str, NDArray[np.bool_]]
    domain: NDArray[np.int64]

    @property
    def size(self) -> int:
        return len(self.domain)


def build_world(root: str, samples: int) -> World:
    """Write the corpus (tiny MDS samples, zstd) and its four label columns; open the labels."""
    rng = np.random.default_rng(0)
    with MDSWriter(out=root, columns={'i': 'int'}, compression='zstd') as writer:
        for i in range(samples):
            writer.write({'i': i})
    domain = rng.choice(len(DOMAIN_MIX), samples, p=DOMAIN_MIX)
    similarity = rng.random(samples)
    write_labels(root, {
        'quality': score(rng.uniform(0, 5, samples)),
        'domain': categorical(domain, [f'd{k}' for k in range(len(DOMAIN_MIX))]),
        'topic': categorical(rng.integers(0, TOPICS, samples), [f't{k:02d}' for k in range(TOPICS)]),
        'similarity': score(similarity)})
    store = LabelStore([StreamLabels(root, samples, 'collaboration')], np.zeros(1, np.int64))
    top = similarity >= 0.9
    return World(store, {'a': top, 'b': top | (domain == 5), 'c': np.zeros(samples, bool)}, domain)


@dataclass
class Run:
    """What one arm's run kept: the target share and the kept domain mix, over its versions."""
    share: float
    domain_mix: NDArray[np.float64]


def run_arm(world: World, agents_used: Sequence[str], config: ConsoleConfig, target: NDArray,
            seed: int, updates: int, noise: float, reward: str = 'inner') -> Run:
    """One run of the rule on ``world``: ``updates`` updates, each followed by its selection."""
    rng = np.random.default_rng((seed, 0xC0))
    agents = build_agents(list(agents_used), world.store, list(AGENTS))
    sizes = [a.num_values for a in agents]
    theta = np.ones(len(agents)) if config.rule == 'evidence' else \
        np.full(len(agents), 1.0 / len(agents))
    evidence = Evidence(sizes) if config.rule == 'evidence' else None
    kept_target, kept_total = 0.0, 0.0
    mix = np.zeros(len(DOMAIN_MIX))
    for version in range(1, updates + 1):
        published = Weights(version - 1, theta, tuple(a.memory.copy() for a in agents))
        candidates = rng.choice(world.size, WINDOW, replace=False)
        labels = gather_label_ids(world.store, agents, candidates)
        pi = inclusion_probabilities(labels, sizes, config.probe_size)
        chosen = systematic_sample(pi, rng)
        weights = 1.0 / pi[chosen]
        probes = candidates[chosen]
        rewards = probe_influence(target[probes], noise, rng, reward)
        update = apply_rule(agents, theta, [lab[chosen] for lab in labels], rewards, config,
                            selection_tables=[a.score_table(m) for a, m in
                                              zip(agents, published.memories)],
                            probe_weights=weights, evidence=evidence)
        assert update is not None
        theta = update.theta
        # The new version selects from fresh candidates: what the loader keeps until the next.
        fresh = rng.choice(world.size, MEASURE, replace=False)
        tables = version_tables(agents, Weights(version, theta, tuple(a.memory for a in agents)))
        scores = combined_scores(tables, gather_label_ids(world.store, agents, fresh))
        keep = simulate_keep(scores, POOL, KEEP, TEMPERATURE, (seed, version, 0xC1), pools=128)
        kept_target += float(keep @ target[fresh])
        kept_total += float(keep.sum())
        mix += np.bincount(world.domain[fresh], weights=keep, minlength=len(DOMAIN_MIX))
    return Run(kept_target / kept_total, mix / mix.sum())


def probe_influence(is_target: NDArray, noise: float, rng: np.random.Generator,
                    reward: str) -> NDArray[np.float64]:
    """Each probe's reward: ``1`` on target plus noise; with heavy tails (``inner-tails``,
    ``cosine-tails``) the inner product is that times a gradient norm, which ``cosine`` divides
    out again."""
    clean = is_target.astype(np.float64) + noise * rng.normal(size=len(is_target))
    if reward == 'inner':
        return clean
    norm = np.exp(0.5 * rng.normal(size=len(clean)))
    norm[rng.random(len(clean)) < GARBLED] *= GARBLED_SCALE
    inner = norm * clean
    return inner / norm if reward == 'cosine-tails' else inner


def kl(p: NDArray, q: NDArray) -> float:
    """``KL(p || q)`` in nats."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    nz = p > 0
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


ARMS: dict[str, tuple[tuple[str, ...], dict]] = {
    **{f'{a}-paper': ((a,), {'rule': 'paper'}) for a in AGENTS},
    **{f'{a}-evidence': ((a,), {'rule': 'evidence'}) for a in AGENTS},
    'theta-frozen': (AGENTS, {'rule': 'paper', 'lr_theta': 0.0}),
    'mads-paper': (AGENTS, {'rule': 'paper'}),
    'mads-evidence': (AGENTS, {'rule': 'evidence'}),
}


def evaluate(world: World, seeds: Sequence[int], updates: int, noise: float,
             base: ConsoleConfig, arms: Optional[Sequence[str]] = None,
             worlds: Sequence[str] = ('a', 'b', 'c')) -> dict[str, dict[str, dict[str, float]]]:
    """Mean kept target share (and its standard error) and domain-mix KL of every arm in every
    world, over ``seeds``: ``kl`` of the mean kept mix (a systematic drift, the goal's), and
    ``kl_run`` the mean of each run's own (random drifts, which cancel in the mean mix)."""
    data_mix = np.bincount(world.domain, minlength=len(DOMAIN_MIX)) / world.size
    out: dict[str, dict[str, dict[str, float]]] = {}
    for w in worlds:
        out[w] = {}
        for arm in arms or ARMS:
            used, settings = ARMS[arm]
            runs = [run_arm(world, used, replace(base, **settings), world.targets[w], s,
                            updates, noise) for s in seeds]
            shares = np.array([r.share for r in runs])
            mix = np.mean([r.domain_mix for r in runs], 0)
            out[w][arm] = {'share': float(shares.mean()),
                           'se': float(shares.std(ddof=1) / np.sqrt(len(shares)))
                           if len(shares) > 1 else 0.0,
                           'kl': kl(mix, data_mix),
                           'kl_run': float(np.mean([kl(r.domain_mix, data_mix) for r in runs]))}
    return out


def best_single(arms: dict[str, dict[str, float]], rules: Sequence[str] = RULES) -> str:
    """The single-agent arm (under one of ``rules``) that keeps the most of the target."""
    singles = [f'{a}-{r}' for a in AGENTS for r in rules]
    return max((s for s in singles if s in arms), key=lambda s: arms[s]['share'])


def summary(results: dict[str, dict[str, dict[str, float]]], rule: str,
            same_rule: bool = False) -> dict[str, float]:
    """The goal's numbers: MADS under ``rule`` over the best single agent in worlds a and b
    (under either rule, the goal's stricter reading; under ``rule`` only with ``same_rule``),
    and its kept domain mix's KL from the data's in world c."""
    out = {}
    for w in ('a', 'b'):
        if w in results:
            best = best_single(results[w], (rule,) if same_rule else RULES)
            out[w] = results[w][f'mads-{rule}']['share'] / results[w][best]['share']
    if 'c' in results:
        out['c'] = results['c'][f'mads-{rule}']['kl']
    return out


def ratio_errors(results: dict[str, dict[str, dict[str, float]]], rule: str) -> dict[str, float]:
    """Standard error of :func:`summary`'s ratios in worlds a and b (delta method: MADS' and the
    best single agent's relative errors added in quadrature)."""
    out = {}
    for w in ('a', 'b'):
        if w in results:
            mads, single = results[w][f'mads-{rule}'], results[w][best_single(results[w])]
            out[w] = mads['share'] / single['share'] * float(
                np.hypot(mads['se'] / mads['share'], single['se'] / single['share']))
    return out


def tails(world: World, seeds: Sequence[int], updates: int, noise: float,
          base: ConsoleConfig) -> dict[str, float]:
    """World a with heavy-tailed influence: MADS' (``evidence`` rule) kept target share per
    reward transform, and with the cosine reward."""
    target, base = world.targets['a'], replace(base, rule='evidence')
    arms = {**{f'inner, {t}': ('inner-tails', t) for t in ('none', 'rank', 'winsorize')},
            'cosine, none': ('cosine-tails', 'none'), 'no tails (reference)': ('inner', 'none')}
    return {name: float(np.mean([run_arm(world, AGENTS, replace(base, reward_transform=t), target,
                                         s, updates, noise, reward).share for s in seeds]))
            for name, (reward, t) in arms.items()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seeds', type=int, default=None, help='seeds (default 24; 4 --quick)')
    parser.add_argument('--samples', type=int, default=20_000)
    parser.add_argument('--updates', type=int, default=8, help='updates per run (the demo: 8)')
    parser.add_argument('--noise', type=float, default=1.5, help='reward noise (std)')
    parser.add_argument('--tails', action='store_true', help='also compare reward transforms')
    parser.add_argument('--quick', action='store_true', help='4 seeds and 8,000 samples')
    args = parser.parse_args(argv)
    seeds = list(range(args.seeds or (4 if args.quick else 24)))
    samples = 8_000 if args.quick else args.samples
    base = ConsoleConfig(update_interval=30, probe_size=48, lr_memory=1.0, lr_theta=1.0,
                         repeat_penalty=0.0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(os.path.join(tmp, 'world'), samples)
        results = evaluate(world, seeds, args.updates, args.noise, base)
        extra = tails(world, seeds, args.updates, args.noise, base) if args.tails else None
    print(f'{len(seeds)} seeds, {samples:,} samples, {args.updates} updates of '
          f'{base.probe_size} probes, reward noise {args.noise}; kept share of the target '
          f'(± standard error), KL of the kept domain mix from the data\'s')
    print(f'{"arm":<22}' + ''.join(f'{"world " + w:>22}' for w in results))
    for arm in ARMS:
        cells = [f'{r[arm]["share"]:.3f}±{r[arm]["se"]:.3f} kl {r[arm]["kl"]:.3f}'
                 for r in results.values()]
        print(f'{arm:<22}' + ''.join(f'{c:>22}' for c in cells))
    if extra is not None:
        print('heavy-tailed influence, world a, MADS (evidence rule): kept share of the target')
        for name, share in extra.items():
            print(f'  {name:<24}{share:.3f}')
    print(f'({time.perf_counter() - start:.0f} s)')
    paper = summary(results, 'paper')
    print(f'paper rule: mads/best-single (a) {paper["a"]:.2f} (b) {paper["b"]:.2f}; '
          f'uninformative drift (c) {paper["c"]:.3f}')
    print('per-run drift (c), the mean of each run\'s KL: '
          + ', '.join(f'{r} rule {results["c"][f"mads-{r}"]["kl_run"]:.3f}' for r in RULES))
    same = summary(results, 'evidence', same_rule=True)
    print(f'evidence rule over its own best single agent: (a) {same["a"]:.2f} (b) {same["b"]:.2f}')
    s, se = summary(results, 'evidence'), ratio_errors(results, 'evidence')
    print(f'standard errors of the ratios: (a) {se["a"]:.2f} (b) {se["b"]:.2f}')
    print(f'collaboration: mads/best-single (a) {s["a"]:.2f} (b) {s["b"]:.2f}; '
          f'uninformative drift (c) {s["c"]:.2f}')


if __name__ == '__main__':
    main()
