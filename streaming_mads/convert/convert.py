"""``mads convert``: text (jsonl, Parquet, text files, directories) to MDS shards, one stream per
domain.

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
* ``'text'``: one sample per document, column ``text`` (``str``), plus jsonl/Parquet metadata
  fields (a field that is in no record is refused: it would be an empty column).

Bad input: a binary file is refused (naming it and the formats read); a bad jsonl line (invalid
JSON, no text field) or an empty input is an error naming the file and line, or, with
``skip_bad``, skipped and counted in the summary.

Beside the shards, ``<out>/mads_convert.json`` records the streams, per-domain counts, columns and
the tokeniser (saved in ``<out>/tokenizer/``, a Hugging Face tokenizer directory for trained and
file tokenisers), which ``mads label`` reads to find the streams and to decode tokens (the
record's schema and readers are in :mod:`streaming_mads.convert_record`). Each shard's
``xxh3_64`` hash is recorded in ``index.json`` by default, which binds sidecar labels to shard
content (see :mod:`streaming_mads.labels`).

Memory: a document longer than 64K characters is tokenised in pieces cut at word starts (same
ids, see :func:`text_pieces`), so peak memory holds the document's text once plus a bounded
working set, whatever its length.

Determinism: inputs are read in the order given (directories in sorted order), tokenisers and
MDSWriter are deterministic and nothing time-dependent is written, so the same inputs and options
give byte-identical output. The output is built in ``<out>.mads-tmp`` and renamed into place, so
an interrupted run never leaves a half-written dataset at ``out``. See docs/architecture.md.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

from streaming_mads.convert.inputs import (DEFAULT_INCLUDE, Doc, Input, ReadLog, ReadOptions,
                                           default_domain, list_files, parse_input, read_file,
                                           text_pieces)
from streaming_mads.convert.samples import DomainStats, EncodeBatch, Sink
from streaming_mads.convert_record import (CONVERT_INFO_NAME, ConvertError, make_convert_info,
                                           write_convert_info)
from streaming_mads.tokenizer import (TOKENIZER_DIRNAME, Tokenizer, load_tokenizer, token_dtype,
                                     train_bpe)

__all__ = [
    'ConvertError', 'Input', 'DomainStats', 'ConvertSummary', 'convert', 'parse_input',
    'DEFAULT_INCLUDE', 'DEFAULT_HASHES', 'text_pieces'
]

_DOMAIN_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')
# Recorded per shard in index.json unless --hashes says otherwise: it makes the index (and so the
# sidecar labels' fingerprint of it) change with shard content, and lets readers verify shards.
DEFAULT_HASHES = ('xxh3_64',)


@dataclass
class ConvertSummary:
    """What ``convert`` wrote.

    Attributes:
        out (str): Output directory.
        streams (list[dict]): ``{'name', 'path', 'domains', 'samples'}`` per stream written.
        domains (dict[str, DomainStats]): Counts per domain.
        info (dict): The ``mads_convert.json`` record.
        read (ReadLog): What reading met besides documents: lines skipped with ``skip_bad`` (by
            reason) and files without a document.
    """
    out: str
    streams: list[dict[str, Any]]
    domains: dict[str, DomainStats]
    info: dict[str, Any] = field(default_factory=dict)
    read: ReadLog = field(default_factory=ReadLog)

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
        if self.read.report():
            lines.append(self.read.report())
        return '\n'.join(lines)


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
            skip_bad: bool = False,
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
        text_field (str): Field of a jsonl object (or Parquet column) holding the text. Defaults
            to ``'text'``.
        meta_fields (Sequence[str]): jsonl/Parquet fields copied as ``str`` columns (text mode
            only); each must be in at least one record.
        domain_field (str, optional): jsonl/Parquet field naming each document's domain
            (overrides the input's domain).
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
        skip_bad (bool): Skip and count bad jsonl lines and Parquet rows (invalid JSON or UTF-8,
            no text field, ...) and empty files, instead of stopping at the first. Defaults to
            ``False``.
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
    opts = ReadOptions(text_field, tuple(meta_fields), domain_field, tuple(include), doc_split,
                        encoding_errors, skip_bad)

    out = os.path.normpath(out)
    _check_out(out, overwrite)
    plan = []  # (input, its domain, its files)
    for inp in ins:
        domain = inp.domain or default_domain(inp.path)
        _check_domain(domain, layout, f'input {inp.path}')
        plan.append((inp, domain, list_files(inp, include, skip_bad)))
    total_bytes = sum(os.path.getsize(f) for _, _, files in plan for f in files)
    log = ReadLog()

    def documents(bar: Any = None) -> Iterator[tuple[Input, Optional[Doc]]]:
        nonlocal log
        log = ReadLog()  # What the last pass read (tokenizer='train' reads twice).
        for inp, domain, files in plan:
            for path in files:
                for doc, nbytes in read_file(path, domain, opts, log):
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

        sinks: dict[str, Sink] = {}
        stats: dict[str, DomainStats] = {}
        docs_per_input = {inp: 0 for inp in ins}

        def sink_for(domain: str, where: str) -> Sink:
            if domain not in sinks:
                _check_domain(domain, layout, where)
                stream = '' if layout == 'single' else domain
                if stream not in writers:
                    writers[stream] = MDSWriter(out=os.path.join(tmp, stream) if stream else tmp,
                                                columns=columns, compression=compression,
                                                hashes=sorted(hashes) or None,
                                                size_limit=size_limit, exist_ok=False)
                stats[domain] = DomainStats()
                sinks[domain] = Sink(writers[stream], domain, stats[domain], mode, seq_len,
                                      tok.eos_id if tok else 0, dtype or 'uint16',
                                      layout == 'single')
            return sinks[domain]

        batch = EncodeBatch(tok, mode)
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
            if n == 0 and not skip_bad:
                raise ConvertError(f'Input {inp.path} is empty (no non-blank document): remove it, '
                                   'check --text-field / --include, or pass --skip-bad to skip '
                                   '(and count) empty files.')
        if not any(docs_per_input.values()):
            raise ConvertError(f'No document in any input ({log.report()}): check the inputs and '
                               '--text-field / --include.')
        unknown = [k for k in meta_fields if k not in log.meta_found]
        if unknown:
            raise ConvertError(f'--meta-fields {", ".join(unknown)}: in no record (fields seen: '
                               f'{", ".join(sorted(log.fields_seen)) or "none"}): check the '
                               'spelling; each would be an empty column.')
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
            streams.append({'name': stream or default_domain(out), 'path': stream, 'domains': doms,
                            'samples': sum(stats[d].samples for d in doms)})
        info = make_convert_info(
            mode=mode,
            layout=layout,
            seq_len=seq_len if mode == 'tokens' else None,
            columns=columns,
            tokenizer=tok_record or None,
            streams=streams,
            domains={d: vars(s) for d, s in sorted(stats.items())},
            inputs=[{'path': i.path, 'domain': i.domain} for i in ins],
            options={'text_field': text_field, 'meta_fields': list(meta_fields),
                     'domain_field': domain_field, 'include': list(include),
                     'doc_split': doc_split, 'encoding_errors': encoding_errors,
                     'size_limit': size_limit, 'compression': compression,
                     'hashes': sorted(hashes), 'skip_bad': skip_bad,
                     'vocab_size': vocab_size if tokenizer == 'train' else None})
        write_convert_info(tmp, info)
    except BaseException:
        for writer in writers.values():
            writer.cancel_future_jobs()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    return ConvertSummary(out, streams, dict(sorted(stats.items())), info, log)


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

