"""Shared memory that dead runs left in ``/dev/shm``: find it and remove it (``mads clean-shm``).

Every StreamingDataset on a node takes a six-digit prefix and makes its segments under it
(``000003_locals``, ``000003_shard_states``, ...); a MADSDataset adds one weight board per rank
(``000003_mads_board_0``). Their process removes them when it ends, or its resource tracker does
when it is killed; a run killed together with its tracker (a killed process group or container,
the OOM killer, a scheduler's kill) leaves them for good. Each later StreamingDataset on the node
then opens the segments of every leftover prefix while looking for a free one, and keeps them
mapped for as long as it lives.

Who uses a segment is read from ``/proc``: a process that maps it (``/proc/<pid>/maps``) or holds
it open (``/proc/<pid>/fd``). The segments of one prefix (a *group*) go together:

* a group with a weight board (a MADSDataset's) is in use while a live process maps or holds one
  of its boards: a later dataset looking for a free prefix opens Streaming's segments of every
  prefix but never a board, so it cannot keep a dead group alive;
* any other group (a plain StreamingDataset's, or one still being built) is in use while a live
  process maps or holds any of its segments.

A group not in use is removed; one in use is never touched, and a segment replaced since it was
listed is left alone. Streaming also leaves two lock files per prefix in the temp folder
(``/tmp/000003_barrier_filelock``, ``..._cache_filelock``) that nothing ever removes, and every
later StreamingDataset skips each prefix that has one, one ``stat`` at a time: on a node that has
built thousands of datasets, building one takes a tenth of a second more per thousand. A lock
file whose prefix has no segment left and that no live process holds open is stale and removed
with the segments (:func:`clean_filelocks`). Only the caller's own segments are considered. ``/proc`` shows the processes
of this PID namespace only, so run it where every process that shares this ``/dev/shm`` is
visible (inside a container: the container whose ``/dev/shm`` it is). See docs/architecture.md,
"Reliability", and docs/configuration.md (``mads clean-shm``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from tempfile import gettempdir
from typing import Iterable, Optional

from streaming_mads.streaming_internals import (parse_shared_memory_name,
                                                streaming_filelock_names, streaming_segment_names)

__all__ = ['BOARD_SUFFIX', 'SHM_DIR', 'CleanShmError', 'SegmentGroup', 'find_groups',
           'clean_shared_memory', 'clean_filelocks', 'groups_table']

SHM_DIR = '/dev/shm'
#: The weight board's name under the prefix (``<prefix>_mads_board_<rank of node>``).
BOARD_SUFFIX = 'mads_board'


class CleanShmError(RuntimeError):
    """Who uses a segment cannot be told on this system."""


@dataclass
class SegmentGroup:
    """The segments of one prefix, and who uses them.

    Attributes:
        prefix (int): Streaming's per-node prefix.
        segments (list[str]): Names in the shared-memory folder.
        size (int): Their bytes.
        boards (list[str]): Those that are weight boards.
        users (list[int]): Live processes that use the group (see the module doc).
        removed (bool): Whether :func:`clean_shared_memory` removed it.
    """
    prefix: int
    segments: list[str] = field(default_factory=list)
    size: int = 0
    boards: list[str] = field(default_factory=list)
    users: list[int] = field(default_factory=list)
    removed: bool = False
    _inodes: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def stale(self) -> bool:
        """No live process uses it: its owner is gone."""
        return not self.users


def _kind(rest: str) -> Optional[str]:
    """``'board'``, ``'streaming'`` or ``None`` (not ours) for a name's part after the prefix."""
    board, _, rank = rest.rpartition('_')
    if board == BOARD_SUFFIX and rank.isdigit():
        return 'board'
    return 'streaming' if rest in streaming_segment_names() else None


def _need_proc(proc: str, what: str) -> None:
    """Refuse where ``proc`` cannot tell who ``what`` (no proc file system: not Linux)."""
    if not os.path.isdir(os.path.join(proc, str(os.getpid()))):
        raise CleanShmError(f'mads clean-shm reads who {what} from {proc}, which this system does '
                            'not have (Linux only).')


def _users(shm_dir: str, proc: str) -> dict[str, set[int]]:
    """For each name in ``shm_dir``: the processes mapping it or holding it open."""
    where = os.path.realpath(shm_dir).rstrip('/') + '/'
    out: dict[str, set[int]] = {}

    def add(path: str, pid: int) -> None:
        if path.startswith(where) and not path.endswith(' (deleted)'):
            out.setdefault(path[len(where):], set()).add(pid)

    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(os.path.join(proc, entry, 'maps')) as f:
                for line in f:
                    if where in line:
                        add(line[line.index(where):].rstrip('\n'), pid)
        except OSError:  # Gone meanwhile, or another user's.
            pass
        fds = os.path.join(proc, entry, 'fd')
        try:
            names = os.listdir(fds)
        except OSError:
            continue
        for fd in names:
            try:
                add(os.readlink(os.path.join(fds, fd)), pid)
            except OSError:
                pass
    return out


def find_groups(shm_dir: str = SHM_DIR, proc: str = '/proc',
                prefixes: Optional[Iterable[int]] = None) -> list[SegmentGroup]:
    """The caller's Streaming and weight-board segments in ``shm_dir``, by prefix, with users.

    Args:
        shm_dir (str): The shared-memory folder. Defaults to ``/dev/shm``.
        proc (str): The proc file system. Defaults to ``/proc``.
        prefixes (Iterable[int], optional): Only these prefixes. Defaults to all.

    Returns:
        list[SegmentGroup]: By prefix.
    """
    if not os.path.isdir(shm_dir):
        return []
    _need_proc(proc, 'uses a segment')
    only = None if prefixes is None else set(prefixes)
    groups: dict[int, SegmentGroup] = {}
    kinds: dict[str, str] = {}
    for name in sorted(os.listdir(shm_dir)):
        parsed = parse_shared_memory_name(name)
        if parsed is None or (only is not None and parsed[0] not in only):
            continue
        kind = _kind(parsed[1])
        if kind is None:
            continue
        try:
            st = os.stat(os.path.join(shm_dir, name))
        except OSError:
            continue
        if st.st_uid != os.geteuid():
            continue
        group = groups.setdefault(parsed[0], SegmentGroup(parsed[0]))
        group.segments.append(name)
        group.size += st.st_size
        group._inodes[name] = st.st_ino
        kinds[name] = kind
        if kind == 'board':
            group.boards.append(name)
    users = _users(shm_dir, proc) if groups else {}
    for group in groups.values():
        held = group.boards or group.segments
        group.users = sorted(set().union(*(users.get(n, set()) for n in held)))
    return [groups[p] for p in sorted(groups)]


def clean_shared_memory(dry_run: bool = False, shm_dir: str = SHM_DIR, proc: str = '/proc',
                        prefixes: Optional[Iterable[int]] = None) -> list[SegmentGroup]:
    """Remove the groups of segments whose owner is gone (:func:`find_groups`; module doc).

    Args:
        dry_run (bool): Only list them. Defaults to ``False``.
        shm_dir (str): The shared-memory folder. Defaults to ``/dev/shm``.
        proc (str): The proc file system. Defaults to ``/proc``.
        prefixes (Iterable[int], optional): Only these prefixes. Defaults to all.

    Returns:
        list[SegmentGroup]: Every group found; ``removed`` set on those removed.
    """
    groups = find_groups(shm_dir, proc, prefixes)
    for group in groups:
        if not group.stale or dry_run:
            continue
        kept = 0
        for name in group.segments:
            path = os.path.join(shm_dir, name)
            try:
                if os.stat(path).st_ino != group._inodes[name]:
                    kept += 1  # Made anew since it was listed: not the dead run's.
                    continue
                os.unlink(path)
            except FileNotFoundError:
                pass
        group.removed = not kept
    return groups


def clean_filelocks(dry_run: bool = False, tmp_dir: Optional[str] = None,
                    shm_dir: str = SHM_DIR, proc: str = '/proc') -> list[str]:
    """Remove Streaming's stale per-prefix lock files (module doc): the caller's, whose prefix has
    no segment in ``shm_dir`` and which no live process holds open.

    Args:
        dry_run (bool): Only list them. Defaults to ``False``.
        tmp_dir (str, optional): Where Streaming puts them. Defaults to :func:`tempfile.gettempdir`,
            as Streaming does.
        shm_dir (str): The shared-memory folder. Defaults to ``/dev/shm``.
        proc (str): The proc file system. Defaults to ``/proc``.

    Returns:
        list[str]: The stale lock files' paths (removed unless ``dry_run``).
    """
    tmp_dir = tmp_dir or gettempdir()
    if not os.path.isdir(tmp_dir):
        return []
    locks = set(streaming_filelock_names())
    found = []
    for name in os.listdir(tmp_dir):
        parsed = parse_shared_memory_name(name)
        if parsed is not None and parsed[1] in locks:
            found.append((parsed[0], name))
    if not found:
        return []
    _need_proc(proc, 'holds a lock file')
    live = set()
    if os.path.isdir(shm_dir):
        for name in os.listdir(shm_dir):
            parsed = parse_shared_memory_name(name)
            if parsed is not None:
                live.add(parsed[0])
    held = _users(tmp_dir, proc)
    stale = []
    for prefix, name in sorted(found):
        path = os.path.join(tmp_dir, name)
        if prefix in live or name in held:
            continue
        try:
            if os.stat(path).st_uid != os.geteuid():
                continue
            if not dry_run:
                os.unlink(path)
        except FileNotFoundError:
            continue
        stale.append(path)
    return stale


def groups_table(groups: list[SegmentGroup], dry_run: bool, shm_dir: str = SHM_DIR) -> str:
    """What :func:`clean_shared_memory` found and did, one line per prefix."""
    if not groups:
        return f'{shm_dir}: no Streaming or MADS shared memory of this user.'
    stale = sum(g.stale for g in groups)
    lines = [f'{shm_dir}: {len(groups)} prefix(es) of Streaming / MADS shared memory, {stale} '
             f'whose owner is gone:']
    for g in groups:
        what = f'{len(g.segments)} segment(s), {g.size / 2**20:.2f} MiB' + \
            (f', {len(g.boards)} weight board(s)' if g.boards else '')
        if g.stale:
            verdict = 'owner gone: ' + ('would be removed' if dry_run else 'removed')
        else:
            pids = ', '.join(map(str, g.users[:8])) + (' ...' if len(g.users) > 8 else '')
            verdict = f'in use by pid {pids}: kept'
        lines.append(f'  {g.prefix:06d}: {what}; {verdict}')
    return '\n'.join(lines)
