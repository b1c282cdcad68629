"""Tokenisers for ``mads convert`` and for decoding tokenised samples in ``mads label``.

Three kinds, all local (nothing is ever downloaded from a hub):

* ``bytes``: UTF-8 bytes are the tokens (ids 0-255) and 256 is EOS. Needs no file, never fails on
  any text, and is the default because it makes a dataset readable with no other artefact.
* ``tokenizers``: a Hugging Face ``tokenizers`` JSON file (``tokenizer.json``), given as a path or
  trained on the input on the spot (byte-level BPE, see :func:`train_bpe`).
* ``transformers``: a local directory a ``transformers`` ``AutoTokenizer`` loads
  (``local_files_only=True``).

Whatever the kind, ``mads convert`` saves the tokeniser beside its output (``<out>/tokenizer/``) and
records it in ``<out>/mads_convert.json``, so that training and labelling decode with exactly the
tokeniser that encoded the shards. Every record carries the tokeniser's identity,
:func:`tokenizer_fingerprint` (a short hash of its vocabulary), which ``mads label`` also writes in
its label manifest and the checks before training compare (docs/architecture.md, "Tokenizers"). ``tokenizers`` and ``transformers`` tokenisers are saved as a
Hugging Face tokenizer directory, which ``transformers.AutoTokenizer.from_pretrained`` (and so
llm-foundry's ``tokenizer.name``) loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from numpy.typing import NDArray

from streaming_mads.remote import contained_path

__all__ = [
    'TokenizerError', 'Tokenizer', 'ByteTokenizer', 'TokenizersTokenizer', 'TransformersTokenizer',
    'load_tokenizer', 'train_bpe', 'tokenizer_from_record', 'token_dtype', 'TOKENIZER_DIRNAME',
    'DEFAULT_EOS_TOKEN', 'tokenizer_fingerprint', 'tokenizer_identity'
]

TOKENIZER_DIRNAME = 'tokenizer'
DEFAULT_EOS_TOKEN = '<|endoftext|>'
# Tried in order when a tokenizer file does not say which token ends a document.
_EOS_CANDIDATES = ('<|endoftext|>', '</s>', '<eos>', '<|end_of_text|>', '[SEP]', '<|im_end|>')


class TokenizerError(ValueError):
    """A tokeniser could not be loaded, trained or used."""


def token_dtype(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds every token id (``uint16`` up to 65536 ids)."""
    return 'uint16' if vocab_size <= 1 << 16 else 'uint32'


def tokenizer_fingerprint(tok: 'Tokenizer') -> str:
    """The identity of a tokeniser: a short SHA-256 of its vocabulary (every token and its id).

    Why the vocabulary: two tokenisers whose ids mean the same text have the same token -> id map,
    whatever file format saved them (``tokenizer.json`` or a ``transformers`` directory), while two
    BPEs of the same size trained on different text do not. The byte tokenizer has a fixed one.

    Args:
        tok (Tokenizer): A loaded tokeniser.

    Returns:
        str: 16 hex digits.
    """
    if tok.kind == ByteTokenizer.kind:
        payload = b'bytes:257'
    else:
        inner = getattr(tok, 'tok')
        try:
            vocab = inner.get_vocab(with_added_tokens=True)
        except TypeError:  # transformers tokenizers include added tokens already.
            vocab = inner.get_vocab()
        payload = json.dumps(sorted(vocab.items())).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def tokenizer_identity(tok: 'Tokenizer') -> dict[str, Any]:
    """What identifies a tokeniser in a record (``mads_convert.json``, a label manifest): its
    ``kind``, ``vocab_size``, ``eos_id`` and :func:`tokenizer_fingerprint`.

    Args:
        tok (Tokenizer): A loaded tokeniser.

    Returns:
        dict[str, Any]: The four keys.
    """
    return {'kind': tok.kind, 'vocab_size': int(tok.vocab_size), 'eos_id': int(tok.eos_id),
            'fingerprint': tok.fingerprint}


class Tokenizer(ABC):
    """What convert and label need of a tokeniser: batch encode, decode, EOS, save.

    Attributes:
        kind (str): ``'bytes'``, ``'tokenizers'`` or ``'transformers'``.
        vocab_size (int): Number of token ids (every id is below it).
        eos_id (int): Id appended after each document when concatenating.
    """

    kind: str = ''
    vocab_size: int
    eos_id: int
    _fingerprint: Optional[str] = None

    @property
    def fingerprint(self) -> str:
        """This tokeniser's :func:`tokenizer_fingerprint` (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = tokenizer_fingerprint(self)
        return self._fingerprint

    def check_ids(self, ids: NDArray) -> None:
        """Refuse ids outside ``[0, vocab_size)``: they were made by another tokeniser, and
        decoding would drop or garble them without a word.

        Raises:
            TokenizerError: Naming the id and the vocabulary size.
        """
        ids = np.asarray(ids)
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= self.vocab_size else int(ids.min())
            raise TokenizerError(f'token id {bad} is outside the {self.kind} tokenizer\'s '
                                 f'{self.vocab_size} ids (0-{self.vocab_size - 1}): the ids were '
                                 'made by another tokenizer')

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[NDArray[np.int64]]:
        """Token ids of each text, without special tokens."""

    def decode_batch(self, ids: Sequence[NDArray]) -> list[str]:
        """Text of each id sequence, special tokens dropped; ids outside the vocabulary are
        refused (:meth:`check_ids`), never skipped."""
        for seq in ids:
            self.check_ids(seq)
        return self._decode(ids)

    @abstractmethod
    def _decode(self, ids: Sequence[NDArray]) -> list[str]:
        """Text of each id sequence (all ids in the vocabulary), special tokens dropped."""

    def decode_segments(self, ids: NDArray) -> list[str]:
        """Split ``ids`` at EOS and decode each piece (the documents a fixed-length chunk spans).

        Empty pieces (EOS at either end) are dropped; a chunk with no text gives ``['']``. Ids
        outside the vocabulary are refused (:meth:`check_ids`).
        """
        ids = np.asarray(ids)
        cuts = np.flatnonzero(ids == self.eos_id)
        pieces = [p for p in np.split(ids, cuts) if len(p)]
        pieces = [p[1:] if p[0] == self.eos_id else p for p in pieces]
        pieces = [p for p in pieces if len(p)]
        return self.decode_batch(pieces) if pieces else ['']

    @abstractmethod
    def save(self, directory: str) -> dict[str, Any]:
        """Save into ``directory`` and return the record that :func:`tokenizer_from_record` reads.

        Paths in the record are relative to ``directory``'s parent, so a dataset stays relocatable.
        """


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0-255 are bytes, 256 is EOS."""

    kind = 'bytes'

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eos_id = 256

    def encode_batch(self, texts: Sequence[str]) -> list[NDArray[np.int64]]:
        return [np.frombuffer(t.encode('utf-8'), np.uint8).astype(np.int64) for t in texts]

    def _decode(self, ids: Sequence[NDArray]) -> list[str]:
        out = []
        for seq in ids:
            seq = np.asarray(seq)
            out.append(seq[seq < 256].astype(np.uint8).tobytes().decode('utf-8', errors='replace'))
        return out

    def save(self, directory: str) -> dict[str, Any]:
        return tokenizer_identity(self)


def _find_eos(vocab: dict[str, int], eos_token: Optional[str], where: str) -> int:
    if eos_token is not None:
        if eos_token not in vocab:
            raise TokenizerError(f'EOS token {eos_token!r} is not in the vocabulary of {where}: '
                                 'pass one of its special tokens as --eos-token.')
        return vocab[eos_token]
    for cand in _EOS_CANDIDATES:
        if cand in vocab:
            return vocab[cand]
    raise TokenizerError(f'Cannot tell which token of {where} ends a document (none of '
                         f'{", ".join(_EOS_CANDIDATES)}): pass it as --eos-token.')


class TokenizersTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` (one ``tokenizer.json``).

    Args:
        tokenizer (tokenizers.Tokenizer): The loaded tokeniser.
        eos_token (str, optional): Token that ends a document; guessed from common names if
            ``None``.
        where (str): How to name it in errors.
    """

    kind = 'tokenizers'

    def __init__(self, tokenizer: Any, eos_token: Optional[str] = None, where: str = 'tokenizer') -> None:
        self.tok = tokenizer
        # Whole documents are encoded and then chunked by us: a file's own padding or truncation
        # (e.g. a sentence-embedding tokenizer padded to 128) would corrupt the stream.
        self.tok.no_padding()
        self.tok.no_truncation()
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        self.eos_id = _find_eos(tokenizer.get_vocab(with_added_tokens=True), eos_token, where)
        self.eos_token = tokenizer.id_to_token(self.eos_id)

    @classmethod
    def from_file(cls, path: str, eos_token: Optional[str] = None) -> 'TokenizersTokenizer':
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON.
            raise TokenizerError(f'Could not load tokenizer file {path}: {err}.') from err
        return cls(tok, eos_token, path)

    def encode_batch(self, texts: Sequence[str]) -> list[NDArray[np.int64]]:
        encs = self.tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int64) for e in encs]

    def _decode(self, ids: Sequence[NDArray]) -> list[str]:
        return self.tok.decode_batch([np.asarray(s).tolist() for s in ids], skip_special_tokens=True)

    def save(self, directory: str) -> dict[str, Any]:
        """Save ``tokenizer.json`` plus the Hugging Face files beside it (see
        :func:`_save_transformers_config`), so other tools load the directory too."""
        os.makedirs(directory, exist_ok=True)
        files = _save_transformers_config(self.tok, self.eos_token, directory)
        # Written after save_pretrained (which writes its own copy): the exact bytes as before.
        with open(os.path.join(directory, 'tokenizer.json'), 'w', encoding='utf-8') as f:
            f.write(self.tok.to_str())
        rel = os.path.basename(os.path.normpath(directory))
        return {**tokenizer_identity(self), 'path': f'{rel}/tokenizer.json',
                'files': sorted({'tokenizer.json', *files}), 'eos_token': self.eos_token}


def _save_transformers_config(tok: Any, eos_token: str, directory: str) -> list[str]:
    """Write ``tokenizer_config.json`` (and ``special_tokens_map.json``) for ``tok`` into
    ``directory``; returns the file names written.

    Why: a bare ``tokenizer.json`` is not a Hugging Face tokenizer directory, so
    ``transformers.AutoTokenizer`` (and llm-foundry's ``tokenizer.name``) refuse it with "Should
    have a model_type key". The config names ``PreTrainedTokenizerFast`` and the EOS token, and
    turns off ``clean_up_tokenization_spaces`` so decoding gives back the encoded text exactly.
    """
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos_token,
                                   clean_up_tokenization_spaces=False)
    written = fast.save_pretrained(directory, legacy_format=False)
    return sorted(os.path.relpath(f, directory) for f in written if os.path.isfile(f))


class TransformersTokenizer(Tokenizer):
    """A local ``transformers`` tokeniser directory, loaded with ``local_files_only=True``.

    Args:
        path (str): Directory holding ``tokenizer_config.json`` and the tokeniser's files.
        eos_token (str, optional): Token that ends a document; the tokeniser's ``eos_token`` if
            ``None``.
    """

    kind = 'transformers'

    def __init__(self, path: str, eos_token: Optional[str] = None) -> None:
        try:
            from transformers import AutoTokenizer
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:
            raise TokenizerError(f'Could not load a transformers tokenizer from {path}: {err}.') from err
        self.tok.model_max_length = 1 << 62  # Whole documents are encoded, then chunked by us.
        vocab = self.tok.get_vocab()
        self.vocab_size = max(len(self.tok), max(vocab.values()) + 1)
        eos = eos_token if eos_token is not None else self.tok.eos_token
        self.eos_id = _find_eos(vocab, eos, path)
        self.eos_token = self.tok.convert_ids_to_tokens(self.eos_id)

    def encode_batch(self, texts: Sequence[str]) -> list[NDArray[np.int64]]:
        ids = self.tok(list(texts), add_special_tokens=False)['input_ids']
        return [np.asarray(i, np.int64) for i in ids]

    def _decode(self, ids: Sequence[NDArray]) -> list[str]:
        return self.tok.batch_decode([np.asarray(s).tolist() for s in ids], skip_special_tokens=True)

    def save(self, directory: str) -> dict[str, Any]:
        files = [f for f in self.tok.save_pretrained(directory) if os.path.isfile(f)]
        rel = os.path.basename(os.path.normpath(directory))
        return {**tokenizer_identity(self), 'path': rel,
                'files': sorted(os.path.relpath(f, directory) for f in files),
                'eos_token': self.eos_token}


def load_tokenizer(spec: str, eos_token: Optional[str] = None) -> Tokenizer:
    """Load a tokeniser from ``spec``: ``'bytes'``, a ``tokenizer.json`` path or a directory.

    A directory with ``tokenizer_config.json`` is loaded with ``transformers``; one with only
    ``tokenizer.json`` with ``tokenizers``.

    Args:
        spec (str): ``'bytes'`` or a local path.
        eos_token (str, optional): Token that ends a document, if the tokeniser does not say.
    """
    if spec == 'bytes':
        return ByteTokenizer()
    if not os.path.exists(spec):
        raise TokenizerError(f'Tokenizer {spec!r} not found: give a local tokenizer.json or '
                             'tokenizer directory, "bytes", or "train" (convert only). Nothing is '
                             'downloaded from a model hub.')
    if os.path.isfile(spec):
        return TokenizersTokenizer.from_file(spec, eos_token)
    if os.path.isfile(os.path.join(spec, 'tokenizer_config.json')):
        return TransformersTokenizer(spec, eos_token)
    if os.path.isfile(os.path.join(spec, 'tokenizer.json')):
        return TokenizersTokenizer.from_file(os.path.join(spec, 'tokenizer.json'), eos_token)
    raise TokenizerError(f'Directory {spec} holds neither tokenizer_config.json (transformers) '
                         'nor tokenizer.json (tokenizers).')


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
              eos_token: str = DEFAULT_EOS_TOKEN) -> TokenizersTokenizer:
    """Train a byte-level BPE tokeniser on ``texts`` (GPT-2 style: any text is encodable).

    Training is deterministic for the same texts in the same order, so re-running ``mads convert``
    gives the same tokeniser and the same shards.

    Args:
        texts (Iterable[str]): Training documents.
        vocab_size (int): Target vocabulary size, including the 256 byte symbols and EOS.
            Defaults to ``8192``.
        min_frequency (int): Minimum pair count for a merge. Defaults to ``2``.
        eos_token (str): The one special token, appended after each document. Defaults to
            ``'<|endoftext|>'``.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    if vocab_size < 258:
        raise TokenizerError(f'--vocab-size {vocab_size} is too small for byte-level BPE: use at '
                             'least 258 (256 bytes, EOS, one merge).')
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return TokenizersTokenizer(tok, eos_token, 'the trained BPE tokenizer')


def tokenizer_from_record(record: dict[str, Any], base_dir: str) -> Tokenizer:
    """Load the tokeniser a ``mads_convert.json`` record describes, relative to ``base_dir``.

    A record with a ``fingerprint`` (every one written since fingerprints exist) must match the
    tokeniser found: a tokenizer directory replaced by another of the same EOS is refused.
    """
    kind = record.get('kind')
    if kind == 'bytes':
        return ByteTokenizer()
    if kind not in ('tokenizers', 'transformers'):
        raise TokenizerError(f'Unknown tokenizer kind {kind!r} in {base_dir}/mads_convert.json.')
    path = contained_path(base_dir, record.get('path'),
                          f'the tokenizer path in {base_dir}/mads_convert.json', TokenizerError)
    if not os.path.exists(path):
        raise TokenizerError(f'The tokenizer that encoded this dataset is missing ({path}): '
                             'restore it or pass --tokenizer.')
    tok = (TokenizersTokenizer.from_file(path, record.get('eos_token')) if kind == 'tokenizers' else
           TransformersTokenizer(path, record.get('eos_token')))
    if tok.eos_id != record.get('eos_id', tok.eos_id):
        raise TokenizerError(f'Tokenizer at {path} has EOS id {tok.eos_id}, but the dataset was '
                             f'written with {record["eos_id"]}: it is not the same tokenizer.')
    if tok.fingerprint != record.get('fingerprint', tok.fingerprint):
        raise TokenizerError(f'Tokenizer at {path} has vocabulary fingerprint {tok.fingerprint}, '
                             f'but {base_dir}/mads_convert.json records {record["fingerprint"]}: '
                             'it is not the tokenizer that encoded the dataset; restore that one.')
    return tok

