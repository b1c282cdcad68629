"""``mads convert`` tokenises long documents in pieces: same ids, bounded memory."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Callable

import numpy as np
import pytest

from streaming_mads.convert.convert import convert, text_pieces
from streaming_mads.tokenizer import train_bpe

MB = 1 << 20
WORDS = 'The river runs through the valley; farmers grow wheat (since 1834), and  trade\n'
needs_proc = pytest.mark.skipif(not os.path.exists('/proc/self/clear_refs') or
                                'fork' not in mp.get_all_start_methods(),
                                reason='measures peak RSS through Linux /proc and fork')


def _status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'no {field} in /proc/self/status')


def _child(conn, prepare: Callable[[], object], run: Callable[[object], None]) -> None:
    try:
        arg = prepare()
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # Reset the peak RSS (VmHWM) to the current RSS.
        base = _status_kb('VmRSS')
        run(arg)
        conn.send(('ok', (_status_kb('VmHWM') - base) * 1024))
    except BaseException:  # Reported to the parent, which fails the test with it.
        conn.send(('error', traceback.format_exc()))


def peak_growth(run: Callable[[object], None], prepare: Callable[[], object] = lambda: None) -> int:
    """Bytes the peak RSS of a forked child grows by while ``run`` runs (after ``prepare``).

    A fork inherits this process's imports (torch, Streaming), so what is measured is the
    conversion alone, in seconds instead of the minute a fresh interpreter would take here.
    """
    ctx = mp.get_context('fork')
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(child, prepare, run))
    proc.start()
    try:
        assert parent.poll(300), 'the conversion did not finish in 300 s'
        status, value = parent.recv()
    finally:
        proc.join(30)
    assert status == 'ok', value
    return value


def _bpe():
    text = ' '.join(WORDS.split() * 20) + ' \u00e9t\u00e9 caf\u00e9 1234567 !!'
    return train_bpe([text, WORDS * 5], vocab_size=320)


def test_pieces_encode_exactly_like_the_whole_document():
    tok = _bpe()
    text = (WORDS * 40 + 'caf\u00e9  \u00e9t\u00e9\t\n\n  x ') * 3 + 'y' * 300 + WORDS * 10
    pieces = list(text_pieces(text, size=64))
    assert ''.join(pieces) == text and len(pieces) > 50
    assert all(len(p) <= 64 for p in pieces)
    spaced = text[:text.index('y' * 300)]  # Cuts fall between words there.
    pieces = list(text_pieces(spaced, size=64))
    whole = tok.encode_batch([spaced])[0]
    assert np.array_equal(np.concatenate(tok.encode_batch(pieces)), whole)
    assert list(text_pieces('short', size=64)) == ['short']


def _write_document(path, size: int) -> None:
    reps = size // len(WORDS) + 1
    with open(path, 'w') as f:
        f.write((WORDS * reps)[:size])


@needs_proc
def test_a_50mb_document_converts_in_bounded_memory(tmp_path):
    """One 50 MB document: peak memory must not grow with it (tokenised at once it took ~940 MB
    more, 8 bytes of int64 ids per byte plus a copy; now ~130 MB: the text and one shard)."""
    doc = tmp_path / 'long.txt'
    _write_document(doc, 50 * MB)
    out = tmp_path / 'out'
    seq = 4096

    def run(_):
        convert([str(doc)], str(out), seq_len=seq, size_limit='16mb', progress=False)

    growth = peak_growth(run)
    assert growth < 256 * MB, f'peak RSS grew by {growth / MB:.0f} MB for a 50 MB document'
    from streaming import StreamingDataset
    ds = StreamingDataset(local=str(out / 'long'), batch_size=1, shuffle=False)
    assert len(ds) == (50 * MB + 1) // seq  # Every byte (and the final EOS) is in a sample.
    with open(doc, 'rb') as f:
        head = np.frombuffer(f.read(seq), np.uint8)
        f.seek(seq * (len(ds) - 1))
        tail = np.frombuffer(f.read(seq), np.uint8)
    assert np.array_equal(ds[0]['tokens'], head)
    assert np.array_equal(ds[len(ds) - 1]['tokens'], tail)


@needs_proc
def test_a_long_document_with_a_bpe_tokenizer_stays_small(tmp_path):
    """Fast tokenizers keep ~150 bytes per character while encoding: a 2 MB document took ~300 MB
    more at once; in pieces it stays under 128 MB, with the ids of the whole document."""
    doc = tmp_path / 'long.txt'
    _write_document(doc, 2 * MB)
    tok_path = tmp_path / 'tokenizer.json'
    tok_path.write_text(_bpe().tok.to_str())
    out = tmp_path / 'out'

    def run(_):
        convert([str(doc)], str(out), seq_len=512, tokenizer=str(tok_path), progress=False)

    growth = peak_growth(run)
    assert growth < 128 * MB, f'peak RSS grew by {growth / MB:.0f} MB for a 2 MB document'
    from streaming import StreamingDataset

    from streaming_mads.tokenizer import load_tokenizer
    ds = StreamingDataset(local=str(out / 'long'), batch_size=1, shuffle=False)
    first = load_tokenizer(str(tok_path)).encode_batch([doc.read_text()[:4096]])[0]
    assert np.array_equal(ds[0]['tokens'], first[:512])
