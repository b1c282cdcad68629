"""The package's layers: sub-packages import only the layers below them, and no module cycles.

The layers are those of docs/architecture.md ("Layout"): the shared base at the top level of
``streaming_mads``; offline ``convert`` and ``labeling``; ``selection`` in the DataLoader
workers; ``influence`` and ``console`` in the main process; the Composer ``algorithms``; and
``run`` (CLI, ``mads train``, demo, llm-foundry), which may use everything. Every import counts,
including those inside functions.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Repository folder of each installed package (setuptools' package-dir mapping in pyproject).
FOLDERS = {'streaming_mads': 'streaming_mads', 'streaming_mads.algorithms': 'algorithms'}

#: What each layer may import besides itself ('base' = the top-level modules).
ALLOWED = {
    'base': set(),
    'corpora': set(),
    'convert': {'base'},
    'labeling': {'base'},
    'selection': {'base'},
    'influence': {'base'},
    'console': {'base', 'convert', 'selection', 'influence'},
    'algorithms': {'base', 'convert', 'selection', 'influence', 'console'},
    'run': {'base', 'convert', 'labeling', 'selection', 'influence', 'console', 'algorithms',
            'corpora'},
}


def _modules() -> dict[str, str]:
    """Every module of the package: dotted name -> file."""
    found = {}
    for package, folder in FOLDERS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != '__pycache__' and
                           not (package == 'streaming_mads' and d == 'algorithms')]
            rel = os.path.relpath(dirpath, base)
            prefix = package if rel == '.' else f'{package}.{rel.replace(os.sep, ".")}'
            for name in filenames:
                if name.endswith('.py'):
                    mod = prefix if name == '__init__.py' else f'{prefix}.{name[:-3]}'
                    found[mod] = os.path.join(dirpath, name)
    return found


MODULES = _modules()


def _imports(path: str, module: str) -> set[str]:
    """Project modules that ``module`` imports (resolved to the module, not the name)."""
    out = set()
    package = module if path.endswith('__init__.py') else module.rsplit('.', 1)[0]
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parent = package.split('.')
                base = '.'.join(parent[:len(parent) - node.level + 1] + ([base] if base else []))
            names = [f'{base}.{a.name}' for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition('.')[0]
            if name and name != module:
                out.add(name)
    return out


def _layer(module: str) -> str:
    parts = module.split('.')
    if len(parts) == 1 or (len(parts) == 2 and f'{module}' not in
                           {f'streaming_mads.{k}' for k in ALLOWED}):
        return 'base'
    return parts[1]


GRAPH = {m: _imports(p, m) for m, p in MODULES.items()}


def test_every_module_is_in_a_layer():
    assert len(MODULES) > 30
    for module in MODULES:
        assert _layer(module) in ALLOWED, module


@pytest.mark.parametrize('module', sorted(m for m in MODULES if m != 'streaming_mads'))
def test_imports_point_down(module):
    """The package root re-exports the public API; every other module imports only downwards."""
    mine = _layer(module)
    for target in GRAPH[module]:
        theirs = _layer(target)
        assert theirs == mine or theirs in ALLOWED[mine], \
            f'{module} ({mine}) imports {target} ({theirs})'
        assert target != 'streaming_mads', f'{module} imports the package root; name the module'


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                raise AssertionError('import cycle: ' + ' -> '.join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize('package', sorted(m for m, p in MODULES.items() if p.endswith('__init__.py')))
def test_package_exports_are_names(package):
    """``__all__`` lists names that exist, so ``from package import *`` works."""
    import importlib
    module = importlib.import_module(package)
    for name in getattr(module, '__all__', []):
        assert isinstance(name, str) and hasattr(module, name), (package, name)
