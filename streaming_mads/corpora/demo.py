"""The embedded demo corpus: four domains of text built from the Python installation itself.

A fresh machine has no dataset, but it has Python: its reference documentation (the topic texts
``pydoc`` serves, in ``pydoc_data.topics``), the docstrings and the source code of its standard
library. From them we build domains of clearly different usefulness for a reference set of
held-out documentation topics:

* ``docs``: reference documentation topics (the reference's own distribution),
* ``docstrings``: standard-library docstrings (technical prose, close to the reference),
* ``code``: standard-library source files (a different distribution),
* ``garbled``: docstrings with shuffled words, corrupted characters and spam boilerplate
  (deliberately low quality).

Everything is deterministic (sorted file lists, fixed seeds), so the corpus is identical on every
machine with the same Python version.
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
        evaluation (str): Directory of documentation topics that are neither trained on nor shown
            to the console: data efficiency is measured on them.
    """
    train: dict[str, str]
    heldout: dict[str, str]
    reference: str
    evaluation: str


def _stdlib_files(limit_bytes: int) -> list[str]:
    root = sysconfig.get_paths()['stdlib']
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ('site-packages', 'test', 'tests', 'idlelib', '__pycache__')
                             and not d.startswith('.'))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith('.py')]
    out, total = [], 0
    for path in files:
        size = os.path.getsize(path)
        if 2_000 <= size <= 200_000 and total < limit_bytes:
            out.append(path)
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


def build_demo_text(out: str, code_bytes: int = 3_000_000, heldout: float = 0.05,
                    reference_fraction: float = 0.25, seed: int = 0) -> DemoCorpus:
    """Write the demo corpus as text files under ``out`` (one file per document).

    Args:
        out (str): Output directory (``train/<domain>``, ``heldout/<domain>``, ``reference``,
            ``evaluation``).
        code_bytes (int): Standard-library source bytes to scan (bounds corpus size and time).
        heldout (float): Fraction of each domain's documents held out for evaluation.
        reference_fraction (float): Fraction of documentation topics never trained on; half of
            them (by a hash of the topic name) form the reference set the console steers by, the
            other half the evaluation set, so the two are disjoint by document.
        seed (int): Seed of the garbling.
    """
    import pydoc_data.topics

    rng = random.Random(seed)
    paths = _stdlib_files(code_bytes)
    docs: dict[str, list[tuple[str, str]]] = {d: [] for d in DOMAINS}
    reference: list[tuple[str, str]] = []
    evaluation: list[tuple[str, str]] = []
    for name in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[name]
        if _heldout('ref/' + name, reference_fraction):
            (evaluation if _heldout('eval/' + name, 0.5) else reference).append((f'{name}.txt',
                                                                                 text))
        else:
            docs['docs'].append((f'{name}.txt', text))
    for i, doc in enumerate(_docstrings(paths)):
        docs['docstrings'].append((f'doc{i:05d}.txt', doc))
        docs['garbled'].append((f'garbled{i:05d}.txt', _garble(doc, rng)))
    root = sysconfig.get_paths()['stdlib']
    for path in paths:
        rel = os.path.relpath(path, root).replace(os.sep, '__')
        with open(path, encoding='utf-8', errors='replace') as f:
            docs['code'].append((rel + '.txt', f.read()))
    train, held = _write_domains(out, docs, heldout)
    return DemoCorpus(train, held, _write(os.path.join(out, 'reference'), reference),
                      _write(os.path.join(out, 'evaluation'), evaluation))
