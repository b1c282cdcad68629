"""Reading ``mads convert``'s inputs: files and directories to documents with a domain and metadata.

Kept apart from writing so that what counts as a document (a jsonl line, a Parquet row, a text
file, or a blank-line paragraph) and how bytes are decoded are decided in one place; long
documents are cut into bounded pieces at word starts (:func:`text_pieces`). A binary file (NUL
bytes, or the signature of an archive, image or columnar format) is never read as text. A bad
line or row (invalid JSON, no text) is an error naming the file and line, or, with ``skip_bad``,
skipped and counted in a :class:`ReadLog`, which also records the files without a document and
the ``meta_fields`` met. See docs/architecture.md.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Iterator, Optional, Sequence

from streaming_mads.convert_record import ConvertError

__all__ = ['DEFAULT_INCLUDE', 'PIECE_CHARS', 'FORMATS', 'Input', 'parse_input', 'default_domain',
           'ReadOptions', 'ReadLog', 'Doc', 'list_files', 'read_file', 'read_jsonl', 'read_parquet',
           'read_text', 'is_jsonl', 'is_parquet', 'text_pieces']

DEFAULT_INCLUDE = ('*.txt', '*.md', '*.rst', '*.text', '*.jsonl', '*.jsonl.gz', '*.jsonl.zst',
                   '*.parquet')
_JSONL_SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.ndjson', '.json')
#: What ``mads convert`` reads, named when a file is none of these.
FORMATS = ('UTF-8 text files, jsonl (.jsonl, .jsonl.gz, .jsonl.zst, .ndjson, .json) and Parquet '
           '(.parquet)')
# Signatures of binary files (the first bytes), with what to do about each. Most binaries hold
# NUL bytes early as well; these catch the compressed ones that may not.
_MAGIC = (
    (b'PAR1', 'a Parquet file', 'give it a .parquet name'),
    (b'\x1f\x8b', 'gzip-compressed', 'give it a .gz name (e.g. .jsonl.gz)'),
    (b'(\xb5/\xfd', 'zstd-compressed', 'give it a .zst name (e.g. .jsonl.zst)'),
    (b'PK\x03\x04', 'a zip archive (or docx/xlsx/jar)', 'unpack it and convert its text files'),
    (b'\xfd7zXZ\x00', 'xz-compressed', 'decompress it first'),
    (b'7z\xbc\xaf\x27\x1c', 'a 7z archive', 'unpack it first'),
    (b'Obj\x01', 'an Avro file', 'write it as Parquet or jsonl'),
    (b'%PDF-', 'a PDF', 'extract its text first'),
    (b'\x89PNG', 'a PNG image', 'leave it out (--include)'),
    (b'\xff\xd8\xff', 'a JPEG image', 'leave it out (--include)'),
    (b'\x7fELF', 'an executable', 'leave it out (--include)'),
)
_BOMS = ((b'\xff\xfe', 'UTF-16'), (b'\xfe\xff', 'UTF-16'))
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
    skip_bad: bool = False


@dataclass
class Doc:
    text: str
    domain: str
    meta: dict[str, str]


#: How many field names :class:`ReadLog` keeps to name in an error.
_FIELDS_KEPT = 200


@dataclass
class ReadLog:
    """What reading the inputs met besides documents.

    Attributes:
        skipped (dict[str, int]): Lines (or rows) skipped under ``skip_bad``, by reason.
        first (dict[str, str]): Where each reason was first met (``path:line``).
        empty_files (list[str]): Files without a (non-blank) document.
        meta_found (set[str]): The ``meta_fields`` met in at least one record.
        fields_seen (set[str]): Field names met (with ``meta_fields`` only; the first
            :data:`_FIELDS_KEPT`), to name when one of ``meta_fields`` is in no record.
    """
    skipped: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)
    empty_files: list[str] = field(default_factory=list)
    meta_found: set[str] = field(default_factory=set)
    fields_seen: set[str] = field(default_factory=set)

    def bad(self, opts: ReadOptions, where: str, reason: str, message: str) -> None:
        """A bad line at ``where``: counted under ``reason`` with ``skip_bad``, else an error."""
        if not opts.skip_bad:
            raise ConvertError(f'{where}: {message} Or pass --skip-bad to skip (and count) bad '
                               'lines and empty files.')
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def saw(self, fields: Iterable[str], opts: ReadOptions) -> None:
        """A record with ``fields``: which ``meta_fields`` it has."""
        if opts.meta_fields:
            names = set(fields)
            self.meta_found.update(names.intersection(opts.meta_fields))
            if len(self.fields_seen) < _FIELDS_KEPT:
                self.fields_seen.update(sorted(names)[:_FIELDS_KEPT])

    def report(self) -> str:
        """One line on what was skipped (``''`` when nothing was)."""
        parts = []
        if self.skipped:
            reasons = ', '.join(f'{n} {r} (first at {self.first[r]})'
                                for r, n in sorted(self.skipped.items()))
            parts.append(f'{sum(self.skipped.values())} bad line(s): {reasons}')
        if self.empty_files:
            shown = ', '.join(self.empty_files[:5]) + (', ...' if len(self.empty_files) > 5 else '')
            parts.append(f'{len(self.empty_files)} empty file(s): {shown}')
        return f'skipped {"; ".join(parts)}' if parts else ''


def list_files(inp: Input, include: Sequence[str], skip_bad: bool = False) -> list[str]:
    path = inp.path
    if not os.path.exists(path):
        raise ConvertError(f'Input {path} does not exist: check the path (inputs are files or '
                           'directories, optionally as DOMAIN=PATH).')
    if os.path.isfile(path):
        if os.path.getsize(path) == 0 and not skip_bad:
            raise ConvertError(f'Input {path} is empty: remove it, give a file with text, or '
                               'pass --skip-bad to skip (and count) empty files.')
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


def _not_text(path: str, what: str, fix: str) -> ConvertError:
    return ConvertError(f'{path} is not text ({what}): mads convert reads {FORMATS}; {fix}.')


def _check_not_binary(head: bytes, path: str) -> None:
    """Refuse a file whose first bytes are a binary signature or hold a NUL byte."""
    for magic, what, fix in _MAGIC:
        if head.startswith(magic):
            raise _not_text(path, what, fix)
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            raise _not_text(path, f'{encoding} text', 're-encode it as UTF-8 (e.g. `iconv -f '
                            f'{encoding.lower()} -t utf-8`)')
    nul = head.find(b'\x00')
    if nul >= 0:
        raise _not_text(path, f'a binary file: NUL byte at offset {nul}',
                        'leave it out (--include), or re-encode it as UTF-8 if it is UTF-16 or '
                        'UTF-32 text')


def _peek(stream: IO[bytes], path: str, size: int = 8192) -> bytes:
    """The first bytes of ``stream`` (decompressed), without consuming them."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)  # gzip.BadGzipFile is one.
    if path.endswith('.zst'):
        import zstandard
        errors += (zstandard.ZstdError,)
    try:
        return stream.peek(size)[:size]  # type: ignore[attr-defined]
    except errors as err:
        raise ConvertError(f'Cannot read input {path}: {err}: check that it is compressed as its '
                           'name says (.gz: gzip, .zst: zstd).') from None


def _utf8_error(data: bytes, err: UnicodeDecodeError) -> str:
    return (f'not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}): re-encode it '
            'as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or pass --encoding-errors replace.')


def _decode(data: bytes, path: str, where: str, errors: str) -> str:
    try:
        return data.decode('utf-8', errors=errors)
    except UnicodeDecodeError as err:
        raise ConvertError(f'{path}{where}: {_utf8_error(data, err)}') from None


def _meta_value(value: Any) -> str:
    if value is None:
        return ''
    return value if isinstance(value, str) else \
        json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _record_doc(rec: dict[str, Any], where: str, domain: str, opts: ReadOptions,
                log: ReadLog) -> Optional[Doc]:
    """The document of one jsonl object or Parquet row (``None``: blank, or bad and skipped)."""
    if opts.text_field not in rec:
        log.bad(opts, where, f'no field {opts.text_field!r}',
                f'no field {opts.text_field!r} (fields: {", ".join(sorted(rec)) or "none"}): pass '
                'the field that holds the text as --text-field.')
        return None
    log.saw(rec, opts)
    text = rec[opts.text_field]
    if not isinstance(text, str):
        log.bad(opts, where, f'{opts.text_field!r} not a string',
                f'field {opts.text_field!r} is '
                f'{"null" if text is None else type(text).__name__}, not a string.')
        return None
    doc_domain = domain
    if opts.domain_field is not None:
        if rec.get(opts.domain_field) in (None, ''):
            log.bad(opts, where, f'no domain field {opts.domain_field!r}',
                    f'no domain field {opts.domain_field!r}: give every document one, or drop '
                    '--domain-field.')
            return None
        doc_domain = _meta_value(rec[opts.domain_field])
    meta = {k: _meta_value(rec.get(k)) for k in opts.meta_fields}
    return Doc(text, doc_domain, meta) if text.strip() else None


def read_jsonl(path: str, domain: str, opts: ReadOptions,
               log: ReadLog) -> Iterator[tuple[Optional[Doc], int]]:
    stream, raw = _open_binary(path)
    pos = 0
    with raw, stream:
        _check_not_binary(_peek(stream, path), path)
        for lineno, line in enumerate(stream, 1):
            now = raw.tell()
            delta, pos = now - pos, now
            if not line.strip():
                yield None, delta
                continue
            where = f'{path}:{lineno}'
            try:
                text_line = line.decode('utf-8', errors=opts.encoding_errors)
            except UnicodeDecodeError as err:
                log.bad(opts, where, 'not UTF-8', _utf8_error(line, err))
                yield None, delta
                continue
            try:
                obj = json.loads(text_line)
            except ValueError as err:
                log.bad(opts, where, 'invalid JSON', f'invalid JSON ({err}): each line of a jsonl '
                        'file must be one JSON object.')
                yield None, delta
                continue
            if not isinstance(obj, dict):
                log.bad(opts, where, 'not a JSON object',
                        f'expected a JSON object, got {type(obj).__name__}.')
                yield None, delta
                continue
            yield _record_doc(obj, where, domain, opts, log), delta


def _parquet() -> Any:
    try:
        import pyarrow.parquet
    except ImportError:
        raise ConvertError('Reading Parquet needs pyarrow: pip install '
                           "'streaming-mads[parquet]'.") from None
    return pyarrow.parquet


def read_parquet(path: str, domain: str, opts: ReadOptions,
                 log: ReadLog) -> Iterator[tuple[Optional[Doc], int]]:
    """Documents of a Parquet file: one per row, fields as for jsonl (columns are fields)."""
    pq = _parquet()
    size = os.path.getsize(path)
    if size == 0:
        return  # An empty file (skip_bad): no document.
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow.ArrowInvalid and OSError: not (valid) Parquet.
        raise ConvertError(f'Cannot read {path} as Parquet ({err}): check the file, or convert '
                           f'it from another format ({FORMATS}).') from None
    names = list(pf.schema_arrow.names)
    if opts.text_field not in names:
        raise ConvertError(f'{path}: no column {opts.text_field!r} (columns: {", ".join(names)}): '
                           'pass the column that holds the text as --text-field.')
    if opts.domain_field is not None and opts.domain_field not in names:
        raise ConvertError(f'{path}: no domain column {opts.domain_field!r} (columns: '
                           f'{", ".join(names)}): give every document one, or drop --domain-field.')
    wanted = {opts.text_field, *(k for k in opts.meta_fields if k in names)}
    if opts.domain_field is not None:
        wanted.add(opts.domain_field)
    columns = [n for n in names if n in wanted]
    rows, total, reported = 0, max(pf.metadata.num_rows, 1), 0
    log.saw(names, opts)
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for rec in batch.to_pylist():
            rows += 1
            done = size * rows // total
            delta, reported = done - reported, done
            rec = {k: v for k, v in rec.items() if v is not None or k == opts.text_field}
            yield _record_doc(rec, f'{path}:row {rows}', domain, opts, log), delta
    if size - reported:
        yield None, size - reported


def read_text(path: str, domain: str, opts: ReadOptions,
              log: ReadLog) -> Iterator[tuple[Optional[Doc], int]]:
    stream, raw = _open_binary(path)
    with raw, stream:
        _check_not_binary(_peek(stream, path), path)
        data = stream.read()
        size = raw.tell()
    if b'\x00' in data:
        _check_not_binary(data, path)
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


def is_parquet(path: str) -> bool:
    return path.endswith('.parquet')


def read_file(path: str, domain: str, opts: ReadOptions,
              log: ReadLog) -> Iterator[tuple[Optional[Doc], int]]:
    """The documents of one input file (``None`` for a blank or skipped one) with the bytes read
    since the previous; a file without a document is recorded in ``log.empty_files``."""
    reader = read_parquet if is_parquet(path) else read_jsonl if is_jsonl(path) else read_text
    found = False
    for doc, nbytes in reader(path, domain, opts, log):
        found = found or doc is not None
        yield doc, nbytes
    if not found:
        log.empty_files.append(path)


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
