"""Reading ``mads convert``'s inputs: files and directories to documents with a domain and metadata.

Kept apart from writing so that what counts as a document (a jsonl line, a text file, or a
blank-line paragraph) and how bytes are decoded are decided in one place; long documents are cut
into bounded pieces at word starts (:func:`text_pieces`). See docs/architecture.md.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import os
import re
from dataclasses import dataclass
from typing import IO, Any, Iterator, Optional, Sequence

from streaming_mads.convert_record import ConvertError

__all__ = ['DEFAULT_INCLUDE', 'PIECE_CHARS', 'Input', 'parse_input', 'default_domain',
           'ReadOptions', 'Doc', 'list_files', 'read_jsonl', 'read_text', 'is_jsonl', 'text_pieces']

DEFAULT_INCLUDE = ('*.txt', '*.md', '*.rst', '*.text', '*.jsonl', '*.jsonl.gz', '*.jsonl.zst')
_JSONL_SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.ndjson', '.json')
# Memory bound of tokenisation: a document longer than PIECE_CHARS is encoded in pieces of about
# that many characters (fast tokenizers keep ~150 bytes of bookkeeping per input character while
# encoding, so this bounds their working set whatever a document's size).
PIECE_CHARS = 1 << 16


@dataclass(frozen=True)
class Input:
    """One input of ``mads convert``.

    Args:
        path (str): A jsonl file (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``), a text file, or a
            directory searched recursively for files matching the include globs.
        domain (str, optional): Domain of its documents; defaults to the file's or directory's
            name without extensions.
    """
    path: str
    domain: Optional[str] = None


def parse_input(arg: str) -> Input:
    """Parse a command-line input: ``PATH`` or ``DOMAIN=PATH`` (an existing path wins)."""
    if '=' in arg and not os.path.exists(arg):
        domain, path = arg.split('=', 1)
        return Input(path, domain or None)
    return Input(arg)


def default_domain(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    for suffix in ('.gz', '.zst'):
        name = name[:-len(suffix)] if name.endswith(suffix) else name
    return name.split('.', 1)[0] or name


@dataclass(frozen=True)
class ReadOptions:
    text_field: str
    meta_fields: tuple[str, ...]
    domain_field: Optional[str]
    include: tuple[str, ...]
    doc_split: str
    encoding_errors: str


@dataclass
class Doc:
    text: str
    domain: str
    meta: dict[str, str]


def list_files(inp: Input, include: Sequence[str]) -> list[str]:
    path = inp.path
    if not os.path.exists(path):
        raise ConvertError(f'Input {path} does not exist: check the path (inputs are files or '
                           'directories, optionally as DOMAIN=PATH).')
    if os.path.isfile(path):
        if os.path.getsize(path) == 0:
            raise ConvertError(f'Input {path} is empty: remove it or give a file with text.')
        return [path]
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), path)
            if name.startswith('.'):
                continue
            if any(fnmatch.fnmatch(name, g) or fnmatch.fnmatch(rel, g) for g in include):
                files.append(os.path.join(dirpath, name))
    if not files:
        raise ConvertError(f'Input directory {path} has no files matching --include '
                           f'{" ".join(include)}: add a glob that matches its files.')
    return files


def _open_binary(path: str) -> tuple[IO[bytes], IO[bytes]]:
    """(stream of decompressed bytes, raw file whose position tracks progress)."""
    try:
        raw = open(path, 'rb')
    except OSError as err:
        raise ConvertError(f'Cannot read input {path}: {err.strerror}: check its permissions.') from err
    if path.endswith('.gz'):
        return gzip.GzipFile(fileobj=raw), raw
    if path.endswith('.zst'):
        import zstandard
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), raw
    return raw, raw


def _decode(data: bytes, path: str, where: str, errors: str) -> str:
    try:
        return data.decode('utf-8', errors=errors)
    except UnicodeDecodeError as err:
        raise ConvertError(f'{path}{where}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset '
                           f'{err.start}): re-encode it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) '
                           'or pass --encoding-errors replace.') from None


def _meta_value(value: Any) -> str:
    if value is None:
        return ''
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def read_jsonl(path: str, domain: str, opts: ReadOptions) -> Iterator[tuple[Optional[Doc], int]]:
    stream, raw = _open_binary(path)
    pos = 0
    with raw, stream:
        for lineno, line in enumerate(stream, 1):
            now = raw.tell()
            delta, pos = now - pos, now
            if not line.strip():
                yield None, delta
                continue
            where = f':{lineno}'
            text_line = _decode(line, path, where, opts.encoding_errors)
            try:
                obj = json.loads(text_line)
            except ValueError as err:
                raise ConvertError(f'{path}{where}: invalid JSON ({err}): each line of a jsonl file '
                                   'must be one JSON object.') from None
            if not isinstance(obj, dict):
                raise ConvertError(f'{path}{where}: expected a JSON object, got {type(obj).__name__}.')
            if opts.text_field not in obj:
                raise ConvertError(f'{path}{where}: no field {opts.text_field!r} (fields: '
                                   f'{", ".join(sorted(obj)) or "none"}): pass the field that holds '
                                   'the text as --text-field.')
            text = obj[opts.text_field]
            if not isinstance(text, str):
                raise ConvertError(f'{path}{where}: field {opts.text_field!r} is '
                                   f'{type(text).__name__}, not a string.')
            doc_domain = domain
            if opts.domain_field is not None:
                if obj.get(opts.domain_field) in (None, ''):
                    raise ConvertError(f'{path}{where}: no domain field {opts.domain_field!r}: give '
                                       'every document one, or drop --domain-field.')
                doc_domain = _meta_value(obj[opts.domain_field])
            meta = {k: _meta_value(obj.get(k)) for k in opts.meta_fields}
            yield (Doc(text, doc_domain, meta) if text.strip() else None), delta


def read_text(path: str, domain: str, opts: ReadOptions) -> Iterator[tuple[Optional[Doc], int]]:
    stream, raw = _open_binary(path)
    with raw, stream:
        data = stream.read()
        size = raw.tell()
    text = _decode(data, path, '', opts.encoding_errors)
    del data  # This generator lives as long as its documents: hold the text only once.
    meta = {k: '' for k in opts.meta_fields}
    if opts.doc_split == 'file':
        parts = [text]
    elif opts.doc_split == 'line':
        parts = text.splitlines()
    else:
        parts = re.split(r'\n[ \t\r]*\n', text)
    docs = [Doc(p, domain, meta) for p in parts if p.strip()]
    for i, doc in enumerate(docs):
        yield doc, size if i == 0 else 0
    if not docs:
        yield None, size


def is_jsonl(path: str) -> bool:
    return any(path.endswith(s) for s in _JSONL_SUFFIXES)


def _cut(text: str, lo: int, hi: int) -> int:
    """Where to end a piece in ``text[lo:hi]``: the last single space between two non-spaces.

    Byte-level BPE (GPT-2's pre-tokenizer regex, as ``--tokenizer train`` uses) and whitespace
    pre-tokenizers start a word at such a space and never join it to the word before, so pieces
    cut there encode to exactly the ids of the whole text (the bytes tokenizer is exact at any
    cut). With no such space (e.g. a long run without whitespace) the piece ends at ``hi``, and
    the tokens at that cut may differ from the whole's, as they may for a tokenizer whose
    normaliser strips leading spaces.
    """
    i = text.rfind(' ', lo + 1, hi)
    while i > lo:
        if not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace():
            return i
        i = text.rfind(' ', lo + 1, i)
    return hi


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of at most ``size`` characters, cut at word starts.

    Why: tokenising a long document at once costs memory proportional to its length (about
    150 bytes per character for fast tokenizers); pieces keep it bounded. See :func:`_cut` for
    why the ids do not change.
    """
    start = 0
    while len(text) - start > size:
        end = _cut(text, start + size // 2, start + size)
        yield text[start:end]
        start = end
    yield text[start:]
