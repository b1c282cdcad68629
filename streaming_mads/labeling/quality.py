"""Quality scores (0-5) for ``mads label``: a heuristic default and a plug-in point.

The paper's quality agent bins an educational-value classifier's 0-5 score. Such a classifier is a
model download, so the default here is a **heuristic scorer** built from the document-quality rules
that web-scale filters use, turned from hard keep/drop rules into soft penalties so that the score
ranks documents instead of only filtering them:

==============================  =================================================  =========
signal                          penalty grows when                                 source
==============================  =================================================  =========
word count                      fewer than 50 words                                Gopher
mean word length                outside 3-10 characters                            Gopher
symbol-to-word ratio            many ``#`` / ``...`` per word (> 0.1)              Gopher
alphabetic words                under 80% of words contain a letter                Gopher
stop words                      few English function words (non-prose)             Gopher
bullet / ellipsis lines         most lines are bullets, or end with an ellipsis    Gopher
duplicate lines                 repeated lines cover much of the text              Gopher
n-gram repetition               a 2-4-gram, or duplicated 5-grams, dominate        Gopher
terminal punctuation            few lines end like a sentence (or, for one line,   C4/FineWeb
                                few sentence ends per word)
short lines                     most lines are under 30 characters (menus, lists)  FineWeb
boilerplate phrases             cookie/policy/"click here"/lorem ipsum lines       C4
code symbols                    many ``{}[]<>;=`` characters                       C4
letters and spaces              under 80% of characters (garbled, markup, tables)  -
replacement/control characters  any (mis-decoded text)                             -
uppercase                       over 30% of letters upper case (spam, headings)    -
very long words                 tokens over 25 characters (URLs, base64)           -
==============================  =================================================  =========

Each penalty ``p`` is in ``[0, cap]``; the score is ``5 * prod(1 - p)``, so clean prose scores
close to 5 and text failing several rules approaches 0. The rules target English web text, like
Gopher's; for other data plug in your own scorer.

Plug-in scorers: ``module:function`` or ``path/to/file.py:function``, where the function takes a
list of texts and returns one finite float per text (0-5 by convention: agents bin the scores). If
the named object is a class it is instantiated once per worker process and then called, so a
model (fastText, a transformer classifier) is loaded once, not once per batch.
See docs/architecture.md.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = [
    'QualityError', 'QualityScorer', 'quality_signals', 'heuristic_quality', 'default_scorer',
    'load_scorer', 'score_texts', 'DEFAULT_SCORER'
]

QualityScorer = Callable[[Sequence[str]], Sequence[float]]
DEFAULT_SCORER = 'heuristic'


class QualityError(ValueError):
    """A quality scorer could not be loaded or returned unusable scores."""


_WORD_RE = re.compile(r'\S+')
_ALPHA_RE = re.compile(r'[^\W\d_]')
_STOP_WORDS = frozenset(
    'the be to of and that have with a an in is it for on as was are this by not or from at but '
    'his her they we you he she which their has had were been its can will would there what all '
    'if so one more also into than when who them these some no our may'.split())
_BULLET_RE = re.compile(r'^\s*([-*\u2022\u2023\u25e6\u2043\u2219>]|\d+[.)])\s')
_TERMINAL = ('.', '!', '?', '"', "'", '\u201d', '\u2019', ':', ')')
_BOILERPLATE = ('lorem ipsum', 'cookie', 'privacy policy', 'terms of use', 'terms of service',
                'all rights reserved', 'click here', 'sign up', 'log in', 'subscribe',
                'javascript', 'enable cookies', 'your browser', 'copyright \u00a9', '\u00a9 20')
_SENTENCE_END_RE = re.compile(r'[.!?]["\')\u201d\u2019]?(\s|$)')
_CODE_CHARS = tuple('{}[]<>;=|\\')
_CONTROL_RE = re.compile('[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]')


def _ramp(value: float, start: float, end: float, cap: float) -> float:
    """0 at ``start``, ``cap`` at ``end`` (either direction), linear in between."""
    if start == end:
        return 0.0
    t = (value - start) / (end - start)
    return cap * min(1.0, max(0.0, t))


def _ngram_counts(words: list[str], n: int) -> Counter:
    return Counter(zip(*(words[i:] for i in range(n))))


def _top_ngram_fraction(words: list[str], lengths: list[int], total: int, n: int) -> float:
    """Share of word characters covered by the most frequent word n-gram (Gopher)."""
    if len(words) < n + 1:
        return 0.0
    gram, count = _ngram_counts(words, n).most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / max(total, 1)


def _dup_ngram_fraction(words: list[str], lengths: list[int], total: int, n: int = 5) -> float:
    """Share of word characters inside word n-grams that occur more than once (Gopher)."""
    if len(words) < 2 * n:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    covered = np.zeros(len(words), bool)
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = True
    return float(np.asarray(lengths)[covered].sum() / max(total, 1))


def quality_signals(text: str) -> dict[str, float]:
    """The penalties (``name -> p``) of the heuristic scorer for one text, for inspection."""
    words = _WORD_RE.findall(text)
    n_words = len(words)
    n_chars = max(len(text), 1)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    n_lines = max(len(lines), 1)
    p: dict[str, float] = {}
    if n_words == 0:
        return {'empty': 1.0}
    lower = [w.lower().strip('.,;:!?"\'()[]{}') for w in words]
    p['few_words'] = _ramp(n_words, 50, 3, 0.7)
    mean_len = sum(map(len, words)) / n_words
    p['word_length'] = max(_ramp(mean_len, 3, 1.5, 0.6), _ramp(mean_len, 10, 16, 0.6))
    symbols = text.count('#') + text.count('...') + text.count('\u2026')
    p['symbols'] = _ramp(symbols / n_words, 0.05, 0.2, 0.5)
    alpha_words = sum(1 for w in words if _ALPHA_RE.search(w)) / n_words
    p['non_alpha_words'] = _ramp(alpha_words, 0.9, 0.5, 0.8)
    stop_frac = sum(1 for w in lower if w in _STOP_WORDS) / n_words
    p['no_stop_words'] = _ramp(stop_frac, 0.15, 0.02, 0.6) if n_words >= 8 else 0.0
    p['bullets'] = _ramp(sum(1 for ln in lines if _BULLET_RE.match(ln)) / n_lines, 0.5, 0.9, 0.4)
    p['ellipsis_lines'] = _ramp(
        sum(1 for ln in lines if ln.endswith(('...', '\u2026'))) / n_lines, 0.2, 0.5, 0.4)
    if len(lines) > 1:
        line_counts = Counter(lines)
        dup_chars = sum(len(ln) * (c - 1) for ln, c in line_counts.items() if c > 1)
        p['dup_lines'] = _ramp(dup_chars / sum(len(ln) for ln in lines), 0.1, 0.4, 0.7)
    lengths = list(map(len, lower))
    total = sum(lengths)
    top = max(_ramp(_top_ngram_fraction(lower, lengths, total, 2), 0.15, 0.35, 0.7),
              _ramp(_top_ngram_fraction(lower, lengths, total, 3), 0.13, 0.33, 0.7),
              _ramp(_top_ngram_fraction(lower, lengths, total, 4), 0.11, 0.31, 0.7))
    p['ngram_repetition'] = max(top, _ramp(_dup_ngram_fraction(lower, lengths, total), 0.15, 0.5,
                                           0.7))
    # The last line may be cut (a fixed-length chunk), so it is not judged; a text of one line is
    # judged by how many sentence ends it has instead.
    if len(lines) > 1:
        ended = sum(1 for ln in lines[:-1] if ln.endswith(_TERMINAL)) / (len(lines) - 1)
        p['no_terminal_punct'] = _ramp(ended, 0.5, 0.1, 0.5)
    elif n_words >= 20:
        p['no_terminal_punct'] = _ramp(len(_SENTENCE_END_RE.findall(text)) / n_words, 0.03, 0.0, 0.5)
    p['short_lines'] = _ramp(sum(1 for ln in lines if len(ln) < 30) / n_lines, 0.5, 0.9, 0.5)
    low = text.lower()
    boiler = sum(1 for ln in lines if any(b in ln.lower() for b in _BOILERPLATE)) / n_lines
    p['boilerplate'] = 0.9 if 'lorem ipsum' in low else _ramp(boiler, 0.0, 0.4, 0.7)
    # Character classes, counted by C-level map() (a Python loop per character is 5x slower).
    code = sum(map(text.count, _CODE_CHARS)) / n_chars
    p['code_symbols'] = _ramp(code, 0.01, 0.06, 0.4)
    letters = sum(map(str.isalpha, text))
    letters_spaces = (letters + sum(map(str.isspace, text))) / n_chars
    p['garbled_chars'] = _ramp(letters_spaces, 0.85, 0.6, 0.8)
    p['bad_chars'] = _ramp(len(_CONTROL_RE.findall(text)) / n_chars, 0.0, 0.02, 0.9)
    if letters:
        upper = sum(map(str.isupper, text))
        p['uppercase'] = _ramp(upper / letters, 0.3, 0.7, 0.6)
    p['long_words'] = _ramp(sum(1 for w in words if len(w) > 25) / n_words, 0.01, 0.1, 0.5)
    return p


def heuristic_quality(text: str) -> float:
    """Heuristic quality of one text in ``[0, 5]`` (see the module docstring)."""
    score = 5.0
    for penalty in quality_signals(text).values():
        score *= 1.0 - penalty
    return float(round(score, 4))


def default_scorer(texts: Sequence[str]) -> NDArray[np.float32]:
    """The default scorer: :func:`heuristic_quality` of each text."""
    return np.asarray([heuristic_quality(t) for t in texts], np.float32)


_LOADED: dict[str, QualityScorer] = {}


def load_scorer(spec: str = DEFAULT_SCORER) -> QualityScorer:
    """Resolve a scorer spec: ``'heuristic'``, ``'module:function'`` or ``'file.py:function'``.

    The result is cached per process, so a class-based scorer (e.g. one that loads a local
    fastText model in ``__init__``) is built once per worker.
    """
    if spec in ('heuristic', 'default'):
        return default_scorer
    if spec in _LOADED:
        return _LOADED[spec]
    module_name, sep, attr = spec.rpartition(':')
    if not sep or not module_name or not attr:
        raise QualityError(f'Quality scorer {spec!r} is not "heuristic" or "module:function" '
                           '(or "path/to/file.py:function").')
    try:
        if module_name.endswith('.py'):
            path = os.path.abspath(module_name)
            name = f'_mads_scorer_{abs(hash(path))}'
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None or not os.path.isfile(path):
                raise ImportError(f'no such file {path}')
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as err:
        raise QualityError(f'Cannot import quality scorer module {module_name!r}: {err}. Make it '
                           'importable (installed, or on PYTHONPATH) or give a .py path.') from err
    obj: Any = getattr(module, attr, None)
    if obj is None:
        raise QualityError(f'Module {module_name!r} has no {attr!r} for the quality scorer.')
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise QualityError(f'Quality scorer {spec!r} is not callable.')
    _LOADED[spec] = obj
    return obj


def score_texts(scorer: QualityScorer, texts: Sequence[str], spec: str) -> NDArray[np.float32]:
    """Call ``scorer`` and check it gave one finite score per text (naming ``spec`` if not)."""
    if not texts:
        return np.zeros(0, np.float32)
    try:
        scores = np.asarray(scorer(list(texts)), np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise QualityError(f'Quality scorer {spec!r} did not return numbers: {err}.') from err
    if len(scores) != len(texts):
        raise QualityError(f'Quality scorer {spec!r} returned {len(scores)} scores for '
                           f'{len(texts)} texts: return one per text.')
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise QualityError(f'Quality scorer {spec!r} returned {scores[bad]} for text {bad}: scores '
                           'must be finite.')
    return scores.astype(np.float32)

