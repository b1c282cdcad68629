"""Turning MDS samples (token ids, legacy token bytes, or text tokenised on the fly) into
causal-LM batches.

The collators of every data loader the package builds (``streaming_mads.run.loader``, shared by
``mads train`` and the llm-foundry ``mads`` loader), of the console's probes and of the reference
set, so that all of them cut, pad and mask a sample the same way. See docs/configuration.md
("Data loaders").
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch

from streaming_mads.mds_formats import SampleDecoder

__all__ = ['TokenCollator', 'TextCollator', 'count_tokens', 'tokenizer_pad_id', 'IGNORE_INDEX']

IGNORE_INDEX = -100
"""Label of tokens left out of the loss (padding, prompts): PyTorch's and Hugging Face's default."""


class TokenCollator:
    """Collate MDS samples into ``input_ids``/``labels``/``attention_mask``.

    Each sample may be in any of llm-foundry's three formats (``tokens`` ids, legacy ``tokens``
    bytes, ``text``), turned into ids by the one :class:`~streaming_mads.mds_formats.SampleDecoder`
    (docs/bring-your-own-mds.md). Fixed-length samples (``mads convert``'s concatenate-and-chunk
    output) stack directly; shorter ones are right-padded with ``pad_id`` and their padding is
    masked and labelled :data:`IGNORE_INDEX` (-100), so the same collator serves training, probes
    and the reference set.

    Args:
        column (str): Sample column holding token ids. Defaults to ``'tokens'``.
        pad_id (int, optional): Token id used for padding. Defaults to
            :func:`tokenizer_pad_id` of ``tokenizer`` (``0`` without one).
        max_seq_len (int, optional): Each sample is first cut to this many tokens (the model's
            context); ``None`` keeps whole samples.
        text_column (str): Sample column holding text, read when ``column`` is absent. Defaults
            to ``'text'``.
        tokenizer (Any, optional): Tokenizer of text samples (a ``transformers`` tokenizer or a
            :class:`streaming_mads.tokenizer.Tokenizer`); ``None`` refuses text.
        token_encoding_type (str): Dtype of legacy ``bytes`` ids. Defaults to ``'int64'``.
        decoder (SampleDecoder, optional): A decoder built by the caller (naming its settings in
            errors); replaces the four arguments above.
    """

    def __init__(self, column: str = 'tokens', pad_id: Optional[int] = None,
                 max_seq_len: Optional[int] = None, *, text_column: str = 'text',
                 tokenizer: Any = None, token_encoding_type: str = 'int64',
                 decoder: Optional[SampleDecoder] = None) -> None:
        self.decoder = decoder if decoder is not None else SampleDecoder(
            tokenizer, max_seq_len=max_seq_len, tokens_column=column, text_column=text_column,
            token_encoding_type=token_encoding_type)
        self.pad_id = tokenizer_pad_id(self.decoder.tokenizer) if pad_id is None else pad_id

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = self.decoder(samples)
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.from_numpy(s)
            mask[i, :len(s)] = 1
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {'input_ids': ids, 'attention_mask': mask, 'labels': labels}


class TextCollator(TokenCollator):
    """A :class:`TokenCollator` for text samples: the tokenizer is required.

    Each text is tokenised on its own (see :class:`~streaming_mads.mds_formats.SampleDecoder`
    for how each kind of tokenizer is called), cut to ``max_seq_len`` and right-padded.

    Args:
        tokenizer: The tokenizer (or ``None`` with ``decoder``).
        max_seq_len (int, optional): Truncation length; ``None`` keeps whole texts.
        column (str): Sample column holding the text. Defaults to ``'text'``.
        pad_id (int, optional): Padding id. Defaults to :func:`tokenizer_pad_id`.
        decoder (SampleDecoder, optional): A decoder with a tokenizer, built by the caller;
            replaces ``tokenizer``, ``max_seq_len`` and ``column``.
    """

    def __init__(self, tokenizer: Any = None, max_seq_len: Optional[int] = None,
                 column: str = 'text', pad_id: Optional[int] = None, *,
                 decoder: Optional[SampleDecoder] = None) -> None:
        if (decoder.tokenizer if decoder is not None else tokenizer) is None:
            raise ValueError(f'The MDS samples hold text in {column!r}: tokenising it needs a '
                             f'tokenizer.')
        super().__init__(pad_id=pad_id, max_seq_len=max_seq_len, text_column=column,
                         tokenizer=tokenizer, decoder=decoder)


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
