"""``mads convert``: text (jsonl, text files, directories) to MDS shards, one stream per domain.

Output layouts (``layout``):

* ``'streams'`` (default): ``<out>/<domain>/index.json`` + shards, one Streaming stream per domain,
  so the domain of a sample is the stream it belongs to and a mixture is set per stream.
* ``'single'``: ``<out>/index.json`` + shards, one stream with a ``domain`` column.

Sample modes (``mode``):

* ``'tokens'`` (default): documents are tokenised, each followed by EOS, concatenated per domain
  and cut into samples of exactly ``seq_len`` tokens (column ``tokens``, MDS encoding
  ``ndarray:uint16:<seq_len>``, or ``uint32`` for vocabularies over 65536 ids), as pretraining
  pipelines do. Chunks never mix domains. The last partial chunk of each domain is dropped (and
  counted in the summary), as llm-foundry's concatenating converter does.
* ``'text'``: one sample per document, column ``text`` (``str``), plus jsonl metadata fields.

Beside the shards, ``<out>/mads_convert.json`` records the streams, per-domain counts, columns and
the tokeniser (saved in ``<out>/tokenizer/``, a Hugging Face tokenizer directory for trained and
file tokenisers), which ``mads label`` reads to find the streams and to decode tokens. Each
shard's ``xxh3_64`` hash is recorded in ``index.json`` by default, which binds sidecar labels to
shard content (see :mod:`streaming_mads.labels`).

Memory: a document longer than 64K characters is tokenised in pieces cut at word starts (same
ids, see :func:`text_pieces`), so peak memory holds the document's text once plus a bounded
working set, whatever its length.

Determinism: inputs are read in the order given (directories in sorted order), tokenisers and
MDSWriter are deterministic and nothing time-dependent is written, so the same inputs and options
give byte-identical output. The output is built in ``<out>.mads-tmp`` and renamed into place, so
an interrupted run never leaves a half-written dataset at ``out``.
"""

from __future__ import annotations

import fnmatch
import gzip
import io
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from numpy.typing import NDArray

from streaming_mads.tokenizer import (TOKENIZER_DIRNAME, Tokenizer, load_tokenizer, token_dtype,
                                     train_bpe)

__all__ = [
    'ConvertError', 'Input', 'DomainStats', 'ConvertSummary', 'convert', 'parse_input',
    'read_convert_info', 'CONVERT_INFO_NAME', 'DEFAULT_INCLUDE', 'DEFAULT_HASHES', 'text_pieces'
]

CONVERT_INFO_NAME = 'mads_convert.json'
CONVERT_FORMAT = 'mads-convert'
DEFAULT_INCLUDE = ('*.txt', '*.md', '*.rst', '*.text', '*.jsonl', '*.jsonl.gz', '*.jsonl.zst')
_JSONL_SUFFIXES = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.ndjson', '.json')
_DOMAIN_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')
_ENCODE_BATCH = 256
# Memory bound of tokenisation: a document longer than _PIECE_CHARS is encoded in pieces of about
# that many characters, and a batch handed to the tokenizer holds at most _BATCH_CHARS characters.
# Fast tokenizers keep ~150 bytes of bookkeeping per input character while encoding, so these
# bound the tokenizer's working set (~80 MB) whatever a document's size.
_PIECE_CHARS = 1 << 16
_BATCH_CHARS = 1 << 19
# Recorded per shard in index.json unless --hashes says otherwise: it makes the index (and so the
# sidecar labels' fingerprint of it) change with shard content, and lets readers verify shards.
DEFAULT_HASHES = ('xxh3_64',)


class ConvertError(ValueError):
    """An input cannot be converted; the message names the input and the fix."""


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


def _default_domain(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    for suffix in ('.gz', '.zst'):
        name = name[:-len(suffix)] if name.endswith(suffix) else name
    return name.split('.', 1)[0] or name


@dataclass
class DomainStats:
    """Counts of one domain: documents read, samples written, tokens in samples, tokens dropped."""
    documents: int = 0
    samples: int = 0
    tokens: int = 0
    dropped_tokens: int = 0


@dataclass
class ConvertSummary:
    """What ``convert`` wrote.

    Attributes:
        out (str): Output directory.
        streams (list[dict]): ``{'name', 'path', 'domains', 'samples'}`` per stream written.
        domains (dict[str, DomainStats]): Counts per domain.
        info (dict): The ``mads_convert.json`` record.
    """
    out: str
    streams: list[dict[str, Any]]
    domains: dict[str, DomainStats]
    info: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        """The per-domain summary as a text table."""
        rows = [('domain', 'documents', 'samples', 'tokens', 'dropped')]
        tot = DomainStats()
        for name, s in self.domains.items():
            rows.append((name, str(s.documents), str(s.samples), str(s.tokens), str(s.dropped_tokens)))
            tot.documents += s.documents
            tot.samples += s.samples
            tot.tokens += s.tokens
            tot.dropped_tokens += s.dropped_tokens
        rows.append(('total', str(tot.documents), str(tot.samples), str(tot.tokens),
                     str(tot.dropped_tokens)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, '-' * len(lines[0]))
        lines.insert(len(lines) - 1, '-' * len(lines[0]))
        return '\n'.join(lines)


def read_convert_info(root: str) -> Optional[dict[str, Any]]:
    """The ``mads_convert.json`` record of a dataset written by ``mads convert``, or ``None``."""
    path = os.path.join(root, CONVERT_INFO_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        info = json.load(f)
    if info.get('format') != CONVERT_FORMAT:
        raise ConvertError(f'{path} is not a mads convert record.')
    return info


def find_convert_info(dirs: Iterable[str]) -> Optional[tuple[str, dict[str, Any]]]:
    """The first ``mads_convert.json`` in one of ``dirs`` or its parent (a ``--layout streams``
    output keeps it one level above each stream): ``(root, record)``, or ``None``."""
    for directory in dirs:
        for root in (directory, os.path.dirname(os.path.normpath(directory))):
            info = read_convert_info(root)
            if info is not None:
                return root, info
    return None


# ----------------------------------------------------------------------------------------------
# Reading documents.


@dataclass(frozen=True)
class _ReadOptions:
    text_field: str
    meta_fields: tuple[str, ...]
    domain_field: Optional[str]
    include: tuple[str, ...]
    doc_split: str
    encoding_errors: str


@dataclass
class _Doc:
    text: str
    domain: str
    meta: dict[str, str]


def _list_files(inp: Input, include: Sequence[str]) -> list[str]:
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


def _read_jsonl(path: str, domain: str, opts: _ReadOptions) -> Iterator[tuple[Optional[_Doc], int]]:
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
            yield (_Doc(text, doc_domain, meta) if text.strip() else None), delta


def _read_text(path: str, domain: str, opts: _ReadOptions) -> Iterator[tuple[Optional[_Doc], int]]:
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
    docs = [_Doc(p, domain, meta) for p in parts if p.strip()]
    for i, doc in enumerate(docs):
        yield doc, size if i == 0 else 0
    if not docs:
        yield None, size


def _is_jsonl(path: str) -> bool:
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


def text_pieces(text: str, size: int = _PIECE_CHARS) -> Iterator[str]:
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


# ----------------------------------------------------------------------------------------------
# Writing.


class _Sink:
    """Turns documents of one domain into samples and writes them to that domain's writer."""

    def __init__(self, writer: Any, domain: str, stats: DomainStats, mode: str, seq_len: int,
                 eos_id: int, dtype: str, domain_column: bool) -> None:
        self.writer = writer
        self.domain = domain
        self.stats = stats
        self.mode = mode
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.dtype = np.dtype(dtype)
        self.domain_column = domain_column
        self.pending: list[NDArray] = []
        self.pending_len = 0

    def add_text(self, doc: _Doc, ntokens: int) -> None:
        sample: dict[str, Any] = {'text': doc.text, **doc.meta}
        if self.domain_column:
            sample['domain'] = self.domain
        self.writer.write(sample)
        self.stats.samples += 1
        self.stats.tokens += ntokens

    def add_tokens(self, ids: NDArray, end: bool = True) -> None:
        """Append a document's ids (or one piece of them), then EOS if ``end``."""
        self.pending.append(ids)
        if end:
            self.pending.append(np.asarray([self.eos_id], np.int64))
        self.pending_len += len(ids) + int(end)
        if self.pending_len < self.seq_len:
            return
        flat = np.concatenate(self.pending)
        full = len(flat) // self.seq_len * self.seq_len
        for chunk in flat[:full].reshape(-1, self.seq_len):
            sample: dict[str, Any] = {'tokens': chunk.astype(self.dtype)}
            if self.domain_column:
                sample['domain'] = self.domain
            self.writer.write(sample)
            self.stats.samples += 1
            self.stats.tokens += self.seq_len
        rest = flat[full:]
        self.pending = [rest] if len(rest) else []
        self.pending_len = len(rest)

    def close(self) -> None:
        self.stats.dropped_tokens += self.pending_len
        self.pending, self.pending_len = [], 0


class _Batch:
    """Documents waiting to be tokenised together, as pieces of bounded total length.

    Why: tokenizers encode a batch in parallel, but their memory grows with the characters in
    flight, so a batch ends at ``_ENCODE_BATCH`` pieces or ``_BATCH_CHARS`` characters and a
    long document is split by :func:`text_pieces`; its pieces reach its sink in order, EOS after
    the last.
    """

    def __init__(self, tok: Optional[Tokenizer], mode: str) -> None:
        self.tok = tok
        self.mode = mode
        self.items: list[tuple[_Sink, _Doc, str, bool]] = []  # (sink, doc, piece, last piece)
        self.chars = 0
        self.doc_tokens = 0  # Tokens of the current document's pieces so far (text mode).

    def add(self, sink: _Sink, doc: _Doc) -> None:
        pieces = text_pieces(doc.text)
        piece = next(pieces)
        for following in pieces:
            self._append(sink, doc, piece, False)
            piece = following
        self._append(sink, doc, piece, True)

    def _append(self, sink: _Sink, doc: _Doc, piece: str, last: bool) -> None:
        self.items.append((sink, doc, piece, last))
        self.chars += len(piece)
        if len(self.items) >= _ENCODE_BATCH or self.chars >= _BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        texts = [piece for _, _, piece, _ in self.items]
        if self.tok is not None:
            encoded = self.tok.encode_batch(texts)
        else:  # Text mode with no tokenizer: only the byte count is recorded.
            encoded = [np.empty(len(t.encode('utf-8')), np.int8) for t in texts]
        for (sink, doc, _, last), ids in zip(self.items, encoded):
            if self.mode == 'tokens':
                sink.add_tokens(ids, end=last)
                continue
            self.doc_tokens += len(ids)
            if last:
                sink.add_text(doc, self.doc_tokens)
                self.doc_tokens = 0
        self.items.clear()
        self.chars = 0


def _progress(total: int, enabled: Optional[bool], desc: str, unit: str = 'B') -> Any:
    from tqdm import tqdm
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=disable, leave=False)


def convert(inputs: Sequence[Union[Input, str]],
            out: str,
            *,
            mode: str = 'tokens',
            layout: str = 'streams',
            seq_len: int = 2048,
            tokenizer: str = 'bytes',
            vocab_size: int = 8192,
            eos_token: Optional[str] = None,
            text_field: str = 'text',
            meta_fields: Sequence[str] = (),
            domain_field: Optional[str] = None,
            include: Sequence[str] = DEFAULT_INCLUDE,
            doc_split: str = 'file',
            encoding_errors: str = 'strict',
            size_limit: Union[int, str] = 1 << 26,
            compression: Optional[str] = 'zstd',
            hashes: Sequence[str] = DEFAULT_HASHES,
            overwrite: bool = False,
            progress: Optional[bool] = None) -> ConvertSummary:
    """Convert text inputs to MDS shards (see the module docstring for layouts and modes).

    Args:
        inputs (Sequence[Input | str]): Inputs, in order; a ``str`` is parsed by
            :func:`parse_input` (``PATH`` or ``DOMAIN=PATH``).
        out (str): Output directory (local). Must not exist unless ``overwrite``.
        mode (str): ``'tokens'`` (fixed-length token samples) or ``'text'``. Defaults to
            ``'tokens'``.
        layout (str): ``'streams'`` (a stream per domain) or ``'single'`` (one stream, ``domain``
            column). Defaults to ``'streams'``.
        seq_len (int): Tokens per sample in tokens mode. Defaults to ``2048``.
        tokenizer (str): ``'bytes'``, ``'train'`` (byte-level BPE trained on the inputs), or a
            local ``tokenizer.json`` / tokenizer directory. Defaults to ``'bytes'``.
        vocab_size (int): Vocabulary size when ``tokenizer='train'``. Defaults to ``8192``.
        eos_token (str, optional): Token that ends a document, if the tokenizer does not say.
        text_field (str): Field of a jsonl object holding the text. Defaults to ``'text'``.
        meta_fields (Sequence[str]): jsonl fields copied as ``str`` columns (text mode only).
        domain_field (str, optional): jsonl field naming each document's domain (overrides the
            input's domain).
        include (Sequence[str]): Globs selecting files inside input directories. Defaults to
            text, markdown and jsonl files.
        doc_split (str): How a text file is split into documents: ``'file'`` (one document),
            ``'line'`` or ``'paragraph'`` (blank-line separated). Defaults to ``'file'``.
        encoding_errors (str): ``'strict'`` (non-UTF-8 input is an error) or ``'replace'``.
        size_limit (int | str): Shard size limit before compression, e.g. ``'64mb'``.
        compression (str, optional): Shard compression. Defaults to ``'zstd'``.
        hashes (Sequence[str]): Streaming hash algorithms recorded per shard in ``index.json``.
            Defaults to ``('xxh3_64',)``, which binds sidecar labels to shard content; ``()``
            records none.
        overwrite (bool): Replace an existing output written by ``mads convert``.
        progress (bool, optional): Show a progress bar; ``None`` shows it on a terminal.

    Returns:
        ConvertSummary: Streams and per-domain counts written.
    """
    from streaming import MDSWriter

    _check_options(mode, layout, doc_split, encoding_errors, seq_len, meta_fields, size_limit,
                   compression, hashes)
    if not inputs:
        raise ConvertError('No inputs: give at least one file or directory.')
    ins = [parse_input(i) if isinstance(i, str) else i for i in inputs]
    opts = _ReadOptions(text_field, tuple(meta_fields), domain_field, tuple(include), doc_split,
                        encoding_errors)

    out = os.path.normpath(out)
    _check_out(out, overwrite)
    plan = []  # (input, its domain, its files)
    for inp in ins:
        domain = inp.domain or _default_domain(inp.path)
        _check_domain(domain, layout, f'input {inp.path}')
        plan.append((inp, domain, _list_files(inp, include)))
    total_bytes = sum(os.path.getsize(f) for _, _, files in plan for f in files)

    def documents(bar: Any = None) -> Iterator[tuple[Input, Optional[_Doc]]]:
        for inp, domain, files in plan:
            for path in files:
                reader = _read_jsonl if _is_jsonl(path) else _read_text
                for doc, nbytes in reader(path, domain, opts):
                    if bar is not None and nbytes:
                        bar.update(nbytes)
                    yield inp, doc

    tmp = out + '.mads-tmp'
    if os.path.exists(tmp):
        shutil.rmtree(tmp)  # Left by an interrupted run.
    os.makedirs(tmp)
    writers: dict[str, Any] = {}  # stream path -> MDSWriter
    try:
        tok: Optional[Tokenizer] = None
        tok_record: dict[str, Any] = {}
        if tokenizer == 'train':
            with _progress(total_bytes, progress, 'training BPE') as bar:
                tok = train_bpe((p for _, d in documents(bar) if d is not None
                                 for p in text_pieces(d.text)), vocab_size,
                                eos_token=eos_token or '<|endoftext|>')
        elif mode == 'tokens' or tokenizer != 'bytes':
            tok = load_tokenizer(tokenizer, eos_token)
        dtype = token_dtype(tok.vocab_size) if tok is not None else ''
        if mode == 'tokens':
            columns = {'tokens': f'ndarray:{dtype}:{seq_len}'}
        else:
            columns = {'text': 'str', **{k: 'str' for k in meta_fields}}
        if layout == 'single':
            columns['domain'] = 'str'

        sinks: dict[str, _Sink] = {}
        stats: dict[str, DomainStats] = {}
        docs_per_input = {inp: 0 for inp in ins}

        def sink_for(domain: str, where: str) -> _Sink:
            if domain not in sinks:
                _check_domain(domain, layout, where)
                stream = '' if layout == 'single' else domain
                if stream not in writers:
                    writers[stream] = MDSWriter(out=os.path.join(tmp, stream) if stream else tmp,
                                                columns=columns, compression=compression,
                                                hashes=sorted(hashes) or None,
                                                size_limit=size_limit, exist_ok=False)
                stats[domain] = DomainStats()
                sinks[domain] = _Sink(writers[stream], domain, stats[domain], mode, seq_len,
                                      tok.eos_id if tok else 0, dtype or 'uint16',
                                      layout == 'single')
            return sinks[domain]

        batch = _Batch(tok, mode)
        with _progress(total_bytes, progress, 'converting') as bar:
            for inp, doc in documents(bar):
                if doc is None:
                    continue
                docs_per_input[inp] += 1
                sink = sink_for(doc.domain, f'input {inp.path}')
                sink.stats.documents += 1
                batch.add(sink, doc)
            batch.flush()
        for inp, n in docs_per_input.items():
            if n == 0:
                raise ConvertError(f'Input {inp.path} is empty (no non-blank document): remove it '
                                   'or check --text-field / --include.')
        for sink in sinks.values():
            sink.close()
        for domain, s in stats.items():
            if s.samples == 0:
                raise ConvertError(f'Domain {domain!r} has {s.dropped_tokens} tokens, fewer than one '
                                   f'sample of --seq-len {seq_len}: lower --seq-len, add text, or '
                                   'use --mode text.')
        for writer in writers.values():
            writer.finish()
        if tok is not None:  # After the writers: MDSWriter wants an empty directory.
            tok_record = tok.save(os.path.join(tmp, TOKENIZER_DIRNAME))

        streams = []
        for stream in sorted(writers):
            doms = sorted(d for d in stats if (stream == '' or d == stream))
            streams.append({'name': stream or _default_domain(out), 'path': stream, 'domains': doms,
                            'samples': sum(stats[d].samples for d in doms)})
        info = {
            'format': CONVERT_FORMAT,
            'version': 1,
            'mode': mode,
            'layout': layout,
            'seq_len': seq_len if mode == 'tokens' else None,
            'columns': columns,
            'tokenizer': tok_record or None,
            'streams': streams,
            'domains': {d: vars(s) for d, s in sorted(stats.items())},
            'inputs': [{'path': i.path, 'domain': i.domain} for i in ins],
            'options': {'text_field': text_field, 'meta_fields': list(meta_fields),
                        'domain_field': domain_field, 'include': list(include),
                        'doc_split': doc_split, 'encoding_errors': encoding_errors,
                        'size_limit': size_limit, 'compression': compression,
                        'hashes': sorted(hashes),
                        'vocab_size': vocab_size if tokenizer == 'train' else None},
        }
        with open(os.path.join(tmp, CONVERT_INFO_NAME), 'w', encoding='utf-8') as f:
            json.dump(info, f, indent=1, sort_keys=True)
            f.write('\n')
    except BaseException:
        for writer in writers.values():
            writer.cancel_future_jobs()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    return ConvertSummary(out, streams, dict(sorted(stats.items())), info)


def _check_options(mode: str, layout: str, doc_split: str, encoding_errors: str, seq_len: int,
                   meta_fields: Sequence[str], size_limit: Union[int, str],
                   compression: Optional[str], hashes: Sequence[str]) -> None:
    """Refuse bad options before reading anything (MDSWriter's own errors are less clear)."""
    from streaming.base.compression import is_compression
    from streaming.base.hashing import is_hash
    from streaming.base.util import bytes_to_int

    if mode not in ('tokens', 'text'):
        raise ConvertError(f'Unknown mode {mode!r}: use "tokens" or "text".')
    if layout not in ('streams', 'single'):
        raise ConvertError(f'Unknown layout {layout!r}: use "streams" or "single".')
    if doc_split not in ('file', 'line', 'paragraph'):
        raise ConvertError(f'Unknown doc split {doc_split!r}: use "file", "line" or "paragraph".')
    if encoding_errors not in ('strict', 'replace'):
        raise ConvertError('--encoding-errors must be "strict" or "replace".')
    if mode == 'tokens' and seq_len < 2:
        raise ConvertError(f'--seq-len {seq_len} is too small: use at least 2.')
    if meta_fields and mode == 'tokens':
        raise ConvertError('--meta-fields applies to text mode only: token samples span several '
                           'documents.')
    reserved = {'text', 'tokens', 'domain'}
    if reserved & set(meta_fields):
        raise ConvertError(f'--meta-fields may not include {sorted(reserved & set(meta_fields))}: '
                           'those columns are written by convert itself.')
    try:
        limit = bytes_to_int(size_limit)
    except (ValueError, TypeError):
        limit = -1
    if not 0 < limit < 1 << 32:
        raise ConvertError(f'--size-limit {size_limit!r} is not a size between 1 byte and 4gb '
                           '(e.g. 64mb).')
    if compression and not is_compression(compression):
        raise ConvertError(f'Unknown compression {compression!r}: use zstd, zstd:LEVEL, gz, br, '
                           'bz2, snappy or none.')
    bad = [h for h in hashes if not is_hash(h)]
    if bad:
        raise ConvertError(f'Unknown shard hash(es) {bad}: use e.g. sha1, md5, xxh64.')


def _check_domain(domain: str, layout: str, where: str) -> None:
    if layout == 'streams' and (not _DOMAIN_RE.fullmatch(domain) or domain == TOKENIZER_DIRNAME):
        raise ConvertError(f'Domain {domain!r} of {where} cannot name a stream directory: use '
                           'letters, digits, "_", "-", "." (not "tokenizer"), or --layout single.')
    if not domain:
        raise ConvertError(f'Empty domain name for {where}.')


def _check_out(out: str, overwrite: bool) -> None:
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ConvertError(f'Output {out} exists and is not a directory: choose another --out.')
    if not os.listdir(out):
        return
    if not overwrite:
        raise ConvertError(f'Output {out} already exists: pass --overwrite to replace it (its '
                           'shards and labels are deleted) or choose another output.')
    if not os.path.isfile(os.path.join(out, CONVERT_INFO_NAME)):
        raise ConvertError(f'Refusing to overwrite {out}: it was not written by mads convert (no '
                           f'{CONVERT_INFO_NAME}). Delete it yourself or choose another output.')

