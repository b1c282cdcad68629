"""Where ``mads label`` and ``mads inspect`` find a dataset's streams and read their shards.

Both commands take the same kinds of dataset (a ``mads convert`` output, one MDS stream, a tree of
streams, or any of these behind a Streaming remote), so finding the streams, copying a remote's
indexes and shards into the local cache, and reading a shard back (checked against the hash its
``index.json`` records) live here, apart from what is done with the samples.
See docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from streaming_mads.convert_record import CONVERT_INFO_NAME, fetch_convert_info, read_convert_info
from streaming_mads.labels import LABELS_DIRNAME, check_index_names
from streaming_mads.remote import contained_path, download, is_url, join_path, try_download
from streaming_mads.shard_check import VerifyReport, check_shard_bytes, verify_streams
from streaming_mads.tokenizer import TOKENIZER_DIRNAME

__all__ = [
    'LabelingError', 'StreamRef', 'discover_streams', 'read_index', 'load_shard', 'RemoteStream',
    'verify_dataset'
]


class LabelingError(ValueError):
    """A dataset cannot be labelled as asked; the message says what to change."""


@dataclass
class StreamRef:
    """One stream to label.

    Args:
        name (str): The stream's name (its domain when domains come from streams).
        local (str): Local directory holding its ``index.json`` (``<local>/<split>``).
        remote (str, optional): Remote directory of the same, or ``None`` for a local dataset.
    """
    name: str
    local: str
    remote: Optional[str] = None
    index: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def num_samples(self) -> int:
        return int(sum(s['samples'] for s in self.index['shards']))


def read_index(split_dir: str, name: str) -> dict[str, Any]:
    """The MDS ``index.json`` in ``split_dir``, checked to be a Streaming v2 index of MDS shards.

    Args:
        split_dir (str): Directory holding ``index.json``.
        name (str): The stream's name, for error messages.

    Returns:
        dict[str, Any]: The parsed index.
    """
    path = os.path.join(split_dir, 'index.json')
    try:
        with open(path, encoding='utf-8') as f:
            index = json.load(f)
    except (OSError, ValueError) as err:
        raise LabelingError(f'Cannot read the MDS index of stream {name} ({path}): {err}.') from err
    if index.get('version') != 2 or not isinstance(index.get('shards'), list):
        raise LabelingError(f'{path} is not a Streaming (version 2) index.')
    for shard in index['shards']:
        if shard.get('format') != 'mds':
            raise LabelingError(f'Stream {name} has {shard.get("format")} shards: mads label reads '
                                'MDS shards only.')
    check_index_names(index, split_dir, LabelingError)  # Before any shard is read or fetched.
    return index


def discover_streams(
        dataset: str,
        local: Optional[str] = None,
        split: Optional[str] = None) -> tuple[list[StreamRef], Optional[dict[str, Any]], str]:
    """Find the streams of ``dataset``.

    A directory with ``index.json`` is one stream; one with ``mads_convert.json`` has the streams it
    lists; otherwise every directory below holding an ``index.json`` is a stream, named by its
    relative path. Remote datasets (a URL, or any path when ``local`` is given) are found through
    ``mads_convert.json`` or are one stream, and their indexes are downloaded into ``local``.

    Args:
        dataset (str): Local directory or remote URL of the dataset.
        local (str, optional): Local cache of a remote dataset. Defaults to
            ``~/.cache/mads/<hash>`` for a URL.
        split (str, optional): Split subdirectory of each stream. Defaults to ``None``.

    Returns:
        tuple: (streams, the ``mads_convert.json`` record or ``None``, local dataset root).
    """
    same = local is not None and os.path.abspath(local) == os.path.abspath(dataset)
    remote = dataset if (is_url(dataset) or (local is not None and not same)) else None
    split = split or ''
    if remote is not None:
        root = local or os.path.join(os.path.expanduser('~'), '.cache', 'mads',
                                     hashlib.sha256(remote.encode()).hexdigest()[:16])
        os.makedirs(root, exist_ok=True)
        info = fetch_convert_info(remote, root, fresh=True)
        entries = ([(s['name'], s['path']) for s in info['streams']] if info else
                   [(_stream_name(remote.rstrip('/')), '')])
        streams = []
        for name, rel in entries:
            ref = StreamRef(name, os.path.join(root, rel, split), join_path(remote, rel, split))
            if not try_download(join_path(ref.remote or '', 'index.json'),
                                os.path.join(ref.local, 'index.json'), fresh=True):
                raise LabelingError(f'No MDS index at {join_path(ref.remote or "", "index.json")}: '
                                    'check the remote path and --split, and your credentials.')
            ref.index = read_index(ref.local, name)
            streams.append(ref)
        return streams, info, root

    if not os.path.exists(dataset):
        raise LabelingError(f'Dataset {dataset} does not exist: give the directory written by '
                            '`mads convert` or any MDS stream directory.')
    info = read_convert_info(dataset)
    if os.path.isfile(os.path.join(dataset, split, 'index.json')):
        # One stream: a `single` convert output, a stream inside a `streams` output, or any MDS.
        root, name = dataset, _stream_name(dataset)
        if info and len(info['streams']) == 1:
            name = info['streams'][0]['name']
        elif info is None:
            parent = os.path.dirname(os.path.abspath(dataset))
            info = read_convert_info(parent)
            root = parent if info else dataset
        ref = StreamRef(name, os.path.join(dataset, split))
        ref.index = read_index(ref.local, name)
        return [ref], info, root
    if info:
        streams = []
        for s in info['streams']:
            ref = StreamRef(s['name'], os.path.join(dataset, s['path'], split))
            if not os.path.isfile(os.path.join(ref.local, 'index.json')):
                raise LabelingError(f'Stream {s["name"]} listed in {dataset}/{CONVERT_INFO_NAME} '
                                    f'has no index.json at {ref.local}: re-run mads convert.')
            ref.index = read_index(ref.local, s['name'])
            streams.append(ref)
        return streams, info, dataset
    found = []
    for dirpath, dirnames, filenames in os.walk(dataset):
        has_index = 'index.json' in filenames
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.') and
                             not (has_index and d == LABELS_DIRNAME) and d != TOKENIZER_DIRNAME)
        if has_index and (not split or os.path.basename(dirpath) == split):
            found.append(dirpath)
    if not found:
        raise LabelingError(f'No MDS index.json under {dataset}: give a directory written by '
                            '`mads convert` or holding MDS streams (and --split if they have one).')
    rels = []
    for path in sorted(found):
        rel = os.path.relpath(path, dataset)
        rels.append(os.path.dirname(rel) if split else rel)
    streams = []
    for path, rel in zip(sorted(found), _without_split_folders(rels)):
        name = rel.replace(os.sep, '/') if rel not in ('', '.') else _stream_name(dataset)
        ref = StreamRef(name, path)
        ref.index = read_index(path, name)
        streams.append(ref)
    return streams, None, dataset


def verify_dataset(dataset: str, split: Optional[str] = None) -> VerifyReport:
    """``mads verify``: every local shard file of every stream of ``dataset`` against its index.

    Args:
        dataset (str): A local dataset, as ``mads label`` takes it (a ``mads convert`` output,
            one MDS stream, a tree of streams), or the local cache of a remote one.
        split (str, optional): Split subdirectory of each stream. Defaults to ``None``.

    Returns:
        VerifyReport: See :func:`streaming_mads.shard_check.verify_streams`.
    """
    if is_url(dataset):
        raise LabelingError(f'mads verify checks local shard files; {dataset} is a remote: give '
                            'its local copy (the `local` folder Streaming or mads label cached '
                            'it in).')
    streams, _, _ = discover_streams(dataset, split=split)
    return verify_streams([(ref.name, ref.local) for ref in streams])


#: Folder names taken for a split, not a source (Streaming's and llm-foundry's conventions): a
#: stream is named by the folder above one, since its name is its default domain.
_SPLIT_FOLDER = re.compile(r'^(train|training|val|valid|validation|test|eval|dev|heldout)([_-].*)?$')


def _stream_name(path: str) -> str:
    """The name of the stream at ``path``: its folder's, or the parent's when that folder is a
    split (``data/c4/train`` is ``c4``, not ``train``)."""
    parts = [p for p in os.path.normpath(path).split(os.sep) if p]
    if len(parts) > 1 and _SPLIT_FOLDER.match(parts[-1]) and not parts[-2].endswith(':'):
        return parts[-2]
    return parts[-1] if parts else 'stream'


def _without_split_folders(rels: list[str]) -> list[str]:
    """Relative stream paths with a trailing split folder dropped (``web/train`` is ``web``),
    as long as the names stay distinct."""
    short = [os.path.dirname(r) if os.sep in r and _SPLIT_FOLDER.match(os.path.basename(r)) else r
             for r in rels]
    return short if len(set(short)) == len(short) else rels


class RemoteStream:
    """The two attributes and one method of a Streaming ``Stream`` that ``fetch_labels`` uses.

    Args:
        ref (StreamRef): A stream with a remote.
    """

    def __init__(self, ref: StreamRef) -> None:
        self.remote = ref.remote
        self.local = ref.local
        self.split = ''

    def _download_file(self, rel: str, tmp: str) -> str:
        dest = os.path.join(self.local, tmp)
        download(join_path(self.remote or '', rel), dest, fresh=True)
        return dest


def load_shard(ref_local: str, ref_remote: Optional[str], shard: dict[str, Any],
               name: str) -> list[dict[str, Any]]:
    """All samples of one MDS shard, decoded, after checking its bytes against the index.

    The raw shard is read if present and whole; otherwise its stored (possibly compressed) file,
    downloaded first from ``ref_remote`` when missing or of the wrong size.

    Args:
        ref_local (str): Local directory of the stream's ``index.json``.
        ref_remote (str, optional): Remote directory of the same, or ``None``.
        shard (dict[str, Any]): The shard's entry in ``index.json``.
        name (str): The stream's name, for error messages.

    Returns:
        list[dict[str, Any]]: The shard's samples, in order.
    """
    from streaming.base.compression import decompress
    from streaming.base.format.mds.reader import MDSReader

    raw_info, zip_info = shard['raw_data'], shard.get('zip_data')
    source = f'a shard file name in {os.path.join(ref_local, "index.json")}'
    raw_path = contained_path(ref_local, raw_info['basename'], source, LabelingError)
    data: Optional[bytes] = None
    if os.path.isfile(raw_path) and os.path.getsize(raw_path) == raw_info['bytes']:
        with open(raw_path, 'rb') as f:
            data = f.read()
        check_shard_bytes(data, raw_info, raw_path, name, LabelingError)
    else:
        info = zip_info or raw_info
        path = contained_path(ref_local, info['basename'], source, LabelingError)
        if ref_remote is not None and (not os.path.isfile(path) or
                                       os.path.getsize(path) != info['bytes']):
            download(join_path(ref_remote, info['basename']), path, fresh=True)
        if not os.path.isfile(path):
            raise LabelingError(f'Shard {info["basename"]} of stream {name} is missing at {path}: '
                                'the dataset is incomplete; re-convert or re-download it.')
        if os.path.getsize(path) != info['bytes']:
            raise LabelingError(f'Shard {path} of stream {name} has {os.path.getsize(path)} bytes '
                                f'but its index.json says {info["bytes"]}: shards and index '
                                'disagree; re-convert or re-download the stream.')
        with open(path, 'rb') as f:
            data = f.read()
        check_shard_bytes(data, info, path, name, LabelingError)
        if zip_info:
            data = decompress(shard['compression'], data)
    if len(data) != raw_info['bytes']:
        raise LabelingError(f'Shard {raw_info["basename"]} of stream {name} decompresses to '
                            f'{len(data)} bytes, not {raw_info["bytes"]}: it is corrupt.')
    n = int(np.frombuffer(data, np.uint32, 1)[0])
    if n != shard['samples']:
        raise LabelingError(f'Shard {raw_info["basename"]} of stream {name} holds {n} samples, '
                            f'its index says {shard["samples"]}: it is corrupt.')
    offsets = np.frombuffer(data, np.uint32, n + 1, 4)
    reader = MDSReader.from_json(ref_local, None, shard)
    return [reader.decode_sample(data[offsets[i]:offsets[i + 1]]) for i in range(n)]

