"""The console's reference set: loaded with random access, in the training samples' form.

Each update draws a fresh subset of the reference, so the whole set must be random access and
tokenised like the training data (the train collate builds its batches). A text reference is
therefore tokenised here with the tokenizer ``mads convert`` recorded beside the training data,
and its tokenizer is known before loading for the checks of :mod:`streaming_mads.checks`; for
text training samples it stays text, which the train collate tokenises like them.
A local directory holding an MDS index anywhere (its top, a split folder, streams below) is
read as MDS, never as text. The temporary folder a reference needs (a text reference's MDS copy,
a remote one's default cache) lives as long as the reference: it is removed when the reference
is garbage-collected, or at exit. docs/architecture.md has the long form.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Any, Optional, Sequence, Union

import numpy as np
from torch.utils.data import Dataset

from streaming_mads.checks import (TokenizerInfo, check_token_ids, convert_info,
                                   spec_tokenizer_info, stream_tokenizer_infos)
from streaming_mads.mds_formats import SampleDecoder
from streaming_mads.remote import index_dirs, is_url, split_not_found
from streaming_mads.streaming_internals import check_shard_files

__all__ = ['ReferenceSource', 'load_reference', 'reference_tokenizer_info', 'check_reference_ids',
           'spread']

#: Reference samples whose token ids are checked against the model before training.
REFERENCE_CHECKED = 256

ReferenceSource = Union[str, Dataset, Sequence[dict]]

#: The setting that chooses the reference's split, named in errors.
SPLIT_KEY = 'mads_console.reference_split'


def _is_mds(source: str, split: Optional[str]) -> bool:
    """Whether a local ``source`` is an MDS dataset (``True``) or text (``False``).

    Raises:
        FileNotFoundError: ``source`` does not exist; or it holds an MDS index but none for
            ``split`` (naming the splits found and :data:`SPLIT_KEY`); or ``split`` is given for
            text.
    """
    if os.path.isfile(os.path.join(source, split or '', 'index.json')):
        return True
    if not os.path.exists(source):
        looked = f' (looked for its split {split!r})' if split else ''
        raise FileNotFoundError(f'mads_console reference {source!r} does not exist{looked}: give '
                                'an MDS dataset, or jsonl/text files of reference text.')
    if split or index_dirs(source):
        raise FileNotFoundError(split_not_found('mads_console reference', source, split,
                                                SPLIT_KEY))
    return False


def _remove_tree(path: str, owner: int) -> None:
    if os.getpid() == owner:  # Not from a forked process holding a copy of the reference.
        shutil.rmtree(path, ignore_errors=True)


def training_tokenizer(dataset: Any) -> str:
    """The tokenizer ``mads convert`` recorded beside ``dataset``'s streams (local or remote)."""
    found = convert_info(dataset.streams)
    if found is not None:
        root, info = found
        record = info.get('tokenizer') or {}
        if record.get('path'):
            return os.path.join(root, record['path'])
        if record.get('kind') == 'bytes':
            return 'bytes'
    raise FileNotFoundError('A text reference set needs the training tokenizer: set '
                            'mads_console.reference_tokenizer (no mads_convert.json was found '
                            'beside the training streams, locally or next to their remote index).')


def text_to_mds(path: str, tokenizer: Optional[str], seq_len: Optional[int], root: str) -> str:
    """A jsonl/text reference (file or directory) in the training samples' form, as MDS in the
    folder ``root``: tokenised into samples of ``seq_len`` ids, or (``seq_len=None``, for text
    training samples) one text sample per document, which the train collate tokenises like them."""
    from streaming_mads.convert.convert import convert
    out = os.path.join(root, 'reference')
    if seq_len is None:
        convert([f'reference={path}'], out, mode='text', layout='single', progress=False)
    else:
        convert([f'reference={path}'], out, layout='single', seq_len=seq_len,
                tokenizer=tokenizer, progress=False)
    return out


def load_reference(source: ReferenceSource, split: Optional[str] = None,
                   local: Optional[str] = None, dataset: Optional[Any] = None,
                   tokenizer: Optional[str] = None) -> Sequence[dict]:
    """The whole reference set, with random access (each update reads only what it draws).

    Args:
        source (ReferenceSource): A local MDS directory or remote MDS URL (read with Streaming,
            a shard downloaded when one of its samples is first drawn); a jsonl/text file or
            directory of text (tokenised like the training data with the training tokenizer
            into samples of the training length); a map-style dataset; or a list of sample
            dicts. Samples must have the training samples' form (same columns and
            tokenisation), since the train collate builds their batches.
        split (str, optional): MDS split.
        local (str, optional): Cache directory for a remote MDS source (default: a temp dir).
        dataset (MADSDataset, optional): The training dataset (tokenizer and sample length of a
            text reference).
        tokenizer (str, optional): Tokenizer of a text reference (default: the one
            ``mads convert`` recorded beside the training data).

    Raises:
        FileNotFoundError: A local ``source`` that does not exist, or that holds an MDS index
            but none for ``split`` (the message names the splits found and
            ``mads_console.reference_split``).
    """
    if not isinstance(source, str):
        return source  # type: ignore[return-value]
    from streaming import StreamingDataset
    remote = is_url(source)
    text = not remote and not _is_mds(source, split)
    if text and dataset is None:
        raise ValueError('A text reference set needs the training dataset to tokenise it.')
    temporary = tempfile.mkdtemp(prefix='mads_ref_') if text or (remote and not local) else None
    try:
        if text:
            # Token ids (legacy bytes come decoded), else text (docs/bring-your-own-mds.md).
            decoder = getattr(dataset, 'sample_decoder', None)
            ids = dataset[0].get(decoder.tokens_column if decoder is not None else 'tokens')
            source = text_to_mds(source, tokenizer or training_tokenizer(dataset), len(ids),
                                 temporary) if ids is not None else \
                text_to_mds(source, None, None, temporary)
            split = None
        reference = StreamingDataset(remote=source if remote else None,
                                     local=(local or temporary) if remote else source,
                                     split=split, batch_size=1)
        check_shard_files(reference)  # Its index names files before any shard is downloaded.
    except BaseException:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    if temporary is not None:  # Removed with the reference (the console holds it), or at exit.
        weakref.finalize(reference, _remove_tree, temporary, os.getpid())
    return reference


def reference_tokenizer_info(source: ReferenceSource, split: Optional[str] = None,
                             local: Optional[str] = None,
                             tokenizer: Optional[str] = None) -> Optional[TokenizerInfo]:
    """The reference's tokenizer, when known before loading it: what the ``mads_convert.json`` or
    label manifest of an MDS reference records (an unknown one when neither does, which the checks
    warn about), or ``tokenizer`` for a text one (``None``: a text reference tokenised with the
    training tokenizer, or samples given in Python). Arguments and errors as
    :func:`load_reference`."""
    if not isinstance(source, str):
        return None
    if is_url(source):
        return stream_tokenizer_infos(local, source, split, 'reference')[0]
    if _is_mds(source, split):
        return stream_tokenizer_infos(source, None, split, 'reference')[0]
    if tokenizer:
        return spec_tokenizer_info(tokenizer, 'reference')
    return None


def spread(samples: Sequence[dict], count: int) -> list[dict]:
    """Up to ``count`` samples evenly spaced over ``samples`` (a cheap check of a large set)."""
    n = len(samples)
    ids = np.unique(np.linspace(0, n - 1, min(count, n)).astype(int)) if n else []
    return [samples[int(i)] for i in ids]


def check_reference_ids(reference: Sequence[dict], model_vocab: Optional[int],
                        decoder: Optional[SampleDecoder] = None) -> None:
    """Up to :data:`REFERENCE_CHECKED` reference samples, spread over the set, hold only token
    ids below ``model_vocab`` (:func:`streaming_mads.checks.check_token_ids`), read by ``decoder``
    (the train collate's: any MDS sample format) if given, else from their ``tokens``."""
    samples = spread(reference, REFERENCE_CHECKED)
    if decoder is not None:
        samples = [{'tokens': ids} for ids in decoder(samples)]
    check_token_ids(samples, model_vocab, 'mads_console reference set')
