"""Documents to MDS samples: tokenised in bounded batches, concatenated per domain, cut to ``seq_len``.

A sink per domain keeps that domain's pending tokens, so chunks never mix domains; a batch
bounds the characters in flight in the tokenizer. See docs/architecture.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from numpy.typing import NDArray

from streaming_mads.convert.inputs import Doc, text_pieces
from streaming_mads.tokenizer import Tokenizer

__all__ = ['DomainStats', 'Sink', 'EncodeBatch', 'ENCODE_BATCH', 'BATCH_CHARS']

# A batch handed to the tokenizer holds at most ENCODE_BATCH pieces and BATCH_CHARS characters,
# which bounds the tokenizer's working set (~80 MB).
ENCODE_BATCH = 256
BATCH_CHARS = 1 << 19


@dataclass
class DomainStats:
    """Counts of one domain: documents read, samples written, tokens in samples, tokens dropped."""
    documents: int = 0
    samples: int = 0
    tokens: int = 0
    dropped_tokens: int = 0


class Sink:
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

    def add_text(self, doc: Doc, ntokens: int) -> None:
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


class EncodeBatch:
    """Documents waiting to be tokenised together, as pieces of bounded total length.

    Why: tokenizers encode a batch in parallel, but their memory grows with the characters in
    flight, so a batch ends at ``ENCODE_BATCH`` pieces or ``BATCH_CHARS`` characters and a
    long document is split by :func:`text_pieces`; its pieces reach its sink in order, EOS after
    the last.
    """

    def __init__(self, tok: Optional[Tokenizer], mode: str) -> None:
        self.tok = tok
        self.mode = mode
        self.items: list[tuple[Sink, Doc, str, bool]] = []  # (sink, doc, piece, last piece)
        self.chars = 0
        self.doc_tokens = 0  # Tokens of the current document's pieces so far (text mode).

    def add(self, sink: Sink, doc: Doc) -> None:
        pieces = text_pieces(doc.text)
        piece = next(pieces)
        for following in pieces:
            self._append(sink, doc, piece, False)
            piece = following
        self._append(sink, doc, piece, True)

    def _append(self, sink: Sink, doc: Doc, piece: str, last: bool) -> None:
        self.items.append((sink, doc, piece, last))
        self.chars += len(piece)
        if len(self.items) >= ENCODE_BATCH or self.chars >= BATCH_CHARS:
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
