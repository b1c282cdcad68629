"""One ``mads label`` run per stream at a time: a lock file in the stream's ``mads/`` folder.

Two runs labelling one stream would share its work files (``mads/.work``) and rewrite each
other's labels, so each run locks ``mads/.label.lock`` of every stream it labels, in path
order, before any work, and the loser stops at once with a :class:`LabelingError` naming the
owner. The lock is a POSIX record lock (``fcntl.lockf``) on that file: the kernel releases it when
its process dies (``kill -9`` included; on NFS, once the lock's lease expires), and it is not
inherited by the worker processes. The file holds the owner (pid, host, start time) for the
message, and is deleted when the run ends, with or without an error.

A file left by a run killed on **this** host is taken over (the free lock proves its owner is
gone). One left by a run on **another** host is refused, since not every shared file system
carries locks across hosts: the message says to delete it once that run is known to be dead.
Where the file system refuses record locks altogether, the owner's record decides alone (a live
pid on this host, or any other host, holds). See docs/architecture.md, "Reliability".
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

from streaming_mads.labeling.streams import LabelingError

__all__ = ['LOCK_NAME', 'LabelLock']

LOCK_NAME = '.label.lock'
_RECORD_WAIT = 2.0  # Seconds a loser waits for the winner to write its record.
# Lock files this process holds: a record lock is the process's, so a second run in this process
# (another thread) would get it again.
_HELD_HERE: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse(data: bytes) -> Optional[dict[str, Any]]:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _read_record(path: str) -> Optional[dict[str, Any]]:
    """The owner's record (never call it on a file this process has locked: see ``_acquire``)."""
    try:
        with open(path, 'rb') as f:
            return _parse(f.read())
    except OSError:
        return None


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (a released lock file is deleted)."""
    try:
        st, fst = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)


def _owner(record: Optional[dict[str, Any]]) -> str:
    if not record:
        return 'owner not recorded'
    return (f'pid {record.get("pid")} on host {record.get("host")}, labelling since '
            f'{record.get("since")}')


class LabelLock:
    """The locks of one ``mads label`` run over ``dirs`` (each stream's ``mads/`` folder).

    Args:
        dirs (Sequence[str]): The labels folders to lock (created if missing).

    Raises:
        LabelingError: Another run holds one of them (nothing is kept locked then).
    """

    def __init__(self, dirs: Sequence[str]) -> None:
        self.host = socket.gethostname()
        self.record = {'pid': os.getpid(), 'host': self.host,
                       'since': datetime.now(timezone.utc).isoformat(timespec='seconds')}
        self._held: list[tuple[str, int]] = []
        self._made: list[str] = []  # Folders made for the lock: removed again if left empty.
        try:
            for d in sorted(set(os.path.abspath(d) for d in dirs)):
                if not os.path.isdir(d):
                    os.makedirs(d)
                    self._made.append(d)
                path = os.path.join(d, LOCK_NAME)
                self._held.append((path, self._acquire(path)))
        except BaseException:
            self.release()
            raise

    def _acquire(self, path: str) -> int:
        if path in _HELD_HERE:
            raise LabelingError(f'Another mads label run in this process is labelling '
                                f'{os.path.dirname(path)}: wait for it to finish.')
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._lock(fd, path)
                if locked is None or not _same_file(fd, path):
                    os.close(fd)  # Released (deleted) by the run that held it: try the new file.
                    continue
                # Read through ``fd``: closing any other descriptor of the file would drop
                # this process's record lock on it.
                self._check_previous(path, _parse(os.pread(fd, 1 << 16, 0)), locked)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(self.record).encode(), 0)
                os.fsync(fd)
                _HELD_HERE.add(path)
                return fd
            except BaseException:
                os.close(fd)
                raise

    def _lock(self, fd: int, path: str) -> Optional[bool]:
        """Lock ``fd``; ``False`` where the file system has no record locks, ``None`` when the
        holder released it meanwhile."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                return False  # ENOLCK, EOPNOTSUPP...: the record decides alone.
        record = _read_record(path)
        deadline = time.monotonic() + _RECORD_WAIT
        while not record and time.monotonic() < deadline:  # The winner is writing it.
            time.sleep(0.05)
            record = _read_record(path)
        if not _same_file(fd, path):
            return None
        raise self._held_error(path, record, alive=True)

    def _check_previous(self, path: str, record: Optional[dict[str, Any]], locked: bool) -> None:
        """Refuse a record of a run that may still be alive (see the module doc)."""
        if not record:
            return
        if record.get('host') != self.host:
            raise self._held_error(path, record, alive=False)
        pid = record.get('pid')
        if not locked and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
            raise self._held_error(path, record, alive=True)

    def _held_error(self, path: str, record: Optional[dict[str, Any]],
                    alive: bool) -> LabelingError:
        """The loser's message: who labels, since when, and what to do."""
        labels = os.path.dirname(path)
        again = 'then run mads label again (it resumes the shards already done)'
        if alive and record and record.get('host') == self.host:
            return LabelingError(
                f'Another mads label run is labelling {labels} ({_owner(record)}): wait for it '
                f'to finish, or stop it (kill {record.get("pid")}), {again}.')
        what = 'is' if alive else 'may be'
        return LabelingError(
            f'Another mads label run {what} labelling {labels} ({_owner(record)}): wait for it '
            f'to finish. If that run is dead (its host down or unreachable), delete {path}, '
            f'{again}.')

    def release(self) -> None:
        """Delete the lock files and unlock (in reverse order), and the folders made for them
        that nothing else was written to."""
        while self._held:
            path, fd = self._held.pop()
            try:
                os.unlink(path)
            except OSError:
                pass
            os.close(fd)
            _HELD_HERE.discard(path)
        while self._made:
            try:
                os.rmdir(self._made.pop())
            except OSError:
                pass

    def __enter__(self) -> LabelLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
