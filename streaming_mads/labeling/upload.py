"""Putting a remote dataset's new labels back beside its ``index.json``, and saying so.

A remote dataset is labelled in a local copy; its label files must then be uploaded in an order
that never lets a reader see a manifest without its columns, and the user must be told what went
where and what the local copy (a full copy of the shards) costs on disk. Both are here, apart from
the labelling itself. See docs/architecture.md.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Optional, Sequence

from streaming_mads.labeling.streams import StreamRef
from streaming_mads.remote import contained_path, is_url
from streaming_mads.labels import LABELS_DIRNAME, MANIFEST_NAME, LabelError, labels_dir

__all__ = ['upload_labels', 'upload_report_lines', 'tree_bytes']


def upload_labels(s: StreamRef, models: Sequence[str] = ()) -> list[str]:
    """Copy the label files next to the remote index: columns and models first, manifest last.

    Args:
        s (StreamRef): A labelled stream with a remote.
        models (Sequence[str]): Model directories under ``mads/`` to upload too (``topics``,
            ``similarity``).

    Returns:
        list[str]: The uploaded paths, relative to the stream's remote directory.
    """
    from streaming.base.storage import CloudUploader
    assert s.remote is not None
    ldir = labels_dir(s.local)
    with open(os.path.join(ldir, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    for e in manifest['columns'].values():  # Never upload a file from outside the labels.
        contained_path(ldir, e.get('file'), f'a label file in {os.path.join(ldir, MANIFEST_NAME)}',
                       LabelError)
    files = [f'{LABELS_DIRNAME}/{e["file"]}' for e in manifest['columns'].values()]
    for model in models:
        files += [f'{LABELS_DIRNAME}/{model}/{n}'
                  for n in sorted(os.listdir(os.path.join(ldir, model)))]
    files.append(f'{LABELS_DIRNAME}/{MANIFEST_NAME}')
    if not is_url(s.remote):
        for rel in files:
            dest = os.path.join(s.remote, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = f'{dest}.{uuid.uuid4().hex}.tmp'
            shutil.copyfile(os.path.join(s.local, rel), tmp)
            os.replace(tmp, dest)
        return files
    uploader = CloudUploader.get((s.local, s.remote), keep_local=True, exist_ok=True)
    for rel in files:
        uploader.upload_file(rel)
    return files


def upload_report_lines(streams: list[dict[str, Any]], cache: Optional[str], cache_bytes: int,
                        cleaned: bool) -> list[str]:
    """What was uploaded where, and the local copy left behind (a full copy of the shards).

    Args:
        streams (list[dict[str, Any]]): Per stream, a report with ``name`` and, if uploaded,
            ``uploaded`` (paths) and ``uploaded_to`` (the remote).
        cache (str, optional): The local copy of a remote dataset, or ``None`` for a local one.
        cache_bytes (int): Its size.
        cleaned (bool): Whether it was deleted.

    Returns:
        list[str]: Report lines (none for a local dataset).
    """
    lines = []
    for s in streams:
        if s.get('uploaded'):
            lines.append(f'uploaded {len(s["uploaded"])} label file(s) of {s["name"]} to '
                         f'{s["uploaded_to"]}: {", ".join(s["uploaded"])}')
    if cache is None:
        return lines
    if cleaned:
        lines.append(f'deleted the local cache {cache} ({_mib(cache_bytes)})')
    else:
        lines.append(f'local cache: {cache} ({_mib(cache_bytes)}: a copy of the '
                     'shards and the labels); nothing reads it after the upload: delete it, '
                     'or pass --clean-cache to have mads label delete it')
    return lines


def _mib(n: int) -> str:
    return f'{n / (1 << 20):.1f} MiB'


def tree_bytes(path: str) -> int:
    """Total size of the files below ``path``.

    Args:
        path (str): A directory.

    Returns:
        int: Bytes.
    """
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
               if os.path.isfile(os.path.join(d, f)))
