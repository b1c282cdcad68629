"""`mads clean-shm`: the shared memory of a run killed together with its resource tracker is
removed; a live process's is kept, even where a later dataset maps the dead run's segments."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from multiprocessing import resource_tracker, shared_memory

import pytest
from conftest import write_labelled_stream

from streaming_mads.run.cli import main
from streaming_mads.shm import SHM_DIR, clean_filelocks, clean_shared_memory, find_groups

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR) or not os.path.isdir('/proc'),
                                reason='needs /dev/shm and /proc (Linux)')

# A MADSDataset in its own process: prints its board's name and its resource tracker's pid,
# then waits to be killed.
CHILD = '''
import sys, time
from multiprocessing import resource_tracker
from streaming_mads import MADSDataset
ds = MADSDataset(local=sys.argv[1], batch_size=4, pool_ratio=2, shuffle=False)
resource_tracker.ensure_running()
print(ds.board.name, resource_tracker._resource_tracker._pid, flush=True)
time.sleep(600)
'''


def _start(local: str) -> tuple[subprocess.Popen, int, int]:
    proc = subprocess.Popen([sys.executable, '-c', CHILD, local], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert len(line) == 2, proc.stderr.read() if proc.poll() is not None else line
    board, tracker = line
    return proc, int(board.split('_', 1)[0]), int(tracker)


def _segments(prefix: int) -> list[str]:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(f'{prefix:06d}_'))


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_clean_shm_removes_a_killed_runs_segments_and_keeps_live_ones(tmp_path, capsys):
    dead, dead_prefix, tracker = _start(write_labelled_stream(str(tmp_path / 'a'), range(64)))
    try:
        before = _segments(dead_prefix)
        assert f'{dead_prefix:06d}_mads_board_0' in before and f'{dead_prefix:06d}_locals' in before
        os.kill(tracker, signal.SIGKILL)  # The run dies with its resource tracker.
        dead.kill()
        dead.wait()
    finally:
        _kill(dead)
    assert _segments(dead_prefix) == before  # Left behind for good.
    # A later dataset, alive: looking for a free prefix it opened (and keeps mapped) the dead
    # run's segments.
    live, live_prefix, _ = _start(write_labelled_stream(str(tmp_path / 'b'), range(64)))
    # Simulated leftovers without a board (plain Streaming): one held by this live process, one
    # whose creator is gone (unregistered from the resource tracker, closed).
    held = shared_memory.SharedMemory(name='999990_locals', create=True, size=64)
    orphan = shared_memory.SharedMemory(name='999991_locals', create=True, size=64)
    resource_tracker.unregister(orphan._name, 'shared_memory')
    orphan.close()
    try:
        assert live_prefix != dead_prefix
        live_segments = _segments(live_prefix)
        with open(f'/proc/{live.pid}/maps') as f:
            assert f'{SHM_DIR}/{dead_prefix:06d}_locals' in f.read()
        mine = [dead_prefix, live_prefix, 999990, 999991]
        groups = {g.prefix: g for g in find_groups(prefixes=mine)}
        assert groups[dead_prefix].stale and groups[999991].stale
        assert live.pid in groups[live_prefix].users and os.getpid() in groups[999990].users

        assert main(['clean-shm', '--dry-run']) == 0
        out = capsys.readouterr().out
        assert f'{dead_prefix:06d}: {len(before)} segment(s)' in out
        assert 'owner gone: would be removed' in out and f'in use by pid {live.pid}' in out
        assert _segments(dead_prefix) == before  # Listed only.

        assert main(['clean-shm']) == 0
        out = capsys.readouterr().out
        assert f'{dead_prefix:06d}: {len(before)} segment(s), ' in out and 'removed' in out
        assert _segments(dead_prefix) == [] and _segments(999991) == []
        assert _segments(live_prefix) == live_segments and _segments(999990) == ['999990_locals']
        assert live.poll() is None
        assert not any(g.removed for g in clean_shared_memory(prefixes=mine))  # Nothing left.
    finally:
        _kill(live)
        held.close()
        held.unlink()
        if os.path.exists(f'{SHM_DIR}/999991_locals'):  # The test failed before removing it.
            os.unlink(f'{SHM_DIR}/999991_locals')


def test_clean_shm_removes_streamings_stale_lock_files_only(tmp_path):
    """Lock files of a prefix with no segment left go; those of a live prefix, or held open, stay.

    Every later StreamingDataset skips each prefix that has a lock file, one stat at a time."""
    def lock(prefix: int, kind: str = 'barrier') -> str:
        path = str(tmp_path / f'{prefix:06d}_{kind}_filelock')
        open(path, 'w').close()
        return path

    stale = [lock(999980), lock(999980, 'cache'), lock(999981, 'cache')]
    live_lock = lock(999982)
    held_lock = lock(999983)
    other = str(tmp_path / 'not_a_lock_filelock')
    open(other, 'w').close()
    segment = shared_memory.SharedMemory(name='999982_locals', create=True, size=64)
    held = open(held_lock)
    try:
        assert clean_filelocks(dry_run=True, tmp_dir=str(tmp_path)) == sorted(stale)
        assert all(os.path.exists(p) for p in stale)  # Listed only.
        assert clean_filelocks(tmp_dir=str(tmp_path)) == sorted(stale)
        assert not any(os.path.exists(p) for p in stale)
        assert os.path.exists(live_lock) and os.path.exists(held_lock) and os.path.exists(other)
        held.close()
        assert clean_filelocks(tmp_dir=str(tmp_path)) == [held_lock]  # Released: stale now.
        assert os.path.exists(live_lock)
    finally:
        held.close()
        segment.close()
        segment.unlink()
