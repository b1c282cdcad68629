"""``mads inspect``: what the labels of a dataset say, as text tables.

Inspecting only reads labels (fetching a remote's current ones first); it shares stream discovery
with ``mads label`` but nothing of the labelling, so it is kept apart from it. The standard score
columns are tabulated in the bins their agents use (:mod:`streaming_mads.score_bins`), so the table
shows what the console steers by. Each column's fit (the topic or similarity model, the domain
source, the quality scorer) is shown per stream, and each topic fit's top terms, so streams
labelled apart are visible before training refuses them. See docs/architecture.md.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from streaming_mads.labeling.streams import RemoteStream, discover_streams
from streaming_mads.labeling.similarity import saved_model_note
from streaming_mads.labeling.work import SIMILARITY_DIRNAME, TOPICS_DIRNAME
from streaming_mads.labels import (LABELS_DIRNAME, MANIFEST_NAME, StreamLabels, fetch_labels,
                                   labels_dir)
from streaming_mads.remote import join_path, try_download
from streaming_mads.score_bins import STANDARD_BINS, ScoreBins

__all__ = ['inspect_dataset']


def inspect_dataset(dataset: str, local: Optional[str] = None, split: Optional[str] = None) -> str:
    """Label distributions per column and per stream, as text tables.

    Raises :class:`~streaming_mads.labels.LabelError` (naming the fix) for missing or stale labels.

    Args:
        dataset (str): Local directory or remote URL, as for ``mads label``.
        local (str, optional): Local cache of a remote dataset. Defaults to ``None``.
        split (str, optional): Split subdirectory of each stream. Defaults to ``None``.

    Returns:
        str: The tables (and the topics' top terms, if topics were labelled).
    """
    streams, _, _ = discover_streams(dataset, local, split)
    opened = []
    for s in streams:
        if s.remote is not None:  # Fetch the remote's current labels, not a stale cache.
            ldir = labels_dir(s.local)
            if os.path.isdir(ldir):
                for name in os.listdir(ldir):
                    if name == MANIFEST_NAME or name.endswith('.npy'):
                        os.remove(os.path.join(ldir, name))
            fetch_labels(RemoteStream(s))
            try_download(join_path(s.remote, LABELS_DIRNAME, TOPICS_DIRNAME, 'topics.json'),
                         os.path.join(ldir, TOPICS_DIRNAME, 'topics.json'), fresh=True)
            try_download(join_path(s.remote, LABELS_DIRNAME, SIMILARITY_DIRNAME, 'similarity.json'),
                         os.path.join(ldir, SIMILARITY_DIRNAME, 'similarity.json'), fresh=True)
        opened.append(StreamLabels(s.local, s.num_samples, s.name))
    names = list(dict.fromkeys(c for lab in opened for c in lab.columns))
    for lab in opened:  # Checks every column file (checksum, length, ids) before any statistic.
        for col in lab.columns:
            lab.array(col)
    out = []
    total = sum(s.num_samples for s in streams)
    out.append(f'{dataset}: {len(streams)} stream(s), {total} samples')
    for col in names:
        kinds = {lab.columns[col]['kind'] for lab in opened if col in lab.columns}
        kind = kinds.pop() if len(kinds) == 1 else 'mixed'
        standard = STANDARD_BINS.get(col) if kind == 'score' else None
        out.append('')
        header = len(out)
        out.append(f'{col} ({kind})')
        out.append(_fit_line([lab.columns[col].get('fit') if col in lab.columns else None
                              for lab in opened], [s.name for s in streams]))
        headers = ['value'] + [s.name for s in streams] + (['all'] if len(streams) > 1 else [])
        rows: list[list[str]] = []
        if kind == 'categorical':
            values = list(dict.fromkeys(v for lab in opened if col in lab.columns
                                        for v in lab.columns[col]['values']))
            table = np.zeros((len(values), len(streams)), np.int64)
            for si, lab in enumerate(opened):
                if col in lab.columns:
                    for v, c in zip(lab.columns[col]['values'], lab.columns[col]['counts']):
                        table[values.index(v), si] = c
            bins = values
        else:
            arrays = [np.asarray(lab.array(col), np.float64) if col in lab.columns else np.zeros(0)
                      for lab in opened]
            lo = min((a.min() for a in arrays if len(a)), default=0.0)
            hi = max((a.max() for a in arrays if len(a)), default=0.0)
            if standard is not None and standard.low <= lo and hi <= standard.high:
                cut = standard
            else:  # Another score, or one off its usual scale: five equal bins over its range.
                cut = ScoreBins(lo, hi, tuple(np.linspace(lo, hi, 6)[1:-1]))
            edges, bins = np.asarray(cut.edges, np.float64), cut.labels()
            if cut.percentile:
                out[header] = f'{col} ({kind}, percentile)'
            table = np.stack([np.bincount(np.searchsorted(edges, a, side='right'), minlength=len(bins))
                              for a in arrays], 1)
            for stat, fn in (('mean', np.mean), ('min', np.min), ('max', np.max)):
                rows.append([stat] + [f'{fn(a):.3f}' if len(a) else '-' for a in arrays] +
                            ([f'{fn(np.concatenate(arrays)):.3f}'] if len(streams) > 1 else []))
        sums = table.sum(0)
        body = []
        for i, b in enumerate(bins):
            cells = [f'{table[i, j]} {100.0 * table[i, j] / max(sums[j], 1):5.1f}%'
                     for j in range(len(streams))]
            if len(streams) > 1:
                cells.append(f'{table[i].sum()} {100.0 * table[i].sum() / max(sums.sum(), 1):5.1f}%')
            body.append([str(b)] + cells)
        out.append(_format_table(headers, body + rows))
        if col == 'similarity':  # The model version that made the percentiles (old: relabel).
            note = saved_model_note([os.path.join(labels_dir(s.local), SIMILARITY_DIRNAME)
                                     for s in streams], [s.name for s in streams])
            out += [note] if note else []
    if 'topic' in names:
        out += _topic_terms(streams, opened)
    return '\n'.join(out)


def _describe_fit(fit: Optional[dict[str, Any]]) -> str:
    """A column's fit in a few words (see :mod:`streaming_mads.labels`)."""
    if not fit:
        return 'not recorded'
    if 'model' in fit:
        extra = ', '.join(f'{k}={fit[k]}' for k in ('k', 'embedder') if k in fit)
        return f'{fit["model"]} {fit.get("id")}' + (f' ({extra})' if extra else '')
    return ', '.join(f'{k} {v}' for k, v in sorted(fit.items()))


def _fit_line(fits: list[Optional[dict[str, Any]]], names: list[str]) -> str:
    """``fit: ...``: one description when every stream shares it, else one per stream."""
    described = [_describe_fit(f) for f in fits]
    if len(set(described)) == 1:
        return f'fit: {described[0]}'
    return 'fit: ' + '; '.join(f'{n}: {d}' for n, d in zip(names, described))


def _topic_terms(streams: list[Any], opened: list[StreamLabels]) -> list[str]:
    """Top terms of each topic fit, read from the first stream labelled with it (without
    recorded fits, the first stream's model is all there is to show)."""
    groups: dict[str, list[Any]] = {}
    for s, lab in zip(streams, opened):
        if 'topic' in lab.columns:
            key = str((lab.columns['topic'].get('fit') or {}).get('id', ''))
            groups.setdefault(key, []).append(s)
    out: list[str] = []
    for key, members in groups.items():
        topics_json = os.path.join(labels_dir(members[0].local), TOPICS_DIRNAME, 'topics.json')
        if not os.path.isfile(topics_json):
            continue
        with open(topics_json, encoding='utf-8') as f:
            meta = json.load(f)
        which = f'fit {key} of {", ".join(m.name for m in members)}; ' if key else ''
        out += ['', f'topics ({which}{meta["embedder"]["kind"]} embeddings, fitted on '
                    f'{meta.get("fit_samples", "?")} samples): top terms']
        out += [f'  {name}: {" ".join(meta.get("top_terms", {}).get(name, []))}'
                for name in meta.get('values', [])]
        if not key:
            break
    return out


def _format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
    fmt = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return '\n'.join([fmt(headers), '-' * len(fmt(headers))] + [fmt(r) for r in rows])
