"""Local paths and remote URLs (``s3://``, ``gs://``, ...) handled one way everywhere.

Datasets, references and label trees may live behind any Streaming remote; whether a path is a
URL, how its parts join, its parent, and fetching one file through Streaming's downloader (into a
temporary name, then renamed, so ranks of a node that race never see half a file) live here.
"""

from __future__ import annotations

import os
import urllib.parse
import uuid

__all__ = ['is_url', 'join_path', 'parent_path', 'download', 'try_download']


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
