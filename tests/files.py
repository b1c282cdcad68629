"""File helpers shared by tests."""

from __future__ import annotations

import os


def file_tree(directory: str) -> dict[str, bytes]:
    """Every file under ``directory``: relative path -> content."""
    out = {}
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out
