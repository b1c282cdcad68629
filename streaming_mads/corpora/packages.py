"""A second embedded corpus: the documentation and source of the installed Python packages.

The demo corpus (:mod:`streaming_mads.corpora.demo`) steers by held-out documentation topics,
which is one of its training domains: the domain agent alone can find the reference by picking
``docs``. This corpus asks for more. Its training domains differ in *shape*, not in subject,
and every domain mixes the subjects of all packages:

* ``readme``: the long descriptions (READMEs) in the packages' metadata and the Markdown,
  reStructuredText and text documents they ship, in sections,
* ``docstrings``: the docstrings of their modules,
* ``code``: their source files, in pieces,
* ``license``: their license texts (boilerplate),
* ``garbled``: docstrings with shuffled words, corrupted characters and spam (low quality).

The reference is a *theme* that cuts across domains: READMEs, docstrings and source of the
packages whose name or summary is about numerical computing (arrays, tensors, algebra,
arithmetic, neural networks; e.g. numpy, torch, sympy, mpmath). Those packages are a small share
of every domain, so the domain agent can only favour the three domains the reference spans and
drop licenses and garbled text; finding the theme inside each domain needs the topic agent,
and its noise (spam, boilerplate) the quality agent.

A theme package's files (a source file, a README section) are split by a hash of their path:
a share goes to the reference set, a share to the evaluation set, the rest to training. A
source file is one unit, so no training document holds the docstring of a reference or
evaluation file; every document is also kept once (by content hash), so the sets are disjoint
by document.

:func:`build_collab_text` builds a third corpus from the same material, whose target needs
agents together: the theme's clean docstrings only (a domain crossed with a theme), with half
the garbled domain made of damaged copies of the theme's docstrings.

The packages are this project's dependency closure (its requirements, recursively, without
extras), so the corpus depends on the installed versions of the dependencies, not on what else
is installed; without the project installed, all distributions. Everything is deterministic
(sorted names, hashed orders, a fixed seed): the same environment gives the same corpus.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from streaming_mads.corpora.demo import (DemoCorpus, _chunks, _docstrings, _garble, _heldout,
                                        _write, _write_domains)

__all__ = ['build_packages_text', 'build_collab_text', 'DOMAINS', 'THEME', 'SHARES']

DOMAINS = ('readme', 'docstrings', 'code', 'license', 'garbled')
THEME = r'\b(arrays?|tensors?|numerical|arithmetic|algebra|neural|deep learning)\b'
# Share of the training bytes per domain; in all about 1.6 x ``code_bytes``, as the demo corpus.
SHARES = {'readme': 0.25, 'docstrings': 0.2, 'code': 0.35, 'license': 0.07, 'garbled': 0.13}
_SCALE = 1.6
_ROOT = 'streaming-mads'
_THEME_DOMAINS = ('readme', 'docstrings', 'code')
_LICENSE = re.compile(r'licen[cs]e|copying|notice', re.IGNORECASE)
_SKIP_DIRS = frozenset({'..', '__pycache__', 'test', 'tests', 'testing'})

Doc = tuple[str, str]  # (file name, text)


@dataclass(frozen=True)
class _Package:
    """One distribution's texts: metadata fields and files by kind (relative, absolute paths)."""
    name: str
    summary: str
    description: str
    license: str
    code: tuple[tuple[str, str], ...]
    docs: tuple[tuple[str, str], ...]
    licenses: tuple[tuple[str, str], ...]


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode('utf-8')).hexdigest()


def _canonical(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def _distributions(root: str = _ROOT) -> list[importlib.metadata.Distribution]:
    """``root``'s dependency closure (no extras, markers of this machine), else everything.

    The first distribution of a name on ``sys.path`` wins, as for imports.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    found: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        if dist.metadata['Name']:
            found.setdefault(_canonical(dist.metadata['Name']), dist)
    if root not in found:
        return [found[n] for n in sorted(found)]
    names, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in names or name not in found:
            continue
        names.add(name)
        for spec in found[name].requires or []:
            try:
                req = Requirement(spec)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate({'extra': ''}):
                todo.append(_canonical(req.name))
    return [found[n] for n in sorted(names - {root})]


def _kind(rel: str) -> Optional[str]:
    """Which list of :class:`_Package` a file of a distribution's RECORD belongs to, if any."""
    parts = rel.split('/')
    base = parts[-1]
    if _SKIP_DIRS & set(parts):
        return None
    if base.endswith('.py'):
        return None if parts[0].endswith(('.dist-info', '.egg-info')) else 'code'
    if _LICENSE.search(base):
        return 'licenses'
    if parts[0].endswith(('.dist-info', '.egg-info')):
        return None
    return 'docs' if base.endswith(('.md', '.rst', '.txt')) else None


def _package(dist: importlib.metadata.Distribution) -> _Package:
    meta = dist.metadata
    files: dict[str, list[tuple[str, str]]] = {'code': [], 'docs': [], 'licenses': []}
    for path in dist.files or []:
        rel = path.as_posix()
        kind = _kind(rel)
        if kind is not None:
            files[kind].append((rel, str(path.locate())))
    description = meta.get_payload() or meta.get('Description') or ''  # type: ignore[attr-defined]
    return _Package(name=_canonical(meta['Name']), summary=meta.get('Summary') or '',
                    description=description, license=meta.get('License') or '',
                    **{k: tuple(sorted(v)) for k, v in files.items()})


def _themed(packages: list[_Package], theme: str) -> set[str]:
    """Names of the packages whose name or summary matches the ``theme`` expression."""
    pattern = re.compile(theme, re.IGNORECASE)
    return {p.name for p in packages if pattern.search(f'{p.name} {p.summary}')}


def _read(path: str) -> str:
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return f.read()
    except OSError:
        return ''


def _prose(text: str) -> bool:
    """Whether a text file reads as prose (word lists and data tables do not)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return bool(lines) and len(text.split()) >= 4 * len(lines)


def _name(package: str, key: str, k: int) -> str:
    name = f'{package}__{key.replace("/", "__")}__{k:03d}.txt'
    return name if len(name) <= 160 else f'{package}__{_digest(name)[:16]}__{k:03d}.txt'


def _ordered(files: tuple[tuple[str, str], ...], salt: str) -> list[tuple[str, str]]:
    """Files in a hashed order: a domain's first documents spread over the whole package."""
    return sorted(files, key=lambda f: _digest(f'{salt}/{f[0]}'))


Keep = Callable[[str], bool]


def _readme(p: _Package, keep: Keep, size: int) -> Iterator[Doc]:
    texts = [('README', p.description)]
    texts += [(rel, text) for rel, path in p.docs if _prose(text := _read(path))]
    for key, text in texts:
        for k, chunk in enumerate(_chunks(text, size)):
            if keep(f'{key}#{k}'):
                yield _name(p.name, key, k), chunk


def _code(p: _Package, keep: Keep, size: int) -> Iterator[Doc]:
    for rel, path in _ordered(p.code, 'code'):
        if keep(rel):
            for k, chunk in enumerate(_chunks(_read(path), size)):
                yield _name(p.name, rel, k), chunk


@functools.lru_cache(maxsize=8192)
def _file_docstrings(path: str) -> tuple[str, ...]:
    """A file's long docstrings, parsed once for both ``docstrings`` and ``garbled``."""
    return tuple(_docstrings([path]))


def _docs_of(p: _Package, keep: Keep) -> Iterator[Doc]:
    for rel, path in _ordered(p.code, 'docstrings'):
        if keep(rel):
            for k, doc in enumerate(_file_docstrings(path)):
                yield _name(p.name, rel, k), doc


def _garbled(p: _Package, keep: Keep, rng: random.Random) -> Iterator[Doc]:
    """Garbled copies of the package's docstrings, as the demo corpus's."""
    for name, doc in _docs_of(p, keep):
        yield name, _garble(doc, rng)


def _license(p: _Package, size: int) -> Iterator[Doc]:
    texts = [('License', p.license)] + [(rel, _read(path)) for rel, path in p.licenses]
    for key, text in texts:
        for k, chunk in enumerate(_chunks(text, size)):
            yield _name(p.name, key, k), chunk


def _split(package: str, key: str, fraction: float) -> str:
    """A theme package's unit goes to ``train``, ``reference`` or ``evaluation`` by its hash."""
    if not _heldout(f'ref/{package}/{key}', fraction):
        return 'train'
    return 'evaluation' if _heldout(f'eval/{package}/{key}', 0.5) else 'reference'


def _keeper(split: str, themed: set[str], fraction: float) -> Callable[[_Package], Keep]:
    """For a package, the test of whether one of its units (by key) goes to ``split``."""

    def of(p: _Package) -> Keep:
        if p.name not in themed:
            return lambda key: split == 'train'
        return lambda key: _split(p.name, key, fraction) == split

    return of


def _take(sources: dict[str, Iterator[Doc]], limit: int, seen: set[str], salt: str) -> list[Doc]:
    """Documents from every package in turn until ``limit`` bytes, each text only once overall
    (a text with a NUL character, binary data in a docstring, is left out: ``mads convert`` reads
    text only).

    Each round visits the packages in a hashed order, so the last, partial round favours no
    name; a package leaves when it has no more documents. The last document may overshoot.
    """
    out: list[Doc] = []
    total, round_, live = 0, 0, dict(sources)
    while live and total < limit:
        for package in sorted(live, key=lambda p: _digest(f'{salt}/{round_}/{p}')):
            doc = next(live[package], None)
            if doc is None:
                del live[package]
            elif '\x00' not in doc[1] and _digest(doc[1]) not in seen:  # NUL: binary, not text.
                seen.add(_digest(doc[1]))
                out.append(doc)
                total += len(doc[1].encode('utf-8'))
                if total >= limit:
                    break
        round_ += 1
    return out


def _sources(domain: str, packages: list[_Package], keep: Callable[[_Package], Keep], size: int,
             rng: random.Random) -> dict[str, Iterator[Doc]]:
    """One lazy document iterator per package: only what the byte limits take is read."""
    make = {'readme': lambda p: _readme(p, keep(p), size),
            'docstrings': lambda p: _docs_of(p, keep(p)),
            'code': lambda p: _code(p, keep(p), size),
            'license': lambda p: _license(p, size),
            'garbled': lambda p: _garbled(p, keep(p), rng)}[domain]
    return {p.name: make(p) for p in packages}


def build_packages_text(out: str, code_bytes: int = 1_200_000, heldout: float = 0.05,
                        reference_bytes: int = 45_000, evaluation_bytes: int = 60_000,
                        reference_fraction: float = 0.25, theme: str = THEME,
                        doc_chars: int = 4_000, seed: int = 0,
                        target_domains: tuple[str, ...] = _THEME_DOMAINS,
                        garbled_theme: float = 0.0) -> DemoCorpus:
    """Write the packages corpus as text files under ``out`` (one file per document).

    Args:
        out (str): Output directory (``train/<domain>``, ``heldout/<domain>``, ``reference``,
            ``evaluation``).
        code_bytes (int): Size knob, as the demo corpus's: training text is about
            ``1.6 · code_bytes`` bytes in all, shared between domains by :data:`SHARES` (a
            domain that runs out leaves its share to ``code``).
        heldout (float): Fraction of each domain's training documents held out for evaluation.
        reference_bytes (int): Bytes of the reference set, shared equally by ``target_domains``.
        evaluation_bytes (int): Bytes of the evaluation set, shared the same way.
        reference_fraction (float): Fraction of the theme packages' units (source files, README
            sections) never trained on; half of them (by hash) may enter the reference set, the
            other half the evaluation set.
        theme (str): Regular expression over a package's name and summary choosing the theme.
        doc_chars (int): Length at which READMEs, sources and licenses are cut into documents.
        seed (int): Seed of the garbling.
        target_domains (tuple[str, ...]): Domains the reference and evaluation sets are drawn
            from (of ``readme``, ``docstrings``, ``code``): the target is the theme *and* these
            domains.
        garbled_theme (float): Share of the ``garbled`` bytes taken from the theme packages
            first (garbled copies of the target's kind: a decoy for a label that sees the theme
            but not the damage).
    """
    unknown = set(target_domains) - set(_THEME_DOMAINS)
    if not target_domains or unknown:
        raise ValueError(f'target_domains must be some of {_THEME_DOMAINS}, got {target_domains}')
    if not 0 <= garbled_theme <= 1:
        raise ValueError(f'garbled_theme is a share of bytes: between 0 and 1, got {garbled_theme}')
    rng = random.Random(seed)
    packages = [_package(d) for d in _distributions()]
    themed = _themed(packages, theme)
    if not themed:
        raise ValueError(f'no installed package matches the theme {theme!r}')
    seen: set[str] = set()
    sets: dict[str, list[Doc]] = {'reference': [], 'evaluation': []}
    pool = [p for p in packages if p.name in themed]
    for name, size in (('reference', reference_bytes), ('evaluation', evaluation_bytes)):
        keep = _keeper(name, themed, reference_fraction)
        for domain in target_domains:
            docs = _take(_sources(domain, pool, keep, doc_chars, rng),
                         size // len(target_domains), seen, f'{name}/{domain}')
            sets[name] += [(f'{domain}__{n}', text) for n, text in docs]
    keep = _keeper('train', themed, reference_fraction)
    docs, short = {}, 0
    # Code last: what the other domains lack (a large corpus has more code than READMEs and
    # licenses) is taken as code, so the corpus reaches its size.
    for d in sorted(DOMAINS, key=lambda d: d == 'code'):
        limit = int(SHARES[d] * _SCALE * code_bytes) + (short if d == 'code' else 0)
        first = []
        if d == 'garbled' and garbled_theme:
            first = _take(_sources(d, pool, keep, doc_chars, rng), int(garbled_theme * limit),
                          seen, f'{d}/theme')
        docs[d] = first + _take(_sources(d, packages, keep, doc_chars, rng),
                                limit - sum(len(t.encode('utf-8')) for _, t in first), seen, d)
        short += max(0, limit - sum(len(t.encode('utf-8')) for _, t in docs[d]))
    train, held = _write_domains(out, {d: docs[d] for d in DOMAINS}, heldout)
    return DemoCorpus(train, held, _write(os.path.join(out, 'reference'), sets['reference']),
                      _write(os.path.join(out, 'evaluation'), sets['evaluation']))


def build_collab_text(out: str, code_bytes: int = 1_200_000, **options: Any) -> DemoCorpus:
    """The collaboration corpus: the packages corpus whose target needs several agents at once.

    The target is the clean *docstrings* of the numerical-computing theme: a domain (which the
    domain agent sees, but of which the theme is a small share) crossed with a theme (which the
    topic and similarity labels see, but spread over every domain), while half the ``garbled``
    domain is damaged copies of the theme's docstrings, which share its words (a decoy for the
    similarity and topic labels that only the quality label sees through). No single agent can
    pick the target alone. Arguments as :func:`build_packages_text` (``options`` override
    ``target_domains=('docstrings',)`` and ``garbled_theme=0.5``).
    """
    return build_packages_text(out, code_bytes=code_bytes,
                               **{'target_domains': ('docstrings',), 'garbled_theme': 0.5,
                                  **options})
