"""The embedded demo corpus: four domains of text built from the Python installation itself.

A fresh machine has no dataset, but it has Python: its reference documentation (the topic texts
``pydoc`` serves, in ``pydoc_data.topics``), and the docstrings and source code of its standard
library, from which ``pydoc``-style API pages are rendered (without importing anything). From
them we build domains of clearly different usefulness for a reference set of held-out
documentation:

* ``docs``: reference documentation, topics and API pages (the reference's own distribution),
* ``docstrings``: standard-library docstrings (technical prose, close to the reference),
* ``code``: standard-library source files, then its test suite for large corpora (a different
  distribution),
* ``garbled``: docstrings with shuffled words, corrupted characters and spam boilerplate
  (deliberately low quality).

The target is one training domain, so this corpus tests whether selection finds a domain (the
domain agent alone can). Everything is deterministic (sorted file lists, hashed splits, fixed
seeds), so the corpus is identical on every machine with the same Python version.
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import sysconfig
from dataclasses import dataclass
from typing import Iterator

__all__ = ['DemoCorpus', 'build_demo_text', 'DOMAINS']

DOMAINS = ('docs', 'docstrings', 'code', 'garbled')
_TEST_DIRS = frozenset({'test', 'tests', 'idlelib'})
_SPAM = ('CLICK HERE to subscribe!!! best deals', 'Copyright (c) ALL RIGHTS RESERVED.',
         'Buy now >>> limited offer <<< free shipping', 'Share on social media | Like | Tweet',
         'Cookies help us deliver our services. Accept all cookies?')


@dataclass(frozen=True)
class DemoCorpus:
    """Where the demo corpus text lives.

    Args:
        train (dict[str, str]): Domain -> directory of training text files.
        heldout (dict[str, str]): Domain -> directory of held-out text files.
        reference (str): Directory of the reference set's text files (steers the console).
        evaluation (str): Directory of documents of the reference's kind that are neither trained
            on nor shown to the console: data efficiency is measured on them.
    """
    train: dict[str, str]
    heldout: dict[str, str]
    reference: str
    evaluation: str


def _stdlib_files(limit_bytes: int) -> list[tuple[str, bool]]:
    """Standard-library source files up to ``limit_bytes``: ``(path, is_test)`` in a fixed order.

    The library's own modules come first (sorted, up to 200 KB each), so a small corpus is the
    same whatever the limit; its test suite (``test``, ``tests``, ``idlelib``; up to 1 MB a file)
    follows only when a larger corpus needs more code than the modules hold (about 10 MB).
    """
    root = sysconfig.get_paths()['stdlib']
    modules, tests = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        # pydoc_data holds the documentation topics (the docs domain) as Python source.
        dirnames[:] = sorted(d for d in dirnames if d not in ('site-packages', '__pycache__',
                                                              'pydoc_data')
                             and not d.startswith('.'))
        is_test = bool(_TEST_DIRS & set(os.path.relpath(dirpath, root).split(os.sep)))
        (tests if is_test else modules).extend(
            os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith('.py'))
    out, total = [], 0
    for path, is_test in [(p, False) for p in modules] + [(p, True) for p in tests]:
        size = os.path.getsize(path)
        if 2_000 <= size <= (1_000_000 if is_test else 200_000) and total < limit_bytes:
            out.append((path, is_test))
            total += size
    return out


def _docstrings(paths: list[str]) -> Iterator[str]:
    for path in paths:
        try:
            with open(path, encoding='utf-8') as f:
                tree = ast.parse(f.read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 300:
                    yield doc


def _garble(text: str, rng: random.Random) -> str:
    words = text.split()
    rng.shuffle(words)
    chars = list(' '.join(words))
    for i in range(len(chars)):
        if rng.random() < 0.12:
            chars[i] = rng.choice('#@$%&*~^|\\0123456789qxzjkv')
    lines = [''.join(chars)]
    lines.insert(rng.randrange(2), rng.choice(_SPAM))
    lines.append(rng.choice(_SPAM) + ' ' + rng.choice(_SPAM))
    return '\n'.join(lines)


def _heldout(key: str, fraction: float) -> bool:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) < fraction * 0xFFFFFFFF


def _write(directory: str, docs: list[tuple[str, str]]) -> str:
    os.makedirs(directory, exist_ok=True)
    for name, text in docs:
        with open(os.path.join(directory, name), 'w', encoding='utf-8') as f:
            f.write(text)
    return directory


def _write_domains(out: str, docs: dict[str, list[tuple[str, str]]],
                   heldout: float) -> tuple[dict[str, str], dict[str, str]]:
    """Write every domain's documents to ``train/<domain>`` and ``heldout/<domain>``.

    A document is held out by a hash of its domain and name, so the split does not depend on the
    other documents; a domain too small to get one by chance still holds its last one out.
    """
    train, held = {}, {}
    for domain, items in docs.items():
        keep = [d for d in items if not _heldout(f'{domain}/{d[0]}', heldout)]
        out_of = [d for d in items if _heldout(f'{domain}/{d[0]}', heldout)]
        if not out_of and len(keep) > 1:
            out_of = [keep.pop()]
        train[domain] = _write(os.path.join(out, 'train', domain), keep)
        held[domain] = _write(os.path.join(out, 'heldout', domain), out_of)
    return train, held


def _signature(node: ast.AST) -> str:
    if isinstance(node, ast.ClassDef):
        bases = ', '.join(ast.unparse(b) for b in node.bases)
        return f'class {node.name}({bases})' if bases else f'class {node.name}'
    return f'{node.name}({ast.unparse(node.args)})'  # type: ignore[attr-defined]


def _page(path: str, name: str) -> str:
    """A module's API reference page, as ``pydoc`` renders it, from its source (never imported).

    The module's docstring, then each public class (with its public methods) and function:
    signature and docstring. Reading the source keeps the corpus free of import side effects and
    identical on every machine with the same Python.
    """
    try:
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ''
    lines = [f'Help on module {name}:', '', 'NAME', f'    {name}', '']
    doc = ast.get_docstring(tree)
    if doc:
        lines += ['DESCRIPTION', _indent(doc, 1), '']
    defs = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, defs) and not node.name.startswith('_'):
            lines += _entry(node, 1)
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, defs[1:]) and not sub.name.startswith('_'):
                        lines += _entry(sub, 2)
            lines.append('')
    return '\n'.join(lines)


def _entry(node: ast.AST, level: int) -> list[str]:
    """A class's or function's signature and docstring, indented as ``pydoc`` indents them."""
    doc = ast.get_docstring(node)  # type: ignore[arg-type]
    return [_indent(_signature(node), level)] + ([_indent(doc, level + 1)] if doc else [])


def _indent(text: str, level: int) -> str:
    return '\n'.join('    ' * level + line if line.strip() else '' for line in text.splitlines())


def _chunks(text: str, size: int, min_chars: int = 300) -> list[str]:
    """Pieces of about ``size`` characters, cut at blank lines (at most ``2 · size`` each)."""
    out, lines, n = [], [], 0
    for line in text.splitlines(keepends=True):
        lines.append(line)
        n += len(line)
        if (n >= size and not line.strip()) or n >= 2 * size:
            out.append(''.join(lines)[:2 * size])
            lines, n = [], 0
    out.append(''.join(lines)[:2 * size])
    return [c for c in out if len(c.strip()) >= min_chars]


def _by_bytes(units: list[tuple[str, list[tuple[str, str]]]], limit: int,
              salt: str) -> tuple[list[tuple[str, list[tuple[str, str]]]], list]:
    """Whole units (a topic, a module's page) in a hashed order until ``limit`` bytes; the rest.

    The last unit taken may overshoot; a unit is never split between two sets.
    """
    taken, rest, total = [], [], 0
    for unit in sorted(units, key=lambda u: hashlib.sha1(f'{salt}/{u[0]}'.encode()).hexdigest()):
        if total < limit:
            taken.append(unit)
            total += sum(len(text.encode('utf-8')) for _, text in unit[1])
        else:
            rest.append(unit)
    return taken, rest


def build_demo_text(out: str, code_bytes: int = 3_000_000, heldout: float = 0.05,
                    reference_bytes: int = 40_000, evaluation_bytes: int = 60_000,
                    doc_chars: int = 4_000, garbled_copies: int = 1, seed: int = 0) -> DemoCorpus:
    """Write the demo corpus as text files under ``out`` (one file per document).

    The ``docs`` domain is reference documentation: the ``pydoc`` topics and the API pages of the
    scanned modules (not tests). Whole topics and pages (by a hash of their
    name) form the reference set, then the evaluation set, up to their byte sizes; the rest is
    trained on. A module whose page is in the reference or evaluation set gives no training
    document at all (no code, docstring or garbled copy), so the sets share no text with
    training. See docs/results.md ("Benchmark regime") for the sizes the benchmark uses.

    Args:
        out (str): Output directory (``train/<domain>``, ``heldout/<domain>``, ``reference``,
            ``evaluation``).
        code_bytes (int): Standard-library source bytes to scan (bounds corpus size and time):
            the modules (about 10 MB), then the library's test suite.
        heldout (float): Fraction of each domain's documents held out for evaluation.
        reference_bytes (int): Bytes of the reference set the console steers by (whole topics
            and pages; the last one taken may overshoot).
        evaluation_bytes (int): Bytes of the evaluation set, disjoint from the reference.
        doc_chars (int): Length at which topics and pages are cut into documents.
        garbled_copies (int): Garbled copies of each docstring (differently garbled): the size
            of the low-quality domain, which a large corpus needs more of than the library's
            docstrings give.
        seed (int): Seed of the garbling.
    """
    import pydoc_data.topics

    for name, value in (('reference_bytes', reference_bytes),
                        ('evaluation_bytes', evaluation_bytes), ('doc_chars', doc_chars)):
        if value <= 0:
            raise ValueError(f'{name} must be positive, got {value}')
    if garbled_copies < 1:
        raise ValueError(f'garbled_copies must be at least 1, got {garbled_copies}')
    rng = random.Random(seed)
    root = sysconfig.get_paths()['stdlib']
    files = _stdlib_files(code_bytes)
    rel = {path: os.path.relpath(path, root).replace(os.sep, '__') for path, _ in files}
    units = [(f'topic/{name}', [(f'{name}__{k:03d}.txt', chunk) for k, chunk in enumerate(
        _chunks(pydoc_data.topics.topics[name], doc_chars))])
             for name in sorted(pydoc_data.topics.topics)]
    for path, is_test in files:
        if not is_test:
            name = rel[path][:-len('.py')].replace('__', '.')
            units.append((f'page/{rel[path]}', [
                (f'{rel[path]}__{k:03d}.txt', chunk)
                for k, chunk in enumerate(_chunks(_page(path, name), doc_chars))]))
    units = [u for u in units if u[1]]
    reference, rest = _by_bytes(units, reference_bytes, 'reference')
    evaluation, rest = _by_bytes(rest, evaluation_bytes, 'evaluation')
    unseen = {key[len('page/'):] for key, _ in reference + evaluation if key.startswith('page/')}
    docs: dict[str, list[tuple[str, str]]] = {d: [] for d in DOMAINS}
    docs['docs'] = [doc for _, unit in sorted(rest) for doc in unit]
    paths = [path for path, _ in files if rel[path] not in unseen]
    for i, doc in enumerate(_docstrings(paths)):
        docs['docstrings'].append((f'doc{i:05d}.txt', doc))
        docs['garbled'] += [(f'garbled{i:05d}' + (f'-{k}' if k else '') + '.txt', _garble(doc, rng))
                            for k in range(garbled_copies)]
    for path in paths:
        with open(path, encoding='utf-8', errors='replace') as f:
            docs['code'].append((rel[path] + '.txt', f.read()))
    train, held = _write_domains(out, docs, heldout)
    sets = {name: _write(os.path.join(out, name), [doc for _, unit in chosen for doc in unit])
            for name, chosen in (('reference', reference), ('evaluation', evaluation))}
    return DemoCorpus(train, held, sets['reference'], sets['evaluation'])
