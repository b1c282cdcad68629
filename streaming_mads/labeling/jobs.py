"""The per-shard work of ``mads label``, run in worker processes, and the pool that runs it.

Each shard of each pass is one job: a small frozen dataclass (picklable, so it can cross into a
worker) and a function that reads the shard, computes its part of the labels and saves it under
the work directory with an atomic rename, so a finished shard is never redone after an
interruption. The jobs know nothing of the run as a whole; :mod:`streaming_mads.labeling.label` decides
which shards need which job and merges their outputs. See docs/architecture.md.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
from numpy.typing import NDArray

from streaming_mads.convert_record import CONVERT_INFO_NAME
from streaming_mads.labeling.streams import LabelingError, StreamRef, load_shard
from streaming_mads.labels import atomic_save_npz
from streaming_mads.mds_formats import SampleDecoder, SampleFormatError, column_format
from streaming_mads.labeling.quality import load_scorer, score_texts
from streaming_mads.labeling.similarity import SimilarityModel, similarity_features
from streaming_mads.tokenizer import (Tokenizer, TokenizerError, load_tokenizer,
                                      tokenizer_from_record, tokenizer_identity)
from streaming_mads.labeling.topics import TermRows, TopicModel, term_rows

__all__ = ['TextSpec', 'text_spec', 'ShardJob', 'ScoreJob', 'run_score', 'AssignJob', 'run_assign',
           'JobPool', 'run_jobs']


@dataclass(frozen=True)
class TextSpec:
    """Where a sample's text comes from: a ``str`` column, or a token column plus tokenizer.

    ``identity`` is the tokenizer's :func:`~streaming_mads.tokenizer.tokenizer_identity` as JSON
    (recorded in the label manifest), and ``fix`` the ``--tokenizer`` an error should suggest.
    """
    column: str
    tokens: bool
    tokenizer: Optional[tuple[str, str]] = None  # (json record or spec, base dir)
    identity: Optional[str] = None
    fix: str = ''
    encoding: str = 'int64'  # token_encoding_type of legacy ``bytes`` ids


def text_spec(ref: StreamRef, info: Optional[dict[str, Any]], root: str, text_column: Optional[str],
              tokenizer: Optional[str], token_encoding_type: str = 'int64') -> TextSpec:
    """Decide, in the main process, which column of ``ref`` holds its text and how to decode it.

    Args:
        ref (StreamRef): The stream.
        info (dict[str, Any], optional): The dataset's ``mads_convert.json`` record, if any.
        root (str): Local dataset root (the tokenizer ``mads convert`` saved is found below it).
        text_column (str, optional): Column asked for; defaults to ``text``, else ``tokens``.
        tokenizer (str, optional): Tokenizer asked for; defaults to the one ``mads convert``
            recorded.
        token_encoding_type (str): Dtype of llm-foundry's legacy ``bytes`` token ids
            (:mod:`streaming_mads.mds_formats`). Defaults to ``'int64'``.

    Returns:
        TextSpec: What the worker jobs decode.
    """
    shard = ref.index['shards'][0] if ref.index['shards'] else None
    if shard is None:
        raise LabelingError(f'Stream {ref.name} has no shards.')
    encodings = dict(zip(shard['column_names'], shard['column_encodings']))
    cols = ', '.join(f'{k} ({v})' for k, v in encodings.items())
    if text_column is not None and text_column not in encodings:
        raise LabelingError(f'Stream {ref.name} has no column {text_column!r} (columns: {cols}).')
    try:
        kind, col = column_format(encodings, text_column or 'tokens', text_column or 'text',
                                  prefer_text=True, where=f'Stream {ref.name}',
                                  hint='Pass the column holding the text or token ids as '
                                       '--text-column.')
    except SampleFormatError as err:
        raise LabelingError(str(err)) from err
    if kind == 'text':
        return TextSpec(col, False)
    record = (info or {}).get('tokenizer')
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)  # Fail early, in the main process.
        spec = tokenizer if tokenizer == 'bytes' else os.path.abspath(tokenizer)
        _check_given_tokenizer(ref, tok, tokenizer, record, root)
        return TextSpec(col, True, (spec, ''), _identity(tok),
                        'pass the tokenizer that encoded it as --tokenizer (a path, or "bytes")',
                        token_encoding_type)
    if not record:
        raise LabelingError(f'Stream {ref.name} holds token ids but no tokenizer is known (no '
                            f'{CONVERT_INFO_NAME} with one): pass the tokenizer that encoded it as '
                            '--tokenizer (a path, or "bytes").')
    tok = tokenizer_from_record(record, root)
    return TextSpec(col, True, (json.dumps(record, sort_keys=True), os.path.abspath(root)),
                    _identity(tok), f'its {CONVERT_INFO_NAME} ({root}) names another tokenizer '
                    'than the one that encoded it: re-convert the dataset', token_encoding_type)


def _identity(tok: Tokenizer) -> str:
    return json.dumps(tokenizer_identity(tok), sort_keys=True)


def _check_given_tokenizer(ref: StreamRef, tok: Tokenizer, given: str,
                           record: Optional[dict[str, Any]], root: str) -> None:
    """Refuse ``--tokenizer`` when the dataset's ``mads_convert.json`` records another one (by
    vocabulary fingerprint; a record too old to have one is compared by loading its tokenizer)."""
    if not record:
        return
    recorded = record.get('fingerprint')
    if recorded is None:
        try:
            recorded = tokenizer_from_record(record, root).fingerprint
        except TokenizerError:
            return  # Its tokenizer is gone: --tokenizer is what replaces it.
    if recorded != tok.fingerprint:
        raise LabelingError(f'Stream {ref.name} was encoded with a {record.get("kind")} tokenizer '
                            f'of {record.get("vocab_size")} ids (fingerprint {recorded}, recorded '
                            f'in {os.path.join(root, CONVERT_INFO_NAME)}), but --tokenizer {given} '
                            f'is a {tok.kind} tokenizer of {tok.vocab_size} ids (fingerprint '
                            f'{tok.fingerprint}): its ids would decode to other text. Drop '
                            '--tokenizer (the recorded one is used).')


_TOKENIZERS: dict[tuple[str, str], Tokenizer] = {}  # Loaded once per worker process.
_MODELS: dict[str, Any] = {}  # Models loaded in this worker process, by key.


def _tokenizer(spec: tuple[str, str]) -> Tokenizer:
    if spec not in _TOKENIZERS:
        what, base = spec
        if what.startswith('{'):
            _TOKENIZERS[spec] = tokenizer_from_record(json.loads(what), base)
        else:
            _TOKENIZERS[spec] = load_tokenizer(what)
    return _TOKENIZERS[spec]


def _segments(samples: list[dict[str, Any]], text: TextSpec, job: 'ShardJob') -> list[list[str]]:
    """Text pieces of each sample: its documents (split at EOS) or its one text.

    A token id outside the tokenizer's vocabulary is an error naming the stream, the sample and
    the fix, never dropped: it means the ids were made by another tokenizer.
    """
    if not text.tokens:
        return [[str(s[text.column])] for s in samples]
    assert text.tokenizer is not None
    tok = _tokenizer(text.tokenizer)
    decoder = SampleDecoder(tokens_column=text.column, token_encoding_type=text.encoding,
                            setting='--token-encoding-type', where='it')
    out = []
    for i, s in enumerate(samples):
        try:
            ids = decoder.token_ids(s[text.column])
        except SampleFormatError as err:
            raise LabelingError(f'Stream {job.name}, sample {i} of shard '
                                f'{job.shard["raw_data"]["basename"]}: {err}') from None
        try:
            out.append(tok.decode_segments(ids))
        except TokenizerError as err:
            raise LabelingError(f'Stream {job.name}, sample {i} of shard '
                                f'{job.shard["raw_data"]["basename"]}: {err}; {text.fix}.') from None
    return out


@dataclass(frozen=True)
class ShardJob:
    """One shard of one stream, and where its samples' text comes from (what every job reads)."""
    name: str
    local: str
    remote: Optional[str]
    shard: dict[str, Any]
    text: TextSpec

    def samples(self) -> list[dict[str, Any]]:
        """The shard's samples, decoded (see :func:`~streaming_mads.labeling.streams.load_shard`)."""
        return load_shard(self.local, self.remote, self.shard, self.name)

    def texts(self) -> list[str]:
        """Each sample's whole text (its documents joined by blank lines)."""
        return ['\n\n'.join(s) for s in _segments(self.samples(), self.text, self)]


@dataclass(frozen=True)
class ScoreJob(ShardJob):
    """Pass 1 of one shard."""
    domain_column: Optional[str]
    quality: Optional[str]  # scorer spec, or None when not labelling quality
    terms: bool  # count document frequencies and keep subsample term rows
    fit_rows: tuple[int, ...]  # local sample ids of the topic-fit subsample
    embedder: Optional[str]  # JSON record of a transformer embedder for the fit rows
    num_threads: int
    out: str
    similarity: bool = False  # keep the fit rows' similarity features (words and word pairs)


def run_score(job: ScoreJob) -> int:
    """Pass 1 of one shard: quality, domain ids and term statistics, saved to ``job.out``.

    Args:
        job (ScoreJob): The shard and what to compute.

    Returns:
        int: Samples done (for the progress bar).
    """
    samples = job.samples()
    needs_text = job.quality is not None or job.terms or job.embedder
    segs = _segments(samples, job.text, job) if needs_text else []
    arrays: dict[str, Any] = {'n': np.int64(len(samples))}
    if job.quality is not None:
        flat = [t for s in segs for t in s]
        scores = score_texts(load_scorer(job.quality), flat, job.quality).astype(np.float64)
        weights = np.asarray([max(len(t), 1) for t in flat], np.float64)
        owner = np.repeat(np.arange(len(segs)), [len(s) for s in segs])
        num = np.bincount(owner, weights=scores * weights, minlength=len(segs))
        den = np.bincount(owner, weights=weights, minlength=len(segs))
        arrays['quality'] = (num / np.maximum(den, 1e-12)).astype(np.float32)
    if job.domain_column is not None:  # As ids into a per-shard vocabulary: small in memory.
        values = np.asarray([_as_str(s[job.domain_column]) for s in samples], dtype=str)
        vocab, ids = np.unique(values, return_inverse=True)
        arrays.update(domain_vocab=vocab, domain_ids=ids.astype(np.int32))
    if job.terms or job.embedder:
        texts = ['\n\n'.join(s) for s in segs]
        fit = list(job.fit_rows)
        if job.terms:
            rows = term_rows(texts)
            uniq, counts = np.unique(rows.buckets, return_counts=True)  # buckets are unique per row
            arrays.update(df_buckets=uniq, df_counts=counts.astype(np.int64))
            sub = _subset(rows, fit)
            names = sorted(sub.names.items())
            arrays.update(fit_indptr=sub.indptr, fit_buckets=sub.buckets, fit_counts=sub.counts,
                          name_buckets=np.asarray([b for b, _ in names], np.int64),
                          name_words=np.asarray([w for _, w in names], dtype=str))
        if job.embedder:
            if job.embedder not in _MODELS:  # Loaded once per worker process.
                _MODELS[job.embedder] = TopicModel(json.loads(job.embedder), np.zeros((1, 1)))
            arrays['fit_emb'] = _MODELS[job.embedder].embed([texts[i] for i in fit], job.num_threads)
        if job.similarity:
            sim = similarity_features([texts[i] for i in fit])
            arrays.update(sim_indptr=sim.indptr, sim_buckets=sim.buckets)
    atomic_save_npz(job.out, **arrays)
    return len(samples)


def _as_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode('utf-8', errors='replace')
    return str(value)


def _subset(rows: TermRows, idx: list[int]) -> TermRows:
    indptr = [0]
    buckets, counts = [], []
    for i in idx:
        a, b = rows.indptr[i], rows.indptr[i + 1]
        buckets.append(rows.buckets[a:b])
        counts.append(rows.counts[a:b])
        indptr.append(indptr[-1] + b - a)
    bk = np.concatenate(buckets) if buckets else np.zeros(0, np.int64)
    names = {int(b): rows.names[int(b)] for b in np.unique(bk)}
    return TermRows(np.asarray(indptr, np.int64), bk,
                    np.concatenate(counts) if counts else np.zeros(0, np.float32), names)


@dataclass(frozen=True)
class AssignJob(ShardJob):
    """Pass 2 of one shard: labels read off fitted models (topic, reference similarity)."""
    topic_dir: Optional[str]  # saved TopicModel, or None when not labelling topics
    similarity_dir: Optional[str]  # saved SimilarityModel, or None
    model_key: str  # fingerprint of both models (a worker loads each model once)
    num_threads: int
    out: str


def run_assign(job: AssignJob) -> int:
    """Pass 2 of one shard: each sample's nearest topic (int32 ids) and its reference-similarity
    percentile (float32), saved together to ``job.out`` (``.npz``).

    Args:
        job (AssignJob): The shard and the saved models to label with.

    Returns:
        int: Samples done (for the progress bar).
    """
    texts = job.texts()
    if job.model_key not in _MODELS:
        _MODELS[job.model_key] = (
            TopicModel.load(job.topic_dir) if job.topic_dir else None,
            SimilarityModel.load(job.similarity_dir) if job.similarity_dir else None)
    topics, similarity = _MODELS[job.model_key]
    arrays: dict[str, NDArray] = {'n': np.int64(len(texts))}
    if topics is not None:
        arrays['topic'] = topics.assign(texts, job.num_threads).astype(np.int32)
    if similarity is not None:
        arrays['similarity'] = similarity(texts)
    atomic_save_npz(job.out, **arrays)
    return len(texts)


class JobPool:
    """A process pool started on first use and shared by both passes (workers load models once).

    Args:
        workers (int): Worker processes; with one, jobs run inline.
        mp_context (str, optional): Multiprocessing start method.
    """

    def __init__(self, workers: int, mp_context: Optional[str]) -> None:
        self.workers = workers
        self.mp_context = mp_context
        self.pool: Optional[ProcessPoolExecutor] = None

    def get(self) -> ProcessPoolExecutor:
        """The executor, started now if it is not yet."""
        if self.pool is None:
            import multiprocessing as mp
            os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
            self.pool = ProcessPoolExecutor(max_workers=self.workers,
                                            mp_context=mp.get_context(self.mp_context))
        return self.pool

    def close(self) -> None:
        """Stop the workers (cancelling jobs not started), if any were started."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def run_jobs(fn: Callable[[Any], int], jobs: list[Any], pool: JobPool, desc: str, total: int,
             progress: Optional[bool]) -> None:
    """Run ``fn`` over ``jobs`` in the pool (inline for one worker or one job), with a bar.

    The first failure (or an interrupt) cancels the jobs not yet started and is raised.

    Args:
        fn (Callable[[Any], int]): :func:`run_score` or :func:`run_topic` (samples done per job).
        jobs (list[Any]): The jobs.
        pool (JobPool): Where to run them.
        desc (str): Progress bar label.
        total (int): Samples over all jobs.
        progress (bool, optional): Show the bar; ``None`` shows it on a terminal.
    """
    from tqdm import tqdm
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    with tqdm(total=total, desc=desc, unit='sample', disable=disable, leave=False) as bar:
        if pool.workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                bar.update(fn(job))
            return
        pending: set[Future] = {pool.get().submit(fn, job) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    bar.update(fut.result())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
