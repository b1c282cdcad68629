"""The ``mads_convert.json`` record that ``mads convert`` writes beside a dataset.

The converter writes it; labelling (which streams a dataset has, which tokenizer decodes them) and
the checks before training (which tokenizer made the ids) only read it. Its name, schema, writer
and readers live here, in the shared base, so those readers need not depend on the converter.
docs/architecture.md ("Layout") has the long form.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

from streaming_mads.remote import contained_path, join_path, try_download

__all__ = ['CONVERT_INFO_NAME', 'CONVERT_FORMAT', 'CONVERT_VERSION', 'ConvertError',
           'make_convert_info', 'write_convert_info', 'read_convert_info', 'find_convert_info',
           'fetch_convert_info']

CONVERT_INFO_NAME = 'mads_convert.json'
CONVERT_FORMAT = 'mads-convert'
CONVERT_VERSION = 1


class ConvertError(ValueError):
    """An input cannot be converted, or a ``mads_convert.json`` is not a ``mads convert`` record;
    the message names the file and the fix."""


def make_convert_info(*, mode: str, layout: str, seq_len: Optional[int], columns: dict[str, str],
                      tokenizer: Optional[dict[str, Any]], streams: list[dict[str, Any]],
                      domains: dict[str, dict[str, int]], inputs: list[dict[str, Any]],
                      options: dict[str, Any]) -> dict[str, Any]:
    """The record of one converted dataset; its keys are the record's schema.

    Args:
        mode (str): ``'tokens'`` or ``'text'``.
        layout (str): ``'streams'`` (a stream directory per domain) or ``'single'``.
        seq_len (int, optional): Tokens per sample in tokens mode, else ``None``.
        columns (dict[str, str]): MDS column name -> encoding.
        tokenizer (dict, optional): What ``Tokenizer.save`` returned (``kind``, ``vocab_size``,
            ``eos_id``, ``fingerprint``, the tokenizer's identity that labels and the checks
            before training compare; ``path`` and ``files`` relative to the record's directory
            for a saved tokenizer), or ``None`` in text mode with bytes.
        streams (list[dict]): ``{'name', 'path', 'domains', 'samples'}`` per stream, ``path``
            relative to the record's directory (``''`` for the ``single`` layout).
        domains (dict[str, dict[str, int]]): Per domain: ``documents``, ``samples``, ``tokens``,
            ``dropped_tokens``.
        inputs (list[dict]): ``{'path', 'domain'}`` per input, as given.
        options (dict[str, Any]): The other options of the conversion.

    Returns:
        dict[str, Any]: The record, with its ``format`` and ``version``.
    """
    return {'format': CONVERT_FORMAT, 'version': CONVERT_VERSION, 'mode': mode, 'layout': layout,
            'seq_len': seq_len, 'columns': columns, 'tokenizer': tokenizer, 'streams': streams,
            'domains': domains, 'inputs': inputs, 'options': options}


def write_convert_info(root: str, info: dict[str, Any]) -> None:
    """Write ``info`` as ``<root>/mads_convert.json`` (sorted keys: the same record, same bytes)."""
    with open(os.path.join(root, CONVERT_INFO_NAME), 'w', encoding='utf-8') as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write('\n')


def read_convert_info(root: str) -> Optional[dict[str, Any]]:
    """The ``mads_convert.json`` record of a dataset written by ``mads convert``, or ``None``."""
    path = os.path.join(root, CONVERT_INFO_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        info = json.load(f)
    if info.get('format') != CONVERT_FORMAT:
        raise ConvertError(f'{path} is not a mads convert record (its "format" is not '
                           f'{CONVERT_FORMAT!r}): remove it, or re-convert the dataset.')
    _check_names(info, root, path)
    return info


def _check_names(info: dict[str, Any], root: str, path: str) -> None:
    """Refuse a record whose tokenizer path or files, or stream paths, leave ``root``: they are
    joined to it to fetch (replacing what is there), read and find files."""
    tok = info.get('tokenizer') or {}
    if tok.get('path') is not None:
        contained_path(root, tok['path'], f'the tokenizer path in {path}', ConvertError)
        tok_dir = os.path.join(root, tok['path'].split('/')[0])
        files = tok.get('files') or []
        for name in files if isinstance(files, list) else [files]:
            contained_path(tok_dir, name, f'a tokenizer file in {path}', ConvertError)
    for stream in info.get('streams') or []:
        if stream.get('path', '') != '':  # '' is the record's own directory (layout single).
            contained_path(root, stream['path'], f'a stream path in {path}', ConvertError)


def find_convert_info(dirs: Iterable[str]) -> Optional[tuple[str, dict[str, Any]]]:
    """The first ``mads_convert.json`` in one of ``dirs`` or its parent (a ``--layout streams``
    output keeps it one level above each stream): ``(root, record)``, or ``None``."""
    for directory in dirs:
        for root in (directory, os.path.dirname(os.path.normpath(directory))):
            info = read_convert_info(root)
            if info is not None:
                return root, info
    return None


def fetch_convert_info(remote: str, local: str, fresh: bool = False) -> Optional[dict[str, Any]]:
    """Copy the record in the remote directory ``remote``, and the tokenizer files it lists, into
    the local directory ``local``.

    A tokenizer file that cannot be fetched is left missing: loading the tokenizer then names it.

    Args:
        remote (str): Remote (or local) directory that may hold a ``mads_convert.json``.
        local (str): Local directory to copy it into (its tokenizer below it, as on the remote).
        fresh (bool): Delete the local copies first. Leave it ``False`` where ranks of a node share
            ``local``: each copy is then only ever replaced whole, never seen missing.
            Defaults to ``False``.

    Returns:
        dict[str, Any], optional: The record, or ``None`` if ``remote`` has none.
    """
    record = os.path.join(local, CONVERT_INFO_NAME)
    if not try_download(join_path(remote, CONVERT_INFO_NAME), record, fresh):
        return None
    info = read_convert_info(local)  # Its names checked before any tokenizer file is fetched.
    tok = (info or {}).get('tokenizer') or {}
    if tok.get('path'):
        tok_dir = tok['path'].split('/')[0]
        for name in tok.get('files', []):
            try_download(join_path(remote, tok_dir, name), os.path.join(local, tok_dir, name),
                         fresh)
    return info
