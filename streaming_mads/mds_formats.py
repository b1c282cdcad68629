"""llm-foundry's three MDS sample formats, and the one decoder that turns any of them into ids.

Datasets written for llm-foundry hold each sample in one of three forms, and every reader of
samples here (the training collators of ``mads train``, the Python API and the llm-foundry
``mads`` loader, ``MADSDataset``, ``mads label``, the console's reference set) decodes them
through :class:`SampleDecoder`, so a format means the same everywhere:

* ``text`` (``str``): tokenised on the fly with the configured tokenizer and cut to
  ``max_seq_len``, as llm-foundry's text loader does;
* ``tokens`` (``ndarray:<int dtype>``): the ids, as written (``mads convert`` and llm-foundry's
  newer ``convert_*`` scripts);
* legacy ``tokens`` (``bytes``): the raw bytes of an integer array, decoded with
  ``token_encoding_type`` (llm-foundry's setting of that name; its default, ``int64``, is what
  its old concatenating converter wrote).

docs/bring-your-own-mds.md has the commands; the formats are checked from each stream's
``index.json`` before training or labelling starts (:func:`column_format`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
from numpy.typing import NDArray

from streaming_mads.settings import check_number

__all__ = ['SampleFormatError', 'SampleDecoder', 'TOKEN_ENCODING_TYPES', 'FORMATS',
           'check_token_encoding_type', 'column_format']

#: Dtypes ``token_encoding_type`` may name (llm-foundry's ``SUPPORTED_MDS_ENCODING_TYPES``).
TOKEN_ENCODING_TYPES = ('int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64')

#: The accepted formats, as errors list them.
FORMATS = ("'text' (str, tokenised with the tokenizer)",
           "'tokens' (ndarray of integer ids)",
           "legacy 'tokens' (bytes, decoded with token_encoding_type)")

#: Where to configure a tokenizer, named when text arrives without one.
DEFAULT_TOKENIZER_KEY = ('set tokenizer.name (mads train), the run\'s tokenizer (llm-foundry), or '
                         'give the collator a tokenizer (Python)')


class SampleFormatError(ValueError):
    """Samples are in none of the accepted formats, or cannot be decoded as configured."""


def check_token_encoding_type(value: Any, setting: str = 'token_encoding_type') -> str:
    """``value`` if it names one of :data:`TOKEN_ENCODING_TYPES`, else an error naming ``setting``.

    Args:
        value (Any): The setting's value.
        setting (str): The setting as the user wrote it (YAML key, flag or argument).

    Raises:
        SampleFormatError: Listing the valid dtypes.
    """
    if not isinstance(value, str) or value not in TOKEN_ENCODING_TYPES:
        raise SampleFormatError(f'{setting}={value!r} is not a token dtype: use one of '
                                f'{", ".join(TOKEN_ENCODING_TYPES)} (the dtype the legacy bytes '
                                f'samples were written with; llm-foundry\'s default is int64).')
    return value


def column_format(encodings: Mapping[str, str], tokens_column: str = 'tokens',
                  text_column: str = 'text', *, prefer_text: bool = False,
                  where: str = 'the dataset', hint: str = '') -> tuple[str, str]:
    """Which format a stream's samples have, from its ``index.json`` column encodings.

    Args:
        encodings (Mapping[str, str]): Column name -> MDS encoding (``'str'``, ``'bytes'``,
            ``'ndarray:int32'``...).
        tokens_column (str): Column of token ids. Defaults to ``'tokens'``.
        text_column (str): Column of text. Defaults to ``'text'``.
        prefer_text (bool): With both columns, use the text (labelling reads words) rather than
            the ids (training reads ids). Defaults to ``False``.
        where (str): The stream, named in errors.
        hint (str): How to name other columns (the setting), appended to errors.

    Returns:
        tuple[str, str]: ``('text' | 'tokens' | 'bytes', column)``.

    Raises:
        SampleFormatError: Neither column in an accepted encoding: lists the columns found and
            the three formats.
    """
    enc = str(encodings.get(tokens_column))
    ids = [('bytes' if enc == 'bytes' else 'tokens', tokens_column)] \
        if enc == 'bytes' or enc.startswith('ndarray') else []
    text = [('text', text_column)] if encodings.get(text_column) == 'str' else []
    found = text + ids if prefer_text else ids + text
    if not found:
        cols = ', '.join(f'{k} ({v})' for k, v in encodings.items()) or 'none'
        raise SampleFormatError(f'{where} holds none of the accepted sample formats '
                                f'({"; ".join(FORMATS)}): its columns are {cols}.'
                                f'{" " + hint if hint else ""}')
    return found[0]


class SampleDecoder:
    """Token ids of raw MDS samples in any of the three formats (see the module docstring).

    A sample with the tokens column is read as ids (an array as it is; ``bytes`` with
    ``token_encoding_type``); one with only the text column is tokenised. Text tokenisation
    follows the tokenizer's kind:

    * a ``transformers`` tokenizer (what llm-foundry passes): called on the texts with its own
      special tokens and, given ``max_seq_len``, its own truncation, as llm-foundry's text loader;
    * a :class:`streaming_mads.tokenizer.Tokenizer` (what ``mads train`` loads): a text becomes
      its ids then EOS, as ``mads convert --mode tokens`` encodes a document.

    Args:
        tokenizer (Any, optional): Tokenizer of text samples; ``None`` refuses text.
        max_seq_len (int, optional): Each sample is cut to this many ids; ``None`` keeps all.
        tokens_column (str): Column of token ids. Defaults to ``'tokens'``.
        text_column (str): Column of text. Defaults to ``'text'``.
        token_encoding_type (str): Dtype of legacy ``bytes`` ids (:data:`TOKEN_ENCODING_TYPES`).
            Defaults to ``'int64'``.
        setting (str): How the user sets ``token_encoding_type`` (a YAML key, a flag), named in
            errors. Defaults to ``'token_encoding_type'``.
        tokenizer_key (str): Where to configure a tokenizer, named when text comes without one.
        where (str): The samples' source, named in errors. Defaults to ``'a sample'``.
    """

    def __init__(self, tokenizer: Any = None, *, max_seq_len: Optional[int] = None,
                 tokens_column: str = 'tokens', text_column: str = 'text',
                 token_encoding_type: str = 'int64', setting: str = 'token_encoding_type',
                 tokenizer_key: str = DEFAULT_TOKENIZER_KEY, where: str = 'a sample') -> None:
        self.dtype = np.dtype(check_token_encoding_type(token_encoding_type, setting))
        self.tokenizer = tokenizer
        self.max_seq_len = None if max_seq_len is None else int(
            check_number(max_seq_len, 'max_seq_len', integer=True, low=1))
        self.tokens_column = tokens_column
        self.text_column = text_column
        self.setting = setting
        self.tokenizer_key = tokenizer_key
        self.where = where

    def token_ids(self, value: Any, where: Optional[str] = None) -> NDArray[np.int64]:
        """The ids of one tokens-column value (an integer array, or legacy ``bytes``), uncut.

        Args:
            value (Any): The value.
            where (str, optional): The sample, named in errors (default: the decoder's).

        Raises:
            SampleFormatError: ``bytes`` that are not a whole number of ``token_encoding_type``
                ids, or an array that is not of integers.
        """
        if isinstance(value, (bytes, bytearray, memoryview)):
            size = len(value)
            if size % self.dtype.itemsize:
                raise SampleFormatError(
                    f'{where or self.where} holds {size} bytes in {self.tokens_column!r}, not a '
                    f'whole number of {self.dtype.name} token ids ({self.dtype.itemsize} bytes '
                    f'each): set {self.setting} to the dtype the ids were written with (one of '
                    f'{", ".join(TOKEN_ENCODING_TYPES)}).')
            return np.frombuffer(value, self.dtype).astype(np.int64)
        ids = np.asarray(value).reshape(-1)
        if ids.dtype.kind not in 'iu':
            raise SampleFormatError(f'{where or self.where} holds {ids.dtype} values in '
                                    f'{self.tokens_column!r}, not integer token ids.')
        return ids.astype(np.int64, copy=False)

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> list[NDArray[np.int64]]:
        """The ids of each sample, cut to ``max_seq_len`` (texts are tokenised together).

        Raises:
            SampleFormatError: A sample with neither column (naming the columns it has and the
                accepted formats), text without a tokenizer (naming where to set one), or ids
                :meth:`token_ids` refuses.
        """
        out: list[Optional[NDArray[np.int64]]] = [None] * len(samples)
        texts: list[tuple[int, str]] = []
        for i, sample in enumerate(samples):
            if self.tokens_column in sample:
                out[i] = self.token_ids(sample[self.tokens_column])[:self.max_seq_len]
            elif self.text_column in sample:
                texts.append((i, sample[self.text_column]))
            else:
                raise SampleFormatError(
                    f'{self.where} has neither {self.tokens_column!r} nor {self.text_column!r} '
                    f'(its columns: {", ".join(sorted(sample)) or "none"}); accepted: '
                    f'{"; ".join(FORMATS)}. Name other columns with tokens_column or '
                    f'text_column.')
        if texts:
            for (i, _), ids in zip(texts, self._encode([t for _, t in texts])):
                out[i] = ids
        return out  # type: ignore[return-value]

    def _encode(self, texts: list[str]) -> list[NDArray[np.int64]]:
        from streaming_mads.tokenizer import Tokenizer
        if self.tokenizer is None:
            raise SampleFormatError(f'{self.where} holds text in {self.text_column!r}, and '
                                    f'tokenising it needs a tokenizer: {self.tokenizer_key}.')
        if isinstance(self.tokenizer, Tokenizer):
            eos = self.tokenizer.eos_id
            return [np.append(ids, eos)[:self.max_seq_len]
                    for ids in self.tokenizer.encode_batch(texts)]
        kwargs: dict[str, Any] = {}
        if self.max_seq_len is not None:
            kwargs = {'truncation': True, 'max_length': self.max_seq_len}
        return [np.asarray(ids, np.int64) for ids in self.tokenizer(texts, **kwargs)['input_ids']]
