"""Checks before training: the training data, the reference, the eval sets and the model agree.

Why before training: a mismatch otherwise shows late or never. Token ids past the model's
embedding raise ``IndexError`` only at the first console update or eval, after the run has
trained for a while; a reference (or eval set) tokenised with another tokenizer whose ids fit the
vocabulary is measured in the wrong token space without any error, so the console steers by
noise. ``mads train`` runs :func:`check_run` when it builds the Trainer and ``AgentConsole`` runs
it again at ``FIT_START`` (Python users build Trainers themselves).

What is compared, per stream, is what records its tokenizer: the ``mads_convert.json`` beside it
(:func:`convert_info`, which fetches the record of a remote stream with its index) and its label
manifest (``mads label`` records the tokenizer that decoded it, so an llm-foundry dataset without a
convert record is still known once labelled); plus the run's ``tokenizer.name`` when set. Each is
the tokenizer's kind, size, EOS id and :func:`~streaming_mads.tokenizer.tokenizer_fingerprint` (a
hash of the token -> id map, so the same tokenizer saved in another file format still matches, and
another BPE of the same size does not). A dataset nothing records is named in one warning, saying
how to record it; the first token ids of every dataset (and a spread of the reference's) are
always checked against the model's vocabulary. The record itself is
:mod:`streaming_mads.convert_record`'s; docs/architecture.md ("Tokenizers") has the long form.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from streaming_mads.convert_record import (CONVERT_INFO_NAME, ConvertError, fetch_convert_info,
                                           find_convert_info)
from streaming_mads.remote import join_path, parent_path
from streaming_mads.streaming_internals import read_samples

__all__ = ['TokenizerMismatchError', 'TokenizerInfo', 'convert_info', 'stream_convert_info',
           'tokenizer_info', 'spec_tokenizer_info', 'record_tokenizer_info', 'unknown_tokenizer',
           'configured_tokenizer_info',
           'stream_tokenizer_infos', 'dataset_tokenizer_infos', 'model_vocab_size',
           'check_tokenizers', 'check_token_ids', 'check_run', 'dataset_streams',
           'REMOTE_CONVERT_DIRNAME', 'UNKNOWN']

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
    """The tokenizer of one dataset of the run, or the fact that it is not known.

    Args:
        where (str): Which dataset, as the user named it (``'training data'``, ``'reference'``...).
        source (str): Where the tokenizer was recorded or loaded from (the dataset's path when it
            is not known).
        kind (str): ``bytes``, ``tokenizers``, ``transformers``, or :data:`UNKNOWN`.
        vocab_size (int): Ids the tokenizer can produce (``0`` when not known).
        eos_id (int, optional): Its end-of-document id.
        fingerprint (str, optional): Its :func:`~streaming_mads.tokenizer.tokenizer_fingerprint`;
            ``None`` for a record that has none and whose tokenizer could not be loaded.
        fix (str): How to make this side match, for the mismatch error. Defaults to
            re-converting it.
    """
    where: str
    source: str
    kind: str
    vocab_size: int
    eos_id: Optional[int]
    fingerprint: Optional[str]
    fix: str = ''

    @property
    def known(self) -> bool:
        """Whether a tokenizer was found (else only the ids themselves can be checked)."""
        return self.kind != UNKNOWN

    def describe(self) -> str:
        return f'a {self.kind} tokenizer of {self.vocab_size} ids ({self.source})'

    def same_as(self, other: 'TokenizerInfo') -> bool:
        if self.fingerprint is not None and other.fingerprint is not None:
            return self.fingerprint == other.fingerprint and self.eos_id == other.eos_id
        return (self.kind == 'bytes') == (other.kind == 'bytes') and \
            self.vocab_size == other.vocab_size and self.eos_id == other.eos_id


#: ``TokenizerInfo.kind`` of a dataset whose tokenizer nothing records.
UNKNOWN = 'unknown'


def unknown_tokenizer(where: str, source: str) -> TokenizerInfo:
    """A dataset whose tokenizer nothing records (warned about by :func:`check_tokenizers`)."""
    return TokenizerInfo(where, source, UNKNOWN, 0, None, None)


def record_tokenizer_info(record: Optional[dict[str, Any]], where: str, source: str,
                          fix: str = '') -> Optional[TokenizerInfo]:
    """The tokenizer a record names (``kind``, ``vocab_size``, ``eos_id``, ``fingerprint``: a
    label manifest's, or ``mads_convert.json``'s), or ``None`` if it names none.

    Args:
        record (dict, optional): The record.
        where (str): Which dataset, for messages.
        source (str): Where the record is.
        fix (str): How to make this side match. Defaults to re-converting it.
    """
    if not record or not record.get('vocab_size'):
        return None
    return TokenizerInfo(where, source, str(record.get('kind')), int(record['vocab_size']),
                         record.get('eos_id'), record.get('fingerprint'), fix)


def tokenizer_info(found: Optional[tuple[str, dict[str, Any]]], where: str) -> Optional[TokenizerInfo]:
    """The tokenizer a ``(root, record)`` of :func:`convert_info` names, or ``None``.

    A record written before fingerprints were recorded gets one from the tokenizer it names,
    loaded (if that fails, it is compared by kind, size and EOS only).
    """
    from streaming_mads.tokenizer import TokenizerError, tokenizer_from_record
    if found is None:
        return None
    root, info = found
    record = dict(info.get('tokenizer') or {})
    if not record.get('vocab_size'):
        return None
    source = os.path.join(root, record['path']) if record.get('path') else \
        os.path.join(root, CONVERT_INFO_NAME)
    if not record.get('fingerprint'):
        try:
            record['fingerprint'] = tokenizer_from_record(record, root).fingerprint
        except (TokenizerError, ConvertError, OSError):
            pass
    return record_tokenizer_info(record, where, source)


def spec_tokenizer_info(spec: str, where: str, fix: str = '') -> TokenizerInfo:
    """The tokenizer at ``spec`` (``'bytes'`` or a local path), as :func:`tokenizer_info` gives.

    Args:
        spec (str): ``'bytes'`` or a local tokenizer path.
        where (str): Which dataset or setting, for messages.
        fix (str): How to make this side match. Defaults to re-converting it.
    """
    from streaming_mads.tokenizer import load_tokenizer, tokenizer_identity
    return record_tokenizer_info(tokenizer_identity(load_tokenizer(spec)), where, spec, fix)


def configured_tokenizer_info(name: Optional[str]) -> Optional[TokenizerInfo]:
    """The tokenizer a run is configured with (the YAML's ``tokenizer.name``), to compare every
    dataset's with; ``None`` when none is set.

    Args:
        name (str, optional): ``'bytes'`` or a local tokenizer path.
    """
    if name is None:
        return None
    return spec_tokenizer_info(str(name), 'tokenizer.name of the run',
                               'set tokenizer.name to the tokenizer that encoded the data')


def labels_fix(source: str) -> str:
    """How to relabel a stream whose labels name the wrong tokenizer."""
    return (f'relabel it with the tokenizer that encoded it: `mads label {source} --tokenizer '
            'TOKENIZER`')


def stream_tokenizer_infos(local: Optional[str], remote: Optional[str], split: Optional[str],
                           where: str, labels: Optional[dict[str, Any]] = None) -> list[TokenizerInfo]:
    """What records one stream's tokenizer: its ``mads_convert.json`` and its label manifest
    (labels record the tokenizer that decoded them), each when present; else one
    :func:`unknown_tokenizer`.

    Args:
        local (str, optional): The stream's local directory.
        remote (str, optional): Its remote directory.
        split (str, optional): Its split.
        where (str): Which dataset, for messages.
        labels (dict, optional): The stream's label manifest, if already read; else a local
            stream's is looked for (a remote stream's cache may hold a stale copy).
    """
    from streaming_mads.labels import MANIFEST_NAME, labels_dir, read_manifest
    split_dir = os.path.join(local or '', split or '')
    stream = join_path(remote, split or '') if remote else os.path.normpath(split_dir)
    infos = []
    converted = tokenizer_info(stream_convert_info(local, remote, split), where)
    if converted is not None:
        infos.append(converted)
    if labels is None and local and not remote and \
            os.path.isfile(os.path.join(split_dir, 'index.json')):
        labels = read_manifest(split_dir)
    labelled = record_tokenizer_info((labels or {}).get('tokenizer'), f'labels of the {where}',
                                     os.path.join(labels_dir(stream), MANIFEST_NAME),
                                     labels_fix(stream))
    if labelled is not None:
        infos.append(labelled)
    return infos or [unknown_tokenizer(where, stream)]


def dataset_tokenizer_infos(dataset: Any, where: str) -> list[TokenizerInfo]:
    """:func:`stream_tokenizer_infos` of every stream of a built dataset (a ``MADSDataset``'s
    label manifests as it opened them).

    Args:
        dataset (Any): A ``StreamingDataset`` (or anything else: no streams, nothing known).
        where (str): Which dataset, for messages.
    """
    streams = dataset_streams(dataset)
    opened = list(getattr(getattr(dataset, 'labels', None), 'streams', None) or [])
    out = []
    for i, stream in enumerate(streams):
        manifest = opened[i].manifest if i < len(opened) else None
        out += stream_tokenizer_infos(getattr(stream, 'local', None),
                                      getattr(stream, 'remote', None),
                                      getattr(stream, 'split', None), where, manifest)
    return out


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
    """Refuse tokenizers that differ from the first known one, or that exceed the model; warn,
    once, about the datasets whose tokenizer nothing records.

    Raises:
        TokenizerMismatchError: Naming both sides and the fix.
    """
    given = [i for i in infos if i is not None]
    known = [i for i in given if i.known]
    for info in known:
        if model_vocab is not None and info.vocab_size > model_vocab:
            raise TokenizerMismatchError(
                f'The {info.where} was tokenised with {info.describe()}, but the model\'s vocabulary '
                f'has only {model_vocab} ids: its token ids would fail at the first console update '
                f'or eval. Set model.vocab_size to at least {info.vocab_size} (mads train reads it '
                'from the training data\'s mads_convert.json when unset).')
    for info in known[1:]:
        if not info.same_as(known[0]):
            fix = info.fix or f'Re-convert the {info.where} with `mads convert --tokenizer ' \
                f'{known[0].source}`'
            raise TokenizerMismatchError(
                f'The {info.where} was tokenised with {info.describe()}, but the {known[0].where} '
                f'with {known[0].describe()}: their token ids mean different text. '
                f'{fix[0].upper()}{fix[1:]}.')
    _warn_unchecked([i for i in given if not i.known], known[0] if known else None, model_vocab)


def _warn_unchecked(unknown: Sequence[TokenizerInfo], anchor: Optional[TokenizerInfo],
                    model_vocab: Optional[int]) -> None:
    """One warning naming every dataset whose tokenizer could not be compared, and how to
    record it (a silent skip let a reference of another BPE of the same size through)."""
    names = list(dict.fromkeys(f'{i.where} ({i.source})' for i in unknown))
    if not names:
        return
    against = (f'the tokenizer of the {anchor.where}, {anchor.describe()}' if anchor is not None
               else f'the model\'s vocabulary of {model_vocab} ids' if model_vocab else 'anything')
    warnings.warn(f'MADS could not check the tokenizer of the {"; the ".join(names)}: no '
                  'mads_convert.json beside it and no label manifest recording one, so it is '
                  f'assumed to match {against}, and only token ids past the vocabulary are '
                  'caught. Another tokenizer of the same size would go unnoticed (a reference '
                  'measured in the wrong token space steers by noise). Record its tokenizer: '
                  '`mads convert --tokenizer TOKENIZER` writes it in mads_convert.json, and '
                  '`mads label DIR --tokenizer TOKENIZER` in its label manifest.', stacklevel=2)


def check_token_ids(samples: Sequence[dict], model_vocab: Optional[int], where: str,
                    column: str = 'tokens') -> None:
    """Refuse samples whose token ids fall outside ``[0, model_vocab)`` (a column of another
    form, such as llm-foundry's ids stored as ``bytes``, is not read)."""
    if model_vocab is None:
        return
    arrays = [np.asarray(s[column]) for s in samples if column in s]
    arrays = [a for a in arrays if a.size and a.dtype.kind in 'iu']
    if not arrays:
        return
    top, low = max(int(a.max()) for a in arrays), min(int(a.min()) for a in arrays)
    if top >= model_vocab or low < 0:
        raise TokenizerMismatchError(
            f'The {where} holds token ids up to {top} (lowest {low}), but the model\'s vocabulary has '
            f'{model_vocab} ids (0-{model_vocab - 1}): it was tokenised with another tokenizer. '
            f'Re-convert it with the training data\'s tokenizer, or set model.vocab_size to at '
            f'least {top + 1}.')


#: Samples at the start of each training and eval set whose ids :func:`check_run` checks.
FIRST_CHECKED = 8


def _first_samples(dataset: Any) -> list[dict]:
    """The first :data:`FIRST_CHECKED` samples of a local Streaming dataset (none of a remote
    one, which would download a shard before training that the run may never read, nor of a
    dataset of another kind, whose random access is not known to be cheap)."""
    streams = dataset_streams(dataset)
    if not streams or any(getattr(s, 'remote', None) for s in streams):
        return []
    return read_samples(dataset, list(range(min(FIRST_CHECKED,
                                                int(getattr(dataset, 'num_samples', 0))))))


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
              reference: Optional[TokenizerInfo] = None,
              tokenizer: Optional[TokenizerInfo] = None) -> None:
    """Compare the tokenizers of the training data, the configured tokenizer, the reference and
    every eval set, and the model's vocabulary (see the module docstring); check the first token
    ids of the training and eval sets against the model.

    Args:
        model (Any): The (Composer) model.
        train_dataset (Any): The training ``StreamingDataset``.
        eval_datasets (dict[str, Any]): Eval datasets by label.
        reference (TokenizerInfo, optional): The reference set's tokenizer (``None``: nothing to
            check, e.g. samples given in Python).
        tokenizer (TokenizerInfo, optional): The tokenizer the run is configured with (the YAML's
            ``tokenizer.name``), compared with every dataset's.
    """
    model_vocab = model_vocab_size(model)
    infos: list[Optional[TokenizerInfo]] = [*dataset_tokenizer_infos(train_dataset, 'training data'),
                                            tokenizer, reference]
    for label, dataset in eval_datasets.items():
        infos += dataset_tokenizer_infos(dataset, f'eval set {label!r}')
    check_tokenizers(infos, model_vocab)
    check_token_ids(_first_samples(train_dataset), model_vocab, 'training data')
    for label, dataset in eval_datasets.items():
        check_token_ids(_first_samples(dataset), model_vocab, f'eval set {label!r}')
