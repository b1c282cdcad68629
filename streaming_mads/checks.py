"""Checks before training: the training data, the reference, the eval sets and the model agree.

Why before training: a mismatch otherwise shows late or never. Token ids past the model's
embedding raise ``IndexError`` only at the first console update or eval, after the run has
trained for a while; a reference (or eval set) tokenised with another tokenizer whose ids fit the
vocabulary is measured in the wrong token space without any error, so the console steers by
noise. ``mads train`` runs :func:`check_run` when it builds the Trainer and ``AgentConsole`` runs
it again at ``FIT_START`` (Python users build Trainers themselves).

What is compared is what ``mads convert`` recorded in ``mads_convert.json`` beside each dataset
(:func:`convert_info`, which fetches the record of a remote stream with its index): the tokenizer's
kind, size, EOS id and a fingerprint of its vocabulary (the token -> id map, so the same tokenizer
saved in another file format still matches). Datasets without a record are not compared; the
reference samples themselves are always checked against the model's vocabulary. The record itself
is :mod:`streaming_mads.convert_record`'s; docs/architecture.md has the long form.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from streaming_mads.convert_record import (CONVERT_INFO_NAME, ConvertError, fetch_convert_info,
                                           find_convert_info)
from streaming_mads.remote import join_path, parent_path

__all__ = ['TokenizerMismatchError', 'TokenizerInfo', 'convert_info', 'stream_convert_info',
           'tokenizer_info', 'spec_tokenizer_info', 'model_vocab_size', 'check_tokenizers', 'check_token_ids',
           'check_run', 'dataset_streams', 'REMOTE_CONVERT_DIRNAME']

#: Where a remote stream's ``mads_convert.json`` (and its tokenizer) is cached, inside the
#: stream's local split directory, so it never lands outside what the user gave as ``local``.
REMOTE_CONVERT_DIRNAME = '.mads_convert'


class TokenizerMismatchError(ValueError):
    """Datasets of one run were tokenised differently, or beyond the model's vocabulary."""


# ----------------------------------------------------------------------------------------------
# Finding the mads_convert.json of a stream (local, or fetched from its remote).


@functools.lru_cache(maxsize=64)
def _remote_convert_info(remote: str, local: str) -> Optional[tuple[str, dict[str, Any]]]:
    """Once per process: the remote split dir's record, else its parent's (``--layout streams``)."""
    name = remote.rstrip('/').rsplit('/', 1)[-1]
    for level, remote_root in (('split', remote), ('parent', parent_path(remote))):
        mirror = os.path.join(local, REMOTE_CONVERT_DIRNAME, level)
        info = fetch_convert_info(remote_root, mirror)  # Not fresh: ranks of a node share it.
        # A parent's record counts only if it lists this stream (not some other dataset's).
        if info is not None and (level == 'split' or
                                 name in [s.get('path') for s in info.get('streams', [])]):
            return mirror, info
    return None


def stream_convert_info(local: Optional[str], remote: Optional[str] = None,
                        split: Optional[str] = None) -> Optional[tuple[str, dict[str, Any]]]:
    """The ``mads_convert.json`` of one stream: ``(root its paths are relative to, record)``.

    A remote stream's record is fetched (with its tokenizer) from the remote split directory or
    its parent into ``<local>/<split>/.mads_convert/``: the remote is the source of truth, and
    the local cache may not hold it (Streaming downloads only the index and shards). A local
    stream's is looked for in its directory and its parent.

    Args:
        local (str, optional): The stream's local directory (a temporary one if ``None``).
        remote (str, optional): The stream's remote directory.
        split (str, optional): The stream's split.
    """
    if remote:
        local_split = os.path.join(local or tempfile.mkdtemp(prefix='mads_convert_'), split or '')
        found = _remote_convert_info(join_path(remote, split or ''),
                                     os.path.abspath(local_split))
        if found is not None:
            return found
    if not local:
        return None
    return find_convert_info([os.path.join(local, split or '')])


def convert_info(streams: Iterable[Any]) -> Optional[tuple[str, dict[str, Any]]]:
    """The first ``mads_convert.json`` record of Streaming ``Stream`` objects (see above)."""
    for stream in streams:
        found = stream_convert_info(getattr(stream, 'local', None), getattr(stream, 'remote', None),
                                    getattr(stream, 'split', None))
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------------------------------------
# Describing and comparing tokenizers.


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer of one dataset of the run.

    Args:
        where (str): Which dataset, as the user named it (``'training data'``, ``'reference'``...).
        source (str): Where the tokenizer was recorded or loaded from.
        kind (str): ``bytes``, ``tokenizers`` or ``transformers``.
        vocab_size (int): Ids the tokenizer can produce.
        eos_id (int, optional): Its end-of-document id.
        fingerprint (str, optional): SHA-256 of its vocabulary; ``None`` if it could not be loaded.
    """
    where: str
    source: str
    kind: str
    vocab_size: int
    eos_id: Optional[int]
    fingerprint: Optional[str]

    def describe(self) -> str:
        return f'a {self.kind} tokenizer of {self.vocab_size} ids ({self.source})'

    def same_as(self, other: 'TokenizerInfo') -> bool:
        if self.fingerprint is not None and other.fingerprint is not None:
            return self.fingerprint == other.fingerprint and self.eos_id == other.eos_id
        return (self.kind == 'bytes') == (other.kind == 'bytes') and \
            self.vocab_size == other.vocab_size and self.eos_id == other.eos_id


def _fingerprint(tok: Any) -> Optional[str]:
    """SHA-256 of a loaded tokenizer's token -> id map (format-independent identity)."""
    if tok.kind == 'bytes':
        return hashlib.sha256(b'bytes:257').hexdigest()
    inner = getattr(tok, 'tok', None)
    try:
        vocab = inner.get_vocab(with_added_tokens=True)
    except TypeError:  # transformers tokenizers include added tokens already.
        vocab = inner.get_vocab()
    except AttributeError:
        return None
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()


def tokenizer_info(found: Optional[tuple[str, dict[str, Any]]], where: str) -> Optional[TokenizerInfo]:
    """The tokenizer a ``(root, record)`` of :func:`convert_info` names, or ``None``."""
    from streaming_mads.tokenizer import TokenizerError, tokenizer_from_record
    if found is None:
        return None
    root, info = found
    record = info.get('tokenizer') or {}
    if not record.get('vocab_size'):
        return None
    source = os.path.join(root, record['path']) if record.get('path') else \
        os.path.join(root, CONVERT_INFO_NAME)
    try:
        fingerprint = _fingerprint(tokenizer_from_record(record, root))
    except (TokenizerError, ConvertError, OSError):
        fingerprint = None  # Compared by kind, size and EOS only.
    return TokenizerInfo(where, source, str(record.get('kind')), int(record['vocab_size']),
                         record.get('eos_id'), fingerprint)


def spec_tokenizer_info(spec: str, where: str) -> TokenizerInfo:
    """The tokenizer at ``spec`` (``'bytes'`` or a local path), as :func:`tokenizer_info` gives."""
    from streaming_mads.tokenizer import load_tokenizer
    tok = load_tokenizer(spec)
    return TokenizerInfo(where, spec, tok.kind, int(tok.vocab_size), tok.eos_id, _fingerprint(tok))


def model_vocab_size(model: Any) -> Optional[int]:
    """Rows of the input embedding of a Hugging Face model (wrapped by Composer and DDP or not)."""
    while hasattr(model, 'module') and not hasattr(model, 'get_input_embeddings'):
        model = model.module  # DistributedDataParallel
    for candidate in (model, getattr(model, 'model', None)):
        get = getattr(candidate, 'get_input_embeddings', None)
        emb = get() if callable(get) else None
        if emb is not None and hasattr(emb, 'num_embeddings'):
            return int(emb.num_embeddings)
    return None


def check_tokenizers(infos: Sequence[Optional[TokenizerInfo]], model_vocab: Optional[int]) -> None:
    """Refuse tokenizers that differ from the first known one, or that exceed the model.

    Raises:
        TokenizerMismatchError: Naming both sides and the fix.
    """
    known = [i for i in infos if i is not None]
    for info in known:
        if model_vocab is not None and info.vocab_size > model_vocab:
            raise TokenizerMismatchError(
                f'The {info.where} was tokenised with {info.describe()}, but the model\'s vocabulary '
                f'has only {model_vocab} ids: its token ids would fail at the first console update '
                f'or eval. Set model.vocab_size to at least {info.vocab_size} (mads train reads it '
                'from the training data\'s mads_convert.json when unset).')
    for info in known[1:]:
        if not info.same_as(known[0]):
            raise TokenizerMismatchError(
                f'The {info.where} was tokenised with {info.describe()}, but the {known[0].where} '
                f'with {known[0].describe()}: their token ids mean different text. Re-convert the '
                f'{info.where} with `mads convert --tokenizer {known[0].source}`.')


def check_token_ids(samples: Sequence[dict], model_vocab: Optional[int], where: str,
                    column: str = 'tokens') -> None:
    """Refuse samples whose token ids fall outside ``[0, model_vocab)``."""
    if model_vocab is None:
        return
    arrays = [np.asarray(s[column]) for s in samples if column in s]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        return
    top, low = max(int(a.max()) for a in arrays), min(int(a.min()) for a in arrays)
    if top >= model_vocab or low < 0:
        raise TokenizerMismatchError(
            f'The {where} holds token ids up to {top} (lowest {low}), but the model\'s vocabulary has '
            f'{model_vocab} ids (0-{model_vocab - 1}): it was tokenised with another tokenizer. '
            f'Re-convert it with the training data\'s tokenizer, or set model.vocab_size to at '
            f'least {top + 1}.')


def dataset_streams(dataset: Any) -> list[Any]:
    """The ``Stream`` objects of a built dataset (none for a dataset without streams).

    Not :func:`streaming_mads.run.loader.streams_from_config`: this reads a dataset already built, that
    builds streams from a config.

    Args:
        dataset (Any): A ``StreamingDataset`` (or anything else).

    Returns:
        list[Any]: Its streams.
    """
    return list(getattr(dataset, 'streams', None) or [])


def check_run(model: Any, train_dataset: Any, eval_datasets: dict[str, Any],
              reference: Optional[TokenizerInfo] = None) -> None:
    """Compare the tokenizers of the training data, the reference and every eval set, and the
    model's vocabulary (see the module docstring).

    Args:
        model (Any): The (Composer) model.
        train_dataset (Any): The training ``StreamingDataset``.
        eval_datasets (dict[str, Any]): Eval datasets by label.
        reference (TokenizerInfo, optional): The reference set's tokenizer, if known.
    """
    infos = [tokenizer_info(convert_info(dataset_streams(train_dataset)), 'training data'),
             reference]
    for label, dataset in eval_datasets.items():
        infos.append(tokenizer_info(convert_info(dataset_streams(dataset)), f'eval set {label!r}'))
    check_tokenizers(infos, model_vocab_size(model))
