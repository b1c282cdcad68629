"""Synthetic labelled MDS corpora for benchmarks (real MDSWriter shards, real sidecar labels)."""

from __future__ import annotations

import numpy as np
from streaming import MDSWriter

from streaming_mads import categorical, score, write_labels


def build_token_corpus(out: str, samples: int, seq_len: int, vocab: int = 50000,
                       seed: int = 0) -> str:
    """Random token samples with 7 domains, a 0-5 quality score and 13 topics."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    with MDSWriter(out=out, columns={'tokens': f'ndarray:{np.dtype(dtype).name}'},
                   compression='zstd', size_limit=1 << 24) as writer:
        for _ in range(samples):
            writer.write({'tokens': rng.integers(0, vocab, seq_len, dtype=dtype)})
    write_labels(out, {
        'domain': categorical(rng.integers(0, 7, samples), [f'd{i}' for i in range(7)]),
        'quality': score(rng.uniform(0, 5, samples)),
        'topic': categorical(rng.integers(0, 13, samples), [f't{i:02d}' for i in range(13)]),
    })
    return out
