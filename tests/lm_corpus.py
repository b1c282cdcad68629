"""A tiny token corpus with a planted signal, and Composer runs over it (shared by tests)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from streaming import MDSWriter

from streaming_mads.labels import categorical, score, write_labels

VOCAB, SEQ = 32, 16
DOMAINS = ('ref', 'noise', 'other')


def pattern(rng: np.random.Generator) -> np.ndarray:
    """The reference distribution: arithmetic progressions mod VOCAB."""
    return (rng.integers(0, VOCAB) + np.arange(SEQ) * rng.integers(1, 4)) % VOCAB


def sample(domain: int, rng: np.random.Generator) -> np.ndarray:
    if domain == 0:
        return pattern(rng)
    if domain == 1:
        return rng.integers(0, VOCAB, SEQ)
    return np.repeat(rng.integers(0, VOCAB, SEQ // 4), 4)  # 'other': repeated tokens


def write_corpus(out: str, n: int = 1200, seed: int = 0, size_limit: int = 1 << 14,
                 ids: bool = False) -> str:
    """MDS token samples; domain 'ref' matches the reference set, 'noise' is uniform noise.

    With ``ids``, each sample also holds its index (column ``id``).
    """
    rng = np.random.default_rng(seed)
    domains = rng.integers(0, 3, n)
    columns = {'tokens': 'ndarray:int32', **({'id': 'int'} if ids else {})}
    with MDSWriter(out=out, columns=columns, compression='zstd', size_limit=size_limit) as w:
        for i, d in enumerate(domains):
            w.write({'tokens': sample(int(d), rng).astype(np.int32), **({'id': i} if ids else {})})
    quality = np.choose(domains, [4.5, 0.5, 2.5]) + rng.uniform(-0.4, 0.4, n)
    topic = rng.integers(0, 3, n)
    # A similarity percentile as `mads label --reference` writes: highest for the 'ref' domain.
    similarity = np.clip(np.choose(domains, [0.85, 0.3, 0.5]) + rng.uniform(-0.15, 0.15, n), 0, 1)
    write_labels(out, {'domain': categorical(domains, DOMAINS), 'quality': score(quality),
                       'topic': categorical(topic, ['a', 'b', 'c']),
                       'similarity': score(similarity)})
    return out


def write_reference(out: str, n: int = 64, seed: int = 1) -> str:
    rng = np.random.default_rng(seed)
    with MDSWriter(out=out, columns={'tokens': 'ndarray:int32'}, compression='zstd') as w:
        for _ in range(n):
            w.write({'tokens': pattern(rng).astype(np.int32)})
    return out


def make_trainer(data: str, reference: str, *, max_duration: str = '48ba', seed: int = 17,
                 console: Optional[dict] = None, num_workers: int = 0,
                 dataset: Optional[dict] = None, loader: Optional[dict] = None,
                 **trainer_kwargs: Any):
    """A real Composer Trainer: tiny GPT-2, MADSDataset, AgentConsole."""
    import torch
    from composer import Trainer
    from composer.utils import reproducibility
    from torch.utils.data import DataLoader

    from streaming_mads.algorithms import AgentConsole
    from streaming_mads import MADSDataset
    from streaming_mads.collate import TokenCollator
    from streaming_mads.models import build_causal_lm

    reproducibility.seed_all(seed)
    ds = MADSDataset(local=data, batch_size=8, **{'shuffle': True, 'shuffle_seed': seed,
                                                  'pool_ratio': 2, 'temperature': 0.5,
                                                  **(dataset or {})})
    dataloader = DataLoader(ds, **{'batch_size': 8, 'num_workers': num_workers,
                                   'collate_fn': TokenCollator(), **(loader or {})})
    model = build_causal_lm(VOCAB, SEQ, 'tiny', seed=seed, n_embd=32)  # Dropout on.
    algo = AgentConsole(reference=reference, **{'update_interval': 6, 'probe_size': 48,
                                                'reference_size': 32, 'lr_memory': 1.0,
                                                **(console or {})})
    return Trainer(model=model, train_dataloader=dataloader, max_duration=max_duration,
                   optimizers=torch.optim.AdamW(model.parameters(), lr=3e-3), algorithms=[algo],
                   seed=seed, device='cpu', progress_bar=False, log_to_console=False,
                   **trainer_kwargs), algo, ds
