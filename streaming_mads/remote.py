"""Local paths and remote URLs (``s3://``, ``gs://``, ...) handled one way everywhere.

Datasets, references and label trees may live behind any Streaming remote; whether a path is a
URL, how its parts join, its parent, and fetching one file through Streaming's downloader (into a
temporary name, then renamed, so ranks of a node that race never see half a file) live here.
So does :func:`contained_path`, the one check every file name read from a dataset's metadata
passes before it is joined to a local folder: whoever wrote a dataset (in a shared bucket, say)
controls those names, and they must not reach outside the dataset's folder or cache.
See docs/architecture.md ("Untrusted metadata"). Where a local dataset keeps its MDS indexes
(:func:`index_dirs`) is found here too, so a directory holding one is never mistaken for text and
a missing split is named with the splits there are (:func:`split_not_found`).
"""

from __future__ import annotations

import json
import ntpath
import os
import posixpath
import urllib.parse
import uuid
from typing import Any, Optional

__all__ = ['is_url', 'join_path', 'parent_path', 'download', 'try_download', 'UnsafePathError',
           'contained_path', 'index_dirs', 'split_not_found']


class UnsafePathError(ValueError):
    """A file name in a dataset's metadata would reach outside its folder (see
    :func:`contained_path`)."""


def _unsafe(name: Any) -> str:
    """Why ``name`` is not a plain relative path (``''`` when it is one)."""
    if not isinstance(name, str):
        return f'it is a {type(name).__name__}, not a string'
    if not name:
        return 'it is empty'
    if '\\' in name or '\x00' in name:
        return 'it has a backslash or NUL character'
    if posixpath.isabs(name) or ntpath.isabs(name) or ntpath.splitdrive(name)[0]:
        return 'it is an absolute path or names a drive'
    for part in name.split('/'):
        if part in ('', '.', '..'):
            return f'it has a {part!r} path component' if part else 'it has an empty component'
    return ''


def contained_path(root: str, name: Any, source: str,
                   error: type[Exception] = UnsafePathError) -> str:
    """``root`` joined with ``name``, a file name read from a dataset's metadata, once checked.

    Names from ``index.json`` (shard files), ``mads/manifest.json`` (label files) and
    ``mads_convert.json`` (tokenizer files, stream folders) are joined to a local folder before a
    file is read, downloaded (replacing what is there) or deleted. Only a plain relative path
    inside that folder is accepted: no absolute path or drive, no ``..``, ``.`` or empty component,
    no backslash, and the normalised result must stay under ``root``.

    Args:
        root (str): The folder the name is relative to.
        name (Any): The name, as the metadata holds it.
        source (str): What the name is and the file it came from, for the error (e.g.
            ``'a shard file name in /cache/index.json'``).
        error (type[Exception]): The exception to raise (the caller's own error class).
            Defaults to :class:`UnsafePathError`.

    Returns:
        str: ``os.path.join(root, name)``.

    Raises:
        Exception: ``error``, naming ``source`` and ``name``.
    """
    why = _unsafe(name)
    path = '' if why else os.path.join(root, *name.split('/'))
    if not why:
        base, full = os.path.abspath(root), os.path.abspath(path)
        if full == base or os.path.commonpath([base, full]) != base:
            why = 'it leads outside that folder'
    if why:
        raise error(f'Refusing {name!r}, {source}: {why}; only a plain relative path inside '
                    f'{root} is accepted. The dataset\'s metadata is corrupt or untrusted (written '
                    'by someone else?): nothing was read, written or deleted through that name. '
                    'Use a dataset from a place you trust, or rewrite that file with mads convert '
                    'or mads label.')
    return path


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``s3://``, ``gs://``, ...) rather than a local path.

    Args:
        path (str): A local path or remote URL.

    Returns:
        bool: ``True`` for a scheme longer than one letter (so ``C:\\...`` stays a path).
    """
    scheme = urllib.parse.urlparse(path).scheme
    return len(scheme) > 1


def join_path(base: str, *parts: str) -> str:
    """``base`` joined with the non-empty ``parts``: with ``/`` for a URL, ``os.path.join`` else.

    Args:
        base (str): A local directory or remote URL.
        *parts (str): Path components; empty ones are skipped.

    Returns:
        str: The joined path.
    """
    parts = tuple(p for p in parts if p)
    if is_url(base):
        return '/'.join([base.rstrip('/'), *[p.strip('/') for p in parts]])
    return os.path.join(base, *parts)


def parent_path(path: str) -> str:
    """The directory holding ``path``: the URL's parent for a URL, ``os.path.dirname`` else.

    Args:
        path (str): A local path or remote URL (a trailing ``/`` is ignored).

    Returns:
        str: The parent (a URL's bucket root is its own parent).
    """
    if is_url(path):
        scheme, rest = path.split('://', 1)
        rest = rest.rstrip('/')
        return f'{scheme}://{rest.rsplit("/", 1)[0] if "/" in rest else rest}'
    return os.path.dirname(os.path.normpath(path))


def download(remote: str, local: str, fresh: bool = False) -> None:
    """Copy one file from any Streaming remote (or local path) to ``local``.

    Args:
        remote (str): Source file.
        local (str): Destination file; its directory is created.
        fresh (bool): Delete an existing ``local`` first. Defaults to ``False``.
    """
    from streaming.base.storage import CloudDownloader
    if fresh and os.path.exists(local):
        os.remove(local)
    os.makedirs(os.path.dirname(local) or '.', exist_ok=True)
    tmp = f'{local}.{uuid.uuid4().hex}.tmp'
    try:
        CloudDownloader.direct_download(remote, tmp)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def try_download(remote: str, local: str, fresh: bool = False) -> bool:
    """:func:`download`, returning ``False`` instead of raising when the file cannot be fetched.

    Args:
        remote (str): Source file.
        local (str): Destination file.
        fresh (bool): Delete an existing ``local`` first. Defaults to ``False``.

    Returns:
        bool: Whether the file was downloaded.
    """
    try:
        download(remote, local, fresh)
        return True
    except Exception:  # Backend-specific "not found" errors.
        return False


def _is_mds_index(path: str) -> bool:
    """Whether ``path`` is a Streaming ``index.json`` (a JSON object with a ``shards`` list)."""
    try:
        with open(path, encoding='utf-8') as f:
            index = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and isinstance(index.get('shards'), list)


def index_dirs(root: str) -> list[str]:
    """The folders under a local ``root`` that hold an MDS ``index.json``, at any depth.

    A dataset keeps its index at its root, in a split folder (``<root>/<split>/``), or in each
    stream's folder (``<root>/<stream>[/<split>]/``). Hidden folders and what lies inside a
    folder holding an index (its labels, caches) are not searched.

    Args:
        root (str): A local directory (a file or a missing path has none).

    Returns:
        list[str]: ``/``-joined paths relative to ``root`` (``'.'`` for ``root`` itself), sorted.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if 'index.json' in filenames and _is_mds_index(os.path.join(dirpath, 'index.json')):
            found.append(os.path.relpath(dirpath, root).replace(os.sep, '/'))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    return sorted(found)


def split_not_found(what: str, root: str, split: Optional[str], key: str) -> Optional[str]:
    """Why the local MDS dataset ``root`` has no index for ``split``; ``None`` when it has one.

    Args:
        what (str): The dataset as the user named it (``'mads_console reference'``, ...).
        root (str): Its local directory.
        split (str, optional): The split looked for (``None``: the index at ``root`` itself).
        key (str): The setting that chooses the split, named in the message.

    Returns:
        str, optional: The message: the index looked for, the splits found and ``key``.
    """
    looked = os.path.join(root, split or '', 'index.json')
    if os.path.isfile(looked):
        return None
    if not os.path.exists(root):
        asked = f', split {split!r}' if split else ''
        return f'{what} {root} does not exist (looked for {looked}{asked}): check the path.'
    where = f'for split {split!r}' if split else 'at its top (no split is set)'
    found = index_dirs(root)
    if found:
        places = ', '.join('its top (no split)' if f == '.' else f for f in found)
        return (f'{what} {root} has no MDS index {where}: no {looked}. Its MDS indexes are in: '
                f'{places}. Set {key} to one of them.')
    return (f'{what} {root} holds no MDS index {where} or below it (no {looked}): check the path '
            f'and {key}.')
