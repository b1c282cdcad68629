"""Turning MDS samples (token ids, or text tokenised on the fly) into causal-LM batches.

The collators of every data loader the package builds (``streaming_mads.run.loader``, shared by
``mads train`` and the llm-foundry ``mads`` loader), of the console's probes and of the reference
set, so that all of them cut, pad and mask a sample the same way. See docs/configuration.md
("Data loaders").
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ['TokenCollator', 'TextCollator', 'count_tokens', 'tokenizer_pad_id', 'IGNORE_INDEX']

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
        max_seq_len (int, optional): Each sample is first cut to this many tokens (the model's
            context); ``None`` keeps whole samples.
    """

    def __init__(self, column: str = 'tokens', pad_id: int = 0,
                 max_seq_len: Optional[int] = None) -> None:
        self.column = column
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        try:
            seqs = [np.asarray(s[self.column], np.int64)[:self.max_seq_len] for s in samples]
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


class TextCollator:
    """Tokenise a text column, then collate like :class:`TokenCollator`.

    Each text is tokenised on its own, cut to ``max_seq_len`` and right-padded with ``pad_id``;
    padding is masked and labelled -100. Two kinds of tokenizer are accepted:

    * a ``transformers`` tokenizer (what llm-foundry passes): called on the texts with its own
      special tokens and, given ``max_seq_len``, its own truncation;
    * a :class:`streaming_mads.tokenizer.Tokenizer` (what ``mads train`` loads): a text becomes
      its ids then EOS, as ``mads convert --mode tokens`` encodes a document.

    Args:
        tokenizer: The tokenizer (see above).
        max_seq_len (int, optional): Truncation length; ``None`` keeps whole texts.
        column (str): Sample column holding the text. Defaults to ``'text'``.
        pad_id (int, optional): Padding id. Defaults to :func:`tokenizer_pad_id`.
    """

    def __init__(self, tokenizer: Any, max_seq_len: Optional[int] = None, column: str = 'text',
                 pad_id: Optional[int] = None) -> None:
        if tokenizer is None:
            raise ValueError(f'The MDS samples hold text in {column!r}: tokenising it needs a '
                             f'tokenizer.')
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.column = column
        self.collate = TokenCollator('tokens', tokenizer_pad_id(tokenizer) if pad_id is None
                                     else pad_id, max_seq_len)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        try:
            texts = [s[self.column] for s in samples]
        except KeyError as err:
            raise KeyError(f'Samples have no {self.column!r} column (they have '
                           f'{sorted(samples[0])}).') from err
        return self.collate([{'tokens': ids} for ids in self._encode(texts)])

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        from streaming_mads.tokenizer import Tokenizer
        if isinstance(self.tokenizer, Tokenizer):
            eos = self.tokenizer.eos_id
            return [np.append(ids, eos) for ids in self.tokenizer.encode_batch(texts)]
        kwargs: dict[str, Any] = {}
        if self.max_seq_len is not None:
            kwargs = {'truncation': True, 'max_length': self.max_seq_len}
        return [np.asarray(ids, np.int64) for ids in self.tokenizer(texts, **kwargs)['input_ids']]


def tokenizer_pad_id(tokenizer: Any) -> int:
    """Padding id of a tokenizer: its pad id, else its EOS id, else ``0`` (padding is masked and
    never learned from, so any id will do; a real one keeps the batch readable)."""
    for attr in ('pad_token_id', 'eos_token_id', 'eos_id'):
        value = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(value, int):
            return value
    return 0


def count_tokens(batch: Any) -> Union[int, dict[str, int]]:
    """Composer token count of a collated batch: non-padding and loss-generating tokens.

    Matches llm-foundry's ``get_tokens_per_batch_func`` for decoder-only batches: ``total`` is the
    attention mask's sum and ``loss_generating`` the shifted labels that are not -100.
    """
    if not isinstance(batch, Mapping) or 'input_ids' not in batch:
        raise ValueError('count_tokens needs a dict batch with `input_ids`.')
    mask = batch.get('attention_mask')
    total = int(mask.sum().item()) if mask is not None else int(batch['input_ids'].numel())
    labels = batch.get('labels')
    if labels is None:
        return total
    return {'total': total, 'loss_generating': int((labels[:, 1:] != IGNORE_INDEX).sum().item())}
