"""Turning MDS token samples into causal-LM batches."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

__all__ = ['TokenCollator', 'IGNORE_INDEX']

IGNORE_INDEX = -100
"""Label of tokens left out of the loss (padding, prompts): PyTorch's and Hugging Face's default."""


class TokenCollator:
    """Collate ``{'tokens': int array}`` samples into ``input_ids``/``labels``/``attention_mask``.

    Fixed-length samples (``mads convert``'s concatenate-and-chunk output) stack directly;
    shorter ones are right-padded with ``pad_id`` and their padding is masked and labelled
    :data:`IGNORE_INDEX` (-100), so the same collator serves training, probes and the reference set.

    Args:
        column (str): Sample column holding token ids. Defaults to ``'tokens'``.
        pad_id (int): Token id used for padding. Defaults to ``0``.
    """

    def __init__(self, column: str = 'tokens', pad_id: int = 0) -> None:
        self.column = column
        self.pad_id = pad_id

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        try:
            seqs = [np.asarray(s[self.column], np.int64) for s in samples]
        except KeyError as err:
            raise KeyError(f'Samples have no {self.column!r} column (they have '
                           f'{sorted(samples[0])}): set the collator\'s `column`.') from err
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.from_numpy(s)
            mask[i, :len(s)] = 1
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {'input_ids': ids, 'attention_mask': mask, 'labels': labels}
